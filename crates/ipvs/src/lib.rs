//! IPVS mode, with upstream kube-proxy's kernel objects: the `kube-ipvs0` dummy device
//! holding every VIP, one IPVS virtual server per service address and port with
//! masquerading real servers, upstream's ipsets, and the nat and filter rules that match
//! them.
//!
//! [`plan`] and [`rules`] are pure (state in, desired objects and rule text out).
//! [`IpvsProxier`] diffs that against what it last wrote and applies only the difference.
#![doc = include_str!("../README.md")]

pub mod ipset;
pub mod kernel;
pub mod link;
mod netlink;
pub mod plan;
mod proxier;
pub mod rules;
#[cfg(test)]
mod test_fixtures;

pub use kernel::{FakeIpvs, IpvsKernel, KernelRs, KernelVs, Op};
pub use link::{FakeDevice, RtnlDevice, VipDevice};
pub use netlink::{NetlinkIpvs, open_netlink};
pub use plan::{Plan, PlanInput, VsKey, VsSpec};
pub use proxier::{DEVICE, IpvsProxier, KernelOpener, conn_reuse_mode_needs_zero};
