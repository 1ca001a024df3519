//! Transactions written by kp-nftables itself (full and partial syncs, ip and ip6):
//! `nft -f` in namespace A, NetlinkApplier in namespace B, `nft list table` must match.

mod common;
use common::*;

use kp_dataplane::{
    Dataplane, LocalDetector, NodeInfo, NodePortAddresses, RecordingRunner, SyncInput,
};
use kp_model::{ChangeTracker, IpFamily};
use kp_nftables::{NftConfig, NftProxier};
use kp_nftnl::NetlinkApplier;
use serde_json::{Value, json};

struct Fam {
    family: IpFamily,
    nft: &'static str,
    addr_type: &'static str,
    cidr: &'static str,
    svc_ip: fn(u32) -> String,
    pod_ip: fn(u32) -> String,
}

const V4: Fam = Fam {
    family: IpFamily::V4,
    nft: "ip",
    addr_type: "IPv4",
    cidr: "10.244.0.0/16",
    svc_ip: |i| format!("10.{}.{}.{}", 96 + i / 50000, (i / 250) % 200, i % 250 + 1),
    pod_ip: |i| format!("10.244.{}.{}", (i / 250) % 250, i % 250 + 2),
};
const V6: Fam = Fam {
    family: IpFamily::V6,
    nft: "ip6",
    addr_type: "IPv6",
    cidr: "fd00:10:244::/48",
    svc_ip: |i| format!("fd00:10:96::{:x}", i + 1),
    pod_ip: |i| format!("fd00:10:244::{:x}", i + 2),
};

fn service(f: &Fam, i: u32, kind: u32) -> Value {
    let ip = (f.svc_ip)(i);
    let proto = ["TCP", "UDP", "SCTP"][(i % 3) as usize];
    let mut spec = json!({"clusterIP": ip, "clusterIPs": [ip], "ipFamilies": [f.addr_type],
        "ports": [{"name": "p", "port": 80, "protocol": proto}]});
    match kind % 5 {
        1 => {
            spec["type"] = json!("NodePort");
            spec["ports"][0]["nodePort"] = json!(30000 + i);
        }
        2 => {
            spec["type"] = json!("NodePort");
            spec["externalTrafficPolicy"] = json!("Local");
            spec["ports"][0]["nodePort"] = json!(30000 + i);
            spec["externalIPs"] = json!([(f.svc_ip)(i + 5000)]);
        }
        3 => {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 600}});
        }
        4 => {
            spec["type"] = json!("LoadBalancer");
            spec["ports"][0]["nodePort"] = json!(30000 + i);
            spec["loadBalancerSourceRanges"] = json!(if f.nft == "ip" {
                ["198.18.0.0/15", "203.0.113.10/32"]
            } else {
                ["2001:db8::/32", "fd00:1::5/128"]
            });
        }
        _ => {}
    }
    let mut o = json!({"kind": "Service", "metadata": {"namespace": "ns", "name": format!("s{i}")}, "spec": spec});
    if kind % 5 == 4 {
        o["status"] = json!({"loadBalancer": {"ingress": [{"ip": (f.svc_ip)(i + 9000)}]}});
    }
    o
}

fn slice(f: &Fam, i: u32, eps: &[u32]) -> Value {
    let proto = ["TCP", "UDP", "SCTP"][(i % 3) as usize];
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|e| json!({"addresses": [(f.pod_ip)(*e)], "nodeName": if e % 2 == 0 { "node1" } else { "node2" }}))
        .collect();
    json!({"kind": "EndpointSlice", "metadata": {"namespace": "ns", "name": format!("s{i}-1"),
        "labels": {"kubernetes.io/service-name": format!("s{i}")}}, "addressType": f.addr_type,
        "endpoints": endpoints, "ports": [{"name": "p", "port": 8080, "protocol": proto}]})
}

fn apply(t: &mut ChangeTracker, o: &Value) {
    if o["kind"] == "Service" {
        t.update_service(&serde_json::from_value(o.clone()).unwrap(), &mut vec![])
            .unwrap();
    } else {
        t.update_slice(&serde_json::from_value(o.clone()).unwrap(), &mut vec![])
            .unwrap();
    }
}

fn nft_text(r: &RecordingRunner) -> String {
    r.take_input("nft", &["-f", "-"])
}

fn cfg(f: &Fam, detector: LocalDetector, all_nodeports: bool) -> NftConfig {
    let node_ip: std::net::IpAddr = (f.svc_ip)(60000).parse().unwrap();
    let npa = if all_nodeports {
        NodePortAddresses::default()
    } else {
        NodePortAddresses::new(&[], true, &[node_ip], f.family)
    };
    NftConfig {
        family: f.family,
        masquerade_bit: 14,
        masquerade_all: false,
        local_detector: detector,
        node_port_addresses: npa,
        node_port_ips: if all_nodeports { vec![] } else { vec![node_ip] },
        localhost_node_ports: false,
        tcp_be_liberal: false,
        random_fully: true,
        ipvs: Default::default(),
    }
}

/// Full sync, then a partial one (endpoints change and go, a service goes, one is added).
fn transactions(f: &Fam, cfg: NftConfig, n: u32) -> (String, String) {
    let runner = RecordingRunner::default();
    let mut p = NftProxier::new(runner.clone(), cfg);
    let mut t = ChangeTracker::new(f.family, "node1");
    for i in 0..n {
        apply(&mut t, &service(f, i, i));
        if i % 7 != 6 {
            apply(&mut t, &slice(f, i, &[i, i + 1000, i + 2000]));
        }
    }
    let node = NodeInfo::default();
    let mut sync = |t: &mut ChangeTracker| {
        let changes = t.drain();
        p.sync(&SyncInput {
            state: t.state(),
            changes: &changes,
            node: &node,
            force_full: false,
        })
        .unwrap();
        nft_text(&runner)
    };
    let full = sync(&mut t);
    apply(&mut t, &slice(f, 0, &[0, 3000]));
    apply(&mut t, &slice(f, 3, &[5000]));
    apply(&mut t, &slice(f, 4, &[]));
    apply(&mut t, &slice(f, 6, &[6]));
    t.delete_service("ns", "s2");
    t.delete_slice("ns", "s2-1");
    t.delete_service("ns", "s8");
    apply(&mut t, &service(f, n + 1, 3));
    apply(&mut t, &slice(f, n + 1, &[7000, 7001]));
    let partial = sync(&mut t);
    (full, partial)
}

fn compare(f: &Fam, cfg: NftConfig) {
    let (full, partial) = transactions(f, cfg, 30);
    for needle in [
        "update @affinity-",
        "saddr != {",
        "fib saddr type local",
        "reject",
        "dnat to",
        "masquerade fully-random",
        "numgen random mod 2 0",
        "@hairpin-endpoints",
    ] {
        assert!(full.contains(needle), "full sync lacks `{needle}`");
    }
    for needle in [
        "delete element",
        "flush chain",
        "delete chain",
        "add element",
    ] {
        assert!(
            partial.contains(needle),
            "partial sync lacks `{needle}`:\n{partial}"
        );
    }
    let a = Ns::new("gen-a");
    let b = Ns::new("gen-b");
    let mut applier_b = None;
    for (what, text) in [("full", &full), ("partial", &partial)] {
        a.nft_f(text)
            .unwrap_or_else(|e| panic!("nft rejects the {what} sync: {e}\n{text}"));
        let r = b.run(|| {
            let mut ap = applier_b
                .take()
                .unwrap_or_else(|| NetlinkApplier::open().unwrap());
            let r = ap.apply(text);
            (ap, r)
        });
        applier_b = Some(r.0);
        let report = r.1.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            report.messages >= text.lines().count(),
            "{what}: {report:?}"
        );
        let (la, lb) = (a.list(f.nft), b.list(f.nft));
        assert!(la.contains("dnat to"), "{la}");
        assert_eq!(
            la, lb,
            "{what} sync differs\n--- nft:\n{la}\n--- netlink:\n{lb}"
        );
    }
}

fn root() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root");
    }
    is_root()
}

#[test]
fn generated_ip_cidr_detector() {
    if root() {
        compare(
            &V4,
            cfg(
                &V4,
                LocalDetector::Cidrs(vec![V4.cidr.parse().unwrap()]),
                true,
            ),
        );
    }
}

#[test]
fn generated_ip_bridge_detector_nodeport_ips() {
    if root() {
        compare(
            &V4,
            cfg(&V4, LocalDetector::BridgeInterface("cbr0".into()), false),
        );
    }
}

#[test]
fn generated_ip_prefix_detector() {
    if root() {
        compare(
            &V4,
            cfg(&V4, LocalDetector::InterfacePrefix("veth".into()), true),
        );
    }
}

#[test]
fn generated_ip6_cidr_detector() {
    if root() {
        compare(
            &V6,
            cfg(
                &V6,
                LocalDetector::Cidrs(vec![V6.cidr.parse().unwrap()]),
                true,
            ),
        );
    }
}

#[test]
fn generated_ip6_no_detector_nodeport_ips() {
    if root() {
        compare(&V6, cfg(&V6, LocalDetector::None, false));
    }
}
