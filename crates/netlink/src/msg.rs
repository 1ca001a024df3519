//! Netlink message framing: writing the `nlmsghdr` every message starts with, splitting a
//! received datagram into messages, walking attributes, and decoding acks and errors
//! (`struct nlmsgerr`, with the extended-ack message when the kernel sends one).
//!
//! All header fields are in host byte order.

use std::fmt;

use crate::Attrs;

/// `sizeof(struct nlmsghdr)`.
pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH`.
pub const NLM_F_DUMP: u16 = 0x300;
/// On an `NLMSG_ERROR`: the echoed request was cut to its header (`NETLINK_CAP_ACK`).
pub const NLM_F_CAPPED: u16 = 0x100;
/// On an `NLMSG_ERROR`: extended-ack attributes follow the echoed request.
pub const NLM_F_ACK_TLVS: u16 = 0x200;

/// `NLMSGERR_ATTR_MSG`: the kernel's error text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// The attribute type without `NLA_F_NESTED` / `NLA_F_NET_BYTEORDER`.
pub const NLA_TYPE_MASK: u16 = 0x3fff;

/// Bytes the kernel sent that do not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed netlink data: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

impl Attrs {
    /// Starts a message: appends an `nlmsghdr` (pid 0) whose length
    /// [`Attrs::end_message`] fills in. Returns where the message starts.
    pub fn begin_message(&mut self, msg_type: u16, flags: u16, seq: u32) -> usize {
        self.pad();
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&msg_type.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        start
    }

    /// Ends the message begun at `start`: writes its length and pads to 4 bytes, so the
    /// next message of a batch starts aligned.
    pub fn end_message(&mut self, start: usize) {
        self.pad();
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    /// What follows the header (without trailing padding beyond `nlmsg_len`).
    pub payload: &'a [u8],
}

/// The outcome the kernel reported for one request (`NLMSG_ERROR`, error 0 = ack).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Positive errno; 0 for success.
    pub errno: i32,
    /// Sequence number of the request it answers.
    pub seq: u32,
    /// The kernel's extended-ack text, if any.
    pub message: Option<String>,
}

fn ne_u32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

fn ne_u16(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

impl<'a> Message<'a> {
    /// Decodes an `NLMSG_ERROR` message (`struct nlmsgerr` and its attributes).
    pub fn ack(&self) -> Result<Ack, Malformed> {
        let p = self.payload;
        if p.len() < 4 + NLMSG_HDRLEN {
            return Err(Malformed("NLMSG_ERROR shorter than struct nlmsgerr"));
        }
        let code = ne_u32(&p[0..4]) as i32;
        let orig_len = ne_u32(&p[4..8]) as usize;
        let seq = ne_u32(&p[12..16]);
        let mut message = None;
        if self.flags & NLM_F_ACK_TLVS != 0 {
            // The echoed request: only its header when capped, else all of it.
            let echoed = if self.flags & NLM_F_CAPPED != 0 {
                NLMSG_HDRLEN
            } else {
                orig_len.max(NLMSG_HDRLEN).next_multiple_of(4)
            };
            if let Some(tlvs) = p.get(4 + echoed..) {
                for attr in attrs(tlvs) {
                    let (ty, value) = attr?;
                    if ty == NLMSGERR_ATTR_MSG {
                        let text = value.split(|b| *b == 0).next().unwrap_or_default();
                        message = Some(String::from_utf8_lossy(text).into_owned());
                    }
                }
            }
        }
        Ok(Ack {
            errno: code.checked_neg().unwrap_or(i32::MAX).max(0),
            seq,
            message,
        })
    }

    /// The error a dump's `NLMSG_DONE` carries (positive errno, 0 = none).
    pub fn done_errno(&self) -> i32 {
        match self.payload.get(..4) {
            Some(code) => (ne_u32(code) as i32)
                .checked_neg()
                .unwrap_or(i32::MAX)
                .max(0),
            None => 0,
        }
    }
}

/// The messages of a datagram, in order.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

/// Iterator of [`messages`]; stops after the first malformed message.
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let buf = self.rest;
        if buf.len() < NLMSG_HDRLEN {
            self.rest = &[];
            return Some(Err(Malformed("datagram ends inside a message header")));
        }
        let len = ne_u32(&buf[0..4]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            self.rest = &[];
            return Some(Err(Malformed("message length out of bounds")));
        }
        let msg = Message {
            msg_type: ne_u16(&buf[4..6]),
            flags: ne_u16(&buf[6..8]),
            seq: ne_u32(&buf[8..12]),
            pid: ne_u32(&buf[12..16]),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        self.rest = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some(Ok(msg))
    }
}

/// The attributes of `buf` as (type without flag bits, value).
pub fn attrs(buf: &[u8]) -> AttrIter<'_> {
    AttrIter { rest: buf }
}

/// Iterator of [`attrs`]; stops after the first malformed attribute.
#[derive(Debug, Clone)]
pub struct AttrIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = Result<(u16, &'a [u8]), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        // Trailing bytes shorter than an attribute header are padding.
        if self.rest.len() < 4 {
            self.rest = &[];
            return None;
        }
        let buf = self.rest;
        let len = ne_u16(&buf[0..2]) as usize;
        if len < 4 || len > buf.len() {
            self.rest = &[];
            return Some(Err(Malformed("attribute length out of bounds")));
        }
        let ty = ne_u16(&buf[2..4]) & NLA_TYPE_MASK;
        self.rest = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some(Ok((ty, &buf[4..len])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_message(code: i32, seq: u32, flags: u16, tlv_text: Option<&str>) -> Vec<u8> {
        let mut a = Attrs::new();
        let start = a.begin_message(NLMSG_ERROR, flags, 99);
        a.buf.extend_from_slice(&code.to_ne_bytes());
        // the echoed request header (length 36, type 0x1c, seq)
        a.buf.extend_from_slice(&36u32.to_ne_bytes());
        a.buf.extend_from_slice(&0x1cu16.to_ne_bytes());
        a.buf
            .extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        a.buf.extend_from_slice(&seq.to_ne_bytes());
        a.buf.extend_from_slice(&0u32.to_ne_bytes());
        if let Some(text) = tlv_text {
            a.str(NLMSGERR_ATTR_MSG, text);
        }
        a.end_message(start);
        a.buf
    }

    #[test]
    fn headers_are_host_order_and_lengths_patched() {
        let mut a = Attrs::new();
        let start = a.begin_message(0x1c, NLM_F_REQUEST | NLM_F_ACK, 7);
        a.str(1, "abc");
        a.end_message(start);
        let second = a.begin_message(0x1c, NLM_F_REQUEST, 8);
        a.end_message(second);
        assert_eq!(second, 24);
        assert_eq!(&a.buf[0..4], &24u32.to_ne_bytes());
        assert_eq!(&a.buf[4..6], &0x1cu16.to_ne_bytes());
        assert_eq!(&a.buf[6..8], &5u16.to_ne_bytes());
        assert_eq!(&a.buf[8..12], &7u32.to_ne_bytes());
        assert_eq!(&a.buf[12..16], &[0; 4]);
        let msgs: Vec<_> = messages(&a.buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].msg_type, msgs[0].seq), (0x1c, 7));
        assert_eq!(msgs[1].seq, 8);
        assert!(msgs[1].payload.is_empty());
        let got: Vec<_> = attrs(msgs[0].payload).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, vec![(1, &b"abc\0"[..])]);
    }

    #[test]
    fn acks_and_errors_decode_with_their_text() {
        let ok = error_message(0, 5, NLM_F_CAPPED, None);
        let m = messages(&ok).next().unwrap().unwrap();
        assert_eq!(
            m.ack().unwrap(),
            Ack {
                errno: 0,
                seq: 5,
                message: None
            }
        );
        let err = error_message(-17, 6, NLM_F_CAPPED | NLM_F_ACK_TLVS, Some("exists"));
        let m = messages(&err).next().unwrap().unwrap();
        assert_eq!(
            m.ack().unwrap(),
            Ack {
                errno: 17,
                seq: 6,
                message: Some("exists".into())
            }
        );
    }

    #[test]
    fn nested_flag_bits_are_masked_and_garbage_is_reported() {
        let mut a = Attrs::new();
        a.begin(3);
        a.u32(4, 1);
        a.end();
        let (ty, inner) = attrs(&a.buf).next().unwrap().unwrap();
        assert_eq!(ty, 3);
        assert_eq!(attrs(inner).count(), 1);
        assert!(attrs(&[200, 0, 1, 0, 0, 0]).next().unwrap().is_err());
        assert!(messages(&[1, 2, 3]).next().unwrap().is_err());
        assert!(
            messages(&[8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                .next()
                .unwrap()
                .is_err()
        );
    }
}
