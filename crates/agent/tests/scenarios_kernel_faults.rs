//! Kernel-side failures: the tool that applies rules is missing when the proxy starts.
//! The failure is logged and counted, syncs are retried with backoff, and once the tool is
//! there the next retry programs everything. In nftables mode the rules go over netlink,
//! so a missing `nft` binary does not stop them at all; IPVS mode needs iptables-restore
//! for its SNAT and filter rules, as iptables mode. Needs root.

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
        "ipset",
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
    // IPVS mode writes its SNAT and filter rules with iptables-restore too (and refuses
    // to start without ipset, as upstream: checked by its preflight).
    let iptables_restore_applies = mode() != "nftables";
    let missing = if iptables_restore_applies {
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
    if iptables_restore_applies {
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

/// Another program holds the xtables lock (upstream's most reported failure; only the
/// legacy iptables binaries take it, so iptables mode runs them here). The proxy's
/// `iptables-restore -w 5` gives up, the failure is logged and counted, `/healthz` turns
/// 503 only by the staleness rule and back to 200 once the change is applied, traffic to existing services keeps
/// flowing, and the change made meanwhile is applied once the lock is free. nftables mode
/// never takes the lock: the change applies while it is held.
#[test]
fn held_xtables_lock_delays_changes_and_drops_no_connection() {
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 1, Some(serde_json::json!({})));
    let dir = tempfile::tempdir().expect("temp dir");
    tool_dir(dir.path(), "");
    if iptables_mode() {
        let legacy = [
            "/usr/sbin/xtables-legacy-multi",
            "/sbin/xtables-legacy-multi",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("xtables-legacy-multi (Debian's iptables package)");
        for tool in ["iptables", "iptables-save", "iptables-restore"] {
            for t in [tool.to_string(), tool.replacen("ip", "ip6", 1)] {
                let link = dir.path().join(&t);
                let _ = std::fs::remove_file(&link);
                symlink(legacy, &link).expect("symlink");
            }
        }
    }
    let lock_path = lab.workdir().join("xtables.lock");
    let lock = std::fs::File::create(&lock_path).expect("lock file");
    lab.proxy_env
        .push(("PATH".into(), dir.path().display().to_string()));
    lab.proxy_env
        .push(("XTABLES_LOCKFILE".into(), lock_path.display().to_string()));
    // Short sync periods, so the canary check also runs into the held lock.
    let config = short_sync_period_config(&lab);
    start(&mut lab, 1, &[&config]);
    let ext = ext_ns(&lab);
    let web = svc_addr(&lab, "default", "web", 80);
    wait_serving(&lab, &ext, web, SETTLE);

    let prober = Prober::start(&ext, web, Duration::from_millis(10));

    // SAFETY: flock on a file this test owns; released by LOCK_UN below.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let locked_at = Instant::now();
    // A canary check runs into the lock before any change is queued: busy is not flushed.
    std::thread::sleep(Duration::from_secs(2));
    deploy(&mut lab, "api", "api", 1, Some(serde_json::json!({})));
    let api = svc_addr(&lab, "default", "api", 80);
    if iptables_mode() {
        assert!(
            wait_log(&lab, &["xtables lock"]),
            "the log does not name the lock:\n{}",
            lab.proxy_log(1)
        );
        let counted = wait_for(Duration::from_secs(15), || {
            failures_counted(&lab).then_some(())
        });
        assert!(counted.is_some(), "failure not counted\n{}", logs(&lab));
        // The staleness rule: a change queued for over 2 x syncPeriod (2 s here) and not
        // applied makes /healthz 503.
        std::thread::sleep(Duration::from_secs(5).saturating_sub(locked_at.elapsed()));
        assert_eq!(healthz(&lab), 503, "a change stuck behind the lock for 3 s");
        assert!(
            one_probe(&ext, api, L4::Tcp, T).is_err(),
            "api was programmed while the lock was held"
        );
    } else {
        wait_serving(&lab, &ext, api, Duration::from_secs(5));
        // nftables and IPVS mode (a new service changes ipsets and IPVS, not the
        // iptables rules, and iptables-nft takes no lock) apply it while the lock is held.
        eprintln!(
            "{}: api served {:?} into the lock",
            mode(),
            locked_at.elapsed()
        );
    }
    std::thread::sleep(Duration::from_secs(8).saturating_sub(locked_at.elapsed()));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_UN) }, 0);
    let released = Instant::now();
    wait_serving(&lab, &ext, api, Duration::from_secs(30));
    eprintln!(
        "lock held {:?}; api served {:?} after release",
        released - locked_at,
        released.elapsed()
    );
    assert!(
        wait_for(Duration::from_secs(5), || (healthz(&lab) == 200)
            .then_some(()))
        .is_some(),
        "/healthz stays 503 after the change was applied"
    );
    let (ok, errors) = prober.stop();
    eprintln!("web prober: {ok} ok, {} failed", errors.len());
    assert!(ok > 100, "prober made only {ok} connections");
    assert!(
        errors.is_empty(),
        "connections to web failed while the lock was held: {errors:?}"
    );
    let (_, m) = http_get(&lab.node_ns(1), localhost(10249), "/metrics").unwrap();
    assert_eq!(
        metric(&m, "kubeproxy_sync_proxy_rules_drift_repairs_total", &[]),
        0.0,
        "a busy lock was taken for flushed rules\n{}",
        lab.proxy_log(1)
    );
}

/// The node's conntrack table fills up (330k unreplied UDP flows from the node itself;
/// `nf_conntrack_max` cannot be lowered inside a namespace, so the test fills the whole
/// 262k). The proxy says so once with the numbers, counts the episode, keeps `/healthz` at
/// 200 and keeps programming changes; Service connections still work because the kernel
/// evicts unreplied flows for them; once there is room again it says so.
#[test]
fn full_conntrack_table_is_reported_once_and_syncs_go_on() {
    const FULL: &str = "kubeproxy_conntrack_table_full_total";
    let mut lab = new_lab(1);
    deploy(&mut lab, "web", "web", 1, Some(serde_json::json!({})));
    let config = short_sync_period_config(&lab);
    start(&mut lab, 1, &[&config]);
    let ext = ext_ns(&lab);
    let web = svc_addr(&lab, "default", "web", 80);
    wait_serving(&lab, &ext, web, SETTLE);
    let node = lab.node_ns(1);
    assert_eq!(metric_on(&lab, 1, FULL, &[]), Some(0.0));

    // Flows to a /16 behind a veth whose far end drops them: every datagram a new entry.
    for cmd in [
        "ip link add ctfill0 type veth peer name ctfill1",
        "ip link set ctfill0 up",
        "ip link set ctfill1 up",
        "ip addr add 10.254.0.1/24 dev ctfill0",
        "ip neigh add 10.254.0.2 lladdr 02:00:00:00:00:02 dev ctfill0 nud permanent",
        "ip route add 10.255.0.0/16 via 10.254.0.2 dev ctfill0",
    ] {
        ip_cmd(&lab, &node, &cmd.split(' ').collect::<Vec<_>>()[1..]);
    }
    let sent = kp_testkit::netns::in_netns(&node, || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut sent = 0;
        for net in 0..5u8 {
            for port in 1..=u16::MAX {
                let to = std::net::SocketAddr::from(([10, 255, net, 1], port));
                sent += usize::from(socket.send_to(b"x", to).is_ok());
            }
        }
        sent
    })
    .unwrap();
    let max = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").unwrap();
    eprintln!("sent {sent} datagrams; nf_conntrack_max {}", max.trim());

    assert!(
        wait_log(&lab, &["conntrack table full", "entries="]),
        "{}",
        lab.proxy_log(1)
    );
    let counted = wait_for(Duration::from_secs(5), || {
        (metric_on(&lab, 1, FULL, &[]) == Some(1.0)).then_some(())
    });
    assert!(counted.is_some(), "episode not counted\n{}", logs(&lab));
    assert_eq!(healthz(&lab), 200);
    let said = lab.proxy_log(1);
    eprintln!(
        "{}",
        said.lines()
            .find(|l| l.contains("conntrack table full"))
            .unwrap()
    );

    // Rules keep following the cluster, and new Service flows get room by eviction.
    deploy(&mut lab, "web", "web", 2, None);
    let want = all_pods(&lab, "web");
    assert_eq!(want.len(), 2);
    wait_answered_by(&lab, &ext, web, &want, "scaled up while conntrack is full");
    assert_eq!(
        lab.proxy_log(1)
            .lines()
            .filter(|l| l.contains("conntrack table full"))
            .count(),
        1,
        "logged once per episode"
    );

    ip_cmd(&lab, &node, &["link", "del", "ctfill0"]);
    lab.topology()
        .exec_ok(&node, &["conntrack", "-F"])
        .expect("conntrack -F");
    assert!(
        wait_log(&lab, &["conntrack table has room again"]),
        "{}",
        lab.proxy_log(1)
    );
    assert_eq!(metric_on(&lab, 1, FULL, &[]), Some(1.0));
    let log = lab.proxy_log(1);
    eprintln!(
        "{}",
        log.lines().find(|l| l.contains("has room again")).unwrap()
    );
}
