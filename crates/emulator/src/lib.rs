//! An in-process Kubernetes API server that kube-rs watchers and `kubectl` accept.
//!
//! It serves HTTPS (own CA, bearer-token or client-certificate auth) on its own thread and
//! tokio runtime, so synchronous tests can start it, poke objects directly through
//! [`Emulator::apply`] and friends, and inject faults (dropped watches, compaction,
//! failing or stalled requests) to exercise a client's recovery paths.
//!
//! ```no_run
//! use kp_emulator::{Emulator, EmulatorOptions};
//! let emulator = Emulator::start(EmulatorOptions::default())?;
//! emulator.apply(serde_json::json!({
//!     "apiVersion": "v1", "kind": "Service",
//!     "metadata": {"name": "web", "namespace": "default"},
//!     "spec": {"ports": [{"port": 80}]},
//! }))?;
//! let kubeconfig = emulator.kubeconfig_yaml(&emulator.url());
//! # let _ = kubeconfig;
//! # anyhow::Ok(())
//! ```

mod defaults;
mod handlers;
pub mod kubeconfig;
mod openapi;
mod patch;
mod request;
mod resources;
mod selectors;
mod server;
mod state;
mod status;
mod store;
mod table;
mod tls;
mod watch;

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use ipnet::IpNet;
use serde_json::{Value, json};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use state::RequestLogEntry;

use defaults::ServiceAllocator;
use state::{Faults, Shared, lock};
use store::{ObjectKey, Store};

/// How to start an [`Emulator`].
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    /// Address of the main listener; port 0 picks a free port.
    pub bind_address: SocketAddr,
    /// Extra IP SANs for the server certificate (e.g. a node address inside a netns).
    pub extra_san_ips: Vec<IpAddr>,
    /// Extra DNS SANs for the server certificate.
    pub extra_san_dns_names: Vec<String>,
    /// Bearer token clients must present; a random one when `None`.
    pub token: Option<String>,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// How many changes are kept for watch resumption before they are compacted away.
    pub history_limit: usize,
    /// Range ClusterIPs are allocated from for Services created without one.
    pub service_cluster_ip_range: IpNet,
    /// Range NodePorts are allocated from.
    pub service_node_port_range: RangeInclusive<u16>,
    /// Create the namespaces every cluster has (default, kube-system, kube-public, kube-node-lease).
    pub seed_namespaces: bool,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        Self {
            bind_address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            extra_san_ips: Vec::new(),
            extra_san_dns_names: Vec::new(),
            token: None,
            bookmark_interval: Duration::from_secs(1),
            history_limit: 10_000,
            service_cluster_ip_range: IpNet::from(
                ipnet::Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 12).unwrap_or_default(),
            ),
            service_node_port_range: 30000..=32767,
            seed_namespaces: true,
        }
    }
}

/// A running API-server emulator; dropping it stops the server.
pub struct Emulator {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    thread: Mutex<Option<JoinHandle<()>>>,
    acceptor: TlsAcceptor,
    local_addr: SocketAddr,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

const SEED_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

fn random_token() -> String {
    let bytes: [u8; 24] = rand::random();
    data_encoding::HEXLOWER.encode(&bytes)
}

/// Creates a missing namespace, so fixtures applied through the test API look like a
/// real cluster to kubectl (which checks the namespace when a lookup fails).
fn ensure_namespace(store: &mut Store, name: &str) -> anyhow::Result<()> {
    let resource = resources::find_by_kind("v1", "Namespace")
        .ok_or_else(|| anyhow!("Namespace kind missing"))?;
    let key = ObjectKey {
        resource,
        namespace: String::new(),
        name: name.to_string(),
    };
    if store.get(&key).is_none() {
        store.upsert(
            resource,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        )?;
    }
    Ok(())
}

impl Emulator {
    /// Starts serving on `options.bind_address`; returns once the listener is bound.
    pub fn start(options: EmulatorOptions) -> anyhow::Result<Self> {
        let pki = tls::Pki::generate(&options.extra_san_ips, &options.extra_san_dns_names)?;
        let listener = std::net::TcpListener::bind(options.bind_address)
            .with_context(|| format!("binding the emulator to {}", options.bind_address))?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;

        let (rv_tx, rv_rx) = tokio::sync::watch::channel(0u64);
        let (drop_tx, _) = tokio::sync::watch::channel(0u64);
        let allocator = ServiceAllocator::new(
            options.service_cluster_ip_range,
            options.service_node_port_range.clone(),
        );
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.history_limit, allocator, rv_tx)),
            resource_version_updates: rv_rx,
            drop_generation: drop_tx,
            open_watches: AtomicUsize::new(0),
            faults: Mutex::new(Faults::default()),
            request_log: Mutex::new(Vec::new()),
            token: options.token.clone().unwrap_or_else(random_token),
            client_cert_der: pki.client_cert_der.clone(),
            bookmark_interval: options.bookmark_interval.max(Duration::from_millis(10)),
            shutdown: CancellationToken::new(),
            server_address: local_addr.to_string(),
        });

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kp-emulator")
            .enable_all()
            .build()
            .context("building the emulator runtime")?;
        let handle = runtime.handle().clone();
        let acceptor = TlsAcceptor::from(pki.server_config.clone());
        let tokio_listener = {
            let _entered = handle.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        handle.spawn(server::accept_loop(
            shared.clone(),
            acceptor.clone(),
            tokio_listener,
        ));
        let shutdown = shared.shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("kp-emulator".into())
            .spawn(move || {
                runtime.block_on(shutdown.cancelled());
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .context("spawning the emulator thread")?;

        let emulator = Self {
            shared,
            runtime: handle,
            thread: Mutex::new(Some(thread)),
            acceptor,
            local_addr,
            ca_pem: pki.ca_pem,
            client_cert_pem: pki.client_cert_pem,
            client_key_pem: pki.client_key_pem,
        };
        if options.seed_namespaces {
            for name in SEED_NAMESPACES {
                emulator.apply(
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
                )?;
            }
        }
        Ok(emulator)
    }

    /// Also serves on a listener the caller bound (e.g. inside another network namespace).
    pub fn serve_listener(&self, listener: std::net::TcpListener) -> anyhow::Result<()> {
        listener.set_nonblocking(true)?;
        let listener = {
            let _entered = self.runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        self.runtime.spawn(server::accept_loop(
            self.shared.clone(),
            self.acceptor.clone(),
            listener,
        ));
        Ok(())
    }

    /// Stops serving and closes every connection; idempotent (drop calls it too).
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }

    /// `https://127.0.0.1:PORT` (or the bound address).
    pub fn url(&self) -> String {
        let ip = match self.local_addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip if ip.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("https://{}", SocketAddr::new(ip, self.local_addr.port()))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// PEM of the CA that signed the server and client certificates.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    pub fn token(&self) -> String {
        self.shared.token.clone()
    }

    /// A client certificate and key (PEM) the emulator accepts, as user `emulator-admin`.
    pub fn client_cert_pem_and_key(&self) -> (String, String) {
        (self.client_cert_pem.clone(), self.client_key_pem.clone())
    }

    /// Kubeconfig (cluster/user/context "emulator") with the CA inlined and the token.
    pub fn kubeconfig_yaml(&self, server_url: &str) -> String {
        kubeconfig::render(
            server_url,
            &self.ca_pem,
            kubeconfig::token_user(&self.shared.token),
        )
    }

    /// Kubeconfig authenticating with the client certificate instead of the token.
    pub fn kubeconfig_yaml_client_cert(&self, server_url: &str) -> String {
        let user = kubeconfig::client_cert_user(&self.client_cert_pem, &self.client_key_pem);
        kubeconfig::render(server_url, &self.ca_pem, user)
    }

    /// Writes [`Self::kubeconfig_yaml`] to `path` with mode 0600.
    pub fn write_kubeconfig(
        &self,
        path: impl AsRef<Path>,
        server_url: &str,
    ) -> std::io::Result<()> {
        let path = path.as_ref();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(self.kubeconfig_yaml(server_url).as_bytes())
    }

    /// Creates or replaces an object (by apiVersion, kind, namespace, name), bumping the
    /// resourceVersion and notifying watches. Returns the stored object. A namespaced
    /// object's namespace is created first when missing.
    pub fn apply(&self, object: Value) -> anyhow::Result<Value> {
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if kind == "List" || (kind.ends_with("List") && object.get("items").is_some()) {
            return Err(anyhow!(
                "apply takes one object; use apply_yaml_multi for lists"
            ));
        }
        let resource = resources::find_by_kind(api_version, kind)
            .ok_or_else(|| anyhow!("the emulator does not serve {api_version:?} {kind:?}"))?;
        let mut store = self.shared.store();
        if resources::resource(resource).namespaced {
            let namespace = store::object_namespace(&object)
                .filter(|ns| !ns.is_empty())
                .unwrap_or("default");
            ensure_namespace(&mut store, namespace)?;
        }
        Ok(store.upsert(resource, object)?)
    }

    /// Stores `object` without the API server's defaulting and validation, as a broken or
    /// hostile writer could: for tests of how clients cope with invalid objects.
    pub fn apply_unvalidated(&self, object: Value) -> anyhow::Result<Value> {
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let resource = resources::find_by_kind(api_version, kind)
            .ok_or_else(|| anyhow!("the emulator does not serve {api_version:?} {kind:?}"))?;
        let mut store = self.shared.store();
        if resources::resource(resource).namespaced {
            let namespace = store::object_namespace(&object)
                .filter(|ns| !ns.is_empty())
                .unwrap_or("default");
            if ensure_namespace(&mut store, namespace).is_err() {
                // A namespace name the server would refuse: store the object anyway.
            }
        }
        Ok(store.upsert_unvalidated(resource, object)?)
    }

    /// Applies every document of a multi-document YAML manifest (and the items of `List`s).
    pub fn apply_yaml_multi(&self, manifest: &str) -> anyhow::Result<Vec<Value>> {
        let mut applied = Vec::new();
        for document in serde_yaml::Deserializer::from_str(manifest) {
            let value: Value =
                serde::Deserialize::deserialize(document).context("parsing a YAML document")?;
            if value.is_null() {
                continue;
            }
            let items = match value.get("items").and_then(Value::as_array) {
                Some(items)
                    if value
                        .get("kind")
                        .and_then(Value::as_str)
                        .is_some_and(|k| k.ends_with("List")) =>
                {
                    items.clone()
                }
                _ => vec![value],
            };
            for item in items {
                applied.push(self.apply(item)?);
            }
        }
        Ok(applied)
    }

    fn key(
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<ObjectKey> {
        let resource = resources::find_by_kind(api_version, kind)
            .ok_or_else(|| anyhow!("the emulator does not serve {api_version:?} {kind:?}"))?;
        let namespace = if resources::resource(resource).namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        Ok(ObjectKey {
            resource,
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// Deletes an object; `Ok(false)` when it did not exist. For namespaced kinds a
    /// `None` namespace means `default` (also in [`Self::get`]).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<bool> {
        let key = Self::key(api_version, kind, namespace, name)?;
        let mut store = self.shared.store();
        if store.get(&key).is_none() {
            return Ok(false);
        }
        store.delete(&key)?;
        Ok(true)
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = Self::key(api_version, kind, namespace, name).ok()?;
        self.shared.store().get(&key).cloned()
    }

    /// All objects of a kind, in namespace/name order.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let Some(resource) = resources::find_by_kind(api_version, kind) else {
            return Vec::new();
        };
        self.shared
            .store()
            .list(resource, None, None)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Events clients created (core/v1 and events.k8s.io/v1), oldest first.
    pub fn events(&self) -> Vec<Value> {
        let store = self.shared.store();
        let mut events: Vec<Value> = resources::event_resources()
            .into_iter()
            .flat_map(|resource| {
                store
                    .list(resource, None, None)
                    .map(|(_, v)| v.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        let rv = |v: &Value| {
            store::object_resource_version(v)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        };
        events.sort_by_key(rv);
        events
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Follows the global resourceVersion (changes on every write).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut receiver = self.shared.resource_version_updates.clone();
        receiver.borrow_and_update();
        receiver
    }

    /// Ends every open watch stream now; returns how many were open.
    pub fn drop_watches(&self) -> usize {
        let open = self.open_watch_count();
        self.shared
            .drop_generation
            .send_modify(|generation| *generation += 1);
        open
    }

    /// Makes every resourceVersion up to now too old: resuming a watch from one of them
    /// gets an ERROR event with 410 Expired. Open watches keep running.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Simulates an API server whose etcd was restored from a backup: same objects, a
    /// new, lower resourceVersion history; open watches end.
    pub fn restore_with_new_history(&self) {
        self.shared.store().restore_with_new_history();
        self.drop_watches();
    }

    /// The next `count` resource requests answer `status` with a Status body.
    /// Discovery, /version and health endpoints are not affected.
    pub fn set_fail_requests(&self, count: u32, status: u16) {
        let mut faults = lock(&self.shared.faults);
        faults.fail_remaining = count;
        faults.fail_status = status;
    }

    /// Every request waits this long before it is answered (`None` to stop).
    pub fn set_stall(&self, stall: Option<Duration>) {
        lock(&self.shared.faults).stall = stall;
    }

    pub fn open_watch_count(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Every request answered so far (method, path with query, status), oldest first.
    pub fn request_log(&self) -> Vec<RequestLogEntry> {
        lock(&self.shared.request_log).clone()
    }

    pub fn clear_request_log(&self) {
        lock(&self.shared.request_log).clear();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}
