//! IP and CIDR parsing with the API server's legacy leniency.
//!
//! Objects stored before Kubernetes 1.33 (`StrictIPCIDRValidation`) may hold IPv4
//! addresses with leading zeros (`010.096.000.001`, read as decimal, as Go's
//! `netutils.ParseIPSloppy` does) and IPv4-mapped IPv6 (`::ffff:10.96.0.1`, which Go
//! treats as IPv4). The API server keeps admitting them on unchanged updates, so the
//! proxy must program them; Rust's parsers refuse both.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// Parses `s` as upstream kube-proxy does: leading zeros allowed in IPv4 octets,
/// IPv4-mapped IPv6 returned as IPv4. Surrounding whitespace is not allowed (the API
/// server refuses it in IP fields).
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    let ip = match s.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => parse_with_leading_zeros(s)?,
    };
    Some(canonical(ip))
}

/// Parses `addr/prefix` with [`parse_ip_sloppy`]'s rules for the address; host bits set
/// (`10.0.0.1/8`, admitted by older API servers) are kept, callers truncate.
pub fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    let (addr, prefix) = s.split_once('/')?;
    if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    // An IPv4-mapped address with a /96+ prefix is an IPv4 CIDR to Go; anything else
    // written in IPv6 form stays IPv6.
    let raw = match addr.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => parse_with_leading_zeros(addr)?,
    };
    match (raw, canonical(raw)) {
        (IpAddr::V6(_), IpAddr::V4(v4)) if prefix >= 96 => IpNet::new(v4.into(), prefix - 96).ok(),
        _ => IpNet::new(raw, prefix).ok(),
    }
}

/// IPv4-mapped IPv6 as IPv4; everything else unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// `a.b.c.d` whose octets may carry leading zeros, alone or as the tail of an IPv6
/// address (`::ffff:010.0.0.1`).
fn parse_with_leading_zeros(s: &str) -> Option<IpAddr> {
    match s.rfind(':') {
        None => dotted_quad(s).map(IpAddr::V4),
        Some(i) => {
            let (head, tail) = s.split_at(i + 1);
            let v4 = dotted_quad(tail)?;
            format!("{head}{v4}").parse().ok()
        }
    }
}

fn dotted_quad(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = part.trim_start_matches('0');
        if digits.len() > 3 {
            return None;
        }
        *o = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn leading_zeros_are_decimal() {
        assert_eq!(parse_ip_sloppy("010.096.000.001"), Some(ip("10.96.0.1")));
        assert_eq!(parse_ip_sloppy("0010.0.0.0255"), Some(ip("10.0.0.255")));
        assert_eq!(parse_ip_sloppy("::ffff:010.0.0.1"), Some(ip("10.0.0.1")));
        assert_eq!(parse_ip_sloppy("fd00::010.0.0.1"), Some(ip("fd00::a00:1")));
    }

    #[test]
    fn ipv4_mapped_is_ipv4() {
        assert_eq!(parse_ip_sloppy("::ffff:10.96.0.1"), Some(ip("10.96.0.1")));
        assert_eq!(parse_ip_sloppy("::ffff:a60:1"), Some(ip("10.96.0.1")));
        // IPv4-compatible (deprecated) is not mapped: IPv6 in Go as here.
        assert_eq!(parse_ip_sloppy("::10.96.0.1"), Some(ip("::a60:1")));
    }

    #[test]
    fn still_refused() {
        for bad in [
            "",
            " 10.0.0.1",
            "10.0.0.1 ",
            "10.0.0.256",
            "10.0.0",
            "10.0.0.0.1",
            "10..0.1",
            "10.0.0.-1",
            "10.0.0.1a",
            "0x0a.0.0.1",
            "::ffff:10.0.0.300",
            "fd00::1::2",
            "10.0.0.1/32",
        ] {
            assert_eq!(parse_ip_sloppy(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cidrs() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(parse_cidr_sloppy("010.0.0.0/8"), Some(net("10.0.0.0/8")));
        assert_eq!(parse_cidr_sloppy("10.1.2.3/8"), Some(net("10.1.2.3/8")));
        assert_eq!(
            parse_cidr_sloppy("::ffff:10.0.0.0/104"),
            Some(net("10.0.0.0/8"))
        );
        assert_eq!(parse_cidr_sloppy("fd00::/64"), Some(net("fd00::/64")));
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0.0/", "10.0.0.0/+8", "x/8"] {
            assert_eq!(parse_cidr_sloppy(bad), None, "{bad:?}");
        }
    }
}
