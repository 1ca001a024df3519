use super::*;
use serde_json::json;

fn service(v: serde_json::Value) -> Service {
    serde_json::from_value(v).unwrap()
}

fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).unwrap()
}

fn redis_svc() -> Service {
    service(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "redis"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "redis", "port": 6379, "targetPort": 6379, "protocol": "TCP"}]}
    }))
}

fn redis_slice(name: &str, ips: &[&str]) -> EndpointSlice {
    let eps: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node1"}))
        .collect();
    slice(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": name, "labels": {"kubernetes.io/service-name": "redis"}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "redis", "port": 6379, "protocol": "TCP"}]
    }))
}

fn spn() -> ServicePortName {
    ServicePortName {
        service: NamespacedName::new("default", "redis"),
        port: "redis".into(),
        protocol: Protocol::Tcp,
    }
}

#[test]
fn service_and_slices_merge_by_port_name_and_protocol() {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    assert!(t.update_service(&redis_svc(), &mut w).unwrap());
    assert!(
        t.update_slice(&redis_slice("redis-a", &["10.244.1.2"]), &mut w)
            .unwrap()
    );
    assert!(
        t.update_slice(
            &redis_slice("redis-b", &["10.244.1.3", "10.244.1.2"]),
            &mut w
        )
        .unwrap()
    );
    let c = t.drain();
    assert_eq!(c.services.len(), 1);
    let sp = &t.state().services[&spn()];
    assert_eq!(sp.port, 6379);
    assert_eq!(sp.cluster_ip.to_string(), "10.96.0.10");
    let eps = t.state().endpoints_of(&spn());
    let addrs: Vec<String> = eps.iter().map(|e| e.addr_string()).collect();
    assert_eq!(addrs, vec!["10.244.1.2:6379", "10.244.1.3:6379"]);
    assert!(eps.iter().all(|e| e.is_local && e.ready));
    assert!(w.is_empty());
}

#[test]
fn noop_changes_are_dropped() {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    t.update_service(&redis_svc(), &mut w).unwrap();
    t.update_slice(&redis_slice("a", &["10.244.1.2"]), &mut w)
        .unwrap();
    t.drain();
    // Same object again: nothing pending.
    assert!(!t.update_service(&redis_svc(), &mut w).unwrap());
    assert!(
        !t.update_slice(&redis_slice("a", &["10.244.1.2"]), &mut w)
            .unwrap()
    );
    assert!(!t.has_pending());
    // A -> B -> A between drains: the drain reports nothing.
    t.update_slice(&redis_slice("a", &["10.244.1.9"]), &mut w)
        .unwrap();
    t.update_slice(&redis_slice("a", &["10.244.1.2"]), &mut w)
        .unwrap();
    assert!(t.drain().is_empty());
}

#[test]
fn deletes_and_stale_udp() {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    let udp = service(json!({
        "metadata": {"namespace": "default", "name": "dns"},
        "spec": {"clusterIP": "10.96.0.53", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}
    }));
    let s = slice(json!({
        "metadata": {"namespace": "default", "name": "dns-1", "labels": {"kubernetes.io/service-name": "dns"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.5"]}],
        "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    }));
    t.update_service(&udp, &mut w).unwrap();
    t.update_slice(&s, &mut w).unwrap();
    let c = t.drain();
    assert_eq!(c.udp_services_gained_endpoints.len(), 1);
    assert!(t.delete_slice("default", "dns-1"));
    let c = t.drain();
    assert_eq!(c.stale_udp_endpoints.len(), 1);
    assert_eq!(c.stale_udp_endpoints[0].1.addr_string(), "10.244.1.5:5353");
    assert!(t.delete_service("default", "dns"));
    t.drain();
    assert!(t.state().services.is_empty());
    assert!(t.state().endpoints.is_empty());
}

#[test]
fn ignored_services() {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    for spec in [
        json!({"clusterIP": "None", "ports": [{"port": 80}]}),
        json!({"type": "ExternalName", "externalName": "example.com"}),
        json!({"clusterIP": "fd00::1", "ports": [{"port": 80}]}),
    ] {
        let s = service(json!({"metadata": {"namespace": "a", "name": "b"}, "spec": spec}));
        assert!(!t.update_service(&s, &mut w).unwrap());
    }
    // FQDN slices and slices without the service-name label are ignored.
    let fqdn = slice(
        json!({"metadata": {"namespace": "a", "name": "b-1", "labels": {"kubernetes.io/service-name": "b"}},
        "addressType": "FQDN", "endpoints": [{"addresses": ["example.com"]}], "ports": [{"port": 80}]}),
    );
    assert!(!t.update_slice(&fqdn, &mut w).unwrap());
    let unlabeled = slice(json!({"metadata": {"namespace": "a", "name": "b-2"},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"port": 80}]}));
    assert!(!t.update_slice(&unlabeled, &mut w).unwrap());
}

#[test]
fn only_a_bad_key_or_primary_cluster_ip_skips_a_whole_service() {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    let cases = [
        (
            json!({"namespace": "a", "name": "b"}),
            json!({"clusterIP": "10.0.0.300", "ports": [{"port": 80}]}),
            "spec.clusterIP",
        ),
        (
            json!({"namespace": "a", "name": "b\"; -j ACCEPT"}),
            json!({"clusterIP": "10.0.0.3", "ports": [{"port": 80}]}),
            "metadata.name",
        ),
        (
            json!({"namespace": "a b", "name": "b"}),
            json!({"clusterIP": "10.0.0.3", "ports": [{"port": 80}]}),
            "metadata.namespace",
        ),
    ];
    for (meta, spec, field) in cases {
        let s = service(json!({"metadata": meta, "spec": spec}));
        let err = t.update_service(&s, &mut w).unwrap_err().to_string();
        assert!(err.contains(field), "{err} should name {field}");
        assert!(!err.contains('\n'), "one line: {err:?}");
    }
    assert!(!t.has_pending());
    // Unusual but valid: names at maximum length, annotations with odd text.
    let long = "a".repeat(63);
    let s = service(json!({"metadata": {"namespace": long, "name": long,
        "annotations": {"note": "quotes \" newlines \n unicode ü ;"}},
        "spec": {"clusterIP": "10.0.0.3", "ports": [{"name": long, "port": 80}]}}));
    assert!(t.update_service(&s, &mut w).unwrap());
    assert!(w.is_empty(), "{w:?}");
}

#[test]
fn a_bad_port_drops_that_port_only_with_one_warning_naming_it() {
    let cases = [
        (json!({"name": "bad", "port": 0}), "spec.ports[1].port"),
        (json!({"name": "bad", "port": 70000}), "spec.ports[1].port"),
        (
            json!({"name": "bad", "port": 81, "protocol": "ICMP"}),
            "spec.ports[1].protocol",
        ),
        (
            json!({"name": "bad", "port": 81, "nodePort": 70000}),
            "spec.ports[1].nodePort",
        ),
        (json!({"name": "x\ny", "port": 81}), "spec.ports[1].name"),
        (json!({"name": "Upper", "port": 81}), "spec.ports[1].name"),
        (
            json!({"name": "a".repeat(64), "port": 81}),
            "spec.ports[1].name",
        ),
        (json!({"name": "good", "port": 81}), "duplicate port name"),
        (
            json!({"name": "other", "port": 80}),
            "duplicate port \"80/TCP\"",
        ),
        (
            json!({"name": "other", "port": 81, "nodePort": 30080}),
            "duplicate nodePort \"30080/TCP\"",
        ),
    ];
    for (bad, want) in cases {
        let mut t = ChangeTracker::new(IpFamily::V4, "node1");
        let mut w = vec![];
        let good = json!({"name": "good", "port": 80, "nodePort": 30080});
        let last = json!({"name": "last", "port": 82, "protocol": "UDP"});
        let s = service(json!({"metadata": {"namespace": "a", "name": "b"},
            "spec": {"type": "NodePort", "clusterIP": "10.0.0.3", "ports": [good, bad, last]}}));
        assert!(t.update_service(&s, &mut w).unwrap(), "{want}");
        assert_eq!(w.len(), 1, "{want}: {w:?}");
        assert!(w[0].contains(want), "{:?} should name {want}", w[0]);
        assert!(w[0].ends_with("port not proxied") && !w[0].contains('\n'));
        t.drain();
        let ports: Vec<(String, u16)> = t
            .state()
            .services
            .values()
            .map(|p| (p.name.port.clone(), p.port))
            .collect();
        assert_eq!(ports, [("good".into(), 80), ("last".into(), 82)], "{want}");
    }
}

#[test]
fn legacy_ip_forms_are_programmed_as_upstream_reads_them() {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    let s = service(
        json!({"metadata": {"namespace": "default", "name": "redis"},
        "spec": {"clusterIP": "010.096.000.010", "clusterIPs": ["010.096.000.010", "not-an-ip"],
            "externalIPs": ["::ffff:192.0.2.7", "198.051.100.001"],
            "loadBalancerSourceRanges": ["010.0.0.0/8"],
            "ports": [{"name": "redis", "port": 6379}]}}),
    );
    assert!(t.update_service(&s, &mut w).unwrap());
    assert_eq!(w.len(), 1, "only the bad secondary cluster IP: {w:?}");
    assert!(w[0].contains("spec.clusterIPs[1]"), "{w:?}");
    let mut w = vec![];
    t.update_slice(
        &redis_slice("a", &["010.244.001.002", "::ffff:10.244.1.3"]),
        &mut w,
    )
    .unwrap();
    assert!(w.is_empty(), "{w:?}");
    t.drain();
    let p = t.state().services.values().next().unwrap().clone();
    assert_eq!(p.cluster_ip.to_string(), "10.96.0.10");
    let ext: Vec<String> = p.external_ips.iter().map(|i| i.to_string()).collect();
    assert_eq!(ext, ["192.0.2.7", "198.51.100.1"]);
    assert_eq!(p.load_balancer_source_ranges[0].to_string(), "10.0.0.0/8");
    let eps: Vec<String> = t
        .state()
        .endpoints_of(&spn())
        .iter()
        .map(|e| e.ip.to_string())
        .collect();
    assert_eq!(eps, ["10.244.1.2", "10.244.1.3"]);
}

#[test]
fn invalid_endpoint_ip_drops_only_that_endpoint() {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    t.update_service(&redis_svc(), &mut w).unwrap();
    t.update_slice(
        &redis_slice("a", &["10.244.1.2", "not-an-ip", "10.244.1.999"]),
        &mut w,
    )
    .unwrap();
    t.drain();
    assert_eq!(t.state().endpoints_of(&spn()).len(), 1);
    assert_eq!(w.len(), 2, "{w:?}");
}

#[test]
fn session_affinity_and_policies() {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    let s = service(json!({"metadata": {"namespace": "a", "name": "lb"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.3", "externalTrafficPolicy": "Local",
                 "healthCheckNodePort": 32000, "sessionAffinity": "ClientIP",
                 "externalIPs": ["1.2.3.4", "bogus", "fd00::9"],
                 "loadBalancerSourceRanges": [" 203.0.113.0/24 "],
                 "ports": [{"port": 80, "nodePort": 30080}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"ip": "198.51.100.8", "ipMode": "Proxy"}, {"hostname": "x"}]}}}));
    t.update_service(&s, &mut w).unwrap();
    t.drain();
    let sp = t.state().services.values().next().unwrap();
    assert_eq!(sp.session_affinity_timeout, Some(10800));
    assert!(sp.external_policy_local);
    assert_eq!(sp.health_check_node_port, Some(32000));
    assert_eq!(sp.node_port, Some(30080));
    assert_eq!(
        sp.external_ips,
        vec!["1.2.3.4".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(sp.load_balancer_vips.len(), 1);
    assert_eq!(
        sp.load_balancer_source_ranges[0].to_string(),
        "203.0.113.0/24"
    );
    assert_eq!(
        w.len(),
        2,
        "bogus external IP and hostname-only ingress: {w:?}"
    );
}

#[test]
fn a_state_drained_into_by_changed_services_equals_the_trackers_own() {
    // `t` drains into its own state, `u` (same updates) into `kept`, as the sync loop does.
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let mut u = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    let mut kept = ProxyState::default();
    let svc = |name: &str, ip: &str, ports: &[(&str, u16)]| {
        let ports: Vec<_> = ports
            .iter()
            .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
            .collect();
        service(json!({"metadata": {"namespace": "ns", "name": name},
            "spec": {"clusterIP": ip, "ports": ports}}))
    };
    let eps = |name: &str, ip: &str| {
        slice(
            json!({"metadata": {"namespace": "ns", "name": format!("{name}-1"),
            "labels": {"kubernetes.io/service-name": name}}, "addressType": "IPv4",
            "endpoints": [{"addresses": [ip]}], "ports": [{"name": "a", "port": 80, "protocol": "TCP"}]}),
        )
    };
    let same = |a: &ProxyState, b: &ProxyState| {
        assert_eq!(a.services, b.services);
        assert_eq!(a.endpoints, b.endpoints);
    };
    for x in [&mut t, &mut u] {
        x.update_service(&svc("s1", "10.96.0.1", &[("a", 80), ("b", 81)]), &mut w)
            .unwrap();
        x.update_service(&svc("s2", "10.96.0.2", &[("a", 80)]), &mut w)
            .unwrap();
        x.update_slice(&eps("s1", "10.244.0.1"), &mut w).unwrap();
    }
    let changes = t.drain();
    assert_eq!(u.drain_into(&mut kept), changes);
    same(&kept, t.state());
    assert_eq!(u.drained_endpoint_count(), t.state().endpoint_count());
    // A port goes, a service goes, endpoints move, a service arrives.
    for x in [&mut t, &mut u] {
        x.update_service(&svc("s1", "10.96.0.1", &[("a", 80)]), &mut w)
            .unwrap();
        x.delete_service("ns", "s2");
        x.update_slice(&eps("s1", "10.244.0.9"), &mut w).unwrap();
        x.update_service(&svc("s0", "10.96.0.3", &[("a", 80)]), &mut w)
            .unwrap();
    }
    let changes = t.drain();
    assert_eq!(changes.services.len(), 3);
    assert_eq!(u.drain_into(&mut kept), changes);
    same(&kept, t.state());
    assert_eq!(u.drained_endpoint_count(), t.state().endpoint_count());
}

#[test]
fn one_slice_or_several_give_the_same_endpoints_in_address_string_order() {
    // String order, not numeric: 10.244.1.10 < 10.244.1.2; a duplicate on this node wins.
    let ips = [
        "10.244.1.2",
        "10.244.1.10",
        "10.244.1.100",
        "10.244.1.2",
        "10.244.1.9",
    ];
    let mut one = ChangeTracker::new(IpFamily::V4, "node1");
    let mut w = vec![];
    one.update_service(&redis_svc(), &mut w).unwrap();
    one.update_slice(&redis_slice("a", &ips), &mut w).unwrap();
    one.drain();
    let mut split = ChangeTracker::new(IpFamily::V4, "node1");
    split.update_service(&redis_svc(), &mut w).unwrap();
    split
        .update_slice(&redis_slice("a", &ips[..2]), &mut w)
        .unwrap();
    split
        .update_slice(&redis_slice("b", &ips[2..]), &mut w)
        .unwrap();
    split.drain();
    let addrs = |t: &ChangeTracker| -> Vec<String> {
        t.state()
            .endpoints_of(&spn())
            .iter()
            .map(|e| e.addr_string())
            .collect()
    };
    let mut want: Vec<String> = ips.iter().map(|ip| format!("{ip}:6379")).collect();
    want.sort();
    want.dedup();
    assert_eq!(addrs(&one), want);
    assert_eq!(addrs(&split), want);
    assert_eq!(one.state().endpoints, split.state().endpoints);

    // IPv6: "[" sorts after digits, and the port takes part in the order.
    let eps = |ip: &str, ports: &[u16]| -> Vec<Endpoint> {
        ports
            .iter()
            .map(|p| Endpoint {
                ip: ip.parse().unwrap(),
                port: *p,
                ready: true,
                serving: true,
                terminating: false,
                is_local: false,
                zone_hints: Default::default(),
                node_hints: Default::default(),
            })
            .collect()
    };
    let mut all = eps("fd00::10", &[80, 8080, 9]);
    all.extend(eps("fd00::9", &[80]));
    all.extend(eps("10.0.0.1", &[8080, 80]));
    let mut merged = BTreeMap::new();
    crate::convert::merge_endpoints(&mut merged, all.clone());
    let got: Vec<String> = merged.values().map(|e| e.addr_string()).collect();
    let mut want: Vec<String> = all.iter().map(|e| e.addr_string()).collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn draining_into_a_kept_state_equals_draining_into_the_trackers() {
    let mut own = ChangeTracker::new(IpFamily::V4, "node1");
    let mut into = ChangeTracker::new(IpFamily::V4, "node1");
    let mut kept = ProxyState::default();
    type Step = Box<dyn Fn(&mut ChangeTracker)>;
    let steps: Vec<Step> = vec![
        Box::new(|t| {
            t.update_service(&redis_svc(), &mut vec![]).unwrap();
            t.update_slice(
                &redis_slice("a", &["10.244.1.2", "10.244.1.3"]),
                &mut vec![],
            )
            .unwrap();
        }),
        Box::new(|t| {
            t.update_slice(&redis_slice("b", &["10.244.1.4"]), &mut vec![])
                .unwrap();
        }),
        Box::new(|t| {
            t.delete_slice("default", "a");
        }),
        Box::new(|t| {
            t.delete_service("default", "redis");
            t.delete_slice("default", "b");
        }),
    ];
    for step in &steps {
        step(&mut own);
        step(&mut into);
        let a = own.drain();
        let b = into.drain_into(&mut kept);
        assert_eq!(a, b);
        assert_eq!(own.state().services, kept.services);
        assert_eq!(own.state().endpoints, kept.endpoints);
        assert_eq!(into.drained_endpoint_count(), kept.endpoint_count());
        assert_eq!(own.drained_endpoint_count(), own.state().endpoint_count());
        assert!(into.state().services.is_empty());
    }
}
