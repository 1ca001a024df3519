//! Mode-independent checks of basic Service paths that the iptables-specific e2e file also
//! covers with rule-text assertions: the redis walk-through, externalIPs, ClientIP
//! affinity, and REJECT for services without endpoints. Runs in the mode from
//! `KP_PROXY_MODE`. Needs root.

mod common;
use common::*;

use std::time::{Duration, Instant};

use kp_testkit::probe::{ProbeError, probe_tcp, tcp_connect_once};
use serde_json::{Value, json};

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

/// Names and metadata at the API server's limits: a 63-character namespace, Service name
/// and port names (not the 15-character container-port rule), a 253-character
/// EndpointSlice name, label keys and values and a large annotation. The Service is
/// programmed on every port (TCP, UDP, NodePort), follows endpoint and port updates, and
/// its deletion removes it.
#[test]
fn names_at_the_api_servers_limits_are_programmed_updated_and_deleted() {
    let ns = format!("limits-{}", "n".repeat(56));
    let name = format!("svc-{}", "s".repeat(59));
    let port_names = [
        format!("tcp-{}", "a".repeat(59)),
        format!("udp-{}", "b".repeat(59)),
        format!("alt-{}", "c".repeat(59)),
    ];
    let slice_name = format!(
        "{}.{}.{}.{}",
        "e".repeat(63),
        "f".repeat(63),
        "g".repeat(63),
        "h".repeat(61)
    );
    for s in [&ns, &name, &port_names[0], &port_names[1], &port_names[2]] {
        assert_eq!(s.len(), 63);
    }
    assert_eq!(slice_name.len(), 253);
    let label_key = format!("{}/{}", "k".repeat(253), "l".repeat(63));

    let mut lab = new_lab(1);
    let mut pods = deployment("lim", 2, &[("TCP", 8080), ("UDP", 5353)]);
    pods["metadata"]["namespace"] = json!(ns);
    apply(&mut lab, &[pods]);
    let p = pods_of(&lab, "lim");
    let port = |i: usize, port: u16, proto: &str| json!({"name": port_names[i], "port": port, "targetPort": 8080, "protocol": proto});
    let svc = |ports: Vec<Value>| {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name,
                "labels": {label_key.clone(): "v".repeat(63)},
                "annotations": {"note": "x".repeat(128 * 1024)}},
            "spec": {"type": "NodePort", "ports": ports}})
    };
    lab.emulator
        .apply(svc(vec![
            port(0, 80, "TCP"),
            port(1, 53, "UDP"),
            port(2, 81, "TCP"),
        ]))
        .expect("service at the limits");
    let slice = |pods: &[&kp_testkit::cluster::PodInfo]| {
        let eps: Vec<Value> = pods
            .iter()
            .map(|p| json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true},
                "nodeName": p.node, "targetRef": {"kind": "Pod", "namespace": p.namespace, "name": p.name}}))
            .collect();
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": slice_name, "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "scenario-test",
                label_key.clone(): "w".repeat(63)}},
            "addressType": "IPv4", "endpoints": eps,
            "ports": [
                {"name": port_names[0], "port": 8080, "protocol": "TCP"},
                {"name": port_names[1], "port": 5353, "protocol": "UDP"},
                {"name": port_names[2], "port": 8080, "protocol": "TCP"}]})
    };
    lab.emulator
        .apply(slice(&[&p[0], &p[1]]))
        .expect("slice at the limits");
    start(&mut lab, 1, &[]);

    let ext = ext_ns(&lab);
    let ip = lab
        .emulator
        .get("v1", "Service", Some(&ns), &name)
        .expect("stored")["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse::<std::net::IpAddr>().ok())
        .expect("clusterIP");
    let stored = lab.emulator.get("v1", "Service", Some(&ns), &name).unwrap();
    let node_port = stored["spec"]["ports"][0]["nodePort"].as_u64().unwrap() as u16;
    let both = [&p[0], &p[1]];
    see(&lab, &ext, addr(ip, 80), &both, "first port");
    see_l4(&lab, &ext, addr(ip, 53), L4::Udp, &both, "UDP port");
    see(&lab, &ext, addr(ip, 81), &both, "third port");
    see(
        &lab,
        &ext,
        addr(node_ip(&lab, 1), node_port),
        &both,
        "NodePort",
    );
    assert!(
        !logs(&lab).contains("skipping invalid") && !logs(&lab).contains("ignoring part"),
        "{}",
        logs(&lab)
    );
    if iptables_mode() {
        let nat = save(&lab, 1, "iptables-save", "nat");
        let comment = format!("{ns}/{name}:{}", port_names[0]);
        assert!(nat.contains(&comment), "{comment} in\n{nat}");
    }

    // Endpoint update: one pod left.
    lab.emulator.apply(slice(&[&p[0]])).expect("slice update");
    see(&lab, &ext, addr(ip, 80), &[&p[0]], "after endpoint update");
    see_l4(
        &lab,
        &ext,
        addr(ip, 53),
        L4::Udp,
        &[&p[0]],
        "UDP after update",
    );
    // Port update: the third port moves from 81 to 82.
    lab.emulator
        .apply(svc(vec![
            port(0, 80, "TCP"),
            port(1, 53, "UDP"),
            port(2, 82, "TCP"),
        ]))
        .expect("service update");
    see(&lab, &ext, addr(ip, 82), &[&p[0]], "moved port");
    let gone = kp_testkit::lab::wait_for(SETTLE, || {
        (probe(&ext, addr(ip, 81), L4::Tcp, 3, SHORT).total_ok() == 0).then_some(())
    });
    assert!(gone.is_some(), "old port 81 still answered\n{}", logs(&lab));

    // Deletion: nothing answers on any port.
    lab.emulator
        .delete("v1", "Service", Some(&ns), &name)
        .expect("delete");
    let gone = kp_testkit::lab::wait_for(SETTLE, || {
        let answered = probe(&ext, addr(ip, 80), L4::Tcp, 3, SHORT).total_ok()
            + probe(&ext, addr(ip, 82), L4::Tcp, 3, SHORT).total_ok()
            + probe(&ext, addr(node_ip(&lab, 1), node_port), L4::Tcp, 3, SHORT).total_ok();
        (answered == 0).then_some(())
    });
    assert!(
        gone.is_some(),
        "deleted Service still answered\n{}",
        logs(&lab)
    );
    if iptables_mode() {
        let nat = save(&lab, 1, "iptables-save", "nat");
        assert!(!nat.contains(&name[..20]), "rules left:\n{nat}");
    }
}
