//! The service/endpoint model of kube-proxy-rs, with upstream kube-proxy semantics.
//!
//! Pure: takes Kubernetes objects (k8s-openapi types) and returns data. No tokio, no
//! kube client, no syscalls. The watchers feed [`ChangeTracker`]; the sync loop drains it
//! once per sync into a [`ProxyState`] plus the set of services that changed.
//!
//! The README below (the crate's contract and the validation-parity table) is part of
//! these docs.
#![doc = include_str!("../README.md")]

mod convert;
mod ip;
mod names;
mod policy;
#[cfg(test)]
mod test_support;
mod topology;
mod tracker;
mod types;

pub use convert::{
    ConvertError, endpoints_from_slice, service_families, service_ports_from_service,
    validate_dns_label,
};
pub use ip::{parse_cidr_sloppy, parse_ip_sloppy};
pub use names::{is_dns1123_label, is_dns1123_subdomain};
pub use policy::{NodePortClaims, PortFacts, port_facts};
pub use topology::{CategorizedEndpoints, NodeTopology, categorize_endpoints};
pub use tracker::{ChangeSet, ChangeTracker, ProxyState, SliceKey};
pub use types::*;
