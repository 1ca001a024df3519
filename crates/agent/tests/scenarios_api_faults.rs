//! API faults never remove working rules, and changes made during a fault are applied
//! after it: 100 dropped watches, 500s, a 30 s stall, compacted history (410), and a
//! history restored from a backup (resourceVersions going back: 504 "Too large").
//! Traffic is probed the whole time. Runs in the mode from `KP_PROXY_MODE`. Needs root.

use std::net::SocketAddr;
use std::time::Duration;

use kp_testkit::lab::{Lab, wait_for};
use kp_testkit::probe::probe_tcp;

mod common;

use common::{T, healthz, redis_lab};

/// After a fault: scaling to 3 is applied (all three pods answer) within `within`.
fn change_is_applied(lab: &mut Lab, target: SocketAddr, ext: &str, within: Duration) {
    lab.cluster.scale("default", "redis", 3).unwrap();
    let seen = wait_for(within, || {
        let r = probe_tcp(ext, target, 30, T).ok()?;
        (r.answers.len() == 3).then_some(())
    });
    assert!(
        seen.is_some(),
        "change not applied after the fault; log:\n{}",
        lab.proxy_log(1)
    );
}

#[test]
fn hundred_dropped_watches_keep_rules_and_later_changes_apply() {
    let (mut lab, target, ext) = redis_lab();
    for i in 0..100 {
        lab.emulator.drop_watches();
        std::thread::sleep(Duration::from_millis(20));
        if i % 10 == 0 {
            let r = probe_tcp(&ext, target, 5, T).unwrap();
            assert_eq!(r.total_ok(), 5, "probe failed during watch drops: {r}");
        }
    }
    change_is_applied(&mut lab, target, &ext, Duration::from_secs(20));
}

#[test]
fn server_errors_and_stalls_keep_rules_and_changes_made_meanwhile_apply() {
    let (mut lab, target, ext) = redis_lab();
    // 500s for every request for a while, watches dropped so the proxy has to come back.
    lab.emulator.set_fail_requests(12, 500);
    lab.emulator.drop_watches();
    let r = probe_tcp(&ext, target, 20, T).unwrap();
    assert_eq!(r.total_ok(), 20, "{r}");
    // A stalled API server (every request waits 30 s); a change made while it stalls.
    // Nothing queued is left unapplied, so /healthz stays 200 throughout.
    lab.emulator.set_stall(Some(Duration::from_secs(30)));
    lab.emulator.drop_watches();
    lab.cluster.scale("default", "redis", 3).unwrap();
    let stalled = std::time::Instant::now();
    while stalled.elapsed() < Duration::from_secs(25) {
        let r = probe_tcp(&ext, target, 10, T).unwrap();
        assert_eq!(r.total_ok(), 10, "rules kept while the API stalls: {r}");
        assert_eq!(healthz(&lab), 200, "/healthz during the stall");
        std::thread::sleep(Duration::from_secs(2));
    }
    lab.emulator.set_stall(None);
    // History compacted as after an API server restart: resumes get 410 and relist.
    lab.emulator.compact();
    lab.emulator.drop_watches();
    // Watchers back off like client-go (0.8 s doubling to 30 s), so allow for that.
    let seen = wait_for(Duration::from_secs(60), || {
        let r = probe_tcp(&ext, target, 30, T).ok()?;
        (r.answers.len() == 3).then_some(())
    });
    assert!(
        seen.is_some(),
        "change made during the stall not applied; log:\n{}",
        lab.proxy_log(1)
    );
    assert!(
        lab.emulator.request_log().iter().any(|r| r.status == 500),
        "500s were served"
    );
}

#[test]
fn restored_history_is_relisted_and_changes_after_it_apply() {
    let (mut lab, target, ext) = redis_lab();
    // etcd restored from a backup: same objects, resourceVersions far below what the
    // watchers hold. Resuming gets 504 "Too large resource version"; only a relist helps.
    lab.emulator.restore_with_new_history();
    let r = probe_tcp(&ext, target, 20, T).unwrap();
    assert_eq!(r.total_ok(), 20, "rules kept after the restore: {r}");
    let t0 = std::time::Instant::now();
    change_is_applied(&mut lab, target, &ext, Duration::from_secs(30));
    eprintln!("change after the restore applied in {:?}", t0.elapsed());
    assert!(
        lab.proxy_log(1).contains("history was reset; relisting"),
        "{}",
        lab.proxy_log(1)
    );
    assert!(
        lab.emulator.request_log().iter().any(|r| r.status == 504),
        "the emulator answered 504 to a resume from the old history"
    );
}
