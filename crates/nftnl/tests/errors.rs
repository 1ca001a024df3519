//! Kernel rejections name the statement; the batch is atomic; a transaction that does not
//! parse is refused before anything is sent.

mod common;
use common::*;
use kp_nftnl::{NetlinkApplier, NftnlError};

#[test]
fn rejected_statement_is_named_and_nothing_is_applied() {
    if !is_root() {
        return;
    }
    let ns = Ns::new("err");
    let base = "add table ip kube-proxy\nadd chain ip kube-proxy a\n";
    let bad = "add chain ip kube-proxy b\n\nadd rule ip kube-proxy b jump missing-chain\nadd chain ip kube-proxy c\n";
    let (ok, err, again) = ns.run(|| {
        let mut ap = NetlinkApplier::open().unwrap();
        let ok = ap.apply(base);
        let err = ap.apply(bad);
        // The socket stays usable after a rejected batch.
        let again = ap.apply("add chain ip kube-proxy d\n");
        (ok, err, again)
    });
    ok.unwrap();
    again.unwrap();
    match err {
        Err(NftnlError::Rejected {
            line,
            statement,
            errno,
            ..
        }) => {
            assert_eq!(line, 3);
            assert_eq!(statement, "add rule ip kube-proxy b jump missing-chain");
            assert_eq!(errno, libc::ENOENT);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let listing = ns.list("ip");
    assert!(
        listing.contains("chain a") && listing.contains("chain d"),
        "{listing}"
    );
    assert!(
        !listing.contains("chain b") && !listing.contains("chain c"),
        "atomic: {listing}"
    );
}

#[test]
fn unparsable_text_sends_nothing() {
    if !is_root() {
        return;
    }
    let ns = Ns::new("perr");
    let r = ns.run(|| {
        NetlinkApplier::open()
            .unwrap()
            .apply("add table ip kube-proxy\nadd rule ip kube-proxy x tcp flags syn drop\n")
    });
    match r {
        Err(NftnlError::Parse(e)) => assert_eq!(e.line, 2),
        other => panic!("{other:?}"),
    }
    let out = ns.exec(&["nft", "list", "tables"]);
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn large_element_lists_are_split_across_messages() {
    if !is_root() {
        return;
    }
    // 3000 elements with long verdict chain names exceed one 16-bit attribute.
    let chain = format!("endpoint-{}", "x".repeat(100));
    let mut text = format!(
        "add table ip kube-proxy\nadd chain ip kube-proxy {chain}\nadd map ip kube-proxy m {{ type inet_proto . inet_service : verdict ; }}\n"
    );
    let items: Vec<String> = (0..3000)
        .map(|i| format!("tcp . {} : goto {chain}", 1000 + i))
        .collect();
    text.push_str(&format!(
        "add element ip kube-proxy m {{ {} }}\n",
        items.join(", ")
    ));
    let a = Ns::new("big-a");
    let b = Ns::new("big-b");
    a.nft_f(&text).unwrap();
    let rep = b
        .run(|| NetlinkApplier::open().unwrap().apply(&text))
        .unwrap();
    assert!(rep.messages > 4, "{rep:?}");
    let lb = b.list("ip");
    assert_eq!(lb.matches(": goto").count(), 3000);
    assert_eq!(a.list("ip"), lb);
}
