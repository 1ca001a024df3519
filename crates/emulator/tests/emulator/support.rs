//! Shared helpers for the emulator tests: clients, object builders, a watcher mirror
//! and a kubectl runner.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kp_emulator::{Emulator, EmulatorOptions};
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Config, ResourceExt};
use serde_json::{Value, json};

pub fn start() -> Emulator {
    start_with(EmulatorOptions::default())
}

pub fn start_with(options: EmulatorOptions) -> Emulator {
    Emulator::start(options).expect("emulator starts")
}

pub async fn client_for(kubeconfig_yaml: &str) -> Client {
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(kubeconfig_yaml).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("kube client")
}

/// A client that surfaces 429/503/504 at once instead of retrying them (as the proxy's).
pub async fn client_without_retries(emulator: &Emulator) -> Client {
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&emulator.kubeconfig_yaml(&emulator.url()))
            .expect("kubeconfig parses");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kube config");
    config.default_retry = false;
    Client::try_from(config).expect("kube client")
}

pub async fn client(emulator: &Emulator) -> Client {
    client_for(&emulator.kubeconfig_yaml(&emulator.url())).await
}

pub fn service(namespace: &str, name: &str, labels: Value, cluster_ip: Option<&str>) -> Value {
    let mut spec = json!({
        "selector": {"app": name},
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    });
    if let Some(ip) = cluster_ip {
        spec["clusterIP"] = json!(ip);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    })
}

pub fn endpoint_slice(namespace: &str, service: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abc12"),
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [ip],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": "node-1",
        }],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

/// A kube-rs watcher folded into a name -> clusterIP map, counting relists and errors.
pub struct Mirror {
    pub services: Arc<Mutex<BTreeMap<String, String>>>,
    pub relists: Arc<AtomicUsize>,
    pub errors: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Mirror {
    pub fn start(api: Api<Service>, config: watcher::Config) -> Self {
        let services = Arc::new(Mutex::new(BTreeMap::new()));
        let relists = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let (s, r, e) = (services.clone(), relists.clone(), errors.clone());
        let task = tokio::spawn(async move {
            let mut stream = watcher::watcher(api, config).default_backoff().boxed();
            let mut pending = BTreeMap::new();
            let key = |svc: &Service| {
                format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
            };
            let ip = |svc: &Service| {
                svc.spec
                    .as_ref()
                    .and_then(|s| s.cluster_ip.clone())
                    .unwrap_or_default()
            };
            while let Some(event) = stream.next().await {
                match event {
                    Ok(Event::Init) => {
                        r.fetch_add(1, Ordering::SeqCst);
                        pending.clear();
                    }
                    Ok(Event::InitApply(svc)) => {
                        pending.insert(key(&svc), ip(&svc));
                    }
                    Ok(Event::InitDone) => *s.lock().expect("lock") = std::mem::take(&mut pending),
                    Ok(Event::Apply(svc)) => {
                        s.lock().expect("lock").insert(key(&svc), ip(&svc));
                    }
                    Ok(Event::Delete(svc)) => {
                        s.lock().expect("lock").remove(&key(&svc));
                    }
                    Err(_) => {
                        e.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        Self {
            services,
            relists,
            errors,
            task,
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, String> {
        self.services.lock().expect("lock").clone()
    }

    pub async fn wait_for(
        &self,
        what: &str,
        predicate: impl Fn(&BTreeMap<String, String>) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !predicate(&self.snapshot()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; mirror = {:?}",
                self.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn wait_until(what: &str, predicate: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !predicate() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn upstream_service_config() -> watcher::Config {
    watcher::Config::default()
        .labels("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless")
        .fields("spec.clusterIP!=None")
}

/// kubectl is part of the test image; skip (loudly) where it is missing.
pub fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Option<std::process::Output> {
    let output = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output();
    match output {
        Ok(output) => Some(output),
        Err(error) => {
            eprintln!("skipping kubectl check: {error}");
            None
        }
    }
}

pub fn stdout_ok(output: std::process::Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf8")
}
