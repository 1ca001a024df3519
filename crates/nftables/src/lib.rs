//! nftables mode: upstream's table layout (`table ip kube-proxy` / `ip6`), with endpoint
//! selection through one shared verdict map, in-memory state and diff-only partial syncs.
//! See README.md in this crate for the ruleset contract.

mod apply;
mod memory;
mod names;
mod proxier;
mod render;
mod txn;

pub use names::{endpoint_object, service_chain};
pub use proxier::NftProxier;
pub use render::{NftConfig, NftSpelling, ServiceObjects, render_service, skeleton};
