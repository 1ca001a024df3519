//! Building iptables-restore lines. Every user-derived string goes through
//! [`sanitize_comment`], so no object can inject tokens or lines into the ruleset.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// Keeps only characters that are safe inside a double-quoted iptables-restore token, and
/// at most 255 bytes (the kernel's comment buffer is 256 with the NUL).
pub fn sanitize_comment(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " ./:_-,>[]=+()@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    // xt_comment holds 256 bytes with the terminating NUL: iptables refuses a longer one.
    out.truncate(255);
    out
}

/// A restore buffer: chain declarations, then each chain's rules together, chains in the
/// order of a fixed hash of their names. Not name order: the kernel keeps chains in
/// creation order, and iptables-nft 1.8's save and list commands sort that list with a
/// first-element-pivot quicksort, which is quadratic on an already sorted list
/// (`iptables-save -t nat` at 10k services: 236 s after a name-ordered load, 3.3 s after
/// this order). Loading costs about the same either way once the restore fetches the
/// whole table (see `render`'s `nft_restore`).
#[derive(Default)]
pub(crate) struct Lines {
    decls: BTreeSet<String>,
    chains: BTreeMap<String, String>,
    other: String,
    pub rules: usize,
}

impl Lines {
    /// Appends a rule line from tokens; tokens with spaces are quoted.
    pub fn rule(&mut self, tokens: &[&str]) {
        let chain = match tokens {
            ["-A", chain, ..] => *chain,
            _ => "",
        };
        let buf = match self.chains.get_mut(chain) {
            Some(b) => b,
            None => self.chains.entry(chain.to_string()).or_default(),
        };
        for (i, t) in tokens.iter().enumerate() {
            if i > 0 {
                buf.push(' ');
            }
            if t.contains(' ') || t.is_empty() {
                let _ = write!(buf, "\"{t}\"");
            } else {
                buf.push_str(t);
            }
        }
        buf.push('\n');
        self.rules += 1;
    }

    /// Declares a chain (`:NAME - [0:0]`), which also flushes it.
    pub fn declare(&mut self, chain: &str) {
        self.decls.insert(format!(":{chain} - [0:0]"));
    }

    /// Chains declared so far.
    pub fn declared(&self) -> usize {
        self.decls.len()
    }

    /// A line written after all rules (e.g. `-X CHAIN`).
    pub fn trailer(&mut self, line: &str) {
        self.other.push_str(line);
        self.other.push('\n');
    }

    pub fn append(&mut self, other: Lines) {
        self.decls.extend(other.decls);
        for (chain, text) in other.chains {
            self.chains.entry(chain).or_default().push_str(&text);
        }
        self.other.push_str(&other.other);
        self.rules += other.rules;
    }

    /// Bytes [`Lines::write_to`] will add.
    pub fn len(&self) -> usize {
        self.decls.iter().map(|d| d.len() + 1).sum::<usize>()
            + self.chains.values().map(String::len).sum::<usize>()
            + self.other.len()
    }

    /// Declarations, then rules grouped by chain (both in [`chain_order`]), then trailers.
    pub fn write_to(&self, out: &mut String) {
        let mut decls: Vec<&String> = self.decls.iter().collect();
        decls.sort_by_cached_key(|d| chain_order(d[1..].split(' ').next().unwrap_or_default()));
        for d in decls {
            out.push_str(d);
            out.push('\n');
        }
        let mut chains: Vec<(&String, &String)> = self.chains.iter().collect();
        chains.sort_by_cached_key(|(name, _)| chain_order(name));
        for (_, text) in chains {
            out.push_str(text);
        }
        out.push_str(&self.other);
    }
}

/// Where a chain goes in restore input: by FNV-1a of its name (fixed, so the same state
/// always renders the same text), then by name.
fn chain_order(name: &str) -> (u64, &str) {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_keep_their_rules_together_and_in_order_in_a_fixed_non_name_order() {
        let names: Vec<String> = (0..50).map(|i| format!("KUBE-SEP-{i:04}")).collect();
        let mut l = Lines::default();
        for round in 0..3 {
            for n in &names {
                l.declare(n);
                l.rule(&["-A", n, "-j", &format!("R{round}")]);
            }
        }
        let mut text = String::new();
        l.write_to(&mut text);
        let decls: Vec<&str> = text.lines().filter(|x| x.starts_with(':')).collect();
        let rule_chains: Vec<&str> = text
            .lines()
            .filter_map(|x| x.strip_prefix("-A "))
            .map(|x| x.split(' ').next().unwrap())
            .collect();
        assert_eq!(decls.len(), 50);
        let mut sorted = decls.clone();
        sorted.sort();
        assert_ne!(decls, sorted, "not name order");
        // Each chain's three rules are adjacent and in the order they were added.
        for (i, chunk) in text
            .lines()
            .skip(50)
            .collect::<Vec<_>>()
            .chunks(3)
            .enumerate()
        {
            let chain = rule_chains[i * 3];
            assert_eq!(
                chunk,
                [0, 1, 2].map(|r| format!("-A {chain} -j R{r}")).as_slice()
            );
            assert_eq!(
                format!(":{chain} - [0:0]"),
                decls[i],
                "rules follow the declarations' order"
            );
        }
        let mut again = String::new();
        l.write_to(&mut again);
        assert_eq!(text, again);
    }

    #[test]
    fn hostile_text_is_neutralised() {
        let s = sanitize_comment("a\"b\nc -j ACCEPT\\ ü;$(x)`");
        assert!(!s.contains('"') && !s.contains('\n') && !s.contains('\\') && !s.contains('`'));
        assert!(!s.contains(';') && !s.contains('$'));
        // 255: iptables-nft keeps 255 of a 256-byte comment, so 256 would read back changed.
        assert_eq!(sanitize_comment(&"x".repeat(1000)).len(), 255);
        let mut l = Lines::default();
        l.rule(&[
            "-A",
            "C",
            "-m",
            "comment",
            "--comment",
            &sanitize_comment("a b"),
            "-j",
            "X",
        ]);
        let mut text = String::new();
        l.write_to(&mut text);
        assert_eq!(text, "-A C -m comment --comment \"a b\" -j X\n");
    }
}
