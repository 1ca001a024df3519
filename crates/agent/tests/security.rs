//! Security defaults: metrics only on the node's loopback; a config or kubeconfig anyone
//! can write is refused; the API server's
//! certificate is verified unless the kubeconfig says otherwise; credentials never reach
//! the log or `/configz`, even with every log level on. Needs root for the lab tests.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use kp_testkit::emulator::{Emulator, EmulatorOptions, kubeconfig};
use kp_testkit::lab::{http_get, localhost, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");

#[test]
fn world_writable_config_or_kubeconfig_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n",
    )
    .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").unwrap();
    let out = dir.path().join("out.yaml");
    let run = |mode_config: u32, mode_kubeconfig: u32| {
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(mode_config)).unwrap();
        std::fs::set_permissions(
            &kubeconfig,
            std::fs::Permissions::from_mode(mode_kubeconfig),
        )
        .unwrap();
        let o = Command::new(BIN)
            .arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--write-config-to={}", out.display()))
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, err) = run(0o644, 0o600);
    assert!(ok, "private files must be accepted: {err}");
    for (c, k, named) in [(0o666, 0o600, "--config"), (0o644, 0o606, "--kubeconfig")] {
        let (ok, err) = run(c, k);
        assert!(!ok, "{named} mode {c:o}/{k:o} accepted");
        assert!(
            err.contains(named) && err.contains("world-writable"),
            "{named}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn api_server_certificate_is_verified() {
    // The kubeconfig trusts another CA (a second emulator's): the proxy must not talk to
    // the real API server, and must say why.
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 1, Some(serde_json::json!({})));
    let other = Emulator::start(EmulatorOptions::default()).unwrap();
    let node = lab.topology().node(1).unwrap().name.clone();
    let path = lab.workdir().join(format!("kubeconfig-{node}"));
    std::fs::write(
        &path,
        kubeconfig::render(
            "https://127.0.0.1:6443",
            &other.ca_pem(),
            kubeconfig::token_user(&lab.emulator.token()),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    lab.emulator.clear_request_log();
    start(&mut lab, 1, &[]);
    let said = wait_for(Duration::from_secs(20), || {
        lab.proxy_log(1)
            .lines()
            .find(|l| l.contains("watch failed") && l.to_lowercase().contains("certificate"))
            .map(str::to_string)
    });
    let said = said.unwrap_or_else(|| {
        panic!(
            "the log does not say the certificate is untrusted:\n{}",
            lab.proxy_log(1)
        )
    });
    eprintln!("{said}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        lab.emulator.request_log().is_empty(),
        "requests reached a server whose certificate the kubeconfig does not trust: {:?}",
        lab.emulator.request_log()
    );
    let target = svc_addr(&lab, "default", "web", 80);
    assert!(
        connects(&ext_ns(&lab), target, Duration::from_millis(500)).is_err(),
        "the service was programmed from an unverified server"
    );
}

#[test]
fn credentials_stay_out_of_logs_and_configz() {
    let mut lab = new_lab(1);
    // Every log level of every crate (kube, hyper, rustls included).
    lab.proxy_env
        .push(("KUBE_PROXY_RS_LOG".into(), "trace".into()));
    deploy(&mut lab, "web", "web", 1, Some(serde_json::json!({})));
    start(&mut lab, 1, &["--v=9"]);
    let target = svc_addr(&lab, "default", "web", 80);
    wait_serving(&lab, &ext_ns(&lab), target, Duration::from_secs(30));
    let (code, configz) = http_get(&lab.node_ns(1), localhost(10249), "/configz").unwrap();
    assert_eq!(code, 200);
    // Metrics answer on the node's loopback only; health on every address, by default.
    let node_ip = node_ip(&lab, 1);
    assert!(
        http_get(&ext_ns(&lab), addr(node_ip, 10249), "/metrics").is_err(),
        "metrics reachable from outside the node"
    );
    let (code, _) = http_get(&ext_ns(&lab), addr(node_ip, 10256), "/healthz").unwrap();
    assert_eq!(code, 200, "healthz from outside the node");
    let token = lab.emulator.token();
    let log = lab.proxy_log(1);
    assert!(
        log.len() > 10_000,
        "trace logging is on: {} bytes",
        log.len()
    );
    // The kubeconfig's path may appear, its content may not.
    assert!(configz.contains("kubeconfig"), "{configz}");
    for (what, text) in [("log", &log), ("/configz", &configz)] {
        assert!(!text.contains(&token), "the bearer token is in the {what}");
        assert!(
            !text.contains("PRIVATE KEY"),
            "a private key is in the {what}"
        );
    }
}
