//! The two admin HTTP servers, with upstream's routes, bodies and headers:
//! - metrics server (default 127.0.0.1:10249): `/metrics`, `/proxyMode`, `/configz`, and the
//!   generic `/healthz` ping (`ok`) that upstream installs there too;
//! - health server (default 0.0.0.0:10256): `/healthz`, `/livez` proxy health JSON.
//!
//! Like Go's `ServeMux`, routes answer any method and unknown paths get
//! `404 page not found`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::exposition::PROMETHEUS_TEXT_CONTENT_TYPE;
use crate::health::ProxyHealth;
use crate::metrics::Metrics;

/// Key of the kube-proxy configuration in the `/configz` object (its API group).
pub const CONFIGZ_KEY: &str = "kubeproxy.config.k8s.io";

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const APPLICATION_JSON: &str = "application/json";

/// Errors starting or running an admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("failed to bind admin server to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("failed to adopt pre-bound admin listener: {source}")]
    Listener {
        #[source]
        source: io::Error,
    },
    #[error("admin server on {addr} stopped: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// What the metrics server serves.
#[derive(Debug, Clone)]
pub struct MetricsServerState {
    metrics: Metrics,
    configz: Arc<serde_json::Value>,
}

impl MetricsServerState {
    /// `config` is the effective configuration as upstream's `/configz` shows it; the proxy
    /// mode for `/proxyMode` is the one `metrics` was registered for.
    pub fn new(metrics: Metrics, config: serde_json::Value) -> Self {
        MetricsServerState {
            metrics,
            configz: Arc::new(config),
        }
    }
}

/// A server task and the address it is bound to. Aborting the task stops the server.
pub type ServerHandle = (JoinHandle<Result<(), AdminError>>, SocketAddr);

/// Routes of the metrics server.
pub fn metrics_router(state: MetricsServerState) -> Router {
    Router::new()
        .route("/metrics", any(metrics_handler))
        .route("/proxyMode", any(proxy_mode_handler))
        .route("/configz", any(configz_handler))
        .route("/healthz", any(ping_handler))
        .route("/healthz/ping", any(ping_handler))
        .fallback(not_found)
        .with_state(state)
}

/// Routes of the health server.
pub fn healthz_router(health: ProxyHealth) -> Router {
    Router::new()
        .route("/healthz", any(healthz_handler))
        .route("/livez", any(livez_handler))
        .fallback(not_found)
        .with_state(health)
}

/// Binds `addr` (port 0 picks a free port) and serves the metrics routes.
pub async fn serve_metrics(
    addr: SocketAddr,
    state: MetricsServerState,
) -> Result<ServerHandle, AdminError> {
    let listener = bind(addr).await?;
    spawn(listener, metrics_router(state))
}

/// Serves the metrics routes on an already bound listener.
pub fn serve_metrics_on(
    listener: std::net::TcpListener,
    state: MetricsServerState,
) -> Result<ServerHandle, AdminError> {
    spawn(adopt(listener)?, metrics_router(state))
}

/// Binds `addr` (port 0 picks a free port) and serves `/healthz` and `/livez`.
pub async fn serve_healthz(
    addr: SocketAddr,
    health: ProxyHealth,
) -> Result<ServerHandle, AdminError> {
    let listener = bind(addr).await?;
    spawn(listener, healthz_router(health))
}

/// Serves `/healthz` and `/livez` on an already bound listener.
pub fn serve_healthz_on(
    listener: std::net::TcpListener,
    health: ProxyHealth,
) -> Result<ServerHandle, AdminError> {
    spawn(adopt(listener)?, healthz_router(health))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Tokio needs the socket non-blocking; must run inside a Tokio runtime.
fn adopt(listener: std::net::TcpListener) -> Result<TcpListener, AdminError> {
    listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map_err(|source| AdminError::Listener { source })
}

fn spawn(listener: TcpListener, router: Router) -> Result<ServerHandle, AdminError> {
    let addr = listener
        .local_addr()
        .map_err(|source| AdminError::Listener { source })?;
    tracing::info!(%addr, "admin HTTP server listening");
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .map_err(|source| AdminError::Serve { addr, source })
    });
    Ok((task, addr))
}

/// A response with a body, content type and Go's `X-Content-Type-Options: nosniff`.
fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn metrics_handler(State(state): State<MetricsServerState>) -> Response {
    respond(
        StatusCode::OK,
        PROMETHEUS_TEXT_CONTENT_TYPE,
        state.metrics.encode(),
    )
}

async fn proxy_mode_handler(State(state): State<MetricsServerState>) -> Response {
    respond(
        StatusCode::OK,
        TEXT_PLAIN,
        state.metrics.mode().as_str().to_owned(),
    )
}

async fn configz_handler(State(state): State<MetricsServerState>) -> Response {
    let mut object = serde_json::Map::new();
    object.insert(CONFIGZ_KEY.to_owned(), (*state.configz).clone());
    match serde_json::to_string(&object) {
        Ok(body) => respond(StatusCode::OK, APPLICATION_JSON, body),
        Err(err) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT_PLAIN,
            format!("error marshaling json: {err}\n"),
        ),
    }
}

/// component-base's healthz with only the ping check: `ok`, or the verbose listing.
async fn ping_handler(uri: Uri) -> Response {
    let verbose = uri.query().is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair.split('=').next() == Some("verbose"))
    });
    let body = if verbose {
        "[+]ping ok\nhealthz check passed\n".to_owned()
    } else {
        "ok".to_owned()
    };
    respond(StatusCode::OK, TEXT_PLAIN, body)
}

async fn healthz_handler(State(health): State<ProxyHealth>) -> Response {
    health_response(health.healthz())
}

async fn livez_handler(State(health): State<ProxyHealth>) -> Response {
    health_response(health.livez())
}

fn health_response(answer: crate::health::HealthResponse) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    respond(status, APPLICATION_JSON, answer.body)
}

async fn not_found() -> Response {
    respond(
        StatusCode::NOT_FOUND,
        TEXT_PLAIN,
        "404 page not found\n".to_owned(),
    )
}
