//! Helpers shared by the real-kernel test targets of this crate (`iptables_e2e` and the
//! `scenarios_*` suites): starting labs and proxies in the suite's mode, reading the
//! stored objects back, manifest builders, probes that wait for the expected pods, drop
//! checks, `/metrics` parsing and proxy logs for failure messages.
//!
//! Each test target includes this module with `mod common;` and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use kp_testkit::cluster::PodInfo;
use kp_testkit::lab::{Lab, http_get, localhost, wait_for};
use kp_testkit::netns::{TopologySpec, in_netns, set_sysctls};
use kp_testkit::probe::{ProbeError, ProbeReport, probe_tcp, probe_tcp_from_addr, probe_udp};
use kp_testkit::probe::{tcp_connect_once, udp_request_once};
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");
/// Timeout of a probe that should be answered.
pub const T: Duration = Duration::from_secs(2);
/// Timeout of a probe that should be dropped (and of a first, quick probe).
pub const SHORT: Duration = Duration::from_millis(400);
/// How long a proxy may take to program a change (external-access scenarios).
pub const SETTLE: Duration = Duration::from_secs(30);
/// The tighter bound the endpoint, protocol and conntrack scenarios hold a change to.
pub const SETTLE_ENDPOINTS: Duration = Duration::from_secs(20);
/// The external client's address on the node fabric.
pub const EXT_IP: &str = "198.18.0.2";

// ---------------------------------------------------------------- mode, labs, proxies

/// The proxy mode under test: `KP_PROXY_MODE`, `iptables` when unset or empty.
pub fn mode() -> String {
    let mode = std::env::var("KP_PROXY_MODE").unwrap_or_default();
    if mode.is_empty() {
        "iptables".into()
    } else {
        mode
    }
}

/// Rule-text checks only hold for the iptables mode.
pub fn iptables_mode() -> bool {
    mode() == "iptables"
}

/// A lab of `nodes` nodes; see [`new_lab_with`].
pub fn new_lab(nodes: usize) -> Lab {
    new_lab_with(TopologySpec::new(nodes))
}

/// A lab whose nodes send ICMP errors without the kernel's per-host rate limit (1/s
/// after a burst of 6), so every REJECT is seen at once, not after a SYN retransmit
/// (and a rejected probe is never mistaken for a dropped one).
pub fn new_lab_with(spec: TopologySpec) -> Lab {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (network namespaces, iptables)"
    );
    let lab = Lab::with_spec(spec).expect("lab");
    for node in lab.topology().nodes() {
        let mut off = vec![("net.ipv4.icmp_ratelimit", "0")];
        if lab.topology().spec().dual_stack {
            off.push(("net.ipv6.icmp.ratelimit", "0"));
        }
        set_sysctls(&node.ns, &off).expect("icmp rate limit off");
    }
    lab
}

/// A one-node lab with `manifest` applied and the proxy started with `extra` only (no
/// `--proxy-mode`: the binary's default, iptables).
pub fn lab_with_proxy(manifest: &str, extra: &[&str]) -> Lab {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (network namespaces, iptables)"
    );
    let mut lab = Lab::new(1).expect("lab");
    if !manifest.is_empty() {
        lab.cluster.apply_manifest(manifest).expect("manifest");
    }
    lab.start_proxy(Path::new(BIN), 1, extra)
        .expect("start proxy");
    lab
}

/// Starts node `n`'s proxy with `--proxy-mode=<mode>` plus `extra`.
pub fn start(lab: &mut Lab, n: usize, extra: &[&str]) {
    let mode = format!("--proxy-mode={}", mode());
    let mut args = vec![mode.as_str()];
    args.extend_from_slice(extra);
    lab.start_proxy(Path::new(BIN), n, &args)
        .expect("start proxy");
}

/// The redis example on one node with the proxy in the mode under test, serving:
/// (lab, the Service's ClusterIP:6379, the external client's namespace).
pub fn redis_lab() -> (Lab, SocketAddr, String) {
    let mut lab = new_lab(1);
    lab.cluster
        .apply_manifest(include_str!("../../../../examples/redis.yaml"))
        .expect("manifest");
    start(&mut lab, 1, &[]);
    let target = svc_addr(&lab, "default", "redis", 6379);
    let ext = ext_ns(&lab);
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    (lab, target, ext)
}

/// Node 1's `/healthz` status code (0 when it does not answer).
pub fn healthz(lab: &Lab) -> u16 {
    kp_testkit::lab::http_get(
        &lab.node_ns(1),
        kp_testkit::lab::localhost(10256),
        "/healthz",
    )
    .map(|(code, _)| code)
    .unwrap_or(0)
}

/// One proxy per node, all with `--proxy-mode=<mode>` plus `extra`.
pub fn start_proxies(lab: &mut Lab, extra: &[&str]) {
    for n in 1..=lab.topology().nodes().len() {
        start(lab, n, extra);
    }
}

/// The last 40 lines of every node's proxy log, for failure messages.
pub fn logs(lab: &Lab) -> String {
    let mut out = String::new();
    for n in 1..=lab.topology().nodes().len() {
        let log = lab.proxy_log(n);
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        out.push_str(&format!("--- node{n} proxy log (tail) ---\n{tail}\n"));
        out.push_str(&ipvs_dump(lab, n));
    }
    out
}

/// In IPVS mode, what node `n`'s kernel holds (virtual servers, kube-ipvs0, sets, nat
/// rules), for failure messages; empty in other modes.
pub fn ipvs_dump(lab: &Lab, n: usize) -> String {
    if mode() != "ipvs" {
        return String::new();
    }
    let ns = lab.node_ns(n);
    let mut out = format!("--- node{n} IPVS state ---\n");
    for argv in [
        &["ipvsadm", "-Ln", "--stats"][..],
        &["ipvsadm", "-Lnc"],
        &["ip", "-o", "addr", "show", "dev", "kube-ipvs0"],
        &["conntrack", "-L"],
        &["iptables-save", "-c"],
    ] {
        let text = match lab.topology().exec(&ns, argv) {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => e.to_string(),
        };
        out.push_str(&format!("$ {}\n{text}\n", argv.join(" ")));
    }
    out
}

/// Waits up to 15 s for a line of node1's proxy log that contains every `needle`.
pub fn wait_log(lab: &Lab, needle: &[&str]) -> bool {
    wait_for(Duration::from_secs(15), || {
        lab.proxy_log(1)
            .lines()
            .any(|l| needle.iter().all(|n| l.contains(n)))
            .then_some(())
    })
    .is_some()
}

// ---------------------------------------------------------------- topology and objects

pub fn ext_ns(lab: &Lab) -> String {
    lab.topology().ext().ns.clone()
}

pub fn node_ip(lab: &Lab, n: usize) -> IpAddr {
    lab.topology().node(n).expect("node").ip
}

pub fn addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// Service `name` in namespace `default` as the API server stores it.
pub fn stored_service(lab: &Lab, name: &str) -> Value {
    lab.emulator
        .get("v1", "Service", Some("default"), name)
        .expect("service exists")
}

pub fn cluster_ip(lab: &Lab, name: &str) -> IpAddr {
    stored_service(lab, name)["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("clusterIP")
}

/// `<clusterIP>:port` of Service `ns/name`.
pub fn svc_addr(lab: &Lab, ns: &str, name: &str, port: u16) -> SocketAddr {
    let svc = lab
        .emulator
        .get("v1", "Service", Some(ns), name)
        .expect("service exists");
    let ip: IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    SocketAddr::new(ip, port)
}

/// The NodePort of the first port of Service `default/name`.
pub fn node_port(lab: &Lab, name: &str) -> u16 {
    stored_service(lab, name)["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("nodePort allocated")
}

/// Replaces the stored Service's status.loadBalancer.ingress.
pub fn set_ingress(lab: &Lab, name: &str, ingress: Value) {
    let mut svc = stored_service(lab, name);
    svc["status"] = json!({"loadBalancer": {"ingress": ingress}});
    lab.emulator.apply(svc).expect("update service status");
}

/// Names of the pods whose name starts with `app_prefix`, sorted.
pub fn pod_names(lab: &Lab, app_prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = lab
        .cluster
        .pods()
        .into_iter()
        .filter(|p| p.name.starts_with(app_prefix))
        .map(|p| p.name)
        .collect();
    v.sort();
    v
}

/// Pods of Deployment `name`, in creation order (round-robin: node1, node2, node1, ...).
pub fn pods_of(lab: &Lab, name: &str) -> Vec<PodInfo> {
    let pods: Vec<PodInfo> = lab
        .cluster
        .pods()
        .into_iter()
        .filter(|p| p.deployment == name)
        .collect();
    assert!(!pods.is_empty(), "deployment {name} has no pods");
    pods
}

/// Names of the running pods of Deployment `deployment` on node `n`.
pub fn pods_on(lab: &Lab, deployment: &str, n: usize) -> BTreeSet<String> {
    let node = format!("node{n}");
    lab.cluster
        .pods()
        .into_iter()
        .filter(|p| p.deployment == deployment && p.node == node)
        .map(|p| p.name)
        .collect()
}

pub fn all_pods(lab: &Lab, deployment: &str) -> BTreeSet<String> {
    lab.cluster
        .pods()
        .into_iter()
        .filter(|p| p.deployment == deployment)
        .map(|p| p.name)
        .collect()
}

/// Adds a client pod (not selected by any Service) on node `n`: (netns, IP).
pub fn client_pod(lab: &mut Lab, n: usize, name: &str) -> (String, IpAddr) {
    let pod = lab
        .cluster
        .topology_mut()
        .add_pod(n, name)
        .expect("client pod");
    (pod.ns, pod.ip)
}

pub fn ip_cmd(lab: &Lab, ns: &str, args: &[&str]) {
    let mut argv = vec!["ip"];
    argv.extend_from_slice(args);
    lab.topology().exec_ok(ns, &argv).expect("ip command");
}

/// `<tool> -t <table>` (iptables-save, ip6tables-save) in node `n`.
pub fn save(lab: &Lab, n: usize, tool: &str, table: &str) -> String {
    lab.topology()
        .exec_ok(&lab.node_ns(n), &[tool, "-t", table])
        .expect(tool)
}

pub fn nat_and_filter(lab: &Lab, n: usize) -> (String, String) {
    (
        lab.iptables_save(n, "nat").expect("iptables-save nat"),
        lab.iptables_save(n, "filter")
            .expect("iptables-save filter"),
    )
}

/// iptables-save output without comments and chain counters, for before/after compares.
pub fn strip_counters(s: &str) -> String {
    s.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => l[..i].to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------- manifests

/// Stores `objects` through the mini control plane (which runs its controllers).
pub fn apply(lab: &mut Lab, objects: &[Value]) {
    let manifest: Vec<String> = objects.iter().map(Value::to_string).collect();
    lab.cluster
        .apply_manifest(&manifest.join("\n---\n"))
        .expect("apply");
}

/// A Deployment `name` (pods labelled `app`, serving TCP 8080) and, when `svc_spec` is
/// given, a Service `app` selecting them on port 80 with `svc_spec` merged into its spec.
pub fn deploy(lab: &mut Lab, name: &str, app: &str, replicas: u32, svc_spec: Option<Value>) {
    let labels = json!({"app": app, "deployment": name});
    let mut docs = vec![json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                {"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}]}}}
    })];
    if let Some(extra) = svc_spec {
        let mut spec = json!({"selector": {"app": app},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        docs.push(service(app, spec));
    }
    let manifest: Vec<String> = docs.iter().map(Value::to_string).collect();
    lab.cluster
        .apply_manifest(&manifest.join("\n---\n"))
        .expect("manifest");
}

/// A Deployment whose pods serve `ports` (`(protocol, port)`).
pub fn deployment(name: &str, replicas: u32, ports: &[(&str, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(proto, port)| json!({"containerPort": port, "protocol": proto}))
        .collect();
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": name, "ports": ports}]}}}})
}

/// A Service manifest `default/name` with `spec`.
pub fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

// ---------------------------------------------------------------- probes

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

pub fn probe(
    from: &str,
    target: SocketAddr,
    l4: L4,
    count: usize,
    timeout: Duration,
) -> ProbeReport {
    let report = match l4 {
        L4::Tcp => probe_tcp(from, target, count, timeout),
        L4::Udp => probe_udp(from, target, count, timeout),
    };
    report.expect("enter namespace")
}

pub fn one_probe(
    from: &str,
    target: SocketAddr,
    l4: L4,
    timeout: Duration,
) -> Result<(), ProbeError> {
    match l4 {
        L4::Tcp => tcp_connect_once(from, target, timeout).map(|_| ()),
        L4::Udp => udp_request_once(from, target, timeout).map(|_| ()),
    }
}

/// One raw TCP connect from `ns` (connected = answered), for listeners that are not pods.
pub fn connects(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    in_netns(ns, || std::net::TcpStream::connect_timeout(&addr, timeout))?
        .map(drop)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ProbeError::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => ProbeError::Timeout,
            _ => ProbeError::Io(e),
        })
}

/// Waits until a TCP connection from `ns` to `target` is answered by a pod.
pub fn wait_serving(lab: &Lab, ns: &str, target: SocketAddr, timeout: Duration) {
    let ok = wait_for(timeout, || tcp_connect_once(ns, target, T).ok());
    assert!(
        ok.is_some(),
        "{target} never answered from {ns}; proxy log:\n{}{}",
        lab.proxy_log(1),
        ipvs_dump(lab, 1)
    );
}

/// Waits until 20 probes from `from` to `target` are all answered, by exactly `want`.
pub fn wait_answered_by(
    lab: &Lab,
    from: &str,
    target: SocketAddr,
    want: &BTreeSet<String>,
    what: &str,
) -> ProbeReport {
    let mut last = None;
    let ok = wait_for(SETTLE, || {
        let r = probe_tcp(from, target, 20, T).ok()?;
        let got: BTreeSet<String> = r.answers.keys().cloned().collect();
        let done = r.total_ok() == 20 && &got == want;
        last = Some(r.clone());
        done.then_some(r)
    });
    ok.unwrap_or_else(|| {
        panic!(
            "{what}: {target} never answered by exactly {want:?}; last probe: {}\n{}",
            last.map(|r| r.to_string()).unwrap_or_default(),
            logs(lab)
        )
    })
}

/// [`see_l4`] for TCP.
pub fn see(
    lab: &Lab,
    from: &str,
    target: SocketAddr,
    want: &[&PodInfo],
    what: &str,
) -> ProbeReport {
    see_l4(lab, from, target, L4::Tcp, want, what)
}

/// Waits until every probe from `from` to `target` is answered and the set of pods that
/// answer is exactly `want`, then checks a fresh sample once more and returns it.
pub fn see_l4(
    lab: &Lab,
    from: &str,
    target: SocketAddr,
    l4: L4,
    want: &[&PodInfo],
    what: &str,
) -> ProbeReport {
    let want: BTreeSet<String> = want.iter().map(|p| p.name.clone()).collect();
    let count = 20 * want.len().max(1);
    let matches = |r: &ProbeReport| {
        r.total_ok() == count && r.answers.keys().cloned().collect::<BTreeSet<_>>() == want
    };
    let mut last = ProbeReport::default();
    let reached = wait_for(SETTLE_ENDPOINTS, || {
        // One short probe first, so a path that is not programmed yet costs little.
        last = probe(from, target, l4, 1, SHORT);
        if last.total_ok() == 1 {
            last = probe(from, target, l4, count, T);
        }
        matches(&last).then_some(())
    });
    let log = || logs(lab);
    assert!(
        reached.is_some(),
        "{what}: {l4:?} {target} want {want:?}, got {last}\n{}",
        log()
    );
    let r = probe(from, target, l4, count, T);
    assert!(
        matches(&r),
        "{what}: {l4:?} {target} want {want:?}, got {r}\n{}",
        log()
    );
    r
}

// ---------------------------------------------------------------- drop and reject checks

/// Asserts that 5 connections from `from` (optionally from `source`) to `target` all
/// time out: the packets are dropped, not rejected and not answered.
pub fn assert_dropped(
    lab: &Lab,
    from: &str,
    source: Option<IpAddr>,
    target: SocketAddr,
    what: &str,
) {
    let r = match source {
        Some(ip) => probe_tcp_from_addr(from, ip, target, 5, SHORT),
        None => probe_tcp(from, target, 5, SHORT),
    }
    .expect("probe");
    assert_eq!(
        r.timeouts,
        5,
        "{what}: {target} should be dropped (all 5 time out): {r}\n{}",
        logs(lab)
    );
}

/// Asserts that no pod answers: refused (nothing listens) or dropped, either is fine.
pub fn assert_not_answered(lab: &Lab, from: &str, target: SocketAddr, what: &str) {
    let r = probe_tcp(from, target, 3, SHORT).expect("probe");
    assert_eq!(
        r.total_ok(),
        0,
        "{what}: {target} must not reach a pod: {r}\n{}",
        logs(lab)
    );
}

/// Waits until probes fail with `want` (Timeout: dropped; Refused: rejected), then
/// checks a few more do too; refusals must come at once.
pub fn expect_failure(lab: &Lab, from: &str, target: SocketAddr, l4: L4, want: &str, what: &str) {
    let kind = |res: &Result<(), ProbeError>| match res {
        Err(ProbeError::Timeout) => "Timeout",
        Err(ProbeError::Refused) => "Refused",
        Ok(()) => "answered",
        Err(_) => "other error",
    };
    let timeout = if want == "Timeout" { SHORT } else { T };
    let seen = wait_for(SETTLE_ENDPOINTS, || {
        (kind(&one_probe(from, target, l4, timeout)) == want).then_some(())
    });
    assert!(
        seen.is_some(),
        "{what}: {l4:?} {target} never {want}\n{}",
        logs(lab)
    );
    for _ in 0..5 {
        let t0 = Instant::now();
        let res = one_probe(from, target, l4, timeout);
        let took = t0.elapsed();
        assert_eq!(kind(&res), want, "{what}: {l4:?} {target}: {res:?}");
        let quick = want != "Refused" || took < Duration::from_millis(200);
        assert!(quick, "{what}: {target} from {from}: refusal took {took:?}");
    }
}

// ---------------------------------------------------------------- metrics

/// Node `n`'s `/metrics` text; the scrape must answer 200.
pub fn metrics(lab: &Lab, n: usize) -> String {
    let (code, body) = http_get(&lab.node_ns(n), localhost(10249), "/metrics").expect("/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// The samples of `name` (the exact family, not a longer name) whose line contains every
/// `label="value"` in `labels`; `None` when there is none.
pub fn metric_samples(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Sum of the samples of `name` whose labels contain every `label="value"` in `labels`
/// (0 when there is none).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    metric_samples(text, name, labels).unwrap_or(0.0)
}

/// Like [`metric_samples`] on node `n`'s `/metrics`; `None` also when the scrape fails,
/// so it can be polled while the proxy starts.
pub fn metric_on(lab: &Lab, n: usize, name: &str, labels: &[&str]) -> Option<f64> {
    let (_, text) = http_get(&lab.node_ns(n), localhost(10249), "/metrics").ok()?;
    metric_samples(&text, name, labels)
}

// ---------------------------------------------------------------- long-running checks

/// `--config=` of a KubeProxyConfiguration with 1 s sync periods (both modes), so canary
/// and drift checks run often.
pub fn short_sync_period_config(lab: &Lab) -> String {
    let path = lab.workdir().join("short-sync-period.yaml");
    std::fs::write(
        &path,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         iptables:\n  syncPeriod: 1s\nnftables:\n  syncPeriod: 1s\nipvs:\n  syncPeriod: 1s\n",
    )
    .expect("write config");
    format!("--config={}", path.display())
}

/// Opens a new TCP connection to `target` from `ns` every `every` until stopped.
pub struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Prober {
    pub fn start(ns: &str, target: SocketAddr, every: Duration) -> Prober {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (stop, ns) = (stop.clone(), ns.to_string());
            std::thread::spawn(move || {
                let (mut ok, mut errors) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match tcp_connect_once(&ns, target, Duration::from_secs(1)) {
                        Ok(_) => ok += 1,
                        Err(e) => errors.push(e.to_string()),
                    }
                    std::thread::sleep(every);
                }
                (ok, errors)
            })
        };
        Prober { stop, thread }
    }

    /// Stops probing; returns the successful connections and the errors of failed ones.
    pub fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("prober thread")
    }
}
