//! The mini control plane against an in-memory object store, with real pods (root).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kp_testkit::cluster::{
    ANNOTATION_TRIGGER_TIME, ENDPOINTSLICE_CONTROLLER, LABEL_MANAGED_BY, LABEL_SERVICE_NAME,
    MiniCluster, ObjectStore,
};
use kp_testkit::netns::{Topology, TopologySpec, list_netns};
use kp_testkit::probe::{probe_udp, tcp_connect_once};
use serde_json::{Value, json};

type Key = (String, String, String, String);

/// Minimal stand-in for the API server: keeps objects, assigns uids, counts writes.
#[derive(Default)]
struct FakeStore {
    objects: Mutex<BTreeMap<Key, Value>>,
    writes: Mutex<BTreeMap<String, usize>>,
    next_uid: Mutex<u64>,
}

fn key(api: &str, kind: &str, ns: Option<&str>, name: &str) -> Key {
    (
        api.into(),
        kind.into(),
        ns.unwrap_or("").into(),
        name.into(),
    )
}

impl FakeStore {
    fn writes(&self, kind: &str) -> usize {
        self.writes.lock().unwrap().get(kind).copied().unwrap_or(0)
    }
}

impl ObjectStore for FakeStore {
    fn apply(&self, mut obj: Value) -> anyhow::Result<Value> {
        let text = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
        let api = text(&obj, "/apiVersion").ok_or_else(|| anyhow::anyhow!("no apiVersion"))?;
        let kind = text(&obj, "/kind").ok_or_else(|| anyhow::anyhow!("no kind"))?;
        let name = text(&obj, "/metadata/name").ok_or_else(|| anyhow::anyhow!("no name"))?;
        let ns = text(&obj, "/metadata/namespace");
        let k = key(&api, &kind, ns.as_deref(), &name);
        let mut objects = self.objects.lock().unwrap();
        let uid = match objects.get(&k).and_then(|old| old.pointer("/metadata/uid")) {
            Some(uid) => uid.clone(),
            None => {
                let mut next = self.next_uid.lock().unwrap();
                *next += 1;
                json!(format!("uid-{next}"))
            }
        };
        obj["metadata"]["uid"] = uid;
        objects.insert(k, obj.clone());
        *self.writes.lock().unwrap().entry(kind).or_default() += 1;
        Ok(obj)
    }

    fn delete(&self, api: &str, kind: &str, ns: Option<&str>, name: &str) -> anyhow::Result<bool> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .remove(&key(api, kind, ns, name))
            .is_some())
    }

    fn list(&self, api: &str, kind: &str) -> Vec<Value> {
        let objects = self.objects.lock().unwrap();
        objects
            .iter()
            .filter(|((a, k, _, _), _)| a == api && k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

const REDIS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: redis
  labels: {app: redis}
spec:
  replicas: 2
  selector:
    matchLabels: {app: redis}
  template:
    metadata:
      labels: {app: redis, role: leader}
    spec:
      containers:
      - name: leader
        image: docker.io/redis:6.0.5
        ports:
        - containerPort: 6379
          name: redis
        - containerPort: 5353
          name: dns
          protocol: UDP
---
apiVersion: v1
kind: Service
metadata:
  name: redis
  labels: {app: redis, tier: backend}
spec:
  ports:
  - port: 6379
    targetPort: redis
  - name: dns
    port: 53
    protocol: UDP
    targetPort: dns
  selector: {app: redis, role: leader}
"#;

const TIMEOUT: Duration = Duration::from_secs(2);

fn cluster(nodes: usize) -> (Arc<FakeStore>, MiniCluster) {
    let store = Arc::new(FakeStore::default());
    let topology = Topology::new(TopologySpec::new(nodes)).expect("topology");
    let cluster = MiniCluster::new(store.clone(), topology).expect("cluster");
    (store, cluster)
}

fn slices_of(store: &FakeStore, service: &str) -> Vec<Value> {
    store
        .list("discovery.k8s.io/v1", "EndpointSlice")
        .into_iter()
        .filter(|s| s["metadata"]["labels"][LABEL_SERVICE_NAME] == service)
        .collect()
}

fn endpoint_ips(slice: &Value) -> Vec<String> {
    let mut ips: Vec<String> = slice["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["addresses"][0].as_str().unwrap().to_string())
        .collect();
    ips.sort();
    ips
}

fn pod_ips(cluster: &MiniCluster) -> Vec<String> {
    let mut ips: Vec<String> = cluster.pods().iter().map(|p| p.ip.to_string()).collect();
    ips.sort();
    ips
}

#[test]
fn deployment_and_service_give_answering_pods_and_one_slice() {
    let (store, mut cluster) = cluster(2);
    let stored = cluster.apply_manifest(REDIS).unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1]["metadata"]["namespace"], "default");

    let pods = cluster.pods();
    assert_eq!(pods.len(), 2);
    let nodes: Vec<&str> = pods.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes, ["node1", "node2"], "round-robin placement");
    let ext = cluster.topology().ext().ns.clone();
    for pod in &pods {
        assert!(pod.name.starts_with("redis-"), "{}", pod.name);
        let parts: Vec<&str> = pod.name.rsplitn(3, '-').collect();
        assert_eq!(parts[0].len(), 5, "{}", pod.name);
        let answer = tcp_connect_once(&ext, SocketAddr::new(pod.ip, 6379), TIMEOUT).unwrap();
        assert_eq!(answer.pod, pod.name);
        let udp = probe_udp(&ext, SocketAddr::new(pod.ip, 5353), 2, TIMEOUT).unwrap();
        assert_eq!(udp.answers.get(&pod.name), Some(&2), "{udp}");
        assert_eq!(
            cluster
                .pod_server("default", &pod.name)
                .unwrap()
                .udp_received(),
            2
        );

        let stored_pod = store
            .list("v1", "Pod")
            .into_iter()
            .find(|p| p["metadata"]["name"] == pod.name.as_str())
            .expect("pod object");
        assert_eq!(stored_pod["spec"]["nodeName"], pod.node.as_str());
        assert_eq!(stored_pod["status"]["podIP"], pod.ip.to_string());
        assert_eq!(stored_pod["status"]["phase"], "Running");
        assert_eq!(stored_pod["metadata"]["labels"]["role"], "leader");
        assert!(
            stored_pod["status"]["conditions"]
                .as_array()
                .unwrap()
                .contains(&json!({"type": "Ready", "status": "True",
                "lastTransitionTime": stored_pod["status"]["startTime"]}))
        );
    }

    let slices = slices_of(&store, "redis");
    assert_eq!(slices.len(), 1);
    let slice = &slices[0];
    assert!(
        slice["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("redis-")
    );
    assert_eq!(slice["metadata"]["namespace"], "default");
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(
        slice["metadata"]["labels"][LABEL_MANAGED_BY],
        ENDPOINTSLICE_CONTROLLER
    );
    assert_eq!(slice["metadata"]["labels"]["tier"], "backend");
    let service_uid = store.list("v1", "Service")[0]["metadata"]["uid"].clone();
    assert_eq!(slice["metadata"]["ownerReferences"][0]["uid"], service_uid);
    assert_eq!(slice["metadata"]["ownerReferences"][0]["controller"], true);
    let trigger = slice["metadata"]["annotations"][ANNOTATION_TRIGGER_TIME]
        .as_str()
        .unwrap();
    assert!(trigger.parse::<jiff::Timestamp>().is_ok(), "{trigger}");
    assert_eq!(
        slice["ports"],
        json!([{"name": "", "port": 6379, "protocol": "TCP"},
               {"name": "dns", "port": 5353, "protocol": "UDP"}])
    );
    assert_eq!(endpoint_ips(slice), pod_ips(&cluster));
    for endpoint in slice["endpoints"].as_array().unwrap() {
        assert_eq!(
            endpoint["conditions"],
            json!({"ready": true, "serving": true, "terminating": false})
        );
        let pod = pods
            .iter()
            .find(|p| endpoint["targetRef"]["name"] == p.name.as_str())
            .unwrap();
        assert_eq!(endpoint["nodeName"], pod.node.as_str());
        assert_eq!(endpoint["targetRef"]["kind"], "Pod");
        assert!(
            endpoint["targetRef"]["uid"]
                .as_str()
                .unwrap()
                .starts_with("uid-")
        );
    }

    // Nodes were registered for kube-proxy to find its own Node.
    let node_objects = store.list("v1", "Node");
    assert_eq!(node_objects.len(), 2);
    assert_eq!(node_objects[0]["spec"]["podCIDR"], "10.244.1.0/24");

    // Applying the same manifest again changes nothing.
    let slice_writes = store.writes("EndpointSlice");
    let names: Vec<String> = cluster.pods().into_iter().map(|p| p.name).collect();
    cluster.apply_manifest(REDIS).unwrap();
    assert_eq!(store.writes("EndpointSlice"), slice_writes);
    assert_eq!(
        cluster
            .pods()
            .into_iter()
            .map(|p| p.name)
            .collect::<Vec<_>>(),
        names
    );
}

#[test]
fn scaling_updates_pods_and_the_slice_in_place() {
    let (store, mut cluster) = cluster(2);
    cluster.apply_manifest(REDIS).unwrap();
    let slice_name = slices_of(&store, "redis")[0]["metadata"]["name"].clone();

    cluster.scale("default", "redis", 3).unwrap();
    assert_eq!(cluster.pods().len(), 3);
    assert_eq!(store.list("v1", "Pod").len(), 3);
    let deployment = &store.list("apps/v1", "Deployment")[0];
    assert_eq!(deployment["spec"]["replicas"], 3);
    let slices = slices_of(&store, "redis");
    assert_eq!(slices.len(), 1);
    assert_eq!(
        slices[0]["metadata"]["name"], slice_name,
        "updated, not recreated"
    );
    assert_eq!(endpoint_ips(&slices[0]), pod_ips(&cluster));
    assert_eq!(endpoint_ips(&slices[0]).len(), 3);

    let before = cluster.pods();
    cluster.scale("default", "redis", 1).unwrap();
    let after = cluster.pods();
    assert_eq!(after, before[..1].to_vec(), "the oldest pod survives");
    assert_eq!(store.list("v1", "Pod").len(), 1);
    let slices = slices_of(&store, "redis");
    assert_eq!(endpoint_ips(&slices[0]), vec![after[0].ip.to_string()]);
    let live = list_netns();
    for removed in &before[1..] {
        assert!(
            !live.contains(&removed.netns),
            "{} still exists",
            removed.netns
        );
    }
    let ext = cluster.topology().ext().ns.clone();
    assert_eq!(
        tcp_connect_once(&ext, SocketAddr::new(after[0].ip, 6379), TIMEOUT)
            .unwrap()
            .pod,
        after[0].name
    );

    assert!(cluster.scale("default", "nope", 1).is_err());
}

#[test]
fn deleting_pods_services_and_deployments_reconciles() {
    let (store, mut cluster) = cluster(1);
    cluster.apply_manifest(REDIS).unwrap();
    cluster
        .apply_manifest(
            r#"
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  selector: {app: nothing-matches}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: manual}
spec:
  ports: [{port: 80}]
"#,
        )
        .unwrap();
    // No matching pods: one empty placeholder slice, as upstream keeps.
    let placeholder = slices_of(&store, "nobody");
    assert_eq!(placeholder.len(), 1);
    assert_eq!(placeholder[0]["endpoints"], json!([]));
    assert_eq!(placeholder[0]["ports"], json!([]));
    // Selector-less Services are left to whoever manages their slices.
    assert!(slices_of(&store, "manual").is_empty());

    // A killed pod is replaced, and the slice follows.
    let victim = cluster.pods()[0].clone();
    assert!(
        cluster
            .delete_object("v1", "Pod", Some("default"), &victim.name)
            .unwrap()
    );
    let pods = cluster.pods();
    assert_eq!(pods.len(), 2);
    assert!(pods.iter().all(|p| p.name != victim.name));
    assert_eq!(
        endpoint_ips(&slices_of(&store, "redis")[0]),
        pod_ips(&cluster)
    );

    assert!(
        cluster
            .delete_object("v1", "Service", Some("default"), "redis")
            .unwrap()
    );
    assert!(slices_of(&store, "redis").is_empty());

    let netns: Vec<String> = pods.iter().map(|p| p.netns.clone()).collect();
    assert!(
        cluster
            .delete_object("apps/v1", "Deployment", Some("default"), "redis")
            .unwrap()
    );
    assert!(cluster.pods().is_empty());
    assert!(store.list("v1", "Pod").is_empty());
    let live = list_netns();
    assert!(netns.iter().all(|ns| !live.contains(ns)));
}

#[test]
fn bad_manifests_are_errors_not_panics() {
    let (_store, mut cluster) = cluster(1);
    assert!(cluster.apply_manifest("kind: [unclosed").is_err());
    assert!(
        cluster
            .apply_manifest("apiVersion: v1\nkind: Service\n")
            .is_err()
    );
    assert!(cluster.apply_manifest("---\n---\n").unwrap().is_empty());
    let list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}\n";
    assert_eq!(
        cluster.apply_manifest(list).unwrap()[0]["metadata"]["namespace"],
        "default"
    );
}
