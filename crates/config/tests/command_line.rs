//! Flags: syntax, bad values, precedence over the file, the full upstream flag set.

mod common;

use std::time::Duration;

use common::{HEADER, TempConfig, load_err, load_ok};
use kp_config::{FLAG_SPECS, FlagKind, FlagSupport, Mode, NodePortAddress, UPSTREAM_FLAGS};

#[test]
fn unknown_flag_is_an_error() {
    assert_eq!(load_err(&["--foo"]), "unknown flag: --foo");
    assert_eq!(load_err(&["--foo=bar", "--v=2"]), "unknown flag: --foo");
    // Flags that exist in other components only.
    assert_eq!(
        load_err(&["--nftables-sync-period=1s"]),
        "unknown flag: --nftables-sync-period"
    );
    assert!(load_err(&["positional"]).contains("takes no positional arguments"));
}

#[test]
fn every_bad_flag_value_is_a_one_line_error_naming_the_flag() {
    let cases: &[&[&str]] = &[
        &["--iptables-sync-period=abc"],
        &["--iptables-sync-period=0s"],
        &["--iptables-sync-period=-5s"],
        &["--iptables-min-sync-period=1h"],
        &["--iptables-min-sync-period=2x"],
        &["--iptables-masquerade-bit=40"],
        &["--iptables-masquerade-bit=-1"],
        &["--iptables-masquerade-bit=x"],
        &["--iptables-localhost-nodeports=nope"],
        &["--masquerade-all=maybe"],
        &["--proxy-mode=bogus"],
        &["--proxy-mode=kernelspace"],
        &["--bind-address=abc"],
        &["--healthz-bind-address=1.2.3.4:0"],
        &["--metrics-bind-address=host:80"],
        &["--cluster-cidr=10.0.0.0/33"],
        &["--cluster-cidr=10.0.0.0/8,192.168.0.0/16"],
        &["--nodeport-addresses=primary,bogus"],
        &["--oom-score-adj=2000"],
        &["--oom-score-adj=low"],
        &["--conntrack-max-per-core=-1"],
        &["--conntrack-min=-5"],
        &["--conntrack-tcp-timeout-established=forever"],
        &["--conntrack-tcp-timeout-close-wait=1d"],
        &["--conntrack-udp-timeout=-1s"],
        &["--conntrack-udp-timeout-stream=x"],
        &["--conntrack-tcp-be-liberal=2"],
        &["--kube-api-burst=-1"],
        &["--kube-api-burst=many"],
        &["--kube-api-qps=fast"],
        &["--config-sync-period=0s"],
        &["--detect-local-mode=Magic"],
        &["--proxy-mode=ipvs", "--ipvs-scheduler=bogus"],
        &["--proxy-mode=ipvs", "--ipvs-exclude-cidrs=nope"],
        &["--proxy-mode=ipvs", "--ipvs-sync-period=0s"],
        &["--ipvs-tcp-timeout=x"],
        &["--ipvs-tcpfin-timeout=x"],
        &["--ipvs-udp-timeout=x"],
        &["--ipvs-strict-arp=x"],
        &["--v=-1"],
        &["-v", "loud"],
        &["--vmodule=bad"],
        &["--feature-gates=A"],
        &["--feature-gates=A=maybe"],
        &["--healthz-port=70000"],
        &["--metrics-port=x"],
        &["--hostname-override=   "],
        &["--show-hidden-metrics-for-version=abc"],
        &["--logging-format=xml"],
        &["--log-flush-frequency=x"],
        &["--cleanup=yes"],
        &["--init-only=2"],
        &["--profiling=on"],
        &["--bind-address-hard-fail=x"],
        &["--logtostderr=x"],
    ];
    for args in cases {
        let bad = args.last().copied().unwrap_or_default();
        let (flag, value) = match bad.split_once('=') {
            Some((flag, value)) => (flag.trim_start_matches('-').to_string(), value.to_string()),
            None => ("v".to_string(), bad.to_string()),
        };
        let message = load_err(args);
        let expected = format!("invalid value {value:?} for flag --{flag}: ");
        assert!(message.starts_with(&expected), "{args:?} gave {message:?}");
        assert!(!message.contains('\n'), "{message}");
    }
}

#[test]
fn flag_errors_read_well() {
    assert_eq!(
        load_err(&["--iptables-sync-period=abc"]),
        "invalid value \"abc\" for flag --iptables-sync-period: invalid duration \"abc\""
    );
    assert_eq!(
        load_err(&["--iptables-masquerade-bit=40"]),
        "invalid value \"40\" for flag --iptables-masquerade-bit: must be within the range [0, 31]"
    );
    assert_eq!(
        load_err(&["--iptables-sync-period=500ms"]),
        "invalid value \"500ms\" for flag --iptables-sync-period: must be greater than or equal to iptables.minSyncPeriod (1s)"
    );
}

#[test]
fn explicit_flags_override_the_file_and_others_keep_file_values() {
    let yaml = format!(
        "{HEADER}hostnameOverride: node-a\nclusterCIDR: 10.0.0.0/8\nmetricsBindAddress: 0.0.0.0:10249\niptables:\n  syncPeriod: 10s\n  masqueradeBit: 40\n  masqueradeAll: true\nlogging:\n  verbosity: 2\n"
    );
    let file = TempConfig::new("kp.yaml", &yaml);
    let loaded = load_ok(&[
        &file.flag(),
        "--iptables-sync-period=20s",
        "--iptables-masquerade-bit=5",
        "--hostname-override= Node-B ",
        "-v",
        "6",
    ]);
    let s = &loaded.settings;
    assert_eq!(s.sync_period, Duration::from_secs(20), "flag wins");
    assert_eq!(
        s.masquerade_bit, 5,
        "a valid flag replaces an invalid file value"
    );
    assert_eq!(s.hostname_override.as_deref(), Some("node-b"));
    assert_eq!(s.verbosity, 6);
    assert!(s.masquerade_all, "file value kept when no flag given");
    assert_eq!(s.cluster_cidrs, vec!["10.0.0.0/8".parse().expect("cidr")]);
    assert_eq!(
        s.metrics_bind_address,
        Some("0.0.0.0:10249".parse().expect("addr"))
    );
    assert_eq!(loaded.config.iptables.sync_period.to_string(), "20s");
    assert_eq!(loaded.config.hostname_override, "node-b");

    // Without the overriding flag, the invalid file value is reported against the file.
    let message = load_err(&[&file.flag()]);
    assert!(
        message.contains("iptables.masqueradeBit: invalid value 40"),
        "{message}"
    );
}

#[test]
fn mode_dependent_flags_land_in_the_selected_mode_section() {
    let loaded = load_ok(&[
        "--proxy-mode=nftables",
        "--iptables-sync-period=5s",
        "--iptables-min-sync-period=0s",
        "--masquerade-all",
    ]);
    let s = &loaded.settings;
    assert_eq!(s.mode, Mode::Nftables);
    assert_eq!(s.sync_period, Duration::from_secs(5));
    assert_eq!(
        s.min_sync_period,
        Duration::ZERO,
        "an explicit 0 flag is kept"
    );
    assert!(s.masquerade_all);
    assert!(loaded.config.nftables.masquerade_all);
    assert!(!loaded.config.iptables.masquerade_all);
    assert_eq!(s.node_port_addresses, vec![NodePortAddress::Primary]);

    let ipvs = load_ok(&[
        "--proxy-mode=ipvs",
        "--ipvs-sync-period=10s",
        "--ipvs-min-sync-period=3s",
    ]);
    assert_eq!(ipvs.settings.sync_period, Duration::from_secs(10));
    assert_eq!(ipvs.settings.min_sync_period, Duration::from_secs(3));
}

#[test]
fn missing_detector_companion_blames_the_mode_flag() {
    let message = load_err(&["--detect-local-mode=BridgeInterface"]);
    assert!(
        message.starts_with("invalid value \"BridgeInterface\" for flag --detect-local-mode: detectLocal.bridgeInterface must be set too"),
        "{message}"
    );
    let loaded = load_ok(&[
        "--detect-local-mode=InterfaceNamePrefix",
        "--pod-interface-name-prefix=veth",
    ]);
    assert_eq!(
        loaded.settings.detect_local_mode,
        kp_config::DetectLocalMode::InterfaceNamePrefix("veth".to_string())
    );
}

#[test]
fn bind_address_flags_disable_or_take_default_ports() {
    let loaded = load_ok(&["--metrics-bind-address=", "--healthz-bind-address=10.0.0.1"]);
    assert_eq!(loaded.settings.metrics_bind_address, None);
    assert_eq!(
        loaded.settings.healthz_bind_address,
        Some("10.0.0.1:10256".parse().expect("addr"))
    );
    let deprecated = load_ok(&["--healthz-port=0", "--metrics-port=9999"]);
    assert_eq!(deprecated.settings.healthz_bind_address, None);
    assert_eq!(
        deprecated.settings.metrics_bind_address,
        Some("127.0.0.1:9999".parse().expect("addr"))
    );
    assert!(
        deprecated
            .warnings
            .iter()
            .any(|w| w.contains("--healthz-port is deprecated"))
    );
}

/// A valid sample value for every flag, so the whole upstream flag set can be passed.
fn sample_args(config_flag: &str, write_to: &str) -> Vec<String> {
    let value = |name: &str| -> Option<&str> {
        Some(match name {
            "feature-gates" => {
                "KubeProxyNFTablesLocalhostNodePorts=true,MultiCIDRServiceAllocator=false"
            }
            "kubeconfig" => "/var/lib/kube-proxy/kubeconfig.conf",
            "master" => "https://10.0.0.1:6443",
            "kube-api-content-type" => "application/json",
            "kube-api-burst" => "20",
            "kube-api-qps" => "7.5",
            "hostname-override" => "Node-1",
            "bind-address" => "10.0.0.5",
            "healthz-bind-address" => "0.0.0.0:10256",
            "metrics-bind-address" => "0.0.0.0:10249",
            "show-hidden-metrics-for-version" => "1.35",
            "proxy-mode" => "iptables",
            "iptables-masquerade-bit" => "15",
            "iptables-sync-period" => "1m",
            "iptables-min-sync-period" => "2s",
            "ipvs-sync-period" => "45s",
            "ipvs-min-sync-period" => "1s",
            "ipvs-scheduler" => "wrr",
            "ipvs-exclude-cidrs" => "10.1.0.0/16,fd00::/64",
            "ipvs-tcp-timeout" => "15m",
            "ipvs-tcpfin-timeout" => "30s",
            "ipvs-udp-timeout" => "5m",
            "detect-local-mode" => "ClusterCIDR",
            "pod-bridge-interface" => "cbr0",
            "pod-interface-name-prefix" => "veth",
            "cluster-cidr" => "10.244.0.0/16,fd00:10:244::/56",
            "nodeport-addresses" => "10.0.0.0/8",
            "oom-score-adj" => "-998",
            "conntrack-max-per-core" => "0",
            "conntrack-min" => "1000",
            "conntrack-tcp-timeout-established" => "12h",
            "conntrack-tcp-timeout-close-wait" => "30m",
            "conntrack-udp-timeout" => "30s",
            "conntrack-udp-timeout-stream" => "2m",
            "config-sync-period" => "10m",
            "healthz-port" => "10266",
            "metrics-port" => "10259",
            "v" => "3",
            "vmodule" => "proxier=5",
            "logging-format" => "json",
            "log-flush-frequency" => "10s",
            "log-text-info-buffer-size" => "1Mi",
            "log-json-info-buffer-size" => "2Mi",
            "log-backtrace-at" => ":0",
            "log-dir" => "/var/log/kp",
            "log-file" => "/var/log/kp.log",
            "log-file-max-size" => "1800",
            "stderrthreshold" => "2",
            "proxy-port-range" => "30000-32767",
            "udp-timeout" => "250ms",
            _ => return None,
        })
    };
    let mut args = vec![
        config_flag.to_string(),
        format!("--write-config-to={write_to}"),
    ];
    for spec in FLAG_SPECS {
        match (spec.name, spec.kind) {
            // These short-circuit or were added above.
            ("help" | "version" | "config" | "write-config-to", _) => {}
            ("iptables-localhost-nodeports", _) => {
                args.push("--iptables-localhost-nodeports=false".into())
            }
            (name, FlagKind::Bool) => args.push(format!("--{name}")),
            (name, _) => match value(name) {
                Some(v) => args.push(format!("--{name}={v}")),
                None => panic!("no sample value for --{name}"),
            },
        }
    }
    args
}

#[test]
fn full_upstream_command_line_parses_with_warnings_for_unimplemented_flags() {
    let file = TempConfig::new("kp.yaml", HEADER);
    let args = sample_args(&file.flag(), "/tmp/kp-written.yaml");
    let loaded = kp_config::load(args.iter().map(String::as_str)).expect("full command line loads");
    let s = &loaded.settings;
    assert_eq!(s.mode, Mode::Iptables);
    assert_eq!(s.hostname_override.as_deref(), Some("node-1"));
    assert_eq!(s.master.as_deref(), Some("https://10.0.0.1:6443"));
    assert_eq!((s.api_qps, s.api_burst), (7.5, 20));
    assert_eq!(s.api_content_type, "application/json");
    assert_eq!(s.bind_address.to_string(), "10.0.0.5");
    assert!(s.bind_address_hard_fail);
    assert_eq!(s.cluster_cidrs.len(), 2);
    assert_eq!(s.masquerade_bit, 15);
    assert!(s.masquerade_all);
    assert!(!s.localhost_node_ports);
    assert_eq!(s.sync_period, Duration::from_secs(60));
    assert_eq!(s.min_sync_period, Duration::from_secs(2));
    assert_eq!(s.config_sync_period, Duration::from_secs(600));
    assert_eq!(
        s.healthz_bind_address,
        Some("0.0.0.0:10266".parse().expect("addr"))
    );
    assert_eq!(
        s.metrics_bind_address,
        Some("0.0.0.0:10259".parse().expect("addr"))
    );
    assert_eq!(s.conntrack.max_per_core, None);
    assert_eq!(
        s.conntrack.tcp_established_timeout,
        Some(Duration::from_secs(12 * 3600))
    );
    assert!(s.conntrack.tcp_be_liberal);
    assert_eq!(s.ipvs.scheduler, "wrr");
    assert_eq!(s.ipvs.exclude_cidrs.len(), 2);
    assert!(s.ipvs.strict_arp);
    assert_eq!(s.oom_score_adj, Some(-998));
    assert_eq!(s.verbosity, 3);
    assert_eq!(
        s.feature_gates.get("MultiCIDRServiceAllocator"),
        Some(&false)
    );
    assert!(loaded.cleanup && loaded.init_only);
    assert_eq!(
        loaded.write_config_to.as_deref(),
        Some(std::path::Path::new("/tmp/kp-written.yaml"))
    );

    for spec in FLAG_SPECS
        .iter()
        .filter(|spec| spec.support == FlagSupport::NoEffect)
    {
        let expected = format!("flag --{} has no effect yet", spec.name);
        assert!(
            loaded.warnings.contains(&expected),
            "missing warning {expected:?}"
        );
    }
    for name in ["proxy-port-range", "udp-timeout", "metrics-port"] {
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.contains(&format!("--{name}")) && w.contains("deprecated")),
            "no deprecation warning for --{name}: {:?}",
            loaded.warnings
        );
    }
    let implemented_warned = FLAG_SPECS
        .iter()
        .filter(|spec| spec.support == FlagSupport::Implemented)
        .find(|spec| {
            loaded
                .warnings
                .iter()
                .any(|w| w.contains(&format!("--{} ", spec.name)))
        });
    assert!(
        implemented_warned.is_none(),
        "{implemented_warned:?} warned"
    );
}

#[test]
fn klog_underscore_spellings_are_normalised() {
    let loaded = load_ok(&["--log_dir=/tmp", "--add_dir_header", "--skip_headers=false"]);
    assert!(
        loaded
            .warnings
            .contains(&"flag --log-dir has no effect yet".to_string())
    );
    assert!(UPSTREAM_FLAGS.contains(&"log-dir"));
}

#[test]
fn readme_lists_every_flag() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md exists");
    for spec in FLAG_SPECS {
        assert!(
            readme.contains(&format!("`--{}`", spec.name)),
            "README misses --{}",
            spec.name
        );
    }
}
