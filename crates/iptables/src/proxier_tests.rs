use super::*;
use kp_dataplane::{CommandOutput, LocalDetector, NodeInfo, NodePortAddresses, RecordingRunner};
use kp_model::{ChangeSet, ChangeTracker, ProxyState};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

fn cfg() -> IptablesConfig {
    IptablesConfig {
        family: IpFamily::V4,
        masquerade_bit: 14,
        masquerade_all: false,
        local_detector: LocalDetector::None,
        node_port_addresses: NodePortAddresses::default(),
        localhost_node_ports: false,
        tcp_be_liberal: false,
        random_fully: true,
        ipvs: Default::default(),
        node_port_ips: vec![],
    }
}

fn state_with_services(services: usize, endpoints: usize) -> (ProxyState, ChangeSet) {
    let mut t = ChangeTracker::new(IpFamily::V4, "n");
    for i in 0..services {
        let svc = serde_json::json!({"metadata": {"namespace": "a", "name": format!("s{i}")},
            "spec": {"clusterIP": format!("10.96.{}.{}", i / 256, i % 256), "ports": [{"port": 80}]}});
        let eps: Vec<_> = (0..endpoints)
            .map(|e| serde_json::json!({"addresses": [format!("10.{}.{}.{}", 100 + i / 256, i % 256, e + 1)]}))
            .collect();
        let slice = serde_json::json!({"metadata": {"namespace": "a", "name": format!("s{i}-x"),
            "labels": {"kubernetes.io/service-name": format!("s{i}")}}, "addressType": "IPv4",
            "endpoints": eps, "ports": [{"port": 8080, "protocol": "TCP"}]});
        t.update_service(&serde_json::from_value(svc).unwrap(), &mut vec![])
            .unwrap();
        t.update_slice(&serde_json::from_value(slice).unwrap(), &mut vec![])
            .unwrap();
    }
    let c = t.drain();
    (t.state().clone(), c)
}

fn state_with_service() -> (ProxyState, ChangeSet) {
    let mut t = ChangeTracker::new(IpFamily::V4, "n");
    let svc = serde_json::json!({"metadata": {"namespace": "a", "name": "s"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}});
    t.update_service(&serde_json::from_value(svc).unwrap(), &mut vec![])
        .unwrap();
    let c = t.drain();
    (t.state().clone(), c)
}

#[test]
fn failed_restore_is_reported_with_its_line_and_forces_a_full_sync() {
    let restores = Arc::new(AtomicUsize::new(0));
    let r2 = restores.clone();
    let runner = RecordingRunner::new(move |call| {
        if call.program == "iptables-restore" && r2.fetch_add(1, Ordering::SeqCst) == 1 {
            return CommandOutput {
                status: 1,
                stdout: String::new(),
                stderr: "iptables-restore: line 3 failed\n".into(),
            };
        }
        CommandOutput::default()
    });
    let mut p = IptablesProxier::new(runner.clone(), cfg());
    let (state, changes) = state_with_service();
    let node = NodeInfo::default();
    let input = SyncInput {
        state: &state,
        changes: &changes,
        node: &node,
        force_full: false,
    };
    // First sync is full: jumps are ensured, the table is listed once.
    let r = p.sync(&input).unwrap();
    assert!(r.full);
    assert!(runner.calls().iter().any(|c| c.program == "iptables-save"));
    runner.clear();
    // Second sync (partial) fails: error names the line; no partial state remembered.
    let err = p.sync(&input).unwrap_err();
    let sent = runner.inputs(
        "iptables-restore",
        &["-w", "5", "-W", "100000", "--noflush", "--counters"],
    );
    let third_line = sent[0].lines().nth(2).unwrap();
    assert!(third_line.starts_with(":KUBE-"), "{third_line}");
    match err {
        SyncError::Apply { tool, line, .. } => {
            assert_eq!(tool, Applier::IptablesRestore);
            assert_eq!(line.as_deref(), Some(third_line));
        }
        other => panic!("{other}"),
    }
    assert!(
        !runner.calls().iter().any(|c| c.program == "iptables-save"),
        "partial sync must not list the table"
    );
    runner.clear();
    // Third sync is full again.
    let r = p.sync(&input).unwrap();
    assert!(r.full);
    assert!(runner.calls().iter().any(|c| c.program == "iptables-save"));
}

#[test]
fn one_restore_per_sync_with_noflush_and_wait_flags() {
    let runner = RecordingRunner::default();
    let mut p = IptablesProxier::new(runner.clone(), cfg());
    let (state, changes) = state_with_service();
    let node = NodeInfo::default();
    p.sync(&SyncInput {
        state: &state,
        changes: &changes,
        node: &node,
        force_full: false,
    })
    .unwrap();
    runner.clear();
    p.sync(&SyncInput {
        state: &state,
        changes: &ChangeSet::default(),
        node: &node,
        force_full: false,
    })
    .unwrap();
    let calls = runner.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].program, "iptables-restore");
    assert_eq!(
        calls[0].args,
        ["-w", "5", "-W", "100000", "--noflush", "--counters"]
    );
}

#[test]
fn large_restores_with_iptables_nft_cache_the_whole_nat_table_first() {
    const RESTORE: &[&str] = &["-w", "5", "-W", "100000", "--noflush", "--counters"];
    for (version, nft) in [
        ("iptables v1.8.9 (nf_tables)\n", true),
        ("iptables v1.8.9 (legacy)\n", false),
    ] {
        let runner = RecordingRunner::new(move |call| CommandOutput {
            stdout: if call.args == ["--version"] {
                version.into()
            } else {
                String::new()
            },
            ..CommandOutput::default()
        });
        // 300 services x 10 endpoints declare 3,300 nat chains; one service 11.
        let (big, big_changes) = state_with_services(300, 10);
        let (small, small_changes) = state_with_services(1, 10);
        let node = NodeInfo::default();
        let none = ChangeSet::default();
        let sync = |p: &mut IptablesProxier<RecordingRunner>, state, changes, force_full| {
            p.sync(&SyncInput {
                state,
                changes,
                node: &node,
                force_full,
            })
            .unwrap();
        };
        let mut p = IptablesProxier::new(runner.clone(), cfg());
        sync(&mut p, &big, &big_changes, false); // full
        sync(&mut p, &big, &none, false); // partial, nothing rewritten
        sync(&mut p, &big, &big_changes, false); // partial, all 300 rewritten
        let mut q = IptablesProxier::new(runner.clone(), cfg());
        sync(&mut q, &small, &small_changes, false); // full, small
        let sent = runner.inputs("iptables-restore", RESTORE);
        let listing: Vec<bool> = sent.iter().map(|t| t.contains("*nat\n-S\n")).collect();
        assert_eq!(listing, [nft, false, nft, false], "{version}");
        let lines = sent
            .iter()
            .map(|t| t.matches("-S\n").count())
            .sum::<usize>();
        assert_eq!(lines, 2 * nft as usize);
        let version_checks = runner
            .calls()
            .iter()
            .filter(|c| c.args == ["--version"])
            .count();
        assert_eq!(version_checks, 2, "asked once per proxier");
    }
}

#[test]
fn missing_canary_forces_full_sync() {
    let runner = RecordingRunner::new(|call| {
        if call.args.iter().any(|a| a == "-S")
            && call.args.iter().any(|a| a == "nat")
            && !call.args.iter().any(|a| a == "-N")
        {
            CommandOutput {
                status: 1,
                stdout: String::new(),
                stderr: "No chain/target/match by that name.".into(),
            }
        } else {
            CommandOutput::default()
        }
    });
    let mut p = IptablesProxier::new(runner, cfg());
    let (state, changes) = state_with_service();
    let node = NodeInfo::default();
    p.sync(&SyncInput {
        state: &state,
        changes: &changes,
        node: &node,
        force_full: false,
    })
    .unwrap();
    assert!(p.needs_full_sync());
}
#[test]
fn written_rules_follow_restores_and_find_what_others_removed() {
    let mut w = WrittenRules::default();
    w.apply(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-A1 - [0:0]\n\
         -A KUBE-SERVICES -d 10.0.0.1/32 -j KUBE-SVC-A\n-A KUBE-SVC-A -j KUBE-SEP-A1\n\
         -A KUBE-SEP-A1 -p tcp -j DNAT --to-destination 10.1.0.1:80\nCOMMIT\n",
    );
    let kernel = ":PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n\
                  :KUBE-SEP-A1 - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n\
                  -A KUBE-SERVICES -d 10.0.0.1/32 -j KUBE-SVC-A\n-A KUBE-SVC-A -j KUBE-SEP-A1\n\
                  -A KUBE-SEP-A1 -p tcp -j DNAT --to-destination 10.1.0.1:80\n";
    assert_eq!(w.missing("nat", kernel), None);
    assert_eq!(w.missing("filter", ""), None, "nothing written there");
    // Someone else's extra rule is not drift.
    let extra = format!("{kernel}-A KUBE-SERVICES -j ACCEPT\n");
    assert_eq!(w.missing("nat", &extra), None);
    // A flushed chain, then a deleted one (with its jump).
    let flushed = kernel.replace(
        "-A KUBE-SEP-A1 -p tcp -j DNAT --to-destination 10.1.0.1:80\n",
        "",
    );
    assert_eq!(
        w.missing("nat", &flushed).as_deref(),
        Some("nat chain KUBE-SEP-A1 holds 0 of our 1 rules")
    );
    let deleted = flushed
        .replace(":KUBE-SEP-A1 - [0:0]\n", "")
        .replace("-A KUBE-SVC-A -j KUBE-SEP-A1\n", "");
    assert!(w.missing("nat", &deleted).unwrap().contains("gone"));
    // A partial restore that rewrites one chain and deletes another.
    w.apply("*nat\n:KUBE-SVC-A - [0:0]\n-X KUBE-SEP-A1\nCOMMIT\n");
    assert_eq!(w.missing("nat", &deleted), None);
}
