//! The kernel side of IPVS mode, behind [`IpvsKernel`] so the proxier's diff logic is
//! tested without IPVS (the host kernel of CI has none; the guest runs the real one).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::plan::VsKey;

/// A virtual server as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelVs {
    pub key: VsKey,
    pub scheduler: String,
    pub flags: u32,
    pub timeout: u32,
}

/// A real server as the kernel lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRs {
    pub addr: SocketAddr,
    pub weight: i32,
    pub active_conns: u32,
    pub inactive_conns: u32,
}

/// One change to IPVS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddVs(KernelVs),
    UpdateVs(KernelVs),
    DelVs(VsKey),
    /// Masquerading real server with a weight.
    AddRs(VsKey, SocketAddr, i32),
    UpdateRs(VsKey, SocketAddr, i32),
    DelRs(VsKey, SocketAddr),
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::AddVs(v) => write!(f, "add virtual server {} ({})", v.key, v.scheduler),
            Op::UpdateVs(v) => write!(f, "update virtual server {} ({})", v.key, v.scheduler),
            Op::DelVs(k) => write!(f, "delete virtual server {k}"),
            Op::AddRs(k, rs, w) => write!(f, "add real server {rs} weight {w} to {k}"),
            Op::UpdateRs(k, rs, w) => write!(f, "set weight {w} of real server {rs} of {k}"),
            Op::DelRs(k, rs) => write!(f, "delete real server {rs} of {k}"),
        }
    }
}

/// IPVS as the proxier needs it.
pub trait IpvsKernel: Send {
    /// Every virtual server (all families; fwmark services are left out).
    fn virtual_servers(&mut self) -> Result<Vec<KernelVs>, String>;
    fn real_servers(&mut self, vs: &VsKey) -> Result<Vec<KernelRs>, String>;
    /// Applies `ops` in order (many per round trip); returns the failures, each with
    /// the index of its op and the kernel's message.
    fn apply(&mut self, ops: &[Op]) -> Vec<(usize, String)>;
    /// `ipvsadm --set`: 0 leaves a timeout as it is.
    fn set_timeouts(&mut self, tcp: u32, tcp_fin: u32, udp: u32) -> Result<(), String>;
}

/// An in-memory IPVS for tests.
#[derive(Debug, Default, Clone)]
pub struct FakeIpvs {
    pub services: BTreeMap<VsKey, (KernelVs, BTreeMap<SocketAddr, KernelRs>)>,
    pub applied: Vec<Op>,
    /// Ops whose Display contains this string fail.
    pub fail_matching: Option<String>,
    pub timeouts: (u32, u32, u32),
}

impl IpvsKernel for FakeIpvs {
    fn virtual_servers(&mut self) -> Result<Vec<KernelVs>, String> {
        Ok(self.services.values().map(|(v, _)| v.clone()).collect())
    }

    fn real_servers(&mut self, vs: &VsKey) -> Result<Vec<KernelRs>, String> {
        self.services
            .get(vs)
            .map(|(_, r)| r.values().copied().collect())
            .ok_or_else(|| "No such process".to_string())
    }

    fn apply(&mut self, ops: &[Op]) -> Vec<(usize, String)> {
        let mut failed = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if let Some(m) = &self.fail_matching
                && op.to_string().contains(m.as_str())
            {
                failed.push((i, "Operation not permitted".to_string()));
                continue;
            }
            self.applied.push(op.clone());
            let r = match op {
                Op::AddVs(v) => match self.services.entry(v.key) {
                    std::collections::btree_map::Entry::Occupied(_) => Err("File exists"),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert((v.clone(), BTreeMap::new()));
                        Ok(())
                    }
                },
                Op::UpdateVs(v) => match self.services.get_mut(&v.key) {
                    Some(s) => {
                        s.0 = v.clone();
                        Ok(())
                    }
                    None => Err("No such process"),
                },
                Op::DelVs(k) => self.services.remove(k).map(|_| ()).ok_or("No such process"),
                Op::AddRs(k, rs, w) => match self.services.get_mut(k) {
                    Some(s) if s.1.contains_key(rs) => Err("File exists"),
                    Some(s) => {
                        s.1.insert(
                            *rs,
                            KernelRs {
                                addr: *rs,
                                weight: *w,
                                active_conns: 0,
                                inactive_conns: 0,
                            },
                        );
                        Ok(())
                    }
                    None => Err("No such process"),
                },
                Op::UpdateRs(k, rs, w) => {
                    match self.services.get_mut(k).and_then(|s| s.1.get_mut(rs)) {
                        Some(r) => {
                            r.weight = *w;
                            Ok(())
                        }
                        None => Err("No such file or directory"),
                    }
                }
                Op::DelRs(k, rs) => match self.services.get_mut(k).and_then(|s| s.1.remove(rs)) {
                    Some(_) => Ok(()),
                    None => Err("No such file or directory"),
                },
            };
            if let Err(e) = r {
                failed.push((i, e.to_string()));
            }
        }
        failed
    }

    fn set_timeouts(&mut self, tcp: u32, tcp_fin: u32, udp: u32) -> Result<(), String> {
        self.timeouts = (tcp, tcp_fin, udp);
        Ok(())
    }
}
