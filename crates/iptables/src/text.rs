//! Building iptables-restore lines. Every user-derived string goes through
//! [`sanitize_comment`], so no object can inject tokens or lines into the ruleset.

use std::fmt::Write;

/// Keeps only characters that are safe inside a double-quoted iptables-restore token, and
/// at most 256 bytes (the kernel's comment limit).
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
    out.truncate(256);
    out
}

/// A growing restore buffer, counting rules.
#[derive(Default)]
pub(crate) struct Lines {
    pub text: String,
    pub rules: usize,
}

impl Lines {
    /// Appends a rule line from tokens; tokens with spaces are quoted.
    pub fn rule(&mut self, tokens: &[&str]) {
        for (i, t) in tokens.iter().enumerate() {
            if i > 0 {
                self.text.push(' ');
            }
            if t.contains(' ') || t.is_empty() {
                let _ = write!(self.text, "\"{t}\"");
            } else {
                self.text.push_str(t);
            }
        }
        self.text.push('\n');
        self.rules += 1;
    }

    pub fn raw(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
    }

    pub fn append(&mut self, other: Lines) {
        self.text.push_str(&other.text);
        self.rules += other.rules;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_neutralised() {
        let s = sanitize_comment("a\"b\nc -j ACCEPT\\ ü;$(x)`");
        assert!(!s.contains('"') && !s.contains('\n') && !s.contains('\\') && !s.contains('`'));
        assert!(!s.contains(';') && !s.contains('$'));
        assert_eq!(sanitize_comment(&"x".repeat(1000)).len(), 256);
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
        assert_eq!(l.text, "-A C -m comment --comment \"a b\" -j X\n");
    }
}
