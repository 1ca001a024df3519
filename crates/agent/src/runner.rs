//! The sync loop: waits for the first full lists, then syncs on changes (no more often
//! than minSyncPeriod), checks for flushed rules every syncPeriod, and retries failures
//! with backoff as full syncs. Runs on its own thread: dataplane syncs block on kernel tools.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kp_admin::{IptablesTable, Metrics, ProxierMetrics, ProxyHealth, SyncKind, TrafficPolicy};
use kp_dataplane::{
    Action, Dataplane, NodeInfo, RuleKind, ScheduleConfig, SyncError, SyncInput, SyncSchedule,
};
use kp_model::ChangeTracker;

/// State shared by the watchers and the sync loop.
pub struct Shared {
    pub tracker: Mutex<ChangeTracker>,
    pub node: Mutex<NodeInfo>,
    pub services_synced: AtomicBool,
    pub slices_synced: AtomicBool,
    /// The Node watcher finished its first list (the Node may or may not exist).
    pub node_synced: AtomicBool,
    /// The Node changed in a way that needs a full sync (zone, addresses).
    pub node_changed: AtomicBool,
    pub stop: AtomicBool,
    pub metrics: Metrics,
    pub proxier_metrics: ProxierMetrics,
    pub health: ProxyHealth,
    pub family: kp_admin::IpFamily,
    pub model_family: kp_model::IpFamily,
    pub last_warnings: Mutex<Vec<String>>,
    /// healthCheckNodePort servers of this family (set once at start).
    pub service_health: std::sync::OnceLock<kp_admin::ServiceHealthServer>,
    pub events: std::sync::OnceLock<crate::events::EventSink>,
    wake: SyncSender<()>,
}

impl Shared {
    pub fn new(
        tracker: ChangeTracker,
        metrics: Metrics,
        health: ProxyHealth,
        model_family: kp_model::IpFamily,
    ) -> (Arc<Shared>, Receiver<()>) {
        let family = match model_family {
            kp_model::IpFamily::V4 => kp_admin::IpFamily::IPv4,
            kp_model::IpFamily::V6 => kp_admin::IpFamily::IPv6,
        };
        let (wake, rx) = std::sync::mpsc::sync_channel(1);
        let shared = Shared {
            tracker: Mutex::new(tracker),
            node: Mutex::new(NodeInfo::default()),
            services_synced: AtomicBool::new(false),
            slices_synced: AtomicBool::new(false),
            node_synced: AtomicBool::new(false),
            node_changed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            proxier_metrics: metrics.proxier(family),
            metrics,
            health,
            family,
            model_family,
            last_warnings: Mutex::new(Vec::new()),
            service_health: std::sync::OnceLock::new(),
            events: std::sync::OnceLock::new(),
            wake,
        };
        (Arc::new(shared), rx)
    }

    /// Wakes the sync loop; wake-ups coalesce.
    pub fn poke(&self) {
        let _ = self.wake.try_send(());
    }

    /// Records that a change is queued (health staleness clock, metrics) and wakes the loop.
    pub fn queued(&self) {
        self.health.queued_update(self.family);
        self.proxier_metrics.set_last_queued_time(SystemTime::now());
        self.poke();
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.poke();
    }
}

/// Runs until `shared.stop` is set. When to sync is [`SyncSchedule`]'s decision; this
/// loop only waits, asks the dataplane and reports back.
pub fn run_sync_loop(
    shared: Arc<Shared>,
    mut dataplane: Box<dyn Dataplane>,
    wake: Receiver<()>,
    cfg: ScheduleConfig,
) {
    // Upstream waits for Services and EndpointSlices; waiting for the Node's first list too
    // means zone and node IPs are known at the first sync, so it is not followed at once
    // by a second full sync when the Node arrives.
    while !(shared.services_synced.load(Ordering::SeqCst)
        && shared.slices_synced.load(Ordering::SeqCst)
        && shared.node_synced.load(Ordering::SeqCst))
    {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = wake.recv_timeout(Duration::from_millis(200));
    }
    tracing::info!("initial Service and EndpointSlice lists complete; programming the dataplane");

    let mut schedule = SyncSchedule::new(cfg, Instant::now());
    // The state, drained into by the sync thread (one copy, outside the tracker's lock).
    let mut state = SyncState::default();
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.node_changed.swap(false, Ordering::SeqCst) {
            schedule.node_changed();
        }
        let changes_pending = shared
            .tracker
            .lock()
            .map(|t| t.has_pending())
            .unwrap_or(false);
        match schedule.next(Instant::now(), changes_pending) {
            Action::CheckDrift => {
                // The proxier logs what it found.
                let rules_gone = dataplane.needs_full_sync();
                if schedule.drift_checked(rules_gone, Instant::now()) {
                    shared.proxier_metrics.record_drift_repair();
                }
            }
            Action::Sync { full } => {
                let ok = sync_once(&shared, dataplane.as_mut(), &mut state, full);
                if let Some(delay) = schedule.synced(ok, Instant::now()) {
                    tracing::warn!(
                        retry_in_ms = delay.as_millis() as u64,
                        failures = schedule.failures(),
                        "sync failed; retrying with a full sync"
                    );
                }
            }
            Action::Wait {
                until,
                wake_on_change: false,
            } => sleep_until(&shared, until),
            Action::Wait {
                until,
                wake_on_change: true,
            } => match wake.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            },
        }
    }
}

fn sleep_until(shared: &Shared, deadline: Instant) {
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
    }
}

/// The model state, which the tracker drains into (the sync thread owns the only copy),
/// and its endpoint count, both kept by changed services.
#[derive(Default)]
struct SyncState {
    state: kp_model::ProxyState,
    endpoints: usize,
}

/// One sync; returns success.
fn sync_once(
    shared: &Shared,
    dataplane: &mut dyn Dataplane,
    own: &mut SyncState,
    force_full: bool,
) -> bool {
    let changes = {
        let Ok(mut t) = shared.tracker.lock() else {
            return false;
        };
        let changes = t.drain_into(&mut own.state);
        own.endpoints = t.drained_endpoint_count();
        changes
    };
    let state = &own.state;
    shared.metrics.set_endpoint_changes_pending(0);
    shared.metrics.set_service_changes_pending(0);
    let mut node = shared.node.lock().map(|n| n.clone()).unwrap_or_default();
    node.local_addresses = crate::kernel::local_addresses();
    let input = SyncInput {
        state,
        changes: &changes,
        node: &node,
        force_full,
    };
    let t0 = Instant::now();
    let result = dataplane.sync(&input);
    let elapsed = t0.elapsed();
    let pm = &shared.proxier_metrics;
    match result {
        Ok(report) => {
            pm.observe_sync(
                if report.full {
                    SyncKind::Full
                } else {
                    SyncKind::Partial
                },
                elapsed,
            );
            let now = SystemTime::now();
            pm.set_last_sync_time(now);
            for t in &changes.trigger_times {
                if let Ok(d) = now.duration_since(*t) {
                    pm.observe_network_programming(d);
                }
            }
            for (kind, n) in &report.rules_total {
                if let Some(t) = iptables_table(*kind) {
                    pm.set_iptables_rules_total(t, *n as u64);
                }
            }
            for (kind, n) in &report.rules_written {
                if let Some(t) = iptables_table(*kind) {
                    pm.set_iptables_rules_last(t, *n as u64);
                }
            }
            pm.set_no_local_endpoints(
                TrafficPolicy::Internal,
                report.no_local_endpoints_internal as u64,
            );
            pm.set_no_local_endpoints(
                TrafficPolicy::External,
                report.no_local_endpoints_external as u64,
            );
            shared.health.updated(shared.family);
            sync_health_checks(shared, &report.health_checks);
            // Stale UDP flows: only when UDP endpoints went away or appeared (or after a
            // full sync), so an idle proxy never dumps the conntrack table.
            if report.full
                || !changes.stale_udp_endpoints.is_empty()
                || !changes.udp_services_gained_endpoints.is_empty()
            {
                reconcile_conntrack(shared, state);
            }
            // Log rendering problems when they change, not on every sync.
            if let Ok(mut last) = shared.last_warnings.lock()
                && *last != report.warnings
            {
                for w in &report.warnings {
                    tracing::warn!(family = %shared.model_family.k8s_name(), "{w}");
                }
                *last = report.warnings.clone();
            }
            tracing::info!(
                family = %shared.model_family.k8s_name(),
                full = report.full,
                services = state.services.len(),
                endpoints = own.endpoints,
                changed_services = changes.services.len(),
                nat_rules = report.rules_total.get(&RuleKind::IptablesNat).copied().unwrap_or(0),
                rules_written = report.rules_written.values().sum::<usize>(),
                bytes = report.bytes_written,
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                apply_ms = report.apply_time.as_secs_f64() * 1000.0,
                "synced proxy rules"
            );
            if report.full || elapsed > std::time::Duration::from_millis(50) {
                // A full sync's transaction text and batch are tens of MB at 10k
                // services, and an iptables partial sync renders every service; hand
                // the freed pages back instead of keeping the peak (a few ms, skipped
                // for the fast syncs where that would show).
                #[cfg(target_env = "gnu")]
                // SAFETY: malloc_trim only releases free heap memory.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
            true
        }
        Err(e) => {
            pm.record_sync_failure(!force_full);
            match &e {
                SyncError::Apply {
                    tool,
                    message,
                    line,
                } => tracing::error!(
                    tool = tool.as_str(),
                    error = %message,
                    line = line.as_deref().unwrap_or(""),
                    "failed to apply proxy rules"
                ),
                other => tracing::error!(error = %other, "failed to apply proxy rules"),
            }
            false
        }
    }
}

/// The `table` label of the iptables rule metrics, for the kinds that have one.
fn iptables_table(kind: RuleKind) -> Option<IptablesTable> {
    match kind {
        RuleKind::IptablesFilter => Some(IptablesTable::Filter),
        RuleKind::IptablesNat => Some(IptablesTable::Nat),
        RuleKind::NftablesOps
        | RuleKind::IpvsVirtualServers
        | RuleKind::IpvsRealServers
        | RuleKind::IpsetMembers => None,
    }
}

/// Opens/closes healthCheckNodePort servers and updates their endpoint counts. A port that
/// cannot be opened is logged and reported as a Warning Event on the Service, as upstream.
fn sync_health_checks(
    shared: &Shared,
    checks: &std::collections::BTreeMap<kp_model::NamespacedName, (u16, usize)>,
) {
    let Some(server) = shared.service_health.get() else {
        return;
    };
    let ports = checks
        .iter()
        .map(|(k, (port, _))| ((k.namespace.to_string(), k.name.to_string()), *port))
        .collect();
    for err in server.sync_services(&ports) {
        tracing::warn!(
            service = %format!("{}/{}", err.namespace, err.name).escape_debug(),
            port = err.port,
            error = %err,
            "cannot open healthCheckNodePort"
        );
        if let Some(events) = shared.events.get() {
            let node = shared
                .node
                .lock()
                .map(|n| n.topology.node_name.clone())
                .unwrap_or_default();
            events.service_warning(
                &err.namespace,
                &err.name,
                kp_admin::FAILED_TO_START_EVENT_REASON,
                kp_admin::FAILED_TO_START_EVENT_ACTION,
                err.event_message(&node),
            );
        }
    }
    let counts = checks
        .iter()
        .map(|(k, (_, n))| ((k.namespace.to_string(), k.name.to_string()), *n))
        .collect();
    server.sync_endpoints(&counts);
}

/// Deletes UDP conntrack entries that still point at endpoints that are gone (or that
/// were created while a service had none), over ctnetlink.
fn reconcile_conntrack(shared: &Shared, state: &kp_model::ProxyState) {
    let table = kp_conntrack::UdpServiceTable::from_state(state, shared.model_family);
    if table.is_empty() {
        return;
    }
    match kp_conntrack::reconcile(shared.model_family, &table) {
        Ok(r) => {
            shared
                .proxier_metrics
                .observe_conntrack_reconcile(r.duration, r.deleted as u64);
            if r.deleted > 0 {
                tracing::info!(
                    family = %shared.model_family.k8s_name(),
                    listed = r.listed,
                    deleted = r.deleted,
                    elapsed_ms = r.duration.as_secs_f64() * 1000.0,
                    "deleted stale UDP conntrack entries"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "conntrack reconcile failed; will retry after the next change")
        }
    }
}
