//! The daemon: admin servers, API watchers, the sync loop, and signal handling.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Node;
use kp_admin::{Metrics, MetricsServerState, ProxyHealth};
use kp_config::{DetectLocalMode, Loaded, Mode, NodePortAddress};
use kp_dataplane::{DataplaneConfig, LocalDetector, NodePortAddresses};
use kp_model::{ChangeTracker, IpFamily};
use kp_watch::{ObjectEvent, Watchers, object_name, run_watcher};

use crate::runner::{Shared, run_sync_loop};

/// The node name: `--hostname-override`, else the host name, lower-cased.
pub fn node_name(settings: &kp_config::Settings) -> anyhow::Result<String> {
    if let Some(n) = settings
        .hostname_override
        .as_ref()
        .filter(|n| !n.is_empty())
    {
        return Ok(n.clone());
    }
    let host = nix::unistd::gethostname().context("reading the host name")?;
    Ok(host.to_string_lossy().trim().to_lowercase())
}

/// Builds the dataplane settings for one family. `node` supplies node IPs (for
/// `primary`) and pod CIDRs (for NodeCIDR detection); `local` the node's interface
/// addresses (for the NodePort addresses).
pub fn dataplane_config(
    settings: &kp_config::Settings,
    family: IpFamily,
    node: &Node,
    local: &[IpAddr],
) -> DataplaneConfig {
    let (node_ips, pod_cidrs) = node_addresses(node);
    let local_detector = match &settings.detect_local_mode {
        DetectLocalMode::ClusterCidr => LocalDetector::from_cidrs(&settings.cluster_cidrs, family),
        DetectLocalMode::NodeCidr => LocalDetector::from_cidrs(&pod_cidrs, family),
        DetectLocalMode::BridgeInterface(i) => LocalDetector::BridgeInterface(i.clone()),
        DetectLocalMode::InterfaceNamePrefix(p) => LocalDetector::InterfacePrefix(p.clone()),
    };
    let cidrs: Vec<ipnet::IpNet> = settings
        .node_port_addresses
        .iter()
        .filter_map(|a| match a {
            NodePortAddress::Cidr(c) => Some(*c),
            NodePortAddress::Primary => None,
        })
        .collect();
    let primary = settings
        .node_port_addresses
        .contains(&NodePortAddress::Primary);
    let node_port_addresses = NodePortAddresses::new(&cidrs, primary, &node_ips, family);
    DataplaneConfig {
        family,
        masquerade_bit: settings.masquerade_bit,
        masquerade_all: settings.masquerade_all,
        local_detector,
        node_port_ips: node_port_addresses.filter(local),
        node_port_addresses,
        localhost_node_ports: settings.localhost_node_ports,
        tcp_be_liberal: settings.conntrack.tcp_be_liberal || crate::kernel::tcp_be_liberal(),
        random_fully: true,
        ipvs: kp_dataplane::IpvsOptions {
            scheduler: settings.ipvs.scheduler.clone(),
            exclude_cidrs: settings.ipvs.exclude_cidrs.clone(),
            strict_arp: settings.ipvs.strict_arp,
            tcp_timeout: seconds(settings.ipvs.tcp_timeout),
            tcp_fin_timeout: seconds(settings.ipvs.tcp_fin_timeout),
            udp_timeout: seconds(settings.ipvs.udp_timeout),
            ..Default::default()
        },
    }
}

/// Whole seconds of an IPVS timeout (0 = leave the kernel's).
fn seconds(d: Option<std::time::Duration>) -> u32 {
    d.map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// Removes what the modes we are not running left behind (a mode switch on restart, as
/// upstream's platformCleanup). Errors mean "nothing there".
fn cleanup_other_modes(running: Mode, cfg: &DataplaneConfig) {
    for mode in Mode::ALL.into_iter().filter(|m| *m != running) {
        if let crate::modes::Cleaned::Removed = crate::modes::cleanup_leftovers(mode, cfg) {
            tracing::debug!(family = cfg.family.k8s_name(), %mode, "removed what the other proxy mode left");
        }
    }
}

/// IP families this node proxies: IPv4, plus IPv6 when the kernel has it and ip6tables
/// is installed (upstream checks the same before running dual-stack).
pub fn proxied_families() -> Vec<IpFamily> {
    let mut f = vec![IpFamily::V4];
    let kernel_v6 = std::path::Path::new("/proc/net/if_inet6").exists();
    let tool = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("ip6tables-restore").is_file()));
    if kernel_v6 && tool {
        f.push(IpFamily::V6);
    } else {
        tracing::info!(kernel_v6, ip6tables = tool, "IPv6 not proxied");
    }
    f
}

/// Node IPs (InternalIP first, then ExternalIP) and pod CIDRs of a Node object.
pub fn node_addresses(node: &Node) -> (Vec<IpAddr>, Vec<ipnet::IpNet>) {
    let mut ips = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for a in node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
        {
            if a.type_ == kind
                && let Ok(ip) = a.address.parse::<IpAddr>()
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
    }
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<ipnet::IpNet> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.parse().ok())
        .collect();
    if cidrs.is_empty()
        && let Some(c) = spec
            .and_then(|s| s.pod_cidr.as_ref())
            .and_then(|c| c.parse().ok())
    {
        cidrs.push(c);
    }
    (ips, cidrs)
}

fn node_zone(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()?
        .get("topology.kubernetes.io/zone")
        .cloned()
}

async fn serve_admin(
    loaded: &Loaded,
    metrics: &Metrics,
    health: &ProxyHealth,
) -> anyhow::Result<()> {
    let s = &loaded.settings;
    let config_json = serde_json::to_value(&loaded.config).unwrap_or(serde_json::Value::Null);
    if let Some(addr) = s.metrics_bind_address {
        let state = MetricsServerState::new(metrics.clone(), config_json);
        spawn_with_retry("metrics", s.bind_address_hard_fail, move || {
            let state = state.clone();
            async move { kp_admin::serve_metrics(addr, state).await.map(|(_, a)| a) }
        })
        .await?;
    }
    if let Some(addr) = s.healthz_bind_address {
        let health = health.clone();
        spawn_with_retry("healthz", s.bind_address_hard_fail, move || {
            let health = health.clone();
            async move { kp_admin::serve_healthz(addr, health).await.map(|(_, a)| a) }
        })
        .await?;
    }
    Ok(())
}

/// Binds a server; on failure either fails hard or keeps retrying every 5 s in the
/// background, as upstream does.
async fn spawn_with_retry<F, Fut>(
    what: &'static str,
    hard_fail: bool,
    bind: F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<std::net::SocketAddr, kp_admin::AdminError>> + Send,
{
    match bind().await {
        Ok(addr) => {
            tracing::info!(server = what, %addr, "serving");
            Ok(())
        }
        Err(e) if hard_fail => Err(anyhow::anyhow!("{what} server: {e}")),
        Err(e) => {
            tracing::error!(server = what, error = %e, "cannot start server; retrying every 5s");
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    if let Ok(addr) = bind().await {
                        tracing::info!(server = what, %addr, "serving");
                        return;
                    }
                }
            });
            Ok(())
        }
    }
}

/// Runs the proxy until SIGTERM/SIGINT. Rules stay in place on exit.
pub async fn run(loaded: Loaded) -> anyhow::Result<()> {
    let s = loaded.settings.clone();
    if !crate::modes::implemented(s.mode) {
        return Err(crate::modes::NotImplemented(s.mode).into());
    }
    let node_name = node_name(&s)?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), mode = %s.mode, node = %node_name, "starting kube-proxy-rs");
    crate::kernel::apply_conntrack(&s.conntrack);

    let metrics = Metrics::new(s.mode);
    let health = ProxyHealth::for_sync_period(s.sync_period).with_metrics(metrics.clone());
    serve_admin(&loaded, &metrics, &health).await?;

    let client = crate::client::build_client(&s).await?;
    let watchers = Watchers::new(client.clone());

    // Node-dependent settings (primary node-port addresses, NodeCIDR detection) need the
    // Node object first, as upstream waits for it.
    let needs_node = s.detect_local_mode == DetectLocalMode::NodeCidr
        || s.node_port_addresses.contains(&NodePortAddress::Primary);
    let initial_node = if needs_node {
        wait_for_node(
            &watchers,
            &node_name,
            s.detect_local_mode == DetectLocalMode::NodeCidr,
        )
        .await
    } else {
        Node::default()
    };

    let runner_cfg = kp_dataplane::ScheduleConfig {
        min_sync_period: s.min_sync_period,
        sync_period: s.sync_period,
        full_sync_period: Duration::from_secs(3600),
    };
    let events = crate::events::EventSink::new(
        client.clone(),
        &node_name,
        tokio::runtime::Handle::current(),
    );
    let mut families = Vec::new();
    let mut threads = Vec::new();
    for family in proxied_families() {
        let cfg = dataplane_config(&s, family, &initial_node, &crate::kernel::local_addresses());
        if !cfg.local_detector.is_implemented() && !s.masquerade_all {
            tracing::warn!(
                family = family.k8s_name(),
                "no local-traffic detector for this family (no cluster CIDR of it); off-cluster traffic to ClusterIPs is not masqueraded"
            );
        }
        // Health-check servers listen where NodePorts do: on every address of the family,
        // or on the --nodeport-addresses ones.
        let hc_ips: Vec<std::net::IpAddr> = if cfg.node_port_addresses.match_all() {
            vec![match family {
                IpFamily::V4 => std::net::Ipv4Addr::UNSPECIFIED.into(),
                IpFamily::V6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
            }]
        } else {
            cfg.node_port_ips.clone()
        };
        let mut dataplane = crate::modes::new_dataplane(s.mode, &cfg)?;
        // Before anything is removed or written: a kernel or tool this mode cannot run
        // with stops the proxy here, with the node's rules as they were.
        dataplane
            .preflight()
            .map_err(|e| anyhow::anyhow!("{} mode cannot start: {e}", s.mode))?;
        cleanup_other_modes(s.mode, &cfg);
        tracing::info!(family = family.k8s_name(), mode = %s.mode, applier = %dataplane.applier(), "dataplane");
        for (sysctl, value) in dataplane.required_sysctls() {
            crate::kernel::write_sysctl(sysctl, value);
        }
        let (shared, wake_rx) = Shared::new(
            ChangeTracker::new(family, node_name.clone()),
            metrics.clone(),
            health.clone(),
            family,
        );
        let _ = shared
            .service_health
            .set(kp_admin::ServiceHealthServer::new(health.clone(), hc_ips));
        let _ = shared.events.set(events.clone());
        let loop_shared = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("sync-{}", family.k8s_name()))
                .spawn(move || run_sync_loop(loop_shared, dataplane, wake_rx, runner_cfg))
                .context("starting a sync thread")?,
        );
        families.push(shared);
    }
    tracing::info!(families = ?families.iter().map(|f| f.model_family.k8s_name()).collect::<Vec<_>>(), "proxying");
    spawn_watchers(&watchers, &families, &node_name);
    tokio::spawn(watch_conntrack_fill(
        metrics.clone(),
        s.sync_period.min(Duration::from_secs(10)),
    ));
    events.node(
        kube::runtime::events::EventType::Normal,
        "Starting",
        "StartKubeProxy",
        format!("kube-proxy-rs {} started", env!("CARGO_PKG_VERSION")),
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down; rules are left in place");
    for f in &families {
        f.shutdown();
    }
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
    Ok(())
}

async fn wait_for_node(watchers: &Watchers, node_name: &str, need_pod_cidrs: bool) -> Node {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        match watchers.nodes.get_opt(node_name).await {
            Ok(Some(node)) => {
                let (ips, cidrs) = node_addresses(&node);
                if !ips.is_empty() && (!need_pod_cidrs || !cidrs.is_empty()) {
                    return node;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(
                    error = kp_watch::error_chain(&e),
                    "waiting for own Node object"
                )
            }
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::error!(
                node = node_name,
                "Node object not ready after 5m; continuing without it"
            );
            return Node::default();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How one watched kind feeds the trackers.
trait Tracked: kube::Resource + Sized {
    fn update(
        t: &mut ChangeTracker,
        obj: &Self,
        warnings: &mut Vec<String>,
    ) -> Result<bool, kp_model::ConvertError>;
    fn delete(t: &mut ChangeTracker, namespace: &str, name: &str) -> bool;
    fn pending(t: &ChangeTracker) -> usize;
    fn synced(sh: &Shared) -> &std::sync::atomic::AtomicBool;
    fn record_change(metrics: &Metrics);
    fn set_pending(metrics: &Metrics, n: u64);
    /// Checks that need every family's view (once per object).
    fn after_apply(_obj: &Self, _proxied: &[IpFamily]) {}
    fn log_invalid(obj: &Self, e: &kp_model::ConvertError);
    fn log_problem(obj: &Self, problem: &str);
}

impl Tracked for k8s_openapi::api::core::v1::Service {
    fn update(
        t: &mut ChangeTracker,
        obj: &Self,
        w: &mut Vec<String>,
    ) -> Result<bool, kp_model::ConvertError> {
        t.update_service(obj, w)
    }
    fn delete(t: &mut ChangeTracker, namespace: &str, name: &str) -> bool {
        t.delete_service(namespace, name)
    }
    fn pending(t: &ChangeTracker) -> usize {
        t.pending_service_changes()
    }
    fn synced(sh: &Shared) -> &std::sync::atomic::AtomicBool {
        &sh.services_synced
    }
    fn record_change(m: &Metrics) {
        m.record_service_change();
    }
    fn set_pending(m: &Metrics, n: u64) {
        m.set_service_changes_pending(n);
    }
    fn log_invalid(obj: &Self, e: &kp_model::ConvertError) {
        tracing::warn!(service = %object_name(obj), error = %e, "skipping invalid Service");
    }
    fn log_problem(obj: &Self, w: &str) {
        tracing::warn!(service = %object_name(obj), problem = %w, "ignoring part of Service");
    }
    fn after_apply(svc: &Self, proxied: &[IpFamily]) {
        let families = kp_model::service_families(svc);
        if !families.is_empty() && !families.iter().any(|f| proxied.contains(f)) {
            tracing::warn!(
                service = %object_name(svc),
                families = ?families,
                "skipping Service: none of its cluster IPs is of an IP family this node proxies"
            );
        }
    }
}

impl Tracked for k8s_openapi::api::discovery::v1::EndpointSlice {
    fn update(
        t: &mut ChangeTracker,
        obj: &Self,
        w: &mut Vec<String>,
    ) -> Result<bool, kp_model::ConvertError> {
        t.update_slice(obj, w)
    }
    fn delete(t: &mut ChangeTracker, namespace: &str, name: &str) -> bool {
        t.delete_slice(namespace, name)
    }
    fn pending(t: &ChangeTracker) -> usize {
        t.pending_endpoint_changes()
    }
    fn synced(sh: &Shared) -> &std::sync::atomic::AtomicBool {
        &sh.slices_synced
    }
    fn record_change(m: &Metrics) {
        m.record_endpoint_change();
    }
    fn set_pending(m: &Metrics, n: u64) {
        m.set_endpoint_changes_pending(n);
    }
    fn log_invalid(obj: &Self, e: &kp_model::ConvertError) {
        tracing::warn!(endpointslice = %object_name(obj), error = %e, "skipping invalid EndpointSlice");
    }
    fn log_problem(obj: &Self, w: &str) {
        tracing::warn!(endpointslice = %object_name(obj), problem = %w, "ignoring part of EndpointSlice");
    }
}

/// Feeds one watcher event to every family's tracker. Problems are the same in every
/// family, so they are logged once.
fn handle_event<K: Tracked>(fams: &[Arc<Shared>], proxied: &[IpFamily], ev: &ObjectEvent<K>) {
    let Some(first) = fams.first() else { return };
    let mut any = false;
    match ev {
        ObjectEvent::Applied(obj) => {
            let mut logged: Vec<String> = Vec::new();
            for (i, sh) in fams.iter().enumerate() {
                let mut warnings = Vec::new();
                let Ok(mut t) = sh.tracker.lock() else { return };
                let result = K::update(&mut t, obj, &mut warnings);
                let pending = K::pending(&t);
                drop(t);
                // The same problem seen by several families is logged once.
                for w in warnings {
                    if !logged.contains(&w) {
                        K::log_problem(obj, &w);
                        logged.push(w);
                    }
                }
                match result {
                    Ok(true) => {
                        any = true;
                        K::set_pending(&sh.metrics, pending as u64);
                        sh.queued();
                    }
                    Ok(false) => {}
                    Err(e) if i == 0 => K::log_invalid(obj, &e),
                    Err(_) => {}
                }
            }
            K::after_apply(obj, proxied);
        }
        ObjectEvent::Deleted { namespace, name } => {
            for sh in fams {
                let Ok(mut t) = sh.tracker.lock() else { return };
                let changed = K::delete(&mut t, namespace.as_deref().unwrap_or_default(), name);
                drop(t);
                if changed {
                    any = true;
                    sh.queued();
                }
            }
        }
        ObjectEvent::Synced => {
            for sh in fams {
                K::synced(sh).store(true, Ordering::SeqCst);
                sh.poke();
            }
        }
    }
    if any {
        K::record_change(&first.metrics);
    }
}

/// Says so, once per episode, when the conntrack table is full: the kernel then evicts
/// or drops new flows, including new Service connections, which no rule can fix.
async fn watch_conntrack_fill(metrics: Metrics, period: Duration) {
    let mut full_since: Option<crate::kernel::ConntrackFill> = None;
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(200)));
    loop {
        tick.tick().await;
        let Some(now) = crate::kernel::ConntrackFill::read() else {
            continue;
        };
        match (now.full(), full_since) {
            (true, None) => {
                metrics.record_conntrack_table_full();
                tracing::warn!(
                    entries = now.entries,
                    max = now.max,
                    "conntrack table full: the kernel evicts or drops new flows; raise conntrack.maxPerCore or nf_conntrack_max"
                );
                full_since = Some(now);
            }
            (false, Some(then)) => {
                tracing::info!(
                    entries = now.entries,
                    max = now.max,
                    flows_evicted_or_dropped =
                        now.pressure_drops.saturating_sub(then.pressure_drops),
                    "conntrack table has room again"
                );
                full_since = None;
            }
            _ => {}
        }
    }
}

fn spawn_watchers(watchers: &Watchers, families: &[Arc<Shared>], node_name: &str) {
    let proxied: Vec<IpFamily> = families.iter().map(|f| f.model_family).collect();
    let (fams, p) = (families.to_vec(), proxied.clone());
    tokio::spawn(run_watcher(
        watchers.services.clone(),
        kp_watch::service_config(),
        move |ev| handle_event(&fams, &p, &ev),
    ));
    let (fams, p) = (families.to_vec(), proxied);
    tokio::spawn(run_watcher(
        watchers.slices.clone(),
        kp_watch::endpoint_slice_config(),
        move |ev| handle_event(&fams, &p, &ev),
    ));

    let fams = families.to_vec();
    tokio::spawn(run_watcher(
        watchers.nodes.clone(),
        kp_watch::node_config(node_name),
        move |ev| match ev {
            ObjectEvent::Applied(node) => {
                let (ips, cidrs) = node_addresses(&node);
                let zone = node_zone(&node);
                let being_deleted = node.metadata.deletion_timestamp.is_some();
                let taints: Vec<String> = node
                    .spec
                    .iter()
                    .flat_map(|s| s.taints.iter().flatten())
                    .map(|t| t.key.clone())
                    .collect();
                for sh in &fams {
                    sh.health.set_node_eligible(kp_admin::is_node_eligible(
                        being_deleted,
                        taints.iter().map(|s| s.as_str()),
                    ));
                    let Ok(mut n) = sh.node.lock() else { return };
                    if n.topology.zone != zone || n.node_ips != ips || n.pod_cidrs != cidrs {
                        n.topology.zone = zone.clone();
                        n.node_ips = ips.clone();
                        n.pod_cidrs = cidrs.clone();
                        sh.node_changed.store(true, Ordering::SeqCst);
                        sh.poke();
                    }
                }
            }
            ObjectEvent::Deleted { .. } => {
                for sh in &fams {
                    sh.health.set_node_eligible(false);
                }
            }
            ObjectEvent::Synced => {
                for sh in &fams {
                    sh.node_synced.store(true, Ordering::SeqCst);
                    sh.poke();
                }
            }
        },
    ));
    for sh in families {
        if let Ok(mut n) = sh.node.lock() {
            n.topology.node_name = node_name.to_string();
        }
    }
}
