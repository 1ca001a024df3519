//! State -> `iptables-restore --noflush` input, in upstream's shapes (pkg/proxy/iptables).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use kp_dataplane::{NodeInfo, RuleKind};
use kp_model::{IpFamily, NamespacedName, ProxyState, categorize_endpoints};

use crate::service::{ServiceOutput, render_service};
use crate::text::{Lines, sanitize_comment};

pub(crate) const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub(crate) const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub(crate) const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub(crate) const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub(crate) const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub(crate) const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub(crate) const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub(crate) const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// Above this many endpoints in total, per-endpoint comments are dropped (upstream's
/// large-cluster mode), shrinking restore input by ~40%.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// Per-service chain prefixes (nat table) that this proxy owns and garbage-collects.
pub(crate) const SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

/// Settings of the iptables mode for one IP family: the mode-neutral ones, all used.
pub type IptablesConfig = kp_dataplane::DataplaneConfig;

/// The masquerade mark as `--or-mark` / `--mark` take it.
fn masquerade_mark(cfg: &IptablesConfig) -> String {
    format!("{:#08x}", 1u32 << cfg.masquerade_bit)
}

/// Result of rendering one sync.
#[derive(Debug, Default)]
pub struct Rendered {
    /// `iptables-restore --noflush` input (filter then nat).
    pub text: String,
    /// Per-service nat chains that exist after this sync.
    pub active_nat_chains: BTreeSet<String>,
    pub rules_written: BTreeMap<RuleKind, usize>,
    pub rules_total: BTreeMap<RuleKind, usize>,
    /// Rule counts of per-service chains, to keep totals right when later syncs skip them.
    pub service_rule_counts: HashMap<NamespacedName, usize>,
    pub no_local_endpoints_internal: usize,
    pub no_local_endpoints_external: usize,
    pub health_checks: BTreeMap<NamespacedName, (u16, usize)>,
    /// Problems found while rendering (e.g. two services claiming one NodePort), one line
    /// each, naming the objects.
    pub warnings: Vec<String>,
}

/// What every service's rules are written with.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a IptablesConfig,
    /// The masquerade mark, as `--or-mark` / `--mark` take it.
    pub mark: String,
    /// Large-cluster mode: no per-endpoint comments (upstream's threshold).
    pub large: bool,
}

impl Ctx<'_> {
    /// Comment tokens, or nothing in large-cluster mode (for per-endpoint rules).
    pub(crate) fn ep_comment(&self, c: &str) -> Vec<String> {
        if self.large {
            vec![]
        } else {
            vec![
                "-m".into(),
                "comment".into(),
                "--comment".into(),
                sanitize_comment(c),
            ]
        }
    }
}

pub(crate) fn comment(c: &str) -> [String; 4] {
    [
        "-m".into(),
        "comment".into(),
        "--comment".into(),
        sanitize_comment(c),
    ]
}

/// A comment fixed in this source file (may hold characters the sanitizer would drop).
pub(crate) fn comment_fixed(c: &'static str) -> [String; 4] {
    ["-m".into(), "comment".into(), "--comment".into(), c.into()]
}

pub(crate) fn rule(out: &mut Lines, parts: &[&[String]]) {
    let tokens: Vec<&str> = parts
        .iter()
        .flat_map(|p| p.iter().map(|s| s.as_str()))
        .collect();
    out.rule(&tokens);
}

pub(crate) fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

pub(crate) fn host(ip: &IpAddr) -> String {
    ip.to_string()
}

/// Declared nat chains above which an iptables-nft restore fetches the whole table (the
/// measured crossover: ~3,400 at 10k services, about the same at 1k).
pub const WHOLE_TABLE_CACHE_ABOVE_CHAINS: usize = 3000;

/// Renders the restore input. `changed` lists services whose per-service chains must be
/// rewritten; `None` means a full sync. `previous_chains` are per-service chains believed
/// to exist; those no longer active are deleted. `cached_counts` holds rule counts of
/// per-service chains from earlier syncs.
///
/// `nft_restore`: the restore tool is iptables-nft (1.8.x), which, unless a line names no
/// chain, puts every chain the input names into a sorted linked list before fetching
/// them: quadratic in chains (10k services: a full load ~160 s, a partial rewriting 1,000
/// services 14.9 s). Past [`WHOLE_TABLE_CACHE_ABOVE_CHAINS`] declared chains the nat
/// table starts with `-S`, a listing that names no chain, so the tool fetches the whole
/// table instead (full load 16 s; that partial 5.8 s; a 100-service partial is cheaper
/// without: 1.3 s vs 4.5 s). The listing goes to the restore's stdout.
pub fn render(
    cfg: &IptablesConfig,
    state: &ProxyState,
    node: &NodeInfo,
    changed: Option<&BTreeSet<NamespacedName>>,
    previous_chains: &BTreeSet<String>,
    cached_counts: &HashMap<NamespacedName, usize>,
    nft_restore: bool,
) -> Rendered {
    let ctx = Ctx {
        cfg,
        mark: masquerade_mark(cfg),
        large: state.endpoint_count() > LARGE_CLUSTER_ENDPOINTS,
    };
    let mut out = Rendered::default();

    let mut filter_chains = Lines::default();
    let mut filter_rules = Lines::default();
    let mut nat_chains = Lines::default();
    let mut nat_rules = Lines::default();
    let mut skipped_rules = 0usize;

    let lh_nodeports = cfg.localhost_node_ports_active();
    let mut filter_names = vec![
        KUBE_NODEPORTS,
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_PROXY_FIREWALL,
    ];
    if lh_nodeports {
        filter_names.push(KUBE_FIREWALL);
    }
    for c in &filter_names {
        filter_chains.declare(c);
    }
    for c in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ] {
        nat_chains.declare(c);
    }

    // Static rules.
    let mark_mask = format!("{m}/{m}", m = ctx.mark);
    rule(
        &mut nat_rules,
        &[&s(&[
            "-A",
            KUBE_POSTROUTING,
            "-m",
            "mark",
            "!",
            "--mark",
            &mark_mask,
            "-j",
            "RETURN",
        ])],
    );
    rule(
        &mut nat_rules,
        &[&s(&[
            "-A",
            KUBE_POSTROUTING,
            "-j",
            "MARK",
            "--xor-mark",
            &ctx.mark,
        ])],
    );
    let mut masq = s(&["-A", KUBE_POSTROUTING]);
    masq.extend(comment("kubernetes service traffic requiring SNAT"));
    masq.extend(s(&["-j", "MASQUERADE"]));
    if cfg.random_fully {
        masq.push("--random-fully".into());
    }
    rule(&mut nat_rules, &[&masq]);
    rule(
        &mut nat_rules,
        &[&s(&[
            "-A",
            KUBE_MARK_MASQ,
            "-j",
            "MARK",
            "--or-mark",
            &ctx.mark,
        ])],
    );
    if !cfg.tcp_be_liberal {
        rule(
            &mut filter_rules,
            &[&s(&[
                "-A",
                KUBE_FORWARD,
                "-m",
                "conntrack",
                "--ctstate",
                "INVALID",
                "-j",
                "DROP",
            ])],
        );
    }
    rule(
        &mut filter_rules,
        &[
            &s(&["-A", KUBE_FORWARD]),
            &comment("kubernetes forwarding rules"),
            &s(&["-m", "mark", "--mark", &mark_mask, "-j", "ACCEPT"]),
        ],
    );
    rule(
        &mut filter_rules,
        &[
            &s(&["-A", KUBE_FORWARD]),
            &comment("kubernetes forwarding conntrack rule"),
            &s(&[
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ]),
        ],
    );
    if lh_nodeports {
        rule(
            &mut filter_rules,
            &[
                &s(&["-A", KUBE_FIREWALL]),
                &comment("block incoming localnet connections"),
                &s(&[
                    "-d",
                    "127.0.0.0/8",
                    "!",
                    "-s",
                    "127.0.0.0/8",
                    "-m",
                    "conntrack",
                    "!",
                    "--ctstate",
                    "RELATED,ESTABLISHED,DNAT",
                    "-j",
                    "DROP",
                ]),
            ],
        );
    }

    // Node IPs inside a LoadBalancer source range let the VIP itself through (the
    // "VIP on the node" loopback case).
    let node_ips: &[IpAddr] = &node.node_ips;

    // A NodePort two services claim belongs to the first in name order (kp-model's rule).
    let mut claims = kp_model::NodePortClaims::default();
    let mut node_port_losers: BTreeSet<&kp_model::ServicePortName> = BTreeSet::new();
    for svc in state.services.values() {
        if !claims
            .claim(&svc.name.service, [&**svc], &mut out.warnings)
            .is_empty()
        {
            node_port_losers.insert(&svc.name);
        }
    }

    let mut svc_counts: HashMap<NamespacedName, usize> = HashMap::new();
    for svc in state.services.values() {
        let key = &svc.name.service;
        let rewrite = changed.is_none_or(|c| c.contains(key));
        let eps = state.endpoints_of(&svc.name);
        let cat = categorize_endpoints(svc, eps, &node.topology);
        let mut chains = Lines::default();
        let mut rules = Lines::default();
        let facts = kp_model::port_facts(svc, eps, &cat);
        render_service(
            &ctx,
            svc,
            &cat,
            node_ips,
            !node_port_losers.contains(&svc.name),
            &mut ServiceOutput {
                nat_top: &mut nat_rules,
                filter_top: &mut filter_rules,
                chains: &mut chains,
                rules: &mut rules,
                active: &mut out.active_nat_chains,
            },
        );
        out.no_local_endpoints_internal += facts.no_local_internal as usize;
        out.no_local_endpoints_external += facts.no_local_external as usize;
        if let Some(hc) = facts.health_check {
            out.health_checks.insert(key.clone(), hc);
        }
        *svc_counts.entry(key.clone()).or_default() += rules.rules;
        if rewrite {
            nat_chains.append(chains);
            nat_rules.append(rules);
        }
    }
    // Keep cached counts for services whose chains were skipped.
    for (k, n) in &svc_counts {
        let rewritten = changed.is_none_or(|c| c.contains(k));
        if !rewritten {
            skipped_rules += cached_counts.get(k).copied().unwrap_or(*n);
        }
    }
    out.service_rule_counts = svc_counts;

    // NodePorts: the last rule of KUBE-SERVICES.
    let np_comment = comment_fixed(
        "kubernetes service nodeports; NOTE: this must be the last rule in this chain",
    );
    if cfg.node_port_addresses.match_all() {
        let mut dst = s(&["-m", "addrtype", "--dst-type", "LOCAL"]);
        if cfg.family == IpFamily::V6 {
            dst.extend(s(&["!", "-d", "::1/128"]));
        } else if !cfg.localhost_node_ports {
            dst.extend(s(&["!", "-d", "127.0.0.0/8"]));
        }
        rule(
            &mut nat_rules,
            &[
                &s(&["-A", KUBE_SERVICES]),
                &np_comment,
                &dst,
                &s(&["-j", KUBE_NODEPORTS]),
            ],
        );
    } else {
        for ip in cfg.node_port_addresses.filter(&node.local_addresses) {
            if ip.is_loopback() && !lh_nodeports {
                continue;
            }
            rule(
                &mut nat_rules,
                &[
                    &s(&["-A", KUBE_SERVICES]),
                    &np_comment,
                    &s(&["-d", &host(&ip), "-j", KUBE_NODEPORTS]),
                ],
            );
        }
    }

    // Delete per-service chains that are no longer needed.
    let mut deletes = Lines::default();
    for chain in previous_chains.difference(&out.active_nat_chains) {
        nat_chains.declare(chain);
        deletes.trailer(&format!("-X {chain}"));
    }

    out.rules_written
        .insert(RuleKind::IptablesFilter, filter_rules.rules);
    out.rules_written
        .insert(RuleKind::IptablesNat, nat_rules.rules);
    out.rules_total
        .insert(RuleKind::IptablesFilter, filter_rules.rules);
    out.rules_total
        .insert(RuleKind::IptablesNat, nat_rules.rules + skipped_rules);

    let mut text = String::with_capacity(
        filter_rules.len() + nat_rules.len() + nat_chains.len() + deletes.len() + 256,
    );
    text.push_str("*filter\n");
    filter_chains.write_to(&mut text);
    filter_rules.write_to(&mut text);
    text.push_str("COMMIT\n*nat\n");
    if nft_restore && nat_chains.declared() > WHOLE_TABLE_CACHE_ABOVE_CHAINS {
        text.push_str("-S\n");
    }
    nat_chains.write_to(&mut text);
    nat_rules.write_to(&mut text);
    deletes.write_to(&mut text);
    text.push_str("COMMIT\n");
    out.text = text;
    out
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
