//! `apply FILE...`: applies each file as one netlink batch and prints the time the
//! kernel took (for layout experiments: `ip netns exec X target/release/examples/apply`).

fn main() {
    let mut applier = kp_nftnl::NetlinkApplier::open().expect("netlink socket");
    for path in std::env::args().skip(1) {
        let text = std::fs::read_to_string(&path).expect("read");
        match applier.apply(&text) {
            Ok(r) => println!(
                "{path}: {} messages, {} bytes, kernel {:.3} ms, total {:.3} ms",
                r.messages,
                r.bytes,
                r.kernel.as_secs_f64() * 1e3,
                r.duration.as_secs_f64() * 1e3
            ),
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(1);
            }
        }
    }
}
