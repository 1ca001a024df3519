//! The syntax tree of the `nft -f` subset kp-nftables writes: what [`crate::parse`]
//! produces and the encoder turns into netlink messages.

use std::net::IpAddr;

/// Why a line of the transaction could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}: {text}")]
pub struct ParseError {
    /// 1-based line number in the transaction text.
    pub line: usize,
    pub text: String,
    pub reason: String,
}

/// Address family of the table (`ip` or `ip6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ip,
    Ip6,
}

impl Family {
    /// NFPROTO_* value.
    pub fn nfproto(self) -> u8 {
        match self {
            Family::Ip => 2,
            Family::Ip6 => 10,
        }
    }
    pub(crate) fn addr_len(self) -> usize {
        match self {
            Family::Ip => 4,
            Family::Ip6 => 16,
        }
    }
}

/// `<family> <table> <name>` of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Obj {
    pub family: Family,
    pub table: String,
    pub name: String,
}

/// Hook of a base chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `nat` or `filter`.
    pub kind: String,
    /// NF_INET_* hook number.
    pub hooknum: u32,
    pub priority: i32,
}

/// One field of a set key declared with `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyField {
    Ipv4Addr,
    Ipv6Addr,
    InetProto,
    InetService,
}

/// Key of a named set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetKey {
    /// `type a . b . c`
    Type(Vec<KeyField>),
    /// `typeof numgen random mod N`
    NumgenRandom { modulus: u32 },
    /// `typeof ip daddr . meta l4proto . th dport . numgen random mod N`
    Typeof(Vec<TypeofExpr>),
}

/// One expression of a `typeof` concatenation, of a map lookup key or of a map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeofExpr {
    /// `ip daddr` (`v6`: `ip6 daddr`)
    Addr { v6: bool, dir: Dir },
    /// `meta l4proto`
    L4Proto,
    /// `th dport`, or `tcp dport` etc. (the protocol number; 0 for `th`)
    Dport(u8),
    /// `numgen random mod N`
    Numgen { modulus: u32 },
}

impl TypeofExpr {
    /// Bytes of the value (before padding a concatenation field to 4).
    pub fn byte_len(&self) -> u32 {
        match self {
            TypeofExpr::Addr { v6: false, .. } => 4,
            TypeofExpr::Addr { v6: true, .. } => 16,
            TypeofExpr::L4Proto => 1,
            TypeofExpr::Dport(_) => 2,
            TypeofExpr::Numgen { .. } => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub key: SetKey,
    /// `: verdict` (maps only).
    pub verdict_map: bool,
    /// `: typeof-expression . …` (data maps).
    pub data: Option<Vec<TypeofExpr>>,
    /// `flags dynamic,timeout`
    pub dynamic: bool,
    pub timeout_flag: bool,
    /// Default element timeout in seconds.
    pub timeout: Option<u64>,
    pub comment: Option<String>,
}

/// One part of an element key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPart {
    Addr(IpAddr),
    Proto(u8),
    Port(u16),
    /// A plain number (the `numgen` slot maps, host byte order).
    Int(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: Vec<KeyPart>,
    pub value: Option<Verdict>,
    /// Value of a data map element (`10.0.0.1 . 8080`).
    pub data: Option<Vec<KeyPart>>,
}

/// Source or destination address of the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Saddr,
    Daddr,
}

/// Right-hand side of an address match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrRhs {
    Prefix(IpAddr, u8),
    Set(String),
    /// Anonymous set `{ a, b/len }`.
    List(Vec<(IpAddr, u8)>),
}

/// One item of a rule, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleItem {
    CtStateNew,
    L4Proto(u8),
    Addr {
        dir: Dir,
        neg: bool,
        rhs: AddrRhs,
    },
    /// `tcp dport 80`
    Dport {
        proto: u8,
        port: u16,
    },
    /// `iifname [!=] "name"`, `wildcard` for a trailing `*`.
    Iifname {
        neg: bool,
        name: String,
        wildcard: bool,
    },
    FibLocal(Dir),
    /// `[ip daddr .] meta l4proto . th dport vmap @map`
    TupleVmap {
        addr: Option<Dir>,
        map: String,
    },
    NumgenVmap {
        modulus: u32,
        offset: u32,
        map: String,
    },
    /// `dnat ip addr . port to <concatenation> map @m`
    DnatMap {
        key: Vec<TypeofExpr>,
        map: String,
    },
    /// `numgen random mod N V` (equality; the endpoint cascade).
    NumgenEq {
        modulus: u32,
        value: u32,
    },
    /// `ip saddr . ip daddr @set`
    AddrPairSet {
        first: Dir,
        second: Dir,
        set: String,
    },
    /// `meta mark set meta mark or|xor V` (`xor` = true for xor).
    MarkSet {
        xor: bool,
        value: u32,
    },
    /// `meta mark and M ==|!= V`
    MarkAndCmp {
        mask: u32,
        neg: bool,
        value: u32,
    },
    /// `update @set { ip saddr }`
    Update {
        set: String,
        dir: Dir,
    },
    Masquerade {
        fully_random: bool,
    },
    Dnat {
        addr: IpAddr,
        port: u16,
    },
    Reject,
    Verdict(Verdict),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub items: Vec<RuleItem>,
    pub comment: Option<String>,
}

/// One statement (one input line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    AddTable {
        family: Family,
        name: String,
        comment: Option<String>,
    },
    DeleteTable {
        family: Family,
        name: String,
    },
    AddChain {
        obj: Obj,
        hook: Option<Hook>,
    },
    FlushChain(Obj),
    DeleteChain(Obj),
    AddSet {
        obj: Obj,
        spec: SetSpec,
    },
    DeleteSet(Obj),
    AddElements {
        obj: Obj,
        elements: Vec<Element>,
    },
    DeleteElements {
        obj: Obj,
        keys: Vec<Vec<KeyPart>>,
    },
    AddRule {
        obj: Obj,
        rule: Rule,
    },
}

/// A statement with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement<'a> {
    pub line: usize,
    /// The line, trimmed (borrowed from the transaction: a full sync is 100k+ lines).
    pub text: &'a str,
    pub stmt: Stmt,
}

/// The address as an integer (IPv4 in the low 32 bits).
pub(crate) fn addr_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}
