//! Tiny servers standing in for a Service's backend pods.
//!
//! Every TCP connection gets `"<pod_name> <peer_ip>\n"` and is closed; every UDP
//! datagram is answered with the same text. The peer IP shows whether a path was
//! masqueraded. Sockets are created inside the pod's namespace and are dual-stack
//! (`[::]` with `IPV6_V6ONLY` off, IPv4 peers reported as plain IPv4).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::sys::socket::{Backlog, SockaddrIn6, bind, listen, setsockopt, sockopt};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use crate::netns::{NetnsError, in_netns};

/// Transport protocol of a served port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    /// One-to-one SCTP sockets (`SOCK_STREAM`/`IPPROTO_SCTP`); needs kernel SCTP
    /// support, which this project's CI kernel lacks (see [`sctp_supported`]).
    Sctp,
}

impl Protocol {
    /// Parses a Kubernetes protocol name (`TCP`, `UDP`, `SCTP`).
    pub fn from_k8s(name: &str) -> Option<Protocol> {
        match name {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The Kubernetes spelling.
    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// One port a [`PodServer`] listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerPort {
    pub protocol: Protocol,
    pub port: u16,
}

/// Errors starting a pod server.
#[derive(Debug, thiserror::Error)]
pub enum PodServerError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{protocol:?} port {port}: {source}")]
    Socket {
        protocol: Protocol,
        port: u16,
        source: std::io::Error,
    },
    #[error("the kernel does not support SCTP sockets")]
    SctpUnsupported,
    #[error("start server thread: {0}")]
    Runtime(std::io::Error),
}

/// Counters the tests read.
#[derive(Debug, Default)]
struct ServerStats {
    tcp_accepted: AtomicU64,
    udp_received: AtomicU64,
    udp_by_source: Mutex<BTreeMap<IpAddr, u64>>,
}

/// A running pod server; stops and closes its sockets when dropped.
pub struct PodServer {
    pod_name: String,
    ns: String,
    ports: Vec<ServerPort>,
    stats: Arc<ServerStats>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PodServer {
    /// Serves `tcp_ports` and `udp_ports` inside namespace `ns`, answering as
    /// `pod_name`. Returns once every socket is bound and listening.
    pub fn start(
        ns: &str,
        pod_name: &str,
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> Result<PodServer, PodServerError> {
        let ports: Vec<ServerPort> = tcp_ports
            .iter()
            .map(|&port| ServerPort {
                protocol: Protocol::Tcp,
                port,
            })
            .chain(udp_ports.iter().map(|&port| ServerPort {
                protocol: Protocol::Udp,
                port,
            }))
            .collect();
        Self::start_ports(ns, pod_name, &ports)
    }

    /// Serves the given ports (any protocol) inside namespace `ns`.
    pub fn start_ports(
        ns: &str,
        pod_name: &str,
        ports: &[ServerPort],
    ) -> Result<PodServer, PodServerError> {
        let mut ports = ports.to_vec();
        ports.sort();
        ports.dedup();
        let sockets = in_netns(ns, || {
            ports
                .iter()
                .map(|port| open_socket(*port).map(|fd| (*port, fd)))
                .collect::<Result<Vec<_>, _>>()
        })??;
        let stats = Arc::new(ServerStats::default());
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(PodServerError::Runtime)?;
        let reply_name = pod_name.to_string();
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name(format!("podserver-{pod_name}"))
            .spawn(move || {
                // Everything (tasks and sockets) is dropped before the thread ends, so
                // joining the thread means the ports are closed.
                runtime.block_on(serve(sockets, reply_name, thread_stats, stopped));
            })
            .map_err(PodServerError::Runtime)?;
        Ok(PodServer {
            pod_name: pod_name.to_string(),
            ns: ns.to_string(),
            ports,
            stats,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The name the server answers with.
    pub fn pod_name(&self) -> &str {
        &self.pod_name
    }

    /// The namespace the sockets live in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The ports served, sorted.
    pub fn ports(&self) -> &[ServerPort] {
        &self.ports
    }

    /// TCP (and SCTP) connections accepted so far.
    pub fn tcp_accepted(&self) -> u64 {
        self.stats.tcp_accepted.load(Ordering::Relaxed)
    }

    /// UDP datagrams received so far, on all UDP ports.
    pub fn udp_received(&self) -> u64 {
        self.stats.udp_received.load(Ordering::Relaxed)
    }

    /// UDP datagrams received so far, per source address as seen by the pod.
    pub fn udp_received_by_source(&self) -> BTreeMap<IpAddr, u64> {
        self.stats
            .udp_by_source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Stops serving and closes every socket; also done on drop.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for PodServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodServer")
            .field("pod_name", &self.pod_name)
            .field("ns", &self.ns)
            .field("ports", &self.ports)
            .finish_non_exhaustive()
    }
}

/// The reply text for a peer, as both TCP and UDP send it.
pub fn reply_text(pod_name: &str, peer: IpAddr) -> String {
    format!("{pod_name} {peer}\n")
}

/// Whether SCTP sockets can be created in namespace `ns`.
pub fn sctp_supported(ns: &str) -> Result<bool, NetnsError> {
    in_netns(ns, || {
        new_socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP).is_ok()
    })
}

fn new_socket(domain: i32, kind: i32, protocol: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the returned descriptor is owned by nobody else.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates, binds (dual-stack `[::]:port`) and, for stream protocols, listens.
fn open_socket(port: ServerPort) -> Result<OwnedFd, PodServerError> {
    let fail = |source: std::io::Error| PodServerError::Socket {
        protocol: port.protocol,
        port: port.port,
        source,
    };
    let (kind, proto) = match port.protocol {
        Protocol::Tcp => (libc::SOCK_STREAM, libc::IPPROTO_TCP),
        Protocol::Udp => (libc::SOCK_DGRAM, libc::IPPROTO_UDP),
        Protocol::Sctp => (libc::SOCK_STREAM, libc::IPPROTO_SCTP),
    };
    let fd = new_socket(libc::AF_INET6, kind, proto).map_err(|err| {
        let unsupported = err.raw_os_error() == Some(libc::EPROTONOSUPPORT);
        if port.protocol == Protocol::Sctp && unsupported {
            PodServerError::SctpUnsupported
        } else {
            fail(err)
        }
    })?;
    let io = |errno: nix::errno::Errno| fail(errno.into());
    setsockopt(&fd, sockopt::Ipv6V6Only, &false).map_err(io)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io)?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port.port, 0, 0));
    bind(fd.as_raw_fd(), &addr).map_err(io)?;
    if kind == libc::SOCK_STREAM {
        let backlog = Backlog::new(1024).map_err(io)?;
        listen(&fd, backlog).map_err(io)?;
    }
    Ok(fd)
}

async fn serve(
    sockets: Vec<(ServerPort, OwnedFd)>,
    pod_name: String,
    stats: Arc<ServerStats>,
    stopped: oneshot::Receiver<()>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for (port, fd) in sockets {
        let pod_name = pod_name.clone();
        let stats = Arc::clone(&stats);
        match port.protocol {
            Protocol::Tcp | Protocol::Sctp => {
                let listener = std::net::TcpListener::from(fd);
                if listener.set_nonblocking(true).is_err() {
                    continue;
                }
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    continue;
                };
                tasks.spawn(serve_stream(listener, pod_name, stats));
            }
            Protocol::Udp => {
                let socket = std::net::UdpSocket::from(fd);
                if socket.set_nonblocking(true).is_err() {
                    continue;
                }
                let Ok(socket) = tokio::net::UdpSocket::from_std(socket) else {
                    continue;
                };
                tasks.spawn(serve_udp(socket, pod_name, stats));
            }
        }
    }
    let _ = stopped.await;
    tasks.shutdown().await;
}

async fn serve_stream(
    listener: tokio::net::TcpListener,
    pod_name: String,
    stats: Arc<ServerStats>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            // E.g. EMFILE: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        stats.tcp_accepted.fetch_add(1, Ordering::Relaxed);
        let reply = reply_text(&pod_name, canonical(peer));
        connections.spawn(async move {
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
}

async fn serve_udp(socket: tokio::net::UdpSocket, pod_name: String, stats: Arc<ServerStats>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((_, peer)) = socket.recv_from(&mut buf).await else {
            // ICMP errors from earlier replies surface here; they are not fatal.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            continue;
        };
        let source = canonical(peer);
        stats.udp_received.fetch_add(1, Ordering::Relaxed);
        *stats
            .udp_by_source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(source)
            .or_default() += 1;
        let _ = socket
            .send_to(reply_text(&pod_name, source).as_bytes(), peer)
            .await;
    }
}

/// IPv4 peers of a dual-stack socket show up as `::ffff:a.b.c.d`; report them as IPv4.
fn canonical(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}
