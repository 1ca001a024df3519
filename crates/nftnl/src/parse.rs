//! Parser for the subset of `nft -f` syntax kp-nftables writes (one statement per line).
//! Anything outside that subset is a [`ParseError`] naming the line, so the caller can fall
//! back to the `nft` binary instead of sending something we would encode wrongly.

use std::net::IpAddr;

use crate::syntax::*;

/// Parses a whole transaction; blank lines and `#` comments are skipped.
pub fn parse(transaction: &str) -> Result<Vec<Statement<'_>>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in transaction.lines().enumerate() {
        if let Some(s) = parse_line(i + 1, raw)? {
            out.push(s);
        }
    }
    Ok(out)
}

/// Parses line `line` (1-based) of a transaction; `None` for a blank line or comment.
pub fn parse_line(line: usize, raw: &str) -> Result<Option<Statement<'_>>, ParseError> {
    let text = raw.trim();
    if text.is_empty() || text.starts_with('#') {
        return Ok(None);
    }
    let err = |reason: String| ParseError {
        line,
        text: text.to_string(),
        reason,
    };
    let toks = tokenize(text).map_err(err)?;
    let mut p = P { t: &toks, i: 0 };
    let stmt = p.statement().map_err(err)?;
    if p.i != toks.len() {
        return Err(err(format!("unexpected `{}`", toks[p.i])));
    }
    Ok(Some(Statement { line, text, stmt }))
}

/// Splits on whitespace; `{ } , ;` are tokens of their own; `"…"` is one token (quotes kept).
fn tokenize(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                if !cur.is_empty() {
                    return Err("quote inside a word".into());
                }
                let mut q = String::from('"');
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => return Err("escapes in strings are not supported".into()),
                        Some(c) => q.push(c),
                        None => return Err("unterminated string".into()),
                    }
                }
                q.push('"');
                out.push(q);
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            '{' | '}' | ',' | ';' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

struct P<'a> {
    t: &'a [String],
    i: usize,
}

type R<T> = Result<T, String>;

impl P<'_> {
    fn peek(&self) -> Option<&str> {
        self.t.get(self.i).map(String::as_str)
    }
    fn peek_at(&self, n: usize) -> Option<&str> {
        self.t.get(self.i + n).map(String::as_str)
    }
    fn next(&mut self) -> R<&str> {
        let t = self.t.get(self.i).ok_or("unexpected end of statement")?;
        self.i += 1;
        Ok(t)
    }
    fn expect(&mut self, w: &str) -> R<()> {
        match self.next()? {
            t if t == w => Ok(()),
            t => Err(format!("expected `{w}`, found `{t}`")),
        }
    }
    fn eat(&mut self, w: &str) -> bool {
        if self.peek() == Some(w) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn name(&mut self) -> R<String> {
        let t = self.next()?;
        if t.is_empty()
            || t.len() > 255
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./%".contains(c))
        {
            return Err(format!("bad object name `{t}`"));
        }
        Ok(t.to_string())
    }
    fn string(&mut self) -> R<String> {
        let t = self.next()?;
        t.strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .map(str::to_string)
            .ok_or_else(|| format!("expected a quoted string, found `{t}`"))
    }
    fn family(&mut self) -> R<Family> {
        match self.next()? {
            "ip" => Ok(Family::Ip),
            "ip6" => Ok(Family::Ip6),
            f => Err(format!("unsupported family `{f}`")),
        }
    }
    fn obj(&mut self) -> R<Obj> {
        Ok(Obj {
            family: self.family()?,
            table: self.name()?,
            name: self.name()?,
        })
    }
    fn num<T: std::str::FromStr>(&mut self) -> R<T> {
        let t = self.next()?;
        t.parse().map_err(|_| format!("bad number `{t}`"))
    }
    /// Decimal or `0x` hexadecimal.
    fn u32_any(&mut self) -> R<u32> {
        let t = self.next()?;
        let r = match t.strip_prefix("0x") {
            Some(h) => u32::from_str_radix(h, 16),
            None => t.parse(),
        };
        r.map_err(|_| format!("bad number `{t}`"))
    }

    fn statement(&mut self) -> R<Stmt> {
        let verb = self.next()?.to_string();
        let what = self.next()?.to_string();
        match (verb.as_str(), what.as_str()) {
            ("add", "table") => {
                let family = self.family()?;
                let name = self.name()?;
                let mut comment = None;
                if self.eat("{") {
                    while !self.eat("}") {
                        self.expect("comment")?;
                        comment = Some(self.string()?);
                        self.expect(";")?;
                    }
                }
                Ok(Stmt::AddTable {
                    family,
                    name,
                    comment,
                })
            }
            ("delete", "table") => Ok(Stmt::DeleteTable {
                family: self.family()?,
                name: self.name()?,
            }),
            ("add", "chain") => {
                let obj = self.obj()?;
                let mut hook = None;
                if self.eat("{") {
                    self.expect("type")?;
                    let kind = self.next()?.to_string();
                    if kind != "nat" && kind != "filter" {
                        return Err(format!("unsupported chain type `{kind}`"));
                    }
                    self.expect("hook")?;
                    let hooknum = match self.next()? {
                        "prerouting" => 0,
                        "input" => 1,
                        "forward" => 2,
                        "output" => 3,
                        "postrouting" => 4,
                        h => return Err(format!("unsupported hook `{h}`")),
                    };
                    self.expect("priority")?;
                    let priority = self.num()?;
                    self.expect(";")?;
                    self.expect("}")?;
                    hook = Some(Hook {
                        kind,
                        hooknum,
                        priority,
                    });
                }
                Ok(Stmt::AddChain { obj, hook })
            }
            ("flush", "chain") => Ok(Stmt::FlushChain(self.obj()?)),
            ("delete", "chain") => Ok(Stmt::DeleteChain(self.obj()?)),
            ("add", "set") | ("add", "map") => {
                let obj = self.obj()?;
                let spec = self.set_spec(what == "map")?;
                Ok(Stmt::AddSet { obj, spec })
            }
            ("delete", "set") | ("delete", "map") => Ok(Stmt::DeleteSet(self.obj()?)),
            ("add", "element") => {
                let obj = self.obj()?;
                let mut elements = Vec::new();
                self.list(|p| {
                    let key = p.key()?;
                    let (mut value, mut data) = (None, None);
                    if p.eat(":") {
                        match p.peek() {
                            Some("accept" | "drop" | "return" | "jump" | "goto") => {
                                value = Some(p.verdict()?)
                            }
                            _ => data = Some(p.data_value()?),
                        }
                    }
                    elements.push(Element { key, value, data });
                    Ok(())
                })?;
                Ok(Stmt::AddElements { obj, elements })
            }
            ("delete", "element") => {
                let obj = self.obj()?;
                let mut keys = Vec::new();
                self.list(|p| {
                    keys.push(p.key()?);
                    Ok(())
                })?;
                Ok(Stmt::DeleteElements { obj, keys })
            }
            ("add", "rule") => {
                let obj = self.obj()?;
                let rule = self.rule(obj.family)?;
                Ok(Stmt::AddRule { obj, rule })
            }
            _ => Err(format!("unsupported statement `{verb} {what}`")),
        }
    }

    /// `{ x, y, z }` (at least one item).
    fn list(&mut self, mut item: impl FnMut(&mut Self) -> R<()>) -> R<()> {
        self.expect("{")?;
        loop {
            item(self)?;
            if self.eat("}") {
                return Ok(());
            }
            self.expect(",")?;
        }
    }

    fn set_spec(&mut self, map: bool) -> R<SetSpec> {
        self.expect("{")?;
        let mut key = None;
        let mut verdict_map = false;
        let mut spec = SetSpec {
            key: SetKey::Type(vec![]),
            verdict_map: false,
            data: None,
            dynamic: false,
            timeout_flag: false,
            timeout: None,
            comment: None,
        };
        while !self.eat("}") {
            match self.next()? {
                "type" => {
                    let mut fields = vec![];
                    loop {
                        fields.push(match self.next()? {
                            "ipv4_addr" => KeyField::Ipv4Addr,
                            "ipv6_addr" => KeyField::Ipv6Addr,
                            "inet_proto" => KeyField::InetProto,
                            "inet_service" => KeyField::InetService,
                            t => return Err(format!("unsupported key type `{t}`")),
                        });
                        if !self.eat(".") {
                            break;
                        }
                    }
                    key = Some(SetKey::Type(fields));
                    verdict_map = self.map_value(map)?;
                }
                "typeof" => {
                    let exprs = self.typeof_concat()?;
                    key = Some(match exprs.as_slice() {
                        [TypeofExpr::Numgen { modulus }] => {
                            SetKey::NumgenRandom { modulus: *modulus }
                        }
                        _ => SetKey::Typeof(exprs),
                    });
                    if map && self.peek() == Some(":") && self.peek_at(1) != Some("verdict") {
                        self.i += 1;
                        spec.data = Some(self.typeof_concat()?);
                    } else {
                        verdict_map = self.map_value(map)?;
                    }
                }
                "flags" => loop {
                    match self.next()? {
                        "dynamic" => spec.dynamic = true,
                        "timeout" => spec.timeout_flag = true,
                        f => return Err(format!("unsupported set flag `{f}`")),
                    }
                    if !self.eat(",") {
                        break;
                    }
                },
                "timeout" => {
                    let t = self.next()?;
                    spec.timeout = Some(
                        t.strip_suffix('s')
                            .and_then(|n| n.parse().ok())
                            .ok_or_else(|| format!("unsupported timeout `{t}`"))?,
                    );
                }
                "comment" => spec.comment = Some(self.string()?),
                t => return Err(format!("unsupported set property `{t}`")),
            }
            self.expect(";")?;
        }
        spec.key = key.ok_or("set without a type")?;
        spec.verdict_map = verdict_map;
        if map != (verdict_map || spec.data.is_some()) {
            return Err("only `set` without value or `map … : verdict` are supported".into());
        }
        Ok(spec)
    }

    /// `ip daddr . meta l4proto . th dport . numgen random mod N` (any of those, in order).
    fn typeof_concat(&mut self) -> R<Vec<TypeofExpr>> {
        let mut out = vec![];
        loop {
            let e = match self.next()? {
                fam @ ("ip" | "ip6") => {
                    let v6 = fam == "ip6";
                    let dir = match self.next()? {
                        "saddr" => Dir::Saddr,
                        "daddr" => Dir::Daddr,
                        t => return Err(format!("unsupported address field `{t}`")),
                    };
                    TypeofExpr::Addr { v6, dir }
                }
                "meta" => {
                    self.expect("l4proto")?;
                    TypeofExpr::L4Proto
                }
                t @ ("th" | "tcp" | "udp" | "sctp") => {
                    let proto = proto_num(t).unwrap_or(0);
                    self.expect("dport")?;
                    TypeofExpr::Dport(proto)
                }
                "numgen" => {
                    self.expect("random")?;
                    self.expect("mod")?;
                    let modulus: u32 = self.num()?;
                    if modulus == 0 {
                        return Err("numgen mod 0".into());
                    }
                    TypeofExpr::Numgen { modulus }
                }
                t => return Err(format!("unsupported expression `{t}`")),
            };
            out.push(e);
            if !self.eat(".") {
                return Ok(out);
            }
        }
    }

    /// A data map value: `address . port`.
    fn data_value(&mut self) -> R<Vec<KeyPart>> {
        let t = self.next()?;
        let addr: IpAddr = t
            .parse()
            .map_err(|_| format!("unsupported map value `{t}`"))?;
        self.expect(".")?;
        let p = self.next()?;
        let port: u16 = p.parse().map_err(|_| format!("bad port `{p}`"))?;
        Ok(vec![KeyPart::Addr(addr), KeyPart::Port(port)])
    }

    fn map_value(&mut self, map: bool) -> R<bool> {
        if map && self.eat(":") {
            self.expect("verdict")?;
            return Ok(true);
        }
        Ok(false)
    }

    fn key(&mut self) -> R<Vec<KeyPart>> {
        let mut parts = vec![];
        loop {
            let t = self.next()?;
            let part = if let Some(p) = proto_num(t) {
                KeyPart::Proto(p)
            } else if let Ok(a) = t.parse::<IpAddr>() {
                KeyPart::Addr(a)
            } else if let Ok(n) = t.parse::<u32>() {
                // After a protocol a number is a port; alone it is a slot number.
                if matches!(parts.last(), Some(KeyPart::Proto(_))) {
                    KeyPart::Port(u16::try_from(n).map_err(|_| format!("bad port `{t}`"))?)
                } else {
                    KeyPart::Int(n)
                }
            } else {
                return Err(format!("unsupported element key `{t}`"));
            };
            parts.push(part);
            if !self.eat(".") {
                return Ok(parts);
            }
        }
    }

    fn verdict(&mut self) -> R<Verdict> {
        Ok(match self.next()? {
            "accept" => Verdict::Accept,
            "drop" => Verdict::Drop,
            "return" => Verdict::Return,
            "jump" => Verdict::Jump(self.name()?),
            "goto" => Verdict::Goto(self.name()?),
            t => return Err(format!("unsupported verdict `{t}`")),
        })
    }

    fn neg(&mut self) -> bool {
        self.eat("!=")
    }

    fn rule(&mut self, fam: Family) -> R<Rule> {
        let mut items = vec![];
        let mut comment = None;
        while let Some(t) = self.peek() {
            let fam_kw = match fam {
                Family::Ip => "ip",
                Family::Ip6 => "ip6",
            };
            let item = match t {
                "comment" => {
                    self.i += 1;
                    comment = Some(self.string()?);
                    continue;
                }
                "ct" => {
                    self.i += 1;
                    self.expect("state")?;
                    self.expect("new")?;
                    RuleItem::CtStateNew
                }
                "meta" if self.peek_at(1) == Some("l4proto") && self.peek_at(2) == Some(".") => {
                    self.i += 3;
                    self.th_dport_vmap(None)?
                }
                "meta" if self.peek_at(1) == Some("l4proto") => {
                    self.i += 2;
                    let p = self.next()?;
                    RuleItem::L4Proto(
                        proto_num(p).ok_or_else(|| format!("unknown protocol `{p}`"))?,
                    )
                }
                "meta" if self.peek_at(1) == Some("mark") => {
                    self.i += 2;
                    self.mark()?
                }
                t if t == fam_kw => {
                    self.i += 1;
                    let dir = match self.next()? {
                        "saddr" => Dir::Saddr,
                        "daddr" => Dir::Daddr,
                        t => return Err(format!("unsupported {fam_kw} field `{t}`")),
                    };
                    if self.peek() == Some(".") && self.peek_at(1) == Some(fam_kw) {
                        self.i += 2;
                        let second = match self.next()? {
                            "saddr" => Dir::Saddr,
                            "daddr" => Dir::Daddr,
                            t => return Err(format!("unsupported {fam_kw} field `{t}`")),
                        };
                        RuleItem::AddrPairSet {
                            first: dir,
                            second,
                            set: self.set_ref()?,
                        }
                    } else if self.eat(".") {
                        self.expect("meta")?;
                        self.expect("l4proto")?;
                        self.expect(".")?;
                        self.th_dport_vmap(Some(dir))?
                    } else {
                        let neg = self.neg();
                        let rhs = self.addr_rhs(fam)?;
                        RuleItem::Addr { dir, neg, rhs }
                    }
                }
                "tcp" | "udp" | "sctp" => {
                    let proto = proto_num(t).unwrap_or(0);
                    self.i += 1;
                    self.expect("dport")?;
                    RuleItem::Dport {
                        proto,
                        port: self.num()?,
                    }
                }
                "iifname" => {
                    self.i += 1;
                    let neg = self.neg();
                    let s = self.string()?;
                    let (name, wildcard) = match s.strip_suffix('*') {
                        Some(n) => (n.to_string(), true),
                        None => (s, false),
                    };
                    if name.len() > 15 || name.contains('*') || (!wildcard && name.is_empty()) {
                        return Err(format!("bad interface name `{name}`"));
                    }
                    RuleItem::Iifname {
                        neg,
                        name,
                        wildcard,
                    }
                }
                "fib" => {
                    self.i += 1;
                    let dir = match self.next()? {
                        "saddr" => Dir::Saddr,
                        "daddr" => Dir::Daddr,
                        t => return Err(format!("unsupported fib input `{t}`")),
                    };
                    self.expect("type")?;
                    self.expect("local")?;
                    RuleItem::FibLocal(dir)
                }
                "numgen" => {
                    self.i += 1;
                    self.expect("random")?;
                    self.expect("mod")?;
                    let modulus = self.num()?;
                    let offset = if self.eat("offset") { self.num()? } else { 0 };
                    if self.eat("vmap") {
                        RuleItem::NumgenVmap {
                            modulus,
                            offset,
                            map: self.set_ref()?,
                        }
                    } else if offset == 0 {
                        self.eat("==");
                        let value = self.num()?;
                        if value >= modulus {
                            return Err(format!("numgen value {value} out of range"));
                        }
                        RuleItem::NumgenEq { modulus, value }
                    } else {
                        return Err("numgen offset outside a vmap".into());
                    }
                }
                "update" => {
                    self.i += 1;
                    let set = self.set_ref()?;
                    self.expect("{")?;
                    let f = self.next()?;
                    if f != fam_kw {
                        return Err(format!("expected `{fam_kw}`, found `{f}`"));
                    }
                    let dir = match self.next()? {
                        "saddr" => Dir::Saddr,
                        "daddr" => Dir::Daddr,
                        t => return Err(format!("unsupported update key `{t}`")),
                    };
                    self.expect("}")?;
                    RuleItem::Update { set, dir }
                }
                "masquerade" => {
                    self.i += 1;
                    RuleItem::Masquerade {
                        fully_random: self.eat("fully-random"),
                    }
                }
                "dnat" if self.peek_at(1) == Some(fam_kw) => {
                    self.i += 2;
                    self.expect("addr")?;
                    self.expect(".")?;
                    self.expect("port")?;
                    self.expect("to")?;
                    let key = self.typeof_concat()?;
                    if key.iter().any(
                        |e| matches!(e, TypeofExpr::Addr { v6, .. } if *v6 != (fam == Family::Ip6)),
                    ) {
                        return Err("address of the wrong family in the map key".into());
                    }
                    self.expect("map")?;
                    RuleItem::DnatMap {
                        key,
                        map: self.set_ref()?,
                    }
                }
                "dnat" => {
                    self.i += 1;
                    self.expect("to")?;
                    let t = self.next()?;
                    let sa: std::net::SocketAddr = t
                        .parse()
                        .map_err(|_| format!("unsupported dnat target `{t}`"))?;
                    if sa.is_ipv4() != (fam == Family::Ip) {
                        return Err(format!("dnat target `{t}` of the wrong family"));
                    }
                    RuleItem::Dnat {
                        addr: sa.ip(),
                        port: sa.port(),
                    }
                }
                "reject" => {
                    self.i += 1;
                    RuleItem::Reject
                }
                "accept" | "drop" | "return" | "jump" | "goto" => {
                    RuleItem::Verdict(self.verdict()?)
                }
                t => return Err(format!("unsupported rule item `{t}`")),
            };
            items.push(item);
        }
        if items.is_empty() {
            return Err("empty rule".into());
        }
        Ok(Rule { items, comment })
    }

    /// After `meta l4proto .`: `th dport vmap @map`.
    fn th_dport_vmap(&mut self, addr: Option<Dir>) -> R<RuleItem> {
        self.expect("th")?;
        self.expect("dport")?;
        self.expect("vmap")?;
        Ok(RuleItem::TupleVmap {
            addr,
            map: self.set_ref()?,
        })
    }

    fn set_ref(&mut self) -> R<String> {
        let t = self.next()?;
        let n = t
            .strip_prefix('@')
            .ok_or_else(|| format!("expected @set, found `{t}`"))?;
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            return Err(format!("bad set name `{n}`"));
        }
        Ok(n.to_string())
    }

    fn mark(&mut self) -> R<RuleItem> {
        if self.eat("set") {
            self.expect("meta")?;
            self.expect("mark")?;
            let xor = match self.next()? {
                "or" => false,
                "xor" => true,
                t => return Err(format!("unsupported mark operation `{t}`")),
            };
            return Ok(RuleItem::MarkSet {
                xor,
                value: self.u32_any()?,
            });
        }
        self.expect("and")?;
        let mask = self.u32_any()?;
        let neg = match self.next()? {
            "==" => false,
            "!=" => true,
            t => return Err(format!("unsupported comparison `{t}`")),
        };
        Ok(RuleItem::MarkAndCmp {
            mask,
            neg,
            value: self.u32_any()?,
        })
    }

    fn addr_rhs(&mut self, fam: Family) -> R<AddrRhs> {
        if self.peek().is_some_and(|t| t.starts_with('@')) {
            return Ok(AddrRhs::Set(self.set_ref()?));
        }
        if self.peek() == Some("{") {
            let mut v = vec![];
            self.list(|p| {
                let t = p.next()?.to_string();
                v.push(prefix(&t, fam)?);
                Ok(())
            })?;
            return Ok(AddrRhs::List(v));
        }
        let t = self.next()?.to_string();
        let (a, l) = prefix(&t, fam)?;
        Ok(AddrRhs::Prefix(a, l))
    }
}

/// `addr` or `addr/len` of the given family; host bits must be zero (as nft requires).
fn prefix(t: &str, fam: Family) -> R<(IpAddr, u8)> {
    let (a, l) = match t.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (t, None),
    };
    let addr: IpAddr = a.parse().map_err(|_| format!("bad address `{t}`"))?;
    if addr.is_ipv4() != (fam == Family::Ip) {
        return Err(format!("address `{t}` of the wrong family"));
    }
    let max = (fam.addr_len() * 8) as u8;
    let len = match l {
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("bad prefix length in `{t}`"))?,
        None => max,
    };
    let bits = addr_bits(addr);
    let host_bits = u32::from(max - len);
    let host = match host_bits {
        0 => 0,
        128 => u128::MAX,
        n => (1u128 << n) - 1,
    };
    if bits & host != 0 {
        return Err(format!("`{t}` has host bits set"));
    }
    Ok((addr, len))
}

fn proto_num(t: &str) -> Option<u8> {
    match t {
        "tcp" => Some(6),
        "udp" => Some(17),
        "sctp" => Some(132),
        _ => None,
    }
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
