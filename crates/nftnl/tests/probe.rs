//! The drift probe: counting one chain's rules over netlink, without reading the table.

mod common;
use common::*;
use kp_nftnl::{Family, NetlinkApplier};

#[test]
fn chain_rule_count_sees_rules_and_their_absence() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = Ns::new("probe");
    let counts = ns.run(|| {
        let mut ap = NetlinkApplier::open().unwrap();
        let before = ap.chain_rule_count(Family::Ip, "kube-proxy", "nat-prerouting");
        ap.apply(
            "add table ip kube-proxy\n\
             add chain ip kube-proxy services\n\
             add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n\
             add rule ip kube-proxy nat-prerouting jump services\n",
        )
        .unwrap();
        let present = ap.chain_rule_count(Family::Ip, "kube-proxy", "nat-prerouting");
        let empty = ap.chain_rule_count(Family::Ip, "kube-proxy", "services");
        let other_family = ap.chain_rule_count(Family::Ip6, "kube-proxy", "nat-prerouting");
        ap.apply("delete table ip kube-proxy\n").unwrap();
        let after = ap.chain_rule_count(Family::Ip, "kube-proxy", "nat-prerouting");
        [before, present, empty, other_family, after].map(|r| r.unwrap().unwrap_or(0))
    });
    assert_eq!(counts, [0, 1, 0, 0, 0]);
}
