//! Local-traffic detection (`--detect-local-mode`): which packets come from pods on this
//! node/cluster, so service traffic from elsewhere can be masqueraded.

use ipnet::IpNet;
use kp_model::IpFamily;

/// How pod traffic is recognised, for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDetector {
    /// No way to tell (no cluster CIDR of this family): nothing is masqueraded on that basis.
    None,
    /// Source inside the cluster (or node) pod CIDR(s).
    Cidrs(Vec<IpNet>),
    /// Arrived on the pod bridge.
    BridgeInterface(String),
    /// Arrived on an interface whose name starts with the prefix.
    InterfacePrefix(String),
}

impl LocalDetector {
    /// Builds a CIDR detector from the CIDRs of `family` (cluster or node pod CIDRs).
    pub fn from_cidrs(cidrs: &[IpNet], family: IpFamily) -> LocalDetector {
        let own: Vec<IpNet> = cidrs
            .iter()
            .filter(|c| IpFamily::of(&c.addr()) == family)
            .map(|c| c.trunc())
            .collect();
        if own.is_empty() {
            LocalDetector::None
        } else {
            LocalDetector::Cidrs(own)
        }
    }

    pub fn is_implemented(&self) -> bool {
        !matches!(self, LocalDetector::None)
    }

    /// iptables match for "from a local pod". Upstream uses the first CIDR only.
    pub fn iptables_if_local(&self) -> Vec<String> {
        match self {
            LocalDetector::None => vec![],
            LocalDetector::Cidrs(c) => vec!["-s".into(), c[0].to_string()],
            LocalDetector::BridgeInterface(i) => vec!["-i".into(), i.clone()],
            LocalDetector::InterfacePrefix(p) => vec!["-i".into(), format!("{p}+")],
        }
    }

    /// iptables match for "not from a local pod".
    pub fn iptables_if_not_local(&self) -> Vec<String> {
        match self {
            LocalDetector::None => vec![],
            LocalDetector::Cidrs(c) => vec!["!".into(), "-s".into(), c[0].to_string()],
            LocalDetector::BridgeInterface(i) => vec!["!".into(), "-i".into(), i.clone()],
            LocalDetector::InterfacePrefix(p) => vec!["!".into(), "-i".into(), format!("{p}+")],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_filter_and_matches() {
        let cidrs: Vec<IpNet> = vec![
            "fd00:10::/64".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        ];
        let d = LocalDetector::from_cidrs(&cidrs, IpFamily::V4);
        assert_eq!(d.iptables_if_not_local(), vec!["!", "-s", "10.244.0.0/16"]);
        assert_eq!(
            LocalDetector::from_cidrs(&cidrs[1..], IpFamily::V6),
            LocalDetector::None
        );
        assert_eq!(
            LocalDetector::InterfacePrefix("veth".into()).iptables_if_local(),
            vec!["-i", "veth+"]
        );
    }
}
