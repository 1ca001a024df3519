//! Switching proxy modes on a node: the mode under test (`KP_PROXY_MODE`) hands over to
//! another and back, as an operator changing `--proxy-mode` does. At each start the new
//! mode removes what the other left (IPVS mode's kube-ipvs0, virtual servers and sets
//! included) and the Service keeps answering. Needs root.

mod common;

use std::time::Duration;

use common::*;
use kp_testkit::lab::{Lab, wait_for};
use kp_testkit::probe::probe_tcp;

/// The mode switched to and from: iptables for the others, nftables for iptables.
fn other_mode() -> &'static str {
    if mode() == "iptables" {
        "nftables"
    } else {
        "iptables"
    }
}

fn run_ok(lab: &Lab, argv: &[&str]) -> Option<String> {
    let out = lab.topology().exec(&lab.node_ns(1), argv).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What of `mode` is in node 1's kernel; empty when nothing.
fn traces(lab: &Lab, mode: &str) -> Vec<String> {
    let mut found = Vec::new();
    match mode {
        "iptables" => {
            let save = run_ok(lab, &["iptables-save"]).unwrap_or_default();
            for marker in ["KUBE-PROXY-CANARY", "KUBE-SVC-", "KUBE-SEP-"] {
                if save.contains(marker) {
                    found.push(format!("iptables: {marker}"));
                }
            }
        }
        "nftables" => {
            if run_ok(lab, &["nft", "list", "table", "ip", "kube-proxy"]).is_some() {
                found.push("nftables: table ip kube-proxy".into());
            }
        }
        "ipvs" => {
            if run_ok(lab, &["ip", "link", "show", "kube-ipvs0"]).is_some() {
                found.push("ipvs: kube-ipvs0".into());
            }
            let vs = run_ok(lab, &["ipvsadm", "-Sn"]).unwrap_or_default();
            if vs.lines().any(|l| l.starts_with("-A")) {
                found.push("ipvs: virtual servers".into());
            }
            let sets = run_ok(lab, &["ipset", "list", "-n"]).unwrap_or_default();
            if sets.lines().any(|l| l.starts_with("KUBE-")) {
                found.push("ipvs: ipsets".into());
            }
            let save = run_ok(lab, &["iptables-save"]).unwrap_or_default();
            if save.contains("KUBE-IPVS-FILTER") {
                found.push("ipvs: KUBE-IPVS-FILTER".into());
            }
        }
        other => panic!("no traces for mode {other}"),
    }
    found
}

/// Restarts node 1's proxy in `to` and waits until `from` is gone, `to` is there and
/// the Service answers.
fn switch(lab: &mut Lab, from: &str, to: &str, target: std::net::SocketAddr, ext: &str) {
    lab.stop_proxy(1, false);
    lab.start_proxy(
        std::path::Path::new(BIN),
        1,
        &[&format!("--proxy-mode={to}")],
    )
    .expect("start proxy");
    let done = wait_for(SETTLE, || {
        (traces(lab, from).is_empty() && !traces(lab, to).is_empty()).then_some(())
    });
    assert!(
        done.is_some(),
        "{from} -> {to}: left of {from}: {:?}; of {to}: {:?}\n{}",
        traces(lab, from),
        traces(lab, to),
        lab.proxy_log(1)
    );
    wait_serving(lab, ext, target, SETTLE);
    let r = probe_tcp(ext, target, 20, T).unwrap();
    assert_eq!(r.total_ok(), 20, "{from} -> {to}: {r}");
}

#[test]
fn switching_modes_removes_the_other_modes_objects_and_keeps_serving() {
    let (mut lab, target, ext) = redis_lab();
    let (ours, other) = (mode(), other_mode());
    assert!(!traces(&lab, &ours).is_empty(), "{ours} programmed nothing");
    assert!(
        traces(&lab, other).is_empty(),
        "{other} objects before any switch"
    );
    switch(&mut lab, &ours, other, target, &ext);
    switch(&mut lab, other, &ours, target, &ext);
    // A plain restart in the same mode keeps its objects (nothing is flushed).
    lab.stop_proxy(1, false);
    let before = traces(&lab, &ours);
    start(&mut lab, 1, &[]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(traces(&lab, &ours), before);
    // `--cleanup` removes every mode's objects.
    lab.stop_proxy(1, false);
    let out = lab
        .topology()
        .exec(&lab.node_ns(1), &[BIN, "--cleanup"])
        .unwrap();
    assert!(
        out.status.success(),
        "--cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for m in ["iptables", "nftables", "ipvs"] {
        assert_eq!(traces(&lab, m), Vec::<String>::new(), "after --cleanup");
    }
}
