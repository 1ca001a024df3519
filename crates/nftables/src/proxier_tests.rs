use super::*;
use kp_dataplane::{CommandOutput, LocalDetector, NodeInfo, NodePortAddresses, RecordingRunner};
use kp_model::{ChangeSet, ChangeTracker};
use serde_json::json;

fn cfg() -> NftConfig {
    NftConfig {
        family: IpFamily::V4,
        masquerade_bit: 14,
        masquerade_all: false,
        local_detector: LocalDetector::Cidrs(vec!["10.244.0.0/16".parse().unwrap()]),
        node_port_addresses: NodePortAddresses::default(),
        node_port_ips: vec![],
        localhost_node_ports: false,
        tcp_be_liberal: false,
        random_fully: true,
        ipvs: Default::default(),
    }
}

fn tracker(objs: &[serde_json::Value]) -> ChangeTracker {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    for o in objs {
        if o["kind"] == "Service" {
            t.update_service(&serde_json::from_value(o.clone()).unwrap(), &mut vec![])
                .unwrap();
        } else {
            t.update_slice(&serde_json::from_value(o.clone()).unwrap(), &mut vec![])
                .unwrap();
        }
    }
    t
}

fn svc(name: &str, ip: &str) -> serde_json::Value {
    json!({"kind": "Service", "metadata": {"namespace": "ns", "name": name},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80}]}})
}

fn slice(svc: &str, ips: &[&str]) -> serde_json::Value {
    let eps: Vec<_> = ips.iter().map(|ip| json!({"addresses": [ip]})).collect();
    json!({"kind": "EndpointSlice", "metadata": {"namespace": "ns", "name": format!("{svc}-1"),
        "labels": {"kubernetes.io/service-name": svc}}, "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}]})
}

fn nft_input(runner: &RecordingRunner) -> String {
    runner.inputs("nft", &["-f", "-"]).concat()
}

#[test]
fn full_sync_replaces_the_table_atomically_with_shared_pickers() {
    let runner = RecordingRunner::default();
    let mut p = NftProxier::new(runner.clone(), cfg());
    let mut t = tracker(&[
        svc("a", "10.96.0.1"),
        slice("a", &["10.244.1.2", "10.244.1.3"]),
    ]);
    let changes = t.drain();
    let node = NodeInfo::default();
    let r = p
        .sync(&SyncInput {
            state: t.state(),
            changes: &changes,
            node: &node,
            force_full: false,
        })
        .unwrap();
    assert!(r.full);
    let text = nft_input(&runner);
    let first: Vec<&str> = text.lines().take(3).collect();
    assert_eq!(
        first,
        [
            "add table ip kube-proxy",
            "delete table ip kube-proxy",
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }"
        ]
    );
    assert!(text.contains(
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }"
    ));
    // A shared picker chain, and the endpoints as map elements.
    assert!(
        text.contains("add rule ip kube-proxy pick-internal-tcp-2 meta l4proto tcp dnat ip addr . port to ip daddr . meta l4proto . tcp dport . numgen random mod 2 map @cluster-endpoints-tcp"),
        "{text}"
    );
    assert!(
        text.contains("add element ip kube-proxy cluster-endpoints-tcp { 10.96.0.1 . tcp . 80 . 0 : 10.244.1.2 . 8080, 10.96.0.1 . tcp . 80 . 1 : 10.244.1.3 . 8080 }"),
        "{text}"
    );
    assert!(
        !text.contains("kube-proxy endpoint-"),
        "no endpoint chains without affinity: {text}"
    );
    // Per-service chain names carry namespace/name.
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("add chain") && l.contains('/')),
        "no per-service chain on the shared path: {text}"
    );
    assert!(
        text.contains("add element ip kube-proxy hairpin-endpoints { 10.244.1.2 . 10.244.1.2, 10.244.1.3 . 10.244.1.3"),
        "{text}"
    );
    assert!(
        text.contains(
            "add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 : goto pick-internal-tcp-2 }"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "add rule ip kube-proxy pick-internal-tcp-2 ip saddr != 10.244.0.0/16 jump mark-for-masquerade"
        ),
        "{text}"
    );
    // No per-service anonymous numgen maps.
    assert!(!text.contains("vmap {"), "{text}");
}

#[test]
fn partial_sync_sends_only_the_difference_and_never_lists() {
    let runner = RecordingRunner::default();
    let mut p = NftProxier::new(runner.clone(), cfg());
    let mut objs = vec![];
    for i in 0..50 {
        objs.push(svc(&format!("s{i}"), &format!("10.96.0.{}", i + 1)));
        objs.push(slice(&format!("s{i}"), &[&format!("10.244.1.{}", i + 2)]));
    }
    let mut t = tracker(&objs);
    let changes = t.drain();
    let node = NodeInfo::default();
    p.sync(&SyncInput {
        state: t.state(),
        changes: &changes,
        node: &node,
        force_full: false,
    })
    .unwrap();
    let full_bytes = nft_input(&runner).len();
    runner.clear();
    // One endpoint of one service changes.
    t.update_slice(
        &serde_json::from_value(slice("s7", &["10.244.1.200"])).unwrap(),
        &mut vec![],
    )
    .unwrap();
    let changes = t.drain();
    let r = p
        .sync(&SyncInput {
            state: t.state(),
            changes: &changes,
            node: &node,
            force_full: false,
        })
        .unwrap();
    assert!(!r.full);
    let calls = runner.calls();
    assert_eq!(calls.len(), 1, "one nft call, no listing: {calls:?}");
    let text = nft_input(&runner);
    assert!(
        text.len() * 20 < full_bytes,
        "partial {} bytes vs full {full_bytes}",
        text.len()
    );
    assert!(
        !text.contains("10.244.1.3:8080"),
        "other services untouched:\n{text}"
    );
    // Data only: the slot's value is replaced in place, no chain or rule is written.
    assert!(
        text.contains("delete element ip kube-proxy cluster-endpoints-tcp { 10.96.0.8 . tcp . 80 . 0 }\n")
            && text.contains("add element ip kube-proxy cluster-endpoints-tcp { 10.96.0.8 . tcp . 80 . 0 : 10.244.1.200 . 8080 }"),
        "{text}"
    );
    assert!(
        !text.contains(" chain ") && !text.contains("add rule"),
        "{text}"
    );
    assert!(
        text.contains("delete element ip kube-proxy hairpin-endpoints { 10.244.1.9 . 10.244.1.9 }"),
        "{text}"
    );
    assert!(
        text.contains(
            "add element ip kube-proxy hairpin-endpoints { 10.244.1.200 . 10.244.1.200 }"
        ),
        "{text}"
    );
    // A second endpoint: the entry moves to the two-endpoint picker, created on first
    // use and deleted again when nothing uses it.
    for (ips, picker_added, picker_deleted) in [
        (&["10.244.1.200", "10.244.1.201"][..], true, false),
        (&["10.244.1.200"][..], false, true),
    ] {
        runner.clear();
        t.update_slice(
            &serde_json::from_value(slice("s7", ips)).unwrap(),
            &mut vec![],
        )
        .unwrap();
        let changes = t.drain();
        p.sync(&SyncInput {
            state: t.state(),
            changes: &changes,
            node: &node,
            force_full: false,
        })
        .unwrap();
        let text = nft_input(&runner);
        assert_eq!(
            text.contains("add chain ip kube-proxy pick-internal-tcp-2\n"),
            picker_added,
            "{text}"
        );
        assert_eq!(
            text.contains("delete chain ip kube-proxy pick-internal-tcp-2\n"),
            picker_deleted,
            "{text}"
        );
        let goto = format!("goto pick-internal-tcp-{}", ips.len());
        assert!(
            text.contains(&format!(
                "add element ip kube-proxy service-ips {{ 10.96.0.8 . tcp . 80 : {goto} }}"
            )),
            "{text}"
        );
    }
    // Nothing changed: nothing sent.
    runner.clear();
    p.sync(&SyncInput {
        state: t.state(),
        changes: &ChangeSet::default(),
        node: &node,
        force_full: false,
    })
    .unwrap();
    assert!(runner.calls().is_empty());
}

#[test]
fn failed_transaction_reports_the_line_and_forces_full_sync() {
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f2 = fail.clone();
    let runner = RecordingRunner::new(move |_| {
        if f2.load(std::sync::atomic::Ordering::SeqCst) {
            CommandOutput {
                status: 1,
                stdout: String::new(),
                stderr: "/dev/stdin:2:1-5: Error: Could not process rule".into(),
            }
        } else {
            CommandOutput::default()
        }
    });
    let mut p = NftProxier::new(runner.clone(), cfg());
    let mut t = tracker(&[svc("a", "10.96.0.1"), slice("a", &["10.244.1.2"])]);
    let changes = t.drain();
    let node = NodeInfo::default();
    p.sync(&SyncInput {
        state: t.state(),
        changes: &changes,
        node: &node,
        force_full: false,
    })
    .unwrap();
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    t.update_slice(
        &serde_json::from_value(slice("a", &["10.244.1.9"])).unwrap(),
        &mut vec![],
    )
    .unwrap();
    let changes = t.drain();
    let err = p
        .sync(&SyncInput {
            state: t.state(),
            changes: &changes,
            node: &node,
            force_full: false,
        })
        .unwrap_err();
    match err {
        SyncError::Apply { tool, line, .. } => {
            assert_eq!(tool, kp_dataplane::Applier::Nft);
            assert!(line.is_some());
        }
        other => panic!("{other}"),
    }
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let r = p
        .sync(&SyncInput {
            state: t.state(),
            changes: &ChangeSet::default(),
            node: &node,
            force_full: false,
        })
        .unwrap();
    assert!(r.full, "a failure is followed by a full sync");
}

#[test]
fn hostile_names_never_reach_nft() {
    // Names the API server would refuse are rejected by the model; names it accepts only
    // hold [a-z0-9-.], so every object name passes the second check too.
    let mut t = ChangeTracker::new(IpFamily::V4, "n");
    let bad = json!({"kind": "Service", "metadata": {"namespace": "ns", "name": "x\"; flush ruleset; \""},
        "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}});
    assert!(
        t.update_service(&serde_json::from_value(bad).unwrap(), &mut vec![])
            .is_err()
    );
    let runner = RecordingRunner::default();
    let mut p = NftProxier::new(runner.clone(), cfg());
    let long = "a".repeat(63);
    let mut t = tracker(&[svc(&long, "10.96.0.1"), slice(&long, &["10.244.1.2"])]);
    let changes = t.drain();
    let node = NodeInfo::default();
    let r = p
        .sync(&SyncInput {
            state: t.state(),
            changes: &changes,
            node: &node,
            force_full: false,
        })
        .unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let text = nft_input(&runner);
    assert!(!text.contains("flush ruleset"));
    for line in text.lines() {
        assert!(
            !line.contains(';') || line.contains('{'),
            "only declarations use ';': {line}"
        );
    }
}

fn big_state(n: usize) -> ChangeTracker {
    let mut objs = Vec::new();
    let ips: Vec<Vec<String>> = (0..n)
        .map(|i| {
            (0..10)
                .map(|e| format!("10.244.{}.{}", i % 250, e + 2))
                .collect()
        })
        .collect();
    for (i, eps) in ips.iter().enumerate() {
        let name = format!("s{i}");
        objs.push(svc(&name, &format!("10.96.{}.{}", i / 250, i % 250 + 1)));
        let refs: Vec<&str> = eps.iter().map(|s| s.as_str()).collect();
        objs.push(slice(&name, &refs));
    }
    tracker(&objs)
}

fn full_sync_calls(table_present: bool) -> Vec<String> {
    let runner = RecordingRunner::new(move |c| CommandOutput {
        status: 0,
        stdout: if table_present && c.args.first().map(String::as_str) == Some("list") {
            "table ip kube-proxy {\n\tchain nat-prerouting {\n\t\tjump services\n\t}\n}\n".into()
        } else {
            String::new()
        },
        stderr: String::new(),
    });
    let mut p = NftProxier::new(runner.clone(), cfg()).with_transaction_statements(5);
    let mut t = big_state(300);
    let changes = t.drain();
    let node = NodeInfo::default();
    p.sync(&SyncInput {
        state: t.state(),
        changes: &changes,
        node: &node,
        force_full: false,
    })
    .unwrap();
    runner.inputs("nft", &["-f", "-"])
}

#[test]
fn cold_full_sync_is_split_into_bounded_transactions() {
    let parts = full_sync_calls(false);
    assert!(parts.len() > 1, "{} transactions", parts.len());
    assert!(parts[0].starts_with("add table ip kube-proxy\n"));
    for p in &parts {
        let statements = p.lines().filter(|l| !l.starts_with('#')).count();
        assert!(statements <= 5, "{statements}");
    }
    // Every object is created before anything refers to it: the chain of each rule and
    // each goto target was added in this or an earlier transaction.
    let mut chains = std::collections::HashSet::new();
    for line in parts.iter().flat_map(|p| p.lines()) {
        let w: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with("add chain") {
            chains.insert(w[4].to_string());
        } else if line.starts_with("add rule") {
            assert!(chains.contains(w[4]), "rule before its chain: {line}");
        }
        if let Some(pos) = w.iter().position(|t| *t == "goto" || *t == "jump") {
            let target = w[pos + 1].trim_end_matches([',', '}']);
            assert!(chains.contains(target), "reference before target: {line}");
        }
    }
}

#[test]
fn full_sync_over_an_existing_table_stays_one_transaction() {
    let parts = full_sync_calls(true);
    assert_eq!(parts.len(), 1);
    assert!(parts[0].lines().count() > 5);
}
