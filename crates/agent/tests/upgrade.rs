//! Upgrade and rollback between builds: an older kube-proxy-rs (`KP_UPGRADE_FROM_BINARY`,
//! built from an earlier commit by `scripts/kp test`) programs the node, is replaced by
//! this build, which is replaced by the older one again, while a prober opens a new
//! connection to a ClusterIP every few milliseconds. No connection may fail, each build
//! adopts or replaces what the other wrote (never doubled), and changes made after each
//! switch are programmed. Runs in the mode from `KP_PROXY_MODE`. Needs root.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use kp_testkit::lab::Lab;

/// Rules of ours that appear more than once in a chain, and (nftables) our table more
/// than once.
fn doubled(lab: &Lab) -> Vec<String> {
    let mut rules: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    if iptables_mode() {
        let (nat, filter) = nat_and_filter(lab, 1);
        for line in strip_counters(&format!("{nat}\n{filter}")).lines() {
            if line.starts_with("-A ") && line.contains("KUBE-") {
                *rules.entry(line.to_string()).or_default() += 1;
            }
        }
    } else {
        let text = lab
            .topology()
            .exec_ok(&lab.node_ns(1), &["nft", "list", "ruleset"])
            .unwrap();
        let tables = text
            .lines()
            .filter(|l| l.starts_with("table ip kube-proxy"))
            .count();
        if tables != 1 {
            out.push(format!("{tables} ip kube-proxy tables"));
        }
        // Rules only: map and set elements may repeat across maps by design.
        let (mut table, mut chain) = (String::new(), None::<String>);
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("table ") {
                table = name.trim_end_matches(" {").to_string();
            } else if let Some(name) = line.strip_prefix("chain ") {
                chain = Some(format!("{table} {}", name.trim_end_matches(" {")));
            } else if line.starts_with("set ") || line.starts_with("map ") || line == "}" {
                chain = None;
            } else if let Some(c) = &chain
                && !line.starts_with("type ")
                && !line.is_empty()
            {
                *rules.entry(format!("{c}: {line}")).or_default() += 1;
            }
        }
    }
    out.extend(
        rules
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(l, n)| format!("{n}x {l}")),
    );
    out
}

#[test]
#[ignore = "needs KP_UPGRADE_FROM_BINARY (an older build); scripts/kp test builds one"]
fn upgrade_and_rollback_drop_no_connection_and_double_nothing() {
    let old = PathBuf::from(
        std::env::var("KP_UPGRADE_FROM_BINARY")
            .expect("KP_UPGRADE_FROM_BINARY: the older kube-proxy-rs binary"),
    );
    assert!(old.exists(), "{} does not exist", old.display());
    let new = Path::new(BIN);
    let mode = format!("--proxy-mode={}", mode());

    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 2, Some(serde_json::json!({})));
    lab.start_proxy(&old, 1, &[&mode]).unwrap();
    let ext = ext_ns(&lab);
    let web = svc_addr(&lab, "default", "web", 80);
    wait_serving(&lab, &ext, web, SETTLE);

    let prober = Prober::start(&ext, web, Duration::from_millis(5));

    // old -> new -> old, each followed by a change the running build must program (scale
    // up: pods removed without graceful termination would fail connections by themselves).
    for (step, (binary, replicas)) in [(new, 3u32), (old.as_path(), 4)].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(500));
        lab.stop_proxy(1, false);
        lab.start_proxy(binary, 1, &[&mode]).unwrap();
        let log_has_first_sync = || {
            lab.proxy_log(1)
                .lines()
                .any(|l| l.contains("synced proxy rules") && l.contains("full=true"))
        };
        assert!(
            kp_testkit::lab::wait_for(SETTLE, || log_has_first_sync().then_some(())).is_some(),
            "step {step}: {} never synced\n{}",
            binary.display(),
            logs(&lab)
        );
        let doubled = doubled(&lab);
        assert!(
            doubled.is_empty(),
            "step {step}: rules doubled after switching to {}: {doubled:#?}",
            binary.display()
        );
        deploy(&mut lab, "web", "web", replicas, None);
        let want = all_pods(&lab, "web");
        assert_eq!(want.len(), replicas as usize);
        wait_answered_by(&lab, &ext, web, &want, "after the switch");
    }
    std::thread::sleep(Duration::from_millis(500));
    let (ok, errors) = prober.stop();
    eprintln!(
        "upgrade and rollback prober: {ok} ok, {} failed",
        errors.len()
    );
    assert!(ok > 100, "prober made {ok} connections");
    assert!(
        errors.is_empty(),
        "failed connections: {errors:?}\n{}",
        logs(&lab)
    );
}
