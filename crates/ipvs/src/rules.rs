//! Pure: the nat and filter rules IPVS mode needs beside IPVS itself (upstream's shapes:
//! the sets decide, so the rules depend only on which sets have members), as one
//! `iptables-restore --noflush` input that declares, and so flushes, our chains.

use std::fmt::Write as _;

use kp_dataplane::DataplaneConfig;
use kp_model::IpFamily;

use crate::ipset::{Set, SetContents};
use crate::plan::VsKey;

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_NODE_PORT: &str = "KUBE-NODE-PORT";
pub const KUBE_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_SOURCE_RANGES_FIREWALL: &str = "KUBE-SOURCE-RANGES-FIREWALL";
pub const KUBE_IPVS_FILTER: &str = "KUBE-IPVS-FILTER";
pub const KUBE_IPVS_OUT_FILTER: &str = "KUBE-IPVS-OUT-FILTER";

/// Our nat chains.
pub const NAT_CHAINS: [&str; 5] = [
    KUBE_SERVICES,
    KUBE_POSTROUTING,
    KUBE_NODE_PORT,
    KUBE_LOAD_BALANCER,
    KUBE_MARK_MASQ,
];
/// Our filter chains.
pub const FILTER_CHAINS: [&str; 6] = [
    KUBE_FORWARD,
    KUBE_NODE_PORT,
    KUBE_PROXY_FIREWALL,
    KUBE_SOURCE_RANGES_FIREWALL,
    KUBE_IPVS_FILTER,
    KUBE_IPVS_OUT_FILTER,
];

/// A jump from a built-in chain into ours; inserted first in the built-in chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub comment: &'static str,
}

/// Upstream's jumps in IPVS mode, in its order.
pub const JUMPS: [Jump; 9] = [
    jump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    jump(
        "nat",
        "PREROUTING",
        KUBE_SERVICES,
        "kubernetes service portals",
    ),
    jump(
        "nat",
        "POSTROUTING",
        KUBE_POSTROUTING,
        "kubernetes postrouting rules",
    ),
    jump(
        "filter",
        "FORWARD",
        KUBE_FORWARD,
        "kubernetes forwarding rules",
    ),
    jump(
        "filter",
        "INPUT",
        KUBE_NODE_PORT,
        "kubernetes health check rules",
    ),
    jump(
        "filter",
        "INPUT",
        KUBE_PROXY_FIREWALL,
        "kube-proxy firewall rules",
    ),
    jump(
        "filter",
        "FORWARD",
        KUBE_PROXY_FIREWALL,
        "kube-proxy firewall rules",
    ),
    jump(
        "filter",
        "INPUT",
        KUBE_IPVS_FILTER,
        "kubernetes ipvs access filter",
    ),
    jump(
        "filter",
        "OUTPUT",
        KUBE_IPVS_OUT_FILTER,
        "kubernetes ipvs access filter",
    ),
];

const fn jump(
    table: &'static str,
    from: &'static str,
    to: &'static str,
    comment: &'static str,
) -> Jump {
    Jump {
        table,
        from,
        to,
        comment,
    }
}

impl Jump {
    /// The rule's arguments after the chain name (`-m comment ... -j TO`).
    pub fn args(&self) -> Vec<&'static str> {
        vec!["-m", "comment", "--comment", self.comment, "-j", self.to]
    }
}

/// A set jump of upstream's table: `-A FROM [-p PROTO] -m set --match-set SET MATCH -j TO`,
/// written only when the set has members. Order matters: a Local set's RETURN precedes
/// its set's KUBE-MARK-MASQ.
struct SetJump {
    set: Set,
    filter: bool,
    from: &'static str,
    to: &'static str,
    matches: &'static str,
    protocol: Option<&'static str>,
}

const SET_JUMPS: [SetJump; 12] = [
    sj(
        Set::LoopBack,
        false,
        KUBE_POSTROUTING,
        "MASQUERADE",
        "dst,dst,src",
        None,
    ),
    sj(
        Set::LoadBalancer,
        false,
        KUBE_SERVICES,
        KUBE_LOAD_BALANCER,
        "dst,dst",
        None,
    ),
    sj(
        Set::LoadBalancerLocal,
        false,
        KUBE_LOAD_BALANCER,
        "RETURN",
        "dst,dst",
        None,
    ),
    sj(
        Set::NodePortLocalTcp,
        false,
        KUBE_NODE_PORT,
        "RETURN",
        "dst",
        Some("tcp"),
    ),
    sj(
        Set::NodePortTcp,
        false,
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst",
        Some("tcp"),
    ),
    sj(
        Set::NodePortLocalUdp,
        false,
        KUBE_NODE_PORT,
        "RETURN",
        "dst",
        Some("udp"),
    ),
    sj(
        Set::NodePortUdp,
        false,
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst",
        Some("udp"),
    ),
    sj(
        Set::NodePortLocalSctp,
        false,
        KUBE_NODE_PORT,
        "RETURN",
        "dst,dst",
        Some("sctp"),
    ),
    sj(
        Set::NodePortSctp,
        false,
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst,dst",
        Some("sctp"),
    ),
    sj(
        Set::LoadBalancerFw,
        true,
        KUBE_PROXY_FIREWALL,
        KUBE_SOURCE_RANGES_FIREWALL,
        "dst,dst",
        None,
    ),
    sj(
        Set::LoadBalancerSourceCidr,
        true,
        KUBE_SOURCE_RANGES_FIREWALL,
        "RETURN",
        "dst,dst,src",
        None,
    ),
    sj(
        Set::LoadBalancerSourceIp,
        true,
        KUBE_SOURCE_RANGES_FIREWALL,
        "RETURN",
        "dst,dst,src",
        None,
    ),
];

const fn sj(
    set: Set,
    filter: bool,
    from: &'static str,
    to: &'static str,
    matches: &'static str,
    protocol: Option<&'static str>,
) -> SetJump {
    SetJump {
        set,
        filter,
        from,
        to,
        matches,
        protocol,
    }
}

/// The rendered restore input and its rule counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub text: String,
    pub nat_rules: usize,
    pub filter_rules: usize,
}

/// The restore input for `sets` (what the plan puts in each set) and the VIPs the node
/// may not reach.
pub fn render(
    cfg: &DataplaneConfig,
    sets: &SetContents,
    lb_no_node_access: &std::collections::BTreeSet<VsKey>,
) -> Rules {
    let family = cfg.family;
    let has = |s: Set| sets.get(&s).is_some_and(|m| !m.is_empty());
    let name = |s: Set| s.name(family);
    let comment = |s: Set| format!("\"{}\"", s.comment());
    let mark = format!("{:#08x}", 1u32 << cfg.masquerade_bit);

    let mut nat = Vec::<String>::new();
    let mut filter = Vec::<String>::new();
    let lo = match family {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    };
    nat.push(format!("-A {KUBE_SERVICES} -s {lo} -j RETURN"));
    if has(Set::LoadBalancerLocal) {
        // Ours: the node's own connection to an externalTrafficPolicy Local VIP leaves
        // from the VIP itself (kube-ipvs0 holds it), which every node holds: a remote
        // endpoint's reply would never come back. Masqueraded, as iptables mode
        // masquerades host traffic there.
        nat.push(format!(
            "-A {KUBE_LOAD_BALANCER} -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
        ));
    }
    for j in SET_JUMPS.iter().filter(|j| has(j.set)) {
        let proto = j.protocol.map(|p| format!(" -p {p}")).unwrap_or_default();
        let line = format!(
            "-A {}{proto} -m comment --comment {} -m set --match-set {} {} -j {}",
            j.from,
            comment(j.set),
            name(j.set),
            j.matches,
            j.to
        );
        if j.filter {
            filter.push(line);
        } else {
            nat.push(line);
        }
    }
    if has(Set::ClusterIp) {
        let head = format!(
            "-A {KUBE_SERVICES} -m comment --comment {} -m set --match-set {}",
            comment(Set::ClusterIp),
            name(Set::ClusterIp)
        );
        if cfg.masquerade_all {
            nat.push(format!("{head} dst,dst -j {KUBE_MARK_MASQ}"));
        } else if cfg.local_detector.is_implemented() {
            // Off-cluster clients of a ClusterIP are masqueraded (the reply must come back
            // through this node).
            let not_local = cfg.local_detector.iptables_if_not_local().join(" ");
            nat.push(format!("{head} dst,dst {not_local} -j {KUBE_MARK_MASQ}"));
        } else {
            // Without a detector, connections the node opens from a VIP (which it holds on
            // kube-ipvs0) are masqueraded.
            nat.push(format!("{head} src,dst -j {KUBE_MARK_MASQ}"));
        }
    }
    for (set, masquerade) in [(Set::ExternalIp, true), (Set::ExternalIpLocal, false)] {
        if !has(set) {
            continue;
        }
        let head = format!(
            "-A {KUBE_SERVICES} -m comment --comment {} -m set --match-set {} dst,dst",
            comment(set),
            name(set)
        );
        if masquerade {
            nat.push(format!("{head} -j {KUBE_MARK_MASQ}"));
        } else {
            // Ours, as for Local VIPs above: the node's own connections.
            nat.push(format!(
                "{head} -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
            ));
        }
        // Traffic from off the machine (not from a bridge, not local) and traffic to an
        // externalIP the node holds stays with IPVS.
        nat.push(format!(
            "{head} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT"
        ));
        nat.push(format!("{head} -m addrtype --dst-type LOCAL -j ACCEPT"));
    }
    nat.push(format!(
        "-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}"
    ));
    nat.push(format!("-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}"));
    filter.push(format!("-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP"));
    for vs in lb_no_node_access {
        filter.push(format!(
            "-A {KUBE_IPVS_OUT_FILTER} -s {ip} -m ipvs --vaddr {ip} --vproto {} --vport {} -j DROP",
            vs.protocol.lower(),
            vs.port,
            ip = vs.addr
        ));
    }
    for set in [Set::ClusterIp, Set::LoadBalancer] {
        if has(set) {
            nat.push(format!(
                "-A {KUBE_SERVICES} -m set --match-set {} dst,dst -j ACCEPT",
                name(set)
            ));
        }
    }
    filter.push(format!(
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    ));
    filter.push(format!(
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ));
    filter.push(format!(
        "-A {KUBE_NODE_PORT} -m comment --comment {} -m set --match-set {} dst -j ACCEPT",
        comment(Set::HealthCheckNodePort),
        name(Set::HealthCheckNodePort)
    ));
    if has(Set::NoLocalInternal) {
        filter.push(format!(
            "-A {KUBE_IPVS_FILTER} -m comment --comment {} -m set --match-set {} dst,dst -j DROP",
            comment(Set::NoLocalInternal),
            name(Set::NoLocalInternal)
        ));
    }
    if has(Set::NoLocalEndpoints) {
        // Ours: externalTrafficPolicy Local with no endpoint here serves only the node
        // and its pods (as the iptables mode does); others are dropped before IPVS.
        let not_local = cfg.local_detector.iptables_if_not_local().join(" ");
        let not_local = if not_local.is_empty() {
            String::new()
        } else {
            format!(" {not_local}")
        };
        filter.push(format!(
            "-A {KUBE_IPVS_FILTER} -m comment --comment {} -m set --match-set {} dst,dst{not_local} -m addrtype ! --src-type LOCAL -j DROP",
            comment(Set::NoLocalEndpoints),
            name(Set::NoLocalEndpoints)
        ));
    }
    for (set, m) in [
        (Set::LoadBalancer, "dst,dst"),
        (Set::ClusterIp, "dst,dst"),
        (Set::ExternalIp, "dst,dst"),
        (Set::ExternalIpLocal, "dst,dst"),
        (Set::HealthCheckNodePort, "dst"),
    ] {
        filter.push(format!(
            "-A {KUBE_IPVS_FILTER} -m set --match-set {} {m} -j RETURN",
            name(set)
        ));
    }
    // Other ports of the VIPs kube-ipvs0 holds are refused, not served by the host (#72236).
    filter.push(format!(
        "-A {KUBE_IPVS_FILTER} -m conntrack --ctstate NEW -m set --match-set {} dst -j REJECT",
        name(Set::IpvsIps)
    ));
    nat.push(format!(
        "-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"
    ));
    nat.push(format!("-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}"));
    nat.push(format!(
        "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{}",
        if cfg.random_fully { " --random-fully" } else { "" }
    ));
    nat.push(format!("-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}"));

    let text = restore_input(&nat, &filter);
    Rules {
        text,
        nat_rules: nat.len(),
        filter_rules: filter.len(),
    }
}

/// Flushes and deletes our chains (after the jumps into them are gone).
pub fn cleanup_text() -> String {
    let delete = |chains: &[&str]| chains.iter().map(|c| format!("-X {c}")).collect::<Vec<_>>();
    restore_input(&delete(&NAT_CHAINS), &delete(&FILTER_CHAINS))
}

/// `iptables-restore` input declaring (so flushing) our chains of both tables, then
/// `nat` and `filter` lines.
fn restore_input(nat: &[String], filter: &[String]) -> String {
    let mut text = String::with_capacity(4096);
    for (table, chains, lines) in [
        ("nat", &NAT_CHAINS[..], nat),
        ("filter", &FILTER_CHAINS[..], filter),
    ] {
        let _ = writeln!(text, "*{table}");
        for c in chains {
            let _ = writeln!(text, ":{c} - [0:0]");
        }
        for l in lines {
            let _ = writeln!(text, "{l}");
        }
        text.push_str("COMMIT\n");
    }
    text
}
