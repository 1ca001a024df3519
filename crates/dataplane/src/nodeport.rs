//! `--nodeport-addresses`: which local addresses accept NodePort traffic.

use std::net::IpAddr;

use ipnet::IpNet;
use kp_model::IpFamily;

/// The node-port address filter for one family. Empty CIDR list means every local address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePortAddresses {
    pub cidrs: Vec<IpNet>,
}

impl NodePortAddresses {
    /// Keeps the CIDRs of `family`. `primary_ips` replaces the `primary` keyword (the Node's
    /// own IPs as /32 or /128).
    pub fn new(cidrs: &[IpNet], primary: bool, primary_ips: &[IpAddr], family: IpFamily) -> Self {
        let mut out: Vec<IpNet> = cidrs
            .iter()
            .filter(|c| IpFamily::of(&c.addr()) == family)
            .map(|c| c.trunc())
            .collect();
        if primary {
            out.extend(
                primary_ips
                    .iter()
                    .filter(|ip| IpFamily::of(ip) == family)
                    .map(|ip| IpNet::from(*ip)),
            );
        }
        // 0.0.0.0/0 or ::/0 means every address, as upstream's MatchAll.
        if out.iter().any(|c| c.prefix_len() == 0) {
            out.clear();
        }
        NodePortAddresses { cidrs: out }
    }

    /// Every local address accepts NodePorts.
    pub fn match_all(&self) -> bool {
        self.cidrs.is_empty()
    }

    /// 127.0.0.0/8 is in scope (explicitly, or implicitly via match-all).
    pub fn contains_ipv4_loopback(&self) -> bool {
        self.match_all()
            || self
                .cidrs
                .iter()
                .any(|c| c.contains(&IpAddr::from([127, 0, 0, 1])))
    }

    /// The local addresses that accept NodePorts, in order, without duplicates.
    pub fn filter(&self, local: &[IpAddr]) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for ip in local {
            if self.cidrs.iter().any(|c| c.contains(ip)) && !out.contains(ip) {
                out.push(*ip);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_cidr_and_primary() {
        let cidrs: Vec<IpNet> = vec!["198.18.0.0/24".parse().unwrap()];
        let n = NodePortAddresses::new(&cidrs, true, &["10.0.0.5".parse().unwrap()], IpFamily::V4);
        let local: Vec<IpAddr> = ["127.0.0.1", "198.18.0.11", "10.0.0.5", "10.244.1.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(n.filter(&local), vec![local[1], local[2]]);
        assert!(!n.contains_ipv4_loopback());
        assert!(NodePortAddresses::default().contains_ipv4_loopback());
    }
}
