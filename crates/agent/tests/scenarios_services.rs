//! Mode-independent checks of basic Service paths that the iptables-specific e2e file also
//! covers with rule-text assertions: the redis walk-through, externalIPs, ClientIP
//! affinity, and REJECT for services without endpoints. Runs in the mode from
//! `KP_PROXY_MODE`. Needs root.

mod common;
use common::*;

use std::time::{Duration, Instant};

use kp_testkit::probe::{ProbeError, probe_tcp, tcp_connect_once};

const REDIS: &str = include_str!("../../../examples/redis.yaml");

fn lab_in_mode(manifest: &str) -> kp_testkit::lab::Lab {
    let mut lab = new_lab(1);
    lab.cluster.apply_manifest(manifest).expect("manifest");
    start(&mut lab, 1, &[]);
    lab
}

#[test]
fn walkthrough_balances_and_hairpins() {
    let lab = lab_in_mode(REDIS);
    let target = svc_addr(&lab, "default", "redis", 6379);
    let ext = ext_ns(&lab);
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    let r = probe_tcp(&ext, target, 100, T).unwrap();
    assert_eq!(r.total_ok(), 100, "{r}");
    for p in r.answers.keys() {
        let share = r.share(p);
        assert!((0.3..=0.7).contains(&share), "{p}: {share:.2} {r}");
    }
    assert_eq!(r.answers.len(), 2, "{r}");
    let pod1 = lab.cluster.pods().into_iter().next().unwrap();
    let r = probe_tcp(&pod1.netns, target, 40, T).unwrap();
    assert_eq!((r.total_ok(), r.answers.len()), (40, 2), "hairpin: {r}");
}

#[test]
fn external_ips_and_client_ip_affinity() {
    let manifest = REDIS.replace(
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  sessionAffinity: ClientIP\n  externalIPs: [203.0.113.50]\n",
    );
    let lab = lab_in_mode(&manifest);
    let ext = ext_ns(&lab);
    let via = node_ip(&lab, 1).to_string();
    ip_cmd(
        &lab,
        &ext,
        &["route", "add", "203.0.113.50/32", "via", &via],
    );
    let external = sa("203.0.113.50:6379");
    wait_serving(&lab, &ext, external, Duration::from_secs(20));
    let r = probe_tcp(&ext, external, 40, T).unwrap();
    assert_eq!(r.total_ok(), 40, "{r}");
    assert_eq!(
        r.answers.len(),
        1,
        "ClientIP affinity keeps one client on one pod: {r}"
    );
    assert!(
        !r.sources_seen.contains_key(EXT_IP),
        "externalTrafficPolicy Cluster masquerades: {r}"
    );
    let cluster = svc_addr(&lab, "default", "redis", 6379);
    let r2 = probe_tcp(&ext, cluster, 20, T).unwrap();
    assert_eq!(
        r2.answers.len(),
        1,
        "affinity holds across the service's IPs: {r2}"
    );
    assert_eq!(
        r2.answers.keys().next(),
        r.answers.keys().next(),
        "same pod via ClusterIP and externalIP"
    );
}

#[test]
fn no_endpoints_is_refused_fast() {
    let manifest = "apiVersion: v1\nkind: Service\nmetadata: {name: lonely, namespace: default}\nspec:\n  selector: {app: none}\n  ports: [{port: 80, targetPort: 8080}]\n";
    let lab = lab_in_mode(manifest);
    let target = svc_addr(&lab, "default", "lonely", 80);
    let ext = ext_ns(&lab);
    let refused = kp_testkit::lab::wait_for(Duration::from_secs(20), || {
        matches!(tcp_connect_once(&ext, target, T), Err(ProbeError::Refused)).then_some(())
    });
    assert!(refused.is_some(), "never refused:\n{}", logs(&lab));
    for _ in 0..10 {
        let t0 = Instant::now();
        let res = tcp_connect_once(&ext, target, T);
        assert!(matches!(res, Err(ProbeError::Refused)), "{res:?}");
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "refusal took {:?}",
            t0.elapsed()
        );
    }
}
