//! One service port's iptables rules: its entries in the shared chains and its own
//! KUBE-SVC/SVL/EXT/FW/SEP chains, in upstream's shapes.

use std::collections::BTreeSet;
use std::net::IpAddr;

use kp_dataplane::{endpoint_chain_name, service_chain_name};
use kp_model::ServicePort;

use crate::render::{
    Ctx, KUBE_EXTERNAL_SERVICES, KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL,
    KUBE_SERVICES, comment, host, rule, s,
};
use crate::text::Lines;

/// Where one service port's rules go.
pub(crate) struct ServiceOutput<'a> {
    /// The shared top-level nat chains (KUBE-SERVICES, KUBE-NODEPORTS, ...).
    pub nat_top: &'a mut Lines,
    /// The shared filter chains.
    pub filter_top: &'a mut Lines,
    /// Its own chains' declarations and rules, which a partial sync drops when the
    /// service did not change.
    pub chains: &'a mut Lines,
    pub rules: &'a mut Lines,
    /// Chains that exist after this sync.
    pub active: &'a mut BTreeSet<String>,
}

/// Writes one service port. `owns_node_port`: false when another service holds its
/// NodePort (kp-model's claim rule), so its NodePort rules are left out.
pub(crate) fn render_service(
    ctx: &Ctx<'_>,
    svc: &ServicePort,
    cat: &kp_model::CategorizedEndpoints,
    node_ips: &[IpAddr],
    owns_node_port: bool,
    out: &mut ServiceOutput<'_>,
) {
    let ServiceOutput {
        nat_top,
        filter_top,
        chains,
        rules,
        active,
    } = out;
    let cfg = ctx.cfg;
    let name = svc.name.to_string();
    let proto = svc.protocol.lower();
    let cluster_chain = service_chain_name("KUBE-SVC-", &svc.name);
    let local_chain = service_chain_name("KUBE-SVL-", &svc.name);
    let ext_chain = service_chain_name("KUBE-EXT-", &svc.name);
    let fw_chain = service_chain_name("KUBE-FW-", &svc.name);
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

    let has_internal = !cat.internal(svc).is_empty();
    let has_external = !cat.external(svc).is_empty();
    let uses_cluster_chain = !cat.cluster.is_empty() && svc.uses_cluster_endpoints();
    let uses_local_chain = !cat.local.is_empty() && svc.uses_local_endpoints();
    let uses_ext_chain = cat.has_any && svc.externally_accessible();
    let uses_fw = uses_ext_chain && !svc.load_balancer_source_ranges.is_empty();

    let (int_target, int_comment) = if cat.has_any {
        ("DROP", format!("{name} has no local endpoints"))
    } else {
        ("REJECT", format!("{name} has no endpoints"))
    };
    let (ext_target, ext_comment) = if cat.has_any {
        ("DROP", format!("{name} has no local endpoints"))
    } else {
        ("REJECT", format!("{name} has no endpoints"))
    };
    let port = svc.port.to_string();
    let l4 = s(&["-m", proto, "-p", proto]);
    let cip = host(&svc.cluster_ip);

    // ClusterIP.
    let cluster_match = [l4.clone(), s(&["-d", &cip, "--dport", &port])].concat();
    if has_internal {
        rule(
            nat_top,
            &[
                &s(&["-A", KUBE_SERVICES]),
                &comment(&format!("{name} cluster IP")),
                &cluster_match,
                &s(&["-j", internal_chain]),
            ],
        );
    } else {
        rule(
            filter_top,
            &[
                &s(&["-A", KUBE_SERVICES]),
                &comment(&int_comment),
                &cluster_match,
                &s(&["-j", int_target]),
            ],
        );
    }
    // externalIPs.
    for ip in &svc.external_ips {
        let m = [l4.clone(), s(&["-d", &host(ip), "--dport", &port])].concat();
        if uses_ext_chain {
            rule(
                nat_top,
                &[
                    &s(&["-A", KUBE_SERVICES]),
                    &comment(&format!("{name} external IP")),
                    &m,
                    &s(&["-j", &ext_chain]),
                ],
            );
        }
        if !has_external {
            rule(
                filter_top,
                &[
                    &s(&["-A", KUBE_EXTERNAL_SERVICES]),
                    &comment(&ext_comment),
                    &m,
                    &s(&["-j", ext_target]),
                ],
            );
        }
    }
    // LoadBalancer VIPs.
    for ip in &svc.load_balancer_vips {
        let m = [l4.clone(), s(&["-d", &host(ip), "--dport", &port])].concat();
        if uses_ext_chain {
            let target = if uses_fw { &fw_chain } else { &ext_chain };
            rule(
                nat_top,
                &[
                    &s(&["-A", KUBE_SERVICES]),
                    &comment(&format!("{name} loadbalancer IP")),
                    &m,
                    &s(&["-j", target]),
                ],
            );
        }
        if uses_fw {
            rule(
                filter_top,
                &[
                    &s(&["-A", KUBE_PROXY_FIREWALL]),
                    &comment(&format!("{name} traffic not accepted by {fw_chain}")),
                    &m,
                    &s(&["-j", "DROP"]),
                ],
            );
        }
        if !has_external {
            rule(
                filter_top,
                &[
                    &s(&["-A", KUBE_EXTERNAL_SERVICES]),
                    &comment(&ext_comment),
                    &m,
                    &s(&["-j", ext_target]),
                ],
            );
        }
    }
    // NodePort.
    if let Some(np) = svc.node_port.filter(|_| owns_node_port) {
        let np = np.to_string();
        if uses_ext_chain {
            rule(
                nat_top,
                &[
                    &s(&["-A", KUBE_NODEPORTS]),
                    &comment(&name),
                    &l4,
                    &s(&["--dport", &np, "-j", &ext_chain]),
                ],
            );
        }
        if !has_external {
            rule(
                filter_top,
                &[
                    &s(&["-A", KUBE_EXTERNAL_SERVICES]),
                    &comment(&ext_comment),
                    &s(&["-m", "addrtype", "--dst-type", "LOCAL"]),
                    &l4,
                    &s(&["--dport", &np, "-j", ext_target]),
                ],
            );
        }
    }
    if let Some(hc) = svc.health_check_node_port {
        rule(
            filter_top,
            &[
                &s(&["-A", KUBE_NODEPORTS]),
                &comment(&format!("{name} health check node port")),
                &s(&[
                    "-m",
                    "tcp",
                    "-p",
                    "tcp",
                    "--dport",
                    &hc.to_string(),
                    "-j",
                    "ACCEPT",
                ]),
            ],
        );
    }

    // Per-service chains.
    if has_internal {
        if cfg.masquerade_all {
            rule(
                rules,
                &[
                    &s(&["-A", internal_chain]),
                    &comment(&format!("{name} cluster IP")),
                    &cluster_match,
                    &s(&["-j", KUBE_MARK_MASQ]),
                ],
            );
        } else if cfg.local_detector.is_implemented() {
            rule(
                rules,
                &[
                    &s(&["-A", internal_chain]),
                    &comment(&format!("{name} cluster IP")),
                    &cluster_match,
                    &cfg.local_detector.iptables_if_not_local(),
                    &s(&["-j", KUBE_MARK_MASQ]),
                ],
            );
        }
    }
    if uses_ext_chain {
        chains.declare(&ext_chain);
        active.insert(ext_chain.clone());
        if svc.external_policy_local {
            if cfg.local_detector.is_implemented() && uses_cluster_chain {
                rule(
                    rules,
                    &[
                        &s(&["-A", &ext_chain]),
                        &comment(&format!("pod traffic for {name} external destinations")),
                        &cfg.local_detector.iptables_if_local(),
                        &s(&["-j", &cluster_chain]),
                    ],
                );
            }
            rule(
                rules,
                &[
                    &s(&["-A", &ext_chain]),
                    &comment(&format!(
                        "masquerade LOCAL traffic for {name} external destinations"
                    )),
                    &s(&[
                        "-m",
                        "addrtype",
                        "--src-type",
                        "LOCAL",
                        "-j",
                        KUBE_MARK_MASQ,
                    ]),
                ],
            );
            if uses_cluster_chain {
                rule(
                    rules,
                    &[
                        &s(&["-A", &ext_chain]),
                        &comment(&format!(
                            "route LOCAL traffic for {name} external destinations"
                        )),
                        &s(&[
                            "-m",
                            "addrtype",
                            "--src-type",
                            "LOCAL",
                            "-j",
                            &cluster_chain,
                        ]),
                    ],
                );
            }
        } else {
            rule(
                rules,
                &[
                    &s(&["-A", &ext_chain]),
                    &comment(&format!(
                        "masquerade traffic for {name} external destinations"
                    )),
                    &s(&["-j", KUBE_MARK_MASQ]),
                ],
            );
        }
        if has_external {
            rule(
                rules,
                &[&s(&["-A", &ext_chain, "-j", external_policy_chain])],
            );
        }
    }
    if uses_fw {
        chains.declare(&fw_chain);
        active.insert(fw_chain.clone());
        let c = comment(&format!("{name} loadbalancer IP"));
        for range in &svc.load_balancer_source_ranges {
            rule(
                rules,
                &[
                    &s(&["-A", &fw_chain]),
                    &c,
                    &s(&["-s", &range.to_string(), "-j", &ext_chain]),
                ],
            );
        }
        let node_in_range = node_ips.iter().any(|ip| {
            svc.load_balancer_source_ranges
                .iter()
                .any(|r| r.contains(ip))
        });
        if node_in_range {
            for vip in &svc.load_balancer_vips {
                rule(
                    rules,
                    &[
                        &s(&["-A", &fw_chain]),
                        &c,
                        &s(&["-s", &host(vip), "-j", &ext_chain]),
                    ],
                );
            }
        }
        rule(
            rules,
            &[
                &s(&["-A", &fw_chain]),
                &comment(&format!(
                    "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"
                )),
            ],
        );
    }
    if uses_cluster_chain {
        chains.declare(&cluster_chain);
        active.insert(cluster_chain.clone());
        write_balancing(ctx, svc, &name, &cluster_chain, &cat.cluster, rules);
    }
    if uses_local_chain {
        chains.declare(&local_chain);
        active.insert(local_chain.clone());
        write_balancing(ctx, svc, &name, &local_chain, &cat.local, rules);
    }
    for ep in &cat.all_reachable {
        let addr = ep.addr_string();
        let sep = endpoint_chain_name(&svc.name, &addr);
        chains.declare(&sep);
        active.insert(sep.clone());
        let c = ctx.ep_comment(&name);
        rule(
            rules,
            &[
                &s(&["-A", &sep]),
                &c,
                &s(&["-s", &host(&ep.ip), "-j", KUBE_MARK_MASQ]),
            ],
        );
        let mut dnat = s(&["-A", &sep]);
        dnat.extend(c);
        if svc.session_affinity_timeout.is_some() {
            dnat.extend(s(&["-m", "recent", "--name", &sep, "--set"]));
        }
        dnat.extend(l4.clone());
        dnat.extend(s(&["-j", "DNAT", "--to-destination", &addr]));
        rule(rules, &[&dnat]);
    }
}

/// Affinity rules, then `statistic` rules: endpoint i of n matches with probability
/// 1/(n-i), the last one always.
fn write_balancing(
    ctx: &Ctx<'_>,
    svc: &ServicePort,
    name: &str,
    chain: &str,
    eps: &[kp_model::Endpoint],
    rules: &mut Lines,
) {
    let with_sep: Vec<(String, String)> = eps
        .iter()
        .map(|e| {
            let a = e.addr_string();
            (endpoint_chain_name(&svc.name, &a), a)
        })
        .collect();
    if let Some(timeout) = svc.session_affinity_timeout {
        let t = timeout.to_string();
        for (sep, addr) in &with_sep {
            rule(
                rules,
                &[
                    &s(&["-A", chain]),
                    &ctx.ep_comment(&format!("{name} -> {addr}")),
                    &s(&[
                        "-m",
                        "recent",
                        "--name",
                        sep,
                        "--rcheck",
                        "--seconds",
                        &t,
                        "--reap",
                        "-j",
                        sep,
                    ]),
                ],
            );
        }
    }
    let n = with_sep.len();
    for (i, (sep, addr)) in with_sep.iter().enumerate() {
        let c = ctx.ep_comment(&format!("{name} -> {addr}"));
        if i + 1 < n {
            let p = format!("{:.10}", 1.0 / (n - i) as f64);
            rule(
                rules,
                &[
                    &s(&["-A", chain]),
                    &c,
                    &s(&[
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p,
                        "-j",
                        sep,
                    ]),
                ],
            );
        } else {
            rule(rules, &[&s(&["-A", chain]), &c, &s(&["-j", sep])]);
        }
    }
}
