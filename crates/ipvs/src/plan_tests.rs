use super::*;
use crate::test_fixtures::{slice, svc, tracker};
use serde_json::json;

fn ips(s: &[&str]) -> Vec<IpAddr> {
    s.iter().map(|s| s.parse().unwrap()).collect()
}

fn run(objs: &[serde_json::Value], node_addresses: &[&str]) -> Plan {
    let mut t = tracker(objs);
    t.drain();
    let topology = NodeTopology {
        node_name: "node1".into(),
        zone: None,
    };
    let node_ips = ips(&["198.18.0.11"]);
    let node_addresses: BTreeSet<IpAddr> = ips(node_addresses).into_iter().collect();
    let np: Vec<IpAddr> = node_addresses.iter().copied().collect();
    plan(
        t.state(),
        &PlanInput {
            family: IpFamily::V4,
            scheduler: "rr",
            topology: &topology,
            node_ips: &node_ips,
            node_addresses: &node_addresses,
            node_port_ips: &np,
        },
    )
}

fn key(ip: &str, port: u16) -> VsKey {
    VsKey {
        addr: ip.parse().unwrap(),
        protocol: Protocol::Tcp,
        port,
    }
}

fn reals(p: &Plan, ip: &str, port: u16) -> Vec<String> {
    p.virtual_servers[&key(ip, port)]
        .real_servers
        .iter()
        .map(|r| r.to_string())
        .collect()
}

fn members(p: &Plan, s: Set) -> Vec<&str> {
    p.sets[&s].iter().map(String::as_str).collect()
}

#[test]
fn cluster_ip_node_port_external_ip_and_lb_become_virtual_servers_and_set_members() {
    let p = run(
        &[
            json!({"kind": "Service", "metadata": {"namespace": "ns", "name": "web"},
                "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                    "externalIPs": ["203.0.113.7", "198.18.0.11"],
                    "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30080}],
                    "loadBalancerSourceRanges": ["192.0.2.0/24"]},
                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.100"}]}}}),
            slice(
                "web",
                &[("10.244.1.2", "node1"), ("10.244.2.2", "node2")],
                "TCP",
            ),
        ],
        &["198.18.0.11", "10.0.0.5"],
    );
    let both = ["10.244.1.2:8080", "10.244.2.2:8080"];
    for (ip, port) in [
        ("10.96.0.10", 80),
        ("203.0.113.7", 80),
        ("198.18.0.11", 80),
        ("192.0.2.100", 80),
        ("198.18.0.11", 30080),
        ("10.0.0.5", 30080),
    ] {
        assert_eq!(reals(&p, ip, port), both, "{ip}:{port}");
    }
    assert_eq!(p.virtual_servers.len(), 6);
    // The externalIP the node already holds is not bound again.
    assert_eq!(
        p.bound,
        ips(&["10.96.0.10", "192.0.2.100", "203.0.113.7"])
            .into_iter()
            .collect()
    );
    assert_eq!(members(&p, Set::ClusterIp), ["10.96.0.10,tcp:80"]);
    assert_eq!(
        members(&p, Set::ExternalIp),
        ["198.18.0.11,tcp:80", "203.0.113.7,tcp:80"]
    );
    assert_eq!(members(&p, Set::LoadBalancer), ["192.0.2.100,tcp:80"]);
    assert_eq!(members(&p, Set::LoadBalancerFw), ["192.0.2.100,tcp:80"]);
    assert_eq!(
        members(&p, Set::LoadBalancerSourceCidr),
        ["192.0.2.100,tcp:80,192.0.2.0/24"]
    );
    // The node's address is not in the source range: it may not reach the VIP.
    assert!(members(&p, Set::LoadBalancerSourceIp).is_empty());
    assert_eq!(
        p.lb_no_node_access,
        [key("192.0.2.100", 80)].into_iter().collect()
    );
    assert_eq!(members(&p, Set::NodePortTcp), ["30080"]);
    assert!(members(&p, Set::NodePortLocalTcp).is_empty());
    assert_eq!(
        members(&p, Set::LoopBack),
        ["10.244.1.2,tcp:8080,10.244.1.2"]
    );
    assert_eq!(
        members(&p, Set::IpvsIps),
        ["10.96.0.10", "192.0.2.100", "203.0.113.7"]
    );
}

#[test]
fn affinity_and_scheduler_flags() {
    let mut t = tracker(&[
        svc(
            "a",
            "10.96.0.1",
            json!({"sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
        ),
        slice("a", &[("10.244.1.2", "node1")], "TCP"),
    ]);
    t.drain();
    let topology = NodeTopology::default();
    let empty = BTreeSet::new();
    let input = |scheduler| PlanInput {
        family: IpFamily::V4,
        scheduler,
        topology: &topology,
        node_ips: &[],
        node_addresses: &empty,
        node_port_ips: &[],
    };
    let p = plan(t.state(), &input("rr"));
    let vs = &p.virtual_servers[&key("10.96.0.1", 80)];
    assert_eq!(
        (vs.flags, vs.timeout, vs.scheduler.as_str()),
        (FLAG_PERSISTENT, 60, "rr")
    );
    let p = plan(t.state(), &input("mh"));
    let vs = &p.virtual_servers[&key("10.96.0.1", 80)];
    assert_eq!(vs.flags, FLAG_PERSISTENT | FLAG_SOURCE_PORT_HASH);
}

#[test]
fn traffic_policies_local() {
    // Endpoints only on node2; this is node1.
    let p = run(
        &[
            svc(
                "etp",
                "10.96.0.2",
                json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                    "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30081}]}),
            ),
            slice("etp", &[("10.244.2.2", "node2")], "TCP"),
            svc(
                "itp",
                "10.96.0.3",
                json!({"internalTrafficPolicy": "Local"}),
            ),
            slice("itp", &[("10.244.2.3", "node2")], "TCP"),
        ],
        &["198.18.0.11"],
    );
    // ITP Local without a local endpoint: no real server, and dropped by the filter
    // (as the other modes drop it) rather than refused by the empty virtual server.
    assert!(reals(&p, "10.96.0.3", 80).is_empty());
    assert_eq!(members(&p, Set::NoLocalInternal), ["10.96.0.3,tcp:80"]);
    // ETP Local without a local endpoint: the cluster-wide endpoints, for the node and
    // its pods; KUBE-NO-LOCAL-ENDPOINTS lets the filter drop everyone else.
    assert_eq!(reals(&p, "198.18.0.11", 30081), ["10.244.2.2:8080"]);
    assert_eq!(
        members(&p, Set::NoLocalEndpoints),
        ["198.18.0.11,tcp:30081"]
    );
    assert_eq!(members(&p, Set::NodePortLocalTcp), ["30081"]);
    assert_eq!(
        (p.no_local_endpoints_internal, p.no_local_endpoints_external),
        (1, 1)
    );
    // With a local endpoint, only it.
    let p = run(
        &[
            svc(
                "etp",
                "10.96.0.2",
                json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                    "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30081}]}),
            ),
            slice(
                "etp",
                &[("10.244.2.2", "node2"), ("10.244.1.9", "node1")],
                "TCP",
            ),
        ],
        &["198.18.0.11"],
    );
    assert_eq!(reals(&p, "198.18.0.11", 30081), ["10.244.1.9:8080"]);
    assert_eq!(
        reals(&p, "10.96.0.2", 80),
        ["10.244.1.9:8080", "10.244.2.2:8080"]
    );
    assert!(members(&p, Set::NoLocalEndpoints).is_empty());
}

#[test]
fn sctp_node_ports_are_per_address() {
    let p = run(
        &[
            svc(
                "s",
                "10.96.0.4",
                json!({"type": "NodePort",
                    "ports": [{"name": "p", "port": 80, "protocol": "SCTP", "nodePort": 30082}]}),
            ),
            slice("s", &[("10.244.1.2", "node1")], "SCTP"),
        ],
        &["198.18.0.11", "10.0.0.5"],
    );
    assert_eq!(
        members(&p, Set::NodePortSctp),
        ["10.0.0.5,sctp:30082", "198.18.0.11,sctp:30082"]
    );
    assert!(members(&p, Set::NodePortTcp).is_empty());
}
