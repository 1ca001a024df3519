//! Real-kernel, multi-node scenarios for how Services are reached from outside and from
//! the node: LoadBalancer VIPs and source ranges, external/internal traffic policies,
//! healthCheckNodePorts, `--nodeport-addresses`, localhost NodePorts and local-traffic
//! detection. Expected behaviour is upstream kube-proxy's (iptables mode); assertions about
//! traffic hold for every mode, rule-shape checks run only when the mode is iptables.
//!
//! The mode comes from `KP_PROXY_MODE` (default `iptables`). Needs root.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use kp_testkit::lab::{Lab, http_get, localhost, wait_for};
use kp_testkit::netns::{get_sysctl, in_netns};
use kp_testkit::probe::{
    ProbeError, ProbeReport, probe_tcp, probe_tcp_from_addr, tcp_connect_once,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");
/// Timeout of probes that should be answered.
const T: Duration = Duration::from_secs(2);
/// Timeout of probes that should be dropped.
const DROP_T: Duration = Duration::from_millis(400);
/// How long a proxy may take to program a change.
const SETTLE: Duration = Duration::from_secs(30);

fn mode() -> String {
    std::env::var("KP_PROXY_MODE").unwrap_or_else(|_| "iptables".into())
}

fn iptables_mode() -> bool {
    mode() == "iptables"
}

fn new_lab(nodes: usize) -> Lab {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (network namespaces, iptables)"
    );
    Lab::new(nodes).expect("lab")
}

/// Starts node `n`'s proxy in the suite's mode.
fn start(lab: &mut Lab, n: usize, extra: &[&str]) {
    let mode = format!("--proxy-mode={}", mode());
    let mut args = vec![mode.as_str()];
    args.extend_from_slice(extra);
    lab.start_proxy(Path::new(BIN), n, &args)
        .expect("start proxy");
}

/// The last lines of every node's proxy log, for assertion messages.
fn logs(lab: &Lab) -> String {
    let mut out = String::new();
    for n in 1..=lab.topology().nodes().len() {
        let log = lab.proxy_log(n);
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        out.push_str(&format!(
            "--- node{n} proxy log (tail) ---\n{}\n",
            tail.join("\n")
        ));
    }
    out
}

/// A Deployment `name` (pods labelled `app`, serving TCP 8080) and, when `svc_spec` is
/// given, a Service `app` selecting them on port 80 with `svc_spec` merged into its spec.
fn deploy(lab: &mut Lab, name: &str, app: &str, replicas: u32, svc_spec: Option<Value>) {
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
        docs.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": app, "namespace": "default"}, "spec": spec}));
    }
    let manifest: Vec<String> = docs.iter().map(Value::to_string).collect();
    lab.cluster
        .apply_manifest(&manifest.join("\n---\n"))
        .expect("manifest");
}

fn service(lab: &Lab, name: &str) -> Value {
    lab.emulator
        .get("v1", "Service", Some("default"), name)
        .expect("service exists")
}

/// Replaces the stored Service's status.loadBalancer.ingress.
fn set_ingress(lab: &Lab, name: &str, ingress: Value) {
    let mut svc = service(lab, name);
    svc["status"] = json!({"loadBalancer": {"ingress": ingress}});
    lab.emulator.apply(svc).expect("update service status");
}

fn cluster_ip(lab: &Lab, name: &str) -> IpAddr {
    service(lab, name)["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("clusterIP")
}

fn node_port(lab: &Lab, name: &str) -> u16 {
    service(lab, name)["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("nodePort allocated")
}

fn node_ip(lab: &Lab, n: usize) -> IpAddr {
    lab.topology().node(n).expect("node").ip
}

fn ext_ns(lab: &Lab) -> String {
    lab.topology().ext().ns.clone()
}

/// Names of the running pods of Deployment `deployment` on node `n`.
fn pods_on(lab: &Lab, deployment: &str, n: usize) -> BTreeSet<String> {
    let node = format!("node{n}");
    lab.cluster
        .pods()
        .into_iter()
        .filter(|p| p.deployment == deployment && p.node == node)
        .map(|p| p.name)
        .collect()
}

fn all_pods(lab: &Lab, deployment: &str) -> BTreeSet<String> {
    lab.cluster
        .pods()
        .into_iter()
        .filter(|p| p.deployment == deployment)
        .map(|p| p.name)
        .collect()
}

/// Adds a client pod (not selected by any Service) on node `n`: (netns, IP).
fn client_pod(lab: &mut Lab, n: usize, name: &str) -> (String, IpAddr) {
    let pod = lab
        .cluster
        .topology_mut()
        .add_pod(n, name)
        .expect("client pod");
    (pod.ns, pod.ip)
}

fn ip_cmd(lab: &Lab, ns: &str, args: &[&str]) {
    let mut argv = vec!["ip"];
    argv.extend_from_slice(args);
    lab.topology().exec_ok(ns, &argv).expect("ip command");
}

/// Waits until 20 probes from `from` to `target` are all answered, by exactly `want`.
fn wait_answered_by(
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

/// Asserts that 5 connections from `from` (optionally from `source`) to `target` all
/// time out: the packets are dropped, not rejected and not answered.
fn assert_dropped(lab: &Lab, from: &str, source: Option<IpAddr>, target: SocketAddr, what: &str) {
    let r = match source {
        Some(ip) => probe_tcp_from_addr(from, ip, target, 5, DROP_T),
        None => probe_tcp(from, target, 5, DROP_T),
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
fn assert_not_answered(lab: &Lab, from: &str, target: SocketAddr, what: &str) {
    let r = probe_tcp(from, target, 3, DROP_T).expect("probe");
    assert_eq!(
        r.total_ok(),
        0,
        "{what}: {target} must not reach a pod: {r}\n{}",
        logs(lab)
    );
}

/// Sum of the samples of metric `name` on node `n` whose line contains `label`.
fn metric(lab: &Lab, n: usize, name: &str, label: &str) -> Option<f64> {
    let (_, text) = http_get(&lab.node_ns(n), localhost(10249), "/metrics").ok()?;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| {
            l.starts_with(name)
                && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// (status, headers with lower-cased names, body).
type HttpReply = (u16, Vec<(String, String)>, String);

/// A plain HTTP GET of `/`.
fn http_get_with_headers(ns: &str, addr: SocketAddr) -> anyhow::Result<HttpReply> {
    in_netns(ns, move || -> anyhow::Result<HttpReply> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, T)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no HTTP status in {text:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok((status, headers, body.to_string()))
    })?
}

fn nat_and_filter(lab: &Lab, n: usize) -> (String, String) {
    (
        lab.iptables_save(n, "nat").expect("iptables-save nat"),
        lab.iptables_save(n, "filter")
            .expect("iptables-save filter"),
    )
}

// ---------------------------------------------------------------------------------------
// 1. LoadBalancer ingress IPs
// ---------------------------------------------------------------------------------------

#[test]
fn load_balancer_vip_reaches_pods_and_proxy_mode_and_hostname_entries_are_skipped() {
    let mut lab = new_lab(2);
    deploy(
        &mut lab,
        "web",
        "web",
        2,
        Some(json!({"type": "LoadBalancer"})),
    );
    set_ingress(
        &lab,
        "web",
        json!([
            {"hostname": "lb.example.com"},
            {"ip": "203.0.113.10"},
            {"ip": "203.0.113.11", "ipMode": "Proxy"},
            {"ip": "203.0.113.12", "ipMode": "VIP"},
        ]),
    );
    let ext = ext_ns(&lab);
    let via = node_ip(&lab, 1).to_string();
    for vip in ["203.0.113.10", "203.0.113.11", "203.0.113.12"] {
        ip_cmd(
            &lab,
            &ext,
            &["route", "add", &format!("{vip}/32"), "via", &via],
        );
    }
    start(&mut lab, 1, &[]);
    start(&mut lab, 2, &[]);
    let pods = all_pods(&lab, "web");
    assert_eq!(pods.len(), 2);

    let vip: SocketAddr = "203.0.113.10:80".parse().unwrap();
    let r = wait_answered_by(&lab, &ext, vip, &pods, "ext -> LB VIP (ipMode unset)");
    assert!(
        !r.sources_seen.contains_key("198.18.0.2"),
        "ETP Cluster: LB traffic is masqueraded: {r}"
    );
    let explicit_vip: SocketAddr = "203.0.113.12:80".parse().unwrap();
    wait_answered_by(
        &lab,
        &ext,
        explicit_vip,
        &pods,
        "ext -> LB VIP (ipMode VIP)",
    );

    // ipMode Proxy: traffic must go through the load balancer; no rules, so node1
    // routes the packet on (back to ext, which does not forward) and nobody answers.
    let proxy_vip: SocketAddr = "203.0.113.11:80".parse().unwrap();
    assert_dropped(
        &lab,
        &ext,
        None,
        proxy_vip,
        "ext -> LB ingress with ipMode Proxy",
    );
    if iptables_mode() {
        for n in [1, 2] {
            let (nat, filter) = nat_and_filter(&lab, n);
            assert!(
                !nat.contains("203.0.113.11") && !filter.contains("203.0.113.11"),
                "node{n}: ipMode Proxy ingress got rules:\n{nat}\n{filter}"
            );
            assert!(
                nat.contains("-d 203.0.113.10/32") && nat.contains("-d 203.0.113.12/32"),
                "node{n}: VIP rules missing:\n{nat}"
            );
        }
    }
    // The hostname-only entry made nothing invalid.
    for n in [1, 2] {
        let log = lab.proxy_log(n);
        assert!(
            !log.lines()
                .any(|l| l.contains("skipping invalid Service") && l.contains("default/web")),
            "node{n} rejected the Service:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. loadBalancerSourceRanges
// ---------------------------------------------------------------------------------------

#[test]
fn load_balancer_source_ranges_drop_other_clients_and_allow_the_node_in_range() {
    let mut lab = new_lab(2);
    let ranges = json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ["198.18.0.2/32"]});
    deploy(&mut lab, "web", "web", 2, Some(ranges));
    set_ingress(&lab, "web", json!([{"ip": "203.0.113.20"}]));
    let ext = ext_ns(&lab);
    let node1 = lab.node_ns(1);
    ip_cmd(&lab, &ext, &["addr", "add", "198.18.0.3/24", "dev", "eth0"]);
    let via = node_ip(&lab, 1).to_string();
    ip_cmd(
        &lab,
        &ext,
        &["route", "add", "203.0.113.20/32", "via", &via],
    );
    // The VIP also lives on node1 (as with MetalLB L2 / kube-vip): node1's own
    // connections to it then carry the VIP as source address.
    ip_cmd(
        &lab,
        &node1,
        &["addr", "add", "203.0.113.20/32", "dev", "lo"],
    );
    start(&mut lab, 1, &[]);
    start(&mut lab, 2, &[]);
    let pods = all_pods(&lab, "web");
    let vip: SocketAddr = "203.0.113.20:80".parse().unwrap();
    let allowed: IpAddr = "198.18.0.2".parse().unwrap();
    let other: IpAddr = "198.18.0.3".parse().unwrap();

    wait_answered_by(&lab, &ext, vip, &pods, "ext 198.18.0.2 (in range) -> VIP");
    let r = probe_tcp_from_addr(&ext, allowed, vip, 10, T).unwrap();
    assert_eq!(r.total_ok(), 10, "explicit source 198.18.0.2: {r}");
    assert_dropped(
        &lab,
        &ext,
        Some(other),
        vip,
        "ext 198.18.0.3 (not in range) -> VIP",
    );
    // Source ranges apply to the LB VIP only, not to the NodePort.
    let nodeport = SocketAddr::new(node_ip(&lab, 1), node_port(&lab, "web"));
    let r = probe_tcp_from_addr(&ext, other, nodeport, 10, T).unwrap();
    assert_eq!(
        r.total_ok(),
        10,
        "198.18.0.3 -> NodePort is not filtered: {r}"
    );
    // node1's IP is outside the range: its own connection (source = the VIP) is dropped.
    assert_dropped(
        &lab,
        &node1,
        None,
        vip,
        "node1 -> VIP, node IP not in range",
    );
    if iptables_mode() {
        let (nat, filter) = nat_and_filter(&lab, 1);
        assert!(
            filter
                .lines()
                .any(|l| l.starts_with("-A KUBE-PROXY-FIREWALL")
                    && l.contains("-d 203.0.113.20/32")
                    && l.ends_with("-j DROP")),
            "{filter}"
        );
        assert!(
            nat.lines().any(|l| l.starts_with("-A KUBE-FW-")
                && l.contains("-s 198.18.0.2/32")
                && l.contains("-j KUBE-EXT-")),
            "{nat}"
        );
    }

    // Now the range covers the node's own IP: node1 -> VIP (source VIP) is allowed.
    let mut svc = service(&lab, "web");
    svc["spec"]["loadBalancerSourceRanges"] = json!(["198.18.0.0/24"]);
    lab.emulator.apply(svc).unwrap();
    wait_answered_by(&lab, &node1, vip, &pods, "node1 -> VIP, node IP in range");
    let r = probe_tcp_from_addr(&ext, other, vip, 10, T).unwrap();
    assert_eq!(
        r.total_ok(),
        10,
        "198.18.0.3 is inside 198.18.0.0/24 now: {r}"
    );
    if iptables_mode() {
        let nat = lab.iptables_save(1, "nat").unwrap();
        assert!(
            nat.lines().any(|l| l.starts_with("-A KUBE-FW-")
                && l.contains("-s 203.0.113.20/32")
                && l.contains("-j KUBE-EXT-")),
            "the VIP as source is allowed when the node is in a range:\n{nat}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. externalTrafficPolicy: Local, and healthCheckNodePort
// ---------------------------------------------------------------------------------------

#[test]
fn external_traffic_policy_local_keeps_client_ip_and_short_circuits_node_and_pod_traffic() {
    let mut lab = new_lab(2);
    let spec = json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"});
    deploy(&mut lab, "web", "web", 2, Some(spec));
    set_ingress(&lab, "web", json!([{"ip": "203.0.113.30"}]));
    let ext = ext_ns(&lab);
    let via = node_ip(&lab, 1).to_string();
    ip_cmd(
        &lab,
        &ext,
        &["route", "add", "203.0.113.30/32", "via", &via],
    );
    let (client2, client2_ip) = client_pod(&mut lab, 2, "client2");
    start(&mut lab, 1, &[]);
    start(&mut lab, 2, &[]);
    let on1 = pods_on(&lab, "web", 1);
    let on2 = pods_on(&lab, "web", 2);
    assert_eq!((on1.len(), on2.len()), (1, 1), "{:?}", lab.cluster.pods());
    let np = node_port(&lab, "web");
    let np1 = SocketAddr::new(node_ip(&lab, 1), np);
    let np2 = SocketAddr::new(node_ip(&lab, 2), np);
    let vip: SocketAddr = "203.0.113.30:80".parse().unwrap();
    let client_only = |r: &ProbeReport| r.sources_seen.keys().all(|s| s == "198.18.0.2");

    let r = wait_answered_by(&lab, &ext, np1, &on1, "ext -> node1 NodePort (ETP Local)");
    assert!(client_only(&r), "source preserved: {r}");
    let r = wait_answered_by(&lab, &ext, np2, &on2, "ext -> node2 NodePort (ETP Local)");
    assert!(client_only(&r), "source preserved: {r}");
    let r = wait_answered_by(&lab, &ext, vip, &on1, "ext -> LB VIP via node1 (ETP Local)");
    assert!(client_only(&r), "source preserved: {r}");
    assert_eq!(
        metric(
            &lab,
            2,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "traffic_policy=\"external\""
        ),
        Some(0.0)
    );

    // node2 loses its endpoint (scaling down removes the newest pod, node2's).
    lab.cluster.scale("default", "web", 1).unwrap();
    assert_eq!(pods_on(&lab, "web", 2).len(), 0);
    assert_eq!(pods_on(&lab, "web", 1), on1);
    // Pods and the node itself still reach the service through node2: they short-circuit
    // to the cluster-wide endpoints. Pod traffic keeps its source address.
    let r = wait_answered_by(&lab, &client2, np2, &on1, "pod on node2 -> node2 NodePort");
    assert!(
        r.sources_seen.keys().all(|s| *s == client2_ip.to_string()),
        "pod traffic is not masqueraded: {r}"
    );
    wait_answered_by(&lab, &client2, vip, &on1, "pod on node2 -> LB VIP");
    let node2 = lab.node_ns(2);
    wait_answered_by(&lab, &node2, np2, &on1, "node2 -> own NodePort");
    wait_answered_by(&lab, &node2, vip, &on1, "node2 -> LB VIP");
    // External traffic to node2 has no local endpoint: dropped, not rejected.
    assert_dropped(
        &lab,
        &ext,
        None,
        np2,
        "ext -> node2 NodePort without local endpoints",
    );
    let r = probe_tcp(&ext, np1, 10, T).unwrap();
    assert!(
        r.total_ok() == 10 && client_only(&r),
        "node1 unaffected: {r}"
    );
    assert_eq!(
        metric(
            &lab,
            2,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "traffic_policy=\"external\""
        ),
        Some(1.0),
        "{}",
        logs(&lab)
    );
    if iptables_mode() {
        let filter = lab.iptables_save(2, "filter").unwrap();
        assert!(
            filter
                .lines()
                .any(|l| l.starts_with("-A KUBE-EXTERNAL-SERVICES")
                    && l.contains("has no local endpoints")
                    && l.contains(&format!("--dport {np}"))
                    && l.ends_with("-j DROP")),
            "{filter}"
        );
    }
}

/// The health check port of the stored Service; when the API side did not allocate one,
/// request one explicitly (the API server honours a requested port too).
fn health_check_node_port(lab: &Lab, name: &str) -> u16 {
    let svc = service(lab, name);
    if let Some(port) = svc["spec"]["healthCheckNodePort"].as_u64() {
        return u16::try_from(port).expect("port");
    }
    eprintln!("note: the emulator did not allocate spec.healthCheckNodePort; requesting 32123");
    let mut svc = svc;
    svc["spec"]["healthCheckNodePort"] = json!(32123);
    let stored = lab.emulator.apply(svc).unwrap();
    u16::try_from(
        stored["spec"]["healthCheckNodePort"]
            .as_u64()
            .expect("hcnp"),
    )
    .unwrap()
}

/// Polls node `n`'s health check server from ext until it reports `want` local endpoints.
fn wait_health(lab: &Lab, n: usize, port: u16, want: u64) {
    let addr = SocketAddr::new(node_ip(lab, n), port);
    let ext = ext_ns(lab);
    let mut last = String::new();
    let got = wait_for(SETTLE, || {
        let reply = http_get_with_headers(&ext, addr);
        last = format!("{reply:?}");
        let (status, headers, body) = reply.ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["localEndpoints"] == json!(want)).then_some((status, headers, v))
    });
    let Some((status, headers, body)) = got else {
        panic!(
            "node{n} {addr}: never reported localEndpoints {want}; last: {last}\n{}",
            logs(lab)
        );
    };
    let expected_status = if want > 0 { 200 } else { 503 };
    assert_eq!(status, expected_status, "node{n}: {body}");
    assert_eq!(
        body["service"],
        json!({"namespace": "default", "name": "web"}),
        "{body}"
    );
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header("x-load-balancing-endpoint-weight"),
        Some(want.to_string()),
        "node{n}: {headers:?}"
    );
    assert_eq!(
        header("content-type").as_deref(),
        Some("application/json"),
        "node{n}: {headers:?}"
    );
}

#[test]
fn health_check_node_port_reports_local_endpoints_and_closes_with_the_service() {
    let mut lab = new_lab(2);
    let spec = json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"});
    deploy(&mut lab, "web", "web", 2, Some(spec));
    let hcnp = health_check_node_port(&lab, "web");
    start(&mut lab, 1, &[]);
    start(&mut lab, 2, &[]);
    wait_health(&lab, 1, hcnp, 1);
    wait_health(&lab, 2, hcnp, 1);

    // A third pod lands on node1 (round robin): node1 now has two local endpoints.
    lab.cluster.scale("default", "web", 3).unwrap();
    let on1 = pods_on(&lab, "web", 1).len() as u64;
    assert_eq!(on1, 2, "{:?}", lab.cluster.pods());
    wait_health(&lab, 1, hcnp, 2);
    // Down to one pod (node1's first): node2 has none and answers 503.
    lab.cluster.scale("default", "web", 1).unwrap();
    assert_eq!(pods_on(&lab, "web", 2).len(), 0);
    wait_health(&lab, 2, hcnp, 0);
    wait_health(&lab, 1, hcnp, 1);

    // Deleting the Service closes the servers.
    lab.cluster
        .delete_object("v1", "Service", Some("default"), "web")
        .unwrap();
    let ext = ext_ns(&lab);
    for n in [1, 2] {
        let addr = SocketAddr::new(node_ip(&lab, n), hcnp);
        let closed = wait_for(SETTLE, || {
            in_netns(&ext, || std::net::TcpStream::connect_timeout(&addr, T))
                .ok()
                .and_then(|r| match r {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                    _ => None,
                })
        });
        assert!(
            closed.is_some(),
            "node{n}: health check port {hcnp} still open after the Service was deleted\n{}",
            logs(&lab)
        );
    }
}

// ---------------------------------------------------------------------------------------
// 4. externalTrafficPolicy: Cluster
// ---------------------------------------------------------------------------------------

#[test]
fn external_traffic_policy_cluster_masquerades_nodeport_traffic_to_all_pods() {
    let mut lab = new_lab(2);
    deploy(&mut lab, "web", "web", 2, Some(json!({"type": "NodePort"})));
    start(&mut lab, 1, &[]);
    start(&mut lab, 2, &[]);
    let pods = all_pods(&lab, "web");
    let ext = ext_ns(&lab);
    let np = node_port(&lab, "web");
    for n in [1, 2] {
        let node = lab.topology().node(n).unwrap().clone();
        let target = SocketAddr::new(node.ip, np);
        let r = wait_answered_by(&lab, &ext, target, &pods, "ext -> NodePort (ETP Cluster)");
        let r2 = probe_tcp(&ext, target, 40, T).unwrap();
        let node_addrs = [node.ip.to_string(), node.bridge_ip.to_string()];
        for report in [&r, &r2] {
            assert!(
                report.sources_seen.keys().all(|s| node_addrs.contains(s)),
                "node{n}: pods must see node{n}'s address {node_addrs:?}, not 198.18.0.2: {report}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 5. internalTrafficPolicy: Local
// ---------------------------------------------------------------------------------------

#[test]
fn internal_traffic_policy_local_uses_only_local_endpoints_and_drops_without() {
    let mut lab = new_lab(2);
    // Two one-pod Deployments behind one Service: web-a lands on node1, web-b on node2.
    deploy(&mut lab, "web-a", "web", 1, None);
    deploy(
        &mut lab,
        "web-b",
        "web",
        1,
        Some(json!({"internalTrafficPolicy": "Local"})),
    );
    let a = pods_on(&lab, "web-a", 1);
    let b = pods_on(&lab, "web-b", 2);
    assert_eq!((a.len(), b.len()), (1, 1), "{:?}", lab.cluster.pods());
    let (client1, _) = client_pod(&mut lab, 1, "client1");
    let (client2, _) = client_pod(&mut lab, 2, "client2");
    start(&mut lab, 1, &[]);
    start(&mut lab, 2, &[]);
    let target = SocketAddr::new(cluster_ip(&lab, "web"), 80);
    let internal = "traffic_policy=\"internal\"";
    let no_local = "kubeproxy_sync_proxy_rules_no_local_endpoints_total";

    wait_answered_by(
        &lab,
        &client1,
        target,
        &a,
        "pod on node1 -> ClusterIP (ITP Local)",
    );
    wait_answered_by(
        &lab,
        &client2,
        target,
        &b,
        "pod on node2 -> ClusterIP (ITP Local)",
    );
    assert_eq!(metric(&lab, 1, no_local, internal), Some(0.0));

    lab.cluster.scale("default", "web-a", 0).unwrap();
    let counted = wait_for(SETTLE, || {
        (metric(&lab, 1, no_local, internal)? == 1.0).then_some(())
    });
    assert!(
        counted.is_some(),
        "node1 never counted the service without local endpoints: {:?}\n{}",
        metric(&lab, 1, no_local, internal),
        logs(&lab)
    );
    assert_dropped(
        &lab,
        &client1,
        None,
        target,
        "pod on node1 -> ClusterIP, no local endpoint",
    );
    let r = probe_tcp(&client2, target, 10, T).unwrap();
    assert!(
        r.total_ok() == 10 && r.answers.keys().all(|p| b.contains(p)),
        "node2: {r}"
    );
    if iptables_mode() {
        let filter = lab.iptables_save(1, "filter").unwrap();
        assert!(
            filter.lines().any(|l| l.starts_with("-A KUBE-SERVICES")
                && l.contains(&format!("-d {}/32", target.ip()))
                && l.contains("has no local endpoints")
                && l.ends_with("-j DROP")),
            "{filter}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. --nodeport-addresses
// ---------------------------------------------------------------------------------------

#[test]
fn nodeport_addresses_restrict_which_node_addresses_answer() {
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 2, Some(json!({"type": "NodePort"})));
    let pods = all_pods(&lab, "web");
    let node1 = lab.node_ns(1);
    // A second fabric address: inside 198.18.0.0/24 but not the Node's InternalIP.
    ip_cmd(
        &lab,
        &node1,
        &["addr", "add", "198.18.0.111/24", "dev", "eth0"],
    );
    let (client, _) = client_pod(&mut lab, 1, "client1");
    let ext = ext_ns(&lab);
    let np = node_port(&lab, "web");
    let primary = SocketAddr::new(node_ip(&lab, 1), np);
    let secondary: SocketAddr = format!("198.18.0.111:{np}").parse().unwrap();
    let bridge = SocketAddr::new(lab.topology().node(1).unwrap().bridge_ip, np);
    let loopback: SocketAddr = format!("127.0.0.1:{np}").parse().unwrap();

    start(&mut lab, 1, &["--nodeport-addresses=198.18.0.0/24"]);
    wait_answered_by(&lab, &ext, primary, &pods, "CIDR mode: ext -> node IP");
    wait_answered_by(
        &lab,
        &ext,
        secondary,
        &pods,
        "CIDR mode: ext -> second IP in CIDR",
    );
    wait_answered_by(&lab, &client, primary, &pods, "CIDR mode: pod -> node IP");
    assert_not_answered(&lab, &client, bridge, "CIDR mode: pod -> bridge IP");
    assert_not_answered(&lab, &node1, loopback, "CIDR mode: node -> 127.0.0.1");
    if iptables_mode() {
        let nat = lab.iptables_save(1, "nat").unwrap();
        assert!(
            !nat.contains("--dst-type LOCAL -j KUBE-NODEPORTS"),
            "no match-all NodePort rule with --nodeport-addresses:\n{nat}"
        );
    }

    lab.stop_proxy(1, false);
    start(&mut lab, 1, &["--nodeport-addresses=primary"]);
    let gone = wait_for(SETTLE, || {
        let r = probe_tcp(&ext, secondary, 1, DROP_T).ok()?;
        (r.total_ok() == 0).then_some(())
    });
    assert!(
        gone.is_some(),
        "primary mode: the second address 198.18.0.111 still answers\n{}",
        logs(&lab)
    );
    wait_answered_by(
        &lab,
        &ext,
        primary,
        &pods,
        "primary mode: ext -> InternalIP",
    );
    wait_answered_by(
        &lab,
        &client,
        primary,
        &pods,
        "primary mode: pod -> InternalIP",
    );
    assert_not_answered(&lab, &ext, secondary, "primary mode: ext -> second address");
    assert_not_answered(&lab, &client, bridge, "primary mode: pod -> bridge IP");
    assert_not_answered(&lab, &node1, loopback, "primary mode: node -> 127.0.0.1");
}

// ---------------------------------------------------------------------------------------
// 7. Localhost NodePorts and the CVE-2020-8558 martian drop
// ---------------------------------------------------------------------------------------

/// One raw TCP connect from `ns` (connected = answered).
fn connects(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    in_netns(ns, || std::net::TcpStream::connect_timeout(&addr, timeout))?
        .map(drop)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ProbeError::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => ProbeError::Timeout,
            _ => ProbeError::Io(e),
        })
}

#[test]
fn localhost_nodeports_work_and_remote_packets_to_localhost_are_dropped() {
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 2, Some(json!({"type": "NodePort"})));
    let pods = all_pods(&lab, "web");
    let node1 = lab.node_ns(1);
    let ext = ext_ns(&lab);
    start(&mut lab, 1, &[]);
    let np = node_port(&lab, "web");
    let loopback: SocketAddr = format!("127.0.0.1:{np}").parse().unwrap();
    if mode() == "nftables" {
        // Upstream's nftables mode has no localhost NodePorts (a deliberate difference):
        // the NodePort answers on the node IP, 127.0.0.1 gets nothing, route_localnet stays off.
        let node_np = SocketAddr::new(node_ip(&lab, 1), np);
        wait_answered_by(&lab, &node1, node_np, &pods, "node1 -> nodeIP:NodePort");
        assert!(
            tcp_connect_once(&node1, loopback, DROP_T).is_err(),
            "127.0.0.1:NodePort must not answer in nftables mode"
        );
        assert_eq!(
            get_sysctl(&node1, "net.ipv4.conf.all.route_localnet")
                .unwrap()
                .trim(),
            "0"
        );
        return;
    }
    wait_answered_by(&lab, &node1, loopback, &pods, "node1 -> 127.0.0.1:NodePort");
    assert_eq!(
        get_sysctl(&node1, "net.ipv4.conf.all.route_localnet")
            .unwrap()
            .trim(),
        "1",
        "kube-proxy sets route_localnet for localhost NodePorts"
    );
    if iptables_mode() {
        let filter = lab.iptables_save(1, "filter").unwrap();
        assert!(
            filter.lines().any(|l| l.starts_with("-A KUBE-FIREWALL")
                && l.contains("! -s 127.0.0.0/8")
                && l.contains("-d 127.0.0.0/8")
                && l.contains("! --ctstate RELATED,ESTABLISHED,DNAT")
                && l.ends_with("-j DROP")),
            "CVE-2020-8558 rule:\n{filter}"
        );
    }

    // ext sends to 127.0.0.1 through node1: route 127.0.0.1 via node1 ahead of ext's local
    // table, and accept the (loopback-sourced) replies should any come back.
    let via = node_ip(&lab, 1).to_string();
    for args in [
        &[
            "rule",
            "add",
            "pref",
            "10",
            "to",
            "127.0.0.1/32",
            "lookup",
            "100",
        ][..],
        &["rule", "add", "pref", "100", "lookup", "local"][..],
        &["rule", "del", "pref", "0"][..],
        &[
            "route",
            "add",
            "127.0.0.1/32",
            "via",
            &via,
            "dev",
            "eth0",
            "table",
            "100",
        ][..],
    ] {
        ip_cmd(&lab, &ext, args);
    }
    lab.topology()
        .exec_ok(
            &ext,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.route_localnet=1",
                "net.ipv4.conf.eth0.route_localnet=1",
            ],
        )
        .unwrap();
    // The proxy's own metrics listener is bound to 127.0.0.1:10249 on node1.
    let metrics = localhost(10249);
    assert!(
        connects(&node1, metrics, T).is_ok(),
        "metrics listener on node1"
    );
    for _ in 0..3 {
        let res = connects(&ext, metrics, DROP_T);
        assert!(
            matches!(res, Err(ProbeError::Timeout)),
            "ext -> 127.0.0.1:10249 via node1 must be dropped, got {res:?}\n{}",
            logs(&lab)
        );
    }
    if iptables_mode() {
        // Control: without the drop the same packet reaches the listener, so the drop
        // above is what protected it.
        lab.topology()
            .exec_ok(&node1, &["iptables", "-t", "filter", "-F", "KUBE-FIREWALL"])
            .unwrap();
        assert!(
            connects(&ext, metrics, T).is_ok(),
            "control: without KUBE-FIREWALL ext reaches 127.0.0.1:10249 on node1"
        );
        // Upstream hooks kubelet's chain with uncommented jumps (`iptablesKubeletJumpChains`).
        let filter = lab.iptables_save(1, "filter").unwrap();
        for hook in ["INPUT", "OUTPUT"] {
            assert!(
                filter.contains(&format!("-A {hook} -j KUBE-FIREWALL\n")),
                "{hook} -> KUBE-FIREWALL jump as upstream writes it:\n{filter}"
            );
        }
    }
}

#[test]
fn localhost_nodeports_can_be_disabled() {
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 2, Some(json!({"type": "NodePort"})));
    let pods = all_pods(&lab, "web");
    let node1 = lab.node_ns(1);
    start(&mut lab, 1, &["--iptables-localhost-nodeports=false"]);
    let np = node_port(&lab, "web");
    let node_addr = SocketAddr::new(node_ip(&lab, 1), np);
    wait_answered_by(&lab, &node1, node_addr, &pods, "node1 -> own IP:NodePort");
    let loopback: SocketAddr = format!("127.0.0.1:{np}").parse().unwrap();
    assert_not_answered(
        &lab,
        &node1,
        loopback,
        "node1 -> 127.0.0.1:NodePort, disabled",
    );
    assert_eq!(
        get_sysctl(&node1, "net.ipv4.conf.all.route_localnet")
            .unwrap()
            .trim(),
        "0",
        "route_localnet is left alone when localhost NodePorts are off"
    );
    if iptables_mode() {
        let (nat, filter) = nat_and_filter(&lab, 1);
        assert!(
            nat.lines().any(|l| l.starts_with("-A KUBE-SERVICES")
                && l.contains("! -d 127.0.0.0/8")
                && l.contains("--dst-type LOCAL")
                && l.ends_with("-j KUBE-NODEPORTS")),
            "{nat}"
        );
        assert!(
            !filter
                .lines()
                .any(|l| l.starts_with("-A KUBE-FIREWALL") && l.contains("127.0.0.0/8")),
            "no martian drop without localhost NodePorts:\n{filter}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 8. --detect-local-mode
// ---------------------------------------------------------------------------------------

/// ext -> ClusterIP is masqueraded; a pod on node1 -> ClusterIP keeps its address.
/// `rule` is the local-traffic match the iptables masquerade rule must carry.
fn check_detect_local(flags: &[&str], rule: &str) {
    let mut lab = new_lab(2);
    deploy(&mut lab, "web", "web", 2, Some(json!({})));
    let pods = all_pods(&lab, "web");
    let (client, client_ip) = client_pod(&mut lab, 1, "client1");
    start(&mut lab, 1, flags);
    let ext = ext_ns(&lab);
    let target = SocketAddr::new(cluster_ip(&lab, "web"), 80);
    let node = lab.topology().node(1).unwrap().clone();
    let node_addrs = [node.ip.to_string(), node.bridge_ip.to_string()];

    let r = wait_answered_by(&lab, &ext, target, &pods, "ext -> ClusterIP");
    let r2 = probe_tcp(&ext, target, 20, T).unwrap();
    for report in [&r, &r2] {
        assert!(
            report.sources_seen.keys().all(|s| node_addrs.contains(s)),
            "{flags:?}: off-cluster traffic is masqueraded to node1 {node_addrs:?}: {report}"
        );
    }
    let r = wait_answered_by(&lab, &client, target, &pods, "pod -> ClusterIP");
    let r2 = probe_tcp(&client, target, 20, T).unwrap();
    for report in [&r, &r2] {
        assert!(
            report
                .sources_seen
                .keys()
                .all(|s| *s == client_ip.to_string()),
            "{flags:?}: pod traffic is not masqueraded (pods see {client_ip}): {report}\n{}",
            logs(&lab)
        );
    }
    if iptables_mode() {
        let nat = lab.iptables_save(1, "nat").unwrap();
        assert!(
            nat.lines().any(|l| l.starts_with("-A KUBE-SVC-")
                && l.contains(rule)
                && l.contains(&format!("-d {}/32", target.ip()))
                && l.ends_with("-j KUBE-MARK-MASQ")),
            "{flags:?}: masquerade rule with {rule:?} missing:\n{nat}"
        );
    }
}

#[test]
fn detect_local_mode_cluster_cidr() {
    check_detect_local(&["--detect-local-mode=ClusterCIDR"], "! -s 10.244.0.0/16");
}

#[test]
fn detect_local_mode_node_cidr() {
    check_detect_local(&["--detect-local-mode=NodeCIDR"], "! -s 10.244.1.0/24");
}

#[test]
fn detect_local_mode_bridge_interface() {
    check_detect_local(
        &[
            "--detect-local-mode=BridgeInterface",
            "--pod-bridge-interface=cbr0",
        ],
        "! -i cbr0",
    );
}

/// Pod traffic here enters the node's IP layer on the bridge `cbr0` (the veths are bridge
/// ports, so `-i veth+` never matches routed pod traffic, for upstream kube-proxy too):
/// the prefix that identifies pod traffic on this topology is `cbr`.
#[test]
fn detect_local_mode_interface_name_prefix() {
    check_detect_local(
        &[
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=cbr",
        ],
        "! -i cbr+",
    );
}
