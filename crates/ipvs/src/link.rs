//! kube-ipvs0, the dummy device that holds every VIP, over rtnetlink (no process per
//! sync: in an emulated guest each `ip` run costs ~0.3 s, on a node a few ms).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use kp_model::IpFamily;
use kp_netlink::{
    Attrs, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkSocket, attrs,
    messages,
};

/// The VIP device as the proxier needs it.
pub trait VipDevice: Send {
    /// Whether the device exists.
    fn exists(&mut self) -> Result<bool, String>;
    /// Creates it (a dummy device, left down as upstream leaves it); existing is fine.
    fn create(&mut self) -> Result<(), String>;
    /// Its addresses of `family`.
    fn addresses(&mut self, family: IpFamily) -> Result<BTreeSet<IpAddr>, String>;
    /// Adds and removes host addresses (/32, /128); returns the failures.
    fn change(&mut self, add: &[IpAddr], del: &[IpAddr]) -> Vec<String>;
    fn delete(&mut self) -> Result<(), String>;
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

/// What a request batch brought back: dump messages (type, payload) and acks (sequence,
/// errno).
type Exchange = (Vec<(u16, Vec<u8>)>, Vec<(u32, i32)>);

/// The device named `name` in the calling thread's network namespace.
pub struct RtnlDevice {
    name: String,
    kind: &'static str,
    sock: Option<NetlinkSocket>,
    seq: u32,
    buf: Vec<u8>,
}

impl RtnlDevice {
    /// A dummy device named `name`.
    pub fn new(name: &str) -> RtnlDevice {
        Self::of_kind(name, "dummy")
    }

    /// A device of another link kind (tests on kernels without the dummy driver).
    pub fn of_kind(name: &str, kind: &'static str) -> RtnlDevice {
        RtnlDevice {
            name: name.to_string(),
            kind,
            sock: None,
            seq: 0,
            buf: vec![0; 1 << 16],
        }
    }

    fn sock(&mut self) -> Result<&mut NetlinkSocket, String> {
        if self.sock.is_none() {
            let s = NetlinkSocket::open(libc::NETLINK_ROUTE, 1 << 20)
                .map_err(|e| format!("rtnetlink socket: {e}"))?;
            self.sock = Some(s);
        }
        Ok(self.sock.as_mut().expect("opened above"))
    }

    fn ifinfomsg(a: &mut Attrs, index: i32) {
        a.buf.extend_from_slice(&[0, 0]); // family, pad
        a.buf.extend_from_slice(&0u16.to_ne_bytes()); // type
        a.buf.extend_from_slice(&index.to_ne_bytes());
        a.buf.extend_from_slice(&0u32.to_ne_bytes()); // flags
        a.buf.extend_from_slice(&0u32.to_ne_bytes()); // change
    }

    /// Sends the messages in `a` and collects the acks (or dump payloads) until every
    /// request of `requests` is answered. Returns the dump messages' payloads and the
    /// errnos by request sequence.
    fn exchange(&mut self, a: &Attrs, first_seq: u32, requests: u32) -> Result<Exchange, String> {
        let mut buf = std::mem::take(&mut self.buf);
        let result = (|| {
            let sock = self.sock()?;
            sock.drain(&mut buf);
            sock.send(&a.buf)
                .map_err(|e| format!("rtnetlink send: {e}"))?;
            let mut dump = Vec::new();
            let mut acks = Vec::new();
            let mut done = 0;
            while done < requests {
                let n = sock
                    .recv(&mut buf, Duration::from_secs(5))
                    .map_err(|e| format!("rtnetlink receive: {e}"))?
                    .ok_or("rtnetlink: no answer within 5 s")?;
                for m in messages(&buf[..n]) {
                    let m = m.map_err(|e| format!("rtnetlink: {e}"))?;
                    if m.seq < first_seq || m.seq >= first_seq + requests {
                        continue;
                    }
                    match m.msg_type {
                        NLMSG_ERROR => {
                            let ack = m.ack().map_err(|e| format!("rtnetlink: {e}"))?;
                            acks.push((ack.seq, ack.errno));
                            done += 1;
                        }
                        NLMSG_DONE => {
                            acks.push((m.seq, m.done_errno()));
                            done += 1;
                        }
                        t => dump.push((t, m.payload.to_vec())),
                    }
                }
            }
            Ok((dump, acks))
        })();
        self.buf = buf;
        result
    }

    fn next_seq(&mut self, n: u32) -> u32 {
        let first = self.seq.wrapping_add(1).max(1);
        self.seq = first.wrapping_add(n);
        first
    }

    /// The device's interface index, if it exists.
    fn index(&mut self) -> Result<Option<i32>, String> {
        let seq = self.next_seq(1);
        let mut a = Attrs::new();
        let start = a.begin_message(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
        Self::ifinfomsg(&mut a, 0);
        a.str(IFLA_IFNAME, &self.name.clone());
        a.end_message(start);
        let (dump, acks) = self.exchange(&a, seq, 1)?;
        if let Some((_, payload)) = dump.iter().find(|(t, _)| *t == RTM_NEWLINK) {
            let index = payload
                .get(4..8)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or("rtnetlink: short ifinfomsg")?;
            return Ok(Some(index));
        }
        match acks.first() {
            Some((_, e)) if *e == libc::ENODEV => Ok(None),
            Some((_, 0)) | None => Ok(None),
            Some((_, e)) => Err(format!(
                "looking up {}: {}",
                self.name,
                std::io::Error::from_raw_os_error(*e)
            )),
        }
    }
}

fn addr_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

impl VipDevice for RtnlDevice {
    fn exists(&mut self) -> Result<bool, String> {
        Ok(self.index()?.is_some())
    }

    fn create(&mut self) -> Result<(), String> {
        let seq = self.next_seq(1);
        let mut a = Attrs::new();
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let start = a.begin_message(RTM_NEWLINK, flags, seq);
        Self::ifinfomsg(&mut a, 0);
        a.str(IFLA_IFNAME, &self.name.clone());
        a.begin(IFLA_LINKINFO);
        a.str(IFLA_INFO_KIND, self.kind);
        a.end();
        a.end_message(start);
        let (_, acks) = self.exchange(&a, seq, 1)?;
        match acks.first() {
            Some((_, 0)) | Some((_, libc::EEXIST)) | None => Ok(()),
            Some((_, e)) => Err(format!(
                "creating {}: {}",
                self.name,
                std::io::Error::from_raw_os_error(*e)
            )),
        }
    }

    fn addresses(&mut self, family: IpFamily) -> Result<BTreeSet<IpAddr>, String> {
        let index = self
            .index()?
            .ok_or_else(|| format!("{} does not exist", self.name))?;
        let af = match family {
            IpFamily::V4 => libc::AF_INET,
            IpFamily::V6 => libc::AF_INET6,
        } as u8;
        let seq = self.next_seq(1);
        let mut a = Attrs::new();
        let start = a.begin_message(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq);
        a.buf.extend_from_slice(&[af, 0, 0, 0]);
        a.buf.extend_from_slice(&0u32.to_ne_bytes());
        a.end_message(start);
        let (dump, acks) = self.exchange(&a, seq, 1)?;
        if let Some((_, e)) = acks.iter().find(|(_, e)| *e != 0) {
            return Err(format!(
                "listing addresses: {}",
                std::io::Error::from_raw_os_error(*e)
            ));
        }
        let mut out = BTreeSet::new();
        for (t, p) in dump.iter().filter(|(t, _)| *t == RTM_NEWADDR) {
            let _ = t;
            let Some(hdr) = p.get(..8) else { continue };
            if hdr[0] != af || i32::from_ne_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) != index {
                continue;
            }
            let mut local = None;
            let mut address = None;
            for (ty, v) in attrs(&p[8..]).flatten() {
                let ip = match v.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(v).expect("4 bytes"))),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(v).expect("16 bytes"))),
                    _ => None,
                };
                match ty {
                    IFA_LOCAL => local = ip,
                    IFA_ADDRESS => address = ip,
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address) {
                out.insert(ip);
            }
        }
        Ok(out)
    }

    fn change(&mut self, add: &[IpAddr], del: &[IpAddr]) -> Vec<String> {
        let index = match self.index() {
            Ok(Some(i)) => i,
            Ok(None) => return vec![format!("{} does not exist", self.name)],
            Err(e) => return vec![e],
        };
        let all: Vec<(bool, IpAddr)> = add
            .iter()
            .map(|ip| (true, *ip))
            .chain(del.iter().map(|ip| (false, *ip)))
            .collect();
        let mut failures = Vec::new();
        for chunk in all.chunks(512) {
            let first = self.next_seq(chunk.len() as u32);
            let mut a = Attrs::new();
            for (i, (is_add, ip)) in chunk.iter().enumerate() {
                let (ty, flags) = if *is_add {
                    (
                        RTM_NEWADDR,
                        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                    )
                } else {
                    (RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK)
                };
                let start = a.begin_message(ty, flags, first + i as u32);
                let (af, prefix, ifa_flags) = match ip {
                    IpAddr::V4(_) => (libc::AF_INET as u8, 32, 0),
                    IpAddr::V6(_) => (libc::AF_INET6 as u8, 128, IFA_F_NODAD),
                };
                a.buf.extend_from_slice(&[af, prefix, ifa_flags, 0]);
                a.buf.extend_from_slice(&index.to_ne_bytes());
                a.attr(IFA_LOCAL, &addr_bytes(ip));
                a.attr(IFA_ADDRESS, &addr_bytes(ip));
                a.end_message(start);
            }
            match self.exchange(&a, first, chunk.len() as u32) {
                Ok((_, acks)) => {
                    for (seq, e) in acks {
                        let (is_add, ip) = chunk[(seq - first) as usize];
                        let ok = e == 0
                            || (is_add && e == libc::EEXIST)
                            || (!is_add && e == libc::EADDRNOTAVAIL);
                        if !ok {
                            failures.push(format!(
                                "{} {ip} {} {}: {}",
                                if is_add { "adding" } else { "removing" },
                                if is_add { "to" } else { "from" },
                                self.name,
                                std::io::Error::from_raw_os_error(e)
                            ));
                        }
                    }
                }
                Err(e) => failures.push(e),
            }
        }
        failures
    }

    fn delete(&mut self) -> Result<(), String> {
        let Some(index) = self.index()? else {
            return Ok(());
        };
        let seq = self.next_seq(1);
        let mut a = Attrs::new();
        let start = a.begin_message(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
        Self::ifinfomsg(&mut a, index);
        a.end_message(start);
        let (_, acks) = self.exchange(&a, seq, 1)?;
        match acks.first() {
            Some((_, 0)) | Some((_, libc::ENODEV)) | None => Ok(()),
            Some((_, e)) => Err(format!(
                "deleting {}: {}",
                self.name,
                std::io::Error::from_raw_os_error(*e)
            )),
        }
    }
}

/// An in-memory device for tests.
#[derive(Debug, Default, Clone)]
pub struct FakeDevice {
    pub present: bool,
    pub addresses: BTreeSet<IpAddr>,
    /// Every change call: (added, removed).
    pub changes: Vec<(Vec<IpAddr>, Vec<IpAddr>)>,
}

impl VipDevice for std::sync::Arc<std::sync::Mutex<FakeDevice>> {
    fn exists(&mut self) -> Result<bool, String> {
        Ok(self.lock().expect("lock").present)
    }
    fn create(&mut self) -> Result<(), String> {
        self.lock().expect("lock").present = true;
        Ok(())
    }
    fn addresses(&mut self, family: IpFamily) -> Result<BTreeSet<IpAddr>, String> {
        let d = self.lock().expect("lock");
        if !d.present {
            return Err("kube-ipvs0 does not exist".into());
        }
        Ok(d.addresses
            .iter()
            .filter(|ip| IpFamily::of(ip) == family)
            .copied()
            .collect())
    }
    fn change(&mut self, add: &[IpAddr], del: &[IpAddr]) -> Vec<String> {
        let mut d = self.lock().expect("lock");
        d.changes.push((add.to_vec(), del.to_vec()));
        d.addresses.extend(add);
        for ip in del {
            d.addresses.remove(ip);
        }
        Vec::new()
    }
    fn delete(&mut self) -> Result<(), String> {
        let mut d = self.lock().expect("lock");
        d.present = false;
        d.addresses.clear();
        Ok(())
    }
}
