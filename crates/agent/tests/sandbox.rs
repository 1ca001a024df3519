//! README's first command: `kube-proxy-rs sandbox` runs the redis walk-through end to end
//! (emulator, namespaces, pods, the real proxy, traffic) in both modes. Needs root.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");

fn sandbox(extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["sandbox", "--connections", "40"])
        .args(extra)
        .output()
        .expect("run sandbox");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "sandbox failed:\n{text}");
    text
}

/// Connections per pod from the traffic table (`  redis-…   N   P%`).
fn shares(text: &str) -> Vec<u32> {
    text.lines()
        .filter(|l| l.trim_start().starts_with("redis-") && l.trim_end().ends_with('%'))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

#[test]
fn sandbox_walkthrough_in_both_modes() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ipt = sandbox(&[]);
    assert!(ipt.contains("-j KUBE-SVC-"), "{ipt}");
    assert!(
        ipt.contains("first sync: full=true services=1 endpoints=2"),
        "{ipt}"
    );
    let nft = sandbox(&["--proxy-arg=--proxy-mode=nftables"]);
    assert!(nft.contains("goto pick-internal-tcp-2"), "{nft}");
    assert!(
        nft.contains("first sync: full=true services=1 endpoints=2"),
        "{nft}"
    );
    for text in [&ipt, &nft] {
        let s = shares(text);
        assert_eq!(s.len(), 2, "two pods answered:\n{text}");
        assert_eq!(
            s.iter().sum::<u32>(),
            40,
            "every connection answered:\n{text}"
        );
        assert!(s.iter().all(|n| *n > 0), "both pods get traffic:\n{text}");
        assert!(
            text.contains("removed all namespaces, processes and rules"),
            "{text}"
        );
    }
}
