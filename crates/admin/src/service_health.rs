//! healthCheckNodePort servers, as upstream's pkg/proxy/healthcheck/service_health.go.
//!
//! For a LoadBalancer Service with `externalTrafficPolicy: Local` the API server allocates
//! `spec.healthCheckNodePort`; cloud load balancers probe it on every node to learn which
//! nodes have local endpoints. Every path and method answers JSON
//! `{"service":{"namespace","name"},"localEndpoints":N,"serviceProxyHealthy":bool}` with
//! `X-Load-Balancing-Endpoint-Weight: N`: 200 when N > 0 and the proxy is healthy, else 503.
//!
//! The sync loop runs on a plain thread, so the API is synchronous: sockets are bound with
//! the standard library (bind errors are immediate and per service) and then served by a
//! small current-thread Tokio runtime on a background thread that this server owns.
//! Closing is synchronous too: when `sync_services` returns, removed ports are free again,
//! so ports can move between services in one call. Dropping the last clone stops the
//! runtime and closes every port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::task::{JoinHandle, JoinSet};

use crate::health::ProxyHealth;

/// Reason of the Warning Event upstream puts on a Service whose health check port failed.
pub const FAILED_TO_START_EVENT_REASON: &str = "FailedToStartServiceHealthcheck";
/// Action of that Event.
pub const FAILED_TO_START_EVENT_ACTION: &str = "Listen";
/// Header carrying the local endpoint count, read by weighted cloud load balancers.
pub const ENDPOINT_WEIGHT_HEADER: &str = "X-Load-Balancing-Endpoint-Weight";

/// A Service as (namespace, name).
pub type ServiceName = (String, String);

/// How long closing waits for the serving task to drop its socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
const LISTEN_BACKLOG: i32 = 1024;

/// A health check port that could not be opened. The service is retried on the next
/// [`ServiceHealthServer::sync_services`] call.
#[derive(Debug, thiserror::Error)]
#[error(
    "failed to start healthcheck \"{namespace}/{name}\" on port {port}: listen tcp {addr}: {source}"
)]
pub struct HealthCheckListenError {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    /// The address that failed.
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

impl HealthCheckListenError {
    /// The message of upstream's `FailedToStartServiceHealthcheck` Event.
    pub fn event_message(&self, node_name: &str) -> String {
        format!(
            "node {node_name} failed to start healthcheck \"{}/{}\" on port {}: listen tcp {}: {}",
            self.namespace, self.name, self.port, self.addr, self.source
        )
    }
}

/// Serves the healthCheckNodePorts of Services; cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct ServiceHealthServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    /// Empty: every address (0.0.0.0 and, when the host has IPv6, [::]).
    listen_ips: Vec<IpAddr>,
    /// The serving runtime, or why it could not start (reported per service).
    runtime: Result<RuntimeThread, String>,
    open: Mutex<BTreeMap<ServiceName, Instance>>,
}

/// What request handlers read; never holds the runtime, so no task keeps it alive.
#[derive(Debug)]
struct Shared {
    health: ProxyHealth,
    counts: Mutex<BTreeMap<ServiceName, usize>>,
}

/// The open listeners of one service.
#[derive(Debug)]
struct Instance {
    port: u16,
    listeners: Vec<Listener>,
}

#[derive(Debug)]
struct Listener {
    addr: SocketAddr,
    task: JoinHandle<()>,
    /// Disconnects once the serving task has dropped its socket.
    closed: mpsc::Receiver<()>,
}

impl ServiceHealthServer {
    /// Starts the serving runtime. `listen_ips` are the node addresses matching
    /// `nodePortAddresses`; empty means all addresses.
    pub fn new(health: ProxyHealth, listen_ips: Vec<IpAddr>) -> Self {
        let runtime = RuntimeThread::start().map_err(|err| {
            tracing::error!(error = %err, "cannot start the service health check runtime");
            format!("health check runtime unavailable: {err}")
        });
        ServiceHealthServer {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared {
                    health,
                    counts: Mutex::new(BTreeMap::new()),
                }),
                listen_ips,
                runtime,
                open: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Makes `services` (service -> healthCheckNodePort) the open set: closes services
    /// that are gone or whose port changed, then opens the missing ones. Each failure is
    /// returned (for logging and the `FailedToStartServiceHealthcheck` Event) and affects
    /// only its own service, which is retried on the next call.
    pub fn sync_services(
        &self,
        services: &BTreeMap<ServiceName, u16>,
    ) -> Vec<HealthCheckListenError> {
        let mut open = lock(&self.inner.open);

        let stale: Vec<ServiceName> = open
            .iter()
            .filter(|(key, instance)| services.get(*key) != Some(&instance.port))
            .map(|(key, _)| key.clone())
            .collect();
        let mut closing = Vec::new();
        for key in stale {
            if let Some(instance) = open.remove(&key) {
                tracing::info!(service = %service_label(&key), port = instance.port, "closing healthcheck");
                closing.extend(instance.listeners);
            }
        }
        // Abort all first, then wait, so many closes cost one round trip.
        for listener in &closing {
            listener.task.abort();
        }
        for listener in closing {
            listener.wait_closed();
        }

        let mut errors = Vec::new();
        for (key, &port) in services {
            if open.contains_key(key) {
                continue;
            }
            match self.open(key, port) {
                Ok(instance) => {
                    tracing::info!(service = %service_label(key), port, "opening healthcheck");
                    open.insert(key.clone(), instance);
                }
                Err(err) => errors.push(err),
            }
        }
        errors
    }

    /// Sets the local ready endpoint counts; services not listed have 0.
    pub fn sync_endpoints(&self, counts: &BTreeMap<ServiceName, usize>) {
        *lock(&self.inner.shared.counts) = counts.clone();
    }

    /// The services whose port is open, with that port.
    pub fn ports(&self) -> BTreeMap<ServiceName, u16> {
        lock(&self.inner.open)
            .iter()
            .map(|(key, instance)| (key.clone(), instance.port))
            .collect()
    }

    /// The addresses one service listens on (for diagnostics and tests).
    pub fn local_addrs(&self, service: &ServiceName) -> Vec<SocketAddr> {
        lock(&self.inner.open)
            .get(service)
            .map(|instance| instance.listeners.iter().map(|l| l.addr).collect())
            .unwrap_or_default()
    }

    /// Binds every address for `port` and starts serving; on any failure nothing stays open.
    fn open(&self, key: &ServiceName, port: u16) -> Result<Instance, HealthCheckListenError> {
        let fail = |addr: SocketAddr, source: io::Error| HealthCheckListenError {
            namespace: key.0.clone(),
            name: key.1.clone(),
            port,
            addr,
            source,
        };
        let first_addr = SocketAddr::new(
            self.inner
                .listen_ips
                .first()
                .copied()
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            port,
        );
        if port == 0 {
            let source = io::Error::new(io::ErrorKind::InvalidInput, "port 0 is not allocated");
            return Err(fail(first_addr, source));
        }
        let runtime = match &self.inner.runtime {
            Ok(runtime) => runtime,
            Err(reason) => return Err(fail(first_addr, io::Error::other(reason.clone()))),
        };
        let sockets = bind_all(&self.inner.listen_ips, port).map_err(|(a, e)| fail(a, e))?;

        let _context = runtime.handle.enter();
        let mut listeners = Vec::with_capacity(sockets.len());
        for (addr, socket) in sockets {
            // Registering with the reactor can fail (e.g. epoll limits): close what started.
            let listener = match TcpListener::from_std(socket) {
                Ok(listener) => listener,
                Err(source) => {
                    close_all(listeners);
                    return Err(fail(addr, source));
                }
            };
            let (done, closed) = mpsc::channel();
            let task = runtime.handle.spawn(serve(
                listener,
                key.clone(),
                self.inner.shared.clone(),
                done,
            ));
            listeners.push(Listener { addr, task, closed });
        }
        Ok(Instance { port, listeners })
    }
}

impl Listener {
    /// Blocks until the serving task has released the socket (it was aborted before).
    fn wait_closed(self) {
        if let Err(mpsc::RecvTimeoutError::Timeout) = self.closed.recv_timeout(CLOSE_TIMEOUT) {
            tracing::warn!(addr = %self.addr, "healthcheck listener did not close in time");
        }
    }
}

fn close_all(listeners: Vec<Listener>) {
    for listener in &listeners {
        listener.task.abort();
    }
    for listener in listeners {
        listener.wait_closed();
    }
}

/// Binds `port` on each listen address, or on 0.0.0.0 plus [::] (IPv6-only socket) when
/// none are given. [::] is skipped when the host has no IPv6; any other error fails.
fn bind_all(
    listen_ips: &[IpAddr],
    port: u16,
) -> Result<Vec<(SocketAddr, std::net::TcpListener)>, (SocketAddr, io::Error)> {
    let mut sockets = Vec::new();
    if listen_ips.is_empty() {
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        sockets.push((v4, bind(v4).map_err(|err| (v4, err))?));
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        match bind(v6) {
            Ok(socket) => sockets.push((v6, socket)),
            Err(err) if ipv6_unavailable(&err) => {
                tracing::debug!(error = %err, "no IPv6 on this host, healthcheck listens on IPv4 only");
            }
            Err(err) => return Err((v6, err)),
        }
    } else {
        for ip in listen_ips {
            let addr = SocketAddr::new(*ip, port);
            sockets.push((addr, bind(addr).map_err(|err| (addr, err))?));
        }
    }
    Ok(sockets)
}

/// A non-blocking listening socket with SO_REUSEADDR (as Go's listeners, so a port in
/// TIME_WAIT can be reused) and IPV6_V6ONLY for IPv6 (so [::] does not collide with 0.0.0.0).
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Errors meaning "this host has no IPv6" rather than a real conflict.
fn ipv6_unavailable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// Owned by the serving task: fields drop in order, so the socket is closed before the
/// connections are aborted and `_done` tells the closer it may rebind the port.
struct Serving {
    listener: TcpListener,
    connections: JoinSet<()>,
    _done: mpsc::Sender<()>,
}

async fn serve(
    listener: TcpListener,
    service: ServiceName,
    shared: Arc<Shared>,
    done: mpsc::Sender<()>,
) {
    let mut serving = Serving {
        listener,
        connections: JoinSet::new(),
        _done: done,
    };
    loop {
        match serving.listener.accept().await {
            Ok((stream, _peer)) => {
                while serving.connections.try_join_next().is_some() {}
                let shared = shared.clone();
                let service = service.clone();
                serving.connections.spawn(async move {
                    let handler = service_fn(move |_request: Request<Incoming>| {
                        let response = shared.respond(&service);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let result = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), handler)
                        .await;
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "healthcheck connection error");
                    }
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, service = %service_label(&service), "healthcheck accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

impl Shared {
    /// Upstream's answer, byte for byte: Go's dedented multi-line JSON without a final newline.
    fn respond(&self, service: &ServiceName) -> Response<Body> {
        let count = lock(&self.counts).get(service).copied().unwrap_or(0);
        let healthy = self.health.is_healthy();
        let status = if count > 0 && healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = response_body(&service.0, &service.1, count, healthy);
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(ENDPOINT_WEIGHT_HEADER, HeaderValue::from(count));
        response
    }
}

/// The JSON body upstream writes (tab-indented, fields in this order).
pub fn response_body(namespace: &str, name: &str, local_endpoints: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        quote(namespace),
        quote(name)
    )
}

/// A JSON string literal; equals Go's `%q` for the characters object names may contain.
fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| String::from("\"\""))
}

fn service_label(service: &ServiceName) -> impl fmt::Display + '_ {
    struct Name<'a>(&'a ServiceName);
    impl fmt::Display for Name<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}/{}", self.0.0, self.0.1)
        }
    }
    Name(service)
}

/// A current-thread Tokio runtime driven by its own thread until this is dropped.
#[derive(Debug)]
struct RuntimeThread {
    handle: Handle,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RuntimeThread {
    /// The runtime is built inside its thread so it is also dropped there (dropping a
    /// runtime inside another runtime's async context would panic).
    fn start() -> io::Result<Self> {
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let (handle_tx, handle_rx) = mpsc::channel::<io::Result<Handle>>();
        let thread = thread::Builder::new()
            .name("svc-healthcheck".to_owned())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        // The receiver only disappears if `start` already gave up.
                        let _ = handle_tx.send(Ok(runtime.handle().clone()));
                        runtime.block_on(async {
                            // Resolves when the sender is dropped.
                            let _ = stop.await;
                        });
                    }
                    Err(err) => {
                        let _ = handle_tx.send(Err(err));
                    }
                }
            })?;
        let handle = handle_rx
            .recv()
            .map_err(|_| io::Error::other("health check runtime thread exited"))??;
        Ok(RuntimeThread {
            handle,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }
}

impl Drop for RuntimeThread {
    /// Stops the runtime, which drops every serving task and so closes every port; waits
    /// for it so the ports are free when the server is gone.
    fn drop(&mut self) {
        drop(self.shutdown.take());
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != thread::current().id()
            && thread.join().is_err()
        {
            tracing::warn!("health check runtime thread panicked");
        }
    }
}

/// Locks, recovering the data after a panic elsewhere: every update is a single assignment.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_matches_go_dedented_template() {
        assert_eq!(
            response_body("ns", "svc", 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"svc\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }

    #[test]
    fn ipv6_absence_is_not_a_conflict() {
        assert!(ipv6_unavailable(&io::Error::from_raw_os_error(
            libc::EAFNOSUPPORT
        )));
        assert!(ipv6_unavailable(&io::Error::from_raw_os_error(
            libc::EADDRNOTAVAIL
        )));
        assert!(!ipv6_unavailable(&io::Error::from_raw_os_error(
            libc::EADDRINUSE
        )));
    }

    #[test]
    fn event_message_names_node_service_and_port() {
        let err = HealthCheckListenError {
            namespace: "ns".into(),
            name: "svc".into(),
            port: 30000,
            addr: "0.0.0.0:30000".parse().expect("addr"),
            source: io::Error::from_raw_os_error(libc::EADDRINUSE),
        };
        let message = err.event_message("node-1");
        assert!(
            message.starts_with(
                "node node-1 failed to start healthcheck \"ns/svc\" on port 30000: listen tcp 0.0.0.0:30000: "
            ),
            "{message}"
        );
    }
}
