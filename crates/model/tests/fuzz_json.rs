//! Bounded, deterministic fuzzing of what the API side decodes: valid Services and
//! EndpointSlices with random fields replaced by values of the wrong type or odd content,
//! and raw JSON with random bytes flipped. Decoding may fail and the tracker may reject an
//! object, but nothing panics and whatever is accepted drains into a consistent state.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kp_model::{ChangeTracker, IpFamily, categorize_endpoints};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "ns", "name": format!("s{i}"), "labels": {"a": "b"}},
        "spec": {"type": "LoadBalancer", "clusterIP": format!("10.96.0.{}", i % 250 + 1),
            "clusterIPs": [format!("10.96.0.{}", i % 250 + 1)], "ipFamilies": ["IPv4"],
            "externalIPs": ["192.0.2.1"], "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000, "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 100}},
            "loadBalancerSourceRanges": ["198.18.0.0/15"],
            "ports": [{"name": "p", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"},
                      {"name": "q", "port": 53, "protocol": "UDP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.1", "ipMode": "VIP"}]}}})
}

fn slice(i: usize) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "ns", "name": format!("s{i}-x"),
            "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.244.1.2"], "conditions": {"ready": true, "serving": true, "terminating": false},
             "nodeName": "node1", "zone": "z1", "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node1"}]}},
            {"addresses": ["10.244.2.2"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "node2"}],
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}, {"name": "q", "port": 53, "protocol": "UDP"}]})
}

fn odd_value(r: &mut StdRng) -> Value {
    match r.gen_range(0..14) {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!(70000),
        3 => json!(u64::MAX),
        4 => json!(1.5),
        5 => json!(""),
        6 => json!("x\"; flush ruleset\n"),
        7 => json!("z".repeat(65536)),
        8 => json!([]),
        9 => json!({}),
        10 => json!(["::1", "10.0.0.1", "not-an-ip", "10.0.0.0/33"]),
        11 => json!(true),
        12 => json!("fd00::1"),
        _ => json!("λ\u{202e}"),
    }
}

/// Replaces one random node of `v` (a leaf, an array or an object) with an odd value.
fn mutate(v: &mut Value, r: &mut StdRng) {
    let go_deeper = r.gen_range(0..3) != 0;
    match v {
        Value::Object(m) if !m.is_empty() && go_deeper => {
            let k = m
                .keys()
                .nth(r.gen_range(0..m.len()))
                .cloned()
                .unwrap_or_default();
            if let Some(child) = m.get_mut(&k) {
                mutate(child, r);
            }
        }
        Value::Array(a) if !a.is_empty() && go_deeper => {
            let i = r.gen_range(0..a.len());
            mutate(&mut a[i], r);
        }
        _ => *v = odd_value(r),
    }
}

#[test]
fn mutated_objects_never_panic_the_decoder_or_the_tracker() {
    let mut r = StdRng::seed_from_u64(0xdec0de);
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    let (mut decoded, mut accepted, mut rejected) = (0, 0, 0);
    for i in 0..4000 {
        let mut svc = service(i % 40);
        let mut sl = slice(i % 40);
        for _ in 0..1 + r.gen_range(0..3) {
            if r.gen_range(0..2) == 0 {
                mutate(&mut svc, &mut r);
            } else {
                mutate(&mut sl, &mut r);
            }
        }
        let mut warnings = Vec::new();
        if let Ok(s) = serde_json::from_value::<Service>(svc) {
            decoded += 1;
            match t.update_service(&s, &mut warnings) {
                Ok(_) => accepted += 1,
                Err(e) => {
                    rejected += 1;
                    assert!(!e.to_string().contains('\n'), "{e}");
                }
            }
        }
        if let Ok(s) = serde_json::from_value::<EndpointSlice>(sl) {
            decoded += 1;
            match t.update_slice(&s, &mut warnings) {
                Ok(_) => accepted += 1,
                Err(e) => {
                    rejected += 1;
                    assert!(!e.to_string().contains('\n'), "{e}");
                }
            }
        }
        if i % 100 == 99 {
            t.drain();
            let topo = kp_model::NodeTopology {
                node_name: "node1".into(),
                zone: Some("z1".into()),
            };
            for port in t.state().services.values() {
                let eps = t.state().endpoints_of(&port.name);
                let cat = categorize_endpoints(port, eps, &topo);
                assert!(cat.cluster.len() <= eps.len() && cat.local.len() <= eps.len());
            }
        }
    }
    // The mutations exercise all three outcomes.
    assert!(
        decoded > 2000 && accepted > 1000 && rejected > 100,
        "decoded {decoded}, accepted {accepted}, rejected {rejected}"
    );
}

#[test]
fn random_bytes_in_the_json_never_panic_the_decoder() {
    let mut r = StdRng::seed_from_u64(0xb17e);
    let texts = [service(1).to_string(), slice(1).to_string()];
    for i in 0..4000 {
        let mut b = texts[i % 2].clone().into_bytes();
        for _ in 0..1 + r.gen_range(0..4) {
            let at = r.gen_range(0..b.len());
            b[at] = r.gen_range(0..256) as u8;
        }
        if let Ok(s) = std::str::from_utf8(&b) {
            let _ = serde_json::from_str::<Service>(s);
            let _ = serde_json::from_str::<EndpointSlice>(s);
        }
        let _ = serde_json::from_slice::<Value>(&b);
    }
}
