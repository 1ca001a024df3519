//! Bad input on the Service-feature side: each problem gets a warning naming the object
//! (and an Event where upstream emits one) and everything else keeps working. Needs root.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use common::*;
use kp_testkit::lab::{Lab, http_get, wait_for};
use kp_testkit::netns::bind_tcp_in;
use kp_testkit::probe::{probe_tcp, tcp_connect_once};
use serde_json::json;

#[test]
fn health_check_port_in_use_warns_with_an_event_and_others_keep_working() {
    let mut lab = new_lab(1);
    let node = lab.node_ns(1);
    // Someone else holds 32200 on the node.
    let _squatter: TcpListener =
        bind_tcp_in(&node, SocketAddr::from(([0, 0, 0, 0], 32200))).unwrap();
    let lb = |port: u16| json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": port});
    deploy(&mut lab, "blocked", "blocked", 1, Some(lb(32200)));
    deploy(&mut lab, "fine", "fine", 1, Some(lb(32201)));
    start(&mut lab, 1, &[]);
    assert!(
        wait_log(
            &lab,
            &[
                "cannot open healthCheckNodePort",
                "default/blocked",
                "32200"
            ]
        ),
        "{}",
        lab.proxy_log(1)
    );
    let event = wait_for(Duration::from_secs(10), || {
        lab.emulator
            .events()
            .into_iter()
            .find(|e| e["reason"] == "FailedToStartServiceHealthcheck")
    })
    .expect("FailedToStartServiceHealthcheck event");
    let regarding = if event["regarding"].is_object() {
        &event["regarding"]
    } else {
        &event["involvedObject"]
    };
    assert_eq!(
        (regarding["kind"].as_str(), regarding["name"].as_str()),
        (Some("Service"), Some("blocked"))
    );
    // The other service's health check answers; both services carry traffic.
    let node_ip = lab.topology().node(1).unwrap().ip;
    let ok = wait_for(Duration::from_secs(10), || {
        let (code, body) = http_get(&node, SocketAddr::new(node_ip, 32201), "/").ok()?;
        (code == 200 && body.contains("\"localEndpoints\": 1")).then_some(())
    });
    assert!(ok.is_some(), "healthz of the fine service");
    let ext = lab.topology().ext().ns.clone();
    for name in ["blocked", "fine"] {
        let svc = lab
            .emulator
            .get("v1", "Service", Some("default"), name)
            .unwrap();
        let ip = svc["spec"]["clusterIP"].as_str().unwrap();
        let target: SocketAddr = format!("{ip}:80").parse().unwrap();
        let r = probe_tcp(&ext, target, 10, T).unwrap();
        assert_eq!(r.total_ok(), 10, "{name}: {r}");
    }
}

#[test]
fn clashing_node_ports_bad_source_ranges_and_unproxied_families_warn() {
    let mut lab = new_lab(1);
    deploy(
        &mut lab,
        "first",
        "first",
        1,
        Some(json!({"type": "NodePort"})),
    );
    deploy(
        &mut lab,
        "second",
        "second",
        1,
        Some(json!({"type": "NodePort"})),
    );
    // A broken writer gives "second" the NodePort of "first".
    let first = lab
        .emulator
        .get("v1", "Service", Some("default"), "first")
        .unwrap();
    let node_port = first["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    let mut second = lab
        .emulator
        .get("v1", "Service", Some("default"), "second")
        .unwrap();
    second["spec"]["ports"][0]["nodePort"] = json!(node_port);
    // Source ranges that are not CIDRs, and an IPv6-only service.
    second["spec"]["loadBalancerSourceRanges"] = json!(["not-a-cidr"]);
    lab.emulator.apply_unvalidated(second).unwrap();
    lab.emulator
        .apply_unvalidated(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "six", "namespace": "default"},
            "spec": {"clusterIP": "fd96::10", "clusterIPs": ["fd96::10"], "ipFamilies": ["IPv6"], "ports": [{"port": 80}]}}))
        .unwrap();
    // This node proxies IPv4 only: a PATH whose tools exclude ip6tables (nft and ipset
    // stay, for nftables and IPVS mode).
    let bin = lab.workdir().join("v4only");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in [
        "iptables",
        "iptables-save",
        "iptables-restore",
        "nft",
        "ipset",
    ] {
        let real = ["/usr/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap();
        std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
    }
    lab.proxy_env
        .push(("PATH".into(), format!("{}:/usr/bin:/bin", bin.display())));
    start(&mut lab, 1, &[]);

    assert!(
        wait_log(&lab, &["default/second", "already used by default/first"]),
        "{}",
        lab.proxy_log(1)
    );
    assert!(
        wait_log(
            &lab,
            &["default/second", "loadBalancerSourceRanges", "not-a-cidr"]
        ),
        "{}",
        lab.proxy_log(1)
    );
    assert!(
        wait_log(&lab, &["default/six", "IP family"]),
        "{}",
        lab.proxy_log(1)
    );
    // The NodePort stays with "first"; both ClusterIPs work.
    let ext = lab.topology().ext().ns.clone();
    let node_ip = lab.topology().node(1).unwrap().ip;
    let np = SocketAddr::new(node_ip, node_port as u16);
    let answered = wait_for(Duration::from_secs(10), || {
        tcp_connect_once(&ext, np, T).ok()
    })
    .expect("NodePort answers");
    assert!(answered.pod.starts_with("first-"), "{answered:?}");
    for name in ["first", "second"] {
        let svc = lab
            .emulator
            .get("v1", "Service", Some("default"), name)
            .unwrap();
        let target: SocketAddr = format!("{}:80", svc["spec"]["clusterIP"].as_str().unwrap())
            .parse()
            .unwrap();
        let r = probe_tcp(&ext, target, 10, T).unwrap();
        assert_eq!(r.total_ok(), 10, "{name}: {r}");
    }
}

/// The whole ruleset of node `n` in the current mode, as text.
fn ruleset(lab: &Lab, n: usize) -> String {
    if mode() == "ipvs" {
        let (nat, filter) = nat_and_filter(lab, n);
        let ns = lab.node_ns(n);
        let ipvs = lab
            .topology()
            .exec_ok(&ns, &["ipvsadm", "-Sn"])
            .expect("ipvsadm");
        let sets = lab
            .topology()
            .exec_ok(&ns, &["ipset", "save"])
            .expect("ipset");
        format!("{nat}{filter}{ipvs}{sets}")
    } else if iptables_mode() {
        let (nat, filter) = nat_and_filter(lab, n);
        format!("{nat}{filter}")
    } else {
        lab.topology()
            .exec_ok(
                &lab.node_ns(n),
                &["nft", "list", "table", "ip", "kube-proxy"],
            )
            .expect("nft list")
    }
}

#[test]
fn hostile_corpus_is_rejected_or_applied_and_never_leaks_into_rules() {
    let mut lab = new_lab(1);
    deploy(&mut lab, "good", "good", 1, Some(json!({})));
    start(&mut lab, 1, &[]);
    let ext = ext_ns(&lab);
    let good = svc_addr(&lab, "default", "good", 80);
    wait_serving(&lab, &ext, good, SETTLE);

    let evil = "x\"; flush ruleset; \n-A INPUT -j DROP #\u{202e}λ";
    let huge = "z".repeat(64 * 1024);
    let slice = |name: &str, svc: &str, family: &str, eps: Vec<serde_json::Value>| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": name,
                "labels": {"kubernetes.io/service-name": svc}},
            "addressType": family, "endpoints": eps,
            "ports": [{"name": "p0", "port": 8080, "protocol": "TCP"}]})
    };
    let ep = |ip: String| json!({"addresses": [ip], "conditions": {"ready": true}});
    let ports: Vec<serde_json::Value> = (0..200)
        .map(|i| json!({"name": format!("p{i}"), "port": 1000 + i, "protocol": "TCP"}))
        .collect();
    let corpus = vec![
        // Names, annotations and labels no API server would store.
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": evil},
            "spec": {"clusterIP": "10.96.200.1", "ports": [{"port": 80}]}}),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": evil, "name": "ns-evil"},
            "spec": {"clusterIP": "10.96.200.2", "ports": [{"port": 80}]}}),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": "big-meta",
                "annotations": {"a": huge, "b": evil}, "labels": {"l": evil}},
            "spec": {"clusterIP": "10.96.200.3", "ports": [{"name": "p0", "port": 80, "protocol": "TCP"}],
                "unknownField": {"nested": [1, 2, 3]}}}),
        // A port name with rule syntax in it, an invalid IP, a port out of range.
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": "bad-port-name"},
            "spec": {"clusterIP": "10.96.200.4", "ports": [{"name": evil, "port": 80}]}}),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": "bad-ip"},
            "spec": {"clusterIP": "10.96.300.5", "ports": [{"port": 80}]}}),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": "bad-port"},
            "spec": {"clusterIP": "10.96.200.6", "ports": [{"port": 70000}]}}),
        // 200 ports; a slice for it with 10,000 endpoints, and one with duplicates.
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": "many"},
            "spec": {"clusterIP": "10.96.200.7", "ports": ports}}),
        slice(
            "many-a",
            "many",
            "IPv4",
            (0..10_000)
                .map(|i| ep(format!("10.250.{}.{}", i / 250, i % 250 + 1)))
                .collect(),
        ),
        slice(
            "many-b",
            "many",
            "IPv4",
            (0..5).map(|i| ep(format!("10.250.0.{}", i + 1))).collect(),
        ),
        // The wrong family, and endpoint addresses that are not IPs at all.
        slice("big-meta-6", "big-meta", "IPv6", vec![ep("fd00::1".into())]),
        slice(
            "big-meta-bad",
            "big-meta",
            "IPv4",
            vec![ep(evil.into()), ep("10.250.99.1".into())],
        ),
    ];
    for o in corpus {
        lab.emulator.apply_unvalidated(o).expect("stored");
    }
    // The proxy takes them in: "many" gets its rules (the last of its 10,000 endpoints
    // included), the rest is rejected with a warning.
    let ok = wait_for(SETTLE, || {
        let r = ruleset(&lab, 1);
        (r.contains("10.96.200.7") && r.contains("10.250.39.250") && r.contains("10.250.99.1"))
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "rules for the 200-port service and its 10,000 endpoints"
    );
    assert!(
        wait_log(&lab, &["skipping invalid Service"]),
        "{}",
        lab.proxy_log(1)
    );
    let rules = ruleset(&lab, 1);
    for needle in [
        "flush ruleset",
        "-A INPUT -j DROP",
        "\u{202e}",
        "λ",
        "zzzzzzzz",
        "10.96.300.5",
    ] {
        assert!(!rules.contains(needle), "{needle:?} reached the rules");
    }
    assert!(
        wait_log(&lab, &["ignoring part of EndpointSlice"]),
        "{}",
        lab.proxy_log(1)
    );
    // Still alive, still serving the good service.
    assert!(lab.proxy(1).is_some_and(|p| p.child.id().is_some()));
    let r = probe(&ext, good, L4::Tcp, 20, T);
    assert_eq!(r.total_ok(), 20, "{r}");
    let (code, _) = http_get(&lab.node_ns(1), sa("127.0.0.1:10256"), "/healthz").expect("healthz");
    assert_eq!(code, 200);
}
