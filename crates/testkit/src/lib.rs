//! Test kit for kube-proxy-rs: the in-process Kubernetes API-server emulator (re-exported
//! from `kp-emulator`), a network-namespace harness, tiny pod servers and probes, and a mini control plane
//! that turns Deployments and Services into Pods and EndpointSlices.
//!
//! Used by the integration tests, the bench and `kp-sandbox`; never by the
//! `kube-proxy-rs` binary.

pub mod cluster;
pub use kp_emulator as emulator;
pub mod lab;
pub mod netns;
pub mod podserver;
pub mod probe;
