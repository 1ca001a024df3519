//! nf_tables over netlink for kp-nftables' transactions: a mini `nft -f` for exactly the
//! statements kube-proxy-rs writes. `nft` reads the whole table into its cache on every
//! call (about 1 s at 10k services); this sends the parsed transaction as ONE nfnetlink
//! batch on a socket kept open, and never reads the table.
//!
//! Unknown syntax is a [`ParseError`] naming the line: callers can fall back to `nft -f`.

mod encode;
mod expr;
mod msg;
mod parse;
mod syntax;

use std::time::{Duration, Instant};

pub use parse::{parse, parse_line};
pub use syntax::{
    AddrRhs, Dir, Element, Family, Hook, KeyField, KeyPart, Obj, ParseError, Rule, RuleItem,
    SetKey, SetSpec, Statement, Stmt, TypeofExpr, Verdict,
};

use encode::Batch;
use kp_netlink::NetfilterSocket;

/// Batches up to this many statements ask the kernel to ACK every message (a positive
/// confirmation for each); larger ones ACK only the last message so the replies of a
/// full sync (100k+ messages) cannot overrun the receive buffer. Errors are always sent.
const ACK_ALL_STATEMENTS: usize = 256;

/// How long to wait for replies after the send returned (the kernel has already
/// processed the batch by then; this only absorbs scheduling noise).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Receive buffer asked for: error and ACK replies of a whole batch are queued at once.
const RCVBUF: libc::c_int = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NftnlError {
    #[error("parse: {0}")]
    Parse(#[from] ParseError),
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel refused a message; the whole batch was rolled back.
    #[error("line {line}: {message} (errno {errno}): {statement}{}", more_note(*.more))]
    Rejected {
        line: usize,
        statement: String,
        errno: i32,
        message: String,
        /// Further errors in the same batch (often consequences of the first).
        more: usize,
    },
    /// The batch was accepted message by message but the commit failed.
    #[error("commit failed: {message} (errno {errno})")]
    Commit { errno: i32, message: String },
    #[error("no reply from the kernel for the batch (receive buffer overrun?)")]
    NoReply,
}

fn more_note(more: usize) -> String {
    if more == 0 {
        String::new()
    } else {
        format!(" (+{more} more errors)")
    }
}

/// What one [`NetlinkApplier::apply`] sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    /// nf_tables messages in the batch (without BEGIN/END).
    pub messages: usize,
    /// Bytes of the batch.
    pub bytes: usize,
    /// Parse + encode + send + replies.
    pub duration: Duration,
    /// Time inside the send call: the kernel processes (and commits) the batch there.
    pub kernel: Duration,
}

/// Owns one NETLINK_NETFILTER socket, bound to the network namespace of the thread that
/// called [`NetlinkApplier::open`].
pub struct NetlinkApplier {
    sock: NetfilterSocket,
    seq: u32,
    rbuf: Vec<u8>,
}

struct Reply {
    seq: u32,
    errno: i32,
    message: String,
}

impl NetlinkApplier {
    pub fn open() -> Result<Self, NftnlError> {
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Ok(NetlinkApplier {
            sock: NetfilterSocket::open(RCVBUF)?,
            seq,
            rbuf: vec![0; 1 << 16],
        })
    }

    /// Parses the transaction text and commits it as ONE nf_tables batch (atomic: on any
    /// error nothing of it is applied). Errors name the statement the kernel rejected.
    pub fn apply(&mut self, transaction: &str) -> Result<ApplyReport, NftnlError> {
        let start = Instant::now();
        // Parse and encode line by line: a full sync is 100k+ statements, and only the
        // batch bytes (plus each statement's line) need to live until the reply.
        let count = transaction
            .lines()
            .filter(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#')
            })
            .count();
        if count == 0 {
            return Ok(ApplyReport {
                messages: 0,
                bytes: 0,
                duration: start.elapsed(),
                kernel: Duration::ZERO,
            });
        }
        let first = self.seq;
        let mut batch = Batch::new(first, count <= ACK_ALL_STATEMENTS);
        let mut lines: Vec<(usize, &str)> = Vec::with_capacity(count);
        for (i, raw) in transaction.lines().enumerate() {
            if let Some(s) = parse_line(i + 1, raw)? {
                batch.statement(lines.len(), &s);
                lines.push((s.line, s.text));
            }
        }
        let end_seq = batch.finish();
        self.seq = end_seq.wrapping_add(1);
        let last_msg = end_seq - 1;
        // Replies of an earlier, interrupted call must not be taken for ours.
        while let Ok(Some(_)) = self.sock.recv(&mut self.rbuf, Duration::ZERO) {}
        let sent = Instant::now();
        self.sock.send(&batch.buf)?;
        let kernel = sent.elapsed();
        let replies = self.replies(first, last_msg)?;
        let mut errors: Vec<&Reply> = replies.iter().filter(|r| r.errno != 0).collect();
        errors.sort_by_key(|r| r.seq);
        if let Some(e) = errors.first() {
            if e.seq == first {
                return Err(NftnlError::Commit {
                    errno: e.errno,
                    message: e.message.clone(),
                });
            }
            let idx = (e.seq - first - 1) as usize;
            let stmt = batch.origin.get(idx).and_then(|i| lines.get(*i));
            return Err(NftnlError::Rejected {
                line: stmt.map_or(0, |s| s.0),
                statement: stmt.map_or_else(String::new, |s| s.1.to_string()),
                errno: e.errno,
                message: e.message.clone(),
                more: errors.len() - 1,
            });
        }
        Ok(ApplyReport {
            messages: batch.messages(),
            bytes: batch.buf.len(),
            duration: start.elapsed(),
            kernel,
        })
    }

    /// Rules in `chain` of `table`, or `None` when the chain (or table) does not exist.
    /// One filtered rule dump: the kernel sends that chain's rules only, so this is cheap
    /// whatever the size of the table (`nft list chain` reads the whole table first).
    pub fn chain_rule_count(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<Option<usize>, NftnlError> {
        const NFT_MSG_GETRULE: u16 = 7;
        const NFT_MSG_NEWRULE: u16 = 6;
        const NLM_F_REQUEST: u16 = 1;
        const NLM_F_DUMP: u16 = 0x300;
        const NLMSG_ERROR: u16 = 2;
        const NLMSG_DONE: u16 = 3;
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&((10u16 << 8) | NFT_MSG_GETRULE).to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[family.nfproto(), 0, 0, 0]);
        for (ty, v) in [(1u16, table), (2u16, chain)] {
            let len = 4 + v.len() + 1;
            msg.extend_from_slice(&(len as u16).to_ne_bytes());
            msg.extend_from_slice(&ty.to_ne_bytes());
            msg.extend_from_slice(v.as_bytes());
            msg.push(0);
            while msg.len() % 4 != 0 {
                msg.push(0);
            }
        }
        let total = msg.len() as u32;
        msg[..4].copy_from_slice(&total.to_ne_bytes());
        while let Ok(Some(_)) = self.sock.recv(&mut self.rbuf, Duration::ZERO) {}
        self.sock.send(&msg)?;
        let mut rules = 0;
        loop {
            let n = match self.sock.recv(&mut self.rbuf, REPLY_TIMEOUT)? {
                Some(n) => n,
                None => return Err(NftnlError::NoReply),
            };
            let b = &self.rbuf[..n];
            let mut off = 0;
            while off + 16 <= b.len() {
                let len = u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]) as usize;
                let ty = u16::from_ne_bytes([b[off + 4], b[off + 5]]);
                let mseq = u32::from_ne_bytes([b[off + 8], b[off + 9], b[off + 10], b[off + 11]]);
                if len < 16 || off + len > b.len() {
                    break;
                }
                if mseq == seq {
                    match ty {
                        NLMSG_DONE => return Ok(Some(rules)),
                        NLMSG_ERROR => {
                            let errno = if len >= 20 {
                                -i32::from_ne_bytes([
                                    b[off + 16],
                                    b[off + 17],
                                    b[off + 18],
                                    b[off + 19],
                                ])
                            } else {
                                0
                            };
                            return match errno {
                                0 => Ok(Some(rules)),
                                libc::ENOENT => Ok(None),
                                e => Err(std::io::Error::from_raw_os_error(e).into()),
                            };
                        }
                        t if t == (10 << 8) | NFT_MSG_NEWRULE => rules += 1,
                        _ => {}
                    }
                }
                off += len.div_ceil(4) * 4;
            }
        }
    }

    /// Reads replies until the one for `last` (delivered last by the kernel) arrives.
    fn replies(&mut self, first: u32, last: u32) -> Result<Vec<Reply>, NftnlError> {
        let mut out: Vec<Reply> = vec![];
        loop {
            let n = match self.sock.recv(&mut self.rbuf, REPLY_TIMEOUT) {
                Ok(Some(n)) => n,
                Ok(None) => return Err(NftnlError::NoReply),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // Overrun: replies were lost. Only errors can be that many.
                    if out.iter().any(|r| r.errno != 0) {
                        return Ok(out);
                    }
                    return Err(NftnlError::NoReply);
                }
                Err(e) => return Err(e.into()),
            };
            let mut done = false;
            for r in parse_replies(&self.rbuf[..n]) {
                if r.seq < first || r.seq > last {
                    continue;
                }
                done |= r.seq == last;
                out.push(r);
            }
            if done {
                return Ok(out);
            }
        }
    }
}

/// NLMSG_ERROR messages (ACKs have errno 0) of one datagram.
fn parse_replies(b: &[u8]) -> Vec<Reply> {
    let mut out = vec![];
    let mut off = 0;
    let u32_at = |o: usize| -> Option<u32> {
        b.get(o..o + 4)
            .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
    };
    while let Some(len) = u32_at(off) {
        let len = len as usize;
        if len < 16 || off + len > b.len() {
            break;
        }
        let ty = u16::from_ne_bytes([b[off + 4], b[off + 5]]);
        let flags = u16::from_ne_bytes([b[off + 6], b[off + 7]]);
        // NLMSG_ERROR: i32 error, then the request's header (16 bytes, CAP_ACK).
        if ty == 2 && len >= 36 {
            let errno = -(u32_at(off + 16).unwrap_or(0) as i32);
            let seq = u32_at(off + 28).unwrap_or(0);
            let mut message = if errno == 0 {
                String::new()
            } else {
                std::io::Error::from_raw_os_error(errno).to_string()
            };
            // NLM_F_ACK_TLVS: extended ACK attributes follow; NLMSGERR_ATTR_MSG = 1.
            if flags & 0x200 != 0 {
                let mut a = off + 36;
                while a + 4 <= off + len {
                    let alen = u16::from_ne_bytes([b[a], b[a + 1]]) as usize;
                    let aty = u16::from_ne_bytes([b[a + 2], b[a + 3]]);
                    if alen < 4 || a + alen > off + len {
                        break;
                    }
                    if aty == 1 {
                        let s = String::from_utf8_lossy(&b[a + 4..a + alen]);
                        message = format!("{message}: {}", s.trim_end_matches('\0'));
                    }
                    a += alen.div_ceil(4) * 4;
                }
            }
            out.push(Reply {
                seq,
                errno,
                message,
            });
        }
        off += len.div_ceil(4) * 4;
    }
    out
}

/// The batch bytes `apply` would send for `transaction` (sequence numbers from 0); for
/// inspection and tests.
pub fn encode_batch(transaction: &str) -> Result<Vec<u8>, ParseError> {
    let stmts = parse(transaction)?;
    let mut batch = Batch::new(0, stmts.len() <= ACK_ALL_STATEMENTS);
    for (i, s) in stmts.iter().enumerate() {
        batch.statement(i, s);
    }
    batch.finish();
    Ok(batch.buf)
}
