//! The command line: upstream flags accepted, bad input refused with one line and exit 1
//! before anything touches the kernel. No root needed.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_and_values_exit_1_with_one_line_naming_the_flag() {
    for (args, needle) in [
        (&["--no-such-flag"][..], "--no-such-flag"),
        (
            &["--iptables-sync-period=abc"][..],
            "--iptables-sync-period",
        ),
        (
            &["--iptables-masquerade-bit=40"][..],
            "--iptables-masquerade-bit",
        ),
        (&["--proxy-mode=bogus"][..], "--proxy-mode"),
        (&["--cluster-cidr=10.0.0.0/33"][..], "--cluster-cidr"),
        (
            &["--config=/nonexistent/kube-proxy.yaml"][..],
            "/nonexistent/kube-proxy.yaml",
        ),
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line, got {err:?}"
        );
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn bad_config_file_field_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables:\n  masqueradeBit: 99\n").unwrap();
    let (code, _, err) = run(&[&format!("--config={}", path.display())]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("iptables.masqueradeBit"), "{err}");
}

#[test]
fn version_and_write_config_round_trip() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("kube-proxy-rs v"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.yaml");
    let (code, _, err) = run(&[
        &format!("--write-config-to={}", path.display()),
        "--iptables-sync-period=45s",
        "--cluster-cidr=10.244.0.0/16",
    ]);
    assert_eq!(code, 0, "{err}");
    let yaml = std::fs::read_to_string(&path).unwrap();
    assert!(
        yaml.contains("kind: KubeProxyConfiguration")
            && yaml.contains("45s")
            && yaml.contains("10.244.0.0/16"),
        "{yaml}"
    );
    // The written file loads back (here: written again, identically).
    let path2 = dir.path().join("out2.yaml");
    let (code, _, err) = run(&[
        &format!("--config={}", path.display()),
        &format!("--write-config-to={}", path2.display()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(yaml, std::fs::read_to_string(&path2).unwrap());
}

#[test]
fn a_kubeadm_daemonset_command_line_is_accepted() {
    // Flags an existing DaemonSet passes, some without effect yet: warnings, not errors.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.yaml");
    let (code, _, err) = run(&[
        "--hostname-override=Node-1",
        "--v=2",
        "--feature-gates=SomeGate=true",
        "--conntrack-max-per-core=0",
        "--profiling=false",
        "--oom-score-adj=-999",
        &format!("--write-config-to={}", path.display()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("hostnameOverride: node-1")
    );
}

/// `scripts/kp` runs the scenario suites in each mode of its `MODES` list: that list must
/// be exactly the modes this binary implements (the others exit 1 at once, saying so).
#[test]
fn every_implemented_mode_is_tested_by_scripts_kp() {
    let mut implemented = Vec::new();
    for mode in kp_dataplane::Mode::ALL {
        // --init-only with every optional kernel setting off, in a throw-away network
        // namespace (a mode's required sysctls, such as IPVS mode's ip_forward, are
        // written there, not on this machine): exits at once.
        let out = Command::new("unshare")
            .args(["--net", BIN])
            .env_remove("KUBERNETES_SERVICE_HOST")
            .args([
                format!("--proxy-mode={mode}").as_str(),
                "--init-only",
                "--conntrack-max-per-core=0",
                "--conntrack-min=0",
                "--conntrack-tcp-timeout-established=0s",
                "--conntrack-tcp-timeout-close-wait=0s",
                "--iptables-localhost-nodeports=false",
            ])
            .output()
            .unwrap();
        let code = out.status.code().unwrap_or(-1);
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not implemented yet") {
            assert_eq!(code, 1, "{mode}: {err}");
        } else {
            assert_eq!(code, 0, "{mode}: {err}");
            implemented.push(mode.as_str());
        }
    }
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/kp"))
        .expect("scripts/kp");
    let listed: Vec<&str> = script
        .lines()
        .find_map(|l| l.strip_prefix("MODES=\""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("a MODES=\"...\" line in scripts/kp")
        .split_whitespace()
        .collect();
    assert_eq!(listed, implemented);
}
