//! kube-ipvs0 over rtnetlink against this machine's kernel, in a throw-away network
//! namespace (root). This host's kernel has no dummy driver, so the device here is an
//! ifb (another kind with no lower device); the dummy itself is made by the IPVS-mode
//! scenario suites in the guest.

use std::collections::BTreeSet;
use std::net::IpAddr;

use kp_ipvs::{RtnlDevice, VipDevice};
use kp_model::IpFamily;

fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET) (root?)");
        f()
    })
    .join()
    .unwrap()
}

fn ips(s: &[&str]) -> Vec<IpAddr> {
    s.iter().map(|s| s.parse().unwrap()).collect()
}

fn ip_output(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn creates_lists_changes_and_deletes_the_vip_device() {
    in_new_netns(|| {
        let mut d = RtnlDevice::of_kind("kube-ipvs0", "ifb");
        assert!(!d.exists().unwrap());
        assert!(
            d.addresses(IpFamily::V4).is_err(),
            "no device, no address list"
        );
        d.create().unwrap();
        d.create().unwrap(); // existing is fine
        assert!(d.exists().unwrap());
        assert!(ip_output(&["-d", "link", "show", "kube-ipvs0"]).contains("ifb"));

        let v4 = ips(&["10.96.0.1", "10.96.0.10", "203.0.113.7"]);
        let v6 = ips(&["fd00:10:96::1", "fd00:10:96::a"]);
        let all: Vec<IpAddr> = v4.iter().chain(&v6).copied().collect();
        assert_eq!(d.change(&all, &[]), Vec::<String>::new());
        // Adding again and deleting what is not there are no failures (idempotent).
        assert_eq!(
            d.change(&v4[..1], &ips(&["10.96.0.99"])),
            Vec::<String>::new()
        );
        assert_eq!(
            d.addresses(IpFamily::V4).unwrap(),
            v4.iter().copied().collect::<BTreeSet<_>>()
        );
        assert_eq!(
            d.addresses(IpFamily::V6).unwrap(),
            v6.iter().copied().collect::<BTreeSet<_>>()
        );
        // As `ip` sees them: host routes, IPv6 without duplicate address detection.
        let shown = ip_output(&["-o", "addr", "show", "dev", "kube-ipvs0"]);
        assert!(shown.contains("inet 10.96.0.10/32"), "{shown}");
        assert!(shown.contains("inet6 fd00:10:96::a/128"), "{shown}");
        assert!(!shown.contains("tentative"), "{shown}");
        let local = ip_output(&["route", "show", "table", "local"]);
        assert!(local.contains("local 10.96.0.10 dev kube-ipvs0"), "{local}");

        assert_eq!(d.change(&[], &v4[1..]), Vec::<String>::new());
        assert_eq!(
            d.addresses(IpFamily::V4).unwrap(),
            v4[..1].iter().copied().collect::<BTreeSet<_>>()
        );

        // 2,000 addresses in one call (chunked batches).
        let many: Vec<IpAddr> = (0..2000u32)
            .map(|i| IpAddr::from([10, 97, (i >> 8) as u8, i as u8]))
            .collect();
        assert_eq!(d.change(&many, &[]), Vec::<String>::new());
        assert_eq!(d.addresses(IpFamily::V4).unwrap().len(), 2001);

        d.delete().unwrap();
        assert!(!d.exists().unwrap());
        d.delete().unwrap(); // gone is fine
    });
}
