//! Randomized, iptables mode: a long run of partial syncs applied by the real
//! `iptables-restore` in one namespace ends with the same KUBE-* chains and rules as a fresh
//! proxier's full sync of the final state in another. Every transaction must also be
//! accepted by the kernel (a renderer "fuzz" over random Services and endpoints).
//! And a restore large enough to make iptables-nft fetch the whole nat table (`-S` first)
//! loads the same rules as the same input without that line, and reloads over itself.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::process::{Command, Stdio};

use kp_dataplane::{
    CommandOutput, CommandRunner, Dataplane, LocalDetector, NodeInfo, NodePortAddresses,
    RecordedCall, RecordingRunner, SyncInput,
};
use kp_iptables::{IptablesConfig, IptablesProxier};
use kp_model::{ChangeTracker, IpFamily};
use serde_json::{Value, json};

struct Ns(String);
impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("kpconv-{tag}-{}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(ok.is_ok_and(|s| s.success()), "ip netns add {name}");
        Ns(name)
    }
    /// A runner that really executes the proxier's commands in this namespace.
    fn runner(&self) -> RecordingRunner {
        let ns = self.0.clone();
        RecordingRunner::new(move |c: &RecordedCall| {
            let mut child = Command::new("ip")
                .args(["netns", "exec", &ns, &c.program])
                .args(&c.args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            // Written from its own thread: a restore starting with `-S` prints the old
            // table while still reading its input.
            let writer = c.stdin.clone().map(|input| {
                let mut pipe = child.stdin.take().expect("stdin");
                std::thread::spawn(move || pipe.write_all(input.as_bytes()))
            });
            drop(child.stdin.take());
            let out = child.wait_with_output().expect("wait");
            if let Some(w) = writer {
                w.join().expect("writer").expect("write stdin");
            }
            CommandOutput {
                status: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        })
    }
    /// KUBE-* chains of nat and filter, canonical: chains sorted, rules in order.
    fn kube_rules(&self) -> Vec<String> {
        let mut chains: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for table in ["nat", "filter"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.0, "iptables-save", "-t", table])
                .output()
                .expect("iptables-save");
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(rest) = line.strip_prefix(':') {
                    let name = rest.split_whitespace().next().unwrap_or_default();
                    if name.starts_with("KUBE-") {
                        chains.entry(format!("{table} {name}")).or_default();
                    }
                } else if let Some(rest) = line.strip_prefix("-A ") {
                    let name = rest.split_whitespace().next().unwrap_or_default();
                    if name.starts_with("KUBE-") {
                        chains
                            .entry(format!("{table} {name}"))
                            .or_default()
                            .push(line.to_string());
                    }
                }
            }
        }
        chains
            .into_iter()
            .map(|(k, v)| format!("{k}\n{}", v.join("\n")))
            .collect()
    }
}
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn cfg() -> IptablesConfig {
    IptablesConfig {
        family: IpFamily::V4,
        masquerade_bit: 14,
        masquerade_all: false,
        local_detector: LocalDetector::Cidrs(vec!["10.244.0.0/16".parse().unwrap()]),
        node_port_addresses: NodePortAddresses::default(),
        localhost_node_ports: false,
        tcp_be_liberal: false,
        random_fully: true,
        ipvs: Default::default(),
        node_port_ips: vec![],
    }
}

fn service(i: u64, r: &mut StdRng) -> Value {
    let proto = ["TCP", "UDP", "SCTP"][r.gen_range(0..3) as usize];
    let mut spec = json!({"clusterIP": format!("10.96.0.{}", i + 1), "ports": [{"name": "p", "port": 80, "protocol": proto}]});
    let kind = r.gen_range(0..4);
    if kind >= 1 {
        spec["type"] = json!("NodePort");
        spec["ports"][0]["nodePort"] = json!(30000 + i);
    }
    if kind == 2 {
        spec["externalIPs"] = json!([format!("192.0.2.{}", i + 1)]);
    }
    if kind == 3 {
        spec["type"] = json!("LoadBalancer");
        spec["loadBalancerSourceRanges"] = json!(["198.18.0.0/15"]);
    }
    if kind >= 1 && r.gen_range(0..4) == 0 {
        spec["externalTrafficPolicy"] = json!("Local");
    }
    if r.gen_range(0..5) == 0 {
        spec["internalTrafficPolicy"] = json!("Local");
    }
    if r.gen_range(0..6) == 0 {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    let mut o = json!({"metadata": {"namespace": "ns", "name": format!("s{i}")}, "spec": spec});
    if kind == 3 {
        o["status"] =
            json!({"loadBalancer": {"ingress": [{"ip": format!("203.0.113.{}", i + 1)}]}});
    }
    o
}

fn slice(i: u64, proto: &str, r: &mut StdRng) -> Value {
    let eps: Vec<Value> = (0..r.gen_range(0..5))
        .map(|_| {
            let e: u64 = r.gen_range(0..12);
            json!({"addresses": [format!("10.244.{}.{}", e / 200, e % 200 + 2)],
                "conditions": {"ready": r.gen_range(0..6) != 0, "serving": true, "terminating": r.gen_range(0..8) == 0},
                "nodeName": if e.is_multiple_of(2) { "node1" } else { "node2" }})
        })
        .collect();
    json!({"metadata": {"namespace": "ns", "name": format!("s{i}-1"),
        "labels": {"kubernetes.io/service-name": format!("s{i}")}}, "addressType": "IPv4",
        "endpoints": eps, "ports": [{"name": "p", "port": 8080, "protocol": proto}]})
}

fn run(seed: u64) {
    let mut r = StdRng::seed_from_u64(seed);
    let a = Ns::new("a");
    let b = Ns::new("b");
    let mut proxier = IptablesProxier::new(a.runner(), cfg());
    let mut tracker = ChangeTracker::new(IpFamily::V4, "node1");
    let mut node = NodeInfo::default();
    node.topology.node_name = "node1".into();
    let mut protos: Vec<Option<String>> = vec![None; 16];
    for step in 0..40 {
        let i = r.gen_range(0..protos.len() as u64);
        match (r.gen_range(0..4), protos[i as usize].clone()) {
            (0, Some(_)) => {
                tracker.delete_service("ns", &format!("s{i}"));
                tracker.delete_slice("ns", &format!("s{i}-1"));
                protos[i as usize] = None;
            }
            (1, Some(p)) => {
                let s = slice(i, &p, &mut r);
                tracker
                    .update_slice(&serde_json::from_value(s).unwrap(), &mut vec![])
                    .unwrap();
            }
            _ => {
                let s = service(i, &mut r);
                let p = s["spec"]["ports"][0]["protocol"]
                    .as_str()
                    .unwrap()
                    .to_string();
                tracker
                    .update_service(&serde_json::from_value(s).unwrap(), &mut vec![])
                    .unwrap();
                let sl = slice(i, &p, &mut r);
                tracker
                    .update_slice(&serde_json::from_value(sl).unwrap(), &mut vec![])
                    .unwrap();
                protos[i as usize] = Some(p);
            }
        }
        let changes = tracker.drain();
        if let Err(e) = proxier.sync(&SyncInput {
            state: tracker.state(),
            changes: &changes,
            node: &node,
            force_full: step == 20,
        }) {
            panic!("seed {seed} step {step}: iptables-restore refused the sync: {e}");
        }
        if step % 10 == 9 {
            let mut fresh = IptablesProxier::new(b.runner(), cfg());
            fresh
                .sync(&SyncInput {
                    state: tracker.state(),
                    changes: &changes,
                    node: &node,
                    force_full: true,
                })
                .unwrap_or_else(|e| panic!("seed {seed}: full sync refused: {e}"));
            let (ra, rb) = (a.kube_rules(), b.kube_rules());
            if ra != rb {
                let only_a: Vec<_> = ra.iter().filter(|x| !rb.contains(x)).collect();
                let only_b: Vec<_> = rb.iter().filter(|x| !ra.contains(x)).collect();
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
    for seed in [3, 17, 2024] {
        run(seed);
    }
}

#[test]
fn large_restores_fetching_the_whole_table_load_the_same_rules_and_reload_over_themselves() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let version = Command::new("iptables")
        .arg("--version")
        .output()
        .expect("iptables");
    if !String::from_utf8_lossy(&version.stdout).contains("nf_tables") {
        eprintln!("skipped: iptables is not iptables-nft");
        return;
    }
    // 300 services x 10 ready endpoints: 3,300 nat chains, past the 3,000 threshold.
    let mut tracker = ChangeTracker::new(IpFamily::V4, "node1");
    for i in 0..300u64 {
        let svc = json!({"metadata": {"namespace": "ns", "name": format!("s{i}")},
            "spec": {"clusterIP": format!("10.96.{}.{}", i / 200, i % 200 + 1),
                "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}});
        let eps: Vec<Value> = (0..10)
            .map(|e| {
                json!({"addresses": [format!("10.244.{}.{}", i / 20, (i % 20) * 10 + e + 2)],
                "conditions": {"ready": true}, "nodeName": "node2"})
            })
            .collect();
        let sl = json!({"metadata": {"namespace": "ns", "name": format!("s{i}-1"),
            "labels": {"kubernetes.io/service-name": format!("s{i}")}}, "addressType": "IPv4",
            "endpoints": eps, "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}]});
        tracker
            .update_service(&serde_json::from_value(svc).unwrap(), &mut vec![])
            .unwrap();
        tracker
            .update_slice(&serde_json::from_value(sl).unwrap(), &mut vec![])
            .unwrap();
    }
    let changes = tracker.drain();
    let mut node = NodeInfo::default();
    node.topology.node_name = "node1".into();
    let input = SyncInput {
        state: tracker.state(),
        changes: &changes,
        node: &node,
        force_full: true,
    };
    const RESTORE: &[&str] = &["-w", "5", "-W", "100000", "--noflush", "--counters"];

    let a = Ns::new("big-a");
    let runner = a.runner();
    IptablesProxier::new(runner.clone(), cfg())
        .sync(&input)
        .expect("cold full sync");
    let sent = runner.inputs("iptables-restore", RESTORE);
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].contains("*nat\n-S\n"),
        "the whole-table fetch is used"
    );
    let cold = a.kube_rules();
    let seps = cold
        .iter()
        .filter(|c| c.starts_with("nat KUBE-SEP-"))
        .count();
    assert_eq!(seps, 3000, "every endpoint chain loaded");

    // The same input without `-S`, loaded by the tool directly elsewhere: same rules.
    let b = Ns::new("big-b");
    let without = sent[0].replacen("*nat\n-S\n", "*nat\n", 1);
    let out = b
        .runner()
        .run("iptables-restore", &["--noflush"], Some(without.as_bytes()))
        .expect("iptables-restore");
    assert!(out.success(), "{}", out.stderr);
    // The proxier also makes the canary chains (outside the restore); the rest must match.
    let restored = |rules: Vec<String>| -> Vec<String> {
        rules
            .into_iter()
            .filter(|c| !c.contains("KUBE-PROXY-CANARY"))
            .collect()
    };
    same_rules(&restored(cold.clone()), &restored(b.kube_rules()));

    // A restart: a new proxier's full sync over the loaded table (its `-S` prints the old
    // table while the input streams in) leaves exactly the same rules, nothing doubled.
    IptablesProxier::new(a.runner(), cfg())
        .sync(&input)
        .expect("warm full sync");
    same_rules(&cold, &a.kube_rules());
}

/// Equal chain lists, or a panic naming the first few that differ (not all 3,300).
fn same_rules(want: &[String], got: &[String]) {
    let missing: Vec<_> = want.iter().filter(|c| !got.contains(c)).take(3).collect();
    let extra: Vec<_> = got.iter().filter(|c| !want.contains(c)).take(3).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && want.len() == got.len(),
        "{} vs {} chains; missing {missing:#?}; unexpected {extra:#?}",
        want.len(),
        got.len()
    );
}
