//! Real-kernel, multi-node scenarios for protocols and IP families: TCP and UDP
//! ClusterIPs and NodePorts (SCTP by rules only: this kernel has no SCTP sockets), and
//! dual-stack / IPv6-only Services. Expected behaviour is upstream kube-proxy's
//! (iptables mode).
//!
//! The proxy mode comes from `KP_PROXY_MODE` (default `iptables`) so the same traffic
//! assertions can run for other modes; rule-text checks only run in iptables mode.
//! Needs root. Every test builds its own lab.

mod common;

use common::*;
use kp_testkit::cluster::PodInfo;
use kp_testkit::lab::wait_for;
use kp_testkit::netns::TopologySpec;
use kp_testkit::podserver::sctp_supported;
use serde_json::{Value, json};

// ---------------------------------------------------------------- 1. protocols

/// TCP and UDP ClusterIP and NodePort services reach the right pods; one port number
/// with two protocols is two service ports. SCTP by rules only.
#[test]
fn protocols_tcp_udp_and_sctp_rules() {
    let mut lab = new_lab(2);
    start_proxies(&mut lab, &[]);
    let port = |name: &str, port: u16, target: u16, proto: &str, node_port: u16| {
        json!({"name": name, "port": port, "targetPort": target, "protocol": proto,
            "nodePort": node_port})
    };
    let node_port = |app: &str, ports: Vec<Value>| json!({"type": "NodePort", "selector": {"app": app}, "ports": ports});
    apply(
        &mut lab,
        &[
            deployment("web", 2, &[("TCP", 8080)]),
            deployment("dns", 2, &[("UDP", 5353), ("TCP", 5353)]),
            service(
                "web",
                node_port("web", vec![port("http", 80, 8080, "TCP", 30080)]),
            ),
            service(
                "dns",
                node_port(
                    "dns",
                    vec![
                        port("dns", 53, 5353, "UDP", 30053),
                        port("dns-tcp", 53, 5353, "TCP", 30054),
                    ],
                ),
            ),
            service(
                "sctp",
                node_port("web", vec![port("sctp", 7777, 7777, "SCTP", 30077)]),
            ),
        ],
    );
    let (web, dns) = (pods_of(&lab, "web"), pods_of(&lab, "dns"));
    let (web, dns): (Vec<&PodInfo>, Vec<&PodInfo>) = (web.iter().collect(), dns.iter().collect());
    let ext = ext_ns(&lab);
    let (web_ip, dns_ip) = (cluster_ip(&lab, "web"), cluster_ip(&lab, "dns"));
    let (n1, n2) = (node_ip(&lab, 1), node_ip(&lab, 2));
    for (target, l4, want, what) in [
        (addr(web_ip, 80), L4::Tcp, &web, "web ClusterIP tcp"),
        (addr(dns_ip, 53), L4::Udp, &dns, "dns ClusterIP udp"),
        (addr(dns_ip, 53), L4::Tcp, &dns, "dns ClusterIP tcp"),
        (addr(n1, 30080), L4::Tcp, &web, "web NodePort node1"),
        (addr(n2, 30080), L4::Tcp, &web, "web NodePort node2"),
        (addr(n1, 30053), L4::Udp, &dns, "dns NodePort udp node1"),
        (addr(n2, 30053), L4::Udp, &dns, "dns NodePort udp node2"),
        (addr(n2, 30054), L4::Tcp, &dns, "dns NodePort tcp node2"),
    ] {
        see_l4(&lab, &ext, target, l4, want, what);
    }
    // No UDP port 80 on the web service and no TCP NodePort 30053: nobody answers.
    assert!(one_probe(&ext, addr(web_ip, 80), L4::Udp, SHORT).is_err());
    assert!(one_probe(&ext, addr(n1, 30053), L4::Tcp, SHORT).is_err());

    // SCTP: this kernel has no SCTP sockets (no pod can listen, no client can connect),
    // so SCTP traffic cannot be tested here; the rules are checked instead.
    if !sctp_supported(&lab.node_ns(1)).unwrap_or(false) {
        eprintln!("SCTP sockets unsupported by this kernel: SCTP checked by rules only");
    }
    let sctp_ip = cluster_ip(&lab, "sctp");
    if mode() == "ipvs" {
        // A virtual server per address with both pods as real servers, and the NodePort
        // in upstream's per-address SCTP set.
        for n in [1, 2] {
            let node = lab.node_ns(n);
            let want_vs = format!("-A --sctp-service {sctp_ip}:7777");
            let ok = wait_for(SETTLE_ENDPOINTS, || {
                let vs = lab.topology().exec_ok(&node, &["ipvsadm", "-Sn"]).ok()?;
                let sets = lab.topology().exec_ok(&node, &["ipset", "save"]).ok()?;
                let reals = web.iter().all(|pod| {
                    vs.contains(&format!(
                        "-a --sctp-service {sctp_ip}:7777 -r {}:7777",
                        pod.ip
                    ))
                });
                (vs.contains(&want_vs)
                    && reals
                    && sets.contains(&format!(
                        "add KUBE-NODE-PORT-SCTP-HASH {},sctp:30077",
                        node_ip(&lab, n)
                    )))
                .then_some(())
            });
            assert!(
                ok.is_some(),
                "node{n}: SCTP virtual server or set member missing:\n{}\n{}",
                lab.topology()
                    .exec_ok(&node, &["ipvsadm", "-Sn"])
                    .unwrap_or_default(),
                lab.topology()
                    .exec_ok(&node, &["ipset", "save"])
                    .unwrap_or_default()
            );
        }
        return;
    }
    if !iptables_mode() {
        return;
    }
    for n in [1, 2] {
        let has_rules = |nat: &str| {
            let rule = |start: &str, parts: &[String]| {
                nat.lines().any(|l| {
                    l.starts_with(start)
                        && l.contains("-p sctp")
                        && parts.iter().all(|p| l.contains(p.as_str()))
                })
            };
            rule(
                "-A KUBE-SERVICES",
                &[format!("-d {sctp_ip}/32"), "--dport 7777".into()],
            ) && rule("-A KUBE-NODEPORTS", &["--dport 30077".into()])
                && web.iter().all(|pod| {
                    let dnat = format!("-j DNAT --to-destination {}:7777", pod.ip);
                    rule("-A KUBE-SEP-", &[dnat])
                })
        };
        let ok = wait_for(SETTLE_ENDPOINTS, || {
            has_rules(&save(&lab, n, "iptables-save", "nat")).then_some(())
        });
        let nat = save(&lab, n, "iptables-save", "nat");
        assert!(
            ok.is_some(),
            "node{n}: SCTP rules missing:\n{nat}\n{}",
            logs(&lab)
        );
    }
}

// ---------------------------------------------------------------- 2. dual-stack

/// A dual-stack Service answers on its IPv4 and IPv6 ClusterIPs and IPv6 NodePorts;
/// pod-to-Service IPv6 traffic is not masqueraded except for hairpin; an IPv6-only
/// Service works.
#[test]
fn dual_stack_services() {
    let mut lab = new_lab_with(TopologySpec::new(2).dual_stack(true));
    let v6_pod_cidr = lab
        .topology()
        .node(1)
        .unwrap()
        .pod_cidr_v6
        .expect("v6 pod CIDR");
    assert!(
        "fd44::/48"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&v6_pod_cidr)
    );
    start_proxies(&mut lab, &["--cluster-cidr=10.244.0.0/16,fd44::/48"]);
    apply(
        &mut lab,
        &[
            deployment("ds", 2, &[("TCP", 8080)]),
            service(
                "ds",
                json!({"type": "NodePort", "selector": {"app": "ds"},
            "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
            "clusterIP": "10.96.100.10", "clusterIPs": ["10.96.100.10", "fd96::10"],
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30090}]}),
            ),
            service(
                "v6only",
                json!({"selector": {"app": "ds"}, "ipFamilyPolicy": "SingleStack",
            "ipFamilies": ["IPv6"], "clusterIP": "fd96::20", "clusterIPs": ["fd96::20"],
            "ports": [{"port": 81, "targetPort": 8080, "protocol": "TCP"}]}),
            ),
        ],
    );
    let pods = pods_of(&lab, "ds");
    assert!(pods.iter().all(|p| p.ipv6.is_some()), "pods are dual-stack");
    let want: Vec<&PodInfo> = pods.iter().collect();
    let ext = ext_ns(&lab);
    let node_v6 = |n: usize| lab.topology().node(n).unwrap().ipv6.expect("node IPv6");
    for (target, what) in [
        (sa("[fd96::10]:80"), "IPv6 ClusterIP from ext"),
        (sa("10.96.100.10:80"), "IPv4 ClusterIP from ext"),
        (sa("[fd96::20]:81"), "IPv6-only service from ext"),
        (addr(node_v6(1), 30090), "IPv6 NodePort node1"),
        (addr(node_v6(2), 30090), "IPv6 NodePort node2"),
    ] {
        let r = see(&lab, &ext, target, &want, what);
        // Off-cluster clients are masqueraded to a node address.
        let masqueraded = r.sources_seen.keys().all(|s| s != "fd18::2" && s != EXT_IP);
        assert!(masqueraded, "{what}: not masqueraded: {r}");
    }

    // From a pod: the other pod sees the pod's own IPv6 address; itself (hairpin) sees
    // the node's bridge address.
    let (me, other) = (&pods[0], &pods[1]);
    assert_eq!(me.node, "node1");
    let bridge_v6 = lab
        .topology()
        .node(1)
        .unwrap()
        .bridge_ipv6
        .unwrap()
        .to_string();
    let r = see(
        &lab,
        &me.netns,
        sa("[fd96::10]:80"),
        &want,
        "pod to IPv6 ClusterIP",
    );
    let seen = |ip: String| r.sources_seen.get(&ip).copied().unwrap_or(0);
    let not_masqueraded = seen(me.ipv6.unwrap().to_string()) == r.answers[&other.name];
    assert!(
        not_masqueraded,
        "pod-to-pod over the IPv6 ClusterIP is not masqueraded: {r}"
    );
    assert_eq!(
        seen(bridge_v6),
        r.answers[&me.name],
        "hairpin is masqueraded: {r}"
    );

    if iptables_mode() {
        let nat6 = save(&lab, 1, "ip6tables-save", "nat");
        let both = nat6.contains("-d fd96::10/128") && nat6.contains("-d fd96::20/128");
        assert!(both, "IPv6 ClusterIP rules missing:\n{nat6}");
        let nat4 = save(&lab, 1, "iptables-save", "nat");
        assert!(
            !nat4.contains("fd96::"),
            "IPv6 rules in the IPv4 table:\n{nat4}"
        );
    }
}
