//! Generic netlink (`NETLINK_GENERIC`): the `genlmsghdr` after the netlink header, and
//! resolving a family's id by name through the controller (`CTRL_CMD_GETFAMILY`).
//!
//! Layout (linux/genetlink.h): `nlmsghdr` (type = family id) + `genlmsghdr { u8 cmd;
//! u8 version; u16 reserved }` + attributes in host byte order.

use std::io;
use std::time::{Duration, Instant};

use crate::msg::{Malformed, NLM_F_ACK, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, attrs, messages};
use crate::{Attrs, NetlinkSocket};

/// `GENL_ID_CTRL`: the controller family's fixed id.
pub const GENL_ID_CTRL: u16 = 0x10;
/// `sizeof(struct genlmsghdr)`.
pub const GENL_HDRLEN: usize = 4;

const CTRL_CMD_NEWFAMILY: u8 = 1;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_VERSION: u8 = 2;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_VERSION: u16 = 3;
const CTRL_ATTR_HDRSIZE: u16 = 4;
const CTRL_ATTR_MAXATTR: u16 = 5;

impl Attrs {
    /// Starts a generic netlink message of `family` (its id) with command `cmd`; end it
    /// with [`Attrs::end_message`].
    pub fn begin_genl(&mut self, family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> usize {
        let start = self.begin_message(family, flags, seq);
        self.buf.extend_from_slice(&[cmd, version, 0, 0]);
        start
    }
}

/// The payload of a generic netlink message: command, version and attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenlPayload<'a> {
    pub cmd: u8,
    pub version: u8,
    /// The attributes (walk them with [`crate::attrs`]).
    pub attrs: &'a [u8],
}

/// Splits a generic netlink message's payload into its header and attributes.
pub fn genl_payload(payload: &[u8]) -> Result<GenlPayload<'_>, Malformed> {
    if payload.len() < GENL_HDRLEN {
        return Err(Malformed("generic netlink message shorter than genlmsghdr"));
    }
    Ok(GenlPayload {
        cmd: payload[0],
        version: payload[1],
        attrs: &payload[GENL_HDRLEN..],
    })
}

/// A generic netlink family as the controller describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenlFamily {
    pub id: u16,
    pub name: String,
    pub version: u32,
    pub hdrsize: u32,
    pub max_attr: u32,
}

/// Appends a `CTRL_CMD_GETFAMILY` request for `name` (with an ack asked for).
pub fn get_family_request(out: &mut Attrs, seq: u32, name: &str) {
    let start = out.begin_genl(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        CTRL_VERSION,
    );
    out.str(CTRL_ATTR_FAMILY_NAME, name);
    out.end_message(start);
}

fn ne_u32(v: &[u8]) -> Result<u32, Malformed> {
    v.get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(Malformed("u32 attribute shorter than 4 bytes"))
}

/// Decodes the controller's `CTRL_CMD_NEWFAMILY` answer (the payload after `nlmsghdr`).
pub fn parse_family(payload: &[u8]) -> Result<GenlFamily, Malformed> {
    let p = genl_payload(payload)?;
    if p.cmd != CTRL_CMD_NEWFAMILY {
        return Err(Malformed("controller answer is not CTRL_CMD_NEWFAMILY"));
    }
    let mut id = None;
    let mut family = GenlFamily {
        id: 0,
        name: String::new(),
        version: 0,
        hdrsize: 0,
        max_attr: 0,
    };
    for attr in attrs(p.attrs) {
        let (ty, v) = attr?;
        match ty {
            CTRL_ATTR_FAMILY_ID => {
                let b = v
                    .get(..2)
                    .ok_or(Malformed("CTRL_ATTR_FAMILY_ID too short"))?;
                id = Some(u16::from_ne_bytes([b[0], b[1]]));
            }
            CTRL_ATTR_FAMILY_NAME => {
                let text = v.split(|b| *b == 0).next().unwrap_or_default();
                family.name = String::from_utf8_lossy(text).into_owned();
            }
            CTRL_ATTR_VERSION => family.version = ne_u32(v)?,
            CTRL_ATTR_HDRSIZE => family.hdrsize = ne_u32(v)?,
            CTRL_ATTR_MAXATTR => family.max_attr = ne_u32(v)?,
            _ => {}
        }
    }
    family.id = id.ok_or(Malformed("controller answer without CTRL_ATTR_FAMILY_ID"))?;
    Ok(family)
}

/// Asks the controller for family `name` on a `NETLINK_GENERIC` socket. `Ok(None)`: the
/// kernel has no such family (ENOENT: not built in and its module not loaded).
pub fn resolve_family(
    sock: &mut NetlinkSocket,
    seq: u32,
    name: &str,
) -> io::Result<Option<GenlFamily>> {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let mut req = Attrs::new();
    get_family_request(&mut req, seq, name);
    let mut buf = vec![0u8; 16 << 10];
    sock.drain(&mut buf);
    sock.send(&req.buf)?;
    let deadline = Instant::now() + TIMEOUT;
    let mut found = None;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let Some(n) = sock.recv(&mut buf, wait)? else {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from the generic netlink controller about {name:?}"),
            ));
        };
        for msg in messages(&buf[..n]) {
            let msg = msg.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if msg.seq != seq {
                continue;
            }
            match msg.msg_type {
                GENL_ID_CTRL => {
                    found = Some(
                        parse_family(msg.payload)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
                    );
                }
                NLMSG_ERROR => {
                    let ack = msg
                        .ack()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    return match ack.errno {
                        0 => Ok(found),
                        libc::ENOENT => Ok(None),
                        errno => {
                            let e = io::Error::from_raw_os_error(errno);
                            Err(io::Error::new(
                                e.kind(),
                                format!("resolve generic netlink family {name:?}: {e}"),
                            ))
                        }
                    };
                }
                NLMSG_DONE => return Ok(found),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getfamily_request_layout() {
        let mut a = Attrs::new();
        get_family_request(&mut a, 0x01020304, "IPVS");
        let mut want = Vec::new();
        // nlmsghdr: len 32, type GENL_ID_CTRL, flags REQUEST|ACK, seq, pid 0
        want.extend_from_slice(&32u32.to_ne_bytes());
        want.extend_from_slice(&0x10u16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&0x01020304u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        // genlmsghdr: cmd GETFAMILY (3), version 2
        want.extend_from_slice(&[3, 2, 0, 0]);
        // CTRL_ATTR_FAMILY_NAME "IPVS\0": len 9, padded to 12
        want.extend_from_slice(&9u16.to_ne_bytes());
        want.extend_from_slice(&2u16.to_ne_bytes());
        want.extend_from_slice(b"IPVS\0\0\0\0");
        assert_eq!(a.buf, want);
    }

    #[test]
    fn newfamily_answer_decodes() {
        let mut a = Attrs::new();
        let start = a.begin_genl(GENL_ID_CTRL, 0, 1, CTRL_CMD_NEWFAMILY, 2);
        a.str(CTRL_ATTR_FAMILY_NAME, "IPVS");
        a.attr(CTRL_ATTR_FAMILY_ID, &0x23u16.to_ne_bytes());
        a.attr(CTRL_ATTR_VERSION, &1u32.to_ne_bytes());
        a.attr(CTRL_ATTR_HDRSIZE, &0u32.to_ne_bytes());
        a.attr(CTRL_ATTR_MAXATTR, &6u32.to_ne_bytes());
        // ops and multicast groups are nested attributes we skip
        a.begin(6);
        a.begin(1);
        a.attr(1, &1u32.to_ne_bytes());
        a.end();
        a.end();
        a.end_message(start);
        let msg = messages(&a.buf).next().unwrap().unwrap();
        assert_eq!(
            parse_family(msg.payload).unwrap(),
            GenlFamily {
                id: 0x23,
                name: "IPVS".into(),
                version: 1,
                hdrsize: 0,
                max_attr: 6
            }
        );
        assert!(parse_family(&[CTRL_CMD_GETFAMILY, 2, 0, 0]).is_err());
        assert!(parse_family(&[CTRL_CMD_NEWFAMILY, 2, 0, 0]).is_err());
    }

    /// The controller itself is always there: a live resolution in this namespace (names
    /// are at most 15 bytes; longer ones are EINVAL, not "unknown").
    #[test]
    fn resolves_nlctrl_and_reports_unknown_families() {
        let mut sock = NetlinkSocket::generic(1 << 20).unwrap();
        let ctrl = resolve_family(&mut sock, 1, "nlctrl").unwrap().unwrap();
        assert_eq!(ctrl.id, GENL_ID_CTRL);
        assert_eq!(ctrl.name, "nlctrl");
        assert_eq!(resolve_family(&mut sock, 2, "kp-nosuchfam").unwrap(), None);
    }
}
