//! Kernel-side failures: the tool that applies rules is missing when the proxy starts.
//! The failure is logged and counted, syncs are retried with backoff, and once the tool is
//! there the next retry programs everything. In nftables mode the rules go over netlink,
//! so a missing `nft` binary does not stop them at all. Needs root.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use common::*;
use kp_testkit::lab::{Lab, http_get, localhost, wait_for};

/// A PATH directory with links to what the proxy runs, except `missing`.
fn tool_dir(dir: &Path, missing: &str) {
    for tool in [
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables",
        "ip6tables-save",
        "ip6tables-restore",
        "nft",
        "conntrack",
        "ip",
        "sysctl",
    ] {
        if tool == missing {
            continue;
        }
        for d in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
            let p = Path::new(d).join(tool);
            if p.exists() {
                symlink(&p, dir.join(tool)).expect("symlink");
                break;
            }
        }
    }
}

fn failures_counted(lab: &Lab) -> bool {
    let Ok((_, m)) = http_get(&lab.node_ns(1), localhost(10249), "/metrics") else {
        return false;
    };
    m.lines().any(|l| {
        (l.starts_with("kubeproxy_sync_proxy_rules_iptables_restore_failures_total")
            || l.starts_with("kubeproxy_sync_proxy_rules_nftables_sync_failures_total"))
            && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(0.0)
    })
}

#[test]
fn missing_apply_tool_is_logged_counted_retried_and_recovered() {
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 1, Some(serde_json::json!({})));
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = if iptables_mode() {
        "iptables-restore"
    } else {
        "nft"
    };
    tool_dir(dir.path(), missing);
    lab.proxy_env
        .push(("PATH".into(), dir.path().display().to_string()));
    start(&mut lab, 1, &[]);
    let ext = ext_ns(&lab);
    let web = svc_addr(&lab, "default", "web", 80);
    if iptables_mode() {
        assert!(
            wait_log(&lab, &["iptables-restore"]) && wait_log(&lab, &["retry"]),
            "{}",
            lab.proxy_log(1)
        );
        let counted = wait_for(Duration::from_secs(10), || {
            failures_counted(&lab).then_some(())
        });
        assert!(counted.is_some(), "failure metric");
        assert!(
            one_probe(&ext, web, L4::Tcp, T).is_err(),
            "nothing programmed yet"
        );
        // The tool appears; the next retry programs the service.
        let restore = ["/usr/sbin/iptables-restore", "/sbin/iptables-restore"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("iptables-restore");
        symlink(restore, dir.path().join("iptables-restore")).expect("symlink");
    }
    wait_serving(&lab, &ext, web, SETTLE);
    let r = probe(&ext, web, L4::Tcp, 20, T);
    assert_eq!(r.total_ok(), 20, "{r}");
}
