use std::sync::{Arc, Mutex};

use super::*;
use crate::kernel::FakeIpvs;
use crate::link::FakeDevice;
use crate::test_fixtures::{slice, svc, tracker};
use kp_dataplane::{CommandOutput, LocalDetector, NodeInfo, RecordedCall, RecordingRunner};
use kp_model::ChangeTracker;
use serde_json::json;

/// The fake IPVS, shared with the test.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<FakeIpvs>>);

impl IpvsKernel for Shared {
    fn virtual_servers(&mut self) -> Result<Vec<KernelVs>, String> {
        self.0.lock().unwrap().virtual_servers()
    }
    fn real_servers(&mut self, vs: &VsKey) -> Result<Vec<KernelRs>, String> {
        self.0.lock().unwrap().real_servers(vs)
    }
    fn apply(&mut self, ops: &[Op]) -> Vec<(usize, String)> {
        self.0.lock().unwrap().apply(ops)
    }
    fn set_timeouts(&mut self, tcp: u32, tcp_fin: u32, udp: u32) -> Result<(), String> {
        self.0.lock().unwrap().set_timeouts(tcp, tcp_fin, udp)
    }
}

fn cfg() -> DataplaneConfig {
    DataplaneConfig {
        local_detector: LocalDetector::Cidrs(vec!["10.244.0.0/16".parse().unwrap()]),
        ..DataplaneConfig::for_cleanup(IpFamily::V4)
    }
}

type Device = Arc<Mutex<FakeDevice>>;

fn runner() -> RecordingRunner {
    RecordingRunner::new(|_: &RecordedCall| CommandOutput::default())
}

/// A kube-ipvs0 that holds `bound`, or is missing.
fn device(bound: Option<&[&str]>) -> Device {
    let d = FakeDevice {
        present: bound.is_some(),
        addresses: bound
            .unwrap_or_default()
            .iter()
            .map(|s| s.parse().unwrap())
            .collect(),
        changes: vec![],
    };
    Arc::new(Mutex::new(d))
}

fn proxier_with(
    r: &RecordingRunner,
    ipvs: &Shared,
    dev: &Device,
    c: DataplaneConfig,
) -> IpvsProxier<RecordingRunner> {
    let k = ipvs.clone();
    IpvsProxier::new(
        r.clone(),
        c,
        Box::new(move || Ok(Box::new(k.clone()))),
        Box::new(dev.clone()),
    )
}

fn proxier(r: &RecordingRunner, ipvs: &Shared, dev: &Device) -> IpvsProxier<RecordingRunner> {
    proxier_with(r, ipvs, dev, cfg())
}

fn vip_changes(dev: &Device) -> Vec<(Vec<String>, Vec<String>)> {
    let s = |v: &Vec<IpAddr>| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
    dev.lock()
        .unwrap()
        .changes
        .iter()
        .map(|(a, d)| (s(a), s(d)))
        .collect()
}

fn sync(p: &mut IpvsProxier<RecordingRunner>, t: &mut ChangeTracker) -> SyncReport {
    let changes = t.drain();
    let node = NodeInfo {
        local_addresses: vec!["198.18.0.11".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        ..Default::default()
    };
    p.sync(&SyncInput {
        state: t.state(),
        changes: &changes,
        node: &node,
        force_full: false,
    })
    .unwrap()
}

fn objects() -> Vec<serde_json::Value> {
    vec![
        svc(
            "web",
            "10.96.0.10",
            json!({"type": "NodePort",
                "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30080}]}),
        ),
        slice(
            "web",
            &[("10.244.1.2", "node1"), ("10.244.2.2", "node2")],
            "TCP",
        ),
    ]
}

fn key(ip: &str, port: u16, protocol: Protocol) -> VsKey {
    VsKey {
        addr: ip.parse().unwrap(),
        protocol,
        port,
    }
}

fn weights(ipvs: &Shared, k: &VsKey) -> Vec<(String, i32)> {
    ipvs.0.lock().unwrap().services[k]
        .1
        .values()
        .map(|r| (r.addr.to_string(), r.weight))
        .collect()
}

#[test]
fn first_sync_writes_sets_then_rules_then_ipvs_then_vips() {
    let r = runner();
    let ipvs = Shared::default();
    let dev = device(None);
    let mut p = proxier(&r, &ipvs, &dev);
    let mut t = tracker(&objects());
    let report = sync(&mut p, &mut t);
    assert!(report.full);
    assert!(dev.lock().unwrap().present, "kube-ipvs0 created");
    let calls = r.calls();
    let pos = |f: &dyn Fn(&RecordedCall) -> bool| calls.iter().position(f);
    let sets = pos(&|c| c.program == "ipset" && c.args == ["restore", "-exist"]).unwrap();
    let rules = pos(&|c| c.program == "iptables-restore").unwrap();
    assert!(sets < rules, "{calls:#?}");
    let script = calls[sets].stdin.clone().unwrap();
    assert!(script.contains(
        "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 comment\n"
    ));
    assert!(script.contains("add KUBE-CLUSTER-IP 10.96.0.10,tcp:80 comment"));
    assert!(script.contains("add KUBE-NODE-PORT-TCP 30080 comment"));
    assert_eq!(
        vip_changes(&dev),
        [(vec!["10.96.0.10".to_string()], vec![])]
    );
    // Virtual servers for the ClusterIP and the node's address (not loopback).
    let f = ipvs.0.lock().unwrap();
    let keys: Vec<String> = f.services.keys().map(|k| k.to_string()).collect();
    assert_eq!(keys, ["10.96.0.10:80/TCP", "198.18.0.11:30080/TCP"]);
    drop(f);
    assert_eq!(
        weights(&ipvs, &key("10.96.0.10", 80, Protocol::Tcp)),
        [
            ("10.244.1.2:8080".to_string(), 1),
            ("10.244.2.2:8080".to_string(), 1)
        ]
    );
    assert_eq!(report.rules_total[&RuleKind::IpvsVirtualServers], 2);
    assert_eq!(report.rules_total[&RuleKind::IpvsRealServers], 4);
}

#[test]
fn a_change_costs_what_changed_and_removed_tcp_endpoints_drain() {
    let r = runner();
    let ipvs = Shared::default();
    let dev = device(Some(&[]));
    let mut p = proxier(&r, &ipvs, &dev);
    let mut t = tracker(&objects());
    sync(&mut p, &mut t);
    let gone = "10.244.2.2:8080".parse().unwrap();
    // node2's endpoint has open connections through the ClusterIP only.
    ipvs.0
        .lock()
        .unwrap()
        .services
        .get_mut(&key("10.96.0.10", 80, Protocol::Tcp))
        .unwrap()
        .1
        .get_mut(&gone)
        .unwrap()
        .active_conns = 3;
    ipvs.0.lock().unwrap().applied.clear();
    r.clear();
    // node2's endpoint goes away.
    t.update_slice(
        &serde_json::from_value(slice("web", &[("10.244.1.2", "node1")], "TCP")).unwrap(),
        &mut vec![],
    )
    .unwrap();
    let report = sync(&mut p, &mut t);
    assert!(!report.full);
    let ops = ipvs.0.lock().unwrap().applied.clone();
    // Weight 0 on both virtual servers at once; the idle one is deleted in the same
    // sync, the busy one drains.
    assert_eq!(
        ops,
        [
            Op::UpdateRs(key("10.96.0.10", 80, Protocol::Tcp), gone, 0),
            Op::UpdateRs(key("198.18.0.11", 30080, Protocol::Tcp), gone, 0),
            Op::DelRs(key("198.18.0.11", 30080, Protocol::Tcp), gone),
        ]
    );
    // No tool ran: node2's endpoint was never in KUBE-LOOP-BACK and the rules are the same.
    assert!(r.calls().is_empty(), "{:#?}", r.calls());
    assert!(!p.needs_full_sync_without_drift_for_tests());
    assert_eq!(p.draining(), [(key("10.96.0.10", 80, Protocol::Tcp), gone)]);
    assert_eq!(
        weights(&ipvs, &key("10.96.0.10", 80, Protocol::Tcp)),
        [
            ("10.244.1.2:8080".to_string(), 1),
            ("10.244.2.2:8080".to_string(), 0)
        ]
    );
    // Its connections end: deleted at the next check.
    ipvs.0
        .lock()
        .unwrap()
        .services
        .get_mut(&key("10.96.0.10", 80, Protocol::Tcp))
        .unwrap()
        .1
        .get_mut(&gone)
        .unwrap()
        .active_conns = 0;
    p.needs_full_sync_without_drift_for_tests();
    assert!(p.draining().is_empty());
    assert_eq!(
        weights(&ipvs, &key("10.96.0.10", 80, Protocol::Tcp)),
        [("10.244.1.2:8080".to_string(), 1)]
    );
}

#[test]
fn udp_real_servers_are_deleted_at_once_and_a_deleted_service_unbinds_its_vip() {
    let r = runner();
    let ipvs = Shared::default();
    let dev = device(Some(&[]));
    let mut p = proxier(&r, &ipvs, &dev);
    let mut t = tracker(&[
        svc(
            "dns",
            "10.96.0.53",
            json!({"ports": [{"name": "p", "port": 53, "protocol": "UDP"}]}),
        ),
        slice(
            "dns",
            &[("10.244.1.2", "node1"), ("10.244.2.2", "node2")],
            "UDP",
        ),
    ]);
    sync(&mut p, &mut t);
    t.update_slice(
        &serde_json::from_value(slice("dns", &[("10.244.1.2", "node1")], "UDP")).unwrap(),
        &mut vec![],
    )
    .unwrap();
    ipvs.0.lock().unwrap().applied.clear();
    sync(&mut p, &mut t);
    let k = key("10.96.0.53", 53, Protocol::Udp);
    assert_eq!(
        ipvs.0.lock().unwrap().applied,
        [Op::DelRs(k, "10.244.2.2:8080".parse().unwrap())]
    );
    r.clear();
    t.delete_service("ns", "dns");
    sync(&mut p, &mut t);
    assert!(ipvs.0.lock().unwrap().services.is_empty());
    assert_eq!(
        vip_changes(&dev).last().unwrap(),
        &(vec![], vec!["10.96.0.53".to_string()])
    );
}

#[test]
fn restart_corrects_weights_and_keeps_what_it_finds() {
    // What an earlier run left: the VS with one real server still draining at weight 0
    // that is back in the endpoints, and a stale one.
    let ipvs = Shared::default();
    let k = key("10.96.0.10", 80, Protocol::Tcp);
    {
        let mut f = ipvs.0.lock().unwrap();
        f.apply(&[
            Op::AddVs(KernelVs {
                key: k,
                scheduler: "rr".into(),
                flags: FLAG_HASHED,
                timeout: 0,
            }),
            Op::AddRs(k, "10.244.1.2:8080".parse().unwrap(), 0),
            Op::AddRs(k, "10.244.2.2:8080".parse().unwrap(), 1),
            Op::AddRs(k, "10.244.9.9:8080".parse().unwrap(), 1),
        ]);
        f.applied.clear();
    }
    let r = runner();
    let dev = device(Some(&["10.96.0.10"]));
    let mut p = proxier(&r, &ipvs, &dev);
    let mut t = tracker(&objects());
    sync(&mut p, &mut t);
    let ops = ipvs.0.lock().unwrap().applied.clone();
    // No re-add of the VS (only its flags from the kernel differ), weight 1 again for the
    // one that is back, weight 0 for the stale one, and the NodePort VS is new.
    assert!(
        ops.contains(&Op::UpdateRs(k, "10.244.1.2:8080".parse().unwrap(), 1)),
        "{ops:?}"
    );
    assert!(
        ops.contains(&Op::UpdateRs(k, "10.244.9.9:8080".parse().unwrap(), 0)),
        "{ops:?}"
    );
    assert!(
        !ops.iter().any(|o| matches!(o, Op::AddVs(v) if v.key == k)),
        "{ops:?}"
    );
    assert!(!ops.iter().any(|o| matches!(o, Op::DelVs(_))), "{ops:?}");
    // kube-ipvs0 already held the ClusterIP: no address change.
    assert!(vip_changes(&dev).is_empty());
}

#[test]
fn kernel_refusals_fail_the_sync_and_the_next_one_is_full() {
    let r = runner();
    let ipvs = Shared::default();
    ipvs.0.lock().unwrap().fail_matching = Some("10.244.2.2".into());
    let dev = device(Some(&[]));
    let mut p = proxier(&r, &ipvs, &dev);
    let mut t = tracker(&objects());
    let changes = t.drain();
    let node = NodeInfo::default();
    let err = p
        .sync(&SyncInput {
            state: t.state(),
            changes: &changes,
            node: &node,
            force_full: false,
        })
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("1 of 3 IPVS changes failed")
            && msg.contains("add real server 10.244.2.2:8080 weight 1 to 10.96.0.10:80/TCP"),
        "{msg}"
    );
    assert!(p.needs_full_sync());
    // The VIP was not bound: it would answer without all of its backends.
    assert!(vip_changes(&dev).is_empty());
}

#[test]
fn rules_follow_upstream_shapes() {
    let mut sets = SetContents::new();
    for s in Set::ALL {
        sets.entry(s).or_default();
    }
    sets.get_mut(&Set::ClusterIp)
        .unwrap()
        .insert("10.96.0.1,tcp:443".into());
    sets.get_mut(&Set::NodePortTcp)
        .unwrap()
        .insert("30080".into());
    let r = rules::render(&cfg(), &sets, &Default::default());
    let expected = [
        "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN",
        "-A KUBE-NODE-PORT -p tcp -m comment --comment \"Kubernetes nodeport TCP port for masquerade purpose\" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ",
        "-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
        "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x004000",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000",
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT",
    ];
    let lines: Vec<&str> = r.text.lines().collect();
    let mut at = 0;
    for e in expected {
        let i = lines[at..]
            .iter()
            .position(|l| *l == e)
            .unwrap_or_else(|| panic!("{e}\nnot after line {at} of\n{}", r.text));
        at += i;
    }
    // Sets without members get no jump.
    assert!(!r.text.contains("KUBE-LOOP-BACK dst,dst,src"), "{}", r.text);
}

#[test]
fn conn_reuse_mode_only_on_kernels_with_the_stall() {
    assert!(!conn_reuse_mode_needs_zero("4.0.9"));
    assert!(conn_reuse_mode_needs_zero("4.19.0-25-amd64"));
    assert!(conn_reuse_mode_needs_zero("5.8.18"));
    assert!(!conn_reuse_mode_needs_zero("5.9.0"));
    assert!(!conn_reuse_mode_needs_zero("6.1.0-57-amd64"));
}

#[test]
fn a_drain_ends_at_its_bound_even_with_connections_left() {
    let r = runner();
    let ipvs = Shared::default();
    let mut c = cfg();
    c.ipvs.drain_timeout = Duration::ZERO;
    let mut p = proxier_with(&r, &ipvs, &device(Some(&[])), c);
    let mut t = tracker(&objects());
    sync(&mut p, &mut t);
    let gone: SocketAddr = "10.244.2.2:8080".parse().unwrap();
    let cluster = key("10.96.0.10", 80, Protocol::Tcp);
    ipvs.0
        .lock()
        .unwrap()
        .services
        .get_mut(&cluster)
        .unwrap()
        .1
        .get_mut(&gone)
        .unwrap()
        .active_conns = 7;
    t.update_slice(
        &serde_json::from_value(slice("web", &[("10.244.1.2", "node1")], "TCP")).unwrap(),
        &mut vec![],
    )
    .unwrap();
    sync(&mut p, &mut t);
    assert!(p.draining().is_empty());
    assert_eq!(
        weights(&ipvs, &cluster),
        [("10.244.1.2:8080".to_string(), 1)]
    );
}

#[test]
fn virtual_servers_in_exclude_cidrs_are_left_alone() {
    // Someone else's virtual server (a host-network load balancer, say) and a stale one.
    let ipvs = Shared::default();
    let theirs = key("192.168.50.5", 443, Protocol::Tcp);
    let stale = key("10.96.7.7", 80, Protocol::Tcp);
    for k in [theirs, stale] {
        ipvs.0.lock().unwrap().apply(&[Op::AddVs(KernelVs {
            key: k,
            scheduler: "wlc".into(),
            flags: 0,
            timeout: 0,
        })]);
    }
    let mut c = cfg();
    c.ipvs.exclude_cidrs = vec!["192.168.50.0/24".parse().unwrap()];
    let mut p = proxier_with(&runner(), &ipvs, &device(Some(&[])), c);
    let mut t = tracker(&objects());
    sync(&mut p, &mut t);
    let f = ipvs.0.lock().unwrap();
    assert!(f.services.contains_key(&theirs), "excluded VS deleted");
    assert!(!f.services.contains_key(&stale), "stale VS kept");
    assert_eq!(
        f.services[&theirs].0.scheduler, "wlc",
        "excluded VS changed"
    );
}
