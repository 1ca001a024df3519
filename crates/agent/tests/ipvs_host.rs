//! IPVS mode on a kernel without IPVS (this machine's): the proxy says so in one line,
//! exits 1, and leaves the node as it was (nothing half-programmed: no chain, no set, no
//! kube-ipvs0). IPVS mode itself is tested in the guest (`scripts/guest`). Needs root.

mod common;

use std::time::Duration;

use common::*;
use kp_testkit::lab::wait_for;

#[test]
fn ipvs_mode_without_ipvs_in_the_kernel_exits_1_and_writes_nothing() {
    if std::path::Path::new("/proc/net/ip_vs").exists() {
        // A kernel with IPVS (the guest): nothing to check here.
        eprintln!("this kernel has IPVS; the IPVS-mode suites cover it");
        return;
    }
    let mut lab = new_lab(1);
    deploy(
        &mut lab,
        "web",
        "web",
        1,
        Some(serde_json::json!({"type": "NodePort"})),
    );
    let node = lab.node_ns(1);
    let before = lab.topology().exec_ok(&node, &["iptables-save"]).unwrap();
    lab.start_proxy(std::path::Path::new(BIN), 1, &["--proxy-mode=ipvs"])
        .expect("start proxy");
    let status = wait_for(Duration::from_secs(30), || {
        lab.proxy(1)?.child.try_wait().ok()?
    })
    .expect("the proxy exits");
    assert_eq!(status.code(), Some(1), "{}", lab.proxy_log(1));
    let log = lab.proxy_log(1);
    let line = log
        .lines()
        .find(|l| l.contains("ipvs mode cannot start"))
        .unwrap_or_else(|| panic!("no reason given:\n{log}"));
    assert!(line.contains("IPVS is not available"), "{line}");
    // Nothing was written: the rules as before, no kube-ipvs0, no ipset of ours.
    let after = lab.topology().exec_ok(&node, &["iptables-save"]).unwrap();
    let strip = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(strip(&after), strip(&before), "rules changed");
    assert!(!after.contains("KUBE-"), "{after}");
    let link = lab
        .topology()
        .exec(&node, &["ip", "link", "show", "kube-ipvs0"])
        .unwrap();
    assert!(!link.status.success(), "kube-ipvs0 was created");
    let sets = lab
        .topology()
        .exec_ok(&node, &["ipset", "list", "-n"])
        .unwrap();
    assert!(!sets.contains("KUBE-"), "{sets}");
}
