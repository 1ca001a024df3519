//! Kernel-object names, exactly as upstream derives them, so operators' tools and docs
//! keep working: `KUBE-SVC-` + first 16 chars of base32(sha256(servicePortName + protocol)).

use kp_model::ServicePortName;
use sha2::{Digest, Sha256};

/// First 16 chars of upper-case base32 (RFC 4648) of SHA-256 of `input`.
pub fn hash_suffix(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut s = data_encoding::BASE32.encode(&digest);
    s.truncate(16);
    s
}

/// `KUBE-SVC-…`, `KUBE-SVL-…`, `KUBE-EXT-…`, `KUBE-FW-…` for a service port.
pub fn service_chain_name(prefix: &str, name: &ServicePortName) -> String {
    format!(
        "{prefix}{}",
        hash_suffix(&format!("{name}{}", name.protocol.lower()))
    )
}

/// `KUBE-SEP-…` for one endpoint (`ip:port`, IPv6 as `[ip]:port`) of a service port.
pub fn endpoint_chain_name(name: &ServicePortName, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash_suffix(&format!("{name}{}{endpoint}", name.protocol.lower()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kp_model::{NamespacedName, Protocol};

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            service: NamespacedName::new(ns, name),
            port: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn upstream_test_vectors() {
        assert_eq!(
            service_chain_name("KUBE-SVC-", &spn("ns1", "svc1", "p80")),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            service_chain_name("KUBE-SVC-", &spn("ns2", "svc2", "p80")),
            "KUBE-SVC-GNZBNJ2PO5MGZ6GT"
        );
        assert_eq!(
            service_chain_name("KUBE-EXT-", &spn("ns4", "svc4", "p80")),
            "KUBE-EXT-4SW47YFZTEDKD3PK"
        );
        assert_eq!(
            endpoint_chain_name(&spn("ns1", "svc1", "p80"), "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }
}
