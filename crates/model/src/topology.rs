//! Endpoint selection (upstream's CategorizeEndpoints): which endpoints each path of a
//! service uses, given readiness, terminating fallback, traffic policies and topology hints.

use crate::types::{Endpoint, ServicePort};

/// What the proxy knows about its own node for topology decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeTopology {
    pub node_name: String,
    /// `topology.kubernetes.io/zone` of the node, if labelled.
    pub zone: Option<String>,
}

/// The endpoint sets of one service port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CategorizedEndpoints {
    /// Used by paths with Cluster policy. Empty when no path uses them.
    pub cluster: Vec<Endpoint>,
    /// Used by paths with Local policy. Empty when no path uses them.
    pub local: Vec<Endpoint>,
    /// Union of both: the endpoints that need DNAT chains.
    pub all_reachable: Vec<Endpoint>,
    /// Some usable endpoint exists anywhere (decides REJECT vs DROP).
    pub has_any: bool,
}

impl CategorizedEndpoints {
    /// The endpoints traffic to the cluster IP goes to (internalTrafficPolicy decides).
    pub fn internal(&self, port: &ServicePort) -> &[Endpoint] {
        if port.internal_policy_local {
            &self.local
        } else {
            &self.cluster
        }
    }

    /// The endpoints external traffic (NodePort, externalIPs, LB VIPs) goes to
    /// (externalTrafficPolicy decides).
    pub fn external(&self, port: &ServicePort) -> &[Endpoint] {
        if port.external_policy_local {
            &self.local
        } else {
            &self.cluster
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameNode,
    SameZone,
}

/// Hints are used only when every ready endpoint carries them and one matches this node
/// (or zone); otherwise all endpoints are used, as upstream does.
fn topology_mode(endpoints: &[Endpoint], node: &NodeTopology) -> TopologyMode {
    let mut all_node_hints = true;
    let mut has_for_node = false;
    let mut all_zone_hints = true;
    let mut has_for_zone = false;
    let mut any_ready = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.contains(&node.node_name) {
            has_for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if node
            .zone
            .as_ref()
            .is_some_and(|z| ep.zone_hints.contains(z))
        {
            has_for_zone = true;
        }
    }
    if !any_ready {
        return TopologyMode::None;
    }
    if all_node_hints && has_for_node {
        return TopologyMode::SameNode;
    }
    if all_zone_hints && has_for_zone {
        return TopologyMode::SameZone;
    }
    TopologyMode::None
}

fn available(ep: &Endpoint, mode: TopologyMode, node: &NodeTopology) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => ep.node_hints.contains(&node.node_name),
        TopologyMode::SameZone => node
            .zone
            .as_ref()
            .is_some_and(|z| ep.zone_hints.contains(z)),
    }
}

/// Splits a service port's endpoints into the cluster-wide and node-local sets.
pub fn categorize_endpoints(
    svc: &ServicePort,
    endpoints: &[Endpoint],
    node: &NodeTopology,
) -> CategorizedEndpoints {
    let mut out = CategorizedEndpoints::default();
    if svc.uses_cluster_endpoints() {
        let mode = topology_mode(endpoints, node);
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available(e, mode, node))
            .cloned()
            .collect();
        // No ready endpoint anywhere (topology was already ignored if none matched):
        // fall back to serving-and-terminating ones, regardless of hints, as upstream.
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .filter(|e| e.serving && e.terminating)
                .cloned()
                .collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !svc.uses_local_endpoints() {
        out.all_reachable = out.cluster.clone();
        return out;
    }
    let mut has_local_ready = false;
    let mut has_local_serving_terminating = false;
    for ep in endpoints {
        if ep.ready || (ep.serving && ep.terminating) {
            out.has_any = true;
        }
        if ep.is_local {
            if ep.ready {
                has_local_ready = true;
            } else if ep.serving && ep.terminating {
                has_local_serving_terminating = true;
            }
        }
    }
    if has_local_ready {
        out.local = endpoints
            .iter()
            .filter(|e| e.is_local && e.ready)
            .cloned()
            .collect();
    } else if has_local_serving_terminating {
        out.local = endpoints
            .iter()
            .filter(|e| e.is_local && e.serving && e.terminating)
            .cloned()
            .collect();
    }
    if !svc.uses_cluster_endpoints() {
        out.all_reachable = out.local.clone();
        return out;
    }
    let mut all = out.cluster.clone();
    for ep in &out.local {
        if !all.contains(ep) {
            all.push(ep.clone());
        }
    }
    out.all_reachable = all;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::*;

    fn svc(itp_local: bool, etp_local: bool, node_port: Option<u16>) -> ServicePort {
        ServicePort {
            external_policy_local: etp_local,
            internal_policy_local: itp_local,
            ..crate::test_support::service_port("svc", node_port)
        }
    }

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool, local: bool) -> Endpoint {
        let ip = format!("10.0.0.{last}");
        crate::test_support::endpoint(&ip, ready, serving, terminating, local)
    }

    fn ips(v: &[Endpoint]) -> Vec<u8> {
        v.iter()
            .map(|e| match e.ip {
                std::net::IpAddr::V4(a) => a.octets()[3],
                _ => 0,
            })
            .collect()
    }

    fn node() -> NodeTopology {
        NodeTopology {
            node_name: "node1".into(),
            zone: Some("zone-a".into()),
        }
    }

    #[test]
    fn ready_only_and_terminating_fallback() {
        let s = svc(false, false, None);
        let eps = [
            ep(1, true, true, false, false),
            ep(2, false, true, true, false),
            ep(3, false, false, false, false),
        ];
        let c = categorize_endpoints(&s, &eps, &node());
        assert_eq!(ips(&c.cluster), vec![1]);
        assert!(c.local.is_empty());
        assert!(c.has_any);
        // No ready endpoint: serving+terminating ones take over; not-ready never.
        let c = categorize_endpoints(&s, &eps[1..], &node());
        assert_eq!(ips(&c.cluster), vec![2]);
        let c = categorize_endpoints(&s, &eps[2..], &node());
        assert!(c.cluster.is_empty());
        assert!(!c.has_any);
    }

    #[test]
    fn internal_local_uses_only_local() {
        let s = svc(true, false, None);
        let eps = [
            ep(1, true, true, false, false),
            ep(2, true, true, false, true),
        ];
        let c = categorize_endpoints(&s, &eps, &node());
        assert!(c.cluster.is_empty());
        assert_eq!(ips(&c.local), vec![2]);
        assert_eq!(ips(&c.all_reachable), vec![2]);
        // None local: nothing reachable, but the service has endpoints (DROP, not REJECT).
        let c = categorize_endpoints(&s, &eps[..1], &node());
        assert!(c.all_reachable.is_empty());
        assert!(c.has_any);
    }

    #[test]
    fn external_local_keeps_both_sets() {
        let s = svc(false, true, Some(30000));
        let eps = [
            ep(1, true, true, false, false),
            ep(2, true, true, false, true),
            ep(3, false, true, true, true),
        ];
        let c = categorize_endpoints(&s, &eps, &node());
        assert_eq!(ips(&c.cluster), vec![1, 2]);
        assert_eq!(ips(&c.local), vec![2]);
        assert_eq!(ips(&c.all_reachable), vec![1, 2]);
        // Local fallback to serving+terminating, separately from the cluster set.
        let eps2 = [
            ep(1, true, true, false, false),
            ep(3, false, true, true, true),
        ];
        let c = categorize_endpoints(&s, &eps2, &node());
        assert_eq!(ips(&c.cluster), vec![1]);
        assert_eq!(ips(&c.local), vec![3]);
        assert_eq!(ips(&c.all_reachable), vec![1, 3]);
    }

    #[test]
    fn zone_hints_used_only_when_complete() {
        let s = svc(false, false, None);
        let mut a = ep(1, true, true, false, false);
        a.zone_hints.insert("zone-a".into());
        let mut b = ep(2, true, true, false, false);
        b.zone_hints.insert("zone-b".into());
        let c = categorize_endpoints(&s, &[a.clone(), b.clone()], &node());
        assert_eq!(ips(&c.cluster), vec![1]);
        // One endpoint without hints: all endpoints are used.
        let plain = ep(3, true, true, false, false);
        let c = categorize_endpoints(&s, &[a.clone(), b.clone(), plain], &node());
        assert_eq!(ips(&c.cluster), vec![1, 2, 3]);
        // No endpoint for our zone: all endpoints are used.
        let c = categorize_endpoints(&s, &[b.clone()], &node());
        assert_eq!(ips(&c.cluster), vec![2]);
        // Node hints win over zone hints when complete and matching.
        let mut n1 = a.clone();
        n1.node_hints.insert("node1".into());
        let mut n2 = b.clone();
        n2.node_hints.insert("node2".into());
        let c = categorize_endpoints(&s, &[n1, n2], &node());
        assert_eq!(ips(&c.cluster), vec![1]);
    }
}
