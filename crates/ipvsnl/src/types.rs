//! The typed view of IPVS objects: virtual services, real servers, timeouts, and the
//! operations a batch is made of.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// `IP_VS_SVC_F_*`: virtual service flags (`VirtualServer::flags`).
pub mod flags {
    /// Persistent service (`-p`): clients stick to one real server for `timeout` seconds.
    pub const PERSISTENT: u32 = 0x0001;
    /// Kernel-internal "in the hash table" bit: stripped from dumps, never sent.
    pub const HASHED: u32 = 0x0002;
    /// One-packet scheduling (`-o`, UDP).
    pub const ONEPACKET: u32 = 0x0004;
    pub const SCHED1: u32 = 0x0008;
    pub const SCHED2: u32 = 0x0010;
    pub const SCHED3: u32 = 0x0020;
    /// `sh` scheduler: fall back to another server when the hashed one is unavailable.
    pub const SH_FALLBACK: u32 = SCHED1;
    /// `sh` scheduler: hash the source port too.
    pub const SH_PORT: u32 = SCHED2;
    /// `mh` scheduler: fallback.
    pub const MH_FALLBACK: u32 = SCHED1;
    /// `mh` scheduler: hash the source port too.
    pub const MH_PORT: u32 = SCHED2;
}

/// Transport protocol of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// Any other IP protocol number (IPVS also knows AH and ESP); only met in dumps of
    /// services someone else created.
    Other(u16),
}

impl Protocol {
    /// The IP protocol number (`IPPROTO_*`).
    pub fn number(self) -> u16 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u16,
            Protocol::Udp => libc::IPPROTO_UDP as u16,
            Protocol::Sctp => libc::IPPROTO_SCTP as u16,
            Protocol::Other(n) => n,
        }
    }

    pub fn from_number(n: u16) -> Protocol {
        match n as i32 {
            libc::IPPROTO_TCP => Protocol::Tcp,
            libc::IPPROTO_UDP => Protocol::Udp,
            libc::IPPROTO_SCTP => Protocol::Sctp,
            _ => Protocol::Other(n),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("TCP"),
            Protocol::Udp => f.write_str("UDP"),
            Protocol::Sctp => f.write_str("SCTP"),
            Protocol::Other(n) => write!(f, "proto-{n}"),
        }
    }
}

/// Address family of a firewall-mark service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// What identifies an address-based virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl ServiceKey {
    pub fn new(protocol: Protocol, addr: IpAddr, port: u16) -> ServiceKey {
        ServiceKey {
            addr,
            protocol,
            port,
        }
    }
}

impl fmt::Display for ServiceKey {
    /// `TCP 10.96.0.1:80`, `UDP [fd00::a]:53` (ipvsadm's spelling).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.protocol,
            SocketAddr::new(self.addr, self.port)
        )
    }
}

/// The netmask a service of `addr`'s family gets by default: `0xffff_ffff` for IPv4,
/// prefix length 128 for IPv6 (what ipvsadm and kube-proxy use).
pub fn full_netmask(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(_) => u32::MAX,
        IpAddr::V6(_) => 128,
    }
}

/// An address-based virtual service and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VirtualServer {
    pub key: ServiceKey,
    /// Scheduler name: "rr", "wrr", "lc", "sh", ... (at most 15 bytes).
    pub scheduler: String,
    /// [`flags`] bits. [`flags::HASHED`] is never sent and is removed from dumps.
    pub flags: u32,
    /// Persistence timeout in seconds (used with [`flags::PERSISTENT`]).
    pub timeout: u32,
    /// Persistence granularity. IPv4: the mask as a number (`0xffff_ff00` = /24); IPv6:
    /// the prefix length (1..=128; the kernel refuses 0). See [`full_netmask`].
    pub netmask: u32,
}

impl VirtualServer {
    /// A service without flags or persistence, with the full netmask.
    pub fn new(key: ServiceKey, scheduler: &str) -> VirtualServer {
        VirtualServer {
            key,
            scheduler: scheduler.to_string(),
            flags: 0,
            timeout: 0,
            netmask: full_netmask(key.addr),
        }
    }
}

/// A firewall-mark service (never created by this client; met in dumps only).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FwmarkService {
    pub family: Family,
    pub fwmark: u32,
    pub scheduler: String,
    pub flags: u32,
    pub timeout: u32,
    pub netmask: u32,
}

/// One service of a dump.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Service {
    Virtual(VirtualServer),
    /// Matched by firewall mark: not kube-proxy's; leave it alone.
    Fwmark(FwmarkService),
}

impl Service {
    pub fn as_virtual(&self) -> Option<&VirtualServer> {
        match self {
            Service::Virtual(v) => Some(v),
            Service::Fwmark(_) => None,
        }
    }

    pub fn into_virtual(self) -> Option<VirtualServer> {
        match self {
            Service::Virtual(v) => Some(v),
            Service::Fwmark(_) => None,
        }
    }
}

/// How packets reach a real server (`IP_VS_CONN_F_*` forwarding methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardMethod {
    /// NAT (`-m`); what kube-proxy uses.
    Masq,
    /// Local node.
    Local,
    /// IP-in-IP tunnel (`-i`).
    Tunnel,
    /// Direct routing (`-g`).
    Route,
    /// Cache bypass.
    Bypass,
}

impl ForwardMethod {
    pub(crate) fn code(self) -> u32 {
        match self {
            ForwardMethod::Masq => 0,
            ForwardMethod::Local => 1,
            ForwardMethod::Tunnel => 2,
            ForwardMethod::Route => 3,
            ForwardMethod::Bypass => 4,
        }
    }

    /// From the `IP_VS_CONN_F_FWD_MASK` bits; `None` for values the header does not name.
    pub(crate) fn from_code(code: u32) -> Option<ForwardMethod> {
        Some(match code & 0x7 {
            0 => ForwardMethod::Masq,
            1 => ForwardMethod::Local,
            2 => ForwardMethod::Tunnel,
            3 => ForwardMethod::Route,
            4 => ForwardMethod::Bypass,
            _ => return None,
        })
    }
}

impl fmt::Display for ForwardMethod {
    /// ipvsadm's column spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardMethod::Masq => "Masq",
            ForwardMethod::Local => "Local",
            ForwardMethod::Tunnel => "Tunnel",
            ForwardMethod::Route => "Route",
            ForwardMethod::Bypass => "Bypass",
        })
    }
}

/// A real server (destination) of a virtual service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RealServer {
    pub addr: IpAddr,
    pub port: u16,
    /// 0 = no new connections (graceful termination); negative is refused (ERANGE).
    pub weight: i32,
    pub fwd: ForwardMethod,
    /// Connection counters: read from dumps, ignored when sent.
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub persist_conns: u32,
}

impl RealServer {
    /// A NAT (masquerading) real server with zero counters.
    pub fn new(addr: IpAddr, port: u16, weight: i32) -> RealServer {
        RealServer {
            addr,
            port,
            weight,
            fwd: ForwardMethod::Masq,
            active_conns: 0,
            inactive_conns: 0,
            persist_conns: 0,
        }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

/// Connection timeouts in seconds (`ipvsadm --set tcp tcpfin udp`). When set, 0 leaves
/// that timeout unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

/// IPVS version (`IP_VS_VERSION_CODE`, 1.2.1 on every kernel since 2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
    pub patch: u8,
}

impl Version {
    pub(crate) fn from_code(code: u32) -> Version {
        Version {
            major: (code >> 16) as u8,
            minor: (code >> 8) as u8,
            patch: code as u8,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What `IPVS_CMD_GET_INFO` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub version: Version,
    /// Size of the connection hash table (`ip_vs_conn_tab_bits`).
    pub conn_table_size: u32,
}

/// One change; [`crate::IpvsClient::apply`] sends many in one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// EEXIST if the service exists.
    AddService(&'a VirtualServer),
    /// Scheduler, flags, timeout and netmask of an existing service (ESRCH if none).
    UpdateService(&'a VirtualServer),
    /// Deletes the service and its real servers (ESRCH if none).
    DeleteService(&'a ServiceKey),
    /// EEXIST if the real server exists, ESRCH if the service does not.
    AddRealServer(&'a ServiceKey, &'a RealServer),
    /// Weight and forwarding method of an existing real server (ENOENT if none).
    UpdateRealServer(&'a ServiceKey, &'a RealServer),
    /// Only the address and port of the real server are used (ENOENT if none).
    DeleteRealServer(&'a ServiceKey, &'a RealServer),
}

impl fmt::Display for Op<'_> {
    /// What error messages name: `add real server 10.0.0.1:80 to TCP 10.96.0.1:80`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddService(v) => write!(f, "add service {} ({})", v.key, v.scheduler),
            Op::UpdateService(v) => write!(f, "update service {} ({})", v.key, v.scheduler),
            Op::DeleteService(k) => write!(f, "delete service {k}"),
            Op::AddRealServer(k, r) => write!(f, "add real server {} to {k}", r.socket_addr()),
            Op::UpdateRealServer(k, r) => {
                write!(f, "update real server {} of {k}", r.socket_addr())
            }
            Op::DeleteRealServer(k, r) => {
                write!(f, "delete real server {} from {k}", r.socket_addr())
            }
        }
    }
}
