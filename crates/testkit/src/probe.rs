//! Clients that run inside a namespace and count which pod answered.
//!
//! Each probe runs on a thread that entered the namespace (see
//! [`crate::netns::in_netns`]). Replies are the [`crate::podserver`] format
//! `"<pod_name> <peer_ip>\n"`.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::netns::{NetnsError, in_netns};

/// Why a single probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// RST, or ICMP port unreachable (what a REJECT rule sends).
    #[error("connection refused")]
    Refused,
    /// No answer within the timeout (dropped, or no route back).
    #[error("timed out")]
    Timeout,
    /// ICMP host/network unreachable, or no route.
    #[error("unreachable: {0}")]
    Unreachable(std::io::Error),
    #[error("reply is not \"<pod> <peer-ip>\": {0:?}")]
    BadReply(String),
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

impl ProbeError {
    fn from_io(err: std::io::Error) -> ProbeError {
        match err.kind() {
            ErrorKind::ConnectionRefused => ProbeError::Refused,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => ProbeError::Timeout,
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                ProbeError::Unreachable(err)
            }
            _ => ProbeError::Io(err),
        }
    }
}

/// One successful probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Name of the pod that answered.
    pub pod: String,
    /// The client address as the pod saw it (the masquerade address if SNATed).
    pub peer_seen: String,
    /// TCP: time for `connect()` to complete. UDP: request-to-reply round trip.
    pub latency: Duration,
}

fn parse_reply(text: &str, latency: Duration) -> Result<Answer, ProbeError> {
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(pod), Some(peer), None) => Ok(Answer {
            pod: pod.to_string(),
            peer_seen: peer.to_string(),
            latency,
        }),
        _ => Err(ProbeError::BadReply(text.to_string())),
    }
}

/// Outcome of many probes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeReport {
    /// Answers per pod name.
    pub answers: BTreeMap<String, usize>,
    /// Answers per client address as seen by the pod.
    pub sources_seen: BTreeMap<String, usize>,
    pub refused: usize,
    pub timeouts: usize,
    pub unreachable: usize,
    pub other_errors: usize,
    /// One per answer: TCP connect time, or UDP round trip.
    pub connect_latencies: Vec<Duration>,
}

impl ProbeReport {
    /// Number of answered probes.
    pub fn total_ok(&self) -> usize {
        self.answers.values().sum()
    }

    /// Number of failed probes.
    pub fn total_failed(&self) -> usize {
        self.refused + self.timeouts + self.unreachable + self.other_errors
    }

    /// Fraction (0..=1) of answered probes that `pod` answered; 0 when none answered.
    pub fn share(&self, pod: &str) -> f64 {
        let total = self.total_ok();
        if total == 0 {
            return 0.0;
        }
        self.answers.get(pod).copied().unwrap_or(0) as f64 / total as f64
    }

    /// Latency at quantile `q` (0..=1, nearest rank), `None` without answers.
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        let mut sorted = self.connect_latencies.clone();
        sorted.sort();
        let last = sorted.len().checked_sub(1)?;
        let rank = (q.clamp(0.0, 1.0) * last as f64).round() as usize;
        sorted.get(rank).copied()
    }

    fn record(&mut self, outcome: Result<Answer, ProbeError>) {
        match outcome {
            Ok(answer) => {
                *self.answers.entry(answer.pod).or_default() += 1;
                *self.sources_seen.entry(answer.peer_seen).or_default() += 1;
                self.connect_latencies.push(answer.latency);
            }
            Err(ProbeError::Refused) => self.refused += 1,
            Err(ProbeError::Timeout) => self.timeouts += 1,
            Err(ProbeError::Unreachable(_)) => self.unreachable += 1,
            Err(_) => self.other_errors += 1,
        }
    }
}

impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "answers {:?}, sources {:?}, refused {}, timeouts {}, unreachable {}, other {}",
            self.answers,
            self.sources_seen,
            self.refused,
            self.timeouts,
            self.unreachable,
            self.other_errors
        )?;
        if let Some(median) = self.latency_quantile(0.5) {
            write!(f, ", median latency {median:?}")?;
        }
        Ok(())
    }
}

/// One TCP connection from `ns` to `target`: connect, read the reply until the server
/// closes. `timeout` bounds the connect and, separately, the read.
pub fn tcp_connect_once(
    ns: &str,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    in_netns(ns, || tcp_attempt(None, target, timeout))?
}

/// `count` TCP connections (a new one each) from `ns` to `target`.
pub fn probe_tcp(
    ns: &str,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<ProbeReport, NetnsError> {
    probe_tcp_from(ns, None, target, count, timeout)
}

/// Like [`probe_tcp`], optionally from a fixed local source port (`SO_REUSEADDR`;
/// reusing a 4-tuple still in TIME_WAIT may fail, which counts as an error).
pub fn probe_tcp_from(
    ns: &str,
    source_port: Option<u16>,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<ProbeReport, NetnsError> {
    in_netns(ns, || {
        let mut report = ProbeReport::default();
        for _ in 0..count {
            report.record(tcp_attempt(source_port, target, timeout));
        }
        report
    })
}

fn tcp_attempt(
    source_port: Option<u16>,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    let started = Instant::now();
    let mut stream = match source_port {
        None => TcpStream::connect_timeout(&target, timeout).map_err(ProbeError::from_io)?,
        Some(port) => connect_from_port(port, target, timeout)?,
    };
    let latency = started.elapsed();
    stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(ProbeError::Io)?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(ProbeError::from_io)?;
    parse_reply(&reply, latency)
}

/// Connect from a fixed source port: std cannot bind before connecting, so build the
/// socket by hand and connect it non-blocking with a poll-style wait.
fn connect_from_port(
    port: u16,
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ProbeError> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt,
    };
    let family = match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let errno = |e: nix::errno::Errno| ProbeError::from_io(e.into());
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(errno)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(errno)?;
    let local = SockaddrStorage::from(SocketAddr::new(unspecified_like(target.ip()), port));
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &local).map_err(errno)?;
    let stream = TcpStream::from(fd);
    stream
        .set_write_timeout(Some(timeout))
        .map_err(ProbeError::Io)?;
    // SO_SNDTIMEO bounds a blocking connect(2) on Linux.
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&stream),
        &SockaddrStorage::from(target),
    )
    .map_err(|e| match e {
        nix::errno::Errno::EINPROGRESS => ProbeError::Timeout,
        other => errno(other),
    })?;
    Ok(stream)
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// One UDP request/reply from `ns` to `target` on a fresh socket.
pub fn udp_request_once(
    ns: &str,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    in_netns(ns, || {
        let socket = udp_socket(None, target)?;
        udp_attempt(&socket, 0, timeout)
    })?
}

/// `count` UDP datagrams from `ns` to `target`, each from a new socket (a new source
/// port, hence a new conntrack entry), waiting up to `timeout` for each reply.
pub fn probe_udp(
    ns: &str,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<ProbeReport, NetnsError> {
    probe_udp_from(ns, None, target, count, timeout)
}

/// Like [`probe_udp`]; with `Some(source_port)` all datagrams share one socket bound
/// to that port, so they share one 5-tuple and one conntrack entry.
pub fn probe_udp_from(
    ns: &str,
    source_port: Option<u16>,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<ProbeReport, NetnsError> {
    in_netns(ns, || {
        let mut report = ProbeReport::default();
        let shared = source_port.map(|port| udp_socket(Some(port), target));
        for attempt in 0..count {
            let outcome = match &shared {
                Some(Ok(socket)) => udp_attempt(socket, attempt, timeout),
                Some(Err(err)) => Err(ProbeError::Io(std::io::Error::other(err.to_string()))),
                None => udp_socket(None, target)
                    .and_then(|socket| udp_attempt(&socket, attempt, timeout)),
            };
            report.record(outcome);
        }
        report
    })
}

/// Sends `count` datagrams from `ns` to `target` without waiting for replies, for
/// one-way traffic (check arrival with `PodServer::udp_received`). Returns how many
/// were sent.
pub fn udp_send_only(
    ns: &str,
    source_port: Option<u16>,
    target: SocketAddr,
    count: usize,
) -> Result<usize, ProbeError> {
    in_netns(ns, || {
        let socket = udp_socket(source_port, target)?;
        let mut sent = 0;
        for attempt in 0..count {
            match socket.send(format!("oneway{attempt}").as_bytes()) {
                Ok(_) => sent += 1,
                // An ICMP error from an earlier datagram is reported on a later send.
                Err(err) if err.kind() == ErrorKind::ConnectionRefused => {}
                Err(err) => return Err(ProbeError::from_io(err)),
            }
        }
        Ok(sent)
    })?
}

/// A connected UDP socket (connected, so ICMP port unreachable surfaces as
/// `ECONNREFUSED`).
fn udp_socket(source_port: Option<u16>, target: SocketAddr) -> Result<UdpSocket, ProbeError> {
    let local = SocketAddr::new(unspecified_like(target.ip()), source_port.unwrap_or(0));
    let socket = UdpSocket::bind(local).map_err(ProbeError::from_io)?;
    socket.connect(target).map_err(ProbeError::from_io)?;
    Ok(socket)
}

fn udp_attempt(
    socket: &UdpSocket,
    attempt: usize,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    socket
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(ProbeError::Io)?;
    let started = Instant::now();
    socket
        .send(format!("ping{attempt}").as_bytes())
        .map_err(ProbeError::from_io)?;
    let mut buf = [0u8; 2048];
    let len = socket.recv(&mut buf).map_err(ProbeError::from_io)?;
    let latency = started.elapsed();
    parse_reply(&String::from_utf8_lossy(&buf[..len]), latency)
}

/// `count` TCP connections from `ns` to `target`, each bound to source address
/// `source_ip` (any port) before connecting: for a client namespace holding several
/// addresses, e.g. to test `loadBalancerSourceRanges`.
pub fn probe_tcp_from_addr(
    ns: &str,
    source_ip: IpAddr,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<ProbeReport, NetnsError> {
    in_netns(ns, || {
        let mut report = ProbeReport::default();
        for _ in 0..count {
            report.record(tcp_attempt_from_addr(source_ip, target, timeout));
        }
        report
    })
}

/// One TCP connection from `ns` to `target` with source address `source_ip`.
pub fn tcp_connect_once_from_addr(
    ns: &str,
    source_ip: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    in_netns(ns, || tcp_attempt_from_addr(source_ip, target, timeout))?
}

fn tcp_attempt_from_addr(
    source_ip: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    let started = Instant::now();
    let mut stream = connect_from_addr(SocketAddr::new(source_ip, 0), target, timeout)?;
    let latency = started.elapsed();
    stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(ProbeError::Io)?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(ProbeError::from_io)?;
    parse_reply(&reply, latency)
}

/// Like `connect_from_port`, but binds a given local address (port 0: any).
fn connect_from_addr(
    local: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ProbeError> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket,
    };
    let family = match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let errno = |e: nix::errno::Errno| ProbeError::from_io(e.into());
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(errno)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(local),
    )
    .map_err(errno)?;
    let stream = TcpStream::from(fd);
    stream
        .set_write_timeout(Some(timeout))
        .map_err(ProbeError::Io)?;
    // SO_SNDTIMEO bounds a blocking connect(2) on Linux.
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&stream),
        &SockaddrStorage::from(target),
    )
    .map_err(|e| match e {
        nix::errno::Errno::EINPROGRESS => ProbeError::Timeout,
        other => errno(other),
    })?;
    Ok(stream)
}
