//! Upstream's ipsets for IPVS mode: names (with the `KUBE-6-` prefix for IPv6), types,
//! comments, entry spellings as `ipset save` prints them, and the `ipset restore` script
//! that turns what the kernel holds into what the plan wants.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use kp_model::{IpFamily, Protocol};

/// The set types IPVS mode uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetType {
    HashIp,
    HashIpPort,
    HashIpPortIp,
    HashIpPortNet,
    BitmapPort,
}

impl SetType {
    pub fn as_str(self) -> &'static str {
        match self {
            SetType::HashIp => "hash:ip",
            SetType::HashIpPort => "hash:ip,port",
            SetType::HashIpPortIp => "hash:ip,port,ip",
            SetType::HashIpPortNet => "hash:ip,port,net",
            SetType::BitmapPort => "bitmap:port",
        }
    }
}

/// One of upstream's sets, by its IPv4 name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Set {
    LoopBack,
    ClusterIp,
    ExternalIp,
    ExternalIpLocal,
    LoadBalancer,
    LoadBalancerFw,
    LoadBalancerLocal,
    LoadBalancerSourceIp,
    LoadBalancerSourceCidr,
    NodePortTcp,
    NodePortLocalTcp,
    NodePortUdp,
    NodePortLocalUdp,
    NodePortSctp,
    NodePortLocalSctp,
    HealthCheckNodePort,
    IpvsIps,
    /// Ours, not upstream's: externalTrafficPolicy Local destinations without a local
    /// endpoint, which only the node and its pods may use.
    NoLocalEndpoints,
    /// Ours: ClusterIPs of internalTrafficPolicy Local services without a local endpoint
    /// (dropped, as the other modes drop them, instead of refused by an empty IPVS
    /// virtual server).
    NoLocalInternal,
}

impl Set {
    pub const ALL: [Set; 19] = [
        Set::LoopBack,
        Set::ClusterIp,
        Set::ExternalIp,
        Set::ExternalIpLocal,
        Set::LoadBalancer,
        Set::LoadBalancerFw,
        Set::LoadBalancerLocal,
        Set::LoadBalancerSourceIp,
        Set::LoadBalancerSourceCidr,
        Set::NodePortTcp,
        Set::NodePortLocalTcp,
        Set::NodePortUdp,
        Set::NodePortLocalUdp,
        Set::NodePortSctp,
        Set::NodePortLocalSctp,
        Set::HealthCheckNodePort,
        Set::IpvsIps,
        Set::NoLocalEndpoints,
        Set::NoLocalInternal,
    ];

    /// The IPv4 name (upstream's constant).
    pub fn base_name(self) -> &'static str {
        match self {
            Set::LoopBack => "KUBE-LOOP-BACK",
            Set::ClusterIp => "KUBE-CLUSTER-IP",
            Set::ExternalIp => "KUBE-EXTERNAL-IP",
            Set::ExternalIpLocal => "KUBE-EXTERNAL-IP-LOCAL",
            Set::LoadBalancer => "KUBE-LOAD-BALANCER",
            Set::LoadBalancerFw => "KUBE-LOAD-BALANCER-FW",
            Set::LoadBalancerLocal => "KUBE-LOAD-BALANCER-LOCAL",
            Set::LoadBalancerSourceIp => "KUBE-LOAD-BALANCER-SOURCE-IP",
            Set::LoadBalancerSourceCidr => "KUBE-LOAD-BALANCER-SOURCE-CIDR",
            Set::NodePortTcp => "KUBE-NODE-PORT-TCP",
            Set::NodePortLocalTcp => "KUBE-NODE-PORT-LOCAL-TCP",
            Set::NodePortUdp => "KUBE-NODE-PORT-UDP",
            Set::NodePortLocalUdp => "KUBE-NODE-PORT-LOCAL-UDP",
            Set::NodePortSctp => "KUBE-NODE-PORT-SCTP-HASH",
            Set::NodePortLocalSctp => "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
            Set::HealthCheckNodePort => "KUBE-HEALTH-CHECK-NODE-PORT",
            Set::IpvsIps => "KUBE-IPVS-IPS",
            Set::NoLocalEndpoints => "KUBE-NO-LOCAL-ENDPOINTS",
            Set::NoLocalInternal => "KUBE-NO-LOCAL-INTERNAL",
        }
    }

    /// The kernel name for `family`: IPv6 sets are `KUBE-6-...`, cut at ipset's 31
    /// characters, as upstream names them (so both stacks coexist and upgrades find them).
    pub fn name(self, family: IpFamily) -> String {
        let base = self.base_name();
        match family {
            IpFamily::V4 => base.to_string(),
            IpFamily::V6 => {
                let mut n = base.replacen("KUBE-", "KUBE-6-", 1);
                n.truncate(31);
                n
            }
        }
    }

    pub fn set_type(self) -> SetType {
        match self {
            Set::LoopBack | Set::LoadBalancerSourceIp => SetType::HashIpPortIp,
            Set::LoadBalancerSourceCidr => SetType::HashIpPortNet,
            Set::NodePortTcp
            | Set::NodePortLocalTcp
            | Set::NodePortUdp
            | Set::NodePortLocalUdp
            | Set::HealthCheckNodePort => SetType::BitmapPort,
            Set::IpvsIps => SetType::HashIp,
            _ => SetType::HashIpPort,
        }
    }

    pub fn comment(self) -> &'static str {
        match self {
            Set::LoopBack => {
                "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"
            }
            Set::ClusterIp => "Kubernetes service cluster ip + port for masquerade purpose",
            Set::ExternalIp => {
                "Kubernetes service external ip + port for masquerade and filter purpose"
            }
            Set::ExternalIpLocal => {
                "Kubernetes service external ip + port with externalTrafficPolicy=local"
            }
            Set::LoadBalancer => "Kubernetes service lb portal",
            Set::LoadBalancerFw => {
                "Kubernetes service load balancer ip + port for load balancer with sourceRange"
            }
            Set::LoadBalancerLocal => {
                "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"
            }
            Set::LoadBalancerSourceIp => {
                "Kubernetes service load balancer ip + port + source IP for packet filter purpose"
            }
            Set::LoadBalancerSourceCidr => {
                "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"
            }
            Set::NodePortTcp => "Kubernetes nodeport TCP port for masquerade purpose",
            Set::NodePortLocalTcp => {
                "Kubernetes nodeport TCP port with externalTrafficPolicy=local"
            }
            Set::NodePortUdp => "Kubernetes nodeport UDP port for masquerade purpose",
            Set::NodePortLocalUdp => {
                "Kubernetes nodeport UDP port with externalTrafficPolicy=local"
            }
            Set::NodePortSctp => {
                "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"
            }
            Set::NodePortLocalSctp => {
                "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"
            }
            Set::HealthCheckNodePort => "Kubernetes health check node port",
            Set::IpvsIps => "Addresses on the ipvs interface",
            Set::NoLocalEndpoints => {
                "kube-proxy-rs: externalTrafficPolicy=Local ip + port without a local endpoint"
            }
            Set::NoLocalInternal => {
                "kube-proxy-rs: internalTrafficPolicy=Local cluster ip + port without a local endpoint"
            }
        }
    }

    /// The `ipset create` arguments (after the name), as upstream creates the set; the same
    /// options matter, since `create -exist` refuses a set that exists with others.
    pub fn create_options(self, family: IpFamily) -> String {
        let ty = self.set_type();
        match ty {
            SetType::BitmapPort => format!("{} range 0-65535 comment", ty.as_str()),
            _ => format!(
                "{} family {} hashsize 1024 maxelem 65536 comment",
                ty.as_str(),
                match family {
                    IpFamily::V4 => "inet",
                    IpFamily::V6 => "inet6",
                }
            ),
        }
    }
}

/// `ip,proto:port`, as ipset prints a hash:ip,port member.
pub fn ip_port(ip: IpAddr, protocol: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", protocol.lower())
}

/// `ip,proto:port,ip2` (hash:ip,port,ip).
pub fn ip_port_ip(ip: IpAddr, protocol: Protocol, port: u16, ip2: IpAddr) -> String {
    format!("{ip},{}:{port},{ip2}", protocol.lower())
}

/// `ip,proto:port,net` (hash:ip,port,net); a host route prints without its prefix.
pub fn ip_port_net(ip: IpAddr, protocol: Protocol, port: u16, net: IpNet) -> String {
    let net = net.trunc();
    if net.prefix_len() == net.max_prefix_len() {
        format!("{ip},{}:{port},{}", protocol.lower(), net.addr())
    } else {
        format!("{ip},{}:{port},{net}", protocol.lower())
    }
}

/// Members of every set, by set.
pub type SetContents = BTreeMap<Set, BTreeSet<String>>;

/// Reads the members of our sets from `ipset save` output. Sets that are not ours are
/// skipped; a set of ours that exists with no member maps to an empty set.
pub fn parse_save(text: &str, family: IpFamily) -> SetContents {
    let by_name: BTreeMap<String, Set> = Set::ALL.iter().map(|s| (s.name(family), *s)).collect();
    let mut out = SetContents::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("create"), Some(name), _) => {
                if let Some(set) = by_name.get(name) {
                    out.entry(*set).or_default();
                }
            }
            (Some("add"), Some(name), Some(member)) => {
                if let Some(set) = by_name.get(name) {
                    out.entry(*set).or_default().insert(member.to_string());
                }
            }
            _ => {}
        }
    }
    out
}

/// Member counts of our sets from `ipset list -t` (headers only).
pub fn parse_terse(text: &str, family: IpFamily) -> BTreeMap<Set, usize> {
    let by_name: BTreeMap<String, Set> = Set::ALL.iter().map(|s| (s.name(family), *s)).collect();
    let mut out = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("Name: ") {
            current = by_name.get(name.trim()).copied();
        } else if let Some(n) = line.strip_prefix("Number of entries: ")
            && let Some(set) = current
        {
            out.insert(set, n.trim().parse().unwrap_or(usize::MAX));
        }
    }
    out
}

/// The `ipset restore` script that creates missing sets and adds and deletes members so
/// that `current` becomes `wanted`. Empty when nothing differs. Members are built from
/// parsed IPs and ports only, never from API strings, so no quoting is needed; the
/// comment is ours and quoted.
pub fn restore_script(
    family: IpFamily,
    current: Option<&SetContents>,
    wanted: &SetContents,
) -> (String, usize) {
    let mut out = String::new();
    let mut ops = 0;
    for set in Set::ALL {
        let name = set.name(family);
        let have = current.and_then(|c| c.get(&set));
        if have.is_none() {
            let _ = writeln!(out, "create {name} {}", set.create_options(family));
            ops += 1;
        }
        let empty = BTreeSet::new();
        let want = wanted.get(&set).unwrap_or(&empty);
        let have = have.unwrap_or(&empty);
        for m in have.difference(want) {
            let _ = writeln!(out, "del {name} {m}");
            ops += 1;
        }
        for m in want.difference(have) {
            let _ = writeln!(out, "add {name} {m} comment \"{}\"", set.comment());
            ops += 1;
        }
    }
    (out, ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_upstream_and_ipv6_names_fit_ipset() {
        assert_eq!(Set::ClusterIp.name(IpFamily::V4), "KUBE-CLUSTER-IP");
        assert_eq!(Set::ClusterIp.name(IpFamily::V6), "KUBE-6-CLUSTER-IP");
        // 30 + 2 characters: cut at 31, as upstream does.
        assert_eq!(
            Set::LoadBalancerSourceCidr.name(IpFamily::V6),
            "KUBE-6-LOAD-BALANCER-SOURCE-CID"
        );
        for s in Set::ALL {
            assert!(s.name(IpFamily::V6).len() <= 31, "{s:?}");
        }
        let names: BTreeSet<String> = Set::ALL.iter().map(|s| s.name(IpFamily::V6)).collect();
        assert_eq!(names.len(), Set::ALL.len(), "IPv6 names stay distinct");
    }

    #[test]
    fn members_are_spelled_as_ipset_prints_them() {
        let ip: IpAddr = "10.96.0.10".parse().unwrap();
        assert_eq!(ip_port(ip, Protocol::Udp, 53), "10.96.0.10,udp:53");
        assert_eq!(
            ip_port_ip(ip, Protocol::Tcp, 80, "10.244.1.5".parse().unwrap()),
            "10.96.0.10,tcp:80,10.244.1.5"
        );
        assert_eq!(
            ip_port_net(ip, Protocol::Sctp, 80, "198.18.0.7/24".parse().unwrap()),
            "10.96.0.10,sctp:80,198.18.0.0/24"
        );
        assert_eq!(
            ip_port_net(ip, Protocol::Tcp, 80, "198.18.0.7/32".parse().unwrap()),
            "10.96.0.10,tcp:80,198.18.0.7"
        );
        let v6: IpAddr = "fd00:10:96::a".parse().unwrap();
        assert_eq!(ip_port(v6, Protocol::Tcp, 443), "fd00:10:96::a,tcp:443");
    }

    #[test]
    fn terse_listing_gives_member_counts_of_our_sets() {
        let text = "Name: KUBE-CLUSTER-IP\nType: hash:ip,port\nRevision: 6\n\
                    Header: family inet hashsize 1024 maxelem 65536 comment\n\
                    Size in memory: 340\nReferences: 3\nNumber of entries: 12\n\n\
                    Name: OTHER\nType: hash:ip\nNumber of entries: 5\n\n\
                    Name: KUBE-NODE-PORT-TCP\nType: bitmap:port\nNumber of entries: 0\n";
        let c = parse_terse(text, IpFamily::V4);
        assert_eq!(c.len(), 2);
        assert_eq!(c[&Set::ClusterIp], 12);
        assert_eq!(c[&Set::NodePortTcp], 0);
    }

    #[test]
    fn restore_script_creates_missing_sets_and_moves_members() {
        let save = "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 comment\n\
                    add KUBE-CLUSTER-IP 10.96.0.1,tcp:443 comment \"x\"\n\
                    add KUBE-CLUSTER-IP 10.96.0.9,tcp:80 comment \"x\"\n\
                    create OTHER hash:ip family inet\nadd OTHER 1.2.3.4\n";
        let mut current = parse_save(save, IpFamily::V4);
        assert_eq!(current.len(), 1, "{current:?}");
        // Every other set exists too, empty.
        for s in Set::ALL {
            current.entry(s).or_default();
        }
        let mut wanted = SetContents::new();
        wanted.entry(Set::ClusterIp).or_default().extend([
            "10.96.0.1,tcp:443".to_string(),
            "10.96.0.10,udp:53".to_string(),
        ]);
        let (script, ops) = restore_script(IpFamily::V4, Some(&current), &wanted);
        assert_eq!(
            script,
            "del KUBE-CLUSTER-IP 10.96.0.9,tcp:80\n\
             add KUBE-CLUSTER-IP 10.96.0.10,udp:53 comment \"Kubernetes service cluster ip + port for masquerade purpose\"\n"
        );
        assert_eq!(ops, 2);
        // Nothing differs: nothing to run.
        let mut now = current.clone();
        now.insert(Set::ClusterIp, wanted[&Set::ClusterIp].clone());
        assert_eq!(restore_script(IpFamily::V4, Some(&now), &wanted).1, 0);
        // Nothing known: every set is created.
        let (script, ops) = restore_script(IpFamily::V6, None, &SetContents::new());
        assert_eq!(ops, Set::ALL.len());
        assert!(script.contains("create KUBE-6-NODE-PORT-TCP bitmap:port range 0-65535 comment\n"));
        assert!(script.contains(
            "create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536 comment\n"
        ));
    }
}
