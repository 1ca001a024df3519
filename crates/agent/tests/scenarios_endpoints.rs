//! Real-kernel, multi-node scenarios for endpoint selection and Service features: the
//! `kube-proxy-rs` binary runs in each node namespace of a two-node lab against the API
//! emulator, and real TCP/UDP traffic checks which pod answered and which client
//! address it saw. Expected behaviour is upstream kube-proxy's (iptables mode).
//!
//! The proxy mode comes from `KP_PROXY_MODE` (default `iptables`) so the same traffic
//! assertions can run for other modes; rule-text checks only run in iptables mode.
//! Needs root. Every test builds its own lab.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kp_testkit::cluster::PodInfo;
use kp_testkit::lab::{Lab, http_get, localhost, wait_for};
use kp_testkit::netns::{TopologySpec, set_sysctls};
use kp_testkit::podserver::sctp_supported;
use kp_testkit::probe::{ProbeError, ProbeReport, probe_tcp, probe_udp};
use kp_testkit::probe::{tcp_connect_once, udp_request_once, udp_send_only};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");
/// Timeout of a probe that should be answered.
const T: Duration = Duration::from_secs(2);
/// Timeout of a probe that should be dropped.
const SHORT: Duration = Duration::from_millis(400);
/// How long a change may take to reach the dataplane.
const SETTLE: Duration = Duration::from_secs(20);
const EXT_IP: &str = "198.18.0.2";

// ---------------------------------------------------------------- harness helpers

fn mode() -> String {
    let mode = std::env::var("KP_PROXY_MODE").unwrap_or_default();
    if mode.is_empty() {
        "iptables".into()
    } else {
        mode
    }
}

fn iptables_mode() -> bool {
    mode() == "iptables"
}

/// A lab whose nodes send ICMP errors without the kernel's per-host rate limit (1/s
/// after a burst of 6), so every REJECT is seen at once, not after a SYN retransmit.
fn new_lab(spec: TopologySpec) -> Lab {
    assert!(nix::unistd::geteuid().is_root(), "these tests need root");
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

/// One proxy per node, all with `--proxy-mode=<mode>` plus `extra`.
fn start_proxies(lab: &mut Lab, extra: &[&str]) {
    let mode = format!("--proxy-mode={}", mode());
    let args: Vec<&str> = [mode.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    for n in 1..=lab.topology().nodes().len() {
        lab.start_proxy(std::path::Path::new(BIN), n, &args)
            .expect("start proxy");
    }
}

/// The last lines each proxy logged, for failure messages.
fn logs(lab: &Lab) -> String {
    let mut out = String::new();
    for n in 1..=lab.topology().nodes().len() {
        let log = lab.proxy_log(n);
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        out.push_str(&format!("--- node{n} proxy log (tail) ---\n{tail}\n"));
    }
    out
}

fn ext(lab: &Lab) -> String {
    lab.topology().ext().ns.clone()
}

fn node_ip(lab: &Lab, n: usize) -> IpAddr {
    lab.topology().node(n).expect("node").ip
}

fn cluster_ip(lab: &Lab, name: &str) -> IpAddr {
    let svc = lab.emulator.get("v1", "Service", Some("default"), name);
    let ip = svc
        .as_ref()
        .and_then(|s| s["spec"]["clusterIP"].as_str()?.parse().ok());
    ip.expect("service with a clusterIP")
}

fn addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// A Deployment whose pods serve `ports` (`(protocol, port)`).
fn deployment(name: &str, replicas: u32, ports: &[(&str, u16)]) -> Value {
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

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

/// A selector-less Service on port 80 (target 8080), with extra `spec` fields.
fn selectorless(name: &str, extra: Value) -> Value {
    let mut spec = json!({"ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    service(name, spec)
}

/// Stores `objects` through the mini control plane (which runs its controllers).
fn apply(lab: &mut Lab, objects: &[Value]) {
    let manifest: Vec<String> = objects.iter().map(Value::to_string).collect();
    lab.cluster
        .apply_manifest(&manifest.join("\n---\n"))
        .expect("apply");
}

/// Pods of Deployment `name`, in creation order (round-robin: node1, node2, node1, ...).
fn pods_of(lab: &Lab, name: &str) -> Vec<PodInfo> {
    let pods: Vec<PodInfo> = lab
        .cluster
        .pods()
        .into_iter()
        .filter(|p| p.deployment == name)
        .collect();
    assert!(!pods.is_empty(), "deployment {name} has no pods");
    pods
}

/// EndpointSlice conditions: (ready, serving, terminating).
type Cond = (bool, bool, bool);
const READY: Cond = (true, true, false);
const NOT_READY: Cond = (false, false, false);
const SERVING_TERMINATING: Cond = (false, true, true);
const TERMINATING: Cond = (false, false, true);

fn endpoint(pod: &PodInfo, ip: IpAddr, (ready, serving, terminating): Cond) -> Value {
    json!({"addresses": [ip.to_string()],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": pod.node,
        "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name}})
}

fn hinted(mut ep: Value, zones: &[&str], nodes: &[&str]) -> Value {
    let names = |v: &[&str]| -> Vec<Value> { v.iter().map(|n| json!({"name": n})).collect() };
    let mut hints = serde_json::Map::new();
    if !zones.is_empty() {
        hints.insert("forZones".into(), json!(names(zones)));
    }
    if !nodes.is_empty() {
        hints.insert("forNodes".into(), json!(names(nodes)));
    }
    ep["hints"] = Value::Object(hints);
    ep
}

/// An EndpointSlice for Service `service` (port 8080/TCP, unnamed), written by "us".
fn slice(name: &str, service: &str, address_type: &str, endpoints: Vec<Value>) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {
            "kubernetes.io/service-name": service,
            "endpointslice.kubernetes.io/managed-by": "scenario-test"}},
        "addressType": address_type, "endpoints": endpoints,
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]})
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L4 {
    Tcp,
    Udp,
}

fn probe(from: &str, target: SocketAddr, l4: L4, count: usize, timeout: Duration) -> ProbeReport {
    let report = match l4 {
        L4::Tcp => probe_tcp(from, target, count, timeout),
        L4::Udp => probe_udp(from, target, count, timeout),
    };
    report.expect("enter namespace")
}

fn one_probe(from: &str, target: SocketAddr, l4: L4, timeout: Duration) -> Result<(), ProbeError> {
    match l4 {
        L4::Tcp => tcp_connect_once(from, target, timeout).map(|_| ()),
        L4::Udp => udp_request_once(from, target, timeout).map(|_| ()),
    }
}

/// [`see_l4`] for TCP.
fn see(lab: &Lab, from: &str, target: SocketAddr, want: &[&PodInfo], what: &str) -> ProbeReport {
    see_l4(lab, from, target, L4::Tcp, want, what)
}

/// Waits until every probe from `from` to `target` is answered and the set of pods that
/// answer is exactly `want`, then checks a fresh sample once more and returns it.
fn see_l4(
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
    let reached = wait_for(SETTLE, || {
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

/// Waits until probes fail with `want` (Timeout: dropped; Refused: rejected), then
/// checks a few more do too; refusals must come at once.
fn expect_failure(lab: &Lab, from: &str, target: SocketAddr, l4: L4, want: &str, what: &str) {
    let kind = |res: &Result<(), ProbeError>| match res {
        Err(ProbeError::Timeout) => "Timeout",
        Err(ProbeError::Refused) => "Refused",
        Ok(()) => "answered",
        Err(_) => "other error",
    };
    let timeout = if want == "Timeout" { SHORT } else { T };
    let seen = wait_for(SETTLE, || {
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

fn metrics(lab: &Lab, n: usize) -> String {
    let (code, body) = http_get(&lab.node_ns(n), localhost(10249), "/metrics").expect("/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// Sum of the samples of `name` whose labels contain every `label="value"` in `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn save(lab: &Lab, n: usize, tool: &str, table: &str) -> String {
    lab.topology()
        .exec_ok(&lab.node_ns(n), &[tool, "-t", table])
        .expect(tool)
}

/// Gives each Node object the zone label `zones[i]` (node1 first).
fn label_zones(lab: &Lab, zones: &[&str]) {
    for (i, zone) in zones.iter().enumerate() {
        let name = format!("node{}", i + 1);
        let mut node = lab.emulator.get("v1", "Node", None, &name).expect("node");
        node["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!(zone);
        lab.emulator.apply(node).expect("label node");
    }
}

/// Writes slice `<svc>-1` of `svc` with one endpoint per pod, conditions in pod order.
fn write_conditions(lab: &Lab, svc: &str, pods: &[PodInfo], conds: [Cond; 4]) {
    let eps = pods
        .iter()
        .zip(conds)
        .map(|(p, c)| endpoint(p, p.ip, c))
        .collect();
    lab.emulator
        .apply(slice(&format!("{svc}-1"), svc, "IPv4", eps))
        .expect("slice");
}

// ---------------------------------------------------------------- 1. conditions

/// Ready endpoints only; with none ready the serving+terminating ones; never
/// not-serving ones; with nothing usable the ClusterIP is rejected.
#[test]
fn endpoint_conditions_ready_then_serving_terminating() {
    let mut lab = new_lab(TopologySpec::new(2));
    apply(&mut lab, &[deployment("cond", 4, &[("TCP", 8080)])]);
    let p = pods_of(&lab, "cond");
    lab.emulator.apply(selectorless("cond", json!({}))).unwrap();
    start_proxies(&mut lab, &[]);
    let target = addr(cluster_ip(&lab, "cond"), 80);
    let froms = [ext(&lab), lab.node_ns(2)];

    write_conditions(
        &lab,
        "cond",
        &p,
        [READY, NOT_READY, SERVING_TERMINATING, TERMINATING],
    );
    for from in &froms {
        see(&lab, from, target, &[&p[0]], "only the ready endpoint");
    }
    // No endpoint ready: the serving+terminating ones take over, not-serving ones never.
    let conds = [
        SERVING_TERMINATING,
        NOT_READY,
        SERVING_TERMINATING,
        TERMINATING,
    ];
    write_conditions(&lab, "cond", &p, conds);
    for from in &froms {
        see(&lab, from, target, &[&p[0], &p[2]], "terminating fallback");
    }
    // One becomes ready again: the terminating ones are no longer used.
    write_conditions(
        &lab,
        "cond",
        &p,
        [SERVING_TERMINATING, READY, SERVING_TERMINATING, TERMINATING],
    );
    for from in &froms {
        see(&lab, from, target, &[&p[1]], "ready wins again");
    }
    // Nothing ready or serving: no usable endpoint, the ClusterIP is rejected.
    write_conditions(
        &lab,
        "cond",
        &p,
        [TERMINATING, NOT_READY, TERMINATING, NOT_READY],
    );
    for from in &froms {
        expect_failure(
            &lab,
            from,
            target,
            L4::Tcp,
            "Refused",
            "no serving endpoint",
        );
    }
}

/// externalTrafficPolicy Local: each node's local set falls back to its own
/// serving+terminating endpoints independently of the cluster set; a node without any
/// usable local endpoint drops NodePort traffic; the client address is preserved.
#[test]
fn endpoint_conditions_local_policy_falls_back_separately() {
    let mut lab = new_lab(TopologySpec::new(2));
    apply(&mut lab, &[deployment("lp", 4, &[("TCP", 8080)])]);
    let p = pods_of(&lab, "lp");
    assert_eq!((p[0].node.as_str(), p[1].node.as_str()), ("node1", "node2"));
    let spec = json!({"type": "NodePort", "externalTrafficPolicy": "Local",
        "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30081}]});
    lab.emulator.apply(selectorless("lp", spec)).unwrap();
    start_proxies(&mut lab, &[]);
    let ext = ext(&lab);
    let cip = addr(cluster_ip(&lab, "lp"), 80);
    let (np1, np2) = (addr(node_ip(&lab, 1), 30081), addr(node_ip(&lab, 2), 30081));
    let client_kept = |r: &ProbeReport| {
        let seen: Vec<&String> = r.sources_seen.keys().collect();
        assert_eq!(
            seen,
            vec![EXT_IP],
            "ETP Local keeps the client address: {r}"
        );
    };

    // node1: p0 serving+terminating, p2 not ready. node2: p1 ready, p3 not ready.
    write_conditions(
        &lab,
        "lp",
        &p,
        [SERVING_TERMINATING, READY, NOT_READY, NOT_READY],
    );
    see(&lab, &ext, cip, &[&p[1]], "cluster set: the ready endpoint");
    client_kept(&see(
        &lab,
        &ext,
        np1,
        &[&p[0]],
        "node1 local set: terminating fallback",
    ));
    client_kept(&see(&lab, &ext, np2, &[&p[1]], "node2 local set: ready"));

    // p1 stops serving: the cluster set falls back to p0; node2 has nothing local.
    write_conditions(
        &lab,
        "lp",
        &p,
        [SERVING_TERMINATING, TERMINATING, NOT_READY, NOT_READY],
    );
    see(
        &lab,
        &ext,
        cip,
        &[&p[0]],
        "cluster set: terminating fallback",
    );
    see(&lab, &lab.node_ns(2), cip, &[&p[0]], "node2 cluster set");
    client_kept(&see(&lab, &ext, np1, &[&p[0]], "node1 local set unchanged"));
    expect_failure(
        &lab,
        &ext,
        np2,
        L4::Tcp,
        "Timeout",
        "node2 without local endpoints",
    );
}

// ---------------------------------------------------------------- 2. topology hints

/// trafficDistribution PreferClose with zone hints: each node uses its zone's
/// endpoints; one endpoint without hints makes every node use all endpoints; a changed
/// zone label is followed.
#[test]
fn topology_zone_hints() {
    let mut lab = new_lab(TopologySpec::new(2));
    label_zones(&lab, &["zone-a", "zone-b"]);
    apply(&mut lab, &[deployment("zonal", 4, &[("TCP", 8080)])]);
    let p = pods_of(&lab, "zonal");
    let svc = selectorless("zonal", json!({"trafficDistribution": "PreferClose"}));
    lab.emulator.apply(svc).unwrap();
    start_proxies(&mut lab, &[]);
    let write = |unhinted: Option<usize>| {
        let ep = |(i, pod): (usize, &PodInfo)| {
            let zone = if pod.node == "node1" {
                "zone-a"
            } else {
                "zone-b"
            };
            let ep = endpoint(pod, pod.ip, READY);
            if Some(i) == unhinted {
                ep
            } else {
                hinted(ep, &[zone], &[])
            }
        };
        let eps = p.iter().enumerate().map(ep).collect();
        lab.emulator
            .apply(slice("zonal-1", "zonal", "IPv4", eps))
            .unwrap();
    };
    write(None);
    let target = addr(cluster_ip(&lab, "zonal"), 80);
    let (ext, node1, node2) = (ext(&lab), lab.node_ns(1), lab.node_ns(2));
    let (zone_a, zone_b) = ([&p[0], &p[2]], [&p[1], &p[3]]);
    see(&lab, &node1, target, &zone_a, "node1 (OUTPUT), zone-a");
    see(
        &lab,
        &ext,
        target,
        &zone_a,
        "ext via node1 (PREROUTING), zone-a",
    );
    see(&lab, &node2, target, &zone_b, "node2 (OUTPUT), zone-b");

    // One endpoint without hints: hints are ignored, all endpoints are used.
    write(Some(3));
    let all: Vec<&PodInfo> = p.iter().collect();
    see(&lab, &node1, target, &all, "node1, incomplete hints");
    see(&lab, &node2, target, &all, "node2, incomplete hints");

    // Hints back; node1 moves to zone-b: its proxy follows its Node's labels.
    write(None);
    see(&lab, &node1, target, &zone_a, "node1, hints restored");
    label_zones(&lab, &["zone-b", "zone-b"]);
    see(&lab, &node1, target, &zone_b, "node1 relabelled zone-b");
}

/// forNodes hints (trafficDistribution PreferSameNode) restrict each node to its own
/// endpoints, and win over zone hints; one endpoint without a node hint falls back to
/// the zone hints.
#[test]
fn topology_same_node_hints() {
    let mut lab = new_lab(TopologySpec::new(2));
    label_zones(&lab, &["zone-a", "zone-b"]);
    apply(&mut lab, &[deployment("samenode", 4, &[("TCP", 8080)])]);
    let p = pods_of(&lab, "samenode");
    let svc = selectorless("samenode", json!({"trafficDistribution": "PreferSameNode"}));
    lab.emulator.apply(svc).unwrap();
    start_proxies(&mut lab, &[]);
    // Zone hints all say zone-a, so zone-based routing would send node1 everywhere and
    // node2 (zone-b, no endpoint for it) everywhere too: only node hints restrict.
    let write = |without_node_hint: Option<usize>| {
        let ep = |(i, pod): (usize, &PodInfo)| {
            let node = [pod.node.as_str()];
            let nodes: &[&str] = if Some(i) == without_node_hint {
                &[]
            } else {
                &node
            };
            hinted(endpoint(pod, pod.ip, READY), &["zone-a"], nodes)
        };
        let eps = p.iter().enumerate().map(ep).collect();
        lab.emulator
            .apply(slice("samenode-1", "samenode", "IPv4", eps))
            .unwrap();
    };
    write(None);
    let target = addr(cluster_ip(&lab, "samenode"), 80);
    let (node1, node2) = (lab.node_ns(1), lab.node_ns(2));
    see(
        &lab,
        &node1,
        target,
        &[&p[0], &p[2]],
        "node1, own endpoints",
    );
    see(
        &lab,
        &node2,
        target,
        &[&p[1], &p[3]],
        "node2, own endpoints",
    );

    write(Some(3));
    let all: Vec<&PodInfo> = p.iter().collect();
    see(&lab, &node1, target, &all, "node1, zone-a hints cover all");
    see(&lab, &node2, target, &all, "node2, no zone-b hint: all");
}

// ---------------------------------------------------------------- 3. protocols

/// TCP and UDP ClusterIP and NodePort services reach the right pods; one port number
/// with two protocols is two service ports. SCTP by rules only.
#[test]
fn protocols_tcp_udp_and_sctp_rules() {
    let mut lab = new_lab(TopologySpec::new(2));
    start_proxies(&mut lab, &[]);
    let port = |name: &str, port: u16, target: u16, proto: &str, node_port: u16| {
        json!({"name": name, "port": port, "targetPort": target, "protocol": proto,
            "nodePort": node_port})
    };
    let node_port = |app: &str, ports: Vec<Value>| json!({"type": "NodePort", "selector": {"app": app}, "ports": ports});
    apply(
        &mut lab,
        &[
            deployment("web", 2, &[("TCP", 8080)]),
            deployment("dns", 2, &[("UDP", 5353), ("TCP", 5353)]),
            service(
                "web",
                node_port("web", vec![port("http", 80, 8080, "TCP", 30080)]),
            ),
            service(
                "dns",
                node_port(
                    "dns",
                    vec![
                        port("dns", 53, 5353, "UDP", 30053),
                        port("dns-tcp", 53, 5353, "TCP", 30054),
                    ],
                ),
            ),
            service(
                "sctp",
                node_port("web", vec![port("sctp", 7777, 7777, "SCTP", 30077)]),
            ),
        ],
    );
    let (web, dns) = (pods_of(&lab, "web"), pods_of(&lab, "dns"));
    let (web, dns): (Vec<&PodInfo>, Vec<&PodInfo>) = (web.iter().collect(), dns.iter().collect());
    let ext = ext(&lab);
    let (web_ip, dns_ip) = (cluster_ip(&lab, "web"), cluster_ip(&lab, "dns"));
    let (n1, n2) = (node_ip(&lab, 1), node_ip(&lab, 2));
    for (target, l4, want, what) in [
        (addr(web_ip, 80), L4::Tcp, &web, "web ClusterIP tcp"),
        (addr(dns_ip, 53), L4::Udp, &dns, "dns ClusterIP udp"),
        (addr(dns_ip, 53), L4::Tcp, &dns, "dns ClusterIP tcp"),
        (addr(n1, 30080), L4::Tcp, &web, "web NodePort node1"),
        (addr(n2, 30080), L4::Tcp, &web, "web NodePort node2"),
        (addr(n1, 30053), L4::Udp, &dns, "dns NodePort udp node1"),
        (addr(n2, 30053), L4::Udp, &dns, "dns NodePort udp node2"),
        (addr(n2, 30054), L4::Tcp, &dns, "dns NodePort tcp node2"),
    ] {
        see_l4(&lab, &ext, target, l4, want, what);
    }
    // No UDP port 80 on the web service and no TCP NodePort 30053: nobody answers.
    assert!(one_probe(&ext, addr(web_ip, 80), L4::Udp, SHORT).is_err());
    assert!(one_probe(&ext, addr(n1, 30053), L4::Tcp, SHORT).is_err());

    // SCTP: this kernel has no SCTP sockets (no pod can listen, no client can connect),
    // so SCTP traffic cannot be tested here; the rules are checked instead.
    if !sctp_supported(&lab.node_ns(1)).unwrap_or(false) {
        eprintln!("SCTP sockets unsupported by this kernel: SCTP checked by rules only");
    }
    if !iptables_mode() {
        return;
    }
    let sctp_ip = cluster_ip(&lab, "sctp");
    for n in [1, 2] {
        let has_rules = |nat: &str| {
            let rule = |start: &str, parts: &[String]| {
                nat.lines().any(|l| {
                    l.starts_with(start)
                        && l.contains("-p sctp")
                        && parts.iter().all(|p| l.contains(p.as_str()))
                })
            };
            rule(
                "-A KUBE-SERVICES",
                &[format!("-d {sctp_ip}/32"), "--dport 7777".into()],
            ) && rule("-A KUBE-NODEPORTS", &["--dport 30077".into()])
                && web.iter().all(|pod| {
                    let dnat = format!("-j DNAT --to-destination {}:7777", pod.ip);
                    rule("-A KUBE-SEP-", &[dnat])
                })
        };
        let ok = wait_for(SETTLE, || {
            has_rules(&save(&lab, n, "iptables-save", "nat")).then_some(())
        });
        let nat = save(&lab, n, "iptables-save", "nat");
        assert!(
            ok.is_some(),
            "node{n}: SCTP rules missing:\n{nat}\n{}",
            logs(&lab)
        );
    }
}

// ---------------------------------------------------------------- 4. ignored objects

/// Headless, ExternalName and other-proxy Services, and slices labelled headless,
/// without a service name, or of address type FQDN are ignored; a normal Service is
/// unaffected.
#[test]
fn ignored_services_and_slices_change_nothing() {
    let mut lab = new_lab(TopologySpec::new(2));
    let ports = json!([{"port": 80, "targetPort": 8080, "protocol": "TCP"}]);
    let mut other_proxy = service(
        "other-proxy",
        json!({"type": "NodePort",
        "clusterIP": "10.96.200.3", "selector": {"app": "decoy"},
        "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30099}]}),
    );
    other_proxy["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "other"});
    apply(
        &mut lab,
        &[
            deployment("normal", 2, &[("TCP", 8080)]),
            deployment("decoy", 2, &[("TCP", 8080)]),
            service(
                "normal",
                json!({"selector": {"app": "normal"}, "ports": ports}),
            ),
            service(
                "headless",
                json!({"clusterIP": "None", "selector": {"app": "decoy"}, "ports": ports}),
            ),
            service(
                "extname",
                json!({"type": "ExternalName", "externalName": "example.com", "ports": ports}),
            ),
            other_proxy,
        ],
    );
    let (normal, decoy) = (pods_of(&lab, "normal"), pods_of(&lab, "decoy"));
    // Slices that name the normal Service but must be ignored, each with a decoy pod.
    let decoy_ep = |i: usize| endpoint(&decoy[i], decoy[i].ip, READY);
    let mut headless_labelled = slice("normal-headless", "normal", "IPv4", vec![decoy_ep(0)]);
    headless_labelled["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    let mut orphan = slice("normal-orphan", "normal", "IPv4", vec![decoy_ep(1)]);
    orphan["metadata"]["labels"] = json!({});
    orphan["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "Service", "name": "normal", "uid": "x"}]);
    // An IP is a valid DNS subdomain, so an FQDN slice can carry one.
    let fqdn = slice("normal-fqdn", "normal", "FQDN", vec![decoy_ep(0)]);
    lab.emulator.apply(headless_labelled).unwrap();
    lab.emulator.apply(orphan).unwrap();
    start_proxies(&mut lab, &[]);
    let ext = ext(&lab);
    let target = addr(cluster_ip(&lab, "normal"), 80);
    let want: Vec<&PodInfo> = normal.iter().collect();
    see(&lab, &ext, target, &want, "normal service");

    // Later additions go through the watch path: an FQDN slice, then a barrier Service
    // with its own slice, which shows the proxy has seen what came before.
    lab.emulator.apply(fqdn).unwrap();
    lab.emulator
        .apply(selectorless("barrier", json!({"clusterIP": "10.96.200.9"})))
        .unwrap();
    let barrier = slice(
        "barrier-1",
        "barrier",
        "IPv4",
        vec![endpoint(&normal[0], normal[0].ip, READY)],
    );
    lab.emulator.apply(barrier).unwrap();
    see(&lab, &ext, sa("10.96.200.9:80"), &[&normal[0]], "barrier");
    for from in [ext.clone(), lab.node_ns(2)] {
        see(
            &lab,
            &from,
            target,
            &want,
            "normal service, after ignored objects",
        );
    }
    for target in [sa("10.96.200.3:80"), addr(node_ip(&lab, 1), 30099)] {
        let res = tcp_connect_once(&ext, target, SHORT);
        assert!(
            res.is_err(),
            "other-proxy {target} served by this proxy: {res:?}"
        );
    }
    if !iptables_mode() {
        return;
    }
    let mut forbidden: Vec<String> = ["10.96.200.3", "30099", "example.com"]
        .map(String::from)
        .into();
    forbidden.extend(["headless", "extname", "other-proxy"].map(|s| format!("default/{s}")));
    forbidden.extend(
        decoy
            .iter()
            .flat_map(|p| [format!("{}:", p.ip), format!("{}/32", p.ip)]),
    );
    for n in [1, 2] {
        let rules =
            save(&lab, n, "iptables-save", "nat") + &save(&lab, n, "iptables-save", "filter");
        for f in &forbidden {
            assert!(
                !rules.contains(f.as_str()),
                "node{n}: rules mention {f}:\n{rules}"
            );
        }
    }
}

// ---------------------------------------------------------------- 5. dual-stack

/// A dual-stack Service answers on its IPv4 and IPv6 ClusterIPs and IPv6 NodePorts;
/// pod-to-Service IPv6 traffic is not masqueraded except for hairpin; an IPv6-only
/// Service works.
#[test]
fn dual_stack_services() {
    let mut lab = new_lab(TopologySpec::new(2).dual_stack(true));
    let v6_pod_cidr = lab
        .topology()
        .node(1)
        .unwrap()
        .pod_cidr_v6
        .expect("v6 pod CIDR");
    assert!(
        "fd44::/48"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&v6_pod_cidr)
    );
    start_proxies(&mut lab, &["--cluster-cidr=10.244.0.0/16,fd44::/48"]);
    apply(
        &mut lab,
        &[
            deployment("ds", 2, &[("TCP", 8080)]),
            service(
                "ds",
                json!({"type": "NodePort", "selector": {"app": "ds"},
            "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
            "clusterIP": "10.96.100.10", "clusterIPs": ["10.96.100.10", "fd96::10"],
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30090}]}),
            ),
            service(
                "v6only",
                json!({"selector": {"app": "ds"}, "ipFamilyPolicy": "SingleStack",
            "ipFamilies": ["IPv6"], "clusterIP": "fd96::20", "clusterIPs": ["fd96::20"],
            "ports": [{"port": 81, "targetPort": 8080, "protocol": "TCP"}]}),
            ),
        ],
    );
    let pods = pods_of(&lab, "ds");
    assert!(pods.iter().all(|p| p.ipv6.is_some()), "pods are dual-stack");
    let want: Vec<&PodInfo> = pods.iter().collect();
    let ext = ext(&lab);
    let node_v6 = |n: usize| lab.topology().node(n).unwrap().ipv6.expect("node IPv6");
    for (target, what) in [
        (sa("[fd96::10]:80"), "IPv6 ClusterIP from ext"),
        (sa("10.96.100.10:80"), "IPv4 ClusterIP from ext"),
        (sa("[fd96::20]:81"), "IPv6-only service from ext"),
        (addr(node_v6(1), 30090), "IPv6 NodePort node1"),
        (addr(node_v6(2), 30090), "IPv6 NodePort node2"),
    ] {
        let r = see(&lab, &ext, target, &want, what);
        // Off-cluster clients are masqueraded to a node address.
        let masqueraded = r.sources_seen.keys().all(|s| s != "fd18::2" && s != EXT_IP);
        assert!(masqueraded, "{what}: not masqueraded: {r}");
    }

    // From a pod: the other pod sees the pod's own IPv6 address; itself (hairpin) sees
    // the node's bridge address.
    let (me, other) = (&pods[0], &pods[1]);
    assert_eq!(me.node, "node1");
    let bridge_v6 = lab
        .topology()
        .node(1)
        .unwrap()
        .bridge_ipv6
        .unwrap()
        .to_string();
    let r = see(
        &lab,
        &me.netns,
        sa("[fd96::10]:80"),
        &want,
        "pod to IPv6 ClusterIP",
    );
    let seen = |ip: String| r.sources_seen.get(&ip).copied().unwrap_or(0);
    let not_masqueraded = seen(me.ipv6.unwrap().to_string()) == r.answers[&other.name];
    assert!(
        not_masqueraded,
        "pod-to-pod over the IPv6 ClusterIP is not masqueraded: {r}"
    );
    assert_eq!(
        seen(bridge_v6),
        r.answers[&me.name],
        "hairpin is masqueraded: {r}"
    );

    if iptables_mode() {
        let nat6 = save(&lab, 1, "ip6tables-save", "nat");
        let both = nat6.contains("-d fd96::10/128") && nat6.contains("-d fd96::20/128");
        assert!(both, "IPv6 ClusterIP rules missing:\n{nat6}");
        let nat4 = save(&lab, 1, "iptables-save", "nat");
        assert!(
            !nat4.contains("fd96::"),
            "IPv6 rules in the IPv4 table:\n{nat4}"
        );
    }
}

// ---------------------------------------------------------------- 6. metrics, events

#[test]
fn metrics_and_events() {
    let mut lab = new_lab(TopologySpec::new(2));
    start_proxies(&mut lab, &[]);
    // Created after the proxies started, so the slices' trigger times count.
    apply(
        &mut lab,
        &[
            deployment("mx", 2, &[("TCP", 8080)]),
            service(
                "mx",
                json!({"selector": {"app": "mx"}, "ports": [{"port": 80, "targetPort": 8080}]}),
            ),
        ],
    );
    let ext = ext(&lab);
    let target = addr(cluster_ip(&lab, "mx"), 80);
    see(
        &lab,
        &ext,
        target,
        &pods_of(&lab, "mx").iter().collect::<Vec<_>>(),
        "mx",
    );
    lab.cluster.scale("default", "mx", 3).unwrap();
    see(
        &lab,
        &ext,
        target,
        &pods_of(&lab, "mx").iter().collect::<Vec<_>>(),
        "mx x3",
    );

    let m = metrics(&lab, 1);
    if iptables_mode() {
        let nat = metric(
            &m,
            "kubeproxy_sync_proxy_rules_iptables_last",
            &["table=\"nat\""],
        );
        assert!(nat > 0.0, "iptables_last{{table=nat}} = {nat}\n{m}");
    }
    let npd = metric(
        &m,
        "kubeproxy_network_programming_duration_seconds_count",
        &[],
    );
    assert!(npd > 0.0, "network_programming_duration count = {npd}\n{m}");

    let node1 = lab.node_ns(1);
    for path in ["/healthz", "/livez"] {
        let name = format!("kubeproxy_proxy_{}_total", &path[1..]);
        let before = metric(&metrics(&lab, 1), &name, &["code=\"200\""]);
        for _ in 0..5 {
            let (code, body) = http_get(&node1, localhost(10256), path).unwrap();
            assert_eq!(code, 200, "{path}: {body}");
        }
        let after = metric(&metrics(&lab, 1), &name, &["code=\"200\""]);
        assert_eq!(
            after - before,
            5.0,
            "{name}{{code=200}} counts the 5 GET {path}"
        );
    }

    for node in ["node1", "node2"] {
        let starting = |e: &Value| {
            let on = if e["regarding"].is_object() {
                &e["regarding"]
            } else {
                &e["involvedObject"]
            };
            e["reason"] == "Starting" && on["kind"] == "Node" && on["name"] == node
        };
        let ev = wait_for(Duration::from_secs(10), || {
            lab.emulator.events().into_iter().find(starting)
        });
        assert!(
            ev.is_some(),
            "no Starting event for {node}: {:?}",
            lab.emulator.events()
        );
    }
}

// ---------------------------------------------------------------- 7. stale UDP conntrack

/// A one-way UDP sender from a fixed source port in ext, until dropped.
struct Sender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sender {
    fn start(ns: String, source_port: u16, target: SocketAddr) -> Sender {
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                // Each call opens a socket on the same port: one 5-tuple, one flow.
                if let Ok(n) = udp_send_only(&ns, Some(source_port), target, 5) {
                    sent2.fetch_add(n, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sender {
            stop,
            sent,
            thread: Some(thread),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn udp_received(lab: &Lab, pod: &str) -> u64 {
    lab.cluster
        .pod_server("default", pod)
        .map_or(0, |s| s.udp_received())
}

fn udp_service(lab: &mut Lab, name: &str, replicas: u32) -> SocketAddr {
    let ports = json!([{"port": 53, "targetPort": 5353, "protocol": "UDP"}]);
    apply(
        lab,
        &[
            deployment(name, replicas, &[("UDP", 5353)]),
            service(name, json!({"selector": {"app": name}, "ports": ports})),
        ],
    );
    addr(cluster_ip(lab, name), 53)
}

fn expect_receives(lab: &Lab, pod: &str, sender: &Sender, what: &str) {
    let within = Duration::from_secs(8);
    let got = wait_for(within, || (udp_received(lab, pod) > 0).then_some(()));
    let sent = sender.sent.load(Ordering::Relaxed);
    let log = logs(lab);
    assert!(
        got.is_some(),
        "{what}: {pod} got nothing in {within:?} ({sent} sent)\n{log}"
    );
}

/// The only endpoint of a UDP Service is replaced while a client keeps sending from
/// one source port: the stale conntrack entry is removed and the new pod receives.
#[test]
fn stale_udp_conntrack_replaced_endpoint() {
    let mut lab = new_lab(TopologySpec::new(2));
    start_proxies(&mut lab, &[]);
    let target = udp_service(&mut lab, "udp", 1);
    let ext = ext(&lab);
    let old = pods_of(&lab, "udp").remove(0);
    see_l4(&lab, &ext, target, L4::Udp, &[&old], "udp service");

    let sender = Sender::start(ext.clone(), 40000, target);
    let flowing = wait_for(SETTLE, || {
        (udp_received(&lab, &old.name) >= 20).then_some(())
    });
    assert!(
        flowing.is_some(),
        "the sender's flow never reached {}",
        old.name
    );

    lab.cluster.scale("default", "udp", 0).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    lab.cluster.scale("default", "udp", 1).unwrap();
    let new = pods_of(&lab, "udp").remove(0);
    assert_ne!(new.ip, old.ip, "the replacement has a new address");
    expect_receives(&lab, &new.name, &sender, "after replacing the pod");
    drop(sender);

    let m = metrics(&lab, 1);
    let deleted = metric(
        &m,
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
        &[],
    );
    assert!(
        deleted > 0.0,
        "conntrack_reconciler_deleted_entries_total = {deleted}\n{m}"
    );
}

/// 0 -> N: a client sends from one source port while the UDP Service has no
/// endpoints; once a pod appears it receives within a few seconds.
#[test]
fn stale_udp_conntrack_zero_to_n() {
    let mut lab = new_lab(TopologySpec::new(2));
    start_proxies(&mut lab, &[]);
    let target = udp_service(&mut lab, "udp0", 0);
    let ext = ext(&lab);
    // The proxy has programmed the service without endpoints: UDP to it is rejected.
    expect_failure(
        &lab,
        &ext,
        target,
        L4::Udp,
        "Refused",
        "udp0 without endpoints",
    );

    let sender = Sender::start(ext.clone(), 40001, target);
    std::thread::sleep(Duration::from_secs(2));
    lab.cluster.scale("default", "udp0", 1).unwrap();
    let pod = pods_of(&lab, "udp0").remove(0);
    expect_receives(&lab, &pod.name, &sender, "0 -> 1 endpoints");
}
