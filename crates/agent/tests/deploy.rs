//! deploy/kube-proxy-rs.yaml is what users apply: every document must be a valid object of
//! its kind (nothing misspelled or ignored), the pieces must refer to each other, the
//! ConfigMap's KubeProxyConfiguration must load, and the ClusterRole must allow every
//! request the binary really makes (recorded by the API emulator while a proxy runs) and
//! nothing beyond get/list/watch of what it reads and writing Events.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const MANIFEST: &str = include_str!("../../../deploy/kube-proxy-rs.yaml");
const DOCKERFILE: &str = include_str!("../../../deploy/Dockerfile");

struct Manifest {
    account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    config: ConfigMap,
    daemonset: DaemonSet,
}

/// Paths present in `want` and missing or different in `got`.
fn lost_fields(want: &Value, got: &Value, path: &str, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                match g.get(k) {
                    Some(gv) => lost_fields(v, gv, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (a, b)) in w.iter().zip(g).enumerate() {
                lost_fields(a, b, &format!("{path}[{i}]"), out);
            }
        }
        _ if want != got => out.push(format!("{path} ({want} became {got})")),
        _ => {}
    }
}

/// Decodes `doc` as `T` and checks that encoding it again loses nothing: a field
/// k8s-openapi does not know (a typo, a wrong nesting level) would be silently dropped.
fn strict<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let obj: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", doc["kind"]));
    let mut lost = Vec::new();
    lost_fields(doc, &serde_json::to_value(&obj).unwrap(), "", &mut lost);
    assert!(
        lost.is_empty(),
        "{}: fields its type does not know: {lost:?}",
        doc["kind"]
    );
    obj
}

fn manifest() -> Manifest {
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(MANIFEST)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    Manifest {
        account: strict(&docs[0]),
        role: strict(&docs[1]),
        binding: strict(&docs[2]),
        config: strict(&docs[3]),
        daemonset: strict(&docs[4]),
    }
}

#[test]
fn manifests_are_valid_objects_that_refer_to_each_other() {
    let m = manifest();
    let sa_name = m.account.metadata.name.clone().unwrap();
    let sa_ns = m.account.metadata.namespace.clone().unwrap();
    assert_eq!(sa_ns, "kube-system");

    // The binding grants the role to the account.
    assert_eq!(m.binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&m.binding.role_ref.name),
        m.role.metadata.name.as_ref()
    );
    let subjects = m.binding.subjects.as_deref().unwrap_or_default();
    assert!(
        subjects.iter().any(|s| s.kind == "ServiceAccount"
            && s.name == sa_name
            && s.namespace.as_deref() == Some(sa_ns.as_str())),
        "binding subjects {subjects:?}"
    );

    let ds = &m.daemonset;
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let spec = &ds.spec;
    let update = spec.update_strategy.as_ref().unwrap();
    assert_eq!(update.type_.as_deref(), Some("RollingUpdate"));
    assert!(
        update
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref())
            .is_some(),
        "rolling update without maxUnavailable"
    );
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let labels = spec.template.metadata.as_ref().unwrap().labels.as_ref();
    for (k, v) in selector {
        assert_eq!(labels.and_then(|l| l.get(k)), Some(v), "selector {k}");
    }
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(sa_name.as_str()));
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must tolerate every taint, as kube-proxy does"
    );

    // The config volume is the ConfigMap above; the mounted file exists in it.
    let volumes = pod.volumes.as_deref().unwrap();
    let config_volume = volumes
        .iter()
        .find(|v| v.config_map.as_ref().map(|c| &c.name) == m.config.metadata.name.as_ref())
        .expect("a volume from the ConfigMap");
    let config_text = m
        .config
        .data
        .as_ref()
        .and_then(|d| d.get("config.conf"))
        .expect("config.conf in the ConfigMap");

    let main = &pod.containers[0];
    for c in pod
        .init_containers
        .as_deref()
        .unwrap_or_default()
        .iter()
        .chain([main])
    {
        let command = c.command.as_deref().unwrap();
        let mount = c
            .volume_mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|v| v.name == config_volume.name)
            .unwrap_or_else(|| panic!("{} does not mount the config", c.name));
        assert!(
            command.contains(&format!("--config={}/config.conf", mount.mount_path)),
            "{}: {command:?}",
            c.name
        );
        // The node name comes from the downward API.
        let node_name = c
            .env
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|e| e.name == "NODE_NAME")
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone());
        assert_eq!(node_name.as_deref(), Some("spec.nodeName"), "{}", c.name);
        assert!(command.contains(&"--hostname-override=$(NODE_NAME)".to_string()));
    }
    // The long-running container is not privileged: capabilities only.
    let security = main.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    let caps = security.capabilities.as_ref().unwrap();
    assert!(caps.add.as_deref().unwrap().contains(&"NET_ADMIN".into()));
    // Probes hit the health server's port and paths.
    let live = main
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    let ready = main
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/livez"));
    assert_eq!(ready.path.as_deref(), Some("/healthz"));
    assert!(config_text.contains("healthzBindAddress: 0.0.0.0:10256"));
    assert!(config_text.contains("metricsBindAddress: 127.0.0.1:10249"));

    // The binary accepts the config file and the command line exactly as deployed.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("config.conf");
    std::fs::write(&conf, config_text).unwrap();
    let out = dir.path().join("effective.yaml");
    let mut args: Vec<String> = main.command.as_deref().unwrap()[1..]
        .iter()
        .map(|a| {
            a.replace("$(NODE_NAME)", "node-1")
                .replace("/var/lib/kube-proxy-rs/config.conf", conf.to_str().unwrap())
        })
        .collect();
    args.push(format!("--write-config-to={}", out.display()));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_kube-proxy-rs"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let effective = std::fs::read_to_string(&out).unwrap();
    assert!(
        effective.contains("hostnameOverride: node-1"),
        "{effective}"
    );
    assert!(
        effective.contains("clusterCIDR: 10.244.0.0/16"),
        "{effective}"
    );

    // The image has the tools the proxy runs and the binary the commands name.
    for needed in [
        "iptables",
        "nftables",
        "conntrack",
        "/usr/local/bin/kube-proxy-rs",
    ] {
        assert!(DOCKERFILE.contains(needed), "Dockerfile lacks {needed}");
    }
}

/// `(verb, apiGroup, resource)` of one API request, or `None` for discovery and other
/// non-resource paths.
fn authorization_attributes(
    method: &str,
    path_and_query: &str,
) -> Option<(String, String, String)> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (resource, named) = match rest {
        [] => return None,
        ["namespaces", _, resource] => (*resource, false),
        ["namespaces", _, resource, _name, ..] => (*resource, true),
        [resource] => (*resource, false),
        [resource, _name, ..] => (*resource, true),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, named, watch) {
        ("GET", _, true) => "watch",
        ("GET", false, false) => "list",
        ("GET", true, false) => "get",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", false, _) => "deletecollection",
        ("DELETE", true, _) => "delete",
        _ => method,
    };
    Some((verb.to_string(), group.to_string(), resource.to_string()))
}

fn allows(rules: &[PolicyRule], verb: &str, group: &str, resource: &str) -> bool {
    let has = |list: &Option<Vec<String>>, v: &str| {
        list.as_deref()
            .unwrap_or_default()
            .iter()
            .any(|x| x == v || x == "*")
    };
    rules.iter().any(|r| {
        r.verbs.iter().any(|v| v == verb || v == "*")
            && has(&r.api_groups, group)
            && has(&r.resources, resource)
    })
}

#[test]
fn the_cluster_role_allows_every_request_the_proxy_makes() {
    let rules = manifest().role.rules.unwrap_or_default();
    // Nothing beyond reading what the proxy watches and writing Events.
    for r in &rules {
        for v in &r.verbs {
            assert!(v != "*", "wildcard verb in {r:?}");
            let events = r.resources.as_deref() == Some(&["events".to_string()][..]);
            assert!(
                matches!(v.as_str(), "get" | "list" | "watch")
                    || (events && matches!(v.as_str(), "create" | "patch" | "update")),
                "verb {v} in {r:?}"
            );
        }
        assert!(
            !r.resources
                .as_deref()
                .unwrap_or_default()
                .contains(&"*".into())
        );
        assert!(
            !r.api_groups
                .as_deref()
                .unwrap_or_default()
                .contains(&"*".into())
        );
    }

    // A proxy that programs a service and publishes its start event.
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 2, Some(serde_json::json!({})));
    start(&mut lab, 1, &[]);
    let target = svc_addr(&lab, "default", "web", 80);
    wait_serving(&lab, &ext_ns(&lab), target, Duration::from_secs(20));
    let wanted: BTreeSet<(&str, &str, &str)> = [
        ("list", "", "services"),
        ("watch", "", "services"),
        ("list", "discovery.k8s.io", "endpointslices"),
        ("watch", "discovery.k8s.io", "endpointslices"),
        ("list", "", "nodes"),
        ("watch", "", "nodes"),
        ("create", "events.k8s.io", "events"),
    ]
    .into();
    let seen = kp_testkit::lab::wait_for(Duration::from_secs(20), || {
        let seen: BTreeSet<(String, String, String)> = lab
            .emulator
            .request_log()
            .iter()
            .filter_map(|e| authorization_attributes(&e.method, &e.path))
            .collect();
        let covered = wanted
            .iter()
            .all(|(v, g, r)| seen.contains(&(v.to_string(), g.to_string(), r.to_string())));
        covered.then_some(seen)
    })
    .unwrap_or_else(|| {
        panic!(
            "the proxy did not make the requests expected of it: {:#?}",
            lab.emulator.request_log()
        )
    });
    for (verb, group, resource) in &seen {
        assert!(
            allows(&rules, verb, group, resource),
            "the ClusterRole does not allow {verb} {resource} (group {group:?}), which the proxy does"
        );
    }
    eprintln!("requests the proxy made, all allowed: {seen:?}");
}
