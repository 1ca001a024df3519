//! Kubernetes objects for the unit tests, through the real model tracker.

use kp_model::{ChangeTracker, IpFamily};
use serde_json::{Value, json};

pub fn tracker(objs: &[Value]) -> ChangeTracker {
    let mut t = ChangeTracker::new(IpFamily::V4, "node1");
    for o in objs {
        if o["kind"] == "Service" {
            t.update_service(&serde_json::from_value(o.clone()).unwrap(), &mut vec![])
                .unwrap();
        } else {
            t.update_slice(&serde_json::from_value(o.clone()).unwrap(), &mut vec![])
                .unwrap();
        }
    }
    t
}

pub fn svc(name: &str, ip: &str, spec: Value) -> Value {
    let mut s = json!({"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]});
    for (k, v) in spec.as_object().unwrap() {
        s[k] = v.clone();
    }
    json!({"kind": "Service", "metadata": {"namespace": "ns", "name": name}, "spec": s})
}

/// A slice of `svc` with (ip, node) endpoints, all ready.
pub fn slice(svc: &str, eps: &[(&str, &str)], protocol: &str) -> Value {
    let eps: Vec<_> = eps
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node}))
        .collect();
    json!({"kind": "EndpointSlice", "metadata": {"namespace": "ns", "name": format!("{svc}-1"),
        "labels": {"kubernetes.io/service-name": svc}}, "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "p", "port": 8080, "protocol": protocol}]})
}
