//! Randomized: a long run of partial syncs, applied over netlink, leaves the kernel with
//! exactly the table a fresh full sync of the final state produces (same chains, rules,
//! maps and elements). Exercises the in-memory diff, the reference counts of shared
//! pickers and hairpin elements, and the encoder on every shape the renderer writes.

mod common;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use kp_dataplane::{
    Dataplane, LocalDetector, NodeInfo, NodePortAddresses, RecordingRunner, SyncInput,
};
use kp_model::{ChangeTracker, IpFamily};
use kp_nftables::{NftConfig, NftProxier};
use kp_nftnl::NetlinkApplier;
use serde_json::{Value, json};

/// xorshift64*: deterministic, no dependency.

#[derive(Clone)]
struct Svc {
    kind: u64,
    proto: &'static str,
    etp_local: bool,
    itp_local: bool,
    affinity: bool,
    eps: Vec<u32>,
}

fn service(i: u32, s: &Svc) -> Value {
    let ip = format!("10.96.0.{}", i + 1);
    let mut spec =
        json!({"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": s.proto}]});
    if s.kind >= 1 {
        spec["type"] = json!("NodePort");
        spec["ports"][0]["nodePort"] = json!(30000 + i);
    }
    if s.kind == 2 {
        spec["externalIPs"] = json!([format!("192.0.2.{}", i + 1)]);
    }
    if s.kind == 3 {
        spec["type"] = json!("LoadBalancer");
        spec["loadBalancerSourceRanges"] = json!(["198.18.0.0/15"]);
    }
    if s.etp_local && s.kind >= 1 {
        spec["externalTrafficPolicy"] = json!("Local");
    }
    if s.itp_local {
        spec["internalTrafficPolicy"] = json!("Local");
    }
    if s.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    let mut o = json!({"metadata": {"namespace": "ns", "name": format!("s{i}")}, "spec": spec});
    if s.kind == 3 {
        o["status"] =
            json!({"loadBalancer": {"ingress": [{"ip": format!("203.0.113.{}", i + 1)}]}});
    }
    o
}

fn slice(i: u32, s: &Svc) -> Value {
    let endpoints: Vec<Value> = s
        .eps
        .iter()
        .map(|e| {
            json!({"addresses": [format!("10.244.{}.{}", e / 200, e % 200 + 2)],
                "nodeName": if e % 2 == 0 { "node1" } else { "node2" }})
        })
        .collect();
    json!({"metadata": {"namespace": "ns", "name": format!("s{i}-1"),
        "labels": {"kubernetes.io/service-name": format!("s{i}")}}, "addressType": "IPv4",
        "endpoints": endpoints, "ports": [{"name": "p", "port": 8080, "protocol": s.proto}]})
}

fn random_svc(r: &mut StdRng) -> Svc {
    // Endpoint IPs from a small pool, so services share pods (shared hairpin elements).
    let n = r.gen_range(0..5);
    let mut eps: Vec<u32> = (0..n).map(|_| r.gen_range(0..12) as u32).collect();
    eps.sort();
    eps.dedup();
    Svc {
        kind: r.gen_range(0..4),
        proto: ["TCP", "UDP", "SCTP"][r.gen_range(0..3) as usize],
        etp_local: r.gen_range(0..4) == 0,
        itp_local: r.gen_range(0..5) == 0,
        affinity: r.gen_range(0..6) == 0,
        eps,
    }
}

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

fn take_text(r: &RecordingRunner) -> String {
    r.take_input("nft", &["-f", "-"])
}

/// The listing with its top-level blocks (chains, sets, maps) sorted: creation order
/// differs between a history of partial syncs and one full sync.
fn canonical(listing: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur = String::new();
    for line in listing.lines() {
        if line.starts_with("\tchain ") || line.starts_with("\tmap ") || line.starts_with("\tset ")
        {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line == "\t}" {
            blocks.push(std::mem::take(&mut cur));
        }
    }
    blocks.sort();
    blocks
}

fn run(seed: u64) {
    let mut r = StdRng::seed_from_u64(seed);
    let a = Ns::new("conv-a");
    let b = Ns::new("conv-b");
    let runner = RecordingRunner::default();
    let mut proxier = NftProxier::new(runner.clone(), cfg());
    let mut tracker = ChangeTracker::new(IpFamily::V4, "node1");
    let mut node = NodeInfo::default();
    node.topology.node_name = "node1".into();
    let mut svcs: Vec<Option<Svc>> = vec![None; 24];
    let applier_a = |text: &str| a.run(|| NetlinkApplier::open().unwrap().apply(text).map(|_| ()));
    for step in 0..60 {
        let i = r.gen_range(0..svcs.len() as u64) as usize;
        match (r.gen_range(0..5), svcs[i].clone()) {
            (0, Some(_)) => {
                tracker.delete_service("ns", &format!("s{i}"));
                tracker.delete_slice("ns", &format!("s{i}-1"));
                svcs[i] = None;
            }
            (1 | 2, Some(mut s)) => {
                // Endpoints only: replace, add or remove some.
                s.eps = random_svc(&mut r).eps;
                tracker
                    .update_slice(
                        &serde_json::from_value(slice(i as u32, &s)).unwrap(),
                        &mut vec![],
                    )
                    .unwrap();
                svcs[i] = Some(s);
            }
            _ => {
                let s = random_svc(&mut r);
                tracker
                    .update_service(
                        &serde_json::from_value(service(i as u32, &s)).unwrap(),
                        &mut vec![],
                    )
                    .unwrap();
                tracker
                    .update_slice(
                        &serde_json::from_value(slice(i as u32, &s)).unwrap(),
                        &mut vec![],
                    )
                    .unwrap();
                svcs[i] = Some(s);
            }
        }
        let changes = tracker.drain();
        proxier
            .sync(&SyncInput {
                state: tracker.state(),
                changes: &changes,
                node: &node,
                force_full: step == 30,
            })
            .unwrap();
        let text = take_text(&runner);
        if let Err(e) = applier_a(&text) {
            panic!("seed {seed} step {step}: the kernel refused the sync: {e}\n{text}");
        }
        if step % 15 == 14 {
            // A fresh proxier's full sync of the same state, in the other namespace.
            let fresh_runner = RecordingRunner::default();
            let mut fresh = NftProxier::new(fresh_runner.clone(), cfg());
            fresh
                .sync(&SyncInput {
                    state: tracker.state(),
                    changes: &changes,
                    node: &node,
                    force_full: true,
                })
                .unwrap();
            let full = take_text(&fresh_runner);
            b.run(|| NetlinkApplier::open().unwrap().apply(&full))
                .unwrap_or_else(|e| panic!("seed {seed}: full sync refused: {e}"));
            let (la, lb) = (canonical(&a.list("ip")), canonical(&b.list("ip")));
            if la != lb {
                let only_a: Vec<_> = la.iter().filter(|x| !lb.contains(x)).collect();
                let only_b: Vec<_> = lb.iter().filter(|x| !la.contains(x)).collect();
                panic!(
                    "seed {seed} step {step}: partial syncs diverged from a full sync\n\
                     only after partial syncs:\n{only_a:#?}\nonly in the full sync:\n{only_b:#?}"
                );
            }
        }
    }
}

#[test]
fn partial_syncs_converge_to_the_full_sync() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    for seed in [1, 7, 42, 1234, 99991] {
        run(seed);
    }
}
