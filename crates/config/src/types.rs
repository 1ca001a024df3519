//! `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration`, field for field.
//!
//! Mirrors `staging/src/k8s.io/kube-proxy/config/v1alpha1/types.go` (1.33-1.36 plus the
//! newest additions). Fields are declared in the alphabetical order of their JSON
//! names so our YAML output lines up with upstream's `--write-config-to`, which sorts
//! keys. Go pointer fields are `Option`s; everything else defaults to its zero value.
//! Nothing in here is secret: `/configz` serves this struct as-is.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::duration::{GoDuration, string_or_nanos};

/// The `apiVersion` upstream registers for the config file.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The `kind` of the config file object.
pub const KIND: &str = "KubeProxyConfiguration";

/// Everything needed to configure the proxy, as read from `--config`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: String,
    /// The node's primary IP override; kube-proxy binds no socket to it.
    pub bind_address: String,
    pub bind_address_hard_fail: bool,
    pub client_connection: ClientConnectionConfiguration,
    /// Pod CIDR, or a comma-separated dual-stack pair, used by `ClusterCIDR` detection.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    pub config_sync_period: GoDuration,
    pub conntrack: KubeProxyConntrackConfiguration,
    pub detect_local: DetectLocalConfiguration,
    pub detect_local_mode: String,
    pub enable_profiling: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub feature_gates: BTreeMap<String, bool>,
    pub healthz_bind_address: String,
    pub hostname_override: String,
    pub iptables: KubeProxyIPTablesConfiguration,
    pub ipvs: KubeProxyIPVSConfiguration,
    pub kind: String,
    pub logging: LoggingConfiguration,
    pub metrics_bind_address: String,
    pub mode: String,
    pub nftables: KubeProxyNFTablesConfiguration,
    #[serde(serialize_with = "empty_as_null")]
    pub node_port_addresses: Vec<String>,
    pub oom_score_adj: Option<i32>,
    /// Unused upstream since the userspace proxy was removed; kept for compatibility.
    pub port_range: String,
    pub show_hidden_metrics_for_version: String,
    #[serde(skip_serializing_if = "is_false")]
    pub windows_run_as_service: bool,
    pub winkernel: KubeProxyWinkernelConfiguration,
}

/// `componentbaseconfigv1alpha1.ClientConnectionConfiguration`. The kubeconfig path is
/// only a path; credentials never enter this struct.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClientConnectionConfiguration {
    pub accept_content_types: String,
    pub burst: i32,
    pub content_type: String,
    pub kubeconfig: String,
    #[serde(serialize_with = "whole_as_integer")]
    pub qps: f32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyConntrackConfiguration {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_be_liberal: bool,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub udp_stream_timeout: GoDuration,
    pub udp_timeout: GoDuration,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DetectLocalConfiguration {
    pub bridge_interface: String,
    pub interface_name_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyIPTablesConfiguration {
    pub localhost_node_ports: Option<bool>,
    pub masquerade_all: bool,
    pub masquerade_bit: Option<i32>,
    pub min_sync_period: GoDuration,
    /// Newest upstream (post-1.36) opt-in; accepted so newer files load, not implemented.
    #[serde(rename = "snatNodeInternalIP", skip_serializing_if = "Option::is_none")]
    pub snat_node_internal_ip: Option<bool>,
    pub sync_period: GoDuration,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyIPVSConfiguration {
    #[serde(rename = "excludeCIDRs", serialize_with = "empty_as_null")]
    pub exclude_cidrs: Vec<String>,
    pub min_sync_period: GoDuration,
    pub scheduler: String,
    #[serde(rename = "strictARP")]
    pub strict_arp: bool,
    pub sync_period: GoDuration,
    pub tcp_fin_timeout: GoDuration,
    pub tcp_timeout: GoDuration,
    pub udp_timeout: GoDuration,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyNFTablesConfiguration {
    pub masquerade_all: bool,
    pub masquerade_bit: Option<i32>,
    pub min_sync_period: GoDuration,
    pub sync_period: GoDuration,
}

/// Windows/HNS settings; parsed so files load, ignored on Linux.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyWinkernelConfiguration {
    #[serde(rename = "enableDSR")]
    pub enable_dsr: bool,
    pub forward_health_check_vip: bool,
    pub network_name: String,
    pub root_hns_endpoint_name: String,
    pub source_vip: String,
}

/// `logsapi.LoggingConfiguration` from component-base.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LoggingConfiguration {
    #[serde(deserialize_with = "string_or_nanos")]
    pub flush_frequency: GoDuration,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub format: String,
    pub options: FormatOptions,
    pub verbosity: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vmodule: Vec<VModuleItem>,
}

/// One `--vmodule` entry (`pattern=N`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VModuleItem {
    pub file_pattern: String,
    pub verbosity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FormatOptions {
    pub json: OutputRoutingOptions,
    pub text: OutputRoutingOptions,
}

/// Split-stream settings shared by the text and json log formats.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OutputRoutingOptions {
    pub info_buffer_size: Quantity,
    #[serde(skip_serializing_if = "is_false")]
    pub split_stream: bool,
}

/// A Kubernetes resource quantity (`0`, `64Ki`, `1M`), kept as text; it may be
/// written as a YAML number or a string.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Unsigned(u64),
        }
        Ok(match Raw::deserialize(deserializer)? {
            Raw::Text(text) => Quantity(text),
            Raw::Unsigned(number) => Quantity(number.to_string()),
        })
    }
}

/// Upstream writes nil lists as `null`; an empty list loads back the same.
fn empty_as_null<S: serde::Serializer>(items: &[String], serializer: S) -> Result<S::Ok, S::Error> {
    if items.is_empty() {
        serializer.serialize_none()
    } else {
        serializer.collect_seq(items)
    }
}

/// Writes `qps: 5` rather than `5.0`, as Go does for whole numbers.
fn whole_as_integer<S: serde::Serializer>(value: &f32, serializer: S) -> Result<S::Ok, S::Error> {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        serializer.serialize_i64(*value as i64)
    } else {
        serializer.serialize_f32(*value)
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}
