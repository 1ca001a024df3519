//! Restarts never drop traffic: a prober opens a new TCP connection to a ClusterIP every
//! few milliseconds while kube-proxy-rs is stopped (SIGTERM, then SIGKILL) and started
//! again; no connection may fail. Runs in the mode from `KP_PROXY_MODE`. Needs root.

use std::time::Duration;

mod common;

use common::{Prober, SETTLE, redis_lab, start};
use kp_testkit::lab::wait_for;

#[test]
fn restarts_drop_no_connection() {
    let (mut lab, target, ext) = redis_lab();

    let prober = Prober::start(&ext, target, Duration::from_millis(5));
    for (i, kill) in [false, true, false].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(700));
        lab.stop_proxy(1, kill);
        std::thread::sleep(Duration::from_millis(500));
        start(&mut lab, 1, &[]);
        // Each new process is running before the next stop (a slow machine, such as the
        // emulated guest, takes over a second to start one).
        let started = wait_for(SETTLE, || {
            (lab.proxy_log(1).matches("starting kube-proxy-rs").count() == i + 2).then_some(())
        });
        assert!(
            started.is_some(),
            "start {} never ran:\n{}",
            i + 2,
            lab.proxy_log(1)
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let (ok, errors) = prober.stop();
    eprintln!("restart prober: {ok} ok, {} failed", errors.len());
    assert!(ok > 100, "prober made {ok} connections");
    assert!(
        errors.is_empty(),
        "failed connections during restarts: {errors:?}\n{}",
        lab.proxy_log(1)
    );
    let log = lab.proxy_log(1);
    assert_eq!(
        log.matches("starting kube-proxy-rs").count(),
        4,
        "four starts"
    );
}
