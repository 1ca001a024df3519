//! IP, CIDR and `host:port` parsing with the leniency upstream has.
//!
//! Upstream parses with `netutils.ParseIPSloppy`/`ParseCIDRSloppy`, which accept IPv4
//! octets with leading zeros (read as decimal), and Go's `net.SplitHostPort`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;

/// Parses an IP address, accepting IPv4 octets with leading zeros like Go's sloppy parser.
pub fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    let octets: Vec<&str> = text.split('.').collect();
    if octets.len() != 4 {
        return None;
    }
    let mut bytes = [0u8; 4];
    for (slot, octet) in bytes.iter_mut().zip(&octets) {
        if octet.is_empty() || octet.len() > 3 || !octet.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = octet.parse().ok()?;
    }
    Some(IpAddr::V4(Ipv4Addr::from(bytes)))
}

/// Parses `ip/prefix` and returns the network (host bits cleared), like Go's `ParseCIDR`.
pub fn parse_cidr_sloppy(text: &str) -> Option<IpNet> {
    let (ip_text, prefix_text) = text.split_once('/')?;
    let ip = parse_ip_sloppy(ip_text)?;
    if prefix_text.is_empty() || !prefix_text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix: u8 = prefix_text.parse().ok()?;
    IpNet::new(ip, prefix).ok().map(|net| net.trunc())
}

/// Splits `host:port` / `[v6]:port` like Go's `net.SplitHostPort`.
pub fn split_host_port(text: &str) -> Option<(&str, &str)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = text.rsplit_once(':')?;
    if host.contains(':') {
        return None;
    }
    Some((host, port))
}

/// Why a `host:port` bind address is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPortError {
    NotHostPort,
    BadIp,
    BadPort,
}

impl HostPortError {
    pub fn reason(&self) -> &'static str {
        match self {
            HostPortError::NotHostPort => "must be IP:port",
            HostPortError::BadIp => "must contain a valid IP",
            HostPortError::BadPort => "must contain a valid port in the range [1, 65535]",
        }
    }
}

/// Parses a bind address that must be `IP:port` with a port in 1..=65535.
pub fn parse_ip_port(text: &str) -> Result<SocketAddr, HostPortError> {
    let (host, port_text) = split_host_port(text).ok_or(HostPortError::NotHostPort)?;
    let ip = parse_ip_sloppy(host).ok_or(HostPortError::BadIp)?;
    let port: u16 = port_text.parse().map_err(|_| HostPortError::BadPort)?;
    if port == 0 {
        return Err(HostPortError::BadPort);
    }
    Ok(SocketAddr::new(ip, port))
}

/// Adds `port` when `address` is a bare IP, like upstream's `AppendPortIfNeeded`;
/// anything else is returned unchanged for validation to judge.
pub fn append_port_if_needed(address: &str, port: u16) -> String {
    if split_host_port(address).is_some() {
        return address.to_string();
    }
    match parse_ip_sloppy(address) {
        Some(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Some(IpAddr::V4(_)) => format!("{address}:{port}"),
        None => address.to_string(),
    }
}

/// Replaces the port of a `host:port` address (used by the deprecated `--*-port` flags).
pub fn replace_port(address: &str, port: u16) -> String {
    match split_host_port(address) {
        Some((host, _)) if host.contains(':') => format!("[{host}]:{port}"),
        Some((host, _)) => format!("{host}:{port}"),
        None => append_port_if_needed(address, port),
    }
}

/// Validates an upstream port range: empty, `N`, `N-M` or `N+offset`.
pub fn is_valid_port_range(text: &str) -> bool {
    let text = text.trim();
    if text.is_empty() {
        return true;
    }
    let parse_port = |s: &str| s.parse::<u16>().ok();
    if let Some((low, high)) = text.split_once('-') {
        return matches!((parse_port(low), parse_port(high)), (Some(l), Some(h)) if l <= h);
    }
    if let Some((base, offset)) = text.split_once('+') {
        return match (parse_port(base), offset.parse::<u32>().ok()) {
            (Some(b), Some(o)) => u32::from(b) + o <= 65_535,
            _ => false,
        };
    }
    parse_port(text).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sloppy_ip_accepts_leading_zeros_only_for_ipv4() {
        assert_eq!(
            parse_ip_sloppy("010.001.0.1"),
            Some("10.1.0.1".parse().expect("ip"))
        );
        assert_eq!(parse_ip_sloppy("::1"), Some("::1".parse().expect("ip")));
        assert_eq!(parse_ip_sloppy("1.2.3"), None);
        assert_eq!(parse_ip_sloppy("256.0.0.1"), None);
        assert_eq!(parse_ip_sloppy("abc"), None);
    }

    #[test]
    fn cidr_clears_host_bits_and_rejects_garbage() {
        assert_eq!(
            parse_cidr_sloppy("10.244.1.7/16"),
            Some("10.244.0.0/16".parse().expect("net"))
        );
        assert_eq!(
            parse_cidr_sloppy("fd00::1/64"),
            Some("fd00::/64".parse().expect("net"))
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/",
            "x/8",
            "::/129",
            "10.0.0.0/+8",
        ] {
            assert_eq!(parse_cidr_sloppy(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_port_parsing_matches_go() {
        assert_eq!(split_host_port("1.2.3.4:80"), Some(("1.2.3.4", "80")));
        assert_eq!(split_host_port("[::1]:80"), Some(("::1", "80")));
        assert_eq!(split_host_port("::1"), None);
        assert_eq!(parse_ip_port("0.0.0.0:10256").map(|a| a.port()), Ok(10256));
        assert_eq!(parse_ip_port("0.0.0.0:0"), Err(HostPortError::BadPort));
        assert_eq!(parse_ip_port("0.0.0.0"), Err(HostPortError::NotHostPort));
        assert_eq!(parse_ip_port("host:80"), Err(HostPortError::BadIp));
    }

    #[test]
    fn append_and_replace_port() {
        assert_eq!(append_port_if_needed("127.0.0.1", 10249), "127.0.0.1:10249");
        assert_eq!(append_port_if_needed("::", 10256), "[::]:10256");
        assert_eq!(append_port_if_needed("1.2.3.4:99", 10256), "1.2.3.4:99");
        assert_eq!(append_port_if_needed("junk", 1), "junk");
        assert_eq!(replace_port("[::1]:10249", 9999), "[::1]:9999");
        assert_eq!(replace_port("0.0.0.0:10256", 1), "0.0.0.0:1");
    }

    #[test]
    fn port_ranges() {
        for good in ["", "300-2000", "8080", "100+10"] {
            assert!(is_valid_port_range(good), "{good}");
        }
        for bad in ["2000-300", "abc", "70000", "65535+1", "1-"] {
            assert!(!is_valid_port_range(bad), "{bad}");
        }
    }
}
