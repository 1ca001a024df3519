//! Someone else touches the dataplane: the rules are restored within a sync period or
//! two, each repair is counted in `kubeproxy_sync_proxy_rules_drift_repairs_total` and
//! logged once, and a dataplane nobody touched is never "repaired". Runs in the mode from
//! `KP_PROXY_MODE`. Needs root.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kp_testkit::lab::{Lab, http_get, localhost, wait_for};

const REPAIRS: &str = "kubeproxy_sync_proxy_rules_drift_repairs_total";
const FOUND: &str = "forcing a full sync";

fn repairs(lab: &Lab) -> f64 {
    let (_, text) = http_get(&lab.node_ns(1), localhost(10249), "/metrics").unwrap();
    metric(&text, REPAIRS, &["ip_family=\"IPv4\""])
}

fn found_lines(lab: &Lab) -> usize {
    lab.proxy_log(1)
        .lines()
        .filter(|l| l.contains(FOUND))
        .count()
}

fn sh(lab: &Lab, script: &str) {
    lab.topology()
        .exec_ok(&lab.node_ns(1), &["sh", "-c", script])
        .unwrap_or_else(|e| panic!("{script}: {e}"));
}

/// The KUBE-SVC chain of `web`, its jumps removed from KUBE-SERVICES, flushed and deleted.
fn delete_service_chain(lab: &Lab) {
    let nat = lab.iptables_save(1, "nat").unwrap();
    let chain = nat
        .lines()
        .find(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("default/web"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "-j").nth(1))
        .expect("web's KUBE-SVC chain")
        .to_string();
    assert!(chain.starts_with("KUBE-SVC-"), "{chain}");
    // Rule numbers of the jumps, highest first so deleting keeps the others' numbers.
    let listing = lab
        .topology()
        .exec_ok(
            &lab.node_ns(1),
            &[
                "iptables",
                "-t",
                "nat",
                "-L",
                "KUBE-SERVICES",
                "-n",
                "--line-numbers",
            ],
        )
        .unwrap();
    let mut numbers: Vec<u32> = listing
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(chain.as_str()))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(!numbers.is_empty(), "no jump to {chain}:\n{listing}");
    numbers.sort_unstable_by(|a, b| b.cmp(a));
    for n in numbers {
        sh(lab, &format!("iptables -t nat -D KUBE-SERVICES {n}"));
    }
    sh(
        lab,
        &format!("iptables -t nat -F {chain} && iptables -t nat -X {chain}"),
    );
}

#[test]
fn rules_removed_by_others_are_restored_counted_and_logged_once() {
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 2, Some(serde_json::json!({})));
    let config = short_sync_period_config(&lab);
    start(&mut lab, 1, &[&config]);
    let target = svc_addr(&lab, "default", "web", 80);
    let ext = ext_ns(&lab);
    wait_serving(&lab, &ext, target, Duration::from_secs(20));

    // Untouched rules are never "repaired": several sync periods pass without a repair.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        repairs(&lab),
        0.0,
        "repairs without tampering\n{}",
        logs(&lab)
    );
    assert_eq!(found_lines(&lab), 0, "{}", logs(&lab));

    type Tamper = (&'static str, fn(&Lab));
    let tampers: Vec<Tamper> = if mode() == "ipvs" {
        vec![
            ("ipvsadm -D of the ClusterIP's virtual server", |lab| {
                let vs = svc_addr(lab, "default", "web", 80);
                sh(lab, &format!("ipvsadm -D -t {vs}"))
            }),
            ("ip link del kube-ipvs0", |lab| {
                sh(lab, "ip link del kube-ipvs0")
            }),
            ("ipset flush KUBE-CLUSTER-IP", |lab| {
                sh(lab, "ipset flush KUBE-CLUSTER-IP")
            }),
        ]
    } else if iptables_mode() {
        vec![
            ("iptables -t nat -F", |lab| sh(lab, "iptables -t nat -F")),
            ("delete a KUBE-SVC chain", delete_service_chain),
            ("nft flush ruleset", |lab| sh(lab, "nft flush ruleset")),
        ]
    } else {
        vec![
            ("nft delete table ip kube-proxy", |lab| {
                sh(lab, "nft delete table ip kube-proxy")
            }),
            ("nft flush ruleset", |lab| sh(lab, "nft flush ruleset")),
        ]
    };
    for (i, (what, tamper)) in tampers.iter().enumerate() {
        let lines_before = found_lines(&lab);
        let t0 = Instant::now();
        tamper(&lab);
        // Broken, or already repaired (a drift check can land between the tamper and
        // the probe: the proxy saw it too).
        assert!(
            connects(&ext, target, Duration::from_millis(300)).is_err() || repairs(&lab) > i as f64,
            "{what} did not break the service, so it tests nothing"
        );
        wait_serving(&lab, &ext, target, Duration::from_secs(10));
        let restored = t0.elapsed();
        let counted = wait_for(Duration::from_secs(5), || {
            (repairs(&lab) >= (i + 1) as f64).then_some(())
        });
        assert!(
            counted.is_some(),
            "{what}: repair not counted\n{}",
            logs(&lab)
        );
        // Logged once per family that lost rules, and not again while nothing changes.
        std::thread::sleep(Duration::from_secs(3));
        let new_lines = found_lines(&lab) - lines_before;
        assert!(
            (1..=2).contains(&new_lines),
            "{what}: {new_lines} warnings\n{}",
            logs(&lab)
        );
        assert_eq!(
            repairs(&lab),
            (i + 1) as f64,
            "{what}: repaired again and again"
        );
        eprintln!("{what}: restored in {restored:?}, counted, logged {new_lines}x");
    }
}
