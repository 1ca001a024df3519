//! State -> desired nftables objects, per service port (pure).
//!
//! Layout: upstream's table, base chains, helper chains and verdict maps. Endpoint
//! selection differs (see the crate README for the measurements): a service chain ends
//! with a cascade `numgen random mod (N-i) 0 dnat to EP_i` (the nftables form of
//! iptables' `statistic` cascade) instead of an anonymous vmap per service, and the
//! hairpin check is one set lookup in `masquerading` instead of a rule per endpoint
//! chain. Endpoint chains remain only for ClientIP affinity. No set or map is referenced
//! from more than a handful of rules, so no kernel operation walks a big map per service.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kp_dataplane::LocalDetector;
use kp_model::{CategorizedEndpoints, IpFamily, Protocol, ServicePort};

use crate::names::{ServiceChains, endpoint_object};

pub const TABLE: &str = "kube-proxy";
pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";
pub const CLUSTER_IPS: &str = "cluster-ips";
pub const NODEPORT_IPS: &str = "nodeport-ips";
pub const HAIRPIN_ENDPOINTS: &str = "hairpin-endpoints";
pub const CLUSTER_ENDPOINTS: &str = "cluster-endpoints";
pub const LOCAL_ENDPOINTS: &str = "local-endpoints";
pub const NODEPORT_ENDPOINTS: &str = "nodeport-endpoints";

/// Which traffic a shared endpoint picker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PickKind {
    /// ClusterIP traffic to cluster endpoints (masquerade outside the pod network).
    Internal,
    /// ClusterIP traffic with internalTrafficPolicy Local.
    InternalLocal,
    /// externalIP and LoadBalancer IP traffic (always masqueraded).
    External,
    /// NodePort traffic (always masqueraded).
    NodePort,
}

/// A chain shared by every service port with the same kind, protocol and endpoint
/// count: `pick-internal-tcp-3`. It picks slot `numgen random mod N` of the service's
/// entry (destination, protocol, port) in an endpoint map and DNATs to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Picker {
    pub kind: PickKind,
    pub protocol: Protocol,
    pub endpoints: u32,
}

impl Picker {
    pub fn chain(&self) -> String {
        let kind = match self.kind {
            PickKind::Internal => "internal",
            PickKind::InternalLocal => "internal-local",
            PickKind::External => "external",
            PickKind::NodePort => "nodeport",
        };
        format!("pick-{kind}-{}-{}", self.protocol.lower(), self.endpoints)
    }

    /// The endpoint map, one per protocol (nft 1.0.6 cannot add a rule naming a
    /// `th dport` map from a second invocation: "conflicting protocols").
    pub fn map(&self) -> &'static str {
        use PickKind::*;
        use Protocol::*;
        match (self.kind, self.protocol) {
            (Internal | External, Tcp) => "cluster-endpoints-tcp",
            (Internal | External, Udp) => "cluster-endpoints-udp",
            (Internal | External, Sctp) => "cluster-endpoints-sctp",
            (InternalLocal, Tcp) => "local-endpoints-tcp",
            (InternalLocal, Udp) => "local-endpoints-udp",
            (InternalLocal, Sctp) => "local-endpoints-sctp",
            (NodePort, Tcp) => "nodeport-endpoints-tcp",
            (NodePort, Udp) => "nodeport-endpoints-udp",
            (NodePort, Sctp) => "nodeport-endpoints-sctp",
        }
    }
}

/// The rules of a picker chain.
pub fn picker_rules(cfg: &NftConfig, p: &Picker) -> Vec<String> {
    let f = cfg.nft_family();
    let mut rules = Vec::new();
    match p.kind {
        PickKind::Internal | PickKind::InternalLocal => {
            if cfg.masquerade_all {
                rules.push("jump mark-for-masquerade".to_string());
            } else if let Some(m) = detector_match(cfg, false) {
                rules.push(format!("{m} jump mark-for-masquerade"));
            }
        }
        PickKind::External | PickKind::NodePort => {
            rules.push("jump mark-for-masquerade".to_string())
        }
    }
    let proto = p.protocol.lower();
    let entry = match p.kind {
        PickKind::NodePort => format!("meta l4proto . {proto} dport"),
        _ => format!("{f} daddr . meta l4proto . {proto} dport"),
    };
    rules.push(format!(
        "meta l4proto {} dnat {f} addr . port to {entry} . numgen random mod {} map @{}",
        p.protocol.lower(),
        p.endpoints,
        p.map()
    ));
    rules
}

/// Settings of the nftables mode for one family: the mode-neutral ones (it uses all but
/// the iptables-only localhost NodePorts, conntrack leniency and random-fully flags).
pub type NftConfig = kp_dataplane::DataplaneConfig;

/// How the nftables mode spells its settings.
pub trait NftSpelling {
    /// `ip` or `ip6`.
    fn nft_family(&self) -> &'static str;
    /// `ipv4_addr` or `ipv6_addr`.
    fn addr_type(&self) -> &'static str;
    /// The masquerade mark.
    fn mark(&self) -> String;
    /// The loopback range of the family.
    fn loopback(&self) -> &'static str;
}

impl NftSpelling for NftConfig {
    fn nft_family(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }
    fn addr_type(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        }
    }
    fn mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit)
    }
    fn loopback(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1",
        }
    }
}

/// A set or map declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDecl {
    pub name: String,
    pub map: bool,
    /// Everything inside `{ … }` of the declaration.
    pub spec: String,
}

/// A base chain's hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    pub name: &'static str,
    pub kind: &'static str,
    pub hook: &'static str,
    pub priority: &'static str,
}

/// The objects that exist once per table.
#[derive(Debug, Clone, Default)]
pub struct Skeleton {
    pub base_chains: Vec<BaseChain>,
    pub sets: Vec<SetDecl>,
    pub chains: BTreeMap<String, Vec<String>>,
    /// Elements of the static sets (`nodeport-ips`).
    pub elements: BTreeMap<(String, String), String>,
}

/// Everything one service port contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceObjects {
    /// Chain -> rules (the text after `add rule <family> kube-proxy <chain> `).
    pub chains: BTreeMap<String, Vec<String>>,
    /// (map or set, key) -> value (empty for sets).
    pub elements: BTreeMap<(&'static str, String), String>,
    /// Affinity sets (name -> timeout seconds).
    pub affinity_sets: BTreeMap<String, u32>,
    /// Endpoint IPs (`hairpin-endpoints` keys `ip . ip`); shared between services, so the
    /// proxier reference-counts them.
    pub hairpin: BTreeSet<IpAddr>,
    /// Shared picker chains this service's map entries jump to (reference-counted).
    pub pickers: BTreeSet<Picker>,
    /// This service's share of the sync report, kept so a partial sync need not look
    /// at the other services.
    pub report: ServiceReport,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceReport {
    pub no_local_endpoints_internal: usize,
    pub no_local_endpoints_external: usize,
    /// healthCheckNodePort and the number of local ready endpoints.
    pub health_check: Option<(u16, usize)>,
}

pub fn skeleton(cfg: &NftConfig) -> Skeleton {
    let f = cfg.nft_family();
    let a = cfg.addr_type();
    let mark = cfg.mark();
    let mut s = Skeleton {
        base_chains: vec![
            BaseChain {
                name: "filter-prerouting",
                kind: "filter",
                hook: "prerouting",
                priority: "-110",
            },
            BaseChain {
                name: "filter-input",
                kind: "filter",
                hook: "input",
                priority: "-110",
            },
            BaseChain {
                name: "filter-forward",
                kind: "filter",
                hook: "forward",
                priority: "-110",
            },
            BaseChain {
                name: "filter-output",
                kind: "filter",
                hook: "output",
                priority: "-110",
            },
            BaseChain {
                name: "filter-output-post-dnat",
                kind: "filter",
                hook: "output",
                priority: "-90",
            },
            BaseChain {
                name: "nat-prerouting",
                kind: "nat",
                hook: "prerouting",
                priority: "-100",
            },
            BaseChain {
                name: "nat-output",
                kind: "nat",
                hook: "output",
                priority: "-100",
            },
            BaseChain {
                name: "nat-postrouting",
                kind: "nat",
                hook: "postrouting",
                priority: "100",
            },
        ],
        ..Default::default()
    };
    let tuple = format!("{a} . inet_proto . inet_service : verdict");
    let set = |name: &str, map: bool, spec: String| SetDecl {
        name: name.into(),
        map,
        spec,
    };
    s.sets = vec![
        set(CLUSTER_IPS, false, format!("type {a} ; comment \"Active ClusterIPs\" ;")),
        set(SERVICE_IPS, true, format!("type {tuple} ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ;")),
        set(SERVICE_NODEPORTS, true, "type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ;".into()),
        set(NO_ENDPOINT_SERVICES, true, format!("type {tuple} ; comment \"vmap to drop or reject packets to services with no endpoints\" ;")),
        set(NO_ENDPOINT_NODEPORTS, true, "type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ;".into()),
        set(FIREWALL_IPS, true, format!("type {tuple} ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ;")),
        set(HAIRPIN_ENDPOINTS, false, format!("type {a} . {a} ; comment \"endpoint . endpoint: a pod reaching itself through a service is masqueraded\" ;")),
    ];
    for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        let p = proto.lower();
        for (base, entry, what) in [
            (
                CLUSTER_ENDPOINTS,
                format!("{f} daddr . "),
                "cluster endpoint",
            ),
            (
                LOCAL_ENDPOINTS,
                format!("{f} daddr . "),
                "node-local endpoint",
            ),
            (NODEPORT_ENDPOINTS, String::new(), "cluster endpoint"),
        ] {
            s.sets.push(set(
                &format!("{base}-{p}"),
                true,
                format!("typeof {entry}meta l4proto . {p} dport . numgen random mod 1 : {f} daddr . {p} dport ; comment \"entry . slot -> {what}\" ;"),
            ));
        }
    }
    let mut chain = |name: &str, rules: Vec<String>| {
        s.chains.insert(name.to_string(), rules);
    };
    let daddr = format!("{f} daddr");
    let daddr_s = format!("{f} saddr");
    let not_lo = format!("{daddr} != {}", cfg.loopback());
    let np_match = if cfg.node_port_addresses.match_all() {
        format!("fib daddr type local {not_lo}")
    } else {
        format!("{daddr} @{NODEPORT_IPS}")
    };
    chain(
        "filter-prerouting",
        vec!["ct state new jump firewall-check".into()],
    );
    chain(
        "filter-input",
        vec![
            "ct state new jump nodeport-endpoints-check".into(),
            "ct state new jump service-endpoints-check".into(),
        ],
    );
    chain(
        "filter-forward",
        vec![
            "ct state new jump service-endpoints-check".into(),
            "ct state new jump cluster-ips-check".into(),
        ],
    );
    // Upstream checks service-endpoints from filter-output (before DNAT), which drops the
    // node's own traffic to an ETP=Local VIP without local endpoints even though the
    // external chain would short-circuit it. Checking after DNAT keeps the REJECT/DROP for
    // traffic that was not DNATed and lets short-circuited local traffic through, as in
    // iptables mode.
    chain(
        "filter-output",
        vec!["ct state new jump firewall-check".into()],
    );
    chain(
        "filter-output-post-dnat",
        vec![
            "ct state new jump service-endpoints-check".into(),
            "ct state new jump cluster-ips-check".into(),
        ],
    );
    chain("nat-prerouting", vec!["jump services".into()]);
    chain("nat-output", vec!["jump services".into()]);
    chain("nat-postrouting", vec!["jump masquerading".into()]);
    chain(
        "mark-for-masquerade",
        vec![format!("meta mark set meta mark or {mark}")],
    );
    chain(
        "masquerading",
        vec![
            format!("{daddr_s} . {daddr} @{HAIRPIN_ENDPOINTS} jump mark-for-masquerade"),
            format!("meta mark and {mark} == 0 return"),
            format!("meta mark set meta mark xor {mark}"),
            "masquerade fully-random".into(),
        ],
    );
    chain(
        "services",
        vec![
            format!("{daddr} . meta l4proto . th dport vmap @{SERVICE_IPS}"),
            format!("{np_match} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"),
        ],
    );
    chain(
        "service-endpoints-check",
        vec![format!(
            "{daddr} . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"
        )],
    );
    chain(
        "nodeport-endpoints-check",
        vec![format!(
            "{np_match} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"
        )],
    );
    chain(
        "firewall-check",
        vec![format!(
            "{daddr} . meta l4proto . th dport vmap @{FIREWALL_IPS}"
        )],
    );
    chain(
        "cluster-ips-check",
        vec![format!(
            "{daddr} @{CLUSTER_IPS} reject comment \"Reject traffic to invalid ports of ClusterIPs\""
        )],
    );
    chain("reject-chain", vec!["reject".into()]);
    if !cfg.node_port_addresses.match_all() {
        s.sets.push(set(
            NODEPORT_IPS,
            false,
            format!("type {a} ; comment \"IPs that accept NodePort traffic\" ;"),
        ));
        for ip in &cfg.node_port_ips {
            s.elements
                .insert((NODEPORT_IPS.into(), ip.to_string()), String::new());
        }
    }
    s
}

fn detector_match(cfg: &NftConfig, local: bool) -> Option<String> {
    let f = cfg.nft_family();
    let op = if local { "" } else { "!= " };
    match &cfg.local_detector {
        LocalDetector::None => None,
        LocalDetector::Cidrs(c) => Some(format!("{f} saddr {op}{}", c[0])),
        LocalDetector::BridgeInterface(i) => {
            Some(format!("iifname {op}\"{}\"", sanitize_ifname(i)))
        }
        LocalDetector::InterfacePrefix(p) => {
            Some(format!("iifname {op}\"{}*\"", sanitize_ifname(p)))
        }
    }
}

/// Interface names are at most 15 bytes of a restricted set; anything else is dropped.
fn sanitize_ifname(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(15)
        .collect()
}

/// Renders one service port.
///
/// Most service ports take the shared-picker path: their map entries jump to a
/// [`Picker`] chain and their endpoints are elements of an endpoint map, so an endpoint
/// change is a data-only transaction. Session affinity and externalTrafficPolicy Local
/// (short-circuits, source-preserving local chains) keep upstream's per-service chains,
/// ending in a `numgen` cascade.
pub fn render_service(
    cfg: &NftConfig,
    svc: &ServicePort,
    cat: &CategorizedEndpoints,
    node_ips: &[IpAddr],
) -> ServiceObjects {
    let f = cfg.nft_family();
    let mut o = ServiceObjects::default();
    let proto = svc.protocol.lower();
    let affinity = svc.session_affinity_timeout.is_some();
    let per_service_chains = affinity || (svc.external_policy_local && svc.externally_accessible());
    let shared = !per_service_chains;
    let uses_fw =
        cat.has_any && svc.externally_accessible() && !svc.load_balancer_source_ranges.is_empty();
    // Chain names (a hash each) only where they are used: a service on the shared
    // pickers has at most a firewall chain.
    let names = (per_service_chains || uses_fw).then(|| ServiceChains::new(&svc.name));
    let name = |prefix: &str, used: bool| match &names {
        Some(n) if used => n.chain(prefix),
        _ => String::new(),
    };
    let cluster_chain = name("service-", per_service_chains);
    let local_chain = name("local-", per_service_chains);
    let ext_chain = name("external-", per_service_chains);
    let fw_chain = name("firewall-", uses_fw);
    let internal_chain = if svc.internal_policy_local {
        &local_chain
    } else {
        &cluster_chain
    };
    let external_policy_chain = if svc.external_policy_local {
        &local_chain
    } else {
        &cluster_chain
    };
    let internal_eps = cat.internal(svc);
    let external_eps = cat.external(svc);
    let has_internal = !internal_eps.is_empty();
    let has_external = !external_eps.is_empty();
    let uses_cluster_chain = !shared && !cat.cluster.is_empty() && svc.uses_cluster_endpoints();
    let uses_local_chain = !shared && !cat.local.is_empty() && svc.uses_local_endpoints();
    let uses_ext_chain = !shared && cat.has_any && svc.externally_accessible();
    let no_ep_verdict = if cat.has_any {
        "drop".to_string()
    } else {
        "goto reject-chain".to_string()
    };

    // Where each entry point goes: a shared picker, or the service's own chain.
    let picker = |kind: PickKind, n: usize| Picker {
        kind,
        protocol: svc.protocol,
        endpoints: n as u32,
    };
    let internal_target = if shared {
        let kind = if svc.internal_policy_local {
            PickKind::InternalLocal
        } else {
            PickKind::Internal
        };
        picker(kind, internal_eps.len()).chain()
    } else {
        internal_chain.clone()
    };
    let (ip_target, nodeport_target) = if shared {
        (
            picker(PickKind::External, external_eps.len()).chain(),
            picker(PickKind::NodePort, external_eps.len()).chain(),
        )
    } else {
        (ext_chain.clone(), ext_chain.clone())
    };
    let ip_routed = if shared { has_external } else { uses_ext_chain };

    let key = |ip: &IpAddr, port: u16| format!("{ip} . {proto} . {port}");
    let mut el = |map: &'static str, k: String, v: String| {
        o.elements.insert((map, k), v);
    };
    let mut pickers = BTreeSet::new();
    let slots = |el: &mut dyn FnMut(&'static str, String, String),
                 map: &'static str,
                 entry: &str,
                 eps: &[kp_model::Endpoint]| {
        for (i, ep) in eps.iter().enumerate() {
            el(
                map,
                format!("{entry} . {i}"),
                format!("{} . {}", ep.ip, ep.port),
            );
        }
    };
    el(CLUSTER_IPS, svc.cluster_ip.to_string(), String::new());
    if has_internal {
        el(
            SERVICE_IPS,
            key(&svc.cluster_ip, svc.port),
            format!("goto {internal_target}"),
        );
        if shared {
            let kind = if svc.internal_policy_local {
                PickKind::InternalLocal
            } else {
                PickKind::Internal
            };
            let p = picker(kind, internal_eps.len());
            slots(
                &mut el,
                p.map(),
                &key(&svc.cluster_ip, svc.port),
                internal_eps,
            );
            pickers.insert(p);
        }
    } else {
        el(
            NO_ENDPOINT_SERVICES,
            key(&svc.cluster_ip, svc.port),
            no_ep_verdict.clone(),
        );
    }
    for ip in svc.external_ips.iter().chain(&svc.load_balancer_vips) {
        if ip_routed {
            el(SERVICE_IPS, key(ip, svc.port), format!("goto {ip_target}"));
            if shared {
                let p = picker(PickKind::External, external_eps.len());
                slots(&mut el, p.map(), &key(ip, svc.port), external_eps);
                pickers.insert(p);
            }
        }
        if !has_external {
            el(
                NO_ENDPOINT_SERVICES,
                key(ip, svc.port),
                no_ep_verdict.clone(),
            );
        }
    }
    if uses_fw {
        for ip in &svc.load_balancer_vips {
            el(FIREWALL_IPS, key(ip, svc.port), format!("goto {fw_chain}"));
        }
    }
    if let Some(np) = svc.node_port {
        if ip_routed {
            el(
                SERVICE_NODEPORTS,
                format!("{proto} . {np}"),
                format!("goto {nodeport_target}"),
            );
            if shared {
                let p = picker(PickKind::NodePort, external_eps.len());
                slots(&mut el, p.map(), &format!("{proto} . {np}"), external_eps);
                pickers.insert(p);
            }
        }
        if !has_external {
            el(
                NO_ENDPOINT_NODEPORTS,
                format!("{proto} . {np}"),
                no_ep_verdict.clone(),
            );
        }
    }
    o.pickers = pickers;

    if uses_ext_chain {
        let mut rules = Vec::new();
        if svc.external_policy_local {
            if let Some(m) = detector_match(cfg, true).filter(|_| uses_cluster_chain) {
                rules.push(format!(
                    "{m} goto {cluster_chain} comment \"short-circuit pod traffic\""
                ));
            }
            rules.push("fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"".into());
            if uses_cluster_chain {
                rules.push(format!("fib saddr type local goto {cluster_chain} comment \"short-circuit local traffic\""));
            }
        } else {
            rules.push("jump mark-for-masquerade".into());
        }
        if has_external {
            rules.push(format!("goto {external_policy_chain}"));
        }
        o.chains.insert(ext_chain.clone(), rules);
    }
    if uses_fw {
        let mut allowed: Vec<String> = svc
            .load_balancer_source_ranges
            .iter()
            .map(|r| r.to_string())
            .collect();
        if node_ips.iter().any(|ip| {
            svc.load_balancer_source_ranges
                .iter()
                .any(|r| r.contains(ip))
        }) {
            allowed.extend(svc.load_balancer_vips.iter().map(|v| v.to_string()));
        }
        o.chains.insert(
            fw_chain.clone(),
            vec![format!("{f} saddr != {{ {} }} drop", allowed.join(", "))],
        );
    }
    for ep in &cat.all_reachable {
        o.hairpin.insert(ep.ip);
    }
    if shared {
        return o;
    }

    // Per-service chains: masquerade rule of the internal chain, then the endpoints.
    let masq = if cfg.masquerade_all {
        Some(format!(
            "{f} daddr {} {proto} dport {} jump mark-for-masquerade",
            svc.cluster_ip, svc.port
        ))
    } else {
        detector_match(cfg, false).map(|m| {
            format!(
                "{f} daddr {} {proto} dport {} {m} jump mark-for-masquerade",
                svc.cluster_ip, svc.port
            )
        })
    };
    for (chain, eps, is_internal) in [
        (
            &cluster_chain,
            &cat.cluster,
            internal_chain == &cluster_chain,
        ),
        (&local_chain, &cat.local, internal_chain == &local_chain),
    ] {
        let used = if chain == &cluster_chain {
            uses_cluster_chain
        } else {
            uses_local_chain
        };
        if !used {
            continue;
        }
        let mut rules = Vec::new();
        if is_internal && has_internal {
            rules.extend(masq.clone());
        }
        if affinity {
            for ep in eps {
                let set = endpoint_object("affinity-", &svc.name, &ep.ip, ep.port);
                let epc = endpoint_object("endpoint-", &svc.name, &ep.ip, ep.port);
                rules.push(format!("{f} saddr @{set} goto {epc}"));
            }
        }
        // Endpoint i is taken with probability 1/(N-i) once 0..i were passed over: 1/N
        // each, as iptables' statistic cascade.
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let pick = if i + 1 < n {
                format!("numgen random mod {} 0 ", n - i)
            } else {
                String::new()
            };
            let target = if affinity {
                format!(
                    "goto {}",
                    endpoint_object("endpoint-", &svc.name, &ep.ip, ep.port)
                )
            } else {
                let dst = std::net::SocketAddr::new(ep.ip, ep.port);
                format!("meta l4proto {proto} dnat to {dst}")
            };
            rules.push(format!("{pick}{target}"));
        }
        o.chains.insert(chain.clone(), rules);
    }
    if let Some(t) = svc.session_affinity_timeout {
        for ep in &cat.all_reachable {
            let epc = endpoint_object("endpoint-", &svc.name, &ep.ip, ep.port);
            let set = endpoint_object("affinity-", &svc.name, &ep.ip, ep.port);
            o.affinity_sets.insert(set.clone(), t);
            let dst = std::net::SocketAddr::new(ep.ip, ep.port);
            o.chains.insert(
                epc,
                vec![
                    format!("{f} saddr {} jump mark-for-masquerade", ep.ip),
                    format!("update @{set} {{ {f} saddr }}"),
                    format!("meta l4proto {proto} dnat to {dst}"),
                ],
            );
        }
    }
    o
}
