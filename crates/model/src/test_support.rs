//! Fixtures for the crate's unit tests.

use std::collections::BTreeSet;

use crate::types::*;

/// TCP port 80 of `ns/name` on 10.96.0.1, everything else off.
pub(crate) fn service_port(name: &str, node_port: Option<u16>) -> ServicePort {
    ServicePort {
        name: ServicePortName {
            service: NamespacedName::new("ns", name),
            port: "p".into(),
            protocol: Protocol::Tcp,
        },
        cluster_ip: "10.96.0.1".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
        node_port,
        session_affinity_timeout: None,
        external_ips: vec![],
        load_balancer_vips: vec![],
        load_balancer_source_ranges: vec![],
        health_check_node_port: None,
        external_policy_local: false,
        internal_policy_local: false,
    }
}

/// An endpoint at `ip`:8080 with these conditions, without hints.
pub(crate) fn endpoint(
    ip: &str,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port: 8080,
        ready,
        serving,
        terminating,
        is_local: local,
        zone_hints: BTreeSet::new(),
        node_hints: BTreeSet::new(),
    }
}
