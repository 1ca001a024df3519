//! The socket side: one `NETLINK_GENERIC` socket, the IPVS family id, requests and
//! their answers.

use std::time::{Duration, Instant};

use kp_netlink::{
    Attrs, GenlPayload, Malformed, NLMSG_DONE, NLMSG_ERROR, NetlinkSocket, genl_payload, messages,
    resolve_family,
};

use crate::Error;
use crate::types::{
    Family, Info, Op, RealServer, Service, ServiceKey, Timeouts, Version, VirtualServer,
};
use crate::wire;

/// Receive buffer asked for (forced past `rmem_max` with CAP_NET_ADMIN): the acks of a
/// whole batch are queued before the send returns.
const RCVBUF: libc::c_int = 8 << 20;
/// One received datagram: dump parts are at most 32 KiB.
const RECV_BUF: usize = 64 << 10;
/// How long to wait for each datagram of an answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to look for acks still missing after the queue ran dry.
const ACK_GRACE: Duration = Duration::from_millis(500);
/// Receive-buffer bytes one queued ack may cost (its skb's truesize, with margin).
const ACK_COST: usize = 1536;
/// Batch size bounds.
const MIN_BATCH: usize = 16;
const MAX_BATCH: usize = 4096;

/// A client of the kernel's IPVS, in the network namespace of the thread that opened it.
/// Needs CAP_NET_ADMIN there.
#[derive(Debug)]
pub struct IpvsClient {
    sock: NetlinkSocket,
    family: u16,
    seq: u32,
    batch: usize,
    req: Attrs,
    buf: Vec<u8>,
}

fn decode(op: impl Into<String>) -> impl FnOnce(Malformed) -> Error {
    move |reason| Error::Decode {
        op: op.into(),
        reason,
    }
}

impl IpvsClient {
    /// Opens a generic netlink socket and resolves the "IPVS" family.
    /// [`Error::NotAvailable`] when the kernel has no IPVS (module not loaded and not
    /// loadable from this namespace).
    pub fn open() -> Result<IpvsClient, Error> {
        let mut sock = NetlinkSocket::generic(RCVBUF).map_err(|source| Error::Io {
            op: "open generic netlink socket".into(),
            source,
        })?;
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| {
                d.as_secs() as u32 ^ std::process::id().wrapping_mul(2654435761)
            });
        let family = resolve_family(&mut sock, seq, wire::IPVS_GENL_NAME)
            .map_err(|source| Error::Io {
                op: "resolve generic netlink family IPVS".into(),
                source,
            })?
            .ok_or(Error::NotAvailable)?;
        // What the receive buffer holds decides how many acks one batch may queue.
        let rcvbuf = sock.rcvbuf().unwrap_or(RCVBUF as usize);
        Ok(IpvsClient {
            sock,
            family: family.id,
            seq: seq.wrapping_add(1),
            batch: (rcvbuf / ACK_COST).clamp(MIN_BATCH, MAX_BATCH),
            req: Attrs::new(),
            buf: vec![0; RECV_BUF],
        })
    }

    /// The generic netlink id the kernel gave the IPVS family.
    pub fn family_id(&self) -> u16 {
        self.family
    }

    /// Operations per datagram in [`IpvsClient::apply`] (chosen from the receive buffer).
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Sets the operations per datagram (at least 1).
    pub fn set_batch_size(&mut self, batch: usize) {
        self.batch = batch.max(1);
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// IPVS version and connection table size.
    pub fn info(&mut self) -> Result<Info, Error> {
        let seq = self.next_seq();
        self.req.clear();
        wire::encode_simple(&mut self.req, self.family, seq, wire::CMD_GET_INFO);
        let mut info = None;
        self.exchange("get IPVS info", seq, false, |p| {
            if p.cmd == wire::CMD_SET_INFO {
                info = Some(wire::parse_info(p.attrs)?);
            }
            Ok(())
        })?;
        info.ok_or_else(|| Error::Decode {
            op: "get IPVS info".into(),
            reason: Malformed("no IPVS_CMD_SET_INFO answer"),
        })
    }

    /// IPVS version (`IP_VS_VERSION_CODE`).
    pub fn version(&mut self) -> Result<Version, Error> {
        self.info().map(|i| i.version)
    }

    /// Every virtual service of the namespace, including ones this client did not create
    /// (firewall-mark services as [`Service::Fwmark`]).
    pub fn services(&mut self) -> Result<Vec<Service>, Error> {
        let seq = self.next_seq();
        self.req.clear();
        wire::encode_dump_services(&mut self.req, self.family, seq);
        let mut out = Vec::new();
        self.exchange("list services", seq, true, |p| {
            if p.cmd == wire::CMD_NEW_SERVICE {
                out.push(wire::parse_service(p.attrs)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The real servers of service `key` (empty when the service does not exist: the
    /// kernel answers such a dump with nothing rather than an error).
    pub fn real_servers(&mut self, key: &ServiceKey) -> Result<Vec<RealServer>, Error> {
        let seq = self.next_seq();
        self.req.clear();
        wire::encode_dump_dests(&mut self.req, self.family, seq, key);
        let family = match key.addr {
            std::net::IpAddr::V4(_) => Family::V4,
            std::net::IpAddr::V6(_) => Family::V6,
        };
        let mut out = Vec::new();
        self.exchange(&format!("list real servers of {key}"), seq, true, |p| {
            if p.cmd == wire::CMD_NEW_DEST {
                out.push(wire::parse_dest(p.attrs, family)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// TCP, TCP FIN-wait and UDP connection timeouts.
    pub fn timeouts(&mut self) -> Result<Timeouts, Error> {
        let seq = self.next_seq();
        self.req.clear();
        wire::encode_simple(&mut self.req, self.family, seq, wire::CMD_GET_CONFIG);
        let mut t = None;
        self.exchange("get timeouts", seq, false, |p| {
            if p.cmd == wire::CMD_SET_CONFIG {
                t = Some(wire::parse_timeouts(p.attrs)?);
            }
            Ok(())
        })?;
        t.ok_or_else(|| Error::Decode {
            op: "get timeouts".into(),
            reason: Malformed("no IPVS_CMD_SET_CONFIG answer"),
        })
    }

    /// Sets the timeouts; a 0 leaves that one unchanged.
    pub fn set_timeouts(&mut self, t: &Timeouts) -> Result<(), Error> {
        let seq = self.next_seq();
        self.req.clear();
        wire::encode_set_timeouts(&mut self.req, self.family, seq, t);
        let op = format!(
            "set timeouts (tcp {}s, tcpfin {}s, udp {}s)",
            t.tcp, t.tcp_fin, t.udp
        );
        self.exchange(&op, seq, false, |_| Ok(()))
    }

    /// Deletes every virtual service (and real server) of the namespace.
    pub fn flush(&mut self) -> Result<(), Error> {
        let seq = self.next_seq();
        self.req.clear();
        wire::encode_simple(&mut self.req, self.family, seq, wire::CMD_FLUSH);
        self.exchange("flush IPVS", seq, false, |_| Ok(()))
    }

    pub fn add_service(&mut self, vs: &VirtualServer) -> Result<(), Error> {
        self.one(Op::AddService(vs))
    }

    pub fn update_service(&mut self, vs: &VirtualServer) -> Result<(), Error> {
        self.one(Op::UpdateService(vs))
    }

    pub fn delete_service(&mut self, key: &ServiceKey) -> Result<(), Error> {
        self.one(Op::DeleteService(key))
    }

    pub fn add_real_server(&mut self, key: &ServiceKey, rs: &RealServer) -> Result<(), Error> {
        self.one(Op::AddRealServer(key, rs))
    }

    pub fn update_real_server(&mut self, key: &ServiceKey, rs: &RealServer) -> Result<(), Error> {
        self.one(Op::UpdateRealServer(key, rs))
    }

    pub fn delete_real_server(&mut self, key: &ServiceKey, rs: &RealServer) -> Result<(), Error> {
        self.one(Op::DeleteRealServer(key, rs))
    }

    fn one(&mut self, op: Op<'_>) -> Result<(), Error> {
        match self.apply(&[op])?.pop() {
            Some((_, err)) => Err(err),
            None => Ok(()),
        }
    }

    /// Sends `ops` in order, [`IpvsClient::batch_size`] per datagram (the kernel runs
    /// each datagram's messages one after the other inside the send, one ack each), and
    /// returns the ones the kernel refused, as (index in `ops`, error), in order. A
    /// refused op does not stop the ones after it. `Err`: the socket failed; ops from
    /// the failing datagram on have an unknown outcome.
    pub fn apply(&mut self, ops: &[Op<'_>]) -> Result<Vec<(usize, Error)>, Error> {
        let mut failures = Vec::new();
        self.sock.drain(&mut self.buf);
        let mut done = 0;
        while done < ops.len() {
            let chunk = &ops[done..(done + self.batch).min(ops.len())];
            let n = chunk.len();
            let base = self.seq.wrapping_add(1);
            self.seq = self.seq.wrapping_add(n as u32);
            self.req.clear();
            for (i, op) in chunk.iter().enumerate() {
                wire::encode_op(&mut self.req, self.family, base.wrapping_add(i as u32), op);
            }
            let batch_name = || {
                if n == 1 {
                    chunk[0].to_string()
                } else {
                    format!("{n} IPVS operations from \"{}\"", chunk[0])
                }
            };
            self.sock.send(&self.req.buf).map_err(|source| Error::Io {
                op: batch_name(),
                source,
            })?;
            let mut pending = vec![true; n];
            let mut left = n;
            while left > 0 {
                // Everything was queued inside the send: poll returns at once while acks
                // are there; the wait only bounds the search for lost ones.
                let len = match self.sock.recv(&mut self.buf, ACK_GRACE) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    // Acks were dropped: the ones still pending stay unconfirmed.
                    Err(source) if source.raw_os_error() == Some(libc::ENOBUFS) => continue,
                    Err(source) => {
                        return Err(Error::Io {
                            op: batch_name(),
                            source,
                        });
                    }
                };
                for msg in messages(&self.buf[..len]) {
                    let msg = msg.map_err(decode(batch_name()))?;
                    if msg.msg_type != NLMSG_ERROR {
                        continue;
                    }
                    let ack = msg.ack().map_err(decode(batch_name()))?;
                    let idx = ack.seq.wrapping_sub(base) as usize;
                    if idx >= n || !pending[idx] {
                        continue;
                    }
                    pending[idx] = false;
                    left -= 1;
                    if ack.errno != 0 {
                        failures.push((
                            done + idx,
                            Error::Kernel {
                                op: chunk[idx].to_string(),
                                errno: ack.errno,
                                message: ack.message,
                            },
                        ));
                    }
                }
            }
            if left > 0 {
                for (idx, _) in pending.iter().enumerate().filter(|(_, p)| **p) {
                    failures.push((
                        done + idx,
                        Error::Unconfirmed {
                            op: chunk[idx].to_string(),
                        },
                    ));
                }
                // The receive buffer was too small for this many acks.
                self.batch = (self.batch / 2).max(1);
            }
            done += n;
        }
        failures.sort_by_key(|(i, _)| *i);
        Ok(failures)
    }

    /// Sends the request in `self.req` and reads its answer: every message of our family
    /// goes to `on_msg`; ends at the ack (`dump` = false) or `NLMSG_DONE` (dumps).
    fn exchange(
        &mut self,
        op: &str,
        seq: u32,
        dump: bool,
        mut on_msg: impl FnMut(GenlPayload<'_>) -> Result<(), Malformed>,
    ) -> Result<(), Error> {
        self.sock.drain(&mut self.buf);
        self.sock.send(&self.req.buf).map_err(|source| Error::Io {
            op: op.to_string(),
            source,
        })?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let len = self
                .sock
                .recv(&mut self.buf, wait)
                .map_err(|source| Error::Io {
                    op: op.to_string(),
                    source,
                })?
                .ok_or_else(|| Error::Io {
                    op: op.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer from the kernel",
                    ),
                })?;
            for msg in messages(&self.buf[..len]) {
                let msg = msg.map_err(decode(op))?;
                if msg.seq != seq {
                    continue;
                }
                match msg.msg_type {
                    NLMSG_ERROR => {
                        let ack = msg.ack().map_err(decode(op))?;
                        if ack.errno != 0 {
                            return Err(Error::Kernel {
                                op: op.to_string(),
                                errno: ack.errno,
                                message: ack.message,
                            });
                        }
                        if !dump {
                            return Ok(());
                        }
                    }
                    NLMSG_DONE => {
                        let errno = msg.done_errno();
                        if errno != 0 {
                            return Err(Error::Kernel {
                                op: op.to_string(),
                                errno,
                                message: None,
                            });
                        }
                        return Ok(());
                    }
                    t if t == self.family => {
                        let p = genl_payload(msg.payload).map_err(decode(op))?;
                        on_msg(p).map_err(decode(op))?;
                    }
                    _ => {}
                }
            }
        }
    }
}
