//! Building one `nft -f` transaction. Names reaching the text are checked with
//! [`crate::names::is_safe_name`]; everything else comes from parsed addresses and numbers.

use crate::render::{BaseChain, SetDecl, TABLE};

/// Elements per `add element` line (keeps lines, and the kernel's per-message lists, bounded).
const ELEMENTS_PER_LINE: usize = 500;

/// Separates the transactions of a split sync; each part is applied (and committed) alone.
pub const COMMIT_MARKER: &str = "# commit\n";

pub struct Tx {
    family: &'static str,
    pub text: String,
    pub ops: usize,
    /// Statements per transaction when splitting; `None`: one transaction.
    split_at: Option<usize>,
    since_commit: usize,
    /// Inside a group that must stay in one transaction.
    atomic: bool,
}

impl Tx {
    pub fn new(family: &'static str) -> Tx {
        Tx {
            family,
            text: String::new(),
            ops: 0,
            split_at: None,
            since_commit: 0,
            atomic: false,
        }
    }

    /// From now on, start a new transaction every `ops` statements, never inside an
    /// [`Tx::atomic`] group.
    pub fn split_every(&mut self, ops: usize) {
        self.split_at = Some(ops.max(1));
    }

    /// Runs `f` with no transaction boundary inside it.
    pub fn atomic(&mut self, f: impl FnOnce(&mut Tx)) {
        let outer = self.atomic;
        self.atomic = true;
        f(self);
        self.atomic = outer;
    }

    fn line(&mut self, l: std::fmt::Arguments<'_>) {
        use std::fmt::Write;
        if let Some(limit) = self.split_at
            && !self.atomic
            && self.since_commit >= limit
        {
            self.text.push_str(COMMIT_MARKER);
            self.since_commit = 0;
        }
        let _ = self.text.write_fmt(l);
        self.text.push('\n');
        self.ops += 1;
        self.since_commit += 1;
    }

    /// `add table; delete table; add table`: an atomic replace (nft 1.0.6 has no `destroy`).
    pub fn replace_table(&mut self) {
        let f = self.family;
        self.line(format_args!("add table {f} {TABLE}"));
        self.line(format_args!("delete table {f} {TABLE}"));
        self.line(format_args!(
            "add table {f} {TABLE} {{ comment \"rules for kube-proxy\" ; }}"
        ));
    }

    pub fn base_chain(&mut self, c: &BaseChain) {
        let f = self.family;
        self.line(format_args!(
            "add chain {f} {TABLE} {} {{ type {} hook {} priority {} ; }}",
            c.name, c.kind, c.hook, c.priority
        ));
    }

    pub fn add_set(&mut self, s: &SetDecl) {
        let f = self.family;
        let kind = if s.map { "map" } else { "set" };
        self.line(format_args!(
            "add {kind} {f} {TABLE} {} {{ {} }}",
            s.name, s.spec
        ));
    }

    pub fn add_affinity_set(&mut self, name: &str, timeout: u32, addr_type: &str) {
        let f = self.family;
        self.line(format_args!(
            "add set {f} {TABLE} {name} {{ type {addr_type} ; flags dynamic,timeout ; timeout {timeout}s ; }}"
        ));
    }

    pub fn delete_set(&mut self, name: &str) {
        let f = self.family;
        self.line(format_args!("delete set {f} {TABLE} {name}"));
    }

    pub fn add_chain(&mut self, name: &str) {
        let f = self.family;
        self.line(format_args!("add chain {f} {TABLE} {name}"));
    }

    pub fn flush_chain(&mut self, name: &str) {
        let f = self.family;
        self.line(format_args!("flush chain {f} {TABLE} {name}"));
    }

    pub fn delete_chain(&mut self, name: &str) {
        let f = self.family;
        self.line(format_args!("delete chain {f} {TABLE} {name}"));
    }

    pub fn add_rule(&mut self, chain: &str, rule: &str) {
        let f = self.family;
        self.line(format_args!("add rule {f} {TABLE} {chain} {rule}"));
    }

    /// Adds elements (`value` empty for plain sets), grouped per set, bounded per line.
    pub fn add_elements<'a>(
        &mut self,
        items: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) {
        let mut lines = ElementLines::new("add");
        for (set, key, value) in items {
            lines.add(set, key, value);
        }
        lines.write_to(self);
    }

    pub fn delete_elements<'a>(&mut self, items: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut lines = ElementLines::new("delete");
        for (set, key) in items {
            lines.add(set, key, "");
        }
        lines.write_to(self);
    }
}

/// `add element` (or `delete element`) lines, gathered (e.g. while services are rendered
/// one by one) and written to a [`Tx`] at the end (after the chains their verdicts jump
/// to): per set, up to [`ELEMENTS_PER_LINE`] items a line, kept as text, not as a string
/// per element.
pub struct ElementLines {
    verb: &'static str,
    /// Per set: the items of its unfinished line, and how many.
    open: std::collections::BTreeMap<String, (String, usize)>,
    /// Finished lines, `<set> <items>` each (one buffer: no allocation per line).
    lines: String,
}

impl Default for ElementLines {
    fn default() -> Self {
        ElementLines::new("add")
    }
}

impl ElementLines {
    pub fn new(verb: &'static str) -> Self {
        ElementLines {
            verb,
            open: Default::default(),
            lines: String::new(),
        }
    }

    /// Adds an element (`value` empty for plain sets).
    pub fn add(&mut self, set: &str, key: &str, value: &str) {
        if !self.open.contains_key(set) {
            self.open.insert(set.to_string(), Default::default());
        }
        let Some((items, n)) = self.open.get_mut(set) else {
            return;
        };
        if *n > 0 {
            items.push_str(", ");
        }
        items.push_str(key);
        if !value.is_empty() {
            items.push_str(" : ");
            items.push_str(value);
        }
        *n += 1;
        if *n == ELEMENTS_PER_LINE {
            for part in [set, " ", items.as_str(), "\n"] {
                self.lines.push_str(part);
            }
            items.clear();
            *n = 0;
        }
    }

    pub fn write_to(self, tx: &mut Tx) {
        let f = tx.family;
        let rest = self
            .open
            .iter()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(set, (items, _))| (set.as_str(), items.as_str()));
        let done = self.lines.lines().filter_map(|l| l.split_once(' '));
        for (set, items) in done.chain(rest) {
            tx.line(format_args!(
                "{} element {f} {TABLE} {set} {{ {items} }}",
                self.verb
            ));
        }
    }
}
