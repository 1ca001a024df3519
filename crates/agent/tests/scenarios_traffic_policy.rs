//! Real-kernel, multi-node scenarios for traffic policies: externalTrafficPolicy Local
//! (client address kept, short-circuit for pods and the node, drop without local
//! endpoints) and Cluster (masquerade), internalTrafficPolicy Local. Expected behaviour is
//! upstream kube-proxy's (iptables mode); assertions about traffic hold for every mode,
//! rule-shape checks run only when the mode is iptables.
//!
//! The mode comes from `KP_PROXY_MODE` (default `iptables`). Needs root.

mod common;

use std::net::SocketAddr;

use common::*;
use kp_testkit::lab::wait_for;
use kp_testkit::probe::{ProbeReport, probe_tcp};
use serde_json::json;

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
        metric_on(
            &lab,
            2,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            &["traffic_policy=\"external\""]
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
        metric_on(
            &lab,
            2,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            &["traffic_policy=\"external\""]
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
    assert_eq!(metric_on(&lab, 1, no_local, &[internal]), Some(0.0));

    lab.cluster.scale("default", "web-a", 0).unwrap();
    let counted = wait_for(SETTLE, || {
        (metric_on(&lab, 1, no_local, &[internal])? == 1.0).then_some(())
    });
    assert!(
        counted.is_some(),
        "node1 never counted the service without local endpoints: {:?}\n{}",
        metric_on(&lab, 1, no_local, &[internal]),
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
