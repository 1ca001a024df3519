//! Prints the batch for a transaction file as hex (debugging aid: compare with nft's).
fn main() {
    let path = std::env::args().nth(1).expect("usage: encode FILE");
    let text = std::fs::read_to_string(path).expect("read");
    match kp_nftnl::encode_batch(&text) {
        Ok(b) => {
            for chunk in b.chunks(16) {
                let hex: Vec<String> = chunk.iter().map(|x| format!("{x:02x}")).collect();
                println!("{}", hex.join(" "));
            }
        }
        Err(e) => eprintln!("{e}"),
    }
}
