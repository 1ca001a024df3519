//! The mode-neutral dataplane settings: each backend takes its part.

use std::net::IpAddr;

use kp_model::IpFamily;

use crate::{LocalDetector, NodePortAddresses};

/// Settings of one dataplane for one IP family, whatever the mode.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    pub family: IpFamily,
    /// Bit of the packet mark that asks for masquerading (`--iptables-masquerade-bit`,
    /// `nftables.masqueradeBit`).
    pub masquerade_bit: u32,
    pub masquerade_all: bool,
    pub local_detector: LocalDetector,
    pub node_port_addresses: NodePortAddresses,
    /// Node addresses inside `node_port_addresses` at start (unused when it matches all).
    pub node_port_ips: Vec<IpAddr>,
    /// `--iptables-localhost-nodeports` (IPv4 only; iptables mode).
    pub localhost_node_ports: bool,
    /// Omit the conntrack INVALID drop (nf_conntrack_tcp_be_liberal is set).
    pub tcp_be_liberal: bool,
    /// `--random-fully` on masquerade rules.
    pub random_fully: bool,
    /// IPVS mode's own settings.
    pub ipvs: IpvsOptions,
}

/// IPVS mode's settings (upstream's `ipvs` section, plus the drain bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsOptions {
    pub scheduler: String,
    /// Virtual servers in these CIDRs are never deleted (someone else's).
    pub exclude_cidrs: Vec<ipnet::IpNet>,
    pub strict_arp: bool,
    /// `ipvsadm --set` timeouts in seconds; 0 leaves the kernel's.
    pub tcp_timeout: u32,
    pub tcp_fin_timeout: u32,
    pub udp_timeout: u32,
    /// A removed TCP real server drains at weight 0 until its connections end, or this
    /// long at most (upstream waits without bound).
    pub drain_timeout: std::time::Duration,
}

impl Default for IpvsOptions {
    fn default() -> Self {
        IpvsOptions {
            scheduler: "rr".into(),
            exclude_cidrs: Vec::new(),
            strict_arp: false,
            tcp_timeout: 0,
            tcp_fin_timeout: 0,
            udp_timeout: 0,
            drain_timeout: std::time::Duration::from_secs(600),
        }
    }
}

impl DataplaneConfig {
    /// What a mode needs to find and remove its objects (`--cleanup`, a mode switch):
    /// the family, everything else at its default.
    pub fn for_cleanup(family: IpFamily) -> Self {
        DataplaneConfig {
            family,
            masquerade_bit: 14,
            masquerade_all: false,
            local_detector: LocalDetector::None,
            node_port_addresses: NodePortAddresses::default(),
            node_port_ips: Vec::new(),
            localhost_node_ports: false,
            tcp_be_liberal: false,
            random_fully: true,
            ipvs: IpvsOptions::default(),
        }
    }

    /// Localhost NodePorts are served (IPv4 only, and only if 127/8 is in scope).
    pub fn localhost_node_ports_active(&self) -> bool {
        self.family == IpFamily::V4
            && self.localhost_node_ports
            && self.node_port_addresses.contains_ipv4_loopback()
    }
}
