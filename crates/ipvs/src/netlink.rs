//! [`IpvsKernel`] over the kernel's IPVS generic netlink family (kp-ipvsnl).

use kp_ipvsnl::{IpvsClient, Op as NlOp, RealServer, ServiceKey, Timeouts, VirtualServer};
use kp_model::Protocol;

use crate::kernel::{IpvsKernel, KernelRs, KernelVs, Op};
use crate::plan::VsKey;

/// The real IPVS of the calling thread's network namespace.
pub struct NetlinkIpvs(IpvsClient);

/// Opens IPVS; the error says plainly when the kernel has none.
pub fn open_netlink() -> Result<Box<dyn IpvsKernel>, String> {
    IpvsClient::open()
        .map(|c| Box::new(NetlinkIpvs(c)) as Box<dyn IpvsKernel>)
        .map_err(|e| e.to_string())
}

fn nl_key(k: &VsKey) -> ServiceKey {
    let protocol = match k.protocol {
        Protocol::Tcp => kp_ipvsnl::Protocol::Tcp,
        Protocol::Udp => kp_ipvsnl::Protocol::Udp,
        Protocol::Sctp => kp_ipvsnl::Protocol::Sctp,
    };
    ServiceKey::new(protocol, k.addr, k.port)
}

fn our_key(k: &ServiceKey) -> Option<VsKey> {
    let protocol = match k.protocol {
        kp_ipvsnl::Protocol::Tcp => Protocol::Tcp,
        kp_ipvsnl::Protocol::Udp => Protocol::Udp,
        kp_ipvsnl::Protocol::Sctp => Protocol::Sctp,
        kp_ipvsnl::Protocol::Other(_) => return None,
    };
    Some(VsKey {
        addr: k.addr,
        protocol,
        port: k.port,
    })
}

fn nl_vs(v: &KernelVs) -> VirtualServer {
    let mut vs = VirtualServer::new(nl_key(&v.key), &v.scheduler);
    vs.flags = v.flags & !crate::plan::FLAG_HASHED;
    vs.timeout = v.timeout;
    vs
}

impl IpvsKernel for NetlinkIpvs {
    fn virtual_servers(&mut self) -> Result<Vec<KernelVs>, String> {
        let services = self.0.services().map_err(|e| e.to_string())?;
        Ok(services
            .into_iter()
            .filter_map(|s| s.into_virtual())
            .filter_map(|v| {
                Some(KernelVs {
                    key: our_key(&v.key)?,
                    scheduler: v.scheduler,
                    flags: v.flags,
                    timeout: v.timeout,
                })
            })
            .collect())
    }

    fn real_servers(&mut self, vs: &VsKey) -> Result<Vec<KernelRs>, String> {
        let reals = self
            .0
            .real_servers(&nl_key(vs))
            .map_err(|e| e.to_string())?;
        Ok(reals
            .into_iter()
            .map(|r| KernelRs {
                addr: r.socket_addr(),
                weight: r.weight,
                active_conns: r.active_conns,
                inactive_conns: r.inactive_conns,
            })
            .collect())
    }

    fn apply(&mut self, ops: &[Op]) -> Vec<(usize, String)> {
        // The netlink ops borrow their objects: build them all first.
        enum Owned {
            Vs(VirtualServer),
            Key(ServiceKey),
            Rs(ServiceKey, RealServer),
        }
        let owned: Vec<Owned> = ops
            .iter()
            .map(|op| match op {
                Op::AddVs(v) | Op::UpdateVs(v) => Owned::Vs(nl_vs(v)),
                Op::DelVs(k) => Owned::Key(nl_key(k)),
                Op::AddRs(k, rs, w) | Op::UpdateRs(k, rs, w) => {
                    Owned::Rs(nl_key(k), RealServer::new(rs.ip(), rs.port(), *w))
                }
                Op::DelRs(k, rs) => Owned::Rs(nl_key(k), RealServer::new(rs.ip(), rs.port(), 0)),
            })
            .collect();
        let nl_ops: Vec<NlOp<'_>> = ops
            .iter()
            .zip(&owned)
            .map(|(op, o)| match (op, o) {
                (Op::AddVs(_), Owned::Vs(v)) => NlOp::AddService(v),
                (Op::UpdateVs(_), Owned::Vs(v)) => NlOp::UpdateService(v),
                (Op::DelVs(_), Owned::Key(k)) => NlOp::DeleteService(k),
                (Op::AddRs(..), Owned::Rs(k, r)) => NlOp::AddRealServer(k, r),
                (Op::UpdateRs(..), Owned::Rs(k, r)) => NlOp::UpdateRealServer(k, r),
                (Op::DelRs(..), Owned::Rs(k, r)) => NlOp::DeleteRealServer(k, r),
                _ => unreachable!("built from the same op"),
            })
            .collect();
        match self.0.apply(&nl_ops) {
            Ok(failures) => failures
                .into_iter()
                .map(|(i, e)| (i, e.to_string()))
                .collect(),
            // The socket failed: the outcome of every op is unknown; report them all.
            Err(e) => (0..ops.len()).map(|i| (i, e.to_string())).collect(),
        }
    }

    fn set_timeouts(&mut self, tcp: u32, tcp_fin: u32, udp: u32) -> Result<(), String> {
        self.0
            .set_timeouts(&Timeouts { tcp, tcp_fin, udp })
            .map_err(|e| e.to_string())
    }
}
