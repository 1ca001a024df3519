//! Netlink message building for nf_tables: the attribute writer and the data encodings
//! (values, verdicts, user data, interval-set elements) that rules and sets share.

use std::net::IpAddr;

use crate::syntax::{Family, Verdict, addr_bits};

const NF_ACCEPT: u32 = 1;
const NF_DROP: u32 = 0;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;

/// A netlink message under construction (its attributes; the batch adds headers).
pub(crate) type Msg = kp_netlink::Attrs;

/// NFTA_DATA_VALUE inside attribute `ty`.
pub(crate) fn value_attr(m: &mut Msg, ty: u16, v: &[u8]) {
    m.begin(ty);
    m.attr(1, v);
    m.end();
}

/// NFTA_DATA_VERDICT (to be placed inside an NFTA_*_DATA nest).
pub(crate) fn verdict_attr(m: &mut Msg, v: &Verdict) {
    let (code, chain): (u32, Option<&str>) = match v {
        Verdict::Accept => (NF_ACCEPT, None),
        Verdict::Drop => (NF_DROP, None),
        Verdict::Return => (NFT_RETURN as u32, None),
        Verdict::Jump(c) => (NFT_JUMP as u32, Some(c)),
        Verdict::Goto(c) => (NFT_GOTO as u32, Some(c)),
    };
    m.begin(2);
    m.u32(1, code);
    if let Some(c) = chain {
        m.str(2, c);
    }
    m.end();
}

/// NFTNL user data TLV holding a NUL-terminated string.
pub(crate) fn udata_str(ty: u8, s: &str) -> Vec<u8> {
    let mut v = vec![ty, (s.len() + 1).min(255) as u8];
    v.extend_from_slice(&s.as_bytes()[..s.len().min(254)]);
    v.push(0);
    v
}

pub(crate) fn udata_u32(ty: u8, x: u32) -> Vec<u8> {
    let mut v = vec![ty, 4];
    v.extend_from_slice(&x.to_ne_bytes());
    v
}

/// One element of an anonymous interval set (key, interval-end flag, open-ended).
pub(crate) fn interval_element(key: &[u8], end: bool, open: bool) -> Msg {
    let mut m = Msg::new();
    if end {
        m.u32(3, NFT_SET_ELEM_INTERVAL_END);
    }
    value_attr(&mut m, 1, key);
    if open {
        // NFTNL_UDATA_SET_ELEM_FLAGS = NFTNL_SET_ELEM_F_INTERVAL_OPEN
        m.attr(6, &udata_u32(1, 1));
    }
    m
}

/// Start/end element keys of merged prefixes, as nft builds anonymous interval sets.
pub(crate) fn interval_elements(family: Family, prefixes: &[(IpAddr, u8)]) -> (Vec<Msg>, u32) {
    let bits: u32 = match family {
        Family::Ip => 32,
        Family::Ip6 => 128,
    };
    let max: u128 = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    let mut ranges: Vec<(u128, u128)> = prefixes
        .iter()
        .map(|(a, l)| {
            let host = bits - u32::from(*l);
            let span = if host == 128 {
                u128::MAX
            } else if host == 0 {
                0
            } else {
                (1u128 << host) - 1
            };
            let start = addr_bits(*a) & !span;
            (start, start | span)
        })
        .collect();
    ranges.sort();
    let mut merged: Vec<(u128, u128)> = vec![];
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if last.1 == max || s <= last.1 + 1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let bytes = |v: u128| -> Vec<u8> {
        match family {
            Family::Ip => (v as u32).to_be_bytes().to_vec(),
            Family::Ip6 => v.to_be_bytes().to_vec(),
        }
    };
    let mut out = vec![];
    if merged.first().is_some_and(|r| r.0 != 0) {
        out.push(interval_element(&bytes(0), true, false));
    }
    let mut open = false;
    for (s, e) in &merged {
        if *e == max {
            out.push(interval_element(&bytes(*s), false, true));
            open = true;
        } else {
            out.push(interval_element(&bytes(*s), false, false));
            out.push(interval_element(&bytes(e + 1), true, false));
        }
    }
    let size = out.len() as u32 + u32::from(open);
    (out, size)
}
