//! What the nftables proxier remembers of the kernel: per service the inputs its
//! objects were rendered from (not the text: rendering is pure, so a partial sync
//! re-renders the old objects to diff), and the reference counts of shared objects.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use kp_model::{
    Endpoint, NamespacedName, NodeTopology, Protocol, ProxyState, ServicePort, ServicePortName,
};

use crate::render::*;

/// What the kernel holds, in memory.
#[derive(Default)]
pub(crate) struct Memory {
    /// Per service: the inputs it was rendered from (shared with the sync loop's state),
    /// re-rendered when a partial sync needs the old objects.
    pub(crate) current: HashMap<NamespacedName, Kept>,
    /// How many services use each `hairpin-endpoints` element.
    pub(crate) hairpin_refs: HairpinRefs,
    /// How many services use each shared picker chain.
    pub(crate) picker_refs: HashMap<Picker, u32>,
    /// Sums of every service's report share (health_check unused here), and the services
    /// needing a healthCheckNodePort: kept as services come and go, not recounted.
    pub(crate) totals: ServiceReport,
    pub(crate) health_checks: BTreeMap<NamespacedName, (u16, usize)>,
}

impl Memory {
    /// Drops what the kernel holds for `svc` (`old`, its objects), with its shares of the
    /// shared elements, pickers and report totals.
    pub(crate) fn forget(&mut self, svc: &NamespacedName, old: &ServiceObjects) {
        self.current.remove(svc);
        for ip in &old.hairpin {
            self.hairpin_refs.release(*ip);
        }
        for p in &old.pickers {
            if let Some(n) = self.picker_refs.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.picker_refs.remove(p);
                }
            }
        }
        self.totals.no_local_endpoints_internal -= old.report.no_local_endpoints_internal;
        self.totals.no_local_endpoints_external -= old.report.no_local_endpoints_external;
        self.health_checks.remove(svc);
    }

    /// Records `svc` (`o`, its objects; `kept`, how to render them again). Calls `first`
    /// for each hairpin element no other service had.
    pub(crate) fn remember(
        &mut self,
        svc: NamespacedName,
        o: &ServiceObjects,
        kept: Kept,
        mut first: impl FnMut(IpAddr),
    ) {
        for ip in &o.hairpin {
            if self.hairpin_refs.take(*ip) {
                first(*ip);
            }
        }
        for p in &o.pickers {
            *self.picker_refs.entry(*p).or_default() += 1;
        }
        self.totals.no_local_endpoints_internal += o.report.no_local_endpoints_internal;
        self.totals.no_local_endpoints_external += o.report.no_local_endpoints_external;
        if let Some(hc) = o.report.health_check {
            self.health_checks.insert(svc.clone(), hc);
        }
        self.current.insert(svc, kept);
    }
}

/// Services per `hairpin-endpoints` element, one map per address family (a v4 entry is
/// 8 bytes instead of an `IpAddr`'s 24).
#[derive(Default)]
pub(crate) struct HairpinRefs {
    pub(crate) v4: HashMap<std::net::Ipv4Addr, u32>,
    pub(crate) v6: HashMap<std::net::Ipv6Addr, u32>,
}

impl HairpinRefs {
    pub(crate) fn get(&self, ip: IpAddr) -> u32 {
        match ip {
            IpAddr::V4(a) => self.v4.get(&a),
            IpAddr::V6(a) => self.v6.get(&a),
        }
        .copied()
        .unwrap_or(0)
    }

    /// One more user; true when it is the first.
    pub(crate) fn take(&mut self, ip: IpAddr) -> bool {
        let n = match ip {
            IpAddr::V4(a) => self.v4.entry(a).or_default(),
            IpAddr::V6(a) => self.v6.entry(a).or_default(),
        };
        *n += 1;
        *n == 1
    }

    pub(crate) fn release(&mut self, ip: IpAddr) {
        fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u32>, k: K) {
            if let Some(n) = m.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&k);
                }
            }
        }
        match ip {
            IpAddr::V4(a) => dec(&mut self.v4, a),
            IpAddr::V6(a) => dec(&mut self.v6, a),
        }
    }
}

/// What a service's rendering depends on besides the config: its ports and endpoints
/// (the state's own `Arc`s, so keeping them costs a pointer), the node, and the NodePorts
/// it lost to another service. Rendering is pure, so these give back exactly the objects
/// the kernel holds; keeping them instead of the rendered text is ~50x smaller.
pub(crate) struct Kept {
    pub(crate) ports: Box<[KeptPort]>,
    pub(crate) node: Arc<NodeView>,
    /// NodePorts whose rules were left out because another service claimed them first.
    pub(crate) skipped_node_ports: Box<[(Protocol, u16)]>,
}

pub(crate) type KeptPort = (Arc<ServicePort>, Option<Arc<Vec<Endpoint>>>);

/// The parts of the node that rendering reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct NodeView {
    pub(crate) topology: NodeTopology,
    pub(crate) node_ips: Vec<IpAddr>,
}

/// One changed service of a partial sync: the objects it had and has, and what to keep.
pub(crate) struct Update {
    pub(crate) svc: NamespacedName,
    pub(crate) old: Option<ServiceObjects>,
    pub(crate) new: ServiceObjects,
    pub(crate) kept: Kept,
}

/// A service's ports with their endpoints, as shared pointers into `state`.
pub(crate) fn ports_of(state: &ProxyState, svc: &NamespacedName) -> Box<[KeptPort]> {
    let lo = ServicePortName {
        service: svc.clone(),
        port: String::new(),
        protocol: Protocol::Tcp,
    };
    state
        .services
        .range(lo..)
        .take_while(|(k, _)| k.service == *svc)
        .map(|(k, v)| (v.clone(), state.endpoints.get(k).cloned()))
        .collect()
}

/// `hairpin-endpoints` key of an endpoint IP.
pub(crate) fn hairpin_key(ip: std::net::IpAddr) -> String {
    format!("{ip} . {ip}")
}

pub(crate) fn is_endpoint_chain(name: &str) -> bool {
    name.starts_with("endpoint-")
}
