//! Real-kernel, multi-node scenarios for endpoint selection: the `kube-proxy-rs` binary
//! runs in each node namespace of a two-node lab against the API emulator, and real TCP
//! traffic checks which pod answered and which client address it saw. Covers endpoint
//! conditions (terminating fallback), topology hints, the objects the proxy must ignore,
//! and the metrics and events. Expected behaviour is upstream kube-proxy's (iptables mode).
//!
//! The proxy mode comes from `KP_PROXY_MODE` (default `iptables`) so the same traffic
//! assertions can run for other modes; rule-text checks only run in iptables mode.
//! Needs root. Every test builds its own lab.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use kp_testkit::cluster::PodInfo;
use kp_testkit::lab::{Lab, http_get, localhost, wait_for};
use kp_testkit::probe::{ProbeReport, tcp_connect_once};
use serde_json::{Value, json};

/// A selector-less Service on port 80 (target 8080), with extra `spec` fields.
fn selectorless(name: &str, extra: Value) -> Value {
    let mut spec = json!({"ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    service(name, spec)
}

/// EndpointSlice conditions: (ready, serving, terminating).
type Cond = (bool, bool, bool);
const READY: Cond = (true, true, false);
const NOT_READY: Cond = (false, false, false);
const SERVING_TERMINATING: Cond = (false, true, true);
const TERMINATING: Cond = (false, false, true);

fn endpoint(pod: &PodInfo, ip: IpAddr, (ready, serving, terminating): Cond) -> Value {
    json!({"addresses": [ip.to_string()],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": pod.node,
        "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name}})
}

fn hinted(mut ep: Value, zones: &[&str], nodes: &[&str]) -> Value {
    let names = |v: &[&str]| -> Vec<Value> { v.iter().map(|n| json!({"name": n})).collect() };
    let mut hints = serde_json::Map::new();
    if !zones.is_empty() {
        hints.insert("forZones".into(), json!(names(zones)));
    }
    if !nodes.is_empty() {
        hints.insert("forNodes".into(), json!(names(nodes)));
    }
    ep["hints"] = Value::Object(hints);
    ep
}

/// An EndpointSlice for Service `service` (port 8080/TCP, unnamed), written by "us".
fn slice(name: &str, service: &str, address_type: &str, endpoints: Vec<Value>) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {
            "kubernetes.io/service-name": service,
            "endpointslice.kubernetes.io/managed-by": "scenario-test"}},
        "addressType": address_type, "endpoints": endpoints,
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]})
}

/// Gives each Node object the zone label `zones[i]` (node1 first).
fn label_zones(lab: &Lab, zones: &[&str]) {
    for (i, zone) in zones.iter().enumerate() {
        let name = format!("node{}", i + 1);
        let mut node = lab.emulator.get("v1", "Node", None, &name).expect("node");
        node["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!(zone);
        lab.emulator.apply(node).expect("label node");
    }
}

/// Writes slice `<svc>-1` of `svc` with one endpoint per pod, conditions in pod order.
fn write_conditions(lab: &Lab, svc: &str, pods: &[PodInfo], conds: [Cond; 4]) {
    let eps = pods
        .iter()
        .zip(conds)
        .map(|(p, c)| endpoint(p, p.ip, c))
        .collect();
    lab.emulator
        .apply(slice(&format!("{svc}-1"), svc, "IPv4", eps))
        .expect("slice");
}

// ---------------------------------------------------------------- 1. conditions

/// Ready endpoints only; with none ready the serving+terminating ones; never
/// not-serving ones; with nothing usable the ClusterIP is rejected.
#[test]
fn endpoint_conditions_ready_then_serving_terminating() {
    let mut lab = new_lab(2);
    apply(&mut lab, &[deployment("cond", 4, &[("TCP", 8080)])]);
    let p = pods_of(&lab, "cond");
    lab.emulator.apply(selectorless("cond", json!({}))).unwrap();
    start_proxies(&mut lab, &[]);
    let target = addr(cluster_ip(&lab, "cond"), 80);
    let froms = [ext_ns(&lab), lab.node_ns(2)];

    write_conditions(
        &lab,
        "cond",
        &p,
        [READY, NOT_READY, SERVING_TERMINATING, TERMINATING],
    );
    for from in &froms {
        see(&lab, from, target, &[&p[0]], "only the ready endpoint");
    }
    // No endpoint ready: the serving+terminating ones take over, not-serving ones never.
    let conds = [
        SERVING_TERMINATING,
        NOT_READY,
        SERVING_TERMINATING,
        TERMINATING,
    ];
    write_conditions(&lab, "cond", &p, conds);
    for from in &froms {
        see(&lab, from, target, &[&p[0], &p[2]], "terminating fallback");
    }
    // One becomes ready again: the terminating ones are no longer used.
    write_conditions(
        &lab,
        "cond",
        &p,
        [SERVING_TERMINATING, READY, SERVING_TERMINATING, TERMINATING],
    );
    for from in &froms {
        see(&lab, from, target, &[&p[1]], "ready wins again");
    }
    // Nothing ready or serving: no usable endpoint, the ClusterIP is rejected.
    write_conditions(
        &lab,
        "cond",
        &p,
        [TERMINATING, NOT_READY, TERMINATING, NOT_READY],
    );
    for from in &froms {
        expect_failure(
            &lab,
            from,
            target,
            L4::Tcp,
            "Refused",
            "no serving endpoint",
        );
    }
}

/// externalTrafficPolicy Local: each node's local set falls back to its own
/// serving+terminating endpoints independently of the cluster set; a node without any
/// usable local endpoint drops NodePort traffic; the client address is preserved.
#[test]
fn endpoint_conditions_local_policy_falls_back_separately() {
    let mut lab = new_lab(2);
    apply(&mut lab, &[deployment("lp", 4, &[("TCP", 8080)])]);
    let p = pods_of(&lab, "lp");
    assert_eq!((p[0].node.as_str(), p[1].node.as_str()), ("node1", "node2"));
    let spec = json!({"type": "NodePort", "externalTrafficPolicy": "Local",
        "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30081}]});
    lab.emulator.apply(selectorless("lp", spec)).unwrap();
    start_proxies(&mut lab, &[]);
    let ext = ext_ns(&lab);
    let cip = addr(cluster_ip(&lab, "lp"), 80);
    let (np1, np2) = (addr(node_ip(&lab, 1), 30081), addr(node_ip(&lab, 2), 30081));
    let client_kept = |r: &ProbeReport| {
        let seen: Vec<&String> = r.sources_seen.keys().collect();
        assert_eq!(
            seen,
            vec![EXT_IP],
            "ETP Local keeps the client address: {r}"
        );
    };

    // node1: p0 serving+terminating, p2 not ready. node2: p1 ready, p3 not ready.
    write_conditions(
        &lab,
        "lp",
        &p,
        [SERVING_TERMINATING, READY, NOT_READY, NOT_READY],
    );
    see(&lab, &ext, cip, &[&p[1]], "cluster set: the ready endpoint");
    client_kept(&see(
        &lab,
        &ext,
        np1,
        &[&p[0]],
        "node1 local set: terminating fallback",
    ));
    client_kept(&see(&lab, &ext, np2, &[&p[1]], "node2 local set: ready"));

    // p1 stops serving: the cluster set falls back to p0; node2 has nothing local.
    write_conditions(
        &lab,
        "lp",
        &p,
        [SERVING_TERMINATING, TERMINATING, NOT_READY, NOT_READY],
    );
    see(
        &lab,
        &ext,
        cip,
        &[&p[0]],
        "cluster set: terminating fallback",
    );
    see(&lab, &lab.node_ns(2), cip, &[&p[0]], "node2 cluster set");
    client_kept(&see(&lab, &ext, np1, &[&p[0]], "node1 local set unchanged"));
    expect_failure(
        &lab,
        &ext,
        np2,
        L4::Tcp,
        "Timeout",
        "node2 without local endpoints",
    );
}

// ---------------------------------------------------------------- 2. topology hints

/// trafficDistribution PreferClose with zone hints: each node uses its zone's
/// endpoints; one endpoint without hints makes every node use all endpoints; a changed
/// zone label is followed.
#[test]
fn topology_zone_hints() {
    let mut lab = new_lab(2);
    label_zones(&lab, &["zone-a", "zone-b"]);
    apply(&mut lab, &[deployment("zonal", 4, &[("TCP", 8080)])]);
    let p = pods_of(&lab, "zonal");
    let svc = selectorless("zonal", json!({"trafficDistribution": "PreferClose"}));
    lab.emulator.apply(svc).unwrap();
    start_proxies(&mut lab, &[]);
    let write = |unhinted: Option<usize>| {
        let ep = |(i, pod): (usize, &PodInfo)| {
            let zone = if pod.node == "node1" {
                "zone-a"
            } else {
                "zone-b"
            };
            let ep = endpoint(pod, pod.ip, READY);
            if Some(i) == unhinted {
                ep
            } else {
                hinted(ep, &[zone], &[])
            }
        };
        let eps = p.iter().enumerate().map(ep).collect();
        lab.emulator
            .apply(slice("zonal-1", "zonal", "IPv4", eps))
            .unwrap();
    };
    write(None);
    let target = addr(cluster_ip(&lab, "zonal"), 80);
    let (ext, node1, node2) = (ext_ns(&lab), lab.node_ns(1), lab.node_ns(2));
    let (zone_a, zone_b) = ([&p[0], &p[2]], [&p[1], &p[3]]);
    see(&lab, &node1, target, &zone_a, "node1 (OUTPUT), zone-a");
    see(
        &lab,
        &ext,
        target,
        &zone_a,
        "ext via node1 (PREROUTING), zone-a",
    );
    see(&lab, &node2, target, &zone_b, "node2 (OUTPUT), zone-b");

    // One endpoint without hints: hints are ignored, all endpoints are used.
    write(Some(3));
    let all: Vec<&PodInfo> = p.iter().collect();
    see(&lab, &node1, target, &all, "node1, incomplete hints");
    see(&lab, &node2, target, &all, "node2, incomplete hints");

    // Hints back; node1 moves to zone-b: its proxy follows its Node's labels.
    write(None);
    see(&lab, &node1, target, &zone_a, "node1, hints restored");
    label_zones(&lab, &["zone-b", "zone-b"]);
    see(&lab, &node1, target, &zone_b, "node1 relabelled zone-b");
}

/// forNodes hints (trafficDistribution PreferSameNode) restrict each node to its own
/// endpoints, and win over zone hints; one endpoint without a node hint falls back to
/// the zone hints.
#[test]
fn topology_same_node_hints() {
    let mut lab = new_lab(2);
    label_zones(&lab, &["zone-a", "zone-b"]);
    apply(&mut lab, &[deployment("samenode", 4, &[("TCP", 8080)])]);
    let p = pods_of(&lab, "samenode");
    let svc = selectorless("samenode", json!({"trafficDistribution": "PreferSameNode"}));
    lab.emulator.apply(svc).unwrap();
    start_proxies(&mut lab, &[]);
    // Zone hints all say zone-a, so zone-based routing would send node1 everywhere and
    // node2 (zone-b, no endpoint for it) everywhere too: only node hints restrict.
    let write = |without_node_hint: Option<usize>| {
        let ep = |(i, pod): (usize, &PodInfo)| {
            let node = [pod.node.as_str()];
            let nodes: &[&str] = if Some(i) == without_node_hint {
                &[]
            } else {
                &node
            };
            hinted(endpoint(pod, pod.ip, READY), &["zone-a"], nodes)
        };
        let eps = p.iter().enumerate().map(ep).collect();
        lab.emulator
            .apply(slice("samenode-1", "samenode", "IPv4", eps))
            .unwrap();
    };
    write(None);
    let target = addr(cluster_ip(&lab, "samenode"), 80);
    let (node1, node2) = (lab.node_ns(1), lab.node_ns(2));
    see(
        &lab,
        &node1,
        target,
        &[&p[0], &p[2]],
        "node1, own endpoints",
    );
    see(
        &lab,
        &node2,
        target,
        &[&p[1], &p[3]],
        "node2, own endpoints",
    );

    write(Some(3));
    let all: Vec<&PodInfo> = p.iter().collect();
    see(&lab, &node1, target, &all, "node1, zone-a hints cover all");
    see(&lab, &node2, target, &all, "node2, no zone-b hint: all");
}

// ---------------------------------------------------------------- 4. ignored objects

/// Headless, ExternalName and other-proxy Services, and slices labelled headless,
/// without a service name, or of address type FQDN are ignored; a normal Service is
/// unaffected.
#[test]
fn ignored_services_and_slices_change_nothing() {
    let mut lab = new_lab(2);
    let ports = json!([{"port": 80, "targetPort": 8080, "protocol": "TCP"}]);
    let mut other_proxy = service(
        "other-proxy",
        json!({"type": "NodePort",
        "clusterIP": "10.96.200.3", "selector": {"app": "decoy"},
        "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30099}]}),
    );
    other_proxy["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "other"});
    apply(
        &mut lab,
        &[
            deployment("normal", 2, &[("TCP", 8080)]),
            deployment("decoy", 2, &[("TCP", 8080)]),
            service(
                "normal",
                json!({"selector": {"app": "normal"}, "ports": ports}),
            ),
            service(
                "headless",
                json!({"clusterIP": "None", "selector": {"app": "decoy"}, "ports": ports}),
            ),
            service(
                "extname",
                json!({"type": "ExternalName", "externalName": "example.com", "ports": ports}),
            ),
            other_proxy,
        ],
    );
    let (normal, decoy) = (pods_of(&lab, "normal"), pods_of(&lab, "decoy"));
    // Slices that name the normal Service but must be ignored, each with a decoy pod.
    let decoy_ep = |i: usize| endpoint(&decoy[i], decoy[i].ip, READY);
    let mut headless_labelled = slice("normal-headless", "normal", "IPv4", vec![decoy_ep(0)]);
    headless_labelled["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    let mut orphan = slice("normal-orphan", "normal", "IPv4", vec![decoy_ep(1)]);
    orphan["metadata"]["labels"] = json!({});
    orphan["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "Service", "name": "normal", "uid": "x"}]);
    // An IP is a valid DNS subdomain, so an FQDN slice can carry one.
    let fqdn = slice("normal-fqdn", "normal", "FQDN", vec![decoy_ep(0)]);
    lab.emulator.apply(headless_labelled).unwrap();
    lab.emulator.apply(orphan).unwrap();
    start_proxies(&mut lab, &[]);
    let ext = ext_ns(&lab);
    let target = addr(cluster_ip(&lab, "normal"), 80);
    let want: Vec<&PodInfo> = normal.iter().collect();
    see(&lab, &ext, target, &want, "normal service");

    // Later additions go through the watch path: an FQDN slice, then a barrier Service
    // with its own slice, which shows the proxy has seen what came before.
    lab.emulator.apply(fqdn).unwrap();
    lab.emulator
        .apply(selectorless("barrier", json!({"clusterIP": "10.96.200.9"})))
        .unwrap();
    let barrier = slice(
        "barrier-1",
        "barrier",
        "IPv4",
        vec![endpoint(&normal[0], normal[0].ip, READY)],
    );
    lab.emulator.apply(barrier).unwrap();
    see(&lab, &ext, sa("10.96.200.9:80"), &[&normal[0]], "barrier");
    for from in [ext.clone(), lab.node_ns(2)] {
        see(
            &lab,
            &from,
            target,
            &want,
            "normal service, after ignored objects",
        );
    }
    for target in [sa("10.96.200.3:80"), addr(node_ip(&lab, 1), 30099)] {
        let res = tcp_connect_once(&ext, target, SHORT);
        assert!(
            res.is_err(),
            "other-proxy {target} served by this proxy: {res:?}"
        );
    }
    if !iptables_mode() {
        return;
    }
    let mut forbidden: Vec<String> = ["10.96.200.3", "30099", "example.com"]
        .map(String::from)
        .into();
    forbidden.extend(["headless", "extname", "other-proxy"].map(|s| format!("default/{s}")));
    forbidden.extend(
        decoy
            .iter()
            .flat_map(|p| [format!("{}:", p.ip), format!("{}/32", p.ip)]),
    );
    for n in [1, 2] {
        let rules =
            save(&lab, n, "iptables-save", "nat") + &save(&lab, n, "iptables-save", "filter");
        for f in &forbidden {
            assert!(
                !rules.contains(f.as_str()),
                "node{n}: rules mention {f}:\n{rules}"
            );
        }
    }
}

// ---------------------------------------------------------------- 6. metrics, events

#[test]
fn metrics_and_events() {
    let mut lab = new_lab(2);
    start_proxies(&mut lab, &[]);
    // Created after the proxies started, so the slices' trigger times count.
    apply(
        &mut lab,
        &[
            deployment("mx", 2, &[("TCP", 8080)]),
            service(
                "mx",
                json!({"selector": {"app": "mx"}, "ports": [{"port": 80, "targetPort": 8080}]}),
            ),
        ],
    );
    let ext = ext_ns(&lab);
    let target = addr(cluster_ip(&lab, "mx"), 80);
    see(
        &lab,
        &ext,
        target,
        &pods_of(&lab, "mx").iter().collect::<Vec<_>>(),
        "mx",
    );
    lab.cluster.scale("default", "mx", 3).unwrap();
    see(
        &lab,
        &ext,
        target,
        &pods_of(&lab, "mx").iter().collect::<Vec<_>>(),
        "mx x3",
    );

    let m = metrics(&lab, 1);
    if iptables_mode() {
        let nat = metric(
            &m,
            "kubeproxy_sync_proxy_rules_iptables_last",
            &["table=\"nat\""],
        );
        assert!(nat > 0.0, "iptables_last{{table=nat}} = {nat}\n{m}");
    }
    let npd = metric(
        &m,
        "kubeproxy_network_programming_duration_seconds_count",
        &[],
    );
    assert!(npd > 0.0, "network_programming_duration count = {npd}\n{m}");

    let node1 = lab.node_ns(1);
    for path in ["/healthz", "/livez"] {
        let name = format!("kubeproxy_proxy_{}_total", &path[1..]);
        let before = metric(&metrics(&lab, 1), &name, &["code=\"200\""]);
        for _ in 0..5 {
            let (code, body) = http_get(&node1, localhost(10256), path).unwrap();
            assert_eq!(code, 200, "{path}: {body}");
        }
        let after = metric(&metrics(&lab, 1), &name, &["code=\"200\""]);
        assert_eq!(
            after - before,
            5.0,
            "{name}{{code=200}} counts the 5 GET {path}"
        );
    }

    for node in ["node1", "node2"] {
        let starting = |e: &Value| {
            let on = if e["regarding"].is_object() {
                &e["regarding"]
            } else {
                &e["involvedObject"]
            };
            e["reason"] == "Starting" && on["kind"] == "Node" && on["name"] == node
        };
        let ev = wait_for(Duration::from_secs(10), || {
            lab.emulator.events().into_iter().find(starting)
        });
        assert!(
            ev.is_some(),
            "no Starting event for {node}: {:?}",
            lab.emulator.events()
        );
    }
}
