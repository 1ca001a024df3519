//! Bad input on the Service-feature side: each problem gets a warning naming the object
//! (and an Event where upstream emits one) and everything else keeps working. Needs root.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use common::*;
use kp_testkit::lab::{http_get, wait_for};
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
    // This node proxies IPv4 only: a PATH whose tools exclude ip6tables (nft stays, for
    // nftables mode).
    let bin = lab.workdir().join("v4only");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["iptables", "iptables-save", "iptables-restore", "nft"] {
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
