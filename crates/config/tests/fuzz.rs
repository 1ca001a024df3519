//! Bounded, deterministic fuzzing of the command line and the config file: thousands of
//! random flag combinations and mutated files. Whatever the input, `load` returns (never
//! panics), and every error is one line naming what is wrong.

mod common;

use common::TempConfig;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const FLAGS: &[&str] = &[
    "--proxy-mode",
    "--hostname-override",
    "--cluster-cidr",
    "--nodeport-addresses",
    "--masquerade-all",
    "--iptables-sync-period",
    "--iptables-min-sync-period",
    "--iptables-masquerade-bit",
    "--metrics-bind-address",
    "--healthz-bind-address",
    "--conntrack-max-per-core",
    "--conntrack-min",
    "--conntrack-tcp-timeout-established",
    "--conntrack-udp-timeout",
    "--detect-local-mode",
    "--pod-bridge-interface",
    "--pod-interface-name-prefix",
    "--oom-score-adj",
    "--v",
    "--feature-gates",
    "--ipvs-scheduler",
    "--bind-address",
    "--kube-api-qps",
    "--no-such-flag",
    "-v",
    "--",
];

const VALUES: &[&str] = &[
    "",
    "0",
    "-1",
    "1",
    "14",
    "32",
    "99999999999999999999",
    "1m0s",
    "30s",
    "-5s",
    "1e99",
    "0x10",
    "true",
    "false",
    "nftables",
    "iptables",
    "ipvs",
    "userspace",
    "bogus",
    "10.0.0.0/8",
    "10.0.0.0/33",
    "10.0.0.1",
    "::1",
    "fd00::/129",
    "primary",
    "10.0.0.0/8,primary,fd00::/64",
    "127.0.0.1:10249",
    "[::]:10256",
    "0.0.0.0:99999",
    "ClusterCIDR",
    "BridgeInterface",
    "a=b,c",
    "=",
    "\n",
    "\u{0}",
    "λ\u{202e}",
    "\"; rm -rf /",
];

fn assert_one_line(e: &impl std::fmt::Display, input: &str) {
    let s = e.to_string();
    assert!(!s.is_empty(), "empty error for {input:?}");
    assert!(
        !s.trim_end().contains('\n'),
        "multi-line error for {input:?}: {s}"
    );
}

#[test]
fn random_command_lines_never_panic_and_errors_are_one_line() {
    let mut r = StdRng::seed_from_u64(0x5eed);
    let long = "x".repeat(70_000);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        let mut argv: Vec<String> = Vec::new();
        for _ in 0..1 + r.gen_range(0..6) {
            let flag = *FLAGS.choose(&mut r).expect("non-empty");
            let value = if r.gen_range(0..20) == 0 {
                long.as_str()
            } else {
                *VALUES.choose(&mut r).expect("non-empty")
            };
            match r.gen_range(0..3) {
                0 => argv.push(format!("{flag}={value}")),
                1 => {
                    argv.push(flag.to_string());
                    argv.push(value.to_string());
                }
                _ => argv.push(flag.to_string()),
            }
        }
        let shown = argv.join(" ");
        match kp_config::load(argv.clone()) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_one_line(&e, &shown);
                err += 1;
            }
        }
    }
    // Both outcomes occur, so the inputs reach past the first check.
    assert!(ok > 50 && err > 500, "ok {ok}, err {err}");
}

#[test]
fn mutated_config_files_never_panic_and_errors_are_one_line() {
    let mut r = StdRng::seed_from_u64(0xf11e);
    let valid = kp_config::to_yaml(&kp_config::default_config());
    let (mut ok, mut err) = (0, 0);
    let lines: Vec<&str> = valid.lines().collect();
    for i in 0..600 {
        let mut doc: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        for _ in 0..1 + r.gen_range(0..4) {
            if doc.is_empty() {
                break;
            }
            let at = r.gen_range(0..doc.len());
            match r.gen_range(0..7) {
                0 => {
                    doc.remove(at);
                }
                1 => {
                    let l = doc[at].clone();
                    doc.insert(at, l);
                }
                2 => {
                    // Replace the value of a `key: value` line.
                    if let Some((k, _)) = doc[at].clone().split_once(':') {
                        doc[at] = format!("{k}: {}", *VALUES.choose(&mut r).expect("non-empty"));
                    }
                }
                3 => doc[at] = format!("  {}", doc[at]),
                4 => doc.insert(
                    at,
                    format!(
                        "{}: {}",
                        *VALUES.choose(&mut r).expect("non-empty"),
                        *VALUES.choose(&mut r).expect("non-empty")
                    ),
                ),
                5 => doc.truncate(at.max(1)),
                _ => {
                    let b = r.gen_range(0..256) as u8;
                    doc[at].push(char::from(b));
                }
            }
        }
        let text = doc.join("\n");
        let name = if i % 5 == 0 { "c.json" } else { "c.yaml" };
        let file = TempConfig::new(name, &text);
        match kp_config::load([file.flag()]) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_one_line(&e, &text);
                err += 1;
            }
        }
    }
    assert!(ok > 20 && err > 100, "ok {ok}, err {err}");
}
