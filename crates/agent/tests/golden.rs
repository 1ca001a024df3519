//! Whole-ruleset golden dumps of both renderers for the golden cluster
//! (`testdata/golden/`, see its README): the `iptables-restore` input and the `nft -f`
//! transaction of a full sync, compared with the reviewed files. No root needed.
//! `KP_UPDATE_GOLDEN=1 cargo test -p kube-proxy-rs --test golden` rewrites them.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use kp_dataplane::{
    Dataplane, DataplaneConfig, LocalDetector, NodeInfo, NodePortAddresses, RecordingRunner,
    SyncInput,
};
use kp_model::{ChangeSet, ChangeTracker, IpFamily, NodeTopology};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden")
}

/// The golden cluster as node1 sees it: its drained tracker and the node.
fn cluster() -> (ChangeTracker, ChangeSet, NodeInfo) {
    let text = std::fs::read_to_string(golden_dir().join("cluster.json")).unwrap();
    let objects: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    for o in objects {
        let mut w = vec![];
        if o["kind"] == "Service" {
            t.update_service(&serde_json::from_value(o).unwrap(), &mut w)
                .unwrap();
        } else {
            t.update_slice(&serde_json::from_value(o).unwrap(), &mut w)
                .unwrap();
        }
        assert!(w.is_empty(), "{w:?}");
    }
    let changes = t.drain();
    let node = NodeInfo {
        topology: NodeTopology {
            node_name: "node1".into(),
            zone: Some("z1".into()),
        },
        node_ips: vec!["198.18.0.11".parse().unwrap()],
        ..Default::default()
    };
    (t, changes, node)
}

fn config() -> DataplaneConfig {
    DataplaneConfig {
        local_detector: LocalDetector::Cidrs(vec!["10.244.0.0/16".parse().unwrap()]),
        node_port_addresses: NodePortAddresses::default(),
        localhost_node_ports: true,
        ..DataplaneConfig::for_cleanup(IpFamily::V4)
    }
}

fn check(file: &str, got: &str) {
    let path = golden_dir().join(file);
    if std::env::var_os("KP_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path).expect("golden file (KP_UPDATE_GOLDEN=1 writes it)");
    if want == got {
        return;
    }
    let (line, w, g) = want
        .lines()
        .chain(std::iter::repeat(""))
        .zip(got.lines().chain(std::iter::repeat("")))
        .enumerate()
        .find(|(_, (w, g))| w != g)
        .map(|(i, (w, g))| (i + 1, w, g))
        .unwrap_or((0, "", ""));
    panic!(
        "{} differs at line {line}:\n  want: {w}\n  got:  {g}\nif intended, regenerate with KP_UPDATE_GOLDEN=1 and review the diff",
        path.display()
    );
}

#[test]
fn iptables_whole_ruleset() {
    let (t, _, node) = cluster();
    let cfg = config();
    let rendered = kp_iptables::render(
        &cfg,
        t.state(),
        &node,
        None,
        &BTreeSet::new(),
        &HashMap::new(),
        false,
    );
    assert!(rendered.warnings.is_empty(), "{:?}", rendered.warnings);
    check("iptables.txt", &rendered.text);
}

#[test]
fn nftables_whole_ruleset() {
    let (t, changes, node) = cluster();
    let runner = RecordingRunner::default();
    // The nft -f path (no netlink socket): the transaction text is what the runner saw.
    let mut p = kp_nftables::NftProxier::new(runner.clone(), config());
    let report = p
        .sync(&SyncInput {
            state: t.state(),
            changes: &changes,
            node: &node,
            force_full: true,
        })
        .expect("sync");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    check("nftables.txt", &runner.inputs("nft", &["-f", "-"]).concat());
}
