//! Against a real IPVS, each test in a fresh network namespace (its own IPVS table).
//!
//! The development host's kernel has no IPVS and cannot load modules, so the tests that
//! need it are `#[ignore]`d and run in the QEMU guest (Debian's kernel, ip_vs loaded):
//!
//! ```text
//! cargo test -p kp-ipvsnl --no-run      # prints the test executable
//! bash /work/shared/reference/testbed/guest-run.sh target/debug/deps/kernel-<hash> \
//!     --ignored --test-threads=1 --nocapture
//! ```

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Instant;

use kp_ipvsnl::{
    Error, ForwardMethod, IpvsClient, Op, Protocol, RealServer, Service, ServiceKey, Timeouts,
    VirtualServer, flags,
};

/// Runs `f` in a thread moved to a new network namespace (children it spawns, such as
/// ipvsadm, start there too), with `lo` up: until the namespace has a local IPv4 route
/// the kernel refuses IPv4 real servers with EINVAL (ipvsadm too: it checks the address
/// type against a local table that does not exist yet).
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: plain syscall; it moves only this thread to a new namespace.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(up.success(), "ip link set lo up");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(protocol: Protocol, addr: &str, port: u16) -> ServiceKey {
    ServiceKey::new(protocol, ip(addr), port)
}

fn virtual_servers(c: &mut IpvsClient) -> Vec<VirtualServer> {
    let mut v: Vec<_> = c
        .services()
        .unwrap()
        .into_iter()
        .filter_map(Service::into_virtual)
        .collect();
    v.sort_by_key(|s| s.key);
    v
}

fn real_servers(c: &mut IpvsClient, k: &ServiceKey) -> Vec<RealServer> {
    let mut v = c.real_servers(k).unwrap();
    v.sort_by_key(|r| (r.addr, r.port));
    v
}

fn ipvsadm(args: &[&str]) -> String {
    let out = Command::new("ipvsadm")
        .args(args)
        .output()
        .expect("run ipvsadm");
    assert!(
        out.status.success(),
        "ipvsadm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What `ipvsadm -Ln` shows: services as (protocol, addr:port, scheduler, persistence
/// timeout) and real servers as (service addr:port, addr:port, forward, weight).
type IpvsadmView = (
    BTreeSet<(String, String, String, Option<u32>)>,
    BTreeSet<(String, String, String, i32)>,
);

fn parse_ipvsadm(text: &str) -> IpvsadmView {
    let mut services = BTreeSet::new();
    let mut reals = BTreeSet::new();
    let mut current = String::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["->", "RemoteAddress:Port", ..] => {}
            ["->", addr, fwd, weight, ..] => {
                reals.insert((
                    current.clone(),
                    addr.to_string(),
                    fwd.to_string(),
                    weight.parse().unwrap(),
                ));
            }
            [proto @ ("TCP" | "UDP" | "SCTP"), addr, sched, rest @ ..] => {
                current = addr.to_string();
                let persistent = rest
                    .iter()
                    .position(|w| *w == "persistent")
                    .map(|i| rest[i + 1].parse().unwrap());
                services.insert((
                    proto.to_string(),
                    addr.to_string(),
                    sched.to_string(),
                    persistent,
                ));
            }
            _ => {}
        }
    }
    (services, reals)
}

/// The same view built from our own dump.
fn view_of(c: &mut IpvsClient) -> IpvsadmView {
    let mut services = BTreeSet::new();
    let mut reals = BTreeSet::new();
    for vs in virtual_servers(c) {
        let addr = SocketAddr::new(vs.key.addr, vs.key.port).to_string();
        let persistent = (vs.flags & flags::PERSISTENT != 0).then_some(vs.timeout);
        services.insert((
            vs.key.protocol.to_string(),
            addr.clone(),
            vs.scheduler.clone(),
            persistent,
        ));
        for rs in real_servers(c, &vs.key) {
            reals.insert((
                addr.clone(),
                rs.socket_addr().to_string(),
                rs.fwd.to_string(),
                rs.weight,
            ));
        }
    }
    (services, reals)
}

fn sample_services() -> Vec<VirtualServer> {
    let mut out = vec![
        VirtualServer::new(key(Protocol::Tcp, "10.96.0.1", 80), "rr"),
        VirtualServer::new(key(Protocol::Sctp, "10.96.0.20", 3868), "rr"),
        VirtualServer::new(key(Protocol::Sctp, "fd00:10:96::20", 3868), "rr"),
    ];
    let mut sh = VirtualServer::new(key(Protocol::Udp, "10.96.0.10", 53), "sh");
    sh.flags = flags::SH_FALLBACK | flags::SH_PORT;
    out.push(sh);
    let mut p6 = VirtualServer::new(key(Protocol::Tcp, "fd00:10:96::1", 443), "rr");
    p6.flags = flags::PERSISTENT;
    p6.timeout = 10800;
    out.push(p6);
    let mut sh6 = VirtualServer::new(key(Protocol::Udp, "fd00:10:96::a", 53), "sh");
    sh6.flags = flags::SH_FALLBACK | flags::SH_PORT | flags::PERSISTENT;
    sh6.timeout = 300;
    sh6.netmask = 64;
    out.push(sh6);
    let mut p4 = VirtualServer::new(key(Protocol::Tcp, "10.96.0.30", 8080), "wrr");
    p4.flags = flags::PERSISTENT;
    p4.timeout = 600;
    p4.netmask = 0xffff_ff00;
    out.push(p4);
    let mut one = VirtualServer::new(key(Protocol::Udp, "10.96.0.40", 5000), "rr");
    one.flags = flags::ONEPACKET;
    out.push(one);
    out.sort_by_key(|s| s.key);
    out
}

fn sample_real_servers(vs: &VirtualServer, i: usize) -> Vec<RealServer> {
    (1..=3u8)
        .map(|n| {
            let addr = match vs.key.addr {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 1, i as u8, n)),
                IpAddr::V6(_) => ip(&format!("fd00:1:{i}::{n}")),
            };
            let mut rs = RealServer::new(addr, 8000 + n as u16, n as i32);
            if n == 3 {
                rs.fwd = ForwardMethod::Route;
            }
            rs
        })
        .collect()
}

#[test]
fn open_outside_ipvs_is_recognisable() {
    // On a kernel without IPVS, open must say so with its own variant; with IPVS it opens.
    in_new_netns(|| match IpvsClient::open() {
        Ok(mut c) => {
            assert_eq!(c.version().unwrap().major, 1);
        }
        Err(e) => {
            assert!(e.is_not_available(), "unexpected error: {e}");
            let io: std::io::Error = e.into();
            assert_eq!(io.kind(), std::io::ErrorKind::Unsupported);
        }
    });
}

#[test]
#[ignore = "needs a kernel with IPVS: run in the QEMU guest (see the file's doc)"]
fn services_and_real_servers_round_trip() {
    in_new_netns(|| {
        let mut c = IpvsClient::open().expect("open IPVS");
        let info = c.info().unwrap();
        println!(
            "IPVS {} (conn table {}), family id {}, batch size {}",
            info.version,
            info.conn_table_size,
            c.family_id(),
            c.batch_size()
        );
        assert_eq!(info.version.major, 1);
        assert!(
            c.services().unwrap().is_empty(),
            "a new namespace starts empty"
        );

        // Services, one call each.
        let services = sample_services();
        for vs in &services {
            c.add_service(vs).unwrap();
        }
        assert_eq!(virtual_servers(&mut c), services);

        // Real servers.
        for (i, vs) in services.iter().enumerate() {
            for rs in sample_real_servers(vs, i) {
                c.add_real_server(&vs.key, &rs).unwrap();
            }
        }
        for (i, vs) in services.iter().enumerate() {
            assert_eq!(
                real_servers(&mut c, &vs.key),
                sample_real_servers(vs, i),
                "{}",
                vs.key
            );
        }

        let shown = ipvsadm(&["-Ln"]);
        println!("ipvsadm -Ln:\n{shown}");
        assert_eq!(parse_ipvsadm(&shown), view_of(&mut c));

        // Updates.
        let mut changed = services[0].clone();
        changed.scheduler = "wrr".into();
        changed.flags = flags::PERSISTENT;
        changed.timeout = 60;
        c.update_service(&changed).unwrap();
        let mut rs = sample_real_servers(&services[0], 0);
        rs[0].weight = 0;
        rs[1].weight = 50;
        rs[1].fwd = ForwardMethod::Tunnel;
        c.update_real_server(&changed.key, &rs[0]).unwrap();
        c.update_real_server(&changed.key, &rs[1]).unwrap();
        c.delete_real_server(&changed.key, &rs[2]).unwrap();
        rs.truncate(2);
        assert_eq!(real_servers(&mut c, &changed.key), rs);
        let mut want = services.clone();
        want[0] = changed.clone();
        assert_eq!(virtual_servers(&mut c), want);

        c.delete_service(&services[1].key).unwrap();
        want.remove(1);
        assert_eq!(virtual_servers(&mut c), want);
        assert!(c.real_servers(&services[1].key).unwrap().is_empty());
        assert_eq!(parse_ipvsadm(&ipvsadm(&["-Ln"])), view_of(&mut c));

        // Errors name the operation and keep the errno.
        let e = c.add_service(&changed).unwrap_err();
        println!("expected error: {e}");
        assert_eq!(e.errno(), Some(libc::EEXIST));
        assert!(e.to_string().starts_with("add service"), "{e}");
        let e = c.add_real_server(&changed.key, &rs[0]).unwrap_err();
        println!("expected error: {e}");
        assert_eq!(e.errno(), Some(libc::EEXIST));
        assert!(
            e.to_string().contains(&format!(
                "add real server {} to {}",
                rs[0].socket_addr(),
                changed.key
            )),
            "{e}"
        );
        let gone = key(Protocol::Tcp, "10.99.99.99", 1);
        let e = c.add_real_server(&gone, &rs[0]).unwrap_err();
        println!("expected error: {e}");
        assert_eq!(e.errno(), Some(libc::ESRCH));
        let e = c.delete_service(&gone).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ESRCH));
        let stranger = RealServer::new(ip("10.7.7.7"), 1, 1);
        let e = c.delete_real_server(&changed.key, &stranger).unwrap_err();
        println!("expected error: {e}");
        assert_eq!(e.errno(), Some(libc::ENOENT));
        let e = c.update_real_server(&changed.key, &stranger).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOENT));
        let mut negative = stranger.clone();
        negative.weight = -1;
        let e = c.add_real_server(&changed.key, &negative).unwrap_err();
        println!("expected error: {e}");
        assert_eq!(e.errno(), Some(libc::ERANGE));
        let bad_sched = VirtualServer::new(key(Protocol::Tcp, "10.99.0.1", 1), "nosuchsched");
        let e = c.add_service(&bad_sched).unwrap_err();
        println!("expected error: {e}");
        assert!(matches!(e, Error::Kernel { .. }), "{e}");

        // One batch with failures in the middle: the others still apply.
        let extra = VirtualServer::new(key(Protocol::Tcp, "10.96.1.1", 80), "rr");
        let extra_rs = RealServer::new(ip("10.2.0.1"), 80, 1);
        let ops = [
            Op::AddService(&extra),
            Op::AddService(&extra),
            Op::AddRealServer(&extra.key, &extra_rs),
            Op::DeleteRealServer(&extra.key, &stranger),
            Op::AddRealServer(&extra.key, &extra_rs),
        ];
        let failures = c.apply(&ops).unwrap();
        let got: Vec<(usize, Option<i32>)> =
            failures.iter().map(|(i, e)| (*i, e.errno())).collect();
        assert_eq!(
            got,
            vec![
                (1, Some(libc::EEXIST)),
                (3, Some(libc::ENOENT)),
                (4, Some(libc::EEXIST))
            ]
        );
        assert_eq!(real_servers(&mut c, &extra.key), vec![extra_rs.clone()]);

        // Flush empties the table.
        c.flush().unwrap();
        assert!(c.services().unwrap().is_empty());
        assert!(parse_ipvsadm(&ipvsadm(&["-Ln"])).0.is_empty());
    });
}

#[test]
#[ignore = "needs a kernel with IPVS: run in the QEMU guest (see the file's doc)"]
fn batch_of_1000_services_with_10_real_servers_each() {
    in_new_netns(|| {
        let mut c = IpvsClient::open().expect("open IPVS");
        let services: Vec<VirtualServer> = (0..1000u32)
            .map(|i| {
                let addr = Ipv4Addr::from(0x0a60_0000 + i);
                let proto = [Protocol::Tcp, Protocol::Udp][i as usize % 2];
                VirtualServer::new(ServiceKey::new(proto, IpAddr::V4(addr), 80), "rr")
            })
            .collect();
        let reals: Vec<Vec<RealServer>> = (0..1000u32)
            .map(|i| {
                (0..10u32)
                    .map(|j| {
                        let addr = Ipv4Addr::from(0x0a80_0000 + i * 16 + j);
                        RealServer::new(IpAddr::V4(addr), 8080, 1 + j as i32)
                    })
                    .collect()
            })
            .collect();
        let mut ops = Vec::with_capacity(11_000);
        for (vs, rs) in services.iter().zip(&reals) {
            ops.push(Op::AddService(vs));
            ops.extend(rs.iter().map(|r| Op::AddRealServer(&vs.key, r)));
        }
        let t = Instant::now();
        let failures = c.apply(&ops).unwrap();
        let apply_time = t.elapsed();
        assert!(failures.is_empty(), "first failure: {}", failures[0].1);
        println!(
            "apply: {} ops (1000 services x 10 real servers) in {:?} ({} ops per datagram)",
            ops.len(),
            apply_time,
            c.batch_size()
        );

        let t = Instant::now();
        let got = virtual_servers(&mut c);
        let dump_services = t.elapsed();
        let mut want = services.clone();
        want.sort_by_key(|s| s.key);
        assert_eq!(got, want);
        let t = Instant::now();
        for (vs, rs) in services.iter().zip(&reals) {
            assert_eq!(&real_servers(&mut c, &vs.key), rs);
        }
        let dump_reals = t.elapsed();
        println!(
            "dump: 1000 services in {dump_services:?}; their real servers (1000 dumps) in {dump_reals:?}"
        );

        let t = Instant::now();
        let shown = ipvsadm(&["-Ln"]);
        let ipvsadm_time = t.elapsed();
        let (s, r) = parse_ipvsadm(&shown);
        assert_eq!((s.len(), r.len()), (1000, 10_000));
        println!("ipvsadm -Ln agrees (1000 services, 10000 real servers) in {ipvsadm_time:?}");

        // Update every weight, then delete everything, in batches too.
        let bumped: Vec<Vec<RealServer>> = reals
            .iter()
            .map(|rs| {
                rs.iter()
                    .map(|r| RealServer {
                        weight: r.weight + 1,
                        ..r.clone()
                    })
                    .collect()
            })
            .collect();
        let updates: Vec<Op> = services
            .iter()
            .zip(&bumped)
            .flat_map(|(vs, rs)| rs.iter().map(|r| Op::UpdateRealServer(&vs.key, r)))
            .collect();
        let t = Instant::now();
        assert!(c.apply(&updates).unwrap().is_empty());
        let update_time = t.elapsed();
        assert_eq!(real_servers(&mut c, &services[500].key), bumped[500]);
        let deletes: Vec<Op> = services
            .iter()
            .map(|vs| Op::DeleteService(&vs.key))
            .collect();
        let t = Instant::now();
        assert!(c.apply(&deletes).unwrap().is_empty());
        let delete_time = t.elapsed();
        assert!(c.services().unwrap().is_empty());
        println!("update 10000 weights: {update_time:?}; delete 1000 services: {delete_time:?}");

        // Baselines for the same 11,000 changes: one datagram (and round trip) per op,
        // then ipvsadm -R (one netlink exchange per line).
        let batch = c.batch_size();
        c.set_batch_size(1);
        let t = Instant::now();
        assert!(c.apply(&ops).unwrap().is_empty());
        let one_by_one = t.elapsed();
        c.set_batch_size(batch);
        assert_eq!(virtual_servers(&mut c).len(), 1000);
        c.flush().unwrap();
        let mut script = String::new();
        for (vs, rs) in services.iter().zip(&reals) {
            let flag = if vs.key.protocol == Protocol::Tcp {
                "-t"
            } else {
                "-u"
            };
            let svc = SocketAddr::new(vs.key.addr, vs.key.port);
            script.push_str(&format!("-A {flag} {svc} -s rr\n"));
            for r in rs {
                script.push_str(&format!(
                    "-a {flag} {svc} -r {} -m -w {}\n",
                    r.socket_addr(),
                    r.weight
                ));
            }
        }
        let t = Instant::now();
        let mut child = Command::new("ipvsadm")
            .arg("-R")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run ipvsadm -R");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        let restore = t.elapsed();
        assert_eq!(virtual_servers(&mut c), want);
        println!(
            "same 11000 ops one datagram each: {one_by_one:?}; ipvsadm -R: {restore:?}; batched apply: {apply_time:?}"
        );
        c.flush().unwrap();
    });
}

#[test]
#[ignore = "needs a kernel with IPVS: run in the QEMU guest (see the file's doc)"]
fn timeouts_set_and_read_back() {
    in_new_netns(|| {
        let mut c = IpvsClient::open().expect("open IPVS");
        let before = c.timeouts().unwrap();
        println!("default timeouts: {before:?}");
        assert_eq!(
            before,
            Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300
            }
        );
        let want = Timeouts {
            tcp: 3600,
            tcp_fin: 60,
            udp: 45,
        };
        c.set_timeouts(&want).unwrap();
        assert_eq!(c.timeouts().unwrap(), want);
        let shown = ipvsadm(&["-Ln", "--timeout"]);
        println!("ipvsadm -Ln --timeout: {}", shown.trim());
        assert!(shown.contains("3600 60 45"), "{shown}");
        // zeros leave a timeout as it is
        c.set_timeouts(&Timeouts {
            tcp: 0,
            tcp_fin: 0,
            udp: 30,
        })
        .unwrap();
        assert_eq!(c.timeouts().unwrap(), Timeouts { udp: 30, ..want });
    });
}
