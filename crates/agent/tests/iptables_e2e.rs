//! End-to-end, real kernel: the kube-proxy-rs binary in a node namespace, watching the API
//! emulator, programming iptables; real connections from other namespaces.
//!
//! Needs root (network namespaces, iptables). Every test builds its own lab.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use kp_testkit::lab::{Lab, http_get, localhost, wait_for};
use kp_testkit::probe::{ProbeError, probe_tcp, probe_udp, tcp_connect_once};
use serde_json::json;

const REDIS: &str = include_str!("../../../examples/redis.yaml");

#[test]
fn redis_walkthrough_reaches_both_pods() {
    let lab = lab_with_proxy(REDIS, &[]);
    let target = svc_addr(&lab, "default", "redis", 6379);
    let ext = lab.topology().ext().ns.clone();
    let node = lab.node_ns(1);
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    let pods = pod_names(&lab, "redis-");
    assert_eq!(pods.len(), 2);

    for (from, what) in [
        (&ext, "external client (PREROUTING)"),
        (&node, "node itself (OUTPUT)"),
    ] {
        let r = probe_tcp(from, target, 100, T).unwrap();
        assert_eq!(r.total_ok(), 100, "{what}: {r}");
        for p in &pods {
            let share = r.share(p);
            assert!(
                (0.3..=0.7).contains(&share),
                "{what}: {p} got {share:.2} of 100: {r}"
            );
        }
    }
    // Hairpin: a pod reaching its own Service, half the time itself, is masqueraded then.
    let pod1 = lab.cluster.pods().into_iter().next().unwrap();
    let r = probe_tcp(&pod1.netns, target, 60, T).unwrap();
    assert_eq!(r.total_ok(), 60, "hairpin: {r}");
    assert_eq!(r.answers.len(), 2, "hairpin: both pods answer: {r}");
    // Answers from itself saw the masquerade address (the node's bridge IP); answers from
    // the other pod saw pod1's own IP (in-cluster traffic is not masqueraded).
    let bridge = lab.topology().node(1).unwrap().bridge_ip.to_string();
    let own = r.answers[&pod1.name];
    assert_eq!(
        r.sources_seen.get(&bridge).copied().unwrap_or(0),
        own,
        "{r}"
    );
    assert_eq!(
        r.sources_seen
            .get(&pod1.ip.to_string())
            .copied()
            .unwrap_or(0),
        60 - own,
        "{r}"
    );
    // Off-cluster traffic is masqueraded (source outside 10.244.0.0/16): pods see the node.
    let r = probe_tcp(&ext, target, 10, T).unwrap();
    assert!(
        r.sources_seen.keys().all(|s| s.starts_with("10.244.")),
        "masqueraded to the bridge IP: {r}"
    );

    // The rules have upstream's names and shapes.
    let nat = lab.iptables_save(1, "nat").unwrap();
    let svc_chain = "KUBE-SVC-"; // hash checked in unit tests; here the path
    assert!(
        nat.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ),
        "{nat}"
    );
    assert!(
        nat.contains(
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ),
        "{nat}"
    );
    let jump = nat
        .lines()
        .find(|l| l.contains("default/redis:redis cluster IP") && l.starts_with("-A KUBE-SERVICES"))
        .expect("KUBE-SERVICES rule");
    assert!(
        jump.contains(svc_chain) && jump.contains(&format!("-d {}/32", target.ip())),
        "{jump}"
    );
    assert_eq!(
        nat.lines().filter(|l| l.contains("-j DNAT")).count(),
        2,
        "{nat}"
    );
    assert!(nat.contains("--probability 0.50000000000"), "{nat}");

    // Admin endpoints.
    let (code, body) = http_get(&node, localhost(10249), "/proxyMode").unwrap();
    assert_eq!((code, body.trim()), (200, "iptables"));
    let (code, metrics) = http_get(&node, localhost(10249), "/metrics").unwrap();
    assert_eq!(code, 200);
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_iptables_total",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    let (code, health) = http_get(&node, localhost(10256), "/healthz").unwrap();
    assert_eq!(code, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert!(
        health["lastUpdated"].is_string() && health["currentTime"].is_string(),
        "{health}"
    );
    let (code, _) = http_get(&node, localhost(10256), "/livez").unwrap();
    assert_eq!(code, 200);
    let (code, configz) = http_get(&node, localhost(10249), "/configz").unwrap();
    assert_eq!(code, 200);
    assert!(configz.contains("kubeproxy.config.k8s.io"), "{configz}");

    // The Starting event on our Node, as upstream emits it.
    let started = wait_for(Duration::from_secs(5), || {
        lab.emulator
            .events()
            .into_iter()
            .find(|e| e["reason"] == "Starting")
    });
    let ev = started.expect("Starting event");
    let regarding = if ev["regarding"].is_object() {
        &ev["regarding"]
    } else {
        &ev["involvedObject"]
    };
    assert_eq!(regarding["kind"], "Node");
    assert_eq!(regarding["name"], "node1");
}

#[test]
fn nodeport_from_external_client_and_udp() {
    let manifest = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: dns, namespace: kube-system}
spec:
  replicas: 2
  selector: {matchLabels: {app: dns}}
  template:
    metadata: {labels: {app: dns}}
    spec:
      containers:
        - name: dns
          ports:
            - {name: dns, containerPort: 5353, protocol: UDP}
            - {name: web, containerPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  type: NodePort
  selector: {app: dns}
  ports:
    - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
    - {name: web, port: 80, targetPort: web, nodePort: 30080, protocol: TCP}
"#;
    let lab = lab_with_proxy(manifest, &[]);
    let ext = lab.topology().ext().ns.clone();
    let node_ip = lab.topology().node(1).unwrap().ip;
    let nodeport = SocketAddr::new(node_ip, 30080);
    wait_serving(&lab, &ext, nodeport, Duration::from_secs(20));
    let r = probe_tcp(&ext, nodeport, 60, T).unwrap();
    assert_eq!(r.total_ok(), 60, "{r}");
    assert_eq!(r.answers.len(), 2, "both pods answer the NodePort: {r}");

    let dns = svc_addr(&lab, "kube-system", "dns", 53);
    let r = probe_udp(&ext, dns, 60, T).unwrap();
    assert_eq!(r.total_ok(), 60, "{r}");
    assert_eq!(r.answers.len(), 2, "both pods answer UDP: {r}");
}

#[test]
fn service_without_endpoints_is_refused_at_once() {
    let manifest = r#"
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: default}
spec:
  selector: {app: nothing-matches}
  ports: [{port: 80, targetPort: 8080}]
"#;
    let lab = lab_with_proxy(manifest, &[]);
    let target = svc_addr(&lab, "default", "lonely", 80);
    let ext = lab.topology().ext().ns.clone();
    // The kernel rate-limits ICMP errors per destination (burst 6, then 1/s), upstream's
    // REJECT included; measure the rule, not the limiter.
    lab.topology()
        .exec_ok(
            &lab.node_ns(1),
            &["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"],
        )
        .unwrap();
    let refused = wait_for(Duration::from_secs(20), || {
        match tcp_connect_once(&ext, target, T) {
            Err(ProbeError::Refused) => Some(()),
            _ => None,
        }
    });
    assert!(
        refused.is_some(),
        "never refused; log:\n{}",
        lab.proxy_log(1)
    );
    for _ in 0..20 {
        let t0 = Instant::now();
        let res = tcp_connect_once(&ext, target, T);
        let took = t0.elapsed();
        assert!(matches!(res, Err(ProbeError::Refused)), "{res:?}");
        assert!(took < Duration::from_millis(100), "refusal took {took:?}");
    }
}

#[test]
fn scaling_is_followed_and_bursts_coalesce() {
    let lab = lab_with_proxy(REDIS, &[]);
    let mut lab = lab;
    let target = svc_addr(&lab, "default", "redis", 6379);
    let ext = lab.topology().ext().ns.clone();
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    for replicas in [3usize, 1] {
        lab.cluster
            .scale("default", "redis", replicas as u32)
            .unwrap();
        let want = pod_names(&lab, "redis-");
        assert_eq!(want.len(), replicas);
        let seen = wait_for(Duration::from_secs(15), || {
            let r = probe_tcp(&ext, target, 30, T).ok()?;
            let got: Vec<String> = r.answers.keys().cloned().collect();
            (r.total_ok() == 30 && got == want).then_some(got)
        });
        assert!(
            seen.is_some(),
            "answers never matched {want:?}; log:\n{}",
            lab.proxy_log(1)
        );
    }

    // A burst of 40 endpoint changes causes few syncs (min-sync-period 1s coalesces).
    let node = lab.node_ns(1);
    let syncs = |lab: &Lab| -> u64 {
        let (_, m) = http_get(&lab.node_ns(1), localhost(10249), "/metrics").unwrap();
        m.lines()
            .find(|l| l.starts_with("kubeproxy_sync_proxy_rules_duration_seconds_count"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let _ = node;
    let before = syncs(&lab);
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "burst", "namespace": "default"},
        "spec": {"ports": [{"port": 80}]}});
    lab.emulator.apply(svc).unwrap();
    let t0 = Instant::now();
    for i in 0..40 {
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "burst-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "burst"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [format!("10.250.0.{}", i + 1)], "conditions": {"ready": true}}],
            "ports": [{"port": 80, "protocol": "TCP"}]});
        lab.emulator.apply(slice).unwrap();
    }
    let burst_time = t0.elapsed();
    let applied = wait_for(Duration::from_secs(10), || {
        lab.iptables_save(1, "nat")
            .ok()
            .filter(|n| n.contains("--to-destination 10.250.0.40:80"))
    });
    assert!(applied.is_some(), "last change of the burst never applied");
    let after = syncs(&lab);
    let allowed = 3 + burst_time.as_secs();
    assert!(
        after - before <= allowed,
        "{} syncs for a burst of 41 changes in {burst_time:?}",
        after - before
    );
}

#[test]
fn deleted_service_leaves_no_rules() {
    let mut lab = lab_with_proxy(REDIS, &[]);
    let target = svc_addr(&lab, "default", "redis", 6379);
    let ext = lab.topology().ext().ns.clone();
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    lab.cluster
        .delete_object("v1", "Service", Some("default"), "redis")
        .unwrap();
    let ip = target.ip().to_string();
    let gone = wait_for(Duration::from_secs(15), || {
        let nat = lab.iptables_save(1, "nat").ok()?;
        let filter = lab.iptables_save(1, "filter").ok()?;
        let clean = !nat.contains(&ip)
            && !filter.contains(&ip)
            && !nat.contains("KUBE-SVC-")
            && !nat.contains("KUBE-SEP-");
        clean.then_some(())
    });
    assert!(
        gone.is_some(),
        "rules remain:\n{}",
        lab.iptables_save(1, "nat").unwrap()
    );
    assert!(tcp_connect_once(&ext, target, Duration::from_millis(500)).is_err());
}

#[test]
fn client_ip_affinity_keeps_one_client_on_one_pod() {
    let manifest = REDIS.replace(
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  sessionAffinity: ClientIP\n",
    );
    let lab = lab_with_proxy(&manifest, &[]);
    let target = svc_addr(&lab, "default", "redis", 6379);
    let ext = lab.topology().ext().ns.clone();
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    let r = probe_tcp(&ext, target, 50, T).unwrap();
    assert_eq!(r.total_ok(), 50, "{r}");
    assert_eq!(r.answers.len(), 1, "one client, one pod: {r}");
    let nat = lab.iptables_save(1, "nat").unwrap();
    assert!(nat.contains("--rcheck --seconds 10800 --reap"), "{nat}");
}

#[test]
fn dropped_watches_and_410_change_nothing_and_later_changes_apply() {
    let mut lab = lab_with_proxy(REDIS, &[]);
    let target = svc_addr(&lab, "default", "redis", 6379);
    let ext = lab.topology().ext().ns.clone();
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    let before = strip_counters(&lab.iptables_save(1, "nat").unwrap());

    let dropped = lab.emulator.drop_watches();
    assert!(dropped >= 2, "the proxy had watches open ({dropped})");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        strip_counters(&lab.iptables_save(1, "nat").unwrap()),
        before,
        "rules changed after a dropped watch"
    );
    let r = probe_tcp(&ext, target, 20, T).unwrap();
    assert_eq!(r.total_ok(), 20, "{r}");

    // History compacted: resuming watches get 410 Gone and relist; still nothing changes.
    lab.emulator.compact();
    lab.emulator.drop_watches();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        strip_counters(&lab.iptables_save(1, "nat").unwrap()),
        before,
        "rules changed after 410 Gone"
    );

    // The next change is still applied.
    lab.cluster.scale("default", "redis", 3).unwrap();
    let want = pod_names(&lab, "redis-");
    let seen = wait_for(Duration::from_secs(15), || {
        let r = probe_tcp(&ext, target, 30, T).ok()?;
        (r.answers.len() == 3).then_some(())
    });
    assert!(
        seen.is_some(),
        "scale to {want:?} not applied after watch faults; log:\n{}",
        lab.proxy_log(1)
    );
}

#[test]
fn cleanup_restores_the_tables_as_they_were() {
    assert!(nix::unistd::geteuid().is_root());
    let mut lab = Lab::new(1).unwrap();
    let node = lab.node_ns(1);
    // Someone else's rules (a CNI's), which must survive.
    for args in [
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.244.0.0/16",
            "!",
            "-d",
            "10.244.0.0/16",
            "-j",
            "MASQUERADE",
        ][..],
        &[
            "iptables", "-t", "filter", "-A", "FORWARD", "-i", "cbr0", "-j", "ACCEPT",
        ][..],
    ] {
        lab.topology().exec_ok(&node, args).unwrap();
    }
    let nat_before = strip_counters(&lab.iptables_save(1, "nat").unwrap());
    let filter_before = strip_counters(&lab.iptables_save(1, "filter").unwrap());
    lab.cluster.apply_manifest(REDIS).unwrap();
    lab.start_proxy(std::path::Path::new(BIN), 1, &[]).unwrap();
    let target = svc_addr(&lab, "default", "redis", 6379);
    wait_serving(
        &lab,
        &lab.topology().ext().ns.clone(),
        target,
        Duration::from_secs(20),
    );
    lab.stop_proxy(1, false);
    // Stopping does not remove rules.
    assert!(
        lab.iptables_save(1, "nat")
            .unwrap()
            .contains("KUBE-SERVICES")
    );
    let out = lab.topology().exec(&node, &[BIN, "--cleanup"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        strip_counters(&lab.iptables_save(1, "nat").unwrap()),
        nat_before
    );
    assert_eq!(
        strip_counters(&lab.iptables_save(1, "filter").unwrap()),
        filter_before
    );
}

#[test]
fn flushed_rules_are_restored_within_sync_period() {
    let lab = lab_with_proxy(REDIS, &["--iptables-sync-period=1s"]);
    let target = svc_addr(&lab, "default", "redis", 6379);
    let ext = lab.topology().ext().ns.clone();
    let node = lab.node_ns(1);
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    for flush in [
        &["iptables", "-t", "nat", "-F"][..],
        &["iptables", "-t", "nat", "-X"][..],
        &["nft", "flush", "ruleset"][..],
    ] {
        if flush[1] == "-t" && flush[3] == "-X" {
            // -X needs empty, unreferenced chains: flush first.
            lab.topology()
                .exec_ok(&node, &["iptables", "-t", "nat", "-F"])
                .unwrap();
        }
        lab.topology().exec_ok(&node, flush).unwrap();
        assert!(
            tcp_connect_once(&ext, target, Duration::from_millis(300)).is_err(),
            "{flush:?} broke the service"
        );
        let t0 = Instant::now();
        wait_serving(&lab, &ext, target, Duration::from_secs(10));
        eprintln!("{flush:?}: restored in {:?}", t0.elapsed());
    }
    assert!(lab.proxy_log(1).contains("forcing a full sync"));
}

#[test]
fn failing_iptables_restore_is_logged_counted_retried() {
    assert!(nix::unistd::geteuid().is_root());
    let mut lab = Lab::new(1).unwrap();
    lab.cluster.apply_manifest(REDIS).unwrap();
    // A wrapper that fails while a marker file exists.
    let bin = lab.workdir().join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let marker = lab.workdir().join("fail-restore");
    let real = ["/usr/sbin/iptables-restore", "/sbin/iptables-restore"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap();
    let script = format!(
        "#!/bin/sh\nif [ -e {m} ]; then cat >/dev/null; echo 'iptables-restore: line 2 failed' >&2; exit 1; fi\nexec {real} \"$@\"\n",
        m = marker.display()
    );
    let wrapper = bin.join("iptables-restore");
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    lab.proxy_env.push(("PATH".into(), path));
    lab.start_proxy(std::path::Path::new(BIN), 1, &["--iptables-sync-period=1s"])
        .unwrap();
    let target = svc_addr(&lab, "default", "redis", 6379);
    let ext = lab.topology().ext().ns.clone();
    let node = lab.node_ns(1);
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    assert_eq!(
        http_get(&node, localhost(10256), "/healthz").unwrap().0,
        200
    );

    std::fs::write(&marker, "").unwrap();
    lab.cluster.scale("default", "redis", 3).unwrap();
    let failed = wait_for(Duration::from_secs(10), || {
        (metric(
            &metrics(&lab, 1),
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            &[],
        ) >= 2.0)
            .then_some(())
    });
    assert!(
        failed.is_some(),
        "failures not counted; log:\n{}",
        lab.proxy_log(1)
    );
    assert!(
        metric(
            &metrics(&lab, 1),
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            &[]
        ) >= 1.0
    );
    let log = lab.proxy_log(1);
    assert!(
        log.contains("failed to apply proxy rules") && log.contains("line 2 failed"),
        "{log}"
    );
    assert!(log.contains("retrying with a full sync"), "{log}");
    // The old rules still serve the two original pods.
    let r = probe_tcp(&ext, target, 20, T).unwrap();
    assert_eq!(r.total_ok(), 20, "{r}");
    // A queued change not applied within 2 x syncPeriod turns /healthz to 503.
    let unhealthy = wait_for(Duration::from_secs(10), || {
        (http_get(&node, localhost(10256), "/healthz").ok()?.0 == 503).then_some(())
    });
    assert!(
        unhealthy.is_some(),
        "/healthz stayed 200 while syncs failed"
    );
    // Upstream's /livez applies the same staleness rule (it only ignores node eligibility).
    assert_eq!(http_get(&node, localhost(10256), "/livez").unwrap().0, 503);

    std::fs::remove_file(&marker).unwrap();
    let healed = wait_for(Duration::from_secs(15), || {
        let r = probe_tcp(&ext, target, 30, T).ok()?;
        (r.answers.len() == 3).then_some(())
    });
    assert!(
        healed.is_some(),
        "change not applied after the failure cleared; log:\n{}",
        lab.proxy_log(1)
    );
}

#[test]
fn invalid_objects_are_skipped_and_unusual_ones_work() {
    let lab = lab_with_proxy(REDIS, &[]);
    let target = svc_addr(&lab, "default", "redis", 6379);
    let ext = lab.topology().ext().ns.clone();
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    let pods: Vec<String> = lab
        .cluster
        .pods()
        .into_iter()
        .map(|p| p.ip.to_string())
        .collect();

    // Only a bad key or primary cluster IP skips the Service; a bad port drops that port.
    const WHOLE: &str = "skipping invalid Service";
    const PORT: &str = "ignoring part of Service";
    let bad = [
        (
            "bad-ip",
            json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}),
            "spec.clusterIP",
            WHOLE,
        ),
        (
            "port-zero",
            json!({"clusterIP": "10.96.1.1", "ports": [{"port": 0}]}),
            "spec.ports[0].port",
            PORT,
        ),
        (
            "port-big",
            json!({"clusterIP": "10.96.1.2", "ports": [{"port": 70000}]}),
            "spec.ports[0].port",
            PORT,
        ),
        (
            "proto",
            json!({"clusterIP": "10.96.1.3", "ports": [{"port": 80, "protocol": "ICMP"}]}),
            "unknown protocol",
            PORT,
        ),
        (
            "dup",
            json!({"clusterIP": "10.96.1.4", "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
            "duplicate port",
            PORT,
        ),
        (
            "quote\"; -j ACCEPT",
            json!({"clusterIP": "10.96.1.5", "ports": [{"port": 80}]}),
            "metadata.name",
            WHOLE,
        ),
        (
            "new\nline",
            json!({"clusterIP": "10.96.1.6", "ports": [{"port": 80}]}),
            "metadata.name",
            WHOLE,
        ),
        (
            "sp ace",
            json!({"clusterIP": "10.96.1.7", "ports": [{"port": 80}]}),
            "metadata.name",
            WHOLE,
        ),
    ];
    for (name, spec, _, _) in &bad {
        lab.emulator
            .apply_unvalidated(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}))
            .unwrap();
    }
    // A slice with one invalid and one valid address.
    lab.emulator
        .apply_unvalidated(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "odd-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "odd"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.999"]}, {"addresses": [pods[0]]}],
            "ports": [{"port": 6379, "protocol": "TCP"}]}))
        .unwrap();
    // Valid but unusual: longest names, annotations with quotes, newlines and unicode.
    let long = "n".repeat(63);
    lab.emulator
        .apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": long, "namespace": "default",
                "annotations": {"note": "quote \" newline \n unicode ü -j ACCEPT; $(reboot)"}},
            "spec": {"clusterIP": "10.96.2.2", "ports": [{"name": "a-very-long-nam", "port": 80}]}}))
        .unwrap();
    lab.emulator
        .apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{long}-x"), "namespace": "default", "labels": {"kubernetes.io/service-name": long}},
            "addressType": "IPv4", "endpoints": [{"addresses": [pods[1]]}],
            "ports": [{"name": "a-very-long-nam", "port": 6379, "protocol": "TCP"}]}))
        .unwrap();
    lab.emulator
        .apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "odd", "namespace": "default"},
            "spec": {"clusterIP": "10.96.2.3", "ports": [{"port": 80}]}}))
        .unwrap();

    let unusual: SocketAddr = "10.96.2.2:80".parse().unwrap();
    wait_serving(&lab, &ext, unusual, Duration::from_secs(15));
    let odd: SocketAddr = "10.96.2.3:80".parse().unwrap();
    wait_serving(&lab, &ext, odd, Duration::from_secs(15));
    let r = probe_tcp(&ext, target, 50, T).unwrap();
    assert_eq!(r.total_ok(), 50, "redis disturbed: {r}");

    let log = lab.proxy_log(1);
    for (name, _, field, what) in &bad {
        let who = format!("service=default/{}", name.escape_debug());
        assert!(
            log.lines()
                .any(|l| l.contains(what) && l.contains(&who) && l.contains(field)),
            "no warning for {name:?} naming {field}:\n{log}"
        );
    }
    // Hostile names cannot forge log lines: every line is a tracing record.
    assert!(log.lines().all(|l| l.starts_with("20")), "{log}");
    assert!(
        log.contains("ignoring part of EndpointSlice") && log.contains("10.244.1.999"),
        "{log}"
    );
    let nat = lab.iptables_save(1, "nat").unwrap();
    let filter = lab.iptables_save(1, "filter").unwrap();
    for text in [&nat, &filter] {
        assert!(
            !text.contains("ACCEPT;") && !text.contains("quote") && !text.contains("reboot"),
            "{text}"
        );
        // "dup" keeps its first port (10.96.1.4:80); the others have no valid port left.
        for ip in [
            "10.96.1.1/",
            "10.96.1.2/",
            "10.96.1.3/",
            "10.96.1.5/",
            "10.96.1.6/",
            "10.96.1.7/",
        ] {
            assert!(!text.contains(ip), "invalid services got rules: {text}");
        }
    }
    assert_eq!(
        metric(
            &metrics(&lab, 1),
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            &[]
        ),
        0.0
    );
}

#[test]
fn nothing_is_programmed_before_the_first_full_lists() {
    assert!(nix::unistd::geteuid().is_root());
    let mut lab = Lab::new(1).unwrap();
    lab.cluster.apply_manifest(REDIS).unwrap();
    // The API answers 500 for a while: the proxy must not write rules from partial state.
    lab.emulator.set_fail_requests(6, 500);
    lab.start_proxy(std::path::Path::new(BIN), 1, &[]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let early = lab.iptables_save(1, "nat").unwrap();
    let lists_done = lab
        .emulator
        .request_log()
        .iter()
        .filter(|r| r.status == 200 && r.path.contains("endpointslices"))
        .count();
    if lists_done == 0 {
        assert!(
            !early.contains("KUBE-SERVICES"),
            "rules written before the lists completed:\n{early}"
        );
    }
    let target = svc_addr(&lab, "default", "redis", 6379);
    wait_serving(
        &lab,
        &lab.topology().ext().ns.clone(),
        target,
        Duration::from_secs(30),
    );
    assert!(
        lab.emulator.request_log().iter().any(|r| r.status == 500),
        "the fault was injected"
    );
}

#[test]
fn client_certificate_kubeconfig_works() {
    assert!(nix::unistd::geteuid().is_root());
    let mut lab = Lab::new(1).unwrap();
    lab.cluster.apply_manifest(REDIS).unwrap();
    let kc = lab.workdir().join("cert-kubeconfig");
    std::fs::write(
        &kc,
        lab.emulator
            .kubeconfig_yaml_client_cert("https://127.0.0.1:6443"),
    )
    .unwrap();
    std::fs::set_permissions(&kc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // A later --kubeconfig flag overrides the token kubeconfig the lab passes.
    lab.start_proxy(
        std::path::Path::new(BIN),
        1,
        &[&format!("--kubeconfig={}", kc.display())],
    )
    .unwrap();
    let target = svc_addr(&lab, "default", "redis", 6379);
    wait_serving(
        &lab,
        &lab.topology().ext().ns.clone(),
        target,
        Duration::from_secs(20),
    );
    assert!(
        lab.emulator.request_log().iter().all(|r| r.status != 401),
        "no unauthorised requests"
    );
}

#[test]
fn external_ips_reach_the_pods() {
    let manifest = REDIS.replace(
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  externalIPs: [203.0.113.50]\n",
    );
    let lab = lab_with_proxy(&manifest, &[]);
    let ext = lab.topology().ext().ns.clone();
    let node_ip = lab.topology().node(1).unwrap().ip.to_string();
    lab.topology()
        .exec_ok(
            &ext,
            &["ip", "route", "add", "203.0.113.50/32", "via", &node_ip],
        )
        .unwrap();
    let target: SocketAddr = "203.0.113.50:6379".parse().unwrap();
    wait_serving(&lab, &ext, target, Duration::from_secs(20));
    let r = probe_tcp(&ext, target, 40, T).unwrap();
    assert_eq!(r.total_ok(), 40, "{r}");
    assert_eq!(r.answers.len(), 2, "both pods: {r}");
    assert!(
        !r.sources_seen.contains_key("198.18.0.2"),
        "externalTrafficPolicy Cluster masquerades: {r}"
    );
    let nat = lab.iptables_save(1, "nat").unwrap();
    assert!(nat.contains("default/redis:redis external IP"), "{nat}");
}
