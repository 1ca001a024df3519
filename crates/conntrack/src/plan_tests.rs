use std::collections::BTreeSet;
use std::sync::Arc;

use kp_model::{Endpoint, NamespacedName, ServicePort, ServicePortName};

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

const CLIENT: &str = "198.18.0.2";
const SVC: &str = "10.96.0.10";
const LB: &str = "203.0.113.7";
const NODE: &str = "198.18.0.11";
const POD_A: &str = "10.244.1.2";
const POD_B: &str = "10.244.1.3";
const POD_GONE: &str = "10.244.1.9";

/// DNS on 10.96.0.10:53 and LB 203.0.113.7:53 served by pods A and B, NodePort 30053
/// served by pod A; 10.96.0.10:54 has no endpoints; 10.96.0.20:30053 (a service port
/// that equals the NodePort) is served by pod B.
fn table() -> UdpServiceTable {
    let mut table = UdpServiceTable::new();
    table
        .add_service_ip(ip(SVC), 53, [ip(POD_A), ip(POD_B)])
        .add_service_ip(ip(LB), 53, [ip(POD_A), ip(POD_B)])
        .add_service_ip(ip(SVC), 54, [])
        .add_service_ip(ip("10.96.0.20"), 30053, [ip(POD_B)])
        .add_node_port(30053, [ip(POD_A)]);
    table
}

fn udp(dst: &str, dport: u16, reply_src: &str, reply_sport: u16) -> FlowEntry {
    FlowEntry::udp(
        ip(CLIENT),
        40000,
        ip(dst),
        dport,
        ip(reply_src),
        reply_sport,
    )
}

#[test]
fn plan_rules_table() {
    let tcp = FlowEntry {
        protocol: 6,
        ..udp(SVC, 53, POD_GONE, 5353)
    };
    let cases: Vec<(&str, FlowEntry, bool)> = vec![
        (
            "DNAT to a serving endpoint",
            udp(SVC, 53, POD_A, 5353),
            false,
        ),
        (
            "DNAT to another serving endpoint",
            udp(SVC, 53, POD_B, 5353),
            false,
        ),
        (
            "DNAT to a removed endpoint",
            udp(SVC, 53, POD_GONE, 5353),
            true,
        ),
        (
            "no DNAT while the service has endpoints (0 -> N)",
            udp(SVC, 53, SVC, 53),
            true,
        ),
        (
            "endpoint IP matches, port differs (IP-only, as upstream)",
            udp(SVC, 53, POD_A, 9999),
            false,
        ),
        (
            "LB VIP to a removed endpoint",
            udp(LB, 53, POD_GONE, 5353),
            true,
        ),
        (
            "LB VIP to a serving endpoint",
            udp(LB, 53, POD_B, 5353),
            false,
        ),
        (
            "service port without endpoints, stale DNAT",
            udp(SVC, 54, POD_GONE, 5353),
            false,
        ),
        (
            "service port without endpoints, no DNAT",
            udp(SVC, 54, SVC, 54),
            false,
        ),
        (
            "same IP, port not a service port",
            udp(SVC, 55, POD_GONE, 5353),
            false,
        ),
        (
            "unrelated destination",
            udp("10.96.0.99", 53, POD_GONE, 5353),
            false,
        ),
        (
            "NodePort to the serving endpoint",
            udp(NODE, 30053, POD_A, 5353),
            false,
        ),
        (
            "NodePort to a removed endpoint",
            udp(NODE, 30053, POD_GONE, 5353),
            true,
        ),
        (
            "NodePort without DNAT (0 -> N)",
            udp(NODE, 30053, NODE, 30053),
            true,
        ),
        (
            "service port equal to a NodePort, serving endpoint",
            udp("10.96.0.20", 30053, POD_B, 5353),
            false,
        ),
        (
            "service port equal to a NodePort, removed endpoint",
            udp("10.96.0.20", 30053, POD_A, 5353),
            true,
        ),
        ("TCP entry to a removed endpoint", tcp, false),
    ];
    let table = table();
    for (name, entry, want) in &cases {
        assert_eq!(table.is_stale(entry), *want, "case {name:?}: {entry}");
    }
    let entries: Vec<FlowEntry> = cases.iter().map(|(_, e, _)| e.clone()).collect();
    let want: Vec<FlowEntry> = cases
        .iter()
        .filter(|(_, _, stale)| *stale)
        .map(|(_, e, _)| e.clone())
        .collect();
    assert_eq!(plan_deletions(&entries, &table), want);
}

#[test]
fn empty_table_deletes_nothing() {
    let table = UdpServiceTable::new();
    assert!(table.is_empty());
    let entries = [udp(SVC, 53, POD_GONE, 5353), udp(SVC, 53, SVC, 53)];
    assert!(plan_deletions(&entries, &table).is_empty());
}

#[test]
fn node_port_restricted_to_node_addresses() {
    let mut table = table();
    table.restrict_node_ports_to([ip(NODE), ip("127.0.0.1")]);
    assert!(table.is_stale(&udp(NODE, 30053, POD_GONE, 5353)));
    assert!(table.is_stale(&udp("127.0.0.1", 30053, POD_GONE, 5353)));
    // A pod talking to some outside host on port 30053 is not a NodePort flow.
    assert!(!table.is_stale(&udp("192.0.2.1", 30053, "192.0.2.1", 30053)));
}

#[test]
fn ipv6_entries() {
    let mut table = UdpServiceTable::new();
    table.add_service_ip(ip("fd96::a"), 53, [ip("fd44:0:0:1::2")]);
    let client = ip("fd18::2");
    let fresh = FlowEntry::udp(client, 1234, ip("fd96::a"), 53, ip("fd44:0:0:1::2"), 53);
    let stale = FlowEntry::udp(client, 1234, ip("fd96::a"), 53, ip("fd44:0:0:1::9"), 53);
    assert_eq!(fresh.family, IpFamily::V6);
    assert_eq!(plan_deletions(&[fresh, stale.clone()], &table), vec![stale]);
}

#[test]
fn merging_a_frontend_twice_unions_endpoints() {
    let mut table = UdpServiceTable::new();
    table
        .add_service_ip(ip(SVC), 53, [ip(POD_A)])
        .add_service_ip(ip(SVC), 53, [ip(POD_B)]);
    assert!(!table.is_stale(&udp(SVC, 53, POD_A, 53)));
    assert!(!table.is_stale(&udp(SVC, 53, POD_B, 53)));
    assert!(table.is_stale(&udp(SVC, 53, POD_GONE, 53)));
}

#[test]
fn is_dnat() {
    assert!(!udp(SVC, 53, SVC, 53).is_dnat());
    assert!(udp(SVC, 53, POD_A, 53).is_dnat());
    assert!(udp(SVC, 53, SVC, 5353).is_dnat());
}

fn port(name: &str, protocol: Protocol, cluster_ip: &str, port: u16) -> ServicePort {
    ServicePort {
        name: ServicePortName {
            service: NamespacedName::new("default", name),
            port: "p".to_string(),
            protocol,
        },
        cluster_ip: ip(cluster_ip),
        port,
        protocol,
        node_port: None,
        session_affinity_timeout: None,
        external_ips: Vec::new(),
        load_balancer_vips: Vec::new(),
        load_balancer_source_ranges: Vec::new(),
        health_check_node_port: None,
        external_policy_local: false,
        internal_policy_local: false,
    }
}

fn endpoint(addr: &str, serving: bool) -> Endpoint {
    Endpoint {
        ip: ip(addr),
        port: 5353,
        ready: serving,
        serving,
        terminating: !serving,
        is_local: false,
        zone_hints: BTreeSet::new(),
        node_hints: BTreeSet::new(),
    }
}

fn state(ports: Vec<(ServicePort, Vec<Endpoint>)>) -> ProxyState {
    let mut state = ProxyState::default();
    for (svc, eps) in ports {
        state.endpoints.insert(svc.name.clone(), Arc::new(eps));
        state.services.insert(svc.name.clone(), Arc::new(svc));
    }
    state
}

#[test]
fn from_state_takes_udp_frontends_and_serving_endpoints() {
    let mut dns = port("dns", Protocol::Udp, SVC, 53);
    dns.external_ips = vec![ip("192.0.2.50")];
    dns.load_balancer_vips = vec![ip(LB)];
    dns.node_port = Some(30053);
    // Policies must not matter.
    dns.internal_policy_local = true;
    let tcp = port("web", Protocol::Tcp, "10.96.0.30", 80);
    let empty = port("idle", Protocol::Udp, "10.96.0.40", 53);
    let state = state(vec![
        (
            dns,
            vec![
                endpoint(POD_A, true),
                endpoint(POD_B, false),
                endpoint("fd44::5", true),
            ],
        ),
        (tcp, vec![endpoint(POD_A, true)]),
        (empty, vec![endpoint(POD_B, false)]),
    ]);
    let table = UdpServiceTable::from_state(&state, IpFamily::V4);
    for dst in [SVC, LB, "192.0.2.50"] {
        assert!(!table.is_stale(&udp(dst, 53, POD_A, 5353)), "{dst} -> A");
        // Pod B is not serving (terminating and not serving): its flows are stale.
        assert!(table.is_stale(&udp(dst, 53, POD_B, 5353)), "{dst} -> B");
    }
    assert!(table.is_stale(&udp(NODE, 30053, NODE, 30053)));
    assert!(!table.is_stale(&udp(NODE, 30053, POD_A, 5353)));
    // TCP services and services without serving endpoints are not in the table.
    assert!(!table.is_stale(&udp("10.96.0.30", 80, POD_GONE, 80)));
    assert!(!table.is_stale(&udp("10.96.0.40", 53, POD_GONE, 53)));

    let v6 = UdpServiceTable::from_state(&state, IpFamily::V6);
    // No IPv6 frontend, only the NodePort with the IPv6 endpoint.
    assert!(!v6.is_stale(&FlowEntry::udp(
        ip("fd18::2"),
        1,
        ip("fd96::a"),
        53,
        ip("fd44::9"),
        53
    )));
    assert!(v6.is_stale(&FlowEntry::udp(
        ip("fd18::2"),
        1,
        ip("fd18::11"),
        30053,
        ip("fd44::9"),
        53
    )));
    assert!(!v6.is_stale(&FlowEntry::udp(
        ip("fd18::2"),
        1,
        ip("fd18::11"),
        30053,
        ip("fd44::5"),
        53
    )));
}
