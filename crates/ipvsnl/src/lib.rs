//! A synchronous client for the kernel's IPVS over generic netlink (family "IPVS",
//! version 1, include/uapi/linux/ip_vs.h): list, add, update and delete virtual services
//! and their real servers, read and set connection timeouts, flush; and
//! [`IpvsClient::apply`], which sends thousands of changes per datagram and reports each
//! one's outcome, so a full sync costs a few round trips instead of one per object.
//!
//! The client works in the network namespace of the thread that opened it. Encoding and
//! decoding (`wire`) are pure and unit-tested; tests/kernel.rs runs against a real IPVS.

mod client;
mod types;
mod wire;
#[cfg(test)]
mod wire_tests;

use std::io;

pub use client::IpvsClient;
pub use kp_netlink::Malformed;
pub use types::{
    Family, ForwardMethod, FwmarkService, Info, Op, Protocol, RealServer, Service, ServiceKey,
    Timeouts, Version, VirtualServer, flags, full_netmask,
};

/// What can go wrong talking to IPVS. Every variant but `NotAvailable` names the
/// operation, e.g. `add real server 10.0.0.1:80 to TCP 10.96.0.1:80: File exists (errno 17)`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no generic netlink family "IPVS": ip_vs is not loaded (and could
    /// not be loaded on demand) or not built.
    #[error(
        "IPVS is not available: the kernel has no generic netlink family \"IPVS\" (is the ip_vs module loaded?)"
    )]
    NotAvailable,
    /// The socket failed (open, send, receive, timeout).
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused the operation.
    #[error("{op}: {}", describe(*errno, message.as_deref()))]
    Kernel {
        op: String,
        /// Positive errno: EEXIST (exists), ESRCH (no such service), ENOENT (no such
        /// real server, or unknown scheduler), EINVAL, ERANGE (negative weight), ...
        errno: i32,
        /// The kernel's extended-ack text, when it gave one.
        message: Option<String>,
    },
    /// The operation's ack never came (receive buffer overrun): it may or may not have
    /// been applied.
    #[error(
        "{op}: no acknowledgement from the kernel (replies lost to a receive buffer overrun); outcome unknown"
    )]
    Unconfirmed { op: String },
    /// The kernel's answer did not decode.
    #[error("{op}: undecodable answer: {reason}")]
    Decode { op: String, reason: Malformed },
}

fn describe(errno: i32, message: Option<&str>) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text
        .strip_suffix(&format!(" (os error {errno})"))
        .unwrap_or(&text);
    let mut out = format!("{text} (errno {errno})");
    if errno == libc::ESRCH {
        out.push_str(": the virtual service does not exist");
    }
    if let Some(m) = message.filter(|m| !m.is_empty()) {
        out.push_str(": ");
        out.push_str(m);
    }
    out
}

impl Error {
    /// The kernel's errno for [`Error::Kernel`], or the socket's for [`Error::Io`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub fn is_not_available(&self) -> bool {
        matches!(self, Error::NotAvailable)
    }

    /// The operation the error is about (`None` for [`Error::NotAvailable`]).
    pub fn op(&self) -> Option<&str> {
        match self {
            Error::NotAvailable => None,
            Error::Io { op, .. }
            | Error::Kernel { op, .. }
            | Error::Unconfirmed { op }
            | Error::Decode { op, .. } => Some(op),
        }
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        let kind = match &err {
            Error::NotAvailable => io::ErrorKind::Unsupported,
            Error::Io { source, .. } => source.kind(),
            Error::Kernel { errno, .. } => io::Error::from_raw_os_error(*errno).kind(),
            Error::Unconfirmed { .. } => io::ErrorKind::TimedOut,
            Error::Decode { .. } => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, err)
    }
}
