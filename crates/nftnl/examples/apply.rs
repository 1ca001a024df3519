//! Applies transaction files in order with one NetlinkApplier and prints each report
//! (run inside the target namespace: `ip netns exec NS apply a.nft b.nft`).
fn main() {
    let mut ap = match kp_nftnl::NetlinkApplier::open() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    for path in std::env::args().skip(1) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        match ap.apply(&text) {
            Ok(r) => println!("{path}: {r:?}"),
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(1);
            }
        }
    }
}
