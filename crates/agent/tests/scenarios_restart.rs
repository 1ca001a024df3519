//! Restarts never drop traffic: a prober opens a new TCP connection to a ClusterIP every
//! few milliseconds while kube-proxy-rs is stopped (SIGTERM, then SIGKILL) and started
//! again; no connection may fail. Runs in the mode from `KP_PROXY_MODE`. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use kp_testkit::lab::{Lab, wait_for};
use kp_testkit::probe::tcp_connect_once;

mod common;

use common::Prober;

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");
const REDIS: &str = include_str!("../../../examples/redis.yaml");

#[test]
fn restarts_drop_no_connection() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let mode = format!(
        "--proxy-mode={}",
        std::env::var("KP_PROXY_MODE").unwrap_or_else(|_| "iptables".into())
    );
    let mut lab = Lab::new(1).unwrap();
    lab.cluster.apply_manifest(REDIS).unwrap();
    lab.start_proxy(Path::new(BIN), 1, &[&mode]).unwrap();
    let svc = lab
        .emulator
        .get("v1", "Service", Some("default"), "redis")
        .unwrap();
    let ip: IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let target = SocketAddr::new(ip, 6379);
    let ext = lab.topology().ext().ns.clone();
    assert!(
        wait_for(Duration::from_secs(20), || tcp_connect_once(
            &ext,
            target,
            Duration::from_secs(1)
        )
        .ok())
        .is_some()
    );

    let prober = Prober::start(&ext, target, Duration::from_millis(5));
    for kill in [false, true, false] {
        std::thread::sleep(Duration::from_millis(700));
        lab.stop_proxy(1, kill);
        std::thread::sleep(Duration::from_millis(500));
        lab.start_proxy(Path::new(BIN), 1, &[&mode]).unwrap();
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
