use super::*;
use kp_dataplane::service_chain_name;
use kp_dataplane::{LocalDetector, NodePortAddresses};
use kp_model::{ChangeTracker, NodeTopology};
use serde_json::json;

fn cfg() -> IptablesConfig {
    IptablesConfig {
        family: IpFamily::V4,
        masquerade_bit: 14,
        masquerade_all: false,
        local_detector: LocalDetector::Cidrs(vec!["10.244.0.0/16".parse().unwrap()]),
        node_port_addresses: NodePortAddresses::default(),
        localhost_node_ports: true,
        tcp_be_liberal: false,
        random_fully: true,
        ipvs: Default::default(),
        node_port_ips: vec![],
    }
}

fn node() -> NodeInfo {
    NodeInfo {
        topology: NodeTopology {
            node_name: "node1".into(),
            zone: None,
        },
        node_ips: vec!["198.18.0.11".parse().unwrap()],
        ..Default::default()
    }
}

/// A full sync's restore input with nothing in the kernel yet (no `-S` listing).
fn full_sync(c: &IptablesConfig, state: &ProxyState, n: &NodeInfo) -> Rendered {
    render(c, state, n, None, &BTreeSet::new(), &HashMap::new(), false)
}

fn tracker_with(objs: &[serde_json::Value]) -> ChangeTracker {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    for o in objs {
        if o["kind"] == "Service" {
            t.update_service(&serde_json::from_value(o.clone()).unwrap(), &mut w)
                .unwrap();
        } else {
            t.update_slice(&serde_json::from_value(o.clone()).unwrap(), &mut w)
                .unwrap();
        }
    }
    t
}

fn svc(ns: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"kind": "Service", "metadata": {"namespace": ns, "name": name}, "spec": spec})
}

fn slice(
    ns: &str,
    svc: &str,
    port_name: &str,
    port: u16,
    proto: &str,
    eps: &[(&str, &str)],
) -> serde_json::Value {
    let eps: Vec<_> = eps
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node}))
        .collect();
    json!({"kind": "EndpointSlice", "metadata": {"namespace": ns, "name": format!("{svc}-abc"),
        "labels": {"kubernetes.io/service-name": svc}}, "addressType": "IPv4",
        "endpoints": eps, "ports": [{"name": port_name, "port": port, "protocol": proto}]})
}

#[test]
fn redis_clusterip_matches_upstream_shapes() {
    let mut t = tracker_with(&[
        svc(
            "ns1",
            "svc1",
            json!({"clusterIP": "172.30.0.41", "ports": [{"name": "p80", "port": 80}]}),
        ),
        slice(
            "ns1",
            "svc1",
            "p80",
            80,
            "TCP",
            &[("10.180.0.1", "node1"), ("10.180.0.2", "node2")],
        ),
    ]);
    t.drain();
    let r = full_sync(&cfg(), t.state(), &node());
    let expected_nat = [
        "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
        "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
        "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ",
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x004000",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000",
        ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]",
        ":KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]",
    ];
    for l in expected_nat {
        assert!(
            r.text.lines().any(|x| x == l),
            "missing {l}\n---\n{}",
            r.text
        );
    }
    // The last KUBE-SERVICES rule in nat is the nodeports one.
    let nat = r.text.split("*nat").nth(1).unwrap();
    let last = nat
        .lines()
        .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
        .unwrap();
    assert!(last.contains("KUBE-NODEPORTS"));
    assert!(r.text.starts_with("*filter\n"));
    assert!(r.text.ends_with("COMMIT\n"));
    assert_eq!(r.active_nat_chains.len(), 3);
}

#[test]
fn three_endpoints_probabilities_and_no_endpoint_reject() {
    let mut t = tracker_with(&[
        svc(
            "a",
            "web",
            json!({"clusterIP": "10.96.0.5", "ports": [{"port": 80}]}),
        ),
        slice(
            "a",
            "web",
            "",
            8080,
            "TCP",
            &[
                ("10.244.1.2", "n"),
                ("10.244.1.3", "n"),
                ("10.244.1.4", "n"),
            ],
        ),
        svc(
            "a",
            "empty",
            json!({"clusterIP": "10.96.0.6", "type": "NodePort", "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30053}]}),
        ),
    ]);
    t.drain();
    let r = full_sync(&cfg(), t.state(), &node());
    let probs: Vec<&str> = r
        .text
        .lines()
        .filter(|l| l.contains("--probability"))
        .collect();
    assert_eq!(probs.len(), 2);
    assert!(probs[0].contains("0.3333333333"));
    assert!(probs[1].contains("0.5000000000"));
    assert!(r.text.contains("-A KUBE-SERVICES -m comment --comment \"a/empty has no endpoints\" -m udp -p udp -d 10.96.0.6 --dport 53 -j REJECT"));
    assert!(r.text.contains("-A KUBE-EXTERNAL-SERVICES -m comment --comment \"a/empty has no endpoints\" -m addrtype --dst-type LOCAL -m udp -p udp --dport 30053 -j REJECT"));
    // No nat rules for the empty service.
    assert!(
        !r.text
            .lines()
            .any(|l| l.contains("10.96.0.6") && l.contains("KUBE-SVC"))
    );
}

#[test]
fn partial_sync_rewrites_only_changed_services_and_deletes_stale_chains() {
    let mut t = tracker_with(&[
        svc(
            "a",
            "one",
            json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
        ),
        slice("a", "one", "", 80, "TCP", &[("10.244.1.2", "n")]),
        svc(
            "a",
            "two",
            json!({"clusterIP": "10.96.0.2", "ports": [{"port": 80}]}),
        ),
        slice("a", "two", "", 80, "TCP", &[("10.244.1.3", "n")]),
    ]);
    t.drain();
    let full = full_sync(&cfg(), t.state(), &node());
    assert_eq!(full.active_nat_chains.len(), 4);
    // Move service two's endpoint.
    let mut w = vec![];
    t.update_slice(
        &serde_json::from_value(slice("a", "two", "", 80, "TCP", &[("10.244.1.9", "n")])).unwrap(),
        &mut w,
    )
    .unwrap();
    let changes = t.drain();
    let partial = render(
        &cfg(),
        t.state(),
        &node(),
        Some(&changes.services),
        &full.active_nat_chains,
        &full.service_rule_counts,
        false,
    );
    let one_svc = service_chain_name(
        "KUBE-SVC-",
        &t.state().services.keys().next().unwrap().clone(),
    );
    assert!(
        !partial.text.contains(&format!(":{one_svc}")),
        "unchanged chain rewritten"
    );
    assert!(
        partial.text.contains(&one_svc),
        "KUBE-SERVICES still jumps to it"
    );
    let old_sep = full
        .active_nat_chains
        .iter()
        .find(|c| c.starts_with("KUBE-SEP") && !partial.active_nat_chains.contains(*c))
        .unwrap();
    assert!(partial.text.contains(&format!("-X {old_sep}")));
    assert_eq!(
        partial.rules_total[&RuleKind::IptablesNat],
        full.rules_total[&RuleKind::IptablesNat]
    );
    assert!(
        partial.rules_written[&RuleKind::IptablesNat] < full.rules_written[&RuleKind::IptablesNat]
    );
}

#[test]
fn affinity_nodeport_externalip_and_masquerade_all() {
    let mut t = tracker_with(&[
        svc(
            "a",
            "s",
            json!({"clusterIP": "10.96.0.7", "type": "NodePort", "externalIPs": ["203.0.113.9"],
            "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            "ports": [{"port": 80, "nodePort": 30080, "protocol": "SCTP"}]}),
        ),
        slice("a", "s", "", 80, "SCTP", &[("10.244.1.2", "n")]),
    ]);
    t.drain();
    let mut c = cfg();
    c.masquerade_all = true;
    let r = full_sync(&c, t.state(), &node());
    assert!(r.text.contains("-m recent --name KUBE-SEP-"));
    assert!(r.text.contains("--rcheck --seconds 60 --reap"));
    assert!(
        r.text
            .contains("--set -m sctp -p sctp -j DNAT --to-destination 10.244.1.2:80")
    );
    assert!(r.text.contains(
        "-A KUBE-NODEPORTS -m comment --comment a/s -m sctp -p sctp --dport 30080 -j KUBE-EXT-"
    ));
    assert!(
        r.text
            .contains("\"a/s external IP\" -m sctp -p sctp -d 203.0.113.9 --dport 80 -j KUBE-EXT-")
    );
    assert!(
        r.text.contains("--dport 80 -j KUBE-MARK-MASQ"),
        "masquerade-all marks all cluster IP traffic"
    );
    assert!(
        r.text
            .contains("\"masquerade traffic for a/s external destinations\" -j KUBE-MARK-MASQ")
    );
}

#[test]
fn nodeport_addresses_restrict_destinations() {
    let mut t = tracker_with(&[svc(
        "a",
        "s",
        json!({"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}),
    )]);
    t.drain();
    let mut c = cfg();
    c.node_port_addresses = NodePortAddresses {
        cidrs: vec!["198.18.0.0/24".parse().unwrap()],
    };
    let mut n = node();
    n.local_addresses = vec![
        "127.0.0.1".parse().unwrap(),
        "198.18.0.11".parse().unwrap(),
        "10.244.1.1".parse().unwrap(),
    ];
    let r = full_sync(&c, t.state(), &n);
    let np: Vec<&str> = r
        .text
        .lines()
        .filter(|l| l.ends_with("-j KUBE-NODEPORTS"))
        .collect();
    assert_eq!(np.len(), 1);
    assert!(np[0].contains("-d 198.18.0.11"));
    assert!(
        !r.text.contains("KUBE-FIREWALL"),
        "no localhost nodeports when 127/8 is out of scope"
    );
    // Default (match-all, localhost on): the martian drop is written.
    let r = full_sync(&cfg(), t.state(), &n);
    assert!(r.text.contains("-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8"));
}

#[test]
fn large_cluster_mode_drops_endpoint_comments() {
    let eps: Vec<(String, &str)> = (0..1001)
        .map(|i| (format!("10.245.{}.{}", i / 250, i % 250 + 1), "n"))
        .collect();
    let eps_ref: Vec<(&str, &str)> = eps.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    let mut t = tracker_with(&[
        svc(
            "a",
            "big",
            json!({"clusterIP": "10.96.0.8", "ports": [{"port": 80}]}),
        ),
        slice("a", "big", "", 80, "TCP", &eps_ref),
    ]);
    t.drain();
    let r = full_sync(&cfg(), t.state(), &node());
    assert!(
        !r.text
            .lines()
            .any(|l| l.starts_with("-A KUBE-SEP") && l.contains("comment"))
    );
    assert!(r.text.contains("\"a/big cluster IP\""));
}

#[test]
fn conflicting_node_ports_keep_the_first_and_warn() {
    let mut t = tracker_with(&[
        svc(
            "a",
            "first",
            json!({"clusterIP": "10.96.0.7", "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
        ),
        slice("a", "first", "", 80, "TCP", &[("10.244.1.2", "n")]),
        svc(
            "b",
            "second",
            json!({"clusterIP": "10.96.0.8", "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
        ),
        slice("b", "second", "", 80, "TCP", &[("10.244.1.3", "n")]),
    ]);
    t.drain();
    let r = full_sync(&cfg(), t.state(), &node());
    let np: Vec<&str> = r
        .text
        .lines()
        .filter(|l| l.contains("--dport 30080"))
        .collect();
    assert_eq!(np.len(), 1, "{np:?}");
    assert!(np[0].contains("a/first"));
    assert_eq!(r.warnings.len(), 1);
    assert!(
        r.warnings[0].contains("b/second") && r.warnings[0].contains("a/first"),
        "{:?}",
        r.warnings
    );
    // The loser's ClusterIP still works.
    assert!(r.text.contains("\"b/second cluster IP\""));
}
