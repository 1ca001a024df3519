//! kube-proxy's `kubeproxy_*` metrics with upstream's names, types, labels, buckets and help
//! texts (pkg/proxy/metrics/metrics.go, Kubernetes metrics reference v1.34).
//!
//! Everything lives in one [`Registry`]: the kube-proxy metrics in a sub-registry with the
//! `kubeproxy` prefix and the process metrics (no prefix) at the root, so one scrape returns
//! both, as upstream's legacy registry does.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::exposition;
use crate::process::ProcessCollector;
use kp_dataplane::Mode;

/// Prefix of every kube-proxy metric (upstream's `kubeProxySubsystem`).
pub const METRIC_PREFIX: &str = "kubeproxy";

/// IP family of one proxier; its `Display` is the `ip_family` label value (`IPv4`/`IPv6`),
/// the Kubernetes API spelling that upstream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    /// The Kubernetes spelling, as used in labels and in the `/healthz` `status` map.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::IPv4 => "IPv4",
            IpFamily::IPv6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for IpFamily {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Which traffic policy has no local endpoints (`traffic_policy` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrafficPolicy {
    Internal,
    External,
}

impl TrafficPolicy {
    /// Upstream's lower-case label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficPolicy::Internal => "internal",
            TrafficPolicy::External => "external",
        }
    }
}

impl EncodeLabelValue for TrafficPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// iptables table whose rules are counted (`table` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IptablesTable {
    Filter,
    Nat,
}

impl IptablesTable {
    /// The iptables table name.
    pub fn as_str(self) -> &'static str {
        match self {
            IptablesTable::Filter => "filter",
            IptablesTable::Nat => "nat",
        }
    }
}

impl EncodeLabelValue for IptablesTable {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Whether a sync rewrote everything or only what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    Full,
    Partial,
}

// Label sets. Field order is alphabetical because the Go client sorts label names.

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FamilyLabels {
    ip_family: IpFamily,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyLabels {
    ip_family: IpFamily,
    traffic_policy: TrafficPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TableLabels {
    ip_family: IpFamily,
    table: IptablesTable,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CodeLabels {
    code: u16,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type TimestampGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Upstream's `ExponentialBuckets(0.001, 2, 15)`: 1 ms to 16.384 s, computed by repeated
/// multiplication as Go does so the bucket boundaries print identically.
pub fn sync_duration_buckets() -> Vec<f64> {
    let mut buckets = Vec::with_capacity(15);
    let mut bound = 0.001_f64;
    for _ in 0..15 {
        buckets.push(bound);
        bound *= 2.0;
    }
    buckets
}

/// Upstream's network programming buckets: 0, 0.25, 0.5, 1..59 step 1, 60..115 step 5,
/// 120..300 step 30 (81 boundaries; the leading 0 comes from Go's `merge` helper).
pub fn network_programming_buckets() -> Vec<f64> {
    fn linear(start: f64, width: f64, count: usize, into: &mut Vec<f64>) {
        let mut bound = start;
        for _ in 0..count {
            into.push(bound);
            bound += width;
        }
    }
    let mut buckets = vec![0.0];
    linear(0.25, 0.25, 2, &mut buckets);
    linear(1.0, 1.0, 59, &mut buckets);
    linear(60.0, 5.0, 12, &mut buckets);
    linear(120.0, 30.0, 7, &mut buckets);
    buckets
}

fn sync_histogram() -> Histogram {
    Histogram::new(sync_duration_buckets())
}

fn network_programming_histogram() -> Histogram {
    Histogram::new(network_programming_buckets())
}

/// All metric handles; each is a cheap clone sharing state with the registered copy.
#[derive(Debug)]
struct Handles {
    sync_proxy_rules_duration: HistogramFamily<FamilyLabels>,
    sync_full_proxy_rules_duration: HistogramFamily<FamilyLabels>,
    sync_partial_proxy_rules_duration: HistogramFamily<FamilyLabels>,
    network_programming_duration: HistogramFamily<FamilyLabels>,
    last_timestamp: Family<FamilyLabels, TimestampGauge>,
    last_queued_timestamp: Family<FamilyLabels, TimestampGauge>,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    no_local_endpoints: Family<PolicyLabels, Gauge>,
    iptables_rules_total: Family<TableLabels, Gauge>,
    iptables_rules_last: Family<TableLabels, Gauge>,
    iptables_restore_failures: Family<FamilyLabels, Counter>,
    iptables_partial_restore_failures: Family<FamilyLabels, Counter>,
    nftables_sync_failures: Family<FamilyLabels, Counter>,
    nftables_cleanup_failures: Family<FamilyLabels, Counter>,
    drift_repairs: Family<FamilyLabels, Counter>,
    conntrack_table_full: Counter,
    conntrack_reconcile_duration: HistogramFamily<FamilyLabels>,
    conntrack_deleted_entries: Family<FamilyLabels, Counter>,
    healthz_responses: Family<CodeLabels, Counter>,
    livez_responses: Family<CodeLabels, Counter>,
}

impl Handles {
    fn new() -> Self {
        Handles {
            sync_proxy_rules_duration: Family::new_with_constructor(sync_histogram),
            sync_full_proxy_rules_duration: Family::new_with_constructor(sync_histogram),
            sync_partial_proxy_rules_duration: Family::new_with_constructor(sync_histogram),
            network_programming_duration: Family::new_with_constructor(
                network_programming_histogram,
            ),
            last_timestamp: Family::default(),
            last_queued_timestamp: Family::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            no_local_endpoints: Family::default(),
            iptables_rules_total: Family::default(),
            iptables_rules_last: Family::default(),
            iptables_restore_failures: Family::default(),
            iptables_partial_restore_failures: Family::default(),
            nftables_sync_failures: Family::default(),
            nftables_cleanup_failures: Family::default(),
            drift_repairs: Family::default(),
            conntrack_table_full: Counter::default(),
            conntrack_reconcile_duration: Family::new_with_constructor(sync_histogram),
            conntrack_deleted_entries: Family::default(),
            healthz_responses: Family::default(),
            livez_responses: Family::default(),
        }
    }

    /// Registers the metrics `mode` uses, as upstream's `RegisterMetrics(mode)` does.
    /// Counter names omit `_total`: prometheus-client appends it when encoding.
    fn register(&self, registry: &mut Registry, mode: Mode) {
        let h = self;
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "[ALPHA] SyncProxyRules latency in seconds",
            h.sync_proxy_rules_duration.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "[ALPHA] The last time a sync of proxy rules was queued",
            h.last_queued_timestamp.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "[ALPHA] The last time proxy rules were successfully synced",
            h.last_timestamp.clone(),
        );
        registry.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "[ALPHA] Pending proxy rules Endpoint changes",
            h.endpoint_changes_pending.clone(),
        );
        registry.register(
            "sync_proxy_rules_endpoint_changes",
            "[ALPHA] Cumulative proxy rules Endpoint changes",
            h.endpoint_changes_total.clone(),
        );
        registry.register(
            "sync_proxy_rules_service_changes_pending",
            "[ALPHA] Pending proxy rules Service changes",
            h.service_changes_pending.clone(),
        );
        registry.register(
            "sync_proxy_rules_service_changes",
            "[ALPHA] Cumulative proxy rules Service changes",
            h.service_changes_total.clone(),
        );
        registry.register(
            "proxy_healthz",
            "[ALPHA] Cumulative proxy healthz HTTP status",
            h.healthz_responses.clone(),
        );
        registry.register(
            "proxy_livez",
            "[ALPHA] Cumulative proxy livez HTTP status",
            h.livez_responses.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "[ALPHA] In Cluster Network Programming Latency in seconds",
            h.network_programming_duration.clone(),
        );
        // Upstream names this gauge `_total`; as a gauge it keeps the name as given.
        registry.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "[ALPHA] Number of services with a Local traffic policy and no endpoints",
            h.no_local_endpoints.clone(),
        );
        // The conntrack reconciler runs in every Linux mode.
        registry.register(
            "conntrack_reconciler_sync_duration_seconds",
            "[ALPHA] ReconcileConntrackFlowsLatency latency in seconds",
            h.conntrack_reconcile_duration.clone(),
        );
        registry.register(
            "conntrack_reconciler_deleted_entries",
            "[ALPHA] Cumulative conntrack flows deleted by conntrack reconciler",
            h.conntrack_deleted_entries.clone(),
        );

        if matches!(mode, Mode::Iptables | Mode::Nftables) {
            registry.register(
                "sync_full_proxy_rules_duration_seconds",
                "[ALPHA] SyncProxyRules latency in seconds for full resyncs",
                h.sync_full_proxy_rules_duration.clone(),
            );
            registry.register(
                "sync_partial_proxy_rules_duration_seconds",
                "[ALPHA] SyncProxyRules latency in seconds for partial resyncs",
                h.sync_partial_proxy_rules_duration.clone(),
            );
        }
        // Not upstream's: kube-proxy-rs checks every syncPeriod that its rules are still in
        // the kernel and reprograms them when someone else removed them.
        registry.register(
            "sync_proxy_rules_drift_repairs",
            "Cumulative full syncs forced because the proxy's rules were found removed or changed by someone else (kube-proxy-rs)",
            h.drift_repairs.clone(),
        );
        registry.register(
            "conntrack_table_full",
            "Times the node's conntrack table was found full (>= 95% of nf_conntrack_max): the kernel evicts or drops new flows meanwhile (kube-proxy-rs)",
            h.conntrack_table_full.clone(),
        );
        if matches!(mode, Mode::Iptables | Mode::Ipvs) {
            registry.register(
                "sync_proxy_rules_iptables_restore_failures",
                "[ALPHA] Cumulative proxy iptables restore failures",
                h.iptables_restore_failures.clone(),
            );
        }
        if mode == Mode::Iptables {
            registry.register(
                "sync_proxy_rules_iptables_partial_restore_failures",
                "[ALPHA] Cumulative proxy iptables partial restore failures",
                h.iptables_partial_restore_failures.clone(),
            );
            registry.register(
                "sync_proxy_rules_iptables_total",
                "[ALPHA] Total number of iptables rules owned by kube-proxy",
                h.iptables_rules_total.clone(),
            );
            registry.register(
                "sync_proxy_rules_iptables_last",
                "[ALPHA] Number of iptables rules written by kube-proxy in last sync",
                h.iptables_rules_last.clone(),
            );
        }
        if mode == Mode::Nftables {
            registry.register(
                "sync_proxy_rules_nftables_sync_failures",
                "[ALPHA] Cumulative proxy nftables sync failures",
                h.nftables_sync_failures.clone(),
            );
            registry.register(
                "sync_proxy_rules_nftables_cleanup_failures",
                "[ALPHA] Cumulative proxy nftables cleanup failures",
                h.nftables_cleanup_failures.clone(),
            );
        }
    }
}

#[derive(Debug)]
struct MetricsInner {
    mode: Mode,
    registry: Registry,
    handles: Handles,
}

/// The kube-proxy metrics registry and typed handles. Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<MetricsInner>,
}

impl Metrics {
    /// Registers the common metrics, the ones `mode` uses, and the process metrics.
    pub fn new(mode: Mode) -> Self {
        Self::build(mode, true)
    }

    /// Like [`Metrics::new`] without the `process_*` metrics (they read `/proc/self`).
    pub fn without_process_metrics(mode: Mode) -> Self {
        Self::build(mode, false)
    }

    fn build(mode: Mode, with_process: bool) -> Self {
        let handles = Handles::new();
        let mut registry = Registry::default();
        if with_process {
            registry.register_collector(Box::new(ProcessCollector::new()));
        }
        handles.register(registry.sub_registry_with_prefix(METRIC_PREFIX), mode);
        Metrics {
            inner: Arc::new(MetricsInner {
                mode,
                registry,
                handles,
            }),
        }
    }

    /// The proxy mode the metrics were registered for.
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// The Prometheus text format 0.0.4 exposition that upstream serves
    /// (see [`exposition`](crate::exposition) for how it differs from OpenMetrics).
    pub fn encode(&self) -> String {
        exposition::to_prometheus_text(&self.encode_openmetrics())
    }

    /// prometheus-client's native OpenMetrics exposition, ending in `# EOF`.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail, and none of our metrics fail to encode; an
        // error would only truncate this scrape.
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
        {
            tracing::warn!(error = %err, "encoding metrics failed");
        }
        out
    }

    /// Per-IP-family handles for one proxier. Creates the family's counter series at 0 so
    /// `rate()` works from the first scrape.
    pub fn proxier(&self, ip_family: IpFamily) -> ProxierMetrics {
        let proxier = ProxierMetrics {
            metrics: self.clone(),
            labels: FamilyLabels { ip_family },
        };
        let h = &self.inner.handles;
        let mut counters = vec![&h.conntrack_deleted_entries, &h.drift_repairs];
        match self.inner.mode {
            Mode::Iptables => counters.extend([
                &h.iptables_restore_failures,
                &h.iptables_partial_restore_failures,
            ]),
            Mode::Ipvs => counters.push(&h.iptables_restore_failures),
            Mode::Nftables => {
                counters.extend([&h.nftables_sync_failures, &h.nftables_cleanup_failures])
            }
            Mode::Userspace => {}
        }
        for counter in counters {
            // Creating the series is the point; the returned guard only holds a read lock.
            drop(counter.get_or_create(&proxier.labels));
        }
        proxier
    }

    /// Counts one EndpointSlice change seen (`sync_proxy_rules_endpoint_changes_total`).
    pub fn record_endpoint_change(&self) {
        self.inner.handles.endpoint_changes_total.inc();
    }

    /// Sets the number of EndpointSlice changes not yet synced.
    pub fn set_endpoint_changes_pending(&self, pending: u64) {
        set_count(&self.inner.handles.endpoint_changes_pending, pending);
    }

    /// Counts one episode of a full conntrack table.
    pub fn record_conntrack_table_full(&self) {
        self.inner.handles.conntrack_table_full.inc();
    }

    /// Counts one Service change seen (`sync_proxy_rules_service_changes_total`).
    pub fn record_service_change(&self) {
        self.inner.handles.service_changes_total.inc();
    }

    /// Sets the number of Service changes not yet synced.
    pub fn set_service_changes_pending(&self, pending: u64) {
        set_count(&self.inner.handles.service_changes_pending, pending);
    }

    /// Counts one `/healthz` response by HTTP status code.
    pub fn record_healthz_response(&self, code: u16) {
        self.inner
            .handles
            .healthz_responses
            .get_or_create(&CodeLabels { code })
            .inc();
    }

    /// Counts one `/livez` response by HTTP status code.
    pub fn record_livez_response(&self, code: u16) {
        self.inner
            .handles
            .livez_responses
            .get_or_create(&CodeLabels { code })
            .inc();
    }
}

/// Handles labelled with one proxier's IP family. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProxierMetrics {
    metrics: Metrics,
    labels: FamilyLabels,
}

impl ProxierMetrics {
    fn handles(&self) -> &Handles {
        &self.metrics.inner.handles
    }

    /// The IP family these handles label.
    pub fn ip_family(&self) -> IpFamily {
        self.labels.ip_family
    }

    /// Records one sync's duration in `sync_proxy_rules_duration_seconds` and in the full or
    /// partial histogram (those two are only exposed in iptables and nftables modes).
    pub fn observe_sync(&self, kind: SyncKind, elapsed: Duration) {
        let h = self.handles();
        let seconds = elapsed.as_secs_f64();
        h.sync_proxy_rules_duration
            .get_or_create(&self.labels)
            .observe(seconds);
        let by_kind = match kind {
            SyncKind::Full => &h.sync_full_proxy_rules_duration,
            SyncKind::Partial => &h.sync_partial_proxy_rules_duration,
        };
        by_kind.get_or_create(&self.labels).observe(seconds);
    }

    /// Records the time from a change (EndpointSlice trigger time) to its rules being
    /// programmed.
    pub fn observe_network_programming(&self, latency: Duration) {
        self.handles()
            .network_programming_duration
            .get_or_create(&self.labels)
            .observe(latency.as_secs_f64());
    }

    /// Sets `sync_proxy_rules_last_timestamp_seconds` (last successful sync).
    pub fn set_last_sync_time(&self, at: SystemTime) {
        self.handles()
            .last_timestamp
            .get_or_create(&self.labels)
            .set(unix_seconds(at));
    }

    /// Sets `sync_proxy_rules_last_queued_timestamp_seconds` (last time a sync was requested).
    pub fn set_last_queued_time(&self, at: SystemTime) {
        self.handles()
            .last_queued_timestamp
            .get_or_create(&self.labels)
            .set(unix_seconds(at));
    }

    /// Sets how many services with a Local `policy` have no local endpoints.
    pub fn set_no_local_endpoints(&self, policy: TrafficPolicy, services: u64) {
        let labels = PolicyLabels {
            ip_family: self.labels.ip_family,
            traffic_policy: policy,
        };
        set_count(
            &self.handles().no_local_endpoints.get_or_create(&labels),
            services,
        );
    }

    /// Sets the number of iptables rules kube-proxy owns in `table`.
    pub fn set_iptables_rules_total(&self, table: IptablesTable, rules: u64) {
        let labels = self.table_labels(table);
        set_count(
            &self.handles().iptables_rules_total.get_or_create(&labels),
            rules,
        );
    }

    /// Sets the number of iptables rules written to `table` by the last sync.
    pub fn set_iptables_rules_last(&self, table: IptablesTable, rules: u64) {
        let labels = self.table_labels(table);
        set_count(
            &self.handles().iptables_rules_last.get_or_create(&labels),
            rules,
        );
    }

    fn table_labels(&self, table: IptablesTable) -> TableLabels {
        TableLabels {
            ip_family: self.labels.ip_family,
            table,
        }
    }

    /// Counts a failed `iptables-restore` (iptables and ipvs modes).
    pub fn record_iptables_restore_failure(&self) {
        self.handles()
            .iptables_restore_failures
            .get_or_create(&self.labels)
            .inc();
    }

    /// Counts a failed partial `iptables-restore` (the next sync is a full one).
    pub fn record_iptables_partial_restore_failure(&self) {
        self.handles()
            .iptables_partial_restore_failures
            .get_or_create(&self.labels)
            .inc();
    }

    /// Counts a failed sync in the failure counters upstream keeps for this mode:
    /// `iptables_restore_failures` (iptables, ipvs; plus the partial one for a failed
    /// partial iptables sync) or `nftables_sync_failures`.
    pub fn record_sync_failure(&self, partial: bool) {
        match self.metrics.inner.mode {
            Mode::Iptables => {
                self.record_iptables_restore_failure();
                if partial {
                    self.record_iptables_partial_restore_failure();
                }
            }
            Mode::Ipvs => self.record_iptables_restore_failure(),
            Mode::Nftables => self.record_nftables_sync_failure(),
            Mode::Userspace => {}
        }
    }

    /// Counts a failed nftables transaction.
    pub fn record_nftables_sync_failure(&self) {
        self.handles()
            .nftables_sync_failures
            .get_or_create(&self.labels)
            .inc();
    }

    /// Counts a full sync forced because our rules were found changed in the kernel.
    pub fn record_drift_repair(&self) {
        self.handles()
            .drift_repairs
            .get_or_create(&self.labels)
            .inc();
    }

    /// Counts a failed deletion of stale nftables objects.
    pub fn record_nftables_cleanup_failure(&self) {
        self.handles()
            .nftables_cleanup_failures
            .get_or_create(&self.labels)
            .inc();
    }

    /// Records one conntrack reconcile pass: its duration and how many flows it deleted.
    pub fn observe_conntrack_reconcile(&self, elapsed: Duration, deleted_entries: u64) {
        let h = self.handles();
        h.conntrack_reconcile_duration
            .get_or_create(&self.labels)
            .observe(elapsed.as_secs_f64());
        h.conntrack_deleted_entries
            .get_or_create(&self.labels)
            .inc_by(deleted_entries);
    }
}

/// Seconds since the Unix epoch as a float, like Go's `SetToCurrentTime`; times before
/// the epoch are negative.
fn unix_seconds(at: SystemTime) -> f64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

/// Gauges hold `i64`; counts beyond `i64::MAX` saturate rather than wrap.
fn set_count(gauge: &Gauge, count: u64) {
    gauge.set(i64::try_from(count).unwrap_or(i64::MAX));
}
