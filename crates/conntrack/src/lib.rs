//! Stale UDP conntrack cleanup, talking ctnetlink directly.
//!
//! After a UDP endpoint goes away (or a UDP service goes from 0 to N endpoints), the
//! conntrack entries of existing flows keep steering a client's datagrams to the dead
//! endpoint (or past the service), and every datagram refreshes the entry, so e.g. DNS
//! stays broken. Upstream kube-proxy (1.32+, `pkg/proxy/conntrack`) reconciles after
//! each sync: list UDP entries, delete those whose frontend is served but whose DNAT
//! target is not a serving endpoint. This crate does the same with one netlink socket
//! per reconcile and batched deletes, no `conntrack` process per entry.
//!
//! - [`plan_deletions`] / [`UdpServiceTable`]: the pure decision, unit-tested.
//! - [`Conntrack`]: the socket (dump, batched delete).
//! - [`reconcile`]: both, in the calling thread's network namespace.

mod plan;
mod socket;
mod wire;

pub use plan::{FlowEntry, IPPROTO_UDP, UdpServiceTable, plan_deletions};
pub use socket::{Conntrack, ConntrackError, ReconcileReport, reconcile};
pub use wire::DecodeError;
