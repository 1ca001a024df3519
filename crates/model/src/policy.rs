//! What the Service API decides beyond each port's endpoint sets, computed here once for
//! every mode (upstream keeps the same facts in its service and endpoints trackers): the
//! no-local-endpoint verdicts, the local ready count a healthCheckNodePort serves, and
//! which service owns a NodePort that two services claim.

use std::collections::{BTreeSet, HashMap};

use crate::topology::CategorizedEndpoints;
use crate::types::{Endpoint, NamespacedName, Protocol, ServicePort};

/// Mode-independent facts of one service port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortFacts {
    /// internalTrafficPolicy Local with usable endpoints elsewhere but none on this node:
    /// internal traffic is dropped (`sync_proxy_rules_no_local_endpoints_total{Internal}`).
    pub no_local_internal: bool,
    /// The same for externalTrafficPolicy Local on an externally reachable port.
    pub no_local_external: bool,
    /// The healthCheckNodePort and the number of distinct ready endpoints on this node.
    pub health_check: Option<(u16, usize)>,
}

/// The facts of `port`, whose endpoints are `eps`, categorized as `cat`.
pub fn port_facts(port: &ServicePort, eps: &[Endpoint], cat: &CategorizedEndpoints) -> PortFacts {
    let no_local = cat.has_any && cat.local.is_empty();
    PortFacts {
        no_local_internal: no_local && port.internal_policy_local,
        no_local_external: no_local && port.external_policy_local && port.externally_accessible(),
        health_check: port.health_check_node_port.map(|hc| {
            let local_ready: BTreeSet<_> = eps
                .iter()
                .filter(|e| e.is_local && e.ready)
                .map(|e| e.ip)
                .collect();
            (hc, local_ready.len())
        }),
    }
}

/// Which service owns each NodePort. The API server keeps NodePorts unique, so a clash
/// means a broken writer: the service that claimed first keeps it, the other port keeps
/// its ClusterIP and loses only its NodePort, with a warning naming both.
#[derive(Debug, Clone, Default)]
pub struct NodePortClaims {
    owners: HashMap<(Protocol, u16), NamespacedName>,
}

impl NodePortClaims {
    /// Drops the claims of `svc` (deleted, or about to claim again).
    pub fn release(&mut self, svc: &NamespacedName) {
        self.owners.retain(|_, owner| owner != svc);
    }

    /// Claims the NodePorts of `svc`'s `ports`. Returns the ones another service holds,
    /// with a warning each in `warnings`.
    pub fn claim<'a>(
        &mut self,
        svc: &NamespacedName,
        ports: impl IntoIterator<Item = &'a ServicePort>,
        warnings: &mut Vec<String>,
    ) -> Vec<(Protocol, u16)> {
        let mut lost = Vec::new();
        for port in ports {
            let Some(np) = port.node_port else { continue };
            match self.owners.get(&(port.protocol, np)) {
                Some(owner) if owner != svc => {
                    warnings.push(format!(
                        "service {}: nodePort {np}/{} is already used by {owner}; its NodePort rules are skipped",
                        port.name,
                        port.protocol.upper()
                    ));
                    lost.push((port.protocol, np));
                }
                _ => {
                    self.owners.insert((port.protocol, np), svc.clone());
                }
            }
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{NodeTopology, categorize_endpoints};

    fn port(name: &str, node_port: Option<u16>) -> ServicePort {
        crate::test_support::service_port(name, node_port)
    }

    fn ep(ip: &str, local: bool, ready: bool) -> Endpoint {
        crate::test_support::endpoint(ip, ready, ready, false, local)
    }

    fn facts(p: &ServicePort, eps: &[Endpoint]) -> PortFacts {
        let node = NodeTopology {
            node_name: "node1".into(),
            zone: None,
        };
        port_facts(p, eps, &categorize_endpoints(p, eps, &node))
    }

    #[test]
    fn no_local_endpoints_only_when_others_exist() {
        let mut p = port("a", Some(30080));
        p.internal_policy_local = true;
        p.external_policy_local = true;
        let remote = [ep("10.244.2.2", false, true)];
        let f = facts(&p, &remote);
        assert!(f.no_local_internal && f.no_local_external, "{f:?}");
        // No endpoint anywhere: REJECT, not "no local endpoints".
        let f = facts(&p, &[]);
        assert!(!f.no_local_internal && !f.no_local_external, "{f:?}");
        // A local one: neither.
        let f = facts(&p, &[ep("10.244.1.2", true, true), remote[0].clone()]);
        assert!(!f.no_local_internal && !f.no_local_external, "{f:?}");
        // External Local on a port nobody reaches from outside: not counted.
        let mut internal_only = port("b", None);
        internal_only.external_policy_local = true;
        assert!(!facts(&internal_only, &remote).no_local_external);
    }

    #[test]
    fn health_check_counts_distinct_local_ready_addresses() {
        let mut p = port("a", Some(30080));
        p.external_policy_local = true;
        p.health_check_node_port = Some(32000);
        let mut same_ip_other_port = ep("10.244.1.2", true, true);
        same_ip_other_port.port = 9090;
        let eps = [
            ep("10.244.1.2", true, true),
            same_ip_other_port,
            ep("10.244.1.3", true, false),
            ep("10.244.2.2", false, true),
        ];
        assert_eq!(facts(&p, &eps).health_check, Some((32000, 1)));
        assert_eq!(facts(&port("b", None), &eps).health_check, None);
    }

    #[test]
    fn first_claimant_keeps_a_node_port_until_it_releases_it() {
        let mut claims = NodePortClaims::default();
        let (a, b) = (port("a", Some(30080)), port("b", Some(30080)));
        let mut w = vec![];
        assert!(claims.claim(&a.name.service, [&a], &mut w).is_empty());
        assert_eq!(
            claims.claim(&b.name.service, [&b], &mut w),
            [(Protocol::Tcp, 30080)]
        );
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("ns/b") && w[0].contains("ns/a") && w[0].contains("30080/TCP"),
            "{w:?}"
        );
        // Claiming again is idempotent for the owner.
        assert!(claims.claim(&a.name.service, [&a], &mut w).is_empty());
        claims.release(&a.name.service);
        assert!(claims.claim(&b.name.service, [&b], &mut w).is_empty());
        // Another protocol is another NodePort.
        let mut udp = port("c", Some(30080));
        udp.protocol = Protocol::Udp;
        assert!(claims.claim(&udp.name.service, [&udp], &mut w).is_empty());
    }
}
