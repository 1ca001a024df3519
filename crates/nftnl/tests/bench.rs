//! `cargo test -p kp-nftnl --test bench -- --ignored --nocapture`: one endpoint change at
//! 1,000 and 10,000 loaded services, NetlinkApplier vs `nft -f` (same text, same table).

mod common;
use common::*;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kp_dataplane::{Dataplane, LocalDetector, NodeInfo, RecordingRunner, SyncInput};
use kp_model::{ChangeTracker, IpFamily};
use kp_nftables::{NftConfig, NftProxier};
use kp_nftnl::NetlinkApplier;
use serde_json::{Value, json};

const ENDPOINTS: u32 = 10;

fn svc(i: u32) -> Value {
    let ip = format!("10.{}.{}.{}", 96 + i / 50000, (i / 250) % 200, i % 250 + 1);
    let mut spec =
        json!({"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]});
    if i % 2 == 1 {
        spec["type"] = json!("NodePort");
        spec["ports"][0]["nodePort"] = json!(30000 + i % 2000);
    }
    json!({"metadata": {"namespace": "ns", "name": format!("s{i}")}, "spec": spec})
}

fn slice(i: u32, first_ep: u32) -> Value {
    let eps: Vec<Value> = (0..ENDPOINTS)
        .map(|e| {
            let n = first_ep + e;
            json!({"addresses": [format!("10.{}.{}.{}", 128 + n / 62500, (n / 250) % 250, n % 250 + 2)]})
        })
        .collect();
    json!({"metadata": {"namespace": "ns", "name": format!("s{i}-1"),
        "labels": {"kubernetes.io/service-name": format!("s{i}")}}, "addressType": "IPv4",
        "endpoints": eps, "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}]})
}

fn texts(n: u32) -> (String, String, String) {
    let runner = RecordingRunner::default();
    let cfg = NftConfig {
        family: IpFamily::V4,
        masquerade_bit: 14,
        masquerade_all: false,
        local_detector: LocalDetector::Cidrs(vec!["10.128.0.0/9".parse().unwrap()]),
        node_port_addresses: Default::default(),
        node_port_ips: vec![],
        localhost_node_ports: false,
        tcp_be_liberal: false,
        random_fully: true,
        ipvs: Default::default(),
    };
    let mut p = NftProxier::new(runner.clone(), cfg);
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    for i in 0..n {
        t.update_service(&serde_json::from_value(svc(i)).unwrap(), &mut vec![])
            .unwrap();
        t.update_slice(
            &serde_json::from_value(slice(i, i * ENDPOINTS)).unwrap(),
            &mut vec![],
        )
        .unwrap();
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
        runner.take_input("nft", &["-f", "-"])
    };
    let full = sync(&mut t);
    // One endpoint of one service is replaced, then put back.
    let moved = 7 * ENDPOINTS + 1;
    let mut changed = slice(7, 7 * ENDPOINTS);
    changed["endpoints"][1]["addresses"][0] = json!(format!("10.200.{}.{}", moved % 250, 9));
    t.update_slice(&serde_json::from_value(changed).unwrap(), &mut vec![])
        .unwrap();
    let there = sync(&mut t);
    t.update_slice(
        &serde_json::from_value(slice(7, 7 * ENDPOINTS)).unwrap(),
        &mut vec![],
    )
    .unwrap();
    let back = sync(&mut t);
    (full, there, back)
}

fn nft_f(text: &str) {
    let mut c = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success());
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench(n: u32) {
    let (full, there, back) = texts(n);
    if let Ok(dir) = std::env::var("NFTNL_BENCH_DUMP") {
        for (name, t) in [("full", &full), ("there", &there), ("back", &back)] {
            std::fs::write(format!("{dir}/{n}-{name}.nft"), t).unwrap();
        }
    }
    let ns = Ns::new("bench");
    ns.run(|| {
        let mut ap = NetlinkApplier::open().unwrap();
        let t0 = Instant::now();
        let r = ap.apply(&full).unwrap();
        let load = t0.elapsed();
        let mut nl = vec![];
        let mut kernel = vec![];
        let mut msgs = 0;
        let iters: usize = std::env::var("NFTNL_BENCH_ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5);
        for _ in 0..iters {
            for tx in [&there, &back] {
                let r = ap.apply(tx).unwrap();
                msgs = r.messages;
                nl.push(r.duration);
                kernel.push(r.kernel);
            }
        }
        let mut nf = vec![];
        for _ in 0..iters.div_ceil(2) {
            for tx in [&there, &back] {
                let t = Instant::now();
                nft_f(tx);
                nf.push(t.elapsed());
            }
        }
        // A change without jumps or verdicts: the kernel skips its ruleset validation.
        let plain_add = "add element ip kube-proxy cluster-ips { 10.255.255.1 }\n";
        let plain_del = "delete element ip kube-proxy cluster-ips { 10.255.255.1 }\n";
        let mut plain = vec![];
        for _ in 0..5 {
            plain.push(ap.apply(plain_add).unwrap().duration);
            plain.push(ap.apply(plain_del).unwrap().duration);
        }
        let t = Instant::now();
        nft_f(plain_add);
        let nft_plain = t.elapsed();
        println!(
            "{n} services: one plain set element (no ruleset validation): netlink median {:?}, nft -f {nft_plain:?}",
            median(plain)
        );
        println!(
            "{n} services x {ENDPOINTS} endpoints: full load via netlink {} statements, {} messages, {} bytes in {load:?}; \
             one endpoint change ({} statements, {msgs} messages): netlink median {:?} (min {:?}; in the kernel's send call {:?}), nft -f median {:?} (min {:?})",
            full.lines().count(),
            r.messages,
            r.bytes,
            there.lines().count(),
            median(nl.clone()),
            nl.iter().min().unwrap(),
            median(kernel),
            median(nf.clone()),
            nf.iter().min().unwrap(),
        );
    });
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (root)"]
fn one_endpoint_change_1k_and_10k() {
    if !is_root() {
        return;
    }
    let sizes = std::env::var("NFTNL_BENCH_SIZES").unwrap_or_else(|_| "1000,10000".into());
    for n in sizes.split(',').filter_map(|s| s.trim().parse().ok()) {
        bench(n);
    }
}
