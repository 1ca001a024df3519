//! README's first command: `kp-sandbox` (what `./scripts/kp sandbox` runs) runs the redis
//! walk-through end to end (emulator, namespaces, pods, the real proxy, traffic) in both
//! modes. Needs root.

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kp-sandbox");

/// The proxy binary beside kp-sandbox: `cargo test --workspace` builds it with the
/// kube-proxy-rs tests (a nested cargo would wait for the build lock the test run holds).
fn proxy_binary() -> PathBuf {
    let bin = PathBuf::from(BIN).with_file_name("kube-proxy-rs");
    assert!(
        bin.is_file(),
        "{} missing: run cargo build -p kube-proxy-rs (or cargo test --workspace) first",
        bin.display()
    );
    bin
}

fn sandbox(extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--binary")
        .arg(proxy_binary())
        .args(["--connections", "40"])
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

/// The test kit stays out of the proxy: the kube-proxy-rs binary (same dependency graph
/// as the image's release build, `cargo build -p kube-proxy-rs`) holds no symbol of the
/// emulator, the lab or the certificate generator, while kp-sandbox, built from the same
/// tree, does (so the check can fail).
#[test]
fn proxy_binary_carries_no_test_kit() {
    let kit = ["kp_emulator", "kp_testkit", "rcgen"];
    let found = |path: &std::path::Path| -> Vec<&str> {
        let bytes = std::fs::read(path).expect("read binary");
        kit.iter()
            .copied()
            .filter(|k| bytes.windows(k.len()).any(|w| w == k.as_bytes()))
            .collect()
    };
    assert_eq!(
        found(std::path::Path::new(BIN)),
        kit,
        "control: kp-sandbox has the kit"
    );
    assert_eq!(found(&proxy_binary()), Vec::<&str>::new(), "kube-proxy-rs");
}
