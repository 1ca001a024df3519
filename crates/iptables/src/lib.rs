//! iptables mode, with upstream kube-proxy's chain names, hashing and rule shapes.
//!
//! [`render`] is pure: state in, `iptables-restore` text out. [`IptablesProxier`] is the thin
//! part that runs `iptables`, `iptables-save` and `iptables-restore` through a
//! [`kp_dataplane::CommandRunner`].

mod proxier;
mod render;
mod service;
mod text;

pub use proxier::{IptablesProxier, Tools};
pub use render::{IptablesConfig, Rendered, render};
pub use text::sanitize_comment;
