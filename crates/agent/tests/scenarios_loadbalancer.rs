//! Real-kernel, multi-node scenarios for LoadBalancer Services: ingress VIPs (ipMode,
//! hostname-only entries), `loadBalancerSourceRanges` and the healthCheckNodePort
//! servers. Expected behaviour is upstream kube-proxy's (iptables mode); assertions about
//! traffic hold for every mode, rule-shape checks run only when the mode is iptables.
//!
//! The mode comes from `KP_PROXY_MODE` (default `iptables`). Needs root.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use kp_testkit::lab::{Lab, wait_for};
use kp_testkit::netns::in_netns;
use kp_testkit::probe::probe_tcp_from_addr;
use serde_json::{Value, json};

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
    let mut svc = stored_service(&lab, "web");
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
// 3. healthCheckNodePort
// ---------------------------------------------------------------------------------------

/// The health check port of the stored Service; when the API side did not allocate one,
/// request one explicitly (the API server honours a requested port too).
fn health_check_node_port(lab: &Lab, name: &str) -> u16 {
    let svc = stored_service(lab, name);
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
