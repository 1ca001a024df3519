//! The pure part: which UDP conntrack entries are stale, given what the proxy serves.
//!
//! Follows upstream's `pkg/proxy/conntrack/cleanup.go` (1.32+): an entry is stale when
//! its original destination is a UDP service frontend (service IP and port, or any
//! address with a NodePort as destination port) and its reply source (the DNAT target)
//! is not the IP of one of that service's serving endpoints. A frontend whose service
//! has no serving endpoints is left alone (nothing would be gained: the rules reject).
//! An entry that was never DNATed (the reply source is the service IP itself) falls out
//! of the same rule, which is what clears the "0 -> N endpoints" state.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use kp_model::{IpFamily, Protocol, ProxyState};

/// IANA protocol number of UDP, as conntrack reports it.
pub const IPPROTO_UDP: u8 = 17;

/// One conntrack entry, reduced to what the cleanup needs and what a delete must name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlowEntry {
    /// Layer-3 family of the entry (both tuples share it).
    pub family: IpFamily,
    /// Layer-4 protocol number (17 for UDP).
    pub protocol: u8,
    /// Original direction: client address.
    pub orig_src: IpAddr,
    /// Original direction: address the client sent to (service IP, node IP, ...).
    pub orig_dst: IpAddr,
    pub orig_sport: u16,
    pub orig_dport: u16,
    /// Reply direction: who answers, i.e. the DNAT destination (the endpoint).
    pub reply_src: IpAddr,
    /// Reply direction: where answers go (the client, or the SNAT address).
    pub reply_dst: IpAddr,
    pub reply_sport: u16,
    pub reply_dport: u16,
    /// Conntrack zone (`CTA_ZONE`); 0 is the default zone.
    pub zone: u16,
    /// Kernel entry id (`CTA_ID`); sent with the delete so that, usually, a recreated
    /// entry with the same tuple is not removed by mistake. Not a guarantee: the id
    /// hashes the object's address, which the allocator may reuse.
    pub id: Option<u32>,
    /// `CTA_STATUS` bits (IPS_*), for diagnostics.
    pub status: u32,
}

impl FlowEntry {
    /// A UDP entry whose reply goes back to the client unchanged (no SNAT); the
    /// constructor tests and callers without SNAT need.
    pub fn udp(
        orig_src: IpAddr,
        orig_sport: u16,
        orig_dst: IpAddr,
        orig_dport: u16,
        reply_src: IpAddr,
        reply_sport: u16,
    ) -> FlowEntry {
        FlowEntry {
            family: IpFamily::of(&orig_dst),
            protocol: IPPROTO_UDP,
            orig_src,
            orig_dst,
            orig_sport,
            orig_dport,
            reply_src,
            reply_dst: orig_src,
            reply_sport,
            reply_dport: orig_sport,
            zone: 0,
            id: None,
            status: 0,
        }
    }

    /// Whether the destination was rewritten (DNAT): the reply does not come from the
    /// address and port the client sent to.
    pub fn is_dnat(&self) -> bool {
        self.reply_src != self.orig_dst || self.reply_sport != self.orig_dport
    }
}

impl std::fmt::Display for FlowEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "proto={} src={} dst={} sport={} dport={} reply-src={} reply-dst={} reply-sport={} reply-dport={}",
            self.protocol,
            self.orig_src,
            self.orig_dst,
            self.orig_sport,
            self.orig_dport,
            self.reply_src,
            self.reply_dst,
            self.reply_sport,
            self.reply_dport,
        )?;
        if self.zone != 0 {
            write!(f, " zone={}", self.zone)?;
        }
        Ok(())
    }
}

/// What the proxy currently serves over UDP: per frontend (service IP and port, or
/// NodePort), the IPs of the serving endpoints. Frontends of services without serving
/// endpoints are not recorded (upstream leaves their entries alone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpServiceTable {
    service_ips: HashMap<(IpAddr, u16), HashSet<IpAddr>>,
    node_ports: HashMap<u16, HashSet<IpAddr>>,
    node_addresses: Option<BTreeSet<IpAddr>>,
}

impl UdpServiceTable {
    /// An empty table: nothing is stale.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a service frontend (cluster IP, external IP or load-balancer VIP) and
    /// the IPs of its serving endpoints. Endpoints are matched by IP only, as upstream
    /// does. Adding the same frontend twice merges the endpoint sets.
    pub fn add_service_ip(
        &mut self,
        ip: IpAddr,
        port: u16,
        endpoints: impl IntoIterator<Item = IpAddr>,
    ) -> &mut Self {
        let endpoints: HashSet<IpAddr> = endpoints.into_iter().collect();
        if !endpoints.is_empty() {
            self.service_ips
                .entry((ip, port))
                .or_default()
                .extend(endpoints);
        }
        self
    }

    /// Records a NodePort and the IPs of its service's serving endpoints.
    pub fn add_node_port(
        &mut self,
        port: u16,
        endpoints: impl IntoIterator<Item = IpAddr>,
    ) -> &mut Self {
        let endpoints: HashSet<IpAddr> = endpoints.into_iter().collect();
        if !endpoints.is_empty() {
            self.node_ports.entry(port).or_default().extend(endpoints);
        }
        self
    }

    /// Restricts the NodePort rule to entries sent to one of `addresses` (the node's
    /// NodePort addresses). Upstream matches a NodePort on any destination address,
    /// which is also the default here.
    pub fn restrict_node_ports_to(
        &mut self,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> &mut Self {
        self.node_addresses = Some(addresses.into_iter().collect());
        self
    }

    /// The table for the UDP service ports of `state` in `family`: cluster IP, external
    /// IPs and load-balancer VIPs, plus the NodePort, each mapped to the endpoints that
    /// are serving. Traffic policies, topology and terminating state are deliberately
    /// ignored (as upstream): a change of policy must not cut existing flows.
    pub fn from_state(state: &ProxyState, family: IpFamily) -> Self {
        let mut table = Self::new();
        for (name, svc) in &state.services {
            if svc.protocol != Protocol::Udp {
                continue;
            }
            let endpoints: Vec<IpAddr> = state
                .endpoints_of(name)
                .iter()
                .filter(|ep| ep.serving && IpFamily::of(&ep.ip) == family)
                .map(|ep| ep.ip)
                .collect();
            let frontends = std::iter::once(&svc.cluster_ip)
                .chain(&svc.external_ips)
                .chain(&svc.load_balancer_vips)
                .filter(|ip| IpFamily::of(ip) == family);
            for ip in frontends {
                table.add_service_ip(*ip, svc.port, endpoints.iter().copied());
            }
            if let Some(node_port) = svc.node_port.filter(|port| *port != 0) {
                table.add_node_port(node_port, endpoints.iter().copied());
            }
        }
        table
    }

    /// True when no frontend is recorded (a reconcile would delete nothing).
    pub fn is_empty(&self) -> bool {
        self.service_ips.is_empty() && self.node_ports.is_empty()
    }

    /// Whether `entry` points at a served UDP frontend but not at one of its serving
    /// endpoints.
    pub fn is_stale(&self, entry: &FlowEntry) -> bool {
        if entry.protocol != IPPROTO_UDP {
            return false;
        }
        // A service IP:port decides alone. Upstream also applies the NodePort rule to
        // such an entry, which would delete healthy flows of a service whose port
        // happens to equal another service's NodePort.
        if let Some(endpoints) = self.service_ips.get(&(entry.orig_dst, entry.orig_dport)) {
            return !endpoints.contains(&entry.reply_src);
        }
        let Some(endpoints) = self.node_ports.get(&entry.orig_dport) else {
            return false;
        };
        if let Some(addresses) = &self.node_addresses
            && !addresses.contains(&entry.orig_dst)
        {
            return false;
        }
        !endpoints.contains(&entry.reply_src)
    }
}

/// The entries of `entries` to delete: UDP entries of `table`'s family whose frontend
/// is served and whose DNAT target is not a serving endpoint (see the module docs).
pub fn plan_deletions(entries: &[FlowEntry], table: &UdpServiceTable) -> Vec<FlowEntry> {
    entries
        .iter()
        .filter(|entry| table.is_stale(entry))
        .cloned()
        .collect()
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
