//! The few direct kernel touches outside the dataplanes: sysctls and local addresses.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use kp_config::ConntrackSettings;

fn read_sysctl(path: &str) -> Option<i64> {
    std::fs::read_to_string(Path::new("/proc/sys").join(path))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Writes a sysctl; failures (read-only /proc/sys in a container or namespace) are logged
/// and ignored, as upstream does.
pub fn write_sysctl(path: &str, value: i64) -> bool {
    if read_sysctl(path) == Some(value) {
        return true;
    }
    match std::fs::write(Path::new("/proc/sys").join(path), value.to_string()) {
        Ok(()) => {
            tracing::info!(sysctl = path, value, "set sysctl");
            true
        }
        Err(e) => {
            tracing::warn!(sysctl = path, value, error = %e, "cannot set sysctl; continuing");
            false
        }
    }
}

/// Applies the `conntrack.*` settings. nf_conntrack_max is only ever raised.
pub fn apply_conntrack(c: &ConntrackSettings) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as i64;
    let mut max = c.max_per_core.map(|m| i64::from(m) * cpus).unwrap_or(0);
    if let Some(min) = c.min {
        max = max.max(i64::from(min));
    }
    if max > 0 {
        match read_sysctl("net/netfilter/nf_conntrack_max") {
            Some(cur) if cur >= max => {}
            _ => {
                write_sysctl("net/netfilter/nf_conntrack_max", max);
            }
        }
    }
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs() as i64).filter(|s| *s > 0);
    let timeouts = [
        (
            "net/netfilter/nf_conntrack_tcp_timeout_established",
            secs(c.tcp_established_timeout),
        ),
        (
            "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
            secs(c.tcp_close_wait_timeout),
        ),
        (
            "net/netfilter/nf_conntrack_udp_timeout",
            secs(c.udp_timeout),
        ),
        (
            "net/netfilter/nf_conntrack_udp_timeout_stream",
            secs(c.udp_stream_timeout),
        ),
    ];
    for (path, v) in timeouts {
        if let Some(v) = v {
            write_sysctl(path, v);
        }
    }
    if c.tcp_be_liberal {
        write_sysctl("net/netfilter/nf_conntrack_tcp_be_liberal", 1);
    }
}

/// nf_conntrack_tcp_be_liberal is on (then the INVALID drop rule is not needed).
pub fn tcp_be_liberal() -> bool {
    read_sysctl("net/netfilter/nf_conntrack_tcp_be_liberal").is_some_and(|v| v != 0)
}

/// This namespace's conntrack table: entries, the limit, and the kernel's cumulative
/// count of new flows it dropped or evicted for want of room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackFill {
    pub entries: u64,
    pub max: u64,
    pub pressure_drops: u64,
}

impl ConntrackFill {
    pub fn read() -> Option<ConntrackFill> {
        let stat = std::fs::read_to_string("/proc/net/stat/nf_conntrack").ok()?;
        Some(ConntrackFill {
            entries: read_sysctl("net/netfilter/nf_conntrack_count")?
                .try_into()
                .ok()?,
            max: read_sysctl("net/netfilter/nf_conntrack_max")?
                .try_into()
                .ok()?,
            pressure_drops: pressure_drops(&stat)?,
        })
    }

    /// At or near the limit: new flows evict others or are dropped.
    pub fn full(&self) -> bool {
        self.max > 0 && self.entries * 100 >= self.max * 95
    }
}

/// Sum over CPUs of the `drop` and `early_drop` columns of /proc/net/stat/nf_conntrack
/// (hex, one line per CPU under a header naming the columns).
fn pressure_drops(stat: &str) -> Option<u64> {
    let mut lines = stat.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let columns: Vec<usize> = ["drop", "early_drop"]
        .iter()
        .filter_map(|name| header.iter().position(|h| h == name))
        .collect();
    if columns.is_empty() {
        return None;
    }
    let mut sum = 0u64;
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        for &c in &columns {
            sum += u64::from_str_radix(fields.get(c)?, 16).ok()?;
        }
    }
    Some(sum)
}

/// Addresses configured on this network namespace's interfaces.
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    let mut out = Vec::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_drops_sum_drop_and_early_drop_over_cpus() {
        let stat = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
                    00040000  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000002 00000010 00000000  00000000 00000000 00000000 00000000\n\
                    00040000  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 0000fffb 00000000  00000000 00000000 00000000 00000000\n";
        assert_eq!(pressure_drops(stat), Some(2 + 16 + 0xfffb));
        assert_eq!(pressure_drops("entries found\n1 2\n"), None);
    }

    #[test]
    fn full_means_at_least_95_percent() {
        let f = |entries, max| {
            ConntrackFill {
                entries,
                max,
                pressure_drops: 0,
            }
            .full()
        };
        assert!(f(262_144, 262_144));
        assert!(f(95, 100));
        assert!(!f(94, 100));
        assert!(!f(0, 0));
    }
}
