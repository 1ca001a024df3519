//! Every statement shape, hand-written: nft -f in one namespace, NetlinkApplier in another,
//! then `nft list table` must be identical.

mod common;
use common::*;
use kp_nftnl::NetlinkApplier;

const V4: &str = include_str!("data/all_shapes_ip.nft");
const V6: &str = include_str!("data/all_shapes_ip6.nft");

fn same_as_nft(family: &str, text: &str) {
    let a = Ns::new("hw-a");
    let b = Ns::new("hw-b");
    a.nft_f(text).expect("nft -f accepts the reference text");
    let report = b
        .run(|| NetlinkApplier::open().unwrap().apply(text))
        .unwrap();
    assert!(report.messages > 0);
    let la = a.list(family);
    let lb = b.list(family);
    assert_eq!(la, lb, "nft:\n{la}\nnetlink:\n{lb}");
}

#[test]
fn every_shape_ip_lists_like_nft() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    same_as_nft("ip", V4);
}

#[test]
fn every_shape_ip6_lists_like_nft() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    same_as_nft("ip6", V6);
}
