//! Real-kernel scenarios for the node addresses a Service answers on and the source
//! addresses the proxy treats as local: `--nodeport-addresses`, localhost NodePorts with
//! the CVE-2020-8558 martian drop, and `--detect-local-mode`. Expected behaviour is
//! upstream kube-proxy's (iptables mode); assertions about traffic hold for every mode,
//! rule-shape checks run only when the mode is iptables.
//!
//! The mode comes from `KP_PROXY_MODE` (default `iptables`). Needs root.

mod common;

use std::net::SocketAddr;

use common::*;
use kp_testkit::lab::{localhost, wait_for};
use kp_testkit::netns::get_sysctl;
use kp_testkit::probe::{ProbeError, probe_tcp, tcp_connect_once};
use serde_json::json;

// ---------------------------------------------------------------------------------------
// 6. --nodeport-addresses
// ---------------------------------------------------------------------------------------

#[test]
fn nodeport_addresses_restrict_which_node_addresses_answer() {
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 2, Some(json!({"type": "NodePort"})));
    let pods = all_pods(&lab, "web");
    let node1 = lab.node_ns(1);
    // A second fabric address: inside 198.18.0.0/24 but not the Node's InternalIP.
    ip_cmd(
        &lab,
        &node1,
        &["addr", "add", "198.18.0.111/24", "dev", "eth0"],
    );
    let (client, _) = client_pod(&mut lab, 1, "client1");
    let ext = ext_ns(&lab);
    let np = node_port(&lab, "web");
    let primary = SocketAddr::new(node_ip(&lab, 1), np);
    let secondary: SocketAddr = format!("198.18.0.111:{np}").parse().unwrap();
    let bridge = SocketAddr::new(lab.topology().node(1).unwrap().bridge_ip, np);
    let loopback: SocketAddr = format!("127.0.0.1:{np}").parse().unwrap();

    start(&mut lab, 1, &["--nodeport-addresses=198.18.0.0/24"]);
    wait_answered_by(&lab, &ext, primary, &pods, "CIDR mode: ext -> node IP");
    wait_answered_by(
        &lab,
        &ext,
        secondary,
        &pods,
        "CIDR mode: ext -> second IP in CIDR",
    );
    wait_answered_by(&lab, &client, primary, &pods, "CIDR mode: pod -> node IP");
    assert_not_answered(&lab, &client, bridge, "CIDR mode: pod -> bridge IP");
    assert_not_answered(&lab, &node1, loopback, "CIDR mode: node -> 127.0.0.1");
    if iptables_mode() {
        let nat = lab.iptables_save(1, "nat").unwrap();
        assert!(
            !nat.contains("--dst-type LOCAL -j KUBE-NODEPORTS"),
            "no match-all NodePort rule with --nodeport-addresses:\n{nat}"
        );
    }

    lab.stop_proxy(1, false);
    start(&mut lab, 1, &["--nodeport-addresses=primary"]);
    let gone = wait_for(SETTLE, || {
        let r = probe_tcp(&ext, secondary, 1, SHORT).ok()?;
        (r.total_ok() == 0).then_some(())
    });
    assert!(
        gone.is_some(),
        "primary mode: the second address 198.18.0.111 still answers\n{}",
        logs(&lab)
    );
    wait_answered_by(
        &lab,
        &ext,
        primary,
        &pods,
        "primary mode: ext -> InternalIP",
    );
    wait_answered_by(
        &lab,
        &client,
        primary,
        &pods,
        "primary mode: pod -> InternalIP",
    );
    assert_not_answered(&lab, &ext, secondary, "primary mode: ext -> second address");
    assert_not_answered(&lab, &client, bridge, "primary mode: pod -> bridge IP");
    assert_not_answered(&lab, &node1, loopback, "primary mode: node -> 127.0.0.1");
}

// ---------------------------------------------------------------------------------------
// 7. Localhost NodePorts and the CVE-2020-8558 martian drop
// ---------------------------------------------------------------------------------------

#[test]
fn localhost_nodeports_work_and_remote_packets_to_localhost_are_dropped() {
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 2, Some(json!({"type": "NodePort"})));
    let pods = all_pods(&lab, "web");
    let node1 = lab.node_ns(1);
    let ext = ext_ns(&lab);
    start(&mut lab, 1, &[]);
    let np = node_port(&lab, "web");
    let loopback: SocketAddr = format!("127.0.0.1:{np}").parse().unwrap();
    if mode() == "nftables" || mode() == "ipvs" {
        // Upstream's nftables and IPVS modes have no localhost NodePorts (a deliberate
        // difference): the NodePort answers on the node IP, 127.0.0.1 gets nothing,
        // route_localnet stays off.
        let node_np = SocketAddr::new(node_ip(&lab, 1), np);
        wait_answered_by(&lab, &node1, node_np, &pods, "node1 -> nodeIP:NodePort");
        assert!(
            tcp_connect_once(&node1, loopback, SHORT).is_err(),
            "127.0.0.1:NodePort must not answer in {} mode",
            mode()
        );
        assert_eq!(
            get_sysctl(&node1, "net.ipv4.conf.all.route_localnet")
                .unwrap()
                .trim(),
            "0"
        );
        return;
    }
    wait_answered_by(&lab, &node1, loopback, &pods, "node1 -> 127.0.0.1:NodePort");
    assert_eq!(
        get_sysctl(&node1, "net.ipv4.conf.all.route_localnet")
            .unwrap()
            .trim(),
        "1",
        "kube-proxy sets route_localnet for localhost NodePorts"
    );
    if iptables_mode() {
        let filter = lab.iptables_save(1, "filter").unwrap();
        assert!(
            filter.lines().any(|l| l.starts_with("-A KUBE-FIREWALL")
                && l.contains("! -s 127.0.0.0/8")
                && l.contains("-d 127.0.0.0/8")
                && l.contains("! --ctstate RELATED,ESTABLISHED,DNAT")
                && l.ends_with("-j DROP")),
            "CVE-2020-8558 rule:\n{filter}"
        );
    }

    // ext sends to 127.0.0.1 through node1: route 127.0.0.1 via node1 ahead of ext's local
    // table, and accept the (loopback-sourced) replies should any come back.
    let via = node_ip(&lab, 1).to_string();
    for args in [
        &[
            "rule",
            "add",
            "pref",
            "10",
            "to",
            "127.0.0.1/32",
            "lookup",
            "100",
        ][..],
        &["rule", "add", "pref", "100", "lookup", "local"][..],
        &["rule", "del", "pref", "0"][..],
        &[
            "route",
            "add",
            "127.0.0.1/32",
            "via",
            &via,
            "dev",
            "eth0",
            "table",
            "100",
        ][..],
    ] {
        ip_cmd(&lab, &ext, args);
    }
    lab.topology()
        .exec_ok(
            &ext,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.route_localnet=1",
                "net.ipv4.conf.eth0.route_localnet=1",
            ],
        )
        .unwrap();
    // The proxy's own metrics listener is bound to 127.0.0.1:10249 on node1.
    let metrics = localhost(10249);
    assert!(
        connects(&node1, metrics, T).is_ok(),
        "metrics listener on node1"
    );
    for _ in 0..3 {
        let res = connects(&ext, metrics, SHORT);
        assert!(
            matches!(res, Err(ProbeError::Timeout)),
            "ext -> 127.0.0.1:10249 via node1 must be dropped, got {res:?}\n{}",
            logs(&lab)
        );
    }
    if iptables_mode() {
        // Control: without the drop the same packet reaches the listener, so the drop
        // above is what protected it.
        lab.topology()
            .exec_ok(&node1, &["iptables", "-t", "filter", "-F", "KUBE-FIREWALL"])
            .unwrap();
        assert!(
            connects(&ext, metrics, T).is_ok(),
            "control: without KUBE-FIREWALL ext reaches 127.0.0.1:10249 on node1"
        );
        // Upstream hooks kubelet's chain with uncommented jumps (`iptablesKubeletJumpChains`).
        let filter = lab.iptables_save(1, "filter").unwrap();
        for hook in ["INPUT", "OUTPUT"] {
            assert!(
                filter.contains(&format!("-A {hook} -j KUBE-FIREWALL\n")),
                "{hook} -> KUBE-FIREWALL jump as upstream writes it:\n{filter}"
            );
        }
    }
}

#[test]
fn localhost_nodeports_can_be_disabled() {
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 2, Some(json!({"type": "NodePort"})));
    let pods = all_pods(&lab, "web");
    let node1 = lab.node_ns(1);
    start(&mut lab, 1, &["--iptables-localhost-nodeports=false"]);
    let np = node_port(&lab, "web");
    let node_addr = SocketAddr::new(node_ip(&lab, 1), np);
    wait_answered_by(&lab, &node1, node_addr, &pods, "node1 -> own IP:NodePort");
    let loopback: SocketAddr = format!("127.0.0.1:{np}").parse().unwrap();
    assert_not_answered(
        &lab,
        &node1,
        loopback,
        "node1 -> 127.0.0.1:NodePort, disabled",
    );
    assert_eq!(
        get_sysctl(&node1, "net.ipv4.conf.all.route_localnet")
            .unwrap()
            .trim(),
        "0",
        "route_localnet is left alone when localhost NodePorts are off"
    );
    if iptables_mode() {
        let (nat, filter) = nat_and_filter(&lab, 1);
        assert!(
            nat.lines().any(|l| l.starts_with("-A KUBE-SERVICES")
                && l.contains("! -d 127.0.0.0/8")
                && l.contains("--dst-type LOCAL")
                && l.ends_with("-j KUBE-NODEPORTS")),
            "{nat}"
        );
        assert!(
            !filter
                .lines()
                .any(|l| l.starts_with("-A KUBE-FIREWALL") && l.contains("127.0.0.0/8")),
            "no martian drop without localhost NodePorts:\n{filter}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 8. --detect-local-mode
// ---------------------------------------------------------------------------------------

/// ext -> ClusterIP is masqueraded; a pod on node1 -> ClusterIP keeps its address.
/// `rule` is the local-traffic match the iptables masquerade rule must carry.
fn check_detect_local(flags: &[&str], rule: &str) {
    let mut lab = new_lab(2);
    deploy(&mut lab, "web", "web", 2, Some(json!({})));
    let pods = all_pods(&lab, "web");
    let (client, client_ip) = client_pod(&mut lab, 1, "client1");
    start(&mut lab, 1, flags);
    let ext = ext_ns(&lab);
    let target = SocketAddr::new(cluster_ip(&lab, "web"), 80);
    let node = lab.topology().node(1).unwrap().clone();
    let node_addrs = [node.ip.to_string(), node.bridge_ip.to_string()];

    let r = wait_answered_by(&lab, &ext, target, &pods, "ext -> ClusterIP");
    let r2 = probe_tcp(&ext, target, 20, T).unwrap();
    for report in [&r, &r2] {
        assert!(
            report.sources_seen.keys().all(|s| node_addrs.contains(s)),
            "{flags:?}: off-cluster traffic is masqueraded to node1 {node_addrs:?}: {report}"
        );
    }
    let r = wait_answered_by(&lab, &client, target, &pods, "pod -> ClusterIP");
    let r2 = probe_tcp(&client, target, 20, T).unwrap();
    for report in [&r, &r2] {
        assert!(
            report
                .sources_seen
                .keys()
                .all(|s| *s == client_ip.to_string()),
            "{flags:?}: pod traffic is not masqueraded (pods see {client_ip}): {report}\n{}",
            logs(&lab)
        );
    }
    if iptables_mode() {
        let nat = lab.iptables_save(1, "nat").unwrap();
        assert!(
            nat.lines().any(|l| l.starts_with("-A KUBE-SVC-")
                && l.contains(rule)
                && l.contains(&format!("-d {}/32", target.ip()))
                && l.ends_with("-j KUBE-MARK-MASQ")),
            "{flags:?}: masquerade rule with {rule:?} missing:\n{nat}"
        );
    }
}

#[test]
fn detect_local_mode_cluster_cidr() {
    check_detect_local(&["--detect-local-mode=ClusterCIDR"], "! -s 10.244.0.0/16");
}

#[test]
fn detect_local_mode_node_cidr() {
    check_detect_local(&["--detect-local-mode=NodeCIDR"], "! -s 10.244.1.0/24");
}

#[test]
fn detect_local_mode_bridge_interface() {
    check_detect_local(
        &[
            "--detect-local-mode=BridgeInterface",
            "--pod-bridge-interface=cbr0",
        ],
        "! -i cbr0",
    );
}

/// Pod traffic here enters the node's IP layer on the bridge `cbr0` (the veths are bridge
/// ports, so `-i veth+` never matches routed pod traffic, for upstream kube-proxy too):
/// the prefix that identifies pod traffic on this topology is `cbr`.
#[test]
fn detect_local_mode_interface_name_prefix() {
    check_detect_local(
        &[
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=cbr",
        ],
        "! -i cbr+",
    );
}
