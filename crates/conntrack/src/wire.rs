//! ctnetlink message encoding and decoding: just the requests and attributes the
//! cleanup needs (dump UDP entries, delete by original tuple). Pure byte handling, so
//! it is unit-tested without a kernel.
//!
//! Layout: `nlmsghdr` (host order) + `nfgenmsg` + attributes. ctnetlink attribute
//! values (ports, status, id, zone) are big-endian; `CTA_FILTER` flags are host order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kp_model::IpFamily;
use kp_netlink::Attrs;

use crate::plan::FlowEntry;

pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFNETLINK_V0: u8 = 0;

/// Message type of a ctnetlink request/answer.
pub(crate) const fn ct_msg_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | msg
}
/// Type of the entries a dump (or event) carries.
pub(crate) const CT_NEW: u16 = ct_msg_type(IPCTNL_MSG_CT_NEW);

const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;

const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;

const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;

const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const CTA_FILTER_ORIG_FLAGS: u16 = 1;
/// `CTA_FILTER_F_CTA_PROTO_NUM` from the kernel's nf_internals.h (part of the ABI).
const CTA_FILTER_F_PROTO_NUM: u32 = 1 << 3;

/// Errors decoding what the kernel sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated netlink message ({0})")]
    Truncated(&'static str),
    #[error("conntrack entry without {0}")]
    Missing(&'static str),
    #[error("conntrack entry of unknown family {0}")]
    Family(u8),
    #[error("attribute {what} has length {len}")]
    BadLength { what: &'static str, len: usize },
}

/// `AF_INET`/`AF_INET6` for the `nfgenmsg` family byte.
pub(crate) fn af(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => libc::AF_INET as u8,
        IpFamily::V6 => libc::AF_INET6 as u8,
    }
}

/// Builds netlink messages into one buffer (several messages may be concatenated:
/// the kernel processes them in order, one ack each).
#[derive(Debug, Default)]
pub(crate) struct MessageBuf {
    attrs: Attrs,
    msg_start: usize,
}

impl MessageBuf {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.attrs.buf
    }

    pub(crate) fn clear(&mut self) {
        self.attrs.clear();
        self.msg_start = 0;
    }

    /// Starts a message: header (length patched by [`MessageBuf::end_message`]) and
    /// `nfgenmsg`.
    fn begin_message(&mut self, msg_type: u16, flags: u16, seq: u32, family: u8) {
        let buf = &mut self.attrs.buf;
        self.msg_start = buf.len();
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]);
    }

    fn end_message(&mut self) {
        let buf = &mut self.attrs.buf;
        let len = (buf.len() - self.msg_start) as u32;
        buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        self.attrs.attr(kind, value);
    }

    fn begin_nest(&mut self, kind: u16) {
        self.attrs.begin(kind);
    }

    fn end_nest(&mut self) {
        self.attrs.end();
    }

    fn ip_attr(&mut self, kind_v4: u16, kind_v6: u16, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.attr(kind_v4, &v4.octets()),
            IpAddr::V6(v6) => self.attr(kind_v6, &v6.octets()),
        }
    }

    /// A dump request for all entries of `family`; with `filter_udp` the kernel itself
    /// skips non-UDP entries (`CTA_FILTER`, Linux 5.8+).
    pub(crate) fn dump_request(&mut self, seq: u32, family: IpFamily, filter_udp: bool) {
        self.begin_message(
            ct_msg_type(IPCTNL_MSG_CT_GET),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            af(family),
        );
        if filter_udp {
            self.begin_nest(CTA_TUPLE_ORIG);
            self.begin_nest(CTA_TUPLE_PROTO);
            self.attr(CTA_PROTO_NUM, &[crate::plan::IPPROTO_UDP]);
            self.end_nest();
            self.end_nest();
            self.begin_nest(CTA_FILTER);
            self.attr(CTA_FILTER_ORIG_FLAGS, &CTA_FILTER_F_PROTO_NUM.to_ne_bytes());
            self.end_nest();
        }
        self.end_message();
    }

    /// Appends a delete of `entry`, named by its original tuple (plus zone and id).
    pub(crate) fn delete_request(&mut self, seq: u32, entry: &FlowEntry) {
        self.begin_message(
            ct_msg_type(IPCTNL_MSG_CT_DELETE),
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            af(entry.family),
        );
        self.begin_nest(CTA_TUPLE_ORIG);
        self.begin_nest(CTA_TUPLE_IP);
        self.ip_attr(CTA_IP_V4_SRC, CTA_IP_V6_SRC, entry.orig_src);
        self.ip_attr(CTA_IP_V4_DST, CTA_IP_V6_DST, entry.orig_dst);
        self.end_nest();
        self.begin_nest(CTA_TUPLE_PROTO);
        self.attr(CTA_PROTO_NUM, &[entry.protocol]);
        self.attr(CTA_PROTO_SRC_PORT, &entry.orig_sport.to_be_bytes());
        self.attr(CTA_PROTO_DST_PORT, &entry.orig_dport.to_be_bytes());
        self.end_nest();
        self.end_nest();
        if entry.zone != 0 {
            self.attr(CTA_ZONE, &entry.zone.to_be_bytes());
        }
        if let Some(id) = entry.id {
            self.attr(CTA_ID, &id.to_be_bytes());
        }
        self.end_message();
    }
}

/// One netlink message cut out of a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawMessage<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    /// Everything after the 16-byte header.
    pub payload: &'a [u8],
}

impl RawMessage<'_> {
    /// For `NLMSG_ERROR`: the (negative errno or 0 = ack) code.
    pub(crate) fn error_code(&self) -> Result<i32, DecodeError> {
        let bytes = self
            .payload
            .get(..4)
            .ok_or(DecodeError::Truncated("nlmsgerr"))?;
        Ok(i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// For `NLMSG_ERROR`: the sequence number of the request it answers, from the
    /// echoed request header (the outer header's seq is the same, but be exact).
    pub(crate) fn acked_seq(&self) -> u32 {
        self.payload
            .get(4 + 8..4 + 12)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(self.seq)
    }
}

/// Splits a buffer received from a netlink socket into messages.
pub(crate) fn split_messages(mut buf: &[u8]) -> Result<Vec<RawMessage<'_>>, DecodeError> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(DecodeError::Truncated("nlmsghdr"));
        }
        out.push(RawMessage {
            msg_type: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        let aligned = (len + 3) & !3;
        buf = buf.get(aligned..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Iterates the attributes of a block: `(type without flags, value)`.
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), DecodeError>> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            buf = &[];
            return Some(Err(DecodeError::Truncated("nlattr")));
        }
        let value = &buf[4..len];
        let aligned = (len + 3) & !3;
        buf = buf.get(aligned..).unwrap_or(&[]);
        Some(Ok((kind, value)))
    })
}

fn be16(what: &'static str, value: &[u8]) -> Result<u16, DecodeError> {
    match value {
        [a, b] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(DecodeError::BadLength {
            what,
            len: value.len(),
        }),
    }
}

fn be32(what: &'static str, value: &[u8]) -> Result<u32, DecodeError> {
    match value {
        [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(DecodeError::BadLength {
            what,
            len: value.len(),
        }),
    }
}

fn ip(what: &'static str, value: &[u8]) -> Result<IpAddr, DecodeError> {
    if let Ok(v4) = <[u8; 4]>::try_from(value) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(value) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(DecodeError::BadLength {
        what,
        len: value.len(),
    })
}

/// One direction of an entry.
#[derive(Debug, Default)]
struct Tuple {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    protocol: Option<u8>,
    sport: u16,
    dport: u16,
}

fn parse_tuple(block: &[u8]) -> Result<Tuple, DecodeError> {
    let mut tuple = Tuple::default();
    for attr in attributes(block) {
        let (kind, value) = attr?;
        match kind {
            CTA_TUPLE_IP => {
                for attr in attributes(value) {
                    let (kind, value) = attr?;
                    match kind {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => tuple.src = Some(ip("ip src", value)?),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => tuple.dst = Some(ip("ip dst", value)?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for attr in attributes(value) {
                    let (kind, value) = attr?;
                    match kind {
                        CTA_PROTO_NUM => {
                            tuple.protocol = Some(*value.first().ok_or(DecodeError::BadLength {
                                what: "proto num",
                                len: 0,
                            })?)
                        }
                        CTA_PROTO_SRC_PORT => tuple.sport = be16("src port", value)?,
                        CTA_PROTO_DST_PORT => tuple.dport = be16("dst port", value)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(tuple)
}

/// Decodes the payload of a `IPCTNL_MSG_CT_NEW` message (a dumped entry).
pub(crate) fn parse_entry(payload: &[u8]) -> Result<FlowEntry, DecodeError> {
    let family = match payload.first().copied() {
        Some(f) if f == libc::AF_INET as u8 => IpFamily::V4,
        Some(f) if f == libc::AF_INET6 as u8 => IpFamily::V6,
        Some(f) => return Err(DecodeError::Family(f)),
        None => return Err(DecodeError::Truncated("nfgenmsg")),
    };
    let attrs = payload.get(4..).ok_or(DecodeError::Truncated("nfgenmsg"))?;
    let (mut orig, mut reply) = (None, None);
    let (mut status, mut id, mut zone) = (0, None, 0);
    for attr in attributes(attrs) {
        let (kind, value) = attr?;
        match kind {
            CTA_TUPLE_ORIG => orig = Some(parse_tuple(value)?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(value)?),
            CTA_STATUS => status = be32("status", value)?,
            CTA_ID => id = Some(be32("id", value)?),
            CTA_ZONE => zone = be16("zone", value)?,
            _ => {}
        }
    }
    let orig = orig.ok_or(DecodeError::Missing("CTA_TUPLE_ORIG"))?;
    let reply = reply.ok_or(DecodeError::Missing("CTA_TUPLE_REPLY"))?;
    let missing = |what| DecodeError::Missing(what);
    Ok(FlowEntry {
        family,
        protocol: orig.protocol.ok_or(missing("CTA_PROTO_NUM"))?,
        orig_src: orig.src.ok_or(missing("original source"))?,
        orig_dst: orig.dst.ok_or(missing("original destination"))?,
        orig_sport: orig.sport,
        orig_dport: orig.dport,
        reply_src: reply.src.ok_or(missing("reply source"))?,
        reply_dst: reply.dst.ok_or(missing("reply destination"))?,
        reply_sport: reply.sport,
        reply_dport: reply.dport,
        zone,
        id,
        status,
    })
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
