//! `--write-config-to` output loads back to the same configuration.

mod common;

use common::{TempConfig, load_ok};

fn assert_round_trip(args: &[&str]) {
    let first = load_ok(args);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("written.yaml");
    kp_config::write_config_file(&path, &first.config).expect("writes");
    let written = std::fs::read_to_string(&path).expect("reads back");
    assert_eq!(written, kp_config::to_yaml(&first.config));

    let config_flag = format!("--config={}", path.display());
    let second = load_ok(&[&config_flag]);
    assert_eq!(
        second.config, first.config,
        "config differs after round trip:\n{written}"
    );
    assert_eq!(second.settings, first.settings);
    assert!(
        !second.warnings.iter().any(|w| w.contains("unknown field")),
        "{:?}",
        second.warnings
    );
}

#[test]
fn defaults_round_trip() {
    assert_round_trip(&[]);
}

#[test]
fn customised_configuration_round_trips() {
    assert_round_trip(&[
        "--proxy-mode=nftables",
        "--iptables-sync-period=45s",
        "--iptables-min-sync-period=1500ms",
        "--masquerade-all",
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
        "--nodeport-addresses=10.0.0.0/8,primary",
        "--hostname-override=Node-7",
        "--kubeconfig=/etc/kubernetes/proxy.conf",
        "--kube-api-qps=12.5",
        "--kube-api-burst=30",
        "--feature-gates=KubeProxyNFTablesLocalhostNodePorts=true",
        "--conntrack-max-per-core=0",
        "--conntrack-udp-timeout=30s",
        "--conntrack-tcp-be-liberal",
        "--ipvs-exclude-cidrs=10.9.0.0/16",
        "--oom-score-adj=-100",
        "--bind-address=fd00::5",
        "--healthz-bind-address=[::]:10256",
        "--metrics-bind-address=[::1]:10249",
        "--detect-local-mode=InterfaceNamePrefix",
        "--pod-interface-name-prefix=veth",
        "--v=4",
        "--vmodule=proxier=6",
        "--log-text-split-stream",
        "--config-sync-period=1h30m",
    ]);
}

#[test]
fn file_with_every_section_round_trips() {
    let json = r#"{"apiVersion":"kubeproxy.config.k8s.io/v1alpha1","kind":"KubeProxyConfiguration",
        "mode":"ipvs","ipvs":{"scheduler":"sh","strictARP":true,"tcpTimeout":"1h2m3.5s","udpTimeout":"500ms"},
        "winkernel":{"networkName":"l2bridge","enableDSR":true},"windowsRunAsService":true,
        "iptables":{"snatNodeInternalIP":true},"portRange":"30000-32767","enableProfiling":true}"#;
    let file = TempConfig::new("kp.json", json);
    let first = load_ok(&[&file.flag()]);
    let yaml = kp_config::to_yaml(&first.config);
    assert!(yaml.contains("tcpTimeout: 1h2m3.5s"), "{yaml}");
    assert!(yaml.contains("snatNodeInternalIP: true"), "{yaml}");
    let written = TempConfig::new("kp.yaml", &yaml);
    let second = load_ok(&[&written.flag()]);
    assert_eq!(second.config, first.config);
    assert_eq!(second.settings, first.settings);
}
