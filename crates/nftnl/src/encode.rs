//! Statements -> one nfnetlink batch. Attribute layouts, flags and user data follow what
//! nft 1.0.6 sends for the same text (checked with `strace -e write=` on `nft -f`), so that
//! `nft list` prints the netlink-built table exactly like the nft-built one.

use std::net::IpAddr;

use crate::expr::encode_rule;
use crate::msg::{Msg, udata_str, udata_u32, value_attr, verdict_attr};
use crate::syntax::{
    Dir, Element, Family, KeyField, KeyPart, SetKey, SetSpec, Statement, Stmt, TypeofExpr,
};

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

/// Largest payload of one NFTA_SET_ELEM_LIST_ELEMENTS attribute (its length is 16 bits).
const MAX_ELEMENTS_ATTR: usize = 60_000;

/// An encoded batch: the bytes and, per message, the statement index it came from.
pub(crate) struct Batch {
    pub buf: Vec<u8>,
    /// Statement index per message, message i has sequence number `first_seq + 1 + i`.
    pub origin: Vec<usize>,
    pub first_seq: u32,
    next_set_id: u32,
    /// NLM_F_ACK on every message (small batches); otherwise only on the last one.
    ack_all: bool,
    last_hdr: Option<usize>,
}

impl Batch {
    pub fn new(first_seq: u32, ack_all: bool) -> Batch {
        let mut b = Batch {
            buf: Vec::with_capacity(4096),
            origin: vec![],
            first_seq,
            next_set_id: 1,
            ack_all,
            last_hdr: None,
        };
        b.header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq, 0, &[]);
        b
    }

    fn header(&mut self, ty: u16, flags: u16, seq: u32, family: u8, payload: &[u8]) {
        let len = (20 + payload.len()) as u32;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, res_id (big endian): the subsystem for batch markers.
        let res_id: u16 = if family == 0 { NFNL_SUBSYS_NFTABLES } else { 0 };
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.buf.extend_from_slice(payload);
    }

    fn push(&mut self, stmt: usize, family: Family, ty: u16, flags: u16, m: Msg) {
        let seq = self.first_seq + 1 + self.origin.len() as u32;
        self.origin.push(stmt);
        self.last_hdr = Some(self.buf.len());
        let ack = if self.ack_all { NLM_F_ACK } else { 0 };
        self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags | NLM_F_REQUEST | ack,
            seq,
            family.nfproto(),
            &m.buf,
        );
    }

    pub fn messages(&self) -> usize {
        self.origin.len()
    }

    /// Closes the batch (the last message always asks for an ACK: its reply, delivered
    /// last, tells the reader the kernel is done). Returns the sequence number of BATCH_END.
    pub fn finish(&mut self) -> u32 {
        if let Some(h) = self.last_hdr {
            let f = u16::from_ne_bytes([self.buf[h + 6], self.buf[h + 7]]) | NLM_F_ACK;
            self.buf[h + 6..h + 8].copy_from_slice(&f.to_ne_bytes());
        }
        let seq = self.first_seq + 1 + self.origin.len() as u32;
        self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, &[]);
        seq
    }

    pub fn anon_set_id(&mut self) -> u32 {
        let id = self.next_set_id;
        self.next_set_id += 1;
        id
    }

    /// Encodes one statement into one or more messages.
    pub fn statement(&mut self, idx: usize, s: &Statement) {
        match &s.stmt {
            Stmt::AddTable {
                family,
                name,
                comment,
            } => {
                let mut m = Msg::new();
                m.str(1, name);
                m.u32(2, 0);
                if let Some(c) = comment {
                    m.attr(6, &udata_str(0, c));
                }
                self.push(idx, *family, NFT_MSG_NEWTABLE, 0, m);
            }
            Stmt::DeleteTable { family, name } => {
                let mut m = Msg::new();
                m.str(1, name);
                self.push(idx, *family, NFT_MSG_DELTABLE, 0, m);
            }
            Stmt::AddChain { obj, hook } => {
                let mut m = Msg::new();
                m.str(1, &obj.table);
                m.str(3, &obj.name);
                if let Some(h) = hook {
                    m.str(7, &h.kind);
                    m.begin(4);
                    m.u32(1, h.hooknum);
                    m.u32(2, h.priority as u32);
                    m.end();
                }
                self.push(idx, obj.family, NFT_MSG_NEWCHAIN, NLM_F_CREATE, m);
            }
            Stmt::FlushChain(obj) => {
                let mut m = Msg::new();
                m.str(1, &obj.table);
                m.str(2, &obj.name);
                self.push(idx, obj.family, NFT_MSG_DELRULE, 0, m);
            }
            Stmt::DeleteChain(obj) => {
                let mut m = Msg::new();
                m.str(1, &obj.table);
                m.str(3, &obj.name);
                self.push(idx, obj.family, NFT_MSG_DELCHAIN, 0, m);
            }
            Stmt::DeleteSet(obj) => {
                let mut m = Msg::new();
                m.str(1, &obj.table);
                m.str(2, &obj.name);
                self.push(idx, obj.family, NFT_MSG_DELSET, 0, m);
            }
            Stmt::AddSet { obj, spec } => {
                let id = self.anon_set_id();
                let m = new_set(&obj.table, &obj.name, spec, id);
                self.push(idx, obj.family, NFT_MSG_NEWSET, NLM_F_CREATE, m);
            }
            Stmt::AddElements { obj, elements } => {
                let encoded: Vec<Msg> = elements.iter().map(element).collect();
                self.elements(idx, obj.family, &obj.table, &obj.name, None, encoded, true);
            }
            Stmt::DeleteElements { obj, keys } => {
                let encoded: Vec<Msg> = keys
                    .iter()
                    .map(|k| {
                        element(&Element {
                            key: k.clone(),
                            value: None,
                            data: None,
                        })
                    })
                    .collect();
                self.elements(idx, obj.family, &obj.table, &obj.name, None, encoded, false);
            }
            Stmt::AddRule { obj, rule } => {
                let mut m = Msg::new();
                m.str(1, &obj.table);
                m.str(2, &obj.name);
                let mut anon = vec![];
                encode_rule(
                    &mut m,
                    obj.family,
                    rule,
                    &mut || self.anon_set_id(),
                    &mut anon,
                );
                // Anonymous sets go first: the rule binds them.
                for a in anon {
                    let mut s = Msg::new();
                    s.str(1, &obj.table);
                    s.str(2, "__set%d");
                    s.u32(3, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_INTERVAL);
                    s.u32(4, a.key_type);
                    s.u32(5, a.key_len);
                    s.u32(10, a.id);
                    s.begin(9);
                    s.u32(1, a.desc_size);
                    s.end();
                    s.attr(13, &a.udata);
                    self.push(idx, obj.family, NFT_MSG_NEWSET, NLM_F_CREATE, s);
                    self.elements(
                        idx,
                        obj.family,
                        &obj.table,
                        "__set%d",
                        Some(a.id),
                        a.elements,
                        true,
                    );
                }
                if let Some(c) = &rule.comment {
                    m.attr(7, &udata_str(0, c));
                }
                self.push(
                    idx,
                    obj.family,
                    NFT_MSG_NEWRULE,
                    NLM_F_CREATE | NLM_F_APPEND,
                    m,
                );
            }
        }
    }

    /// NEWSETELEM/DELSETELEM, split so each element list stays under the 16-bit limit.
    #[allow(clippy::too_many_arguments)]
    fn elements(
        &mut self,
        idx: usize,
        family: Family,
        table: &str,
        set: &str,
        set_id: Option<u32>,
        elems: Vec<Msg>,
        add: bool,
    ) {
        let mut chunk: Vec<Msg> = vec![];
        let mut size = 0;
        let flush = |this: &mut Batch, chunk: &mut Vec<Msg>| {
            let mut m = Msg::new();
            m.str(1, table);
            m.str(2, set);
            if let Some(id) = set_id {
                m.u32(4, id);
            }
            m.begin(3);
            for e in chunk.drain(..) {
                m.begin(1);
                m.buf.extend_from_slice(&e.buf);
                m.end();
            }
            m.end();
            let (ty, flags) = if add {
                (NFT_MSG_NEWSETELEM, NLM_F_CREATE)
            } else {
                (NFT_MSG_DELSETELEM, 0)
            };
            this.push(idx, family, ty, flags, m);
        };
        for e in elems {
            let l = e.buf.len() + 4;
            if !chunk.is_empty() && size + l > MAX_ELEMENTS_ATTR {
                flush(self, &mut chunk);
                size = 0;
            }
            size += l;
            chunk.push(e);
        }
        if !chunk.is_empty() {
            flush(self, &mut chunk);
        }
    }
}

fn field_type(f: KeyField) -> (u32, u32) {
    match f {
        KeyField::Ipv4Addr => (7, 4),
        KeyField::Ipv6Addr => (8, 16),
        KeyField::InetProto => (12, 1),
        KeyField::InetService => (13, 2),
    }
}

fn new_set(table: &str, name: &str, spec: &SetSpec, id: u32) -> Msg {
    let mut m = Msg::new();
    m.str(1, table);
    m.str(2, name);
    let mut flags = 0;
    if spec.verdict_map || spec.data.is_some() {
        flags |= NFT_SET_MAP;
    }
    if spec.timeout_flag {
        flags |= NFT_SET_TIMEOUT;
    }
    if spec.dynamic {
        flags |= NFT_SET_EVAL;
    }
    m.u32(3, flags);
    let (key_type, key_len, byteorder) = match &spec.key {
        SetKey::Type(fields) if fields.len() == 1 => {
            let (t, l) = field_type(fields[0]);
            (t, l, 2)
        }
        SetKey::Type(fields) => {
            let mut t = 0;
            let mut l = 0;
            for f in fields {
                let (ft, fl) = field_type(*f);
                t = (t << 6) | ft;
                l += fl.div_ceil(4) * 4;
            }
            (t, l, 0)
        }
        SetKey::NumgenRandom { .. } => (4, 4, 1),
        SetKey::Typeof(exprs) => {
            let (t, l) = concat_type(exprs);
            (t, l, 0)
        }
    };
    m.u32(4, key_type);
    m.u32(5, key_len);
    if spec.verdict_map {
        m.u32(6, NFT_DATA_VERDICT);
        m.u32(7, 0);
    }
    if let Some(data) = &spec.data {
        let (t, l) = concat_type(data);
        m.u32(6, t);
        m.u32(7, l);
    }
    m.u32(10, id);
    if let Some(t) = spec.timeout {
        m.attr(11, &(t.saturating_mul(1000)).to_be_bytes());
    }
    let mut ud = udata_u32(0, byteorder);
    if spec.verdict_map || spec.data.is_some() {
        ud.extend(udata_u32(1, 0));
    }
    match &spec.key {
        SetKey::Typeof(exprs) => {
            udata_nest(&mut ud, 3, &typeof_udata(exprs));
            if let Some(data) = &spec.data {
                udata_nest(&mut ud, 4, &typeof_udata(data));
            }
        }
        SetKey::Type(f) if f.len() > 1 => ud.extend([3, 8, 0, 4, 13, 0, 0, 0, 1, 0]),
        SetKey::Type(_) => {}
        SetKey::NumgenRandom { modulus } => {
            let mut inner = udata_u32(0, 1);
            inner.extend(udata_u32(1, *modulus));
            inner.extend(udata_u32(2, 0));
            let mut t = udata_u32(0, 23);
            t.push(1);
            t.push(inner.len() as u8);
            t.extend(inner);
            ud.push(3);
            ud.push(t.len() as u8);
            ud.extend(t);
            if spec.verdict_map {
                ud.extend([4, 8, 0, 4, 1, 0, 0, 0, 1, 0]);
            }
        }
    }
    if spec.verdict_map || spec.data.is_some() {
        ud.extend(udata_u32(6, 0));
    }
    if let Some(c) = &spec.comment {
        ud.extend(udata_str(7, c));
    }
    m.attr(13, &ud);
    m
}

fn udata_nest(out: &mut Vec<u8>, ty: u8, inner: &[u8]) {
    out.push(ty);
    out.push(inner.len() as u8);
    out.extend_from_slice(inner);
}

/// nft's description of one expression: expression id, then its parameters.
fn typeof_expr_udata(e: &TypeofExpr) -> Vec<u8> {
    let (id, params) = match e {
        TypeofExpr::Addr { v6, dir } => {
            let (desc, field) = match (v6, dir) {
                (false, Dir::Saddr) => (12, 11),
                (false, Dir::Daddr) => (12, 12),
                (true, Dir::Saddr) => (13, 8),
                (true, Dir::Daddr) => (13, 9),
            };
            let mut p = udata_u32(0, desc);
            p.extend(udata_u32(1, field));
            (7, p)
        }
        TypeofExpr::Dport(proto) => {
            // nft's protocol descriptions: th 11, tcp 8, udp 6, sctp 10; field 2 = dport.
            let desc = match proto {
                6 => 8,
                17 => 6,
                132 => 10,
                _ => 11,
            };
            let mut p = udata_u32(0, desc);
            p.extend(udata_u32(1, 2));
            (7, p)
        }
        TypeofExpr::L4Proto => (9, udata_u32(0, 16)),
        TypeofExpr::Numgen { modulus } => {
            let mut p = udata_u32(0, 1);
            p.extend(udata_u32(1, *modulus));
            p.extend(udata_u32(2, 0));
            (23, p)
        }
    };
    let mut out = udata_u32(0, id);
    udata_nest(&mut out, 1, &params);
    out
}

/// A `typeof` key or value: one expression, or a concatenation (id 13) of them.
fn typeof_udata(exprs: &[TypeofExpr]) -> Vec<u8> {
    if let [one] = exprs {
        return typeof_expr_udata(one);
    }
    let mut list = vec![];
    for (i, e) in exprs.iter().enumerate() {
        udata_nest(&mut list, i as u8, &typeof_expr_udata(e));
    }
    let mut out = udata_u32(0, 13);
    udata_nest(&mut out, 1, &list);
    out
}

/// Concatenated type id (6 bits per field) and padded length.
fn concat_type(exprs: &[TypeofExpr]) -> (u32, u32) {
    let mut t = 0;
    let mut l = 0;
    for e in exprs {
        let ft = match e {
            TypeofExpr::Addr { v6: false, .. } => 7,
            TypeofExpr::Addr { v6: true, .. } => 8,
            TypeofExpr::L4Proto => 12,
            TypeofExpr::Dport(_) => 13,
            TypeofExpr::Numgen { .. } => 4,
        };
        t = (t << 6) | ft;
        l += e.byte_len().div_ceil(4) * 4;
    }
    if exprs.len() == 1 {
        l = exprs[0].byte_len();
    }
    (t, l)
}

/// Key bytes: concatenations pad every field to 4 bytes.
pub(crate) fn key_bytes(key: &[KeyPart]) -> Vec<u8> {
    let concat = key.len() > 1;
    let mut out = vec![];
    for p in key {
        let start = out.len();
        match p {
            KeyPart::Addr(IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
            KeyPart::Addr(IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
            KeyPart::Proto(p) => out.push(*p),
            KeyPart::Port(p) => out.extend_from_slice(&p.to_be_bytes()),
            KeyPart::Int(n) => out.extend_from_slice(&n.to_ne_bytes()),
        }
        if concat {
            while !(out.len() - start).is_multiple_of(4) {
                out.push(0);
            }
        }
    }
    out
}

fn element(e: &Element) -> Msg {
    let mut m = Msg::new();
    value_attr(&mut m, 1, &key_bytes(&e.key));
    if let Some(v) = &e.value {
        m.begin(2);
        verdict_attr(&mut m, v);
        m.end();
    }
    if let Some(d) = &e.data {
        value_attr(&mut m, 2, &key_bytes(d));
    }
    m
}
