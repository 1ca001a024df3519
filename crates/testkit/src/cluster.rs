//! A mini control plane: turns Deployments into running pods (namespaces with a
//! [`PodServer`]) and Services into EndpointSlices, the way kube-controller-manager's
//! ReplicaSet and EndpointSlice controllers would, so real-world manifests work.
//!
//! Objects go through an [`ObjectStore`] (the API-server emulator implements it). The
//! store is expected to default what the API server defaults (ClusterIPs, nodePorts,
//! uids); this module only fills in what controllers and the kubelet would write.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::netns::{NetnsError, Topology};
use crate::podserver::{PodServer, PodServerError, Protocol, ServerPort, sctp_supported};

mod endpointslice;

/// Where Kubernetes objects are stored: the API-server emulator, or a fake in tests.
pub trait ObjectStore: Send + Sync {
    /// Creates or replaces `obj`; returns the stored object.
    fn apply(&self, obj: Value) -> anyhow::Result<Value>;
    /// Deletes an object; `Ok(false)` if it did not exist.
    fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<bool>;
    /// All objects of a kind, in all namespaces.
    fn list(&self, api_version: &str, kind: &str) -> Vec<Value>;
}

/// `endpointslice.kubernetes.io/managed-by` value of upstream's controller.
pub const ENDPOINTSLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// Label linking a slice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label naming the slice's managing controller.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Annotation with the time of the change that triggered a slice update.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Label upstream puts on slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Upstream's default `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

const SLICE_API: &str = "discovery.k8s.io/v1";
/// Alphabet of the API server's generated name suffixes (no vowels, no 0/1/3).
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Errors of the mini control plane.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("manifest is not valid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("invalid object: {0}")]
    InvalidObject(String),
    #[error("object store: {0}")]
    Store(anyhow::Error),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    PodServer(#[from] PodServerError),
    #[error("{0} not found")]
    NotFound(String),
}

/// A pod started by the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub ip: IpAddr,
    /// Second address on dual-stack topologies.
    pub ipv6: Option<IpAddr>,
    /// Kubernetes node name (`node1`, ...).
    pub node: String,
    /// Network namespace the pod runs in.
    pub netns: String,
    /// Owning Deployment.
    pub deployment: String,
}

struct RunningPod {
    info: PodInfo,
    template_hash: String,
    /// The stored Pod object (for labels, container ports and uid).
    object: Value,
    server: PodServer,
}

/// The control plane. Owns the topology so pods (and their servers) are always torn
/// down before the namespaces they live in.
pub struct MiniCluster {
    store: Arc<dyn ObjectStore>,
    /// Declared before `topology`: fields drop in order, servers first.
    pods: Vec<RunningPod>,
    topology: Topology,
    next_node: usize,
}

impl MiniCluster {
    /// Takes over `topology` and registers its nodes as v1 Node objects (name, pod
    /// CIDRs, InternalIP, Ready), as the kubelet would.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        topology: Topology,
    ) -> Result<MiniCluster, ClusterError> {
        let cluster = MiniCluster {
            store,
            pods: Vec::new(),
            topology,
            next_node: 0,
        };
        for node in cluster.topology.nodes() {
            let mut cidrs = vec![node.pod_cidr.to_string()];
            let mut addresses = vec![json!({"type": "InternalIP", "address": node.ip.to_string()})];
            if let (Some(cidr), Some(ip)) = (node.pod_cidr_v6, node.ipv6) {
                cidrs.push(cidr.to_string());
                addresses.push(json!({"type": "InternalIP", "address": ip.to_string()}));
            }
            addresses.push(json!({"type": "Hostname", "address": node.name}));
            cluster.apply(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name, "labels": {
                    "kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"}},
                "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
                "status": {"addresses": addresses, "conditions": [
                    {"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
            }))?;
        }
        Ok(cluster)
    }

    /// The topology the pods live in.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Mutable access, e.g. to add client pods that are not part of any Deployment.
    /// Removing the cluster's own pods here would leave stale Pod objects behind.
    pub fn topology_mut(&mut self) -> &mut Topology {
        &mut self.topology
    }

    /// The store objects are written to.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Pods currently running, in creation order.
    pub fn pods(&self) -> Vec<PodInfo> {
        self.pods.iter().map(|pod| pod.info.clone()).collect()
    }

    /// The server of pod `namespace/name`, e.g. to read its UDP counters.
    pub fn pod_server(&self, namespace: &str, name: &str) -> Option<&PodServer> {
        self.pods
            .iter()
            .find(|pod| pod.info.namespace == namespace && pod.info.name == name)
            .map(|pod| &pod.server)
    }

    /// Stores every object of a multi-document YAML manifest (`kind: List` is
    /// expanded), then runs the Deployment and EndpointSlice controllers. Returns the
    /// stored objects.
    pub fn apply_manifest(&mut self, yaml: &str) -> Result<Vec<Value>, ClusterError> {
        let mut objects = Vec::new();
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value = Value::deserialize(document)?;
            match value {
                Value::Null => {}
                Value::Object(ref map) if map.get("kind") == Some(&json!("List")) => {
                    let items = map.get("items").and_then(Value::as_array).cloned();
                    objects.extend(items.unwrap_or_default());
                }
                other => objects.push(other),
            }
        }
        let mut stored = Vec::with_capacity(objects.len());
        for object in objects {
            stored.push(self.apply(normalize(object)?)?);
        }
        self.reconcile()?;
        Ok(stored)
    }

    /// Sets a Deployment's replicas (in the store too) and adds or removes pods.
    pub fn scale(
        &mut self,
        namespace: &str,
        deployment: &str,
        replicas: u32,
    ) -> Result<(), ClusterError> {
        let mut object = self
            .find("apps/v1", "Deployment", namespace, deployment)
            .ok_or_else(|| {
                ClusterError::NotFound(format!("deployment {namespace}/{deployment}"))
            })?;
        object["spec"]["replicas"] = json!(replicas);
        self.apply(object)?;
        self.reconcile()
    }

    /// Deletes an object from the store and lets the controllers react: a deleted
    /// Deployment takes its pods along, a deleted Service its slices, and a deleted
    /// Pod is replaced (as its ReplicaSet would).
    pub fn delete_object(
        &mut self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<bool, ClusterError> {
        let existed = self
            .store
            .delete(api_version, kind, namespace, name)
            .map_err(ClusterError::Store)?;
        let ns = namespace.unwrap_or("default");
        match kind {
            "Pod" => {
                if let Some(i) = self.pod_index(ns, name) {
                    self.stop_pod(i)?;
                }
            }
            "Service" => {
                for slice in self.managed_slices(ns, name) {
                    self.delete_slice(&slice)?;
                }
            }
            _ => {}
        }
        self.reconcile()?;
        Ok(existed)
    }

    /// Runs both controllers once: pods for every Deployment, then slices for every
    /// Service.
    pub fn reconcile(&mut self) -> Result<(), ClusterError> {
        self.sync_deployments()?;
        self.sync_endpoint_slices()
    }

    fn apply(&self, object: Value) -> Result<Value, ClusterError> {
        self.store.apply(object).map_err(ClusterError::Store)
    }

    fn find(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.store
            .list(api_version, kind)
            .into_iter()
            .find(|object| {
                meta_str(object, "namespace") == Some(namespace)
                    && meta_str(object, "name") == Some(name)
            })
    }

    fn pod_index(&self, namespace: &str, name: &str) -> Option<usize> {
        self.pods
            .iter()
            .position(|pod| pod.info.namespace == namespace && pod.info.name == name)
    }

    // ---- Deployment controller (ReplicaSet + kubelet, compressed) ----

    fn sync_deployments(&mut self) -> Result<(), ClusterError> {
        let deployments = self.store.list("apps/v1", "Deployment");
        let wanted: BTreeSet<(String, String)> = deployments
            .iter()
            .filter_map(|d| {
                Some((
                    meta_str(d, "namespace")?.to_string(),
                    meta_str(d, "name")?.to_string(),
                ))
            })
            .collect();
        // Pods of deleted Deployments go away.
        while let Some(i) = self.pods.iter().position(|pod| {
            !wanted.contains(&(pod.info.namespace.clone(), pod.info.deployment.clone()))
        }) {
            self.delete_pod(i)?;
        }
        for deployment in deployments {
            self.sync_deployment(&deployment)?;
        }
        Ok(())
    }

    fn sync_deployment(&mut self, deployment: &Value) -> Result<(), ClusterError> {
        let (Some(namespace), Some(name)) = (
            meta_str(deployment, "namespace"),
            meta_str(deployment, "name"),
        ) else {
            return Err(ClusterError::InvalidObject(
                "Deployment without namespace/name".into(),
            ));
        };
        let template = deployment
            .pointer("/spec/template")
            .cloned()
            .unwrap_or(json!({}));
        let hash = template_hash(&template);
        let replicas = deployment
            .pointer("/spec/replicas")
            .and_then(Value::as_u64)
            .unwrap_or(1) as usize;
        let owned =
            |pod: &RunningPod| pod.info.namespace == namespace && pod.info.deployment == name;
        // A changed template replaces every pod (Recreate strategy).
        while let Some(i) = self
            .pods
            .iter()
            .position(|pod| owned(pod) && pod.template_hash != hash)
        {
            self.delete_pod(i)?;
        }
        let mut current = self.pods.iter().filter(|pod| owned(pod)).count();
        while current > replicas {
            // Newest first, as a ReplicaSet scaling down prefers younger pods.
            if let Some(i) = self.pods.iter().rposition(owned) {
                self.delete_pod(i)?;
            }
            current -= 1;
        }
        for _ in current..replicas {
            self.create_pod(namespace, name, &template, &hash)?;
        }
        Ok(())
    }

    fn create_pod(
        &mut self,
        namespace: &str,
        deployment: &str,
        template: &Value,
        hash: &str,
    ) -> Result<(), ClusterError> {
        let taken: BTreeSet<String> = self.pods.iter().map(|pod| pod.info.name.clone()).collect();
        let pod_name = unique_name(&format!("{deployment}-{hash}-"), |n| {
            taken.contains(n) || self.topology.pod(n).is_ok()
        });
        let node_index = self.next_node % self.topology.nodes().len() + 1;
        self.next_node += 1;
        let node = self.topology.node(node_index)?.clone();
        let pod = self.topology.add_pod(node_index, &pod_name)?;
        let mut labels = template
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        if let Value::Object(map) = &mut labels {
            map.insert("pod-template-hash".into(), json!(hash));
        }
        let mut spec = template.get("spec").cloned().unwrap_or(json!({}));
        spec["nodeName"] = json!(node.name);
        let mut pod_ips = vec![json!({"ip": pod.ip.to_string()})];
        pod_ips.extend(pod.ipv6.map(|ip| json!({"ip": ip.to_string()})));
        let now = now_rfc3339();
        let conditions: Vec<Value> = ["Initialized", "PodScheduled", "ContainersReady", "Ready"]
            .iter()
            .map(|kind| json!({"type": kind, "status": "True", "lastTransitionTime": now}))
            .collect();
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": namespace, "labels": labels},
            "spec": spec,
            "status": {
                "phase": "Running",
                "hostIP": node.ip.to_string(), "hostIPs": [{"ip": node.ip.to_string()}],
                "podIP": pod.ip.to_string(), "podIPs": pod_ips,
                "startTime": now,
                "conditions": conditions,
            },
        });
        let ports = self.ports_to_serve(namespace, &object, &pod.ns)?;
        let started = PodServer::start_ports(&pod.ns, &pod_name, &ports)
            .map_err(ClusterError::from)
            .and_then(|server| Ok((server, self.apply(object)?)));
        let (server, stored) = match started {
            Ok(ok) => ok,
            Err(err) => {
                let _ = self.topology.remove_pod(&pod_name);
                return Err(err);
            }
        };
        self.pods.push(RunningPod {
            info: PodInfo {
                name: pod_name,
                namespace: namespace.to_string(),
                ip: pod.ip,
                ipv6: pod.ipv6,
                node: node.name,
                netns: pod.ns,
                deployment: deployment.to_string(),
            },
            template_hash: hash.to_string(),
            object: stored,
            server,
        });
        Ok(())
    }

    /// Declared container ports, plus numeric targetPorts of Services that select the
    /// pod (containers may listen on undeclared ports). SCTP only if the kernel has it.
    fn ports_to_serve(
        &self,
        namespace: &str,
        pod: &Value,
        netns: &str,
    ) -> Result<Vec<ServerPort>, ClusterError> {
        let mut ports: BTreeSet<ServerPort> = container_ports(pod)
            .into_iter()
            .filter_map(|(_, protocol, port)| {
                Some(ServerPort {
                    protocol: Protocol::from_k8s(&protocol)?,
                    port,
                })
            })
            .collect();
        for service in self.store.list("v1", "Service") {
            if meta_str(&service, "namespace") != Some(namespace) || !selects(&service, pod) {
                continue;
            }
            for port in service
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let protocol = Protocol::from_k8s(port_protocol(port));
                let target = port
                    .get("targetPort")
                    .or_else(|| port.get("port"))
                    .and_then(Value::as_u64);
                if let (Some(protocol), Some(Ok(target))) = (protocol, target.map(u16::try_from)) {
                    ports.insert(ServerPort {
                        protocol,
                        port: target,
                    });
                }
            }
        }
        if ports.iter().any(|p| p.protocol == Protocol::Sctp) && !sctp_supported(netns)? {
            tracing::warn!(%netns, "kernel has no SCTP; pod serves only its TCP/UDP ports");
            ports.retain(|p| p.protocol != Protocol::Sctp);
        }
        Ok(ports.into_iter().collect())
    }

    /// Deletes the Pod object, then stops the pod.
    fn delete_pod(&mut self, i: usize) -> Result<(), ClusterError> {
        let info = self.pods[i].info.clone();
        self.store
            .delete("v1", "Pod", Some(&info.namespace), &info.name)
            .map_err(ClusterError::Store)?;
        self.stop_pod(i)
    }

    /// Stops the server and removes the namespace.
    fn stop_pod(&mut self, i: usize) -> Result<(), ClusterError> {
        let pod = self.pods.remove(i);
        drop(pod.server);
        self.topology.remove_pod(&pod.info.name)?;
        Ok(())
    }
}

impl std::fmt::Debug for MiniCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniCluster")
            .field("pods", &self.pods())
            .field("topology", &self.topology)
            .finish_non_exhaustive()
    }
}

/// Checks the basics and defaults `metadata.namespace` for namespaced kinds.
fn normalize(mut object: Value) -> Result<Value, ClusterError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let has_api = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return Err(ClusterError::InvalidObject(format!(
            "{kind:?} without metadata"
        )));
    };
    if kind.is_empty() || !has_api || !metadata.get("name").is_some_and(Value::is_string) {
        return Err(ClusterError::InvalidObject(format!(
            "object needs apiVersion, kind and metadata.name (kind {kind:?})"
        )));
    }
    let cluster_scoped = [
        "Namespace",
        "Node",
        "PersistentVolume",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "StorageClass",
        "PriorityClass",
        "IngressClass",
        "RuntimeClass",
        "APIService",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
        "CSIDriver",
        "CSINode",
        "VolumeAttachment",
    ];
    if !cluster_scoped.contains(&kind.as_str()) && !metadata.contains_key("namespace") {
        metadata.insert("namespace".into(), json!("default"));
    }
    Ok(object)
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn label<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object.pointer("/metadata/labels")?.get(key)?.as_str()
}

/// Whether the Service's selector matches the pod's labels (an empty selector matches
/// every pod, as `labels.SelectorFromSet` does).
fn selects(service: &Value, pod: &Value) -> bool {
    let Some(selector) = service.pointer("/spec/selector").and_then(Value::as_object) else {
        return false;
    };
    selector
        .iter()
        .all(|(key, value)| pod.pointer("/metadata/labels").and_then(|l| l.get(key)) == Some(value))
}

fn port_protocol(port: &Value) -> &str {
    port.get("protocol")
        .and_then(Value::as_str)
        .unwrap_or("TCP")
}

/// (name, protocol, containerPort) of every container port of a pod.
fn container_ports(pod: &Value) -> Vec<(String, String, u16)> {
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array);
    containers
        .into_iter()
        .flatten()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter_map(|p| {
            let port = u16::try_from(p.get("containerPort")?.as_u64()?).ok()?;
            let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
            Some((name.to_string(), port_protocol(p).to_string(), port))
        })
        .collect()
}

/// `pod-template-hash`: FNV-1a (32 bit) of the template, its decimal digits mapped onto
/// the API server's name alphabet — the same shape as upstream's hashes.
fn template_hash(template: &Value) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in template.to_string().bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash.to_string()
        .bytes()
        .map(|b| char::from(NAME_ALPHABET[usize::from(b) % NAME_ALPHABET.len()]))
        .collect()
}

/// `prefix` + 5 random characters, retried until `taken` says no.
fn unique_name(prefix: &str, taken: impl Fn(&str) -> bool) -> String {
    let mut rng = rand::thread_rng();
    loop {
        let suffix: String = (0..5)
            .map(|_| char::from(NAME_ALPHABET[rng.gen_range(0..NAME_ALPHABET.len())]))
            .collect();
        let name = format!("{prefix}{suffix}");
        if !taken(&name) {
            return name;
        }
    }
}

/// RFC 3339 UTC timestamp with nanoseconds when non-zero (Go's `RFC3339Nano`).
fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_hash_is_stable_and_template_sensitive() {
        let a = json!({"metadata": {"labels": {"app": "a"}}});
        let b = json!({"metadata": {"labels": {"app": "b"}}});
        assert_eq!(template_hash(&a), template_hash(&a.clone()));
        assert_ne!(template_hash(&a), template_hash(&b));
        assert!(
            template_hash(&a)
                .bytes()
                .all(|c| NAME_ALPHABET.contains(&c))
        );
    }

    #[test]
    fn normalize_defaults_namespace_only_for_namespaced_kinds() {
        let svc =
            normalize(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}))
                .unwrap();
        assert_eq!(svc["metadata"]["namespace"], "default");
        let ns =
            normalize(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}}))
                .unwrap();
        assert!(ns["metadata"].get("namespace").is_none());
        assert!(normalize(json!({"kind": "Service", "metadata": {"name": "s"}})).is_err());
        assert!(normalize(json!({"apiVersion": "v1", "kind": "Service"})).is_err());
    }
}
