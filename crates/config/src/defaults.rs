//! Upstream defaulting: `SetDefaults_KubeProxyConfiguration` (scheme defaults applied
//! to every decoded file) and Linux `platformApplyDefaults` (applied last).

use std::net::IpAddr;

use crate::duration::GoDuration;
use crate::netparse::{append_port_if_needed, parse_ip_sloppy};
use crate::types::{API_VERSION, KIND, KubeProxyConfiguration, Quantity};

/// Port of the `/healthz` server.
pub const DEFAULT_HEALTHZ_PORT: u16 = 10256;
/// Port of the metrics server (`/metrics`, `/proxyMode`, `/configz`).
pub const DEFAULT_METRICS_PORT: u16 = 10249;
/// Keeps kube-proxy alive under memory pressure, as upstream's `qos.KubeProxyOOMScoreAdj`.
pub const DEFAULT_OOM_SCORE_ADJ: i32 = -999;
pub const DEFAULT_MASQUERADE_BIT: i32 = 14;
pub const DEFAULT_CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// The mode chosen on Linux when none is configured.
pub const DEFAULT_MODE: &str = "iptables";
/// The local-traffic detector chosen when none is configured.
pub const DEFAULT_DETECT_LOCAL_MODE: &str = "ClusterCIDR";
/// The IPVS scheduler the ipvs proxier uses when `ipvs.scheduler` is empty.
pub const DEFAULT_IPVS_SCHEDULER: &str = "rr";

/// The scheme-defaulted configuration an empty file (or no file) yields; this is what
/// upstream's `--write-config-to` starts from (before mode/detect-local defaults).
pub fn default_config() -> KubeProxyConfiguration {
    let mut config = KubeProxyConfiguration {
        api_version: API_VERSION.to_string(),
        kind: KIND.to_string(),
        ..KubeProxyConfiguration::default()
    };
    apply_scheme_defaults(&mut config);
    config
}

/// Fills zero values the way `SetDefaults_KubeProxyConfiguration` does. Note the
/// upstream quirk kept on purpose: a zero `minSyncPeriod` in a file becomes 1s.
pub(crate) fn apply_scheme_defaults(config: &mut KubeProxyConfiguration) {
    if config.bind_address.is_empty() {
        config.bind_address = "0.0.0.0".to_string();
    }
    let bind_is_ipv4 = matches!(parse_ip_sloppy(&config.bind_address), Some(IpAddr::V4(_)));
    let (healthz_host, metrics_host) = if bind_is_ipv4 {
        ("0.0.0.0", "127.0.0.1")
    } else {
        ("[::]", "[::1]")
    };
    config.healthz_bind_address = if config.healthz_bind_address.is_empty() {
        format!("{healthz_host}:{DEFAULT_HEALTHZ_PORT}")
    } else {
        append_port_if_needed(&config.healthz_bind_address, DEFAULT_HEALTHZ_PORT)
    };
    config.metrics_bind_address = if config.metrics_bind_address.is_empty() {
        format!("{metrics_host}:{DEFAULT_METRICS_PORT}")
    } else {
        append_port_if_needed(&config.metrics_bind_address, DEFAULT_METRICS_PORT)
    };
    config.oom_score_adj.get_or_insert(DEFAULT_OOM_SCORE_ADJ);

    let iptables = &mut config.iptables;
    iptables
        .masquerade_bit
        .get_or_insert(DEFAULT_MASQUERADE_BIT);
    iptables.localhost_node_ports.get_or_insert(true);
    default_if_zero(&mut iptables.sync_period, GoDuration::from_secs(30));
    default_if_zero(&mut iptables.min_sync_period, GoDuration::from_secs(1));

    default_if_zero(&mut config.ipvs.sync_period, GoDuration::from_secs(30));

    let nftables = &mut config.nftables;
    nftables
        .masquerade_bit
        .get_or_insert(DEFAULT_MASQUERADE_BIT);
    default_if_zero(&mut nftables.sync_period, GoDuration::from_secs(30));
    default_if_zero(&mut nftables.min_sync_period, GoDuration::from_secs(1));

    let conntrack = &mut config.conntrack;
    conntrack.max_per_core.get_or_insert(32 * 1024);
    conntrack.min.get_or_insert(128 * 1024);
    conntrack
        .tcp_established_timeout
        .get_or_insert(GoDuration::from_secs(24 * 3600));
    // One hour keeps CLOSE_WAIT entries alive as long as typical server timeouts.
    conntrack
        .tcp_close_wait_timeout
        .get_or_insert(GoDuration::from_secs(3600));

    default_if_zero(
        &mut config.config_sync_period,
        GoDuration::from_secs(15 * 60),
    );

    let client = &mut config.client_connection;
    if client.content_type.is_empty() {
        client.content_type = DEFAULT_CONTENT_TYPE.to_string();
    }
    if client.qps == 0.0 {
        client.qps = 5.0;
    }
    if client.burst == 0 {
        client.burst = 10;
    }

    // logsapi.SetRecommendedLoggingConfiguration
    let logging = &mut config.logging;
    if logging.format.is_empty() {
        logging.format = "text".to_string();
    }
    default_if_zero(&mut logging.flush_frequency, GoDuration::from_secs(5));
    for routing in [&mut logging.options.text, &mut logging.options.json] {
        if routing.info_buffer_size.0.is_empty() {
            routing.info_buffer_size = Quantity("0".to_string());
        }
    }
}

/// Linux `platformApplyDefaults`: mode, nftables node-port addresses, local detector.
pub(crate) fn apply_platform_defaults(config: &mut KubeProxyConfiguration) {
    if config.mode.is_empty() {
        config.mode = DEFAULT_MODE.to_string();
    }
    if config.mode == "nftables" && config.node_port_addresses.is_empty() {
        config.node_port_addresses = vec!["primary".to_string()];
    }
    if config.detect_local_mode.is_empty() {
        config.detect_local_mode = DEFAULT_DETECT_LOCAL_MODE.to_string();
    }
}

fn default_if_zero(value: &mut GoDuration, default: GoDuration) {
    if value.is_zero() {
        *value = default;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_bind_address_moves_default_servers_to_ipv6() {
        let mut config = KubeProxyConfiguration {
            bind_address: "fd00::10".to_string(),
            ..KubeProxyConfiguration::default()
        };
        apply_scheme_defaults(&mut config);
        assert_eq!(config.healthz_bind_address, "[::]:10256");
        assert_eq!(config.metrics_bind_address, "[::1]:10249");
    }

    #[test]
    fn bare_ips_get_the_default_ports() {
        let mut config = KubeProxyConfiguration {
            healthz_bind_address: "127.0.0.1".to_string(),
            metrics_bind_address: "0.0.0.0".to_string(),
            ..KubeProxyConfiguration::default()
        };
        apply_scheme_defaults(&mut config);
        assert_eq!(config.healthz_bind_address, "127.0.0.1:10256");
        assert_eq!(config.metrics_bind_address, "0.0.0.0:10249");
    }

    #[test]
    fn explicit_values_survive_defaulting() {
        let mut config = KubeProxyConfiguration::default();
        config.iptables.masquerade_bit = Some(0);
        config.iptables.localhost_node_ports = Some(false);
        config.conntrack.max_per_core = Some(0);
        config.oom_score_adj = Some(0);
        config.client_connection.burst = 3;
        apply_scheme_defaults(&mut config);
        assert_eq!(config.iptables.masquerade_bit, Some(0));
        assert_eq!(config.iptables.localhost_node_ports, Some(false));
        assert_eq!(config.conntrack.max_per_core, Some(0));
        assert_eq!(config.oom_score_adj, Some(0));
        assert_eq!(config.client_connection.burst, 3);
    }

    #[test]
    fn platform_defaults_pick_iptables_and_primary_for_nftables() {
        let mut config = default_config();
        apply_platform_defaults(&mut config);
        assert_eq!(config.mode, "iptables");
        assert!(config.node_port_addresses.is_empty());
        assert_eq!(config.detect_local_mode, "ClusterCIDR");

        let mut nft = default_config();
        nft.mode = "nftables".to_string();
        apply_platform_defaults(&mut nft);
        assert_eq!(nft.node_port_addresses, vec!["primary".to_string()]);
    }
}
