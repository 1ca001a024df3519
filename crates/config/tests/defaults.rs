//! With no flags and no file we get upstream's defaults.

mod common;

use std::time::Duration;

use common::load_ok;
use kp_config::{DetectLocalMode, Mode, default_config};

#[test]
fn empty_command_line_yields_upstream_defaults() {
    let loaded = load_ok(&[]);
    let s = &loaded.settings;
    assert_eq!(s.mode, Mode::Iptables);
    assert_eq!(s.hostname_override, None);
    assert_eq!(s.kubeconfig, None);
    assert_eq!(s.master, None);
    assert_eq!(s.api_qps, 5.0);
    assert_eq!(s.api_burst, 10);
    assert_eq!(s.api_content_type, "application/vnd.kubernetes.protobuf");
    assert_eq!(s.bind_address.to_string(), "0.0.0.0");
    assert!(!s.bind_address_hard_fail);
    assert!(s.cluster_cidrs.is_empty());
    assert!(s.node_port_addresses.is_empty());
    assert!(!s.masquerade_all);
    assert_eq!(s.masquerade_bit, 14);
    assert!(s.localhost_node_ports);
    assert_eq!(s.sync_period, Duration::from_secs(30));
    assert_eq!(s.min_sync_period, Duration::from_secs(1));
    assert_eq!(s.config_sync_period, Duration::from_secs(15 * 60));
    assert_eq!(
        s.healthz_bind_address,
        Some("0.0.0.0:10256".parse().expect("addr"))
    );
    assert_eq!(
        s.metrics_bind_address,
        Some("127.0.0.1:10249".parse().expect("addr"))
    );
    assert_eq!(s.detect_local_mode, DetectLocalMode::ClusterCidr);
    assert_eq!(s.conntrack.max_per_core, Some(32_768));
    assert_eq!(s.conntrack.min, Some(131_072));
    assert_eq!(
        s.conntrack.tcp_established_timeout,
        Some(Duration::from_secs(86_400))
    );
    assert_eq!(
        s.conntrack.tcp_close_wait_timeout,
        Some(Duration::from_secs(3_600))
    );
    assert!(!s.conntrack.tcp_be_liberal);
    assert_eq!(s.conntrack.udp_timeout, None);
    assert_eq!(s.conntrack.udp_stream_timeout, None);
    assert_eq!(s.ipvs.scheduler, "rr");
    assert_eq!(s.ipvs.tcp_timeout, None);
    assert_eq!(s.oom_score_adj, Some(-999));
    assert_eq!(s.verbosity, 0);
    assert!(s.feature_gates.is_empty());

    assert!(!loaded.cleanup && !loaded.init_only && !loaded.show_version && !loaded.show_help);
    assert_eq!(loaded.write_config_to, None);
    assert_eq!(loaded.config_file, None);
    // Like upstream's startup log: ClusterCIDR detection without a CIDR detects nothing.
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert!(loaded.warnings[0].contains("no clusterCIDR is set"));
}

#[test]
fn effective_config_carries_platform_defaults_on_top_of_scheme_defaults() {
    let scheme = default_config();
    assert_eq!(scheme.mode, "");
    assert_eq!(scheme.detect_local_mode, "");

    let effective = load_ok(&[]).config;
    assert_eq!(effective.mode, "iptables");
    assert_eq!(effective.detect_local_mode, "ClusterCIDR");
    let mut expected = scheme;
    expected.mode = "iptables".to_string();
    expected.detect_local_mode = "ClusterCIDR".to_string();
    assert_eq!(effective, expected);
}

#[test]
fn default_yaml_has_upstream_values_and_key_order() {
    let yaml = kp_config::to_yaml(&default_config());
    for line in [
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1",
        "bindAddress: 0.0.0.0",
        "configSyncPeriod: 15m0s",
        "  maxPerCore: 32768",
        "  min: 131072",
        "  tcpCloseWaitTimeout: 1h0m0s",
        "  tcpEstablishedTimeout: 24h0m0s",
        "  udpTimeout: 0s",
        "healthzBindAddress: 0.0.0.0:10256",
        "  localhostNodePorts: true",
        "  masqueradeBit: 14",
        "  minSyncPeriod: 1s",
        "  syncPeriod: 30s",
        "kind: KubeProxyConfiguration",
        "  flushFrequency: 5s",
        "  format: text",
        "metricsBindAddress: 127.0.0.1:10249",
        "oomScoreAdj: -999",
        "  contentType: application/vnd.kubernetes.protobuf",
        "  burst: 10",
        "  qps: 5",
        "nodePortAddresses: null",
        "  excludeCIDRs: null",
    ] {
        assert!(
            yaml.lines().any(|l| l == line),
            "missing {line:?} in:\n{yaml}"
        );
    }
    // Keys sorted like upstream's output.
    let top_keys: Vec<&str> = yaml
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('-'))
        .filter_map(|l| l.split(':').next())
        .collect();
    let mut sorted = top_keys.clone();
    sorted.sort_unstable();
    assert_eq!(top_keys, sorted);
}

#[test]
fn config_json_has_exactly_the_upstream_fields_and_nothing_secret() {
    let json = serde_json::to_value(load_ok(&["--kubeconfig=/etc/kp/kubeconfig"]).config)
        .expect("serializes");
    let keys: Vec<&String> = json.as_object().expect("object").keys().collect();
    let expected = [
        "apiVersion",
        "bindAddress",
        "bindAddressHardFail",
        "clientConnection",
        "clusterCIDR",
        "configSyncPeriod",
        "conntrack",
        "detectLocal",
        "detectLocalMode",
        "enableProfiling",
        "healthzBindAddress",
        "hostnameOverride",
        "iptables",
        "ipvs",
        "kind",
        "logging",
        "metricsBindAddress",
        "mode",
        "nftables",
        "nodePortAddresses",
        "oomScoreAdj",
        "portRange",
        "showHiddenMetricsForVersion",
        "winkernel",
    ];
    assert_eq!(keys, expected);
    let client = json["clientConnection"].as_object().expect("object");
    let client_keys: Vec<&String> = client.keys().collect();
    assert_eq!(
        client_keys,
        [
            "acceptContentTypes",
            "burst",
            "contentType",
            "kubeconfig",
            "qps"
        ]
    );
    assert_eq!(client["kubeconfig"], "/etc/kp/kubeconfig");
}

#[test]
fn help_and_version_skip_the_config_file() {
    let help = load_ok(&["--help", "--config=/does/not/exist.yaml"]);
    assert!(help.show_help);
    assert!(kp_config::help_text().contains("--iptables-sync-period"));
    let short = load_ok(&["-h"]);
    assert!(short.show_help);
    for form in ["--version", "--version=raw", "--version=true"] {
        assert!(load_ok(&[form, "--config=/nope"]).show_version, "{form}");
    }
    let override_version = load_ok(&["--version=v1.99.0"]);
    assert!(!override_version.show_version);
    assert!(
        override_version
            .warnings
            .iter()
            .any(|w| w.contains("--version=v1.99.0"))
    );
}
