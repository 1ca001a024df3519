//! nftables object names, as upstream derives them: `<prefix><HASH8>-<ns>/<name>/<proto>/<port>`
//! with HASH8 the first 8 chars of base32(sha256(base)).

use kp_model::ServicePortName;
use sha2::{Digest, Sha256};

fn hash8(s: &str) -> String {
    let mut h = data_encoding::BASE32.encode(&Sha256::digest(s.as_bytes()));
    h.truncate(8);
    h
}

/// `ns/name/proto/port` (port name, may be empty).
pub fn service_base(name: &ServicePortName) -> String {
    format!(
        "{}/{}/{}/{}",
        name.service.namespace,
        name.service.name,
        name.protocol.lower(),
        name.port
    )
}

fn with_hash(prefix: &str, base: &str) -> String {
    hashed_name(prefix, &hash8(base), base)
}

/// `<prefix><hash>-<base>`, truncated as upstream does.
fn hashed_name(prefix: &str, hash: &str, base: &str) -> String {
    let mut s = format!("{prefix}{hash}-{base}");
    // Kernel object names are limited; upstream truncates long ones the same way.
    if s.len() > 240 {
        s.truncate(237);
        s.push_str("...");
    }
    s
}

/// `service-…`, `local-…`, `external-…`, `firewall-…` chain of a service port.
pub fn service_chain(prefix: &str, name: &ServicePortName) -> String {
    with_hash(prefix, &service_base(name))
}

/// [`service_chain`] for several prefixes of one service port, hashing its base once.
pub struct ServiceChains {
    base: String,
    hash: String,
}

impl ServiceChains {
    pub fn new(name: &ServicePortName) -> Self {
        let base = service_base(name);
        let hash = hash8(&base);
        ServiceChains { base, hash }
    }

    /// Equals `service_chain(prefix, name)`.
    pub fn chain(&self, prefix: &str) -> String {
        hashed_name(prefix, &self.hash, &self.base)
    }
}

/// `endpoint-…` chain (and, with prefix `affinity-`, the affinity set) of an endpoint:
/// base `ns/name/proto/port__ip/port`, IPv6 colons written as dots.
pub fn endpoint_object(
    prefix: &str,
    name: &ServicePortName,
    ip: &std::net::IpAddr,
    port: u16,
) -> String {
    let ip = ip.to_string().replace(':', ".");
    with_hash(prefix, &format!("{}__{ip}/{port}", service_base(name)))
}

/// Names we emit are made only of these characters (object names come from validated
/// Kubernetes names; this is a second line of defence before text reaches `nft`).
pub fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kp_model::{NamespacedName, Protocol};

    #[test]
    fn upstream_vectors() {
        let n = ServicePortName {
            service: NamespacedName::new("ns1", "svc1"),
            port: "p80".into(),
            protocol: Protocol::Tcp,
        };
        assert_eq!(
            service_chain("service-", &n),
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            endpoint_object("endpoint-", &n, &"10.180.0.1".parse().unwrap(), 80),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        assert!(is_safe_name(
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        ));
        assert!(!is_safe_name("a\"b"));
        assert!(!is_safe_name("a b"));
    }

    #[test]
    fn service_chains_equal_service_chain_short_and_truncated() {
        for (ns, name, port) in [("ns1", "svc1", "p80"), ("n", &"x".repeat(250), "")] {
            let n = ServicePortName {
                service: NamespacedName::new(ns, name),
                port: port.into(),
                protocol: Protocol::Udp,
            };
            let c = ServiceChains::new(&n);
            for prefix in ["service-", "local-", "external-", "firewall-"] {
                assert_eq!(c.chain(prefix), service_chain(prefix, &n));
            }
        }
    }
}
