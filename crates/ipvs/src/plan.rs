//! Pure: the state the kernel should hold in IPVS mode, computed from the proxy state.
//! Virtual servers with their real servers, the addresses of `kube-ipvs0`, the members
//! of every ipset, and the LoadBalancer IPs the node itself must not reach.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use kp_model::{
    IpFamily, NamespacedName, NodeTopology, Protocol, ProxyState, ServicePortName,
    categorize_endpoints, port_facts,
};

use crate::ipset::{Set, SetContents, ip_port, ip_port_ip, ip_port_net};

/// `IP_VS_SVC_F_PERSISTENT`: ClientIP affinity.
pub const FLAG_PERSISTENT: u32 = 0x1;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every service it lists; not ours to compare.
pub const FLAG_HASHED: u32 = 0x2;
/// `IP_VS_SVC_F_SCHED2`, which the mh scheduler reads as "hash the source port too"
/// (upstream's FlagSourceHash).
pub const FLAG_SOURCE_PORT_HASH: u32 = 0x10;

/// A virtual server: address, protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VsKey {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for VsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.protocol.upper()
        )
    }
}

/// What a virtual server should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsSpec {
    pub scheduler: String,
    pub flags: u32,
    /// Persistence timeout in seconds (ClientIP affinity), 0 without.
    pub timeout: u32,
    /// Real servers, all at weight 1 (masquerading).
    pub real_servers: BTreeSet<SocketAddr>,
    /// The service port it serves (for logs).
    pub owner: ServicePortName,
}

/// The inputs of [`plan`] besides the proxy state.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    pub family: IpFamily,
    pub scheduler: &'a str,
    pub topology: &'a NodeTopology,
    /// The Node object's addresses: a LoadBalancer source range holding one of them lets
    /// the node reach that VIP.
    pub node_ips: &'a [IpAddr],
    /// Addresses on the node's other interfaces: an externalIP or LB IP already there is
    /// not bound to kube-ipvs0.
    pub node_addresses: &'a BTreeSet<IpAddr>,
    /// Addresses that get a virtual server per NodePort.
    pub node_port_ips: &'a [IpAddr],
}

/// The desired IPVS-mode state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub virtual_servers: BTreeMap<VsKey, VsSpec>,
    /// Addresses kube-ipvs0 should hold.
    pub bound: BTreeSet<IpAddr>,
    pub sets: SetContents,
    /// LB VIPs with source ranges that do not hold the node: the node's own connections
    /// to them are dropped (KUBE-IPVS-OUT-FILTER).
    pub lb_no_node_access: BTreeSet<VsKey>,
    pub no_local_endpoints_internal: usize,
    pub no_local_endpoints_external: usize,
    pub health_checks: BTreeMap<NamespacedName, (u16, usize)>,
    pub warnings: Vec<String>,
}

impl Plan {
    fn add(&mut self, set: Set, member: String) {
        self.sets.entry(set).or_default().insert(member);
    }
}

/// Computes the desired state.
pub fn plan(state: &ProxyState, input: &PlanInput<'_>) -> Plan {
    let mut out = Plan::default();
    for set in Set::ALL {
        out.sets.entry(set).or_default();
    }
    let family = input.family;
    let in_family = |ip: &IpAddr| IpFamily::of(ip) == family;

    let mut claims = kp_model::NodePortClaims::default();
    let mut node_port_losers = BTreeSet::new();
    for svc in state.services.values() {
        if !claims
            .claim(&svc.name.service, [&**svc], &mut out.warnings)
            .is_empty()
        {
            node_port_losers.insert(svc.name.clone());
        }
    }

    for svc in state.services.values() {
        if !in_family(&svc.cluster_ip) {
            continue;
        }
        let eps = state.endpoints_of(&svc.name);
        let cat = categorize_endpoints(svc, eps, input.topology);
        let facts = port_facts(svc, eps, &cat);
        out.no_local_endpoints_internal += facts.no_local_internal as usize;
        out.no_local_endpoints_external += facts.no_local_external as usize;
        if let Some(hc) = facts.health_check {
            out.health_checks.insert(svc.name.service.clone(), hc);
            out.add(Set::HealthCheckNodePort, hc.0.to_string());
        }
        let proto = svc.protocol;
        let (flags, timeout) = {
            let mut flags = 0;
            if input.scheduler == "mh" {
                flags |= FLAG_SOURCE_PORT_HASH;
            }
            match svc.session_affinity_timeout {
                Some(t) => (flags | FLAG_PERSISTENT, t),
                None => (flags, 0),
            }
        };
        let reals = |eps: &[kp_model::Endpoint]| -> BTreeSet<SocketAddr> {
            eps.iter().map(|e| SocketAddr::new(e.ip, e.port)).collect()
        };
        let internal = reals(cat.internal(svc));
        // externalTrafficPolicy Local without a local endpoint: the node's pods and the
        // node itself still reach the service through the cluster-wide endpoints (the
        // iptables mode's short-circuit); other clients are dropped in KUBE-IPVS-FILTER.
        let no_local_external = svc.external_policy_local && cat.local.is_empty() && cat.has_any;
        let external = if no_local_external {
            reals(&categorize_cluster(svc, eps, input.topology))
        } else {
            reals(cat.external(svc))
        };
        let add_vs = |out: &mut Plan, addr: IpAddr, port: u16, reals: &BTreeSet<SocketAddr>| {
            out.virtual_servers.insert(
                VsKey {
                    addr,
                    protocol: proto,
                    port,
                },
                VsSpec {
                    scheduler: input.scheduler.to_string(),
                    flags,
                    timeout,
                    real_servers: reals.clone(),
                    owner: svc.name.clone(),
                },
            );
        };

        // Hairpin: an endpoint on this node reaching its own service is masqueraded.
        for e in eps.iter().filter(|e| e.is_local && in_family(&e.ip)) {
            out.add(Set::LoopBack, ip_port_ip(e.ip, proto, e.port, e.ip));
        }

        out.add(Set::ClusterIp, ip_port(svc.cluster_ip, proto, svc.port));
        if facts.no_local_internal {
            out.add(
                Set::NoLocalInternal,
                ip_port(svc.cluster_ip, proto, svc.port),
            );
        }
        add_vs(&mut out, svc.cluster_ip, svc.port, &internal);
        out.bound.insert(svc.cluster_ip);

        for &ip in svc.external_ips.iter().filter(|ip| in_family(ip)) {
            let member = ip_port(ip, proto, svc.port);
            if no_local_external {
                out.add(Set::NoLocalEndpoints, member.clone());
            }
            if svc.external_policy_local {
                out.add(Set::ExternalIpLocal, member);
            } else {
                out.add(Set::ExternalIp, member);
            }
            add_vs(&mut out, ip, svc.port, &external);
            if !input.node_addresses.contains(&ip) {
                out.bound.insert(ip);
            }
        }

        for &vip in svc.load_balancer_vips.iter().filter(|ip| in_family(ip)) {
            let member = ip_port(vip, proto, svc.port);
            out.add(Set::LoadBalancer, member.clone());
            if no_local_external {
                out.add(Set::NoLocalEndpoints, member.clone());
            }
            if svc.external_policy_local {
                out.add(Set::LoadBalancerLocal, member.clone());
            }
            let ranges: Vec<_> = svc
                .load_balancer_source_ranges
                .iter()
                .filter(|r| in_family(&r.addr()))
                .collect();
            if !ranges.is_empty() {
                out.add(Set::LoadBalancerFw, member);
                let mut allow_node = false;
                for r in ranges {
                    out.add(
                        Set::LoadBalancerSourceCidr,
                        ip_port_net(vip, proto, svc.port, *r),
                    );
                    allow_node |= input.node_ips.iter().any(|n| r.contains(n));
                }
                if allow_node {
                    out.add(
                        Set::LoadBalancerSourceIp,
                        ip_port_ip(vip, proto, svc.port, vip),
                    );
                } else {
                    out.lb_no_node_access.insert(VsKey {
                        addr: vip,
                        protocol: proto,
                        port: svc.port,
                    });
                }
            }
            add_vs(&mut out, vip, svc.port, &external);
            if !input.node_addresses.contains(&vip) {
                out.bound.insert(vip);
            }
        }

        if let Some(np) = svc.node_port
            && !node_port_losers.contains(&svc.name)
            && !input.node_port_ips.is_empty()
        {
            let local = svc.external_policy_local;
            match proto {
                Protocol::Tcp | Protocol::Udp => {
                    let (all, local_set) = if proto == Protocol::Tcp {
                        (Set::NodePortTcp, Set::NodePortLocalTcp)
                    } else {
                        (Set::NodePortUdp, Set::NodePortLocalUdp)
                    };
                    out.add(all, np.to_string());
                    if local {
                        out.add(local_set, np.to_string());
                    }
                }
                Protocol::Sctp => {
                    for &ip in input.node_port_ips {
                        out.add(Set::NodePortSctp, ip_port(ip, proto, np));
                        if local {
                            out.add(Set::NodePortLocalSctp, ip_port(ip, proto, np));
                        }
                    }
                }
            }
            for &ip in input.node_port_ips {
                if no_local_external {
                    out.add(Set::NoLocalEndpoints, ip_port(ip, proto, np));
                }
                add_vs(&mut out, ip, np, &external);
            }
        }
    }
    let bound: BTreeSet<String> = out.bound.iter().map(|ip| ip.to_string()).collect();
    out.sets.insert(Set::IpvsIps, bound);
    out
}

/// The cluster-wide endpoint set of `svc`, even when none of its paths uses it.
fn categorize_cluster(
    svc: &kp_model::ServicePort,
    eps: &[kp_model::Endpoint],
    topology: &NodeTopology,
) -> Vec<kp_model::Endpoint> {
    let mut cluster_view = svc.clone();
    cluster_view.internal_policy_local = false;
    cluster_view.external_policy_local = false;
    categorize_endpoints(&cluster_view, eps, topology).cluster
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
