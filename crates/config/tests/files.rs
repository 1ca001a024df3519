//! Loading KubeProxyConfiguration files (YAML and JSON).

mod common;

use std::time::Duration;

use common::{HEADER, TempConfig, load_err, load_ok};
use kp_config::{DetectLocalMode, Mode, NodePortAddress};

/// What kubeadm 1.3x writes into the kube-proxy ConfigMap: zero values and nulls that
/// defaulting must fill, and `flushFrequency` given as integer nanoseconds.
const KUBEADM_CONFIG: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

#[test]
fn kubeadm_daemonset_command_line_loads() {
    let file = TempConfig::new("config.conf", KUBEADM_CONFIG);
    // The DaemonSet passes `--hostname-override=$(NODE_NAME)`, expanded by the kubelet.
    let loaded = load_ok(&[&file.flag(), "--hostname-override=Worker-1"]);
    let s = &loaded.settings;
    assert_eq!(s.mode, Mode::Iptables);
    assert_eq!(s.hostname_override.as_deref(), Some("worker-1"));
    assert_eq!(
        s.kubeconfig.as_deref(),
        Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(
        s.cluster_cidrs,
        vec!["10.244.0.0/16".parse().expect("cidr")]
    );
    assert_eq!(s.detect_local_mode, DetectLocalMode::ClusterCidr);
    assert_eq!((s.api_qps, s.api_burst), (5.0, 10));
    assert_eq!(s.sync_period, Duration::from_secs(30));
    assert_eq!(s.min_sync_period, Duration::from_secs(1));
    assert_eq!(s.masquerade_bit, 14);
    assert_eq!(s.conntrack.max_per_core, Some(32_768));
    assert_eq!(s.oom_score_adj, Some(-999));
    assert_eq!(
        s.healthz_bind_address,
        Some("0.0.0.0:10256".parse().expect("addr"))
    );
    assert_eq!(loaded.config.logging.flush_frequency.to_string(), "5s");
    assert_eq!(loaded.config_file.as_deref(), Some(file.path.as_path()));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn yaml_file_values_reach_the_settings() {
    let yaml = format!(
        "{HEADER}mode: nftables\nnftables:\n  masqueradeAll: true\n  masqueradeBit: 5\n  syncPeriod: 1m\n  minSyncPeriod: 500ms\nclusterCIDR: 10.244.0.0/16,fd00:10:244::/56\nconntrack:\n  maxPerCore: 0\n  udpTimeout: 30s\nfeatureGates:\n  KubeProxyNFTablesLocalhostNodePorts: true\nlogging:\n  verbosity: 4\n"
    );
    let file = TempConfig::new("kp.yaml", &yaml);
    let loaded = load_ok(&[&file.flag()]);
    let s = &loaded.settings;
    assert_eq!(s.mode, Mode::Nftables);
    assert!(s.masquerade_all);
    assert_eq!(s.masquerade_bit, 5);
    assert_eq!(s.sync_period, Duration::from_secs(60));
    assert_eq!(s.min_sync_period, Duration::from_millis(500));
    assert_eq!(s.cluster_cidrs.len(), 2);
    assert_eq!(s.node_port_addresses, vec![NodePortAddress::Primary]);
    assert_eq!(s.conntrack.max_per_core, None);
    assert_eq!(
        s.conntrack.min, None,
        "min is ignored when max-per-core is 0"
    );
    assert_eq!(s.conntrack.udp_timeout, Some(Duration::from_secs(30)));
    assert_eq!(
        s.feature_gates.get("KubeProxyNFTablesLocalhostNodePorts"),
        Some(&true)
    );
    assert_eq!(s.verbosity, 4);
}

#[test]
fn json_file_loads() {
    let json = r#"{
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "ipvs",
        "ipvs": {"scheduler": "wlc", "syncPeriod": "20s", "minSyncPeriod": "2s",
                 "excludeCIDRs": ["10.10.0.0/16"], "strictARP": true, "tcpTimeout": "900s"},
        "nodePortAddresses": ["10.0.0.0/8", "localhost"],
        "metricsBindAddress": "0.0.0.0:9100",
        "oomScoreAdj": -500
    }"#;
    let file = TempConfig::new("kp.json", json);
    let loaded = load_ok(&[&file.flag()]);
    let s = &loaded.settings;
    assert_eq!(s.mode, Mode::Ipvs);
    assert_eq!(s.ipvs.scheduler, "wlc");
    assert!(s.ipvs.strict_arp);
    assert_eq!(
        s.ipvs.exclude_cidrs,
        vec!["10.10.0.0/16".parse().expect("cidr")]
    );
    assert_eq!(s.ipvs.tcp_timeout, Some(Duration::from_secs(900)));
    assert_eq!(s.sync_period, Duration::from_secs(20));
    assert_eq!(s.min_sync_period, Duration::from_secs(2));
    let expected_npa: Vec<NodePortAddress> = ["10.0.0.0/8", "127.0.0.0/8", "::1/128"]
        .iter()
        .map(|c| NodePortAddress::Cidr(c.parse().expect("cidr")))
        .collect();
    assert_eq!(s.node_port_addresses, expected_npa);
    assert_eq!(
        s.metrics_bind_address,
        Some("0.0.0.0:9100".parse().expect("addr"))
    );
    assert_eq!(s.oom_score_adj, Some(-500));
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("ipvs is deprecated"))
    );
}

#[test]
fn unknown_fields_are_named_in_warnings_and_the_file_still_loads() {
    // Upstream: strict decoding fails, the lenient v1alpha1 decoder succeeds, a
    // warning is logged. Old kubeadm files still carry udpIdleTimeout/resourceContainer.
    let yaml = format!(
        "{HEADER}udpIdleTimeout: 250ms\nresourceContainer: /kube-proxy\niptables:\n  masqueradeAl: true\n"
    );
    let file = TempConfig::new("kp.yaml", &yaml);
    let loaded = load_ok(&[&file.flag()]);
    for field in [
        "udpIdleTimeout",
        "resourceContainer",
        "iptables.masqueradeAl",
    ] {
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.contains(&format!("unknown field {field:?}"))
                    && w.contains(&file.path.display().to_string())),
            "{field} not named in {:?}",
            loaded.warnings
        );
    }
    assert!(
        !loaded.settings.masquerade_all,
        "misspelled field must not take effect"
    );
}

#[test]
fn bad_file_values_name_the_file_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "iptables:\n  masqueradeBit: 40\n",
            "iptables.masqueradeBit",
            "40",
        ),
        (
            "iptables:\n  syncPeriod: 1s\n  minSyncPeriod: 5s\n",
            "iptables.minSyncPeriod",
            "5s",
        ),
        ("mode: bogus\n", "mode", "\"bogus\""),
        ("bindAddress: not-an-ip\n", "bindAddress", "\"not-an-ip\""),
        (
            "healthzBindAddress: 0.0.0.0:99999\n",
            "healthzBindAddress",
            "99999",
        ),
        (
            "clusterCIDR: 10.0.0.0/8,10.1.0.0/16\n",
            "clusterCIDR",
            "10.1.0.0/16",
        ),
        (
            "nodePortAddresses: [primary, 300.0.0.0/8]\n",
            "nodePortAddresses[1]",
            "300.0.0.0/8",
        ),
        ("oomScoreAdj: -1001\n", "oomScoreAdj", "-1001"),
        ("conntrack:\n  min: -1\n", "conntrack.min", "-1"),
        (
            "clientConnection:\n  burst: -3\n",
            "clientConnection.burst",
            "-3",
        ),
        ("detectLocalMode: Foo\n", "detectLocalMode", "\"Foo\""),
        (
            "detectLocalMode: BridgeInterface\n",
            "detectLocal.bridgeInterface",
            "\"\"",
        ),
        (
            "mode: ipvs\nipvs:\n  scheduler: fastest\n",
            "ipvs.scheduler",
            "fastest",
        ),
        ("portRange: 9-1\n", "portRange", "9-1"),
        ("logging:\n  format: xml\n", "logging.format", "xml"),
        ("hostnameOverride: '  '\n", "hostnameOverride", "\"  \""),
        (
            "iptables:\n  masqueradeBit: x\n",
            "iptables.masqueradeBit",
            "x",
        ),
        ("configSyncPeriod: soon\n", "configSyncPeriod", "soon"),
        (
            "conntrack:\n  udpTimeout: -5s\n",
            "conntrack.udpTimeout",
            "-5s",
        ),
    ];
    for (body, field, value) in cases {
        let file = TempConfig::new("bad.yaml", &format!("{HEADER}{body}"));
        let message = load_err(&[&file.flag()]);
        let prefix = format!("config file {}: {field}: ", file.path.display());
        assert!(message.starts_with(&prefix), "{body:?} gave {message}");
        assert!(message.contains(value), "{body:?} gave {message}");
        assert!(!message.contains('\n'), "{message}");
    }
}

#[test]
fn file_level_problems_are_errors() {
    let missing = load_err(&["--config=/no/such/kube-proxy.yaml"]);
    assert!(
        missing.starts_with("config file /no/such/kube-proxy.yaml: cannot read"),
        "{missing}"
    );
    let file = TempConfig::new("v.yaml", "apiVersion: v1\nkind: ConfigMap\n");
    let wrong = load_err(&[&file.flag()]);
    assert!(
        wrong.contains("apiVersion: \"v1\" is not supported"),
        "{wrong}"
    );
}

#[test]
fn settings_with_no_effect_in_the_file_warn() {
    let yaml = format!("{HEADER}enableProfiling: true\nwinkernel:\n  networkName: l2bridge\n");
    let file = TempConfig::new("kp.yaml", &yaml);
    let warnings = load_ok(&[&file.flag()]).warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("enableProfiling has no effect yet")),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("winkernel")),
        "{warnings:?}"
    );
}
