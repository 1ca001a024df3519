//! IPVS generic netlink messages, from include/uapi/linux/ip_vs.h: encoding requests
//! and decoding the kernel's answers. Pure byte handling, unit-tested without a kernel.
//!
//! Every message is `nlmsghdr` (type = the family id the controller gave "IPVS") +
//! `genlmsghdr { cmd, version 1 }` + attributes. Numbers are host order except the
//! ports (network order) and the IPv4 netmask (its bytes are the mask in network order).
//! Addresses are 16 bytes (`union nf_inet_addr`), IPv4 in the first 4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kp_netlink::{Attrs, Malformed, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, attrs};

use crate::types::{
    Family, ForwardMethod, FwmarkService, Info, Op, Protocol, RealServer, Service, ServiceKey,
    Timeouts, Version, VirtualServer, flags,
};

pub(crate) const IPVS_GENL_NAME: &str = "IPVS";
pub(crate) const IPVS_GENL_VERSION: u8 = 1;

// enum IPVS_CMD_*
pub(crate) const CMD_NEW_SERVICE: u8 = 1;
pub(crate) const CMD_SET_SERVICE: u8 = 2;
pub(crate) const CMD_DEL_SERVICE: u8 = 3;
pub(crate) const CMD_GET_SERVICE: u8 = 4;
pub(crate) const CMD_NEW_DEST: u8 = 5;
pub(crate) const CMD_SET_DEST: u8 = 6;
pub(crate) const CMD_DEL_DEST: u8 = 7;
pub(crate) const CMD_GET_DEST: u8 = 8;
pub(crate) const CMD_SET_CONFIG: u8 = 12;
pub(crate) const CMD_GET_CONFIG: u8 = 13;
pub(crate) const CMD_SET_INFO: u8 = 14;
pub(crate) const CMD_GET_INFO: u8 = 15;
pub(crate) const CMD_FLUSH: u8 = 17;

// enum IPVS_CMD_ATTR_*
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const CMD_ATTR_TIMEOUT_UDP: u16 = 6;

// enum IPVS_SVC_ATTR_*
const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;

// enum IPVS_DEST_ATTR_*
const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_PERSIST_CONNS: u16 = 9;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;

// enum IPVS_INFO_ATTR_*
const INFO_ATTR_VERSION: u16 = 1;
const INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

fn af_of(addr: IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

/// `union nf_inet_addr`: 16 bytes, IPv4 in the first 4.
fn addr16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The netmask's wire bytes: the kernel keeps them as-is (`__be32`) and reads IPv4 ones
/// as a network-order mask, IPv6 ones as a host-order prefix length.
fn netmask_bytes(ipv6: bool, netmask: u32) -> [u8; 4] {
    if ipv6 {
        netmask.to_ne_bytes()
    } else {
        netmask.to_be_bytes()
    }
}

fn netmask_value(ipv6: bool, b: [u8; 4]) -> u32 {
    if ipv6 {
        u32::from_ne_bytes(b)
    } else {
        u32::from_be_bytes(b)
    }
}

/// The identifying attributes of a service (all a DEL or GET needs).
fn service_key_attrs(out: &mut Attrs, key: &ServiceKey) {
    out.u16_ne(SVC_ATTR_AF, af_of(key.addr));
    out.u16_ne(SVC_ATTR_PROTOCOL, key.protocol.number());
    out.attr(SVC_ATTR_ADDR, &addr16(key.addr));
    out.attr(SVC_ATTR_PORT, &key.port.to_be_bytes());
}

fn service_nest(out: &mut Attrs, key: &ServiceKey) {
    out.begin(CMD_ATTR_SERVICE);
    service_key_attrs(out, key);
    out.end();
}

/// A full service (NEW/SET need scheduler, flags, timeout and netmask).
fn full_service_nest(out: &mut Attrs, vs: &VirtualServer) {
    out.begin(CMD_ATTR_SERVICE);
    service_key_attrs(out, &vs.key);
    out.str(SVC_ATTR_SCHED_NAME, &vs.scheduler);
    // struct ip_vs_flags { flags, mask }: the mask says which bits to set; HASHED is the
    // kernel's own (a service created with it set is never hashed, i.e. unreachable).
    let mut f = [0u8; 8];
    f[..4].copy_from_slice(&(vs.flags & !flags::HASHED).to_ne_bytes());
    f[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
    out.attr(SVC_ATTR_FLAGS, &f);
    out.u32_ne(SVC_ATTR_TIMEOUT, vs.timeout);
    out.attr(
        SVC_ATTR_NETMASK,
        &netmask_bytes(vs.key.addr.is_ipv6(), vs.netmask),
    );
    out.end();
}

fn dest_nest(out: &mut Attrs, rs: &RealServer, full: bool) {
    out.begin(CMD_ATTR_DEST);
    out.attr(DEST_ATTR_ADDR, &addr16(rs.addr));
    out.attr(DEST_ATTR_PORT, &rs.port.to_be_bytes());
    out.u16_ne(DEST_ATTR_ADDR_FAMILY, af_of(rs.addr));
    if full {
        out.u32_ne(DEST_ATTR_FWD_METHOD, rs.fwd.code());
        out.u32_ne(DEST_ATTR_WEIGHT, rs.weight as u32);
        out.u32_ne(DEST_ATTR_U_THRESH, 0);
        out.u32_ne(DEST_ATTR_L_THRESH, 0);
    }
    out.end();
}

/// Appends the message of one change, asking for an ack.
pub(crate) fn encode_op(out: &mut Attrs, family: u16, seq: u32, op: &Op<'_>) {
    let cmd = match op {
        Op::AddService(_) => CMD_NEW_SERVICE,
        Op::UpdateService(_) => CMD_SET_SERVICE,
        Op::DeleteService(_) => CMD_DEL_SERVICE,
        Op::AddRealServer(..) => CMD_NEW_DEST,
        Op::UpdateRealServer(..) => CMD_SET_DEST,
        Op::DeleteRealServer(..) => CMD_DEL_DEST,
    };
    let start = out.begin_genl(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd,
        IPVS_GENL_VERSION,
    );
    match op {
        Op::AddService(vs) | Op::UpdateService(vs) => full_service_nest(out, vs),
        Op::DeleteService(key) => service_nest(out, key),
        Op::AddRealServer(key, rs) | Op::UpdateRealServer(key, rs) => {
            service_nest(out, key);
            dest_nest(out, rs, true);
        }
        Op::DeleteRealServer(key, rs) => {
            service_nest(out, key);
            dest_nest(out, rs, false);
        }
    }
    out.end_message(start);
}

/// A dump request for all services.
pub(crate) fn encode_dump_services(out: &mut Attrs, family: u16, seq: u32) {
    let start = out.begin_genl(
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        CMD_GET_SERVICE,
        IPVS_GENL_VERSION,
    );
    out.end_message(start);
}

/// A dump request for the real servers of one service.
pub(crate) fn encode_dump_dests(out: &mut Attrs, family: u16, seq: u32, key: &ServiceKey) {
    let start = out.begin_genl(
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        CMD_GET_DEST,
        IPVS_GENL_VERSION,
    );
    service_nest(out, key);
    out.end_message(start);
}

/// A request without attributes (GET_INFO, GET_CONFIG, FLUSH), ack asked for.
pub(crate) fn encode_simple(out: &mut Attrs, family: u16, seq: u32, cmd: u8) {
    let start = out.begin_genl(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd,
        IPVS_GENL_VERSION,
    );
    out.end_message(start);
}

/// SET_CONFIG with the non-zero timeouts (the kernel leaves zero ones unchanged anyway).
pub(crate) fn encode_set_timeouts(out: &mut Attrs, family: u16, seq: u32, t: &Timeouts) {
    let start = out.begin_genl(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CMD_SET_CONFIG,
        IPVS_GENL_VERSION,
    );
    for (ty, v) in [
        (CMD_ATTR_TIMEOUT_TCP, t.tcp),
        (CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin),
        (CMD_ATTR_TIMEOUT_UDP, t.udp),
    ] {
        if v != 0 {
            out.u32_ne(ty, v);
        }
    }
    out.end_message(start);
}

fn u16_ne(v: &[u8], what: &'static str) -> Result<u16, Malformed> {
    match v {
        [a, b, ..] => Ok(u16::from_ne_bytes([*a, *b])),
        _ => Err(Malformed(what)),
    }
}

fn u16_be(v: &[u8], what: &'static str) -> Result<u16, Malformed> {
    match v {
        [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(Malformed(what)),
    }
}

fn bytes4(v: &[u8], what: &'static str) -> Result<[u8; 4], Malformed> {
    match v {
        [a, b, c, d, ..] => Ok([*a, *b, *c, *d]),
        _ => Err(Malformed(what)),
    }
}

fn u32_ne(v: &[u8], what: &'static str) -> Result<u32, Malformed> {
    bytes4(v, what).map(u32::from_ne_bytes)
}

fn string(v: &[u8]) -> String {
    let text = v.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

fn family_of(af: u16) -> Result<Family, Malformed> {
    match af {
        AF_INET => Ok(Family::V4),
        AF_INET6 => Ok(Family::V6),
        _ => Err(Malformed("address family neither AF_INET nor AF_INET6")),
    }
}

fn ip(family: Family, v: &[u8], what: &'static str) -> Result<IpAddr, Malformed> {
    match family {
        Family::V4 => Ok(IpAddr::V4(Ipv4Addr::from(bytes4(v, what)?))),
        Family::V6 => {
            let b: [u8; 16] = v
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or(Malformed(what))?;
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
    }
}

/// The nested attribute `ty` among a message's top-level attributes.
fn nest<'a>(msg_attrs: &'a [u8], ty: u16, what: &'static str) -> Result<&'a [u8], Malformed> {
    for attr in attrs(msg_attrs) {
        let (t, v) = attr?;
        if t == ty {
            return Ok(v);
        }
    }
    Err(Malformed(what))
}

/// Decodes one service of a GET_SERVICE answer (the message's genl attributes).
pub(crate) fn parse_service(msg_attrs: &[u8]) -> Result<Service, Malformed> {
    let svc = nest(
        msg_attrs,
        CMD_ATTR_SERVICE,
        "service message without IPVS_CMD_ATTR_SERVICE",
    )?;
    let mut af = None;
    let mut protocol = None;
    let mut addr = None;
    let mut port = None;
    let mut fwmark = None;
    let mut scheduler = String::new();
    let mut svc_flags = 0;
    let mut timeout = 0;
    let mut netmask = None;
    for attr in attrs(svc) {
        let (ty, v) = attr?;
        match ty {
            SVC_ATTR_AF => af = Some(u16_ne(v, "IPVS_SVC_ATTR_AF")?),
            SVC_ATTR_PROTOCOL => protocol = Some(u16_ne(v, "IPVS_SVC_ATTR_PROTOCOL")?),
            SVC_ATTR_ADDR => addr = Some(v),
            SVC_ATTR_PORT => port = Some(u16_be(v, "IPVS_SVC_ATTR_PORT")?),
            SVC_ATTR_FWMARK => fwmark = Some(u32_ne(v, "IPVS_SVC_ATTR_FWMARK")?),
            SVC_ATTR_SCHED_NAME => scheduler = string(v),
            SVC_ATTR_FLAGS => svc_flags = u32_ne(v, "IPVS_SVC_ATTR_FLAGS")? & !flags::HASHED,
            SVC_ATTR_TIMEOUT => timeout = u32_ne(v, "IPVS_SVC_ATTR_TIMEOUT")?,
            SVC_ATTR_NETMASK => netmask = Some(bytes4(v, "IPVS_SVC_ATTR_NETMASK")?),
            _ => {}
        }
    }
    let family = family_of(af.ok_or(Malformed("service without IPVS_SVC_ATTR_AF"))?)?;
    let v6 = family == Family::V6;
    let netmask = netmask.map_or(0, |b| netmask_value(v6, b));
    if let Some(fwmark) = fwmark.filter(|m| *m != 0) {
        return Ok(Service::Fwmark(FwmarkService {
            family,
            fwmark,
            scheduler,
            flags: svc_flags,
            timeout,
            netmask,
        }));
    }
    let addr = ip(
        family,
        addr.ok_or(Malformed("service without IPVS_SVC_ATTR_ADDR"))?,
        "IPVS_SVC_ATTR_ADDR too short",
    )?;
    Ok(Service::Virtual(VirtualServer {
        key: ServiceKey {
            addr,
            protocol: Protocol::from_number(
                protocol.ok_or(Malformed("service without IPVS_SVC_ATTR_PROTOCOL"))?,
            ),
            port: port.ok_or(Malformed("service without IPVS_SVC_ATTR_PORT"))?,
        },
        scheduler,
        flags: svc_flags,
        timeout,
        netmask,
    }))
}

/// Decodes one real server of a GET_DEST answer; `service_family` is the family of its
/// address when the kernel does not say (before IPVS_DEST_ATTR_ADDR_FAMILY existed).
pub(crate) fn parse_dest(
    msg_attrs: &[u8],
    service_family: Family,
) -> Result<RealServer, Malformed> {
    let dest = nest(
        msg_attrs,
        CMD_ATTR_DEST,
        "dest message without IPVS_CMD_ATTR_DEST",
    )?;
    let mut addr = None;
    let mut port = None;
    let mut fwd = ForwardMethod::Masq;
    let mut weight = 0;
    let mut counters = [0u32; 3];
    let mut family = service_family;
    for attr in attrs(dest) {
        let (ty, v) = attr?;
        match ty {
            DEST_ATTR_ADDR => addr = Some(v),
            DEST_ATTR_PORT => port = Some(u16_be(v, "IPVS_DEST_ATTR_PORT")?),
            DEST_ATTR_FWD_METHOD => {
                fwd = ForwardMethod::from_code(u32_ne(v, "IPVS_DEST_ATTR_FWD_METHOD")?)
                    .ok_or(Malformed("unknown forwarding method"))?;
            }
            DEST_ATTR_WEIGHT => weight = u32_ne(v, "IPVS_DEST_ATTR_WEIGHT")? as i32,
            DEST_ATTR_ACTIVE_CONNS => counters[0] = u32_ne(v, "IPVS_DEST_ATTR_ACTIVE_CONNS")?,
            DEST_ATTR_INACT_CONNS => counters[1] = u32_ne(v, "IPVS_DEST_ATTR_INACT_CONNS")?,
            DEST_ATTR_PERSIST_CONNS => counters[2] = u32_ne(v, "IPVS_DEST_ATTR_PERSIST_CONNS")?,
            DEST_ATTR_ADDR_FAMILY => family = family_of(u16_ne(v, "IPVS_DEST_ATTR_ADDR_FAMILY")?)?,
            _ => {}
        }
    }
    Ok(RealServer {
        addr: ip(
            family,
            addr.ok_or(Malformed("dest without IPVS_DEST_ATTR_ADDR"))?,
            "IPVS_DEST_ATTR_ADDR too short",
        )?,
        port: port.ok_or(Malformed("dest without IPVS_DEST_ATTR_PORT"))?,
        weight,
        fwd,
        active_conns: counters[0],
        inactive_conns: counters[1],
        persist_conns: counters[2],
    })
}

/// Decodes the GET_INFO answer's attributes.
pub(crate) fn parse_info(msg_attrs: &[u8]) -> Result<Info, Malformed> {
    let mut version = None;
    let mut conn_table_size = 0;
    for attr in attrs(msg_attrs) {
        let (ty, v) = attr?;
        match ty {
            INFO_ATTR_VERSION => version = Some(u32_ne(v, "IPVS_INFO_ATTR_VERSION")?),
            INFO_ATTR_CONN_TAB_SIZE => conn_table_size = u32_ne(v, "IPVS_INFO_ATTR_CONN_TAB_SIZE")?,
            _ => {}
        }
    }
    Ok(Info {
        version: Version::from_code(
            version.ok_or(Malformed("info without IPVS_INFO_ATTR_VERSION"))?,
        ),
        conn_table_size,
    })
}

/// Decodes the GET_CONFIG answer's attributes.
pub(crate) fn parse_timeouts(msg_attrs: &[u8]) -> Result<Timeouts, Malformed> {
    let mut t = Timeouts::default();
    for attr in attrs(msg_attrs) {
        let (ty, v) = attr?;
        match ty {
            CMD_ATTR_TIMEOUT_TCP => t.tcp = u32_ne(v, "IPVS_CMD_ATTR_TIMEOUT_TCP")?,
            CMD_ATTR_TIMEOUT_TCP_FIN => t.tcp_fin = u32_ne(v, "IPVS_CMD_ATTR_TIMEOUT_TCP_FIN")?,
            CMD_ATTR_TIMEOUT_UDP => t.udp = u32_ne(v, "IPVS_CMD_ATTR_TIMEOUT_UDP")?,
            _ => {}
        }
    }
    Ok(t)
}
