//! The typed view the daemon uses, built from the effective configuration while
//! validating it like upstream `pkg/proxy/apis/config/validation`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::defaults::DEFAULT_IPVS_SCHEDULER;
use crate::duration::GoDuration;
use crate::error::FieldError;
use crate::netparse::{is_valid_port_range, parse_cidr_sloppy, parse_ip_port, parse_ip_sloppy};
use crate::types::KubeProxyConfiguration;

pub use kp_dataplane::Mode;

/// One `nodePortAddresses` entry. The `localhost` and `all` keywords are expanded to
/// their CIDRs (127.0.0.0/8 + ::1/128, 0.0.0.0/0 + ::/0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodePortAddress {
    Cidr(IpNet),
    /// The node's primary IP(s) from the Node object, resolved at run time.
    Primary,
}

/// How traffic from local pods is recognised.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DetectLocalMode {
    /// Source in `Settings::cluster_cidrs` (none configured = no detection).
    ClusterCidr,
    /// Source in the Node's `spec.podCIDRs`.
    NodeCidr,
    BridgeInterface(String),
    InterfaceNamePrefix(String),
}

/// Conntrack sysctls; `None` means "leave the kernel value as-is" (upstream's 0).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConntrackSettings {
    pub max_per_core: Option<u32>,
    /// Only meaningful with `max_per_core`; `None` when max-per-core is 0.
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

/// IPVS settings; timeouts of `None` leave the kernel value as-is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpvsSettings {
    /// Never empty: an empty config value becomes `rr`.
    pub scheduler: String,
    pub exclude_cidrs: Vec<IpNet>,
    pub strict_arp: bool,
    pub tcp_timeout: Option<Duration>,
    pub tcp_fin_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
}

/// The validated, typed settings the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub mode: Mode,
    /// Node name override, trimmed and lower-cased; `None` = use the hostname.
    pub hostname_override: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub master: Option<String>,
    pub api_qps: f32,
    pub api_burst: u32,
    pub api_content_type: String,
    pub bind_address: IpAddr,
    pub bind_address_hard_fail: bool,
    pub cluster_cidrs: Vec<IpNet>,
    /// Empty = accept NodePorts on all local addresses.
    pub node_port_addresses: Vec<NodePortAddress>,
    pub masquerade_all: bool,
    pub masquerade_bit: u32,
    pub localhost_node_ports: bool,
    /// Periods of the selected mode's section (iptables, nftables or ipvs).
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub config_sync_period: Duration,
    /// `None` = server disabled.
    pub metrics_bind_address: Option<SocketAddr>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub detect_local_mode: DetectLocalMode,
    pub conntrack: ConntrackSettings,
    pub ipvs: IpvsSettings,
    pub oom_score_adj: Option<i32>,
    pub verbosity: u32,
    pub feature_gates: BTreeMap<String, bool>,
}

/// Kernel IPVS schedulers (upstream's list plus newer kernel ones).
const IPVS_SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh", "fo", "ovf", "twos",
];

const DETECT_LOCAL_MODES: &str = "ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix";

fn none_if_zero(duration: GoDuration) -> Option<Duration> {
    (!duration.is_zero()).then_some(duration.0)
}

fn parse_mode(mode: &str) -> Result<Mode, FieldError> {
    let reason = "must be iptables, nftables, ipvs or userspace (kernelspace is Windows-only)";
    mode.parse()
        .map_err(|_| FieldError::quoted("mode", mode, reason))
}

fn check_masquerade_bit(field: &str, bit: Option<i32>) -> Result<u32, FieldError> {
    let bit = bit.unwrap_or(crate::defaults::DEFAULT_MASQUERADE_BIT);
    u32::try_from(bit)
        .ok()
        .filter(|bit| *bit <= 31)
        .ok_or_else(|| FieldError::new(field, bit.to_string(), "must be within the range [0, 31]"))
}

/// Checks the selected mode's periods: sync > 0 and min <= sync.
fn check_periods(section: &str, sync: GoDuration, min: GoDuration) -> Result<(), FieldError> {
    if sync.is_zero() {
        return Err(FieldError::new(
            format!("{section}.syncPeriod"),
            sync.to_string(),
            "must be greater than 0",
        ));
    }
    if min > sync {
        return Err(FieldError::new(
            format!("{section}.minSyncPeriod"),
            min.to_string(),
            format!("must be less than or equal to {section}.syncPeriod ({sync})"),
        ));
    }
    Ok(())
}

fn non_negative(field: &str, value: Option<i32>) -> Result<Option<u32>, FieldError> {
    value
        .map(|v| {
            u32::try_from(v).map_err(|_| {
                FieldError::new(field, v.to_string(), "must be greater than or equal to 0")
            })
        })
        .transpose()
}

fn server_address(field: &str, value: &str) -> Result<Option<SocketAddr>, FieldError> {
    if value.is_empty() {
        return Ok(None);
    }
    parse_ip_port(value)
        .map(Some)
        .map_err(|err| FieldError::quoted(field, value, err.reason()))
}

fn cidr_list(field: &str, entries: &[String]) -> Result<Vec<IpNet>, FieldError> {
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            parse_cidr_sloppy(entry.trim()).ok_or_else(|| {
                FieldError::quoted(format!("{field}[{index}]"), entry, "must be a valid CIDR")
            })
        })
        .collect()
}

fn node_port_addresses(entries: &[String]) -> Result<Vec<NodePortAddress>, FieldError> {
    let mut addresses = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let keyword_cidrs: &[&str] = match entry.trim() {
            "primary" => {
                addresses.push(NodePortAddress::Primary);
                continue;
            }
            "localhost" => &["127.0.0.0/8", "::1/128"],
            "all" => &["0.0.0.0/0", "::/0"],
            _ => &[],
        };
        if keyword_cidrs.is_empty() {
            let cidr = parse_cidr_sloppy(entry.trim()).ok_or_else(|| {
                FieldError::quoted(
                    format!("nodePortAddresses[{index}]"),
                    entry,
                    "must be a valid CIDR or one of the keywords primary, localhost, all",
                )
            })?;
            addresses.push(NodePortAddress::Cidr(cidr));
        }
        addresses.extend(
            keyword_cidrs
                .iter()
                .filter_map(|cidr| parse_cidr_sloppy(cidr))
                .map(NodePortAddress::Cidr),
        );
    }
    Ok(addresses)
}

/// Pod CIDRs for ClusterCIDR detection: one CIDR or a dual-stack pair.
fn cluster_cidrs(value: &str) -> Result<Vec<IpNet>, FieldError> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<String> = value.split(',').map(|s| s.trim().to_string()).collect();
    let pair_reason = "must be a single CIDR or a dual-stack pair of CIDRs (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)";
    if entries.len() > 2 {
        return Err(FieldError::quoted("clusterCIDR", value, pair_reason));
    }
    let cidrs = cidr_list("clusterCIDR", &entries)
        .map_err(|err| FieldError::quoted("clusterCIDR", value, err.reason))?;
    if let [first, second] = cidrs.as_slice()
        && matches!(first, IpNet::V4(_)) == matches!(second, IpNet::V4(_))
    {
        return Err(FieldError::quoted("clusterCIDR", value, pair_reason));
    }
    Ok(cidrs)
}

fn detect_local_mode(config: &KubeProxyConfiguration) -> Result<DetectLocalMode, FieldError> {
    let required = |field: &str, value: &str| {
        if value.is_empty() {
            Err(FieldError::quoted(
                field,
                value,
                format!(
                    "must not be empty when detectLocalMode is {}",
                    config.detect_local_mode
                ),
            ))
        } else {
            Ok(value.to_string())
        }
    };
    match config.detect_local_mode.as_str() {
        "ClusterCIDR" => Ok(DetectLocalMode::ClusterCidr),
        "NodeCIDR" => Ok(DetectLocalMode::NodeCidr),
        "BridgeInterface" => required(
            "detectLocal.bridgeInterface",
            &config.detect_local.bridge_interface,
        )
        .map(DetectLocalMode::BridgeInterface),
        "InterfaceNamePrefix" => required(
            "detectLocal.interfaceNamePrefix",
            &config.detect_local.interface_name_prefix,
        )
        .map(DetectLocalMode::InterfaceNamePrefix),
        other => Err(FieldError::quoted(
            "detectLocalMode",
            other,
            format!("must be one of {DETECT_LOCAL_MODES}"),
        )),
    }
}

fn is_major_minor(version: &str) -> bool {
    let mut parts = version.split('.');
    let numeric = |part: Option<&str>| {
        part.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    numeric(parts.next()) && numeric(parts.next()) && parts.next().is_none()
}

/// Validates the effective configuration and converts it. `master` comes from the
/// command line only; `warnings` collects non-fatal findings.
pub(crate) fn build_settings(
    config: &KubeProxyConfiguration,
    master: Option<String>,
    warnings: &mut Vec<String>,
) -> Result<Settings, FieldError> {
    let mode = parse_mode(&config.mode)?;
    let (section, sync, min) = match mode {
        Mode::Ipvs => ("ipvs", config.ipvs.sync_period, config.ipvs.min_sync_period),
        Mode::Nftables => (
            "nftables",
            config.nftables.sync_period,
            config.nftables.min_sync_period,
        ),
        _ => (
            "iptables",
            config.iptables.sync_period,
            config.iptables.min_sync_period,
        ),
    };
    check_periods(section, sync, min)?;

    let iptables_bit =
        check_masquerade_bit("iptables.masqueradeBit", config.iptables.masquerade_bit)?;
    let (masquerade_all, masquerade_bit) = if mode == Mode::Nftables {
        let bit = check_masquerade_bit("nftables.masqueradeBit", config.nftables.masquerade_bit)?;
        (config.nftables.masquerade_all, bit)
    } else {
        (config.iptables.masquerade_all, iptables_bit)
    };

    let ipvs = IpvsSettings {
        scheduler: if config.ipvs.scheduler.is_empty() {
            DEFAULT_IPVS_SCHEDULER.to_string()
        } else {
            config.ipvs.scheduler.clone()
        },
        exclude_cidrs: match cidr_list("ipvs.excludeCIDRs", &config.ipvs.exclude_cidrs) {
            Ok(cidrs) => cidrs,
            Err(err) if mode == Mode::Ipvs => return Err(err),
            // Upstream validates the ipvs section only in ipvs mode.
            Err(err) => {
                warnings.push(format!(
                    "ignoring ipvs.excludeCIDRs entry {}: {}",
                    err.value, err.reason
                ));
                Vec::new()
            }
        },
        strict_arp: config.ipvs.strict_arp,
        tcp_timeout: none_if_zero(config.ipvs.tcp_timeout),
        tcp_fin_timeout: none_if_zero(config.ipvs.tcp_fin_timeout),
        udp_timeout: none_if_zero(config.ipvs.udp_timeout),
    };
    if mode == Mode::Ipvs {
        if !IPVS_SCHEDULERS.contains(&ipvs.scheduler.as_str()) {
            return Err(FieldError::quoted(
                "ipvs.scheduler",
                &config.ipvs.scheduler,
                format!(
                    "must be one of {} or empty (rr)",
                    IPVS_SCHEDULERS.join(", ")
                ),
            ));
        }
        warnings
            .push("proxy mode ipvs is deprecated upstream (1.35+); consider nftables".to_string());
    }

    let ct = &config.conntrack;
    let max_per_core =
        non_negative("conntrack.maxPerCore", ct.max_per_core)?.filter(|max| *max > 0);
    let conntrack_min = non_negative("conntrack.min", ct.min)?;
    let conntrack = ConntrackSettings {
        max_per_core,
        min: max_per_core.and(conntrack_min),
        tcp_established_timeout: ct.tcp_established_timeout.and_then(none_if_zero),
        tcp_close_wait_timeout: ct.tcp_close_wait_timeout.and_then(none_if_zero),
        tcp_be_liberal: ct.tcp_be_liberal,
        udp_timeout: none_if_zero(ct.udp_timeout),
        udp_stream_timeout: none_if_zero(ct.udp_stream_timeout),
    };

    if let Some(score) = config.oom_score_adj.filter(|s| !(-1000..=1000).contains(s)) {
        return Err(FieldError::new(
            "oomScoreAdj",
            score.to_string(),
            "must be within the range [-1000, 1000]",
        ));
    }
    let api_burst = u32::try_from(config.client_connection.burst).map_err(|_| {
        FieldError::new(
            "clientConnection.burst",
            config.client_connection.burst.to_string(),
            "must be greater than or equal to 0",
        )
    })?;
    if config.config_sync_period.is_zero() {
        return Err(FieldError::new(
            "configSyncPeriod",
            "0s",
            "must be greater than 0",
        ));
    }
    let bind_address = parse_ip_sloppy(&config.bind_address).ok_or_else(|| {
        FieldError::quoted(
            "bindAddress",
            &config.bind_address,
            "must be a valid IP address",
        )
    })?;
    let healthz_bind_address = server_address("healthzBindAddress", &config.healthz_bind_address)?;
    let metrics_bind_address = server_address("metricsBindAddress", &config.metrics_bind_address)?;
    if !is_valid_port_range(&config.port_range) {
        return Err(FieldError::quoted(
            "portRange",
            &config.port_range,
            "must be a valid port range (e.g. 300-2000)",
        ));
    }
    let node_port_addresses = node_port_addresses(&config.node_port_addresses)?;
    let hidden = &config.show_hidden_metrics_for_version;
    if !hidden.is_empty() && !is_major_minor(hidden) {
        return Err(FieldError::quoted(
            "showHiddenMetricsForVersion",
            hidden,
            "must be <major>.<minor>, e.g. 1.35",
        ));
    }

    let detect_local_mode = detect_local_mode(config)?;
    let cluster_cidrs = match (&detect_local_mode, cluster_cidrs(&config.cluster_cidr)) {
        (DetectLocalMode::ClusterCidr, Ok(cidrs)) => {
            if cidrs.is_empty() {
                warnings.push("detectLocalMode is ClusterCIDR but no clusterCIDR is set; traffic from pods will not be detected as local".to_string());
            }
            cidrs
        }
        (DetectLocalMode::ClusterCidr, Err(err)) => return Err(err),
        (_, Ok(cidrs)) => cidrs,
        // Upstream only checks clusterCIDR when it is used.
        (_, Err(err)) => {
            warnings.push(format!(
                "ignoring clusterCIDR {:?}: {}",
                config.cluster_cidr, err.reason
            ));
            Vec::new()
        }
    };

    if let Some((name, _)) = config
        .feature_gates
        .iter()
        .find(|(name, _)| name.trim().is_empty())
    {
        return Err(FieldError::quoted(
            "featureGates",
            name,
            "feature gate names must not be empty",
        ));
    }
    if !matches!(config.logging.format.as_str(), "text" | "json") {
        return Err(FieldError::quoted(
            "logging.format",
            &config.logging.format,
            "must be text or json",
        ));
    }
    let hostname_override = match config.hostname_override.as_str() {
        "" => None,
        name if name.trim().is_empty() => {
            return Err(FieldError::quoted(
                "hostnameOverride",
                name,
                "empty hostname is invalid",
            ));
        }
        name => Some(name.trim().to_lowercase()),
    };
    let kubeconfig = Some(&config.client_connection.kubeconfig)
        .filter(|path| !path.is_empty())
        .map(PathBuf::from);

    Ok(Settings {
        mode,
        hostname_override,
        kubeconfig,
        master,
        api_qps: config.client_connection.qps,
        api_burst,
        api_content_type: config.client_connection.content_type.clone(),
        bind_address,
        bind_address_hard_fail: config.bind_address_hard_fail,
        cluster_cidrs,
        node_port_addresses,
        masquerade_all,
        masquerade_bit,
        localhost_node_ports: config.iptables.localhost_node_ports.unwrap_or(true),
        sync_period: sync.0,
        min_sync_period: min.0,
        config_sync_period: config.config_sync_period.0,
        metrics_bind_address,
        healthz_bind_address,
        detect_local_mode,
        conntrack,
        ipvs,
        oom_score_adj: config.oom_score_adj,
        verbosity: config.logging.verbosity,
        feature_gates: config.feature_gates.clone(),
    })
}
