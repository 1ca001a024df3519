//! kube-proxy's observability surface: `kubeproxy_*` metrics with upstream's exact names,
//! proxy health (`/healthz`, `/livez`) with upstream's rules, and the two admin HTTP
//! servers (metrics port 10249, health port 10256).
//!
//! Wiring sketch:
//! ```no_run
//! # async fn run() -> Result<(), kp_admin::AdminError> {
//! use std::time::Duration;
//! use kp_admin::{IpFamily, Metrics, MetricsServerState, ProxyHealth};
//! use kp_dataplane::Mode;
//!
//! let metrics = Metrics::new(Mode::Iptables);
//! let health = ProxyHealth::for_sync_period(Duration::from_secs(30)).with_metrics(metrics.clone());
//! let v4 = metrics.proxier(IpFamily::IPv4);
//!
//! let state = MetricsServerState::new(metrics.clone(), serde_json::json!({"mode": "iptables"}));
//! let (_metrics_task, _addr) = kp_admin::serve_metrics("127.0.0.1:10249".parse().unwrap(), state).await?;
//! let (_health_task, _addr) = kp_admin::serve_healthz("0.0.0.0:10256".parse().unwrap(), health.clone()).await?;
//!
//! health.queued_update(IpFamily::IPv4);
//! // ... sync ...
//! v4.observe_sync(kp_admin::SyncKind::Full, Duration::from_millis(12));
//! health.updated(IpFamily::IPv4);
//! # Ok(()) }
//! ```

pub mod exposition;
pub mod health;
pub mod metrics;
mod process;
pub mod server;
pub mod service_health;

pub use exposition::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE};
pub use health::{
    Clock, ClockReading, HealthResponse, ManualClock, ProxierHealth, ProxyHealth,
    ProxyHealthReport, SystemClock, TO_BE_DELETED_TAINT, is_node_eligible,
};
pub use metrics::{
    IpFamily, IptablesTable, METRIC_PREFIX, Metrics, ProxierMetrics, SyncKind, TrafficPolicy,
};
pub use server::{
    AdminError, CONFIGZ_KEY, MetricsServerState, ServerHandle, healthz_router, metrics_router,
    serve_healthz, serve_healthz_on, serve_metrics, serve_metrics_on,
};
pub use service_health::{
    ENDPOINT_WEIGHT_HEADER, FAILED_TO_START_EVENT_ACTION, FAILED_TO_START_EVENT_REASON,
    HealthCheckListenError, ServiceHealthServer, ServiceName,
};
