//! Real-kernel tests of the namespace harness, pod servers and probes (run as root).

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use kp_testkit::netns::{
    Topology, TopologySpec, get_sysctl, in_netns, list_netns, netns_path, remove_stale_namespaces,
};
use kp_testkit::podserver::{PodServer, PodServerError, ServerPort, sctp_supported};
use kp_testkit::probe::{
    ProbeError, probe_tcp, probe_udp, probe_udp_from, tcp_connect_once, udp_request_once,
    udp_send_only,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn ours(prefix: &str) -> Vec<String> {
    list_netns()
        .into_iter()
        .filter(|ns| ns.starts_with(&format!("{prefix}-")))
        .collect()
}

fn netns_inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat netns").ino()
}

#[test]
fn topology_up_and_down_leaves_no_namespaces() {
    let mut topo = Topology::new(TopologySpec::new(2)).expect("topology");
    let prefix = topo.prefix().to_string();
    topo.add_pod(1, "a").expect("pod a");
    let expected = vec![
        format!("{prefix}-ext"),
        format!("{prefix}-fab"),
        format!("{prefix}-node1"),
        format!("{prefix}-node2"),
        format!("{prefix}-pod1"),
    ];
    assert_eq!(ours(&prefix), expected);
    let mut created = topo.namespaces();
    created.sort();
    assert_eq!(created, expected);
    drop(topo);
    assert!(ours(&prefix).is_empty(), "left behind: {:?}", ours(&prefix));
}

#[test]
fn node_sysctls_and_addresses_are_set() {
    let topo = Topology::new(TopologySpec::new(2)).expect("topology");
    let node2 = topo.node(2).expect("node2");
    assert_eq!(node2.name, "node2");
    assert_eq!(node2.ip.to_string(), "198.18.0.12");
    assert_eq!(node2.pod_cidr.to_string(), "10.244.2.0/24");
    assert_eq!(node2.bridge_ip.to_string(), "10.244.2.1");
    assert!(topo.node(0).is_err() && topo.node(3).is_err());
    assert_eq!(get_sysctl(&node2.ns, "net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(
        get_sysctl(&node2.ns, "net.ipv4.conf.all.rp_filter").unwrap(),
        "0"
    );
    assert_eq!(
        get_sysctl(&node2.ns, "net.ipv4.conf.all.route_localnet").unwrap(),
        "0"
    );
    assert_eq!(
        get_sysctl(&topo.ext().ns, "net.ipv4.ip_forward").unwrap(),
        "0"
    );
    let routes = topo.exec_ok(&node2.ns, &["ip", "route"]).unwrap();
    assert!(routes.contains("10.96.0.0/12 dev cbr0"), "{routes}");
    assert!(routes.contains("10.244.1.0/24 via 198.18.0.11"), "{routes}");
    assert!(routes.contains("default via 198.18.0.2"), "{routes}");
    let ext_routes = topo.exec_ok(&topo.ext().ns, &["ip", "route"]).unwrap();
    assert!(
        ext_routes.contains("10.96.0.0/12 via 198.18.0.11"),
        "{ext_routes}"
    );
    assert!(
        ext_routes.contains("10.244.2.0/24 via 198.18.0.12"),
        "{ext_routes}"
    );

    let local = Topology::new(
        TopologySpec::new(1)
            .route_localnet(true)
            .node_default_route(false),
    )
    .expect("topology");
    let node1 = local.node(1).unwrap();
    assert_eq!(
        get_sysctl(&node1.ns, "net.ipv4.conf.all.route_localnet").unwrap(),
        "1"
    );
    let routes = local.exec_ok(&node1.ns, &["ip", "route"]).unwrap();
    assert!(!routes.contains("default"), "{routes}");
}

#[test]
fn pod_to_pod_across_nodes_and_ext_to_pod_are_routed() {
    let mut topo = Topology::new(TopologySpec::new(2)).expect("topology");
    let a = topo.add_pod(1, "pod-a").unwrap();
    let b = topo.add_pod(2, "pod-b").unwrap();
    assert_eq!(a.ip.to_string(), "10.244.1.2");
    assert_eq!(b.ip.to_string(), "10.244.2.2");
    let _server = PodServer::start(&b.ns, "pod-b", &[8080], &[5353]).unwrap();

    let target = SocketAddr::new(b.ip, 8080);
    let report = probe_tcp(&a.ns, target, 10, TIMEOUT).unwrap();
    assert_eq!(report.total_ok(), 10, "{report}");
    assert_eq!(report.answers.get("pod-b"), Some(&10));
    // Routed, not NATed: the pod sees the other pod's own address.
    assert_eq!(
        report.sources_seen.get(&a.ip.to_string()),
        Some(&10),
        "{report}"
    );

    let from_ext = probe_tcp(&topo.ext().ns, target, 5, TIMEOUT).unwrap();
    assert_eq!(from_ext.answers.get("pod-b"), Some(&5), "{from_ext}");
    assert_eq!(
        from_ext.sources_seen.get("198.18.0.2"),
        Some(&5),
        "{from_ext}"
    );

    // The node reaches its own pods from its bridge address.
    let node2 = topo.node(2).unwrap().clone();
    let from_node = tcp_connect_once(&node2.ns, target, TIMEOUT).unwrap();
    assert_eq!(from_node.pod, "pod-b");
    assert_eq!(from_node.peer_seen, "10.244.2.1");

    let udp = probe_udp(&a.ns, SocketAddr::new(b.ip, 5353), 4, TIMEOUT).unwrap();
    assert_eq!(udp.answers.get("pod-b"), Some(&4), "{udp}");
}

#[test]
fn pod_server_answers_name_and_peer_and_counts_udp() {
    let mut topo = Topology::new(TopologySpec::new(1)).expect("topology");
    let server_pod = topo.add_pod(1, "srv").unwrap();
    let client = topo.add_pod(1, "cli").unwrap();
    let server = PodServer::start(&server_pod.ns, "srv-name", &[80, 8080], &[53, 5353]).unwrap();
    assert_eq!(server.ports().len(), 4);

    for port in [80, 8080] {
        let answer = tcp_connect_once(&client.ns, SocketAddr::new(server_pod.ip, port), TIMEOUT)
            .expect("tcp answer");
        assert_eq!(answer.pod, "srv-name");
        assert_eq!(answer.peer_seen, client.ip.to_string());
    }
    assert_eq!(server.tcp_accepted(), 2);

    let answer = udp_request_once(&client.ns, SocketAddr::new(server_pod.ip, 53), TIMEOUT).unwrap();
    assert_eq!(
        (answer.pod.as_str(), answer.peer_seen.clone()),
        ("srv-name", client.ip.to_string())
    );
    let sent = udp_send_only(
        &topo.ext().ns,
        Some(40000),
        SocketAddr::new(server_pod.ip, 5353),
        7,
    )
    .unwrap();
    assert_eq!(sent, 7);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while server.udp_received() < 8 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(server.udp_received(), 8);
    let by_source = server.udp_received_by_source();
    assert_eq!(by_source.get(&client.ip), Some(&1));
    assert_eq!(
        by_source.get(&"198.18.0.2".parse::<IpAddr>().unwrap()),
        Some(&7)
    );

    // Dropping the server closes its sockets: connects are now refused by the kernel.
    // A process forked by a parallel test holds a copy of the listener until it execs, so
    // a connect in that window is queued and then reset; only "refused" ends the wait.
    drop(server);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let err = loop {
        let err =
            tcp_connect_once(&client.ns, SocketAddr::new(server_pod.ip, 80), TIMEOUT).unwrap_err();
        let closing =
            matches!(&err, ProbeError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        if !closing || std::time::Instant::now() > deadline {
            break err;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(matches!(err, ProbeError::Refused), "{err:?}");
}

#[test]
fn probe_reports_refused_timeouts_and_shares() {
    let mut topo = Topology::new(TopologySpec::new(1)).expect("topology");
    let p1 = topo.add_pod(1, "p1").unwrap();
    let p2 = topo.add_pod(1, "p2").unwrap();
    let _s1 = PodServer::start(&p1.ns, "p1", &[8080], &[]).unwrap();
    let ext = topo.ext().ns.clone();

    let ok = probe_tcp(&ext, SocketAddr::new(p1.ip, 8080), 20, TIMEOUT).unwrap();
    assert_eq!(ok.total_ok(), 20);
    assert_eq!(ok.total_failed(), 0);
    assert_eq!(ok.share("p1"), 1.0);
    assert_eq!(ok.share("p2"), 0.0);
    assert_eq!(ok.connect_latencies.len(), 20);
    assert!(ok.latency_quantile(0.5).unwrap() < TIMEOUT);

    // Nothing listens on p2: its kernel answers with RST at once.
    let started = std::time::Instant::now();
    let refused = probe_tcp(&ext, SocketAddr::new(p2.ip, 8080), 5, TIMEOUT).unwrap();
    assert_eq!((refused.refused, refused.total_ok()), (5, 0), "{refused}");
    assert!(started.elapsed() < TIMEOUT, "refusals must be quick");
    // UDP to a closed port: ICMP port unreachable, reported as refused.
    let udp_refused = probe_udp(&ext, SocketAddr::new(p2.ip, 9999), 3, TIMEOUT).unwrap();
    assert_eq!(udp_refused.refused, 3, "{udp_refused}");

    // No host at .250: ARP goes unanswered, so the probe times out.
    let short = Duration::from_millis(200);
    let missing: IpAddr = "10.244.1.250".parse().unwrap();
    let timeouts = probe_tcp(&ext, SocketAddr::new(missing, 8080), 2, short).unwrap();
    assert_eq!(timeouts.timeouts, 2, "{timeouts}");
    let udp_timeouts =
        probe_udp_from(&ext, Some(40001), SocketAddr::new(missing, 53), 2, short).unwrap();
    assert_eq!(udp_timeouts.timeouts, 2, "{udp_timeouts}");
}

#[test]
fn panic_inside_a_test_still_removes_namespaces() {
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let mut topo = Topology::new(TopologySpec::new(1)).expect("topology");
        topo.add_pod(1, "doomed").unwrap();
        *prefix.lock().unwrap() = topo.prefix().to_string();
        assert_eq!(ours(topo.prefix()).len(), 4);
        panic!("test failure inside the topology's scope");
    });
    assert!(result.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert!(ours(&prefix).is_empty(), "left behind: {:?}", ours(&prefix));
}

#[test]
fn two_topologies_in_parallel_do_not_clash() {
    let handles: Vec<_> = ["left", "right"]
        .into_iter()
        .map(|name| {
            std::thread::spawn(move || {
                let mut topo = Topology::new(TopologySpec::new(2)).expect("topology");
                // Same addresses in both topologies, isolated by namespaces.
                let pod = topo.add_pod(2, name).unwrap();
                let _server = PodServer::start(&pod.ns, name, &[8080], &[]).unwrap();
                let report =
                    probe_tcp(&topo.ext().ns, SocketAddr::new(pod.ip, 8080), 20, TIMEOUT).unwrap();
                (topo.prefix().to_string(), pod.ip, report)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(results[0].0, results[1].0);
    assert_eq!(results[0].1, results[1].1);
    for ((prefix, _, report), name) in results.iter().zip(["left", "right"]) {
        assert_eq!(report.answers.get(name), Some(&20), "{report}");
        assert_eq!(report.answers.len(), 1, "{report}");
        assert!(ours(prefix).is_empty());
    }
}

#[test]
fn remove_pod_deletes_namespace_and_frees_nothing_else() {
    let mut topo = Topology::new(TopologySpec::new(1)).expect("topology");
    let keep = topo.add_pod(1, "keep").unwrap();
    let gone = topo.add_pod(1, "gone").unwrap();
    let _keep_server = PodServer::start(&keep.ns, "keep", &[8080], &[]).unwrap();
    let gone_server = PodServer::start(&gone.ns, "gone", &[8080], &[]).unwrap();
    assert!(
        topo.add_pod(1, "keep").is_err(),
        "duplicate names are refused"
    );

    topo.remove_pod("gone").unwrap();
    assert!(!list_netns().contains(&gone.ns));
    assert!(topo.pod("gone").is_err());
    assert!(topo.remove_pod("gone").is_err());
    let ext = topo.ext().ns.clone();
    // The veth went with the pod even though its server still holds sockets.
    let err = tcp_connect_once(
        &ext,
        SocketAddr::new(gone.ip, 8080),
        Duration::from_millis(300),
    )
    .unwrap_err();
    assert!(
        matches!(err, ProbeError::Timeout | ProbeError::Unreachable(_)),
        "{err:?}"
    );
    drop(gone_server);
    assert_eq!(
        tcp_connect_once(&ext, SocketAddr::new(keep.ip, 8080), TIMEOUT)
            .unwrap()
            .pod,
        "keep"
    );

    // The next pod does not reuse the freed address at once.
    let next = topo.add_pod(1, "next").unwrap();
    assert_ne!(next.ip, gone.ip);
    assert_ne!(next.ip, keep.ip);
}

#[test]
fn spawned_children_run_in_the_namespace_and_die_with_their_guard_or_topology() {
    let topo = Topology::new(TopologySpec::new(1)).expect("topology");
    let node_ns = topo.node(1).unwrap().ns.clone();
    let mut sleep = Command::new("sleep");
    sleep.arg("300");
    let guard = topo.spawn(&node_ns, sleep).unwrap();
    let pid = guard.id().unwrap();
    assert_eq!(
        netns_inode(std::path::Path::new(&format!("/proc/{pid}/ns/net"))),
        netns_inode(&netns_path(&node_ns).unwrap())
    );
    drop(guard);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());

    // A leaked guard does not outlive the topology.
    let mut sleep = Command::new("sleep");
    sleep.arg("300");
    let leaked = topo.spawn(&node_ns, sleep).unwrap();
    let leaked_pid = leaked.id().unwrap();
    std::mem::forget(leaked);
    drop(topo);
    assert!(!std::path::Path::new(&format!("/proc/{leaked_pid}")).exists());

    // Graceful stop reports the exit status.
    let topo = Topology::new(TopologySpec::new(1)).expect("topology");
    let mut sh = Command::new("sh");
    sh.args(["-c", "trap 'exit 7' TERM; while :; do sleep 0.05; done"]);
    sh.stderr(std::process::Stdio::null());
    let guard = topo.spawn(&topo.node(1).unwrap().ns, sh).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let status = guard.terminate(Duration::from_secs(5)).expect("status");
    assert_eq!(status.code(), Some(7));
    assert!(guard.id().is_none());
}

#[test]
fn in_netns_runs_on_a_thread_inside_the_namespace_and_propagates_panics() {
    let topo = Topology::new(TopologySpec::new(1)).expect("topology");
    let ext = topo.ext().ns.clone();
    let inode = in_netns(&ext, || {
        netns_inode(std::path::Path::new("/proc/thread-self/ns/net"))
    })
    .unwrap();
    assert_eq!(inode, netns_inode(&netns_path(&ext).unwrap()));
    // The calling thread stays where it was.
    assert_ne!(
        netns_inode(std::path::Path::new("/proc/thread-self/ns/net")),
        inode
    );
    let caught = std::panic::catch_unwind(|| in_netns(&ext, || panic!("inside")));
    assert!(caught.is_err());
    assert!(in_netns("no-such-namespace-here", || ()).is_err());
    assert!(in_netns("../etc", || ()).is_err());
}

#[test]
fn dual_stack_topology_routes_ipv6_between_nodes() {
    let mut topo = Topology::new(TopologySpec::new(2).dual_stack(true)).expect("topology");
    let a = topo.add_pod(1, "a6").unwrap();
    let b = topo.add_pod(2, "b6").unwrap();
    let (a6, b6) = (a.ipv6.unwrap(), b.ipv6.unwrap());
    assert_eq!(b6.to_string(), "fd44:0:0:2::2");
    let _server = PodServer::start(&b.ns, "b6", &[8080], &[53]).unwrap();
    let report = probe_tcp(&a.ns, SocketAddr::new(b6, 8080), 5, TIMEOUT).unwrap();
    assert_eq!(report.answers.get("b6"), Some(&5), "{report}");
    assert_eq!(
        report.sources_seen.get(&a6.to_string()),
        Some(&5),
        "{report}"
    );
    let ext6 = topo.ext().ipv6.unwrap();
    let udp = probe_udp(&topo.ext().ns, SocketAddr::new(b6, 53), 3, TIMEOUT).unwrap();
    assert_eq!(udp.sources_seen.get(&ext6.to_string()), Some(&3), "{udp}");
    // IPv4 still works on the same dual-stack sockets.
    let v4 = probe_tcp(&a.ns, SocketAddr::new(b.ip, 8080), 2, TIMEOUT).unwrap();
    assert_eq!(v4.sources_seen.get(&a.ip.to_string()), Some(&2), "{v4}");
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed() {
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let stale = format!("kpt{dead_pid}x0-node1");
    let status = Command::new("ip").args(["netns", "add", &stale]).status();
    let status = status.or_else(|_| {
        Command::new("/usr/sbin/ip")
            .args(["netns", "add", &stale])
            .status()
    });
    assert!(status.unwrap().success());
    let removed = remove_stale_namespaces();
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(!list_netns().contains(&stale));
}

#[test]
fn sctp_support_is_reported_consistently() {
    let mut topo = Topology::new(TopologySpec::new(1)).expect("topology");
    let pod = topo.add_pod(1, "sctp").unwrap();
    let supported = sctp_supported(&pod.ns).unwrap();
    let port = ServerPort {
        protocol: kp_testkit::podserver::Protocol::Sctp,
        port: 9000,
    };
    match PodServer::start_ports(&pod.ns, "sctp", &[port]) {
        Ok(_) => assert!(supported),
        Err(PodServerError::SctpUnsupported) => assert!(!supported),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

/// The harness is only useful if kube-proxy-style NAT works in it: a ClusterIP DNAT in
/// the node namespace must balance traffic from ext, from the node itself (route via
/// cbr0), from a pod to another pod on the same bridge (bridge-nf-call-iptables) and
/// from a pod back to itself (hairpin + masquerade).
#[test]
fn cluster_ip_dnat_in_the_node_reaches_pods_from_every_client() {
    let mut topo = Topology::new(TopologySpec::new(1)).expect("topology");
    let p1 = topo.add_pod(1, "p1").unwrap();
    let p2 = topo.add_pod(1, "p2").unwrap();
    let _s1 = PodServer::start(&p1.ns, "p1", &[8080], &[]).unwrap();
    let _s2 = PodServer::start(&p2.ns, "p2", &[8080], &[]).unwrap();
    let node = topo.node(1).unwrap().clone();
    let rules = format!(
        "table ip kpt-test {{
  chain ep1 {{
    meta l4proto tcp dnat to {a}:8080
  }}
  chain ep2 {{
    meta l4proto tcp dnat to {b}:8080
  }}
  chain svc {{
    ip daddr 10.96.0.10 tcp dport 80 numgen random mod 2 vmap {{ 0 : goto ep1, 1 : goto ep2 }}
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat;
    jump svc
  }}
  chain output {{
    type nat hook output priority -100;
    jump svc
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    ct status dnat ip saddr . ip daddr {{ {a} . {a}, {b} . {b} }} masquerade
  }}
}}
",
        a = p1.ip,
        b = p2.ip
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), rules).unwrap();
    let path = file.path().to_str().unwrap();
    topo.exec_ok(&node.ns, &["nft", "-f", path])
        .expect("load rules");

    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    for client in [topo.ext().ns.clone(), node.ns.clone(), p1.ns.clone()] {
        let report = probe_tcp(&client, vip, 60, TIMEOUT).unwrap();
        assert_eq!(report.total_ok(), 60, "from {client}: {report}");
        assert!(
            report.share("p1") > 0.15 && report.share("p2") > 0.15,
            "from {client}: {report}"
        );
        if client == p1.ns {
            // Hairpinned connections were masqueraded to the bridge address.
            let hairpin = report.sources_seen.get(&node.bridge_ip.to_string());
            assert_eq!(hairpin, report.answers.get("p1"), "{report}");
        }
    }
}
