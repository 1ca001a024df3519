//! The EndpointSlice controller half of [`MiniCluster`]: one slice set per Service and
//! address family, written only when its content changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::{Map, Value, json};

use super::{
    ANNOTATION_TRIGGER_TIME, ClusterError, ENDPOINTSLICE_CONTROLLER, LABEL_HEADLESS,
    LABEL_MANAGED_BY, LABEL_SERVICE_NAME, MAX_ENDPOINTS_PER_SLICE, MiniCluster, RunningPod,
    SLICE_API, container_ports, label, meta_str, now_rfc3339, port_protocol, selects, unique_name,
};

impl MiniCluster {
    pub(super) fn sync_endpoint_slices(&mut self) -> Result<(), ClusterError> {
        for service in self.store.list("v1", "Service") {
            self.sync_service(&service)?;
        }
        Ok(())
    }

    pub(super) fn managed_slices(&self, namespace: &str, service: &str) -> Vec<Value> {
        self.store
            .list(SLICE_API, "EndpointSlice")
            .into_iter()
            .filter(|slice| {
                meta_str(slice, "namespace") == Some(namespace)
                    && label(slice, LABEL_SERVICE_NAME) == Some(service)
                    && label(slice, LABEL_MANAGED_BY) == Some(ENDPOINTSLICE_CONTROLLER)
            })
            .collect()
    }

    pub(super) fn delete_slice(&self, slice: &Value) -> Result<(), ClusterError> {
        let name = meta_str(slice, "name").unwrap_or_default();
        self.store
            .delete(
                SLICE_API,
                "EndpointSlice",
                meta_str(slice, "namespace"),
                name,
            )
            .map_err(ClusterError::Store)?;
        Ok(())
    }

    fn sync_service(&self, service: &Value) -> Result<(), ClusterError> {
        let (Some(namespace), Some(name)) =
            (meta_str(service, "namespace"), meta_str(service, "name"))
        else {
            return Ok(());
        };
        // Upstream leaves selector-less and ExternalName Services to others.
        let selector = service.pointer("/spec/selector").filter(|s| s.is_object());
        if selector.is_none() || service.pointer("/spec/type") == Some(&json!("ExternalName")) {
            return Ok(());
        }
        let existing = self.managed_slices(namespace, name);
        let families = address_types(service);
        for slice in existing.iter().filter(|s| {
            !families
                .iter()
                .any(|f| s.get("addressType") == Some(&json!(f)))
        }) {
            self.delete_slice(slice)?;
        }
        for family in families {
            let family_slices: Vec<Value> = existing
                .iter()
                .filter(|s| s.get("addressType") == Some(&json!(family)))
                .cloned()
                .collect();
            let desired = self.desired_slices(service, namespace, family);
            self.write_slices(service, namespace, name, family, desired, family_slices)?;
        }
        Ok(())
    }

    /// (ports, endpoints) per slice: endpoints grouped by their resolved port list and
    /// chunked; a single empty placeholder when there are none, as upstream does.
    fn desired_slices(
        &self,
        service: &Value,
        namespace: &str,
        family: &str,
    ) -> Vec<(Value, Vec<Value>)> {
        let mut groups: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();
        let mut pods: Vec<&RunningPod> = self
            .pods
            .iter()
            .filter(|pod| pod.info.namespace == namespace && selects(service, &pod.object))
            .collect();
        pods.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        for pod in pods {
            let addresses: Vec<String> = [Some(pod.info.ip), pod.info.ipv6]
                .into_iter()
                .flatten()
                .filter(|ip| (family == "IPv6") == ip.is_ipv6())
                .map(|ip| ip.to_string())
                .collect();
            if addresses.is_empty() {
                continue;
            }
            let ports = endpoint_ports(service, &pod.object);
            let endpoint = json!({
                "addresses": addresses,
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": pod.info.node,
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod.info.name,
                    "uid": pod.object.pointer("/metadata/uid").cloned().unwrap_or(json!(""))},
            });
            let key = ports.to_string();
            groups
                .entry(key)
                .or_insert_with(|| (ports, Vec::new()))
                .1
                .push(endpoint);
        }
        let mut slices: Vec<(Value, Vec<Value>)> = Vec::new();
        for (ports, endpoints) in groups.into_values() {
            for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
                slices.push((ports.clone(), chunk.to_vec()));
            }
        }
        if slices.is_empty() {
            slices.push((json!([]), Vec::new()));
        }
        slices
    }

    /// Makes the stored slices match `desired`, writing only what changed: identical
    /// slices stay, others are updated in place (keeping their names), then created or
    /// deleted.
    fn write_slices(
        &self,
        service: &Value,
        namespace: &str,
        name: &str,
        family: &str,
        desired: Vec<(Value, Vec<Value>)>,
        mut existing: Vec<Value>,
    ) -> Result<(), ClusterError> {
        existing.sort_by(|a, b| meta_str(a, "name").cmp(&meta_str(b, "name")));
        let labels = slice_labels(service, name);
        let owner = json!([{"apiVersion": "v1", "kind": "Service", "name": name,
            "uid": service.pointer("/metadata/uid").cloned().unwrap_or(json!("")),
            "controller": true, "blockOwnerDeletion": true}]);
        let same = |slice: &Value, (ports, endpoints): &(Value, Vec<Value>)| {
            slice.get("ports").unwrap_or(&json!([])) == ports
                && slice.get("endpoints").unwrap_or(&json!([])) == &json!(endpoints)
                && slice.pointer("/metadata/labels") == Some(&labels)
                && slice.pointer("/metadata/ownerReferences") == Some(&owner)
        };
        let mut pending = Vec::new();
        for want in desired {
            match existing.iter().position(|slice| same(slice, &want)) {
                Some(i) => {
                    existing.remove(i);
                }
                None => pending.push(want),
            }
        }
        let taken: BTreeSet<String> = self
            .store
            .list(SLICE_API, "EndpointSlice")
            .iter()
            .filter(|s| meta_str(s, "namespace") == Some(namespace))
            .filter_map(|s| meta_str(s, "name").map(str::to_string))
            .collect();
        let trigger_time = now_rfc3339();
        for (ports, endpoints) in pending {
            // Reuse a leftover slice's name (an update) before creating a new one.
            let slice_name = match existing.pop() {
                Some(old) => meta_str(&old, "name").unwrap_or_default().to_string(),
                None => unique_name(&format!("{name}-"), |n| taken.contains(n)),
            };
            self.apply(json!({
                "apiVersion": SLICE_API, "kind": "EndpointSlice",
                "metadata": {"name": slice_name, "namespace": namespace, "labels": labels,
                    "annotations": {ANNOTATION_TRIGGER_TIME: trigger_time},
                    "ownerReferences": owner},
                "addressType": family, "endpoints": endpoints, "ports": ports,
            }))?;
        }
        for old in existing {
            self.delete_slice(&old)?;
        }
        Ok(())
    }
}

/// The slice ports for one pod: each Service port whose targetPort resolves (a number,
/// the Service port when unset, or a container port with that name and protocol).
fn endpoint_ports(service: &Value, pod: &Value) -> Value {
    let declared = container_ports(pod);
    let ports = service.pointer("/spec/ports").and_then(Value::as_array);
    let resolved: Vec<Value> = ports
        .into_iter()
        .flatten()
        .filter_map(|port| {
            let protocol = port_protocol(port);
            let number = match port.get("targetPort").or_else(|| port.get("port"))? {
                Value::Number(n) => n.as_u64()?,
                Value::String(wanted) => match wanted.parse::<u64>() {
                    Ok(n) => n,
                    Err(_) => declared
                        .iter()
                        .find(|(n, p, _)| n == wanted && p == protocol)?
                        .2
                        .into(),
                },
                _ => return None,
            };
            let mut entry = Map::new();
            entry.insert(
                "name".into(),
                json!(port.get("name").and_then(Value::as_str).unwrap_or("")),
            );
            entry.insert("port".into(), json!(number));
            entry.insert("protocol".into(), json!(protocol));
            if let Some(app) = port.get("appProtocol") {
                entry.insert("appProtocol".into(), app.clone());
            }
            Some(Value::Object(entry))
        })
        .collect();
    json!(resolved)
}

/// Address types from `spec.ipFamilies`, else from the ClusterIP's family, else IPv4.
fn address_types(service: &Value) -> Vec<&'static str> {
    let families: Vec<&'static str> = service
        .pointer("/spec/ipFamilies")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            Some("IPv4") => Some("IPv4"),
            Some("IPv6") => Some("IPv6"),
            _ => None,
        })
        .collect();
    if !families.is_empty() {
        return families;
    }
    match service.pointer("/spec/clusterIP").and_then(Value::as_str) {
        Some(ip) if ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()) => vec!["IPv6"],
        _ => vec!["IPv4"],
    }
}

/// Service labels minus the reserved ones, plus the slice's own reserved labels.
fn slice_labels(service: &Value, name: &str) -> Value {
    let mut labels: Map<String, Value> = service
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for reserved in [LABEL_SERVICE_NAME, LABEL_MANAGED_BY, LABEL_HEADLESS] {
        labels.remove(reserved);
    }
    let cluster_ip = service
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("");
    if cluster_ip.is_empty() || cluster_ip == "None" {
        labels.insert(LABEL_HEADLESS.into(), json!(""));
    }
    labels.insert(LABEL_SERVICE_NAME.into(), json!(name));
    labels.insert(LABEL_MANAGED_BY.into(), json!(ENDPOINTSLICE_CONTROLLER));
    Value::Object(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_ports_resolve_like_upstream() {
        let pod = json!({"spec": {"containers": [{"ports": [
            {"name": "redis", "containerPort": 6379},
            {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]}});
        let service = json!({"spec": {"ports": [
            {"port": 80, "targetPort": "redis"},
            {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "targetPort": "dns"},
            {"name": "plain", "port": 8080},
            {"name": "num", "port": 81, "targetPort": 9000, "appProtocol": "http"}]}});
        assert_eq!(
            endpoint_ports(&service, &pod),
            json!([
                {"name": "", "port": 6379, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
                {"name": "plain", "port": 8080, "protocol": "TCP"},
                {"name": "num", "port": 9000, "protocol": "TCP", "appProtocol": "http"},
            ])
        );
    }

    #[test]
    fn headless_services_get_the_headless_label_and_reserved_labels_win() {
        let svc = json!({"metadata": {"labels": {"team": "x", LABEL_SERVICE_NAME: "fake"}},
            "spec": {"clusterIP": "None"}});
        assert_eq!(
            slice_labels(&svc, "real"),
            json!({"team": "x", LABEL_HEADLESS: "", LABEL_SERVICE_NAME: "real",
                LABEL_MANAGED_BY: ENDPOINTSLICE_CONTROLLER})
        );
        assert_eq!(
            address_types(&json!({"spec": {"clusterIP": "fd96::10"}})),
            vec!["IPv6"]
        );
        assert_eq!(
            address_types(&json!({"spec": {"ipFamilies": ["IPv4", "IPv6"]}})),
            vec!["IPv4", "IPv6"]
        );
    }
}
