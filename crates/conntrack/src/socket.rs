//! The thin kernel part: one `NETLINK_NETFILTER` socket that dumps UDP entries and
//! deletes entries in batches (many delete messages per `sendto`, one ack each).

use std::collections::HashSet;
use std::io;
use std::time::{Duration, Instant};

use kp_model::IpFamily;
use kp_netlink::NetfilterSocket;

use crate::plan::{FlowEntry, IPPROTO_UDP, UdpServiceTable, plan_deletions};
use crate::wire::{CT_NEW, DecodeError, MessageBuf, NLMSG_DONE, NLMSG_ERROR};
use crate::wire::{parse_entry, split_messages};

/// Delete messages per `sendto`. The kernel handles a batch synchronously inside the
/// send, so all acks are queued when it returns; the batch must fit the receive buffer.
const DEFAULT_BATCH: usize = 256;
/// Receive buffer asked for (needs CAP_NET_ADMIN for more than `rmem_max`).
const RCVBUF_BYTES: libc::c_int = 4 << 20;
/// Dump messages are at most 32 KiB; leave room.
const RECV_BUF_BYTES: usize = 64 << 10;
/// Safety net for a dump that never finishes.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to ctnetlink.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("open ctnetlink socket: {0}")]
    Open(io::Error),
    #[error("ctnetlink {op}: {source}")]
    Io { op: &'static str, source: io::Error },
    #[error("ctnetlink {op}: the kernel answered: {source}")]
    Kernel { op: &'static str, source: io::Error },
    #[error("ctnetlink {op}: {source}")]
    Decode {
        op: &'static str,
        source: DecodeError,
    },
    #[error("deleted {deleted} of {requested} conntrack entries; {failed} failed, first: {first}")]
    PartialDelete {
        requested: usize,
        deleted: usize,
        failed: usize,
        first: io::Error,
    },
}

impl From<ConntrackError> for io::Error {
    fn from(err: ConntrackError) -> io::Error {
        let kind = match &err {
            ConntrackError::Open(source)
            | ConntrackError::Io { source, .. }
            | ConntrackError::Kernel { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, err.to_string())
    }
}

/// What one reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReconcileReport {
    /// UDP entries of the family in the table.
    pub listed: usize,
    /// Entries found stale.
    pub stale: usize,
    /// Entries the kernel confirmed deleted (stale entries that expired meanwhile are
    /// not counted). This is what `kubeproxy_conntrack_reconciler_deleted_entries_total`
    /// counts.
    pub deleted: usize,
    /// Wall time of list + plan + delete.
    pub duration: Duration,
}

/// A ctnetlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Conntrack {
    sock: NetfilterSocket,
    seq: u32,
    batch: usize,
    recv_buf: Vec<u8>,
    /// Whether the kernel accepted `CTA_FILTER` on dumps (Linux 5.8+); `None` = untried.
    kernel_filter: Option<bool>,
}

impl Conntrack {
    /// Opens the socket. Needs CAP_NET_ADMIN in the namespace for dumps and deletes.
    pub fn open() -> Result<Conntrack, ConntrackError> {
        Ok(Conntrack {
            sock: NetfilterSocket::open(RCVBUF_BYTES).map_err(ConntrackError::Open)?,
            seq: std::process::id().wrapping_mul(2654435761),
            batch: DEFAULT_BATCH,
            recv_buf: vec![0; RECV_BUF_BYTES],
            kernel_filter: None,
        })
    }

    /// Delete messages per `sendto` (at least 1).
    pub fn set_batch_size(&mut self, batch: usize) {
        self.batch = batch.max(1);
    }

    /// Whether dumps ask the kernel to skip non-UDP entries (`CTA_FILTER`, Linux
    /// 5.8+). On by default and turned off automatically when the kernel refuses it;
    /// entries are filtered in userspace either way.
    pub fn use_kernel_filter(&mut self, enabled: bool) {
        self.kernel_filter = if enabled { None } else { Some(false) };
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Every UDP entry of `family` in this namespace's conntrack table.
    pub fn list_udp(&mut self, family: IpFamily) -> Result<Vec<FlowEntry>, ConntrackError> {
        let use_filter = self.kernel_filter != Some(false);
        match self.dump(family, use_filter) {
            Err(ConntrackError::Kernel { source, .. })
                if use_filter
                    && self.kernel_filter.is_none()
                    && matches!(source.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) =>
            {
                // Kernels before 5.8 know no CTA_FILTER; filter in userspace only.
                self.kernel_filter = Some(false);
                self.dump(family, false)
            }
            Ok(entries) => {
                if use_filter {
                    self.kernel_filter = Some(true);
                }
                Ok(entries)
            }
            Err(err) => Err(err),
        }
    }

    fn dump(&mut self, family: IpFamily, filter: bool) -> Result<Vec<FlowEntry>, ConntrackError> {
        const OP: &str = "dump";
        let seq = self.next_seq();
        let mut request = MessageBuf::new();
        request.dump_request(seq, family, filter);
        self.send(request.as_bytes(), OP)?;
        let mut entries = Vec::new();
        let mut skipped = 0usize;
        loop {
            let len = self
                .recv(RECV_TIMEOUT, OP)?
                .ok_or_else(|| ConntrackError::Io {
                    op: OP,
                    source: io::Error::new(io::ErrorKind::TimedOut, "no reply"),
                })?;
            let buf = &self.recv_buf[..len];
            let messages =
                split_messages(buf).map_err(|source| ConntrackError::Decode { op: OP, source })?;
            for msg in messages {
                if msg.seq != seq {
                    continue;
                }
                match msg.msg_type {
                    NLMSG_DONE => {
                        if let Some(code) = msg.payload.get(..4) {
                            let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                            if code < 0 {
                                return Err(kernel_error(OP, code));
                            }
                        }
                        if skipped > 0 {
                            tracing::warn!(skipped, "skipped undecodable conntrack entries");
                        }
                        return Ok(entries);
                    }
                    NLMSG_ERROR => {
                        let code = msg
                            .error_code()
                            .map_err(|source| ConntrackError::Decode { op: OP, source })?;
                        if code < 0 {
                            return Err(kernel_error(OP, code));
                        }
                    }
                    CT_NEW => match parse_entry(msg.payload) {
                        Ok(entry) if entry.protocol == IPPROTO_UDP && entry.family == family => {
                            entries.push(entry)
                        }
                        Ok(_) => {}
                        Err(err) => {
                            skipped += 1;
                            tracing::debug!(%err, "undecodable conntrack entry");
                        }
                    },
                    _ => {}
                }
            }
        }
    }

    /// Deletes `entries` (by original tuple, zone and id); returns how many the kernel
    /// confirmed. Entries already gone (expired meanwhile) are not an error.
    pub fn delete(&mut self, entries: &[FlowEntry]) -> Result<usize, ConntrackError> {
        const OP: &str = "delete";
        let mut deleted = 0usize;
        let mut failed = 0usize;
        let mut first: Option<io::Error> = None;
        let mut request = MessageBuf::new();
        let mut rest = entries;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(self.batch.min(rest.len()));
            rest = tail;
            request.clear();
            let mut pending = HashSet::with_capacity(chunk.len());
            for entry in chunk {
                let seq = self.next_seq();
                request.delete_request(seq, entry);
                pending.insert(seq);
            }
            self.send(request.as_bytes(), OP)?;
            let overflowed =
                self.collect_acks(&mut pending, &mut deleted, &mut failed, &mut first)?;
            if !pending.is_empty() {
                // Acks were dropped (receive buffer overflow): the outcome of those
                // deletes is unknown. Shrink the batch for the rest.
                tracing::warn!(
                    unconfirmed = pending.len(),
                    overflowed,
                    "conntrack delete acks lost; using smaller batches"
                );
                self.batch = (self.batch / 2).max(1);
            }
        }
        match first {
            None => Ok(deleted),
            Some(first) => Err(ConntrackError::PartialDelete {
                requested: entries.len(),
                deleted,
                failed,
                first,
            }),
        }
    }

    /// Reads the acks of one batch. The kernel processed the batch inside `sendto`, so
    /// everything that will arrive is already queued: read without blocking.
    fn collect_acks(
        &mut self,
        pending: &mut HashSet<u32>,
        deleted: &mut usize,
        failed: &mut usize,
        first: &mut Option<io::Error>,
    ) -> Result<bool, ConntrackError> {
        const OP: &str = "delete";
        let mut overflowed = false;
        while !pending.is_empty() {
            let len = match self.recv(Duration::ZERO, OP) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(ConntrackError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::ENOBUFS) =>
                {
                    overflowed = true;
                    continue;
                }
                Err(err) => return Err(err),
            };
            let buf = &self.recv_buf[..len];
            let messages =
                split_messages(buf).map_err(|source| ConntrackError::Decode { op: OP, source })?;
            for msg in messages.iter().filter(|m| m.msg_type == NLMSG_ERROR) {
                if !pending.remove(&msg.acked_seq()) {
                    continue;
                }
                let code = msg
                    .error_code()
                    .map_err(|source| ConntrackError::Decode { op: OP, source })?;
                match -code {
                    0 => *deleted += 1,
                    libc::ENOENT => {}
                    errno => {
                        *failed += 1;
                        first.get_or_insert_with(|| io::Error::from_raw_os_error(errno));
                    }
                }
            }
        }
        Ok(overflowed)
    }

    /// Lists UDP entries of `family`, deletes the stale ones per `table`.
    pub fn reconcile(
        &mut self,
        family: IpFamily,
        table: &UdpServiceTable,
    ) -> Result<ReconcileReport, ConntrackError> {
        let started = Instant::now();
        let entries = self.list_udp(family)?;
        let stale = plan_deletions(&entries, table);
        for entry in &stale {
            tracing::debug!(%entry, "deleting stale conntrack entry");
        }
        let deleted = if stale.is_empty() {
            0
        } else {
            self.delete(&stale)?
        };
        Ok(ReconcileReport {
            listed: entries.len(),
            stale: stale.len(),
            deleted,
            duration: started.elapsed(),
        })
    }

    fn send(&mut self, bytes: &[u8], op: &'static str) -> Result<(), ConntrackError> {
        self.sock
            .send(bytes)
            .map_err(|source| ConntrackError::Io { op, source })
    }

    /// One datagram into `recv_buf`, waiting at most `wait`; `None` if none came.
    fn recv(&mut self, wait: Duration, op: &'static str) -> Result<Option<usize>, ConntrackError> {
        self.sock
            .recv(&mut self.recv_buf, wait)
            .map_err(|source| ConntrackError::Io { op, source })
    }
}

fn kernel_error(op: &'static str, code: i32) -> ConntrackError {
    ConntrackError::Kernel {
        op,
        source: io::Error::from_raw_os_error(-code),
    }
}

/// Opens a socket in the calling thread's namespace and runs one reconcile: list the
/// UDP entries of `family`, delete those `table` finds stale.
pub fn reconcile(
    family: IpFamily,
    table: &UdpServiceTable,
) -> Result<ReconcileReport, ConntrackError> {
    Conntrack::open()?.reconcile(family, table)
}
