//! Rule items -> nf_tables expressions, register use as nft 1.0.6 allocates it.

use std::net::IpAddr;

use crate::msg::{Msg, interval_elements, value_attr, verdict_attr};
use crate::syntax::{AddrRhs, Dir, Family, Rule, RuleItem, TypeofExpr, Verdict};

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;

const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

const NFT_META_MARK: u32 = 3;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_L4PROTO: u32 = 16;

const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;

const RTN_LOCAL: u32 = 2;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
const NF_CT_STATE_NEW: u32 = 8;

/// An anonymous set a rule binds (`ip saddr != { … }`).
pub(crate) struct AnonSet {
    pub id: u32,
    pub key_type: u32,
    pub key_len: u32,
    pub desc_size: u32,
    pub udata: Vec<u8>,
    pub elements: Vec<Msg>,
}

struct Exprs<'a> {
    m: &'a mut Msg,
}

impl Exprs<'_> {
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Msg)) {
        self.m.begin(1);
        self.m.str(1, name);
        self.m.begin(2);
        body(self.m);
        self.m.end();
        self.m.end();
    }
    fn payload(&mut self, dreg: u32, base: u32, offset: u32, len: u32) {
        self.expr("payload", |m| {
            m.u32(1, dreg);
            m.u32(2, base);
            m.u32(3, offset);
            m.u32(4, len);
        });
    }
    fn meta_load(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |m| {
            m.u32(2, key);
            m.u32(1, dreg);
        });
    }
    fn cmp(&mut self, neg: bool, data: &[u8]) {
        self.expr("cmp", |m| {
            m.u32(1, NFT_REG_1);
            m.u32(2, if neg { NFT_CMP_NEQ } else { NFT_CMP_EQ });
            value_attr(m, 3, data);
        });
    }
    /// `op`: Some(0) for the boolean op attribute nft sends on meta mark, None otherwise.
    fn bitwise(&mut self, op: Option<u32>, mask: &[u8], xor: &[u8]) {
        self.expr("bitwise", |m| {
            m.u32(1, NFT_REG_1);
            m.u32(2, NFT_REG_1);
            if let Some(op) = op {
                m.u32(6, op);
            }
            m.u32(3, mask.len() as u32);
            value_attr(m, 4, mask);
            value_attr(m, 5, xor);
        });
    }
    fn immediate_verdict(&mut self, v: &Verdict) {
        self.expr("immediate", |m| {
            m.u32(1, NFT_REG_VERDICT);
            m.begin(2);
            verdict_attr(m, v);
            m.end();
        });
    }
    fn immediate_value(&mut self, dreg: u32, v: &[u8]) {
        self.expr("immediate", |m| {
            m.u32(1, dreg);
            value_attr(m, 2, v);
        });
    }
    fn lookup(&mut self, set: &str, id: Option<u32>, verdict: bool, invert: bool) {
        self.expr("lookup", |m| {
            m.u32(2, NFT_REG_1);
            if verdict {
                m.u32(3, NFT_REG_VERDICT);
            }
            m.str(1, set);
            if let Some(id) = id {
                m.u32(4, id);
            }
            if invert {
                m.u32(5, 1);
            }
        });
    }
    fn l4proto(&mut self, p: u8) {
        self.meta_load(NFT_META_L4PROTO, NFT_REG_1);
        self.cmp(false, &[p]);
    }
}

fn addr_offset(family: Family, dir: Dir) -> (u32, u32) {
    match (family, dir) {
        (Family::Ip, Dir::Saddr) => (12, 4),
        (Family::Ip, Dir::Daddr) => (16, 4),
        (Family::Ip6, Dir::Saddr) => (8, 16),
        (Family::Ip6, Dir::Daddr) => (24, 16),
    }
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// nft's register for the 32-bit slot `idx` of a concatenation.
fn concat_reg(idx: u32) -> u32 {
    if idx.is_multiple_of(4) {
        NFT_REG_1 + idx / 4
    } else {
        8 + idx
    }
}

/// Appends NFTA_RULE_EXPRESSIONS for `rule` to `m`; anonymous sets it needs go to `anon`.
pub(crate) fn encode_rule(
    m: &mut Msg,
    family: Family,
    rule: &Rule,
    next_id: &mut dyn FnMut() -> u32,
    anon: &mut Vec<AnonSet>,
) {
    m.begin(4);
    let mut e = Exprs { m: &mut *m };
    let mut l4: Option<u8> = None;
    for item in &rule.items {
        match item {
            RuleItem::CtStateNew => {
                e.expr("ct", |m| {
                    m.u32(2, 0);
                    m.u32(1, NFT_REG_1);
                });
                e.bitwise(None, &NF_CT_STATE_NEW.to_ne_bytes(), &[0; 4]);
                e.cmp(true, &[0; 4]);
            }
            RuleItem::L4Proto(p) => {
                e.l4proto(*p);
                l4 = Some(*p);
            }
            RuleItem::Addr { dir, neg, rhs } => {
                let (off, len) = addr_offset(family, *dir);
                match rhs {
                    AddrRhs::Prefix(a, plen) => {
                        let bytes = addr_bytes(a);
                        let plen = u32::from(*plen);
                        if plen == len * 8 || (plen > 0 && plen.is_multiple_of(8)) {
                            let n = if plen == len * 8 { len } else { plen / 8 };
                            e.payload(NFT_REG_1, NFT_PAYLOAD_NETWORK_HEADER, off, n);
                            e.cmp(*neg, &bytes[..n as usize]);
                        } else {
                            e.payload(NFT_REG_1, NFT_PAYLOAD_NETWORK_HEADER, off, len);
                            let mut mask = vec![0u8; len as usize];
                            for (i, b) in mask.iter_mut().enumerate() {
                                let bits = plen.saturating_sub(i as u32 * 8).min(8);
                                *b = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
                            }
                            e.bitwise(None, &mask, &vec![0; len as usize]);
                            e.cmp(*neg, &bytes);
                        }
                    }
                    AddrRhs::Set(s) => {
                        e.payload(NFT_REG_1, NFT_PAYLOAD_NETWORK_HEADER, off, len);
                        e.lookup(s, None, false, *neg);
                    }
                    AddrRhs::List(prefixes) => {
                        e.payload(NFT_REG_1, NFT_PAYLOAD_NETWORK_HEADER, off, len);
                        let id = next_id();
                        let (elements, desc_size) = interval_elements(family, prefixes);
                        let (key_type, desc, field) = match (family, dir) {
                            (Family::Ip, Dir::Saddr) => (7, 12, 11),
                            (Family::Ip, Dir::Daddr) => (7, 12, 12),
                            (Family::Ip6, Dir::Saddr) => (8, 13, 8),
                            (Family::Ip6, Dir::Daddr) => (8, 13, 9),
                        };
                        // keybyteorder big endian, merge elements, typeof payload(desc, field)
                        let mut udata = vec![0, 4, 2, 0, 0, 0, 2, 4, 1, 0, 0, 0];
                        udata.extend([
                            3, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, desc, 0, 0, 0, 1, 4, field, 0, 0,
                            0,
                        ]);
                        anon.push(AnonSet {
                            id,
                            key_type,
                            key_len: len,
                            desc_size,
                            udata,
                            elements,
                        });
                        e.lookup("__set%d", Some(id), false, *neg);
                    }
                }
            }
            RuleItem::Dport { proto, port } => {
                if l4 != Some(*proto) {
                    e.l4proto(*proto);
                    l4 = Some(*proto);
                }
                e.payload(NFT_REG_1, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
                e.cmp(false, &port.to_be_bytes());
            }
            RuleItem::Iifname {
                neg,
                name,
                wildcard,
            } => {
                e.meta_load(NFT_META_IIFNAME, NFT_REG_1);
                let mut d = name.as_bytes().to_vec();
                if !wildcard {
                    d.resize(16, 0);
                }
                e.cmp(*neg, &d);
            }
            RuleItem::FibLocal(dir) => {
                let flag = match dir {
                    Dir::Saddr => 1,
                    Dir::Daddr => 2,
                };
                e.expr("fib", |m| {
                    m.u32(3, flag);
                    m.u32(2, 3); // NFT_FIB_RESULT_ADDRTYPE
                    m.u32(1, NFT_REG_1);
                });
                e.cmp(false, &RTN_LOCAL.to_ne_bytes());
            }
            RuleItem::TupleVmap { addr, map } => {
                let mut idx = 0;
                if let Some(dir) = addr {
                    let (off, len) = addr_offset(family, *dir);
                    e.payload(concat_reg(0), NFT_PAYLOAD_NETWORK_HEADER, off, len);
                    idx = len / 4;
                }
                e.meta_load(NFT_META_L4PROTO, concat_reg(idx));
                e.payload(concat_reg(idx + 1), NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
                e.lookup(map, None, true, false);
            }
            RuleItem::NumgenVmap {
                modulus,
                offset,
                map,
            } => {
                e.expr("numgen", |m| {
                    m.u32(1, NFT_REG_1);
                    m.u32(2, *modulus);
                    m.u32(3, 1); // NFT_NG_RANDOM
                    m.u32(4, *offset);
                });
                e.lookup(map, None, true, false);
            }
            RuleItem::DnatMap { key, map } => {
                let mut idx = 0;
                for k in key {
                    let reg = concat_reg(idx);
                    match k {
                        TypeofExpr::Addr { dir, .. } => {
                            let (off, len) = addr_offset(family, *dir);
                            e.payload(reg, NFT_PAYLOAD_NETWORK_HEADER, off, len);
                        }
                        TypeofExpr::L4Proto => e.meta_load(NFT_META_L4PROTO, reg),
                        TypeofExpr::Dport(_) => {
                            e.payload(reg, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
                        }
                        TypeofExpr::Numgen { modulus } => e.expr("numgen", |m| {
                            m.u32(1, reg);
                            m.u32(2, *modulus);
                            m.u32(3, 1); // NFT_NG_RANDOM
                        }),
                    }
                    idx += k.byte_len().div_ceil(4);
                }
                e.expr("lookup", |m| {
                    m.u32(2, NFT_REG_1);
                    m.u32(3, NFT_REG_1);
                    m.str(1, map);
                });
                let addr_len = match family {
                    Family::Ip => 4,
                    Family::Ip6 => 16,
                };
                e.expr("nat", |m| {
                    m.u32(1, 1); // NFT_NAT_DNAT
                    m.u32(2, u32::from(family.nfproto()));
                    m.u32(3, NFT_REG_1);
                    m.u32(5, concat_reg(addr_len / 4));
                });
            }
            RuleItem::NumgenEq { modulus, value } => {
                e.expr("numgen", |m| {
                    m.u32(1, NFT_REG_1);
                    m.u32(2, *modulus);
                    m.u32(3, 1); // NFT_NG_RANDOM
                });
                e.cmp(false, &value.to_ne_bytes());
            }
            RuleItem::AddrPairSet { first, second, set } => {
                let (off, len) = addr_offset(family, *first);
                e.payload(concat_reg(0), NFT_PAYLOAD_NETWORK_HEADER, off, len);
                let (off2, len2) = addr_offset(family, *second);
                e.payload(concat_reg(len / 4), NFT_PAYLOAD_NETWORK_HEADER, off2, len2);
                e.lookup(set, None, false, false);
            }
            RuleItem::MarkSet { xor, value } => {
                e.meta_load(NFT_META_MARK, NFT_REG_1);
                let mask = if *xor { u32::MAX } else { !value };
                e.bitwise(Some(0), &mask.to_ne_bytes(), &value.to_ne_bytes());
                e.expr("meta", |m| {
                    m.u32(2, NFT_META_MARK);
                    m.u32(3, NFT_REG_1);
                });
            }
            RuleItem::MarkAndCmp { mask, neg, value } => {
                e.meta_load(NFT_META_MARK, NFT_REG_1);
                e.bitwise(Some(0), &mask.to_ne_bytes(), &[0; 4]);
                e.cmp(*neg, &value.to_ne_bytes());
            }
            RuleItem::Update { set, dir } => {
                let (off, len) = addr_offset(family, *dir);
                e.payload(NFT_REG_1, NFT_PAYLOAD_NETWORK_HEADER, off, len);
                e.expr("dynset", |m| {
                    m.u32(4, NFT_REG_1);
                    m.u32(3, 1); // NFT_DYNSET_OP_UPDATE
                    m.str(1, set);
                });
            }
            RuleItem::Masquerade { fully_random } => {
                e.expr("masq", |m| {
                    if *fully_random {
                        m.u32(1, NF_NAT_RANGE_PROTO_RANDOM_FULLY);
                    }
                });
            }
            RuleItem::Dnat { addr, port } => {
                e.immediate_value(NFT_REG_1, &addr_bytes(addr));
                e.immediate_value(NFT_REG_2, &port.to_be_bytes());
                e.expr("nat", |m| {
                    m.u32(1, 1); // NFT_NAT_DNAT
                    m.u32(2, u32::from(family.nfproto()));
                    m.u32(3, NFT_REG_1);
                    m.u32(5, NFT_REG_2);
                    m.u32(7, NF_NAT_RANGE_PROTO_SPECIFIED);
                });
            }
            RuleItem::Reject => {
                let code = match family {
                    Family::Ip => 3,  // ICMP_PORT_UNREACH
                    Family::Ip6 => 4, // ICMPV6_PORT_UNREACH
                };
                e.expr("reject", |m| {
                    m.u32(1, 0); // NFT_REJECT_ICMP_UNREACH
                    m.attr(2, &[code]);
                });
            }
            RuleItem::Verdict(v) => e.immediate_verdict(v),
        }
    }
    m.end();
}
