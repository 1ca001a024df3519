//! Real-kernel scenarios for stale UDP conntrack cleanup: a client keeps sending from one
//! source port while the endpoints of its UDP Service change; the proxy must remove the
//! stale conntrack entries so the flow reaches the new endpoint. Expected behaviour is
//! upstream kube-proxy's.
//!
//! The proxy mode comes from `KP_PROXY_MODE` (default `iptables`). Needs root.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use kp_testkit::lab::{Lab, wait_for};
use kp_testkit::probe::udp_send_only;
use serde_json::json;

/// A one-way UDP sender from a fixed source port in ext, until dropped.
struct Sender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sender {
    fn start(ns: String, source_port: u16, target: SocketAddr) -> Sender {
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                // Each call opens a socket on the same port: one 5-tuple, one flow.
                if let Ok(n) = udp_send_only(&ns, Some(source_port), target, 5) {
                    sent2.fetch_add(n, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sender {
            stop,
            sent,
            thread: Some(thread),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn udp_received(lab: &Lab, pod: &str) -> u64 {
    lab.cluster
        .pod_server("default", pod)
        .map_or(0, |s| s.udp_received())
}

fn udp_service(lab: &mut Lab, name: &str, replicas: u32) -> SocketAddr {
    let ports = json!([{"port": 53, "targetPort": 5353, "protocol": "UDP"}]);
    apply(
        lab,
        &[
            deployment(name, replicas, &[("UDP", 5353)]),
            service(name, json!({"selector": {"app": name}, "ports": ports})),
        ],
    );
    addr(cluster_ip(lab, name), 53)
}

fn expect_receives(lab: &Lab, pod: &str, sender: &Sender, what: &str) {
    let within = Duration::from_secs(8);
    let got = wait_for(within, || (udp_received(lab, pod) > 0).then_some(()));
    let sent = sender.sent.load(Ordering::Relaxed);
    let log = logs(lab);
    assert!(
        got.is_some(),
        "{what}: {pod} got nothing in {within:?} ({sent} sent)\n{log}"
    );
}

/// The only endpoint of a UDP Service is replaced while a client keeps sending from
/// one source port: the stale conntrack entry is removed and the new pod receives.
#[test]
fn stale_udp_conntrack_replaced_endpoint() {
    let mut lab = new_lab(2);
    start_proxies(&mut lab, &[]);
    let target = udp_service(&mut lab, "udp", 1);
    let ext = ext_ns(&lab);
    let old = pods_of(&lab, "udp").remove(0);
    see_l4(&lab, &ext, target, L4::Udp, &[&old], "udp service");

    let sender = Sender::start(ext.clone(), 40000, target);
    let flowing = wait_for(SETTLE_ENDPOINTS, || {
        (udp_received(&lab, &old.name) >= 20).then_some(())
    });
    assert!(
        flowing.is_some(),
        "the sender's flow never reached {}",
        old.name
    );

    lab.cluster.scale("default", "udp", 0).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    lab.cluster.scale("default", "udp", 1).unwrap();
    let new = pods_of(&lab, "udp").remove(0);
    assert_ne!(new.ip, old.ip, "the replacement has a new address");
    expect_receives(&lab, &new.name, &sender, "after replacing the pod");
    drop(sender);

    let m = metrics(&lab, 1);
    let deleted = metric(
        &m,
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
        &[],
    );
    assert!(
        deleted > 0.0,
        "conntrack_reconciler_deleted_entries_total = {deleted}\n{m}"
    );
}

/// 0 -> N: a client sends from one source port while the UDP Service has no
/// endpoints; once a pod appears it receives within a few seconds.
#[test]
fn stale_udp_conntrack_zero_to_n() {
    let mut lab = new_lab(2);
    start_proxies(&mut lab, &[]);
    let target = udp_service(&mut lab, "udp0", 0);
    let ext = ext_ns(&lab);
    // The proxy has programmed the service without endpoints: UDP to it is rejected.
    expect_failure(
        &lab,
        &ext,
        target,
        L4::Udp,
        "Refused",
        "udp0 without endpoints",
    );

    let sender = Sender::start(ext.clone(), 40001, target);
    std::thread::sleep(Duration::from_secs(2));
    lab.cluster.scale("default", "udp0", 1).unwrap();
    let pod = pods_of(&lab, "udp0").remove(0);
    expect_receives(&lab, &pod.name, &sender, "0 -> 1 endpoints");
}
