//! Real kernel: stale UDP conntrack entries in a node namespace, and their removal
//! over ctnetlink. Needs root (network namespaces, nft).
//!
//! Topology (kp-testkit): ext client -> node1 (nft DNAT for a UDP service IP) -> pods
//! on node1's bridge, each running a UDP pod server on 5353.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use kp_conntrack::{Conntrack, FlowEntry, ReconcileReport, UdpServiceTable, reconcile};
use kp_model::IpFamily;
use kp_testkit::netns::{Topology, TopologySpec, in_netns, netns_exec_ok};
use kp_testkit::podserver::PodServer;
use kp_testkit::probe::udp_send_only;

const POD_PORT: u16 = 5353;
const SVC_PORT: u16 = 53;

struct Bed {
    topology: Topology,
    pod_a: (IpAddr, PodServer),
    pod_b: (IpAddr, PodServer),
}

impl Bed {
    fn new() -> Bed {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "these tests need root (network namespaces, nft)");
        let mut topology = Topology::new(TopologySpec::new(1)).expect("topology");
        let mut pod = |name: &str| {
            let pod = topology.add_pod(1, name).expect("pod");
            let server = PodServer::start(&pod.ns, name, &[], &[POD_PORT]).expect("server");
            (pod.ip, server)
        };
        let pod_a = pod("a");
        let pod_b = pod("b");
        let bed = Bed {
            topology,
            pod_a,
            pod_b,
        };
        bed.nft(&["add", "table", "ip", "kpct"]);
        bed.nft(&["add chain ip kpct pre { type nat hook prerouting priority dstnat ; }"]);
        // A node running a proxy always tracks connections; a bare nat chain does not
        // turn conntrack on in the namespace, a `ct` expression does.
        bed.nft(&[
            "add", "rule", "ip", "kpct", "pre", "ct", "state", "new", "counter",
        ]);
        bed
    }

    fn node_ns(&self) -> String {
        self.topology.node(1).expect("node1").ns.clone()
    }

    fn ext_ns(&self) -> String {
        self.topology.ext().ns.clone()
    }

    fn nft(&self, argv: &[&str]) {
        let mut full = vec!["nft"];
        full.extend_from_slice(argv);
        netns_exec_ok(&self.node_ns(), &full).expect("nft");
    }

    /// Points service `svc` (its own chain) at `target`, replacing what it had.
    fn dnat(&self, svc: IpAddr, target: IpAddr) {
        let chain = chain_name(svc);
        let _ = netns_exec_ok(
            &self.node_ns(),
            &["nft", "add", "chain", "ip", "kpct", &chain],
        );
        self.nft(&["flush", "chain", "ip", "kpct", &chain]);
        self.nft(&[
            "add",
            "rule",
            "ip",
            "kpct",
            &chain,
            "meta",
            "l4proto",
            "udp",
            "dnat",
            "to",
            &format!("{target}:{POD_PORT}"),
        ]);
        let jumps = netns_exec_ok(
            &self.node_ns(),
            &["nft", "list", "chain", "ip", "kpct", "pre"],
        )
        .expect("list");
        if !jumps.contains(&chain) {
            self.nft(&[
                "add",
                "rule",
                "ip",
                "kpct",
                "pre",
                "ip",
                "daddr",
                &svc.to_string(),
                "udp",
                "dport",
                &SVC_PORT.to_string(),
                "jump",
                &chain,
            ]);
        }
    }

    /// `count` datagrams from ext, source port `sport`, to `svc`:53.
    fn send(&self, sport: u16, svc: IpAddr, count: usize) {
        let sent = udp_send_only(
            &self.ext_ns(),
            Some(sport),
            SocketAddr::new(svc, SVC_PORT),
            count,
        )
        .expect("send");
        assert_eq!(sent, count);
    }

    fn reconcile(&self, table: &UdpServiceTable) -> ReconcileReport {
        in_netns(&self.node_ns(), || reconcile(IpFamily::V4, table))
            .expect("enter node")
            .expect("reconcile")
    }

    fn list(&self) -> Vec<FlowEntry> {
        in_netns(&self.node_ns(), || {
            Conntrack::open()
                .expect("open")
                .list_udp(IpFamily::V4)
                .expect("list")
        })
        .expect("enter node")
    }
}

fn chain_name(svc: IpAddr) -> String {
    format!("svc-{}", svc.to_string().replace('.', "-"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// Waits until `f()` reaches `want` (datagrams travel asynchronously); returns the last
/// value seen.
fn wait_count(want: u64, f: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got = f();
        if got >= want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lets in-flight datagrams land, for checks that something did NOT arrive.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

fn from_ext(server: &PodServer, ext: IpAddr) -> u64 {
    server
        .udp_received_by_source()
        .get(&ext)
        .copied()
        .unwrap_or(0)
}

#[test]
fn removed_endpoint_entry_is_deleted_and_the_flow_moves() {
    let bed = Bed::new();
    let svc = ip("10.96.0.10");
    let other_svc = ip("10.96.0.11");
    let ext = bed.topology.ext().ip;
    let (a_ip, a) = &bed.pod_a;
    let (b_ip, b) = &bed.pod_b;

    bed.dnat(svc, *a_ip);
    bed.dnat(other_svc, *a_ip);
    bed.send(40000, svc, 3);
    bed.send(40001, other_svc, 2);
    assert_eq!(wait_count(5, || from_ext(a, ext)), 5, "pod a serves both");

    // The endpoint moves to pod b; the existing 5-tuple still lands on pod a.
    bed.dnat(svc, *b_ip);
    bed.send(40000, svc, 3);
    assert_eq!(
        wait_count(8, || from_ext(a, ext)),
        8,
        "stale entry keeps pod a"
    );
    settle();
    assert_eq!(
        from_ext(b, ext),
        0,
        "pod b gets nothing while the entry is stale"
    );

    let mut table = UdpServiceTable::new();
    table.add_service_ip(svc, SVC_PORT, [*b_ip]);
    let stale_entry = bed
        .list()
        .into_iter()
        .find(|e| e.orig_dst == svc && e.orig_sport == 40000)
        .expect("stale entry listed");
    assert_eq!(stale_entry.reply_src, *a_ip, "{stale_entry}");
    assert!(stale_entry.id.is_some(), "the kernel reports entry ids");
    let report = bed.reconcile(&table);
    assert_eq!(report.stale, 1, "{report:?}");
    assert_eq!(report.deleted, 1, "{report:?}");
    assert!(report.listed >= 2, "{report:?}");

    // The same 5-tuple now reaches pod b.
    bed.send(40000, svc, 3);
    assert_eq!(
        wait_count(3, || from_ext(b, ext)),
        3,
        "pod b after reconcile"
    );
    settle();
    assert_eq!(from_ext(a, ext), 8, "pod a gets no more");

    // The other service is not in the table: its entry (to pod a) is untouched, and
    // the fresh entry to pod b is not stale.
    let entries = bed.list();
    let other = entries
        .iter()
        .find(|e| e.orig_dst == other_svc && e.orig_sport == 40001)
        .expect("other service's entry survives");
    assert_eq!(other.reply_src, *a_ip);
    let moved = entries
        .iter()
        .find(|e| e.orig_dst == svc && e.orig_sport == 40000)
        .expect("new entry");
    assert_eq!(moved.reply_src, *b_ip);
    assert_eq!(moved.reply_sport, POD_PORT);
    let again = bed.reconcile(&table);
    assert_eq!((again.stale, again.deleted), (0, 0), "{again:?}");

    // A TCP entry (an unanswered connect; nothing serves TCP) is never listed, with
    // or without the kernel-side filter, and both listings agree.
    let _ = in_netns(&bed.ext_ns(), || {
        std::net::TcpStream::connect_timeout(&SocketAddr::new(svc, 80), Duration::from_millis(200))
    });
    let listings: Vec<Vec<FlowEntry>> = [true, false]
        .into_iter()
        .map(|kernel_filter| {
            in_netns(&bed.node_ns(), || {
                let mut ct = Conntrack::open().expect("open");
                ct.use_kernel_filter(kernel_filter);
                let mut entries = ct.list_udp(IpFamily::V4).expect("list");
                entries.sort_by_key(|e| (e.orig_dst, e.orig_sport));
                entries
            })
            .expect("enter node")
        })
        .collect();
    assert_eq!(listings[0], listings[1]);
    assert!(listings[0].iter().all(|e| e.protocol == 17));
    let tcp_seen =
        netns_exec_ok(&bed.node_ns(), &["conntrack", "-L", "-p", "tcp"]).expect("conntrack -L");
    assert!(
        tcp_seen.contains("dport=80"),
        "a TCP entry exists: {tcp_seen}"
    );

    // Deleting the old entry again is not an error. The kernel's entry id hashes the
    // object's address and original tuple, so when the allocator hands the same
    // slot to the new flow the ids match and the fresh entry may go too (seen in
    // CI: deleted == 1). That is harmless for UDP: the next datagram is DNATed
    // afresh to the current endpoint.
    let deleted = in_netns(&bed.node_ns(), || {
        Conntrack::open().expect("open").delete(&[stale_entry])
    })
    .expect("enter node")
    .expect("delete of a gone entry");
    assert!(deleted <= 1, "at most the same-tuple entry: {deleted}");
    bed.send(40000, svc, 2);
    assert_eq!(
        wait_count(5, || from_ext(b, ext)),
        5,
        "the flow still reaches pod b"
    );
    settle();
    assert_eq!(from_ext(a, ext), 8, "pod a still gets nothing more");
    assert!(
        bed.list()
            .iter()
            .any(|e| e.orig_dst == svc && e.orig_sport == 40000 && e.reply_src == *b_ip),
        "an entry to pod b exists for the tuple"
    );
}

#[test]
fn entry_without_dnat_is_deleted_when_the_service_gets_endpoints() {
    let bed = Bed::new();
    let svc = ip("10.96.0.12");
    let ext = bed.topology.ext().ip;
    let (a_ip, a) = &bed.pod_a;

    // No rule yet (a service without endpoints that nothing rejects): the datagrams
    // go nowhere, but conntrack confirms an entry with no NAT.
    bed.send(40002, svc, 2);
    let deadline = Instant::now() + Duration::from_secs(3);
    let plain = loop {
        if let Some(entry) = bed
            .list()
            .into_iter()
            .find(|e| e.orig_dst == svc && e.orig_sport == 40002)
        {
            break entry;
        }
        assert!(Instant::now() < deadline, "no conntrack entry for {svc}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!plain.is_dnat(), "{plain}");

    // Endpoints appear: the rule DNATs to pod a, but the entry keeps the flow un-NATed.
    bed.dnat(svc, *a_ip);
    bed.send(40002, svc, 2);
    settle();
    assert_eq!(
        from_ext(a, ext),
        0,
        "stale un-NATed entry bypasses the DNAT"
    );

    // Without endpoints in the table nothing is touched (upstream: 0 endpoints, no
    // cleanup).
    let mut empty = UdpServiceTable::new();
    empty.add_service_ip(svc, SVC_PORT, []);
    assert_eq!(bed.reconcile(&empty).deleted, 0);

    let mut table = UdpServiceTable::new();
    table.add_service_ip(svc, SVC_PORT, [*a_ip]);
    let report = bed.reconcile(&table);
    assert_eq!((report.stale, report.deleted), (1, 1), "{report:?}");

    bed.send(40002, svc, 2);
    assert_eq!(
        wait_count(2, || from_ext(a, ext)),
        2,
        "pod a after reconcile"
    );
}

/// Many stale entries: one dump, batched deletes. Prints the measured time.
#[test]
fn reconciles_ten_thousand_entries() {
    const N: u16 = 10_000;
    let bed = Bed::new();
    let svc = ip("10.96.0.13");
    let (a_ip, _) = &bed.pod_a;
    let (b_ip, _) = &bed.pod_b;
    bed.dnat(svc, *a_ip);
    in_netns(&bed.ext_ns(), || {
        for sport in 20_000..20_000 + N {
            let socket = UdpSocket::bind(("0.0.0.0", sport)).expect("bind");
            socket
                .send_to(b"x", SocketAddr::new(svc, SVC_PORT))
                .expect("send");
        }
    })
    .expect("enter ext");
    let count_to = |target: IpAddr| {
        bed.list()
            .iter()
            .filter(|e| e.orig_dst == svc && e.reply_src == target)
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_to(*a_ip) < usize::from(N) {
        assert!(Instant::now() < deadline, "entries never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A reconcile with nothing stale costs one dump of the table.
    let mut current = UdpServiceTable::new();
    current.add_service_ip(svc, SVC_PORT, [*a_ip]);
    let idle = bed.reconcile(&current);
    eprintln!(
        "reconcile of {} UDP entries, none stale: {:?}",
        idle.listed, idle.duration
    );
    assert_eq!((idle.stale, idle.deleted), (0, 0), "{idle:?}");
    assert!(idle.listed >= usize::from(N), "{idle:?}");

    bed.dnat(svc, *b_ip);
    let mut table = UdpServiceTable::new();
    table.add_service_ip(svc, SVC_PORT, [*b_ip]);
    let report = bed.reconcile(&table);
    eprintln!(
        "reconcile of {} UDP entries: {} stale, {} deleted in {:?}",
        report.listed, report.stale, report.deleted, report.duration
    );
    assert_eq!(report.stale, usize::from(N), "{report:?}");
    assert_eq!(report.deleted, usize::from(N), "{report:?}");
    assert_eq!(count_to(*a_ip), 0, "every stale entry is gone");
}
