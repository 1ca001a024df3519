//! Test kit for kube-proxy-rs: an in-process Kubernetes API-server emulator, a
//! network-namespace harness, tiny pod servers and probes, and a mini control plane
//! that turns Deployments and Services into Pods and EndpointSlices.
//!
//! Used by the integration tests and by `kube-proxy-rs sandbox`.

pub mod cluster;
pub mod emulator;
pub mod lab;
pub mod netns;
pub mod podserver;
pub mod probe;
