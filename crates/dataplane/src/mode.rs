//! The proxy modes, as one value type shared by config, admin, the agent and backends.

use std::fmt;
use std::str::FromStr;

/// A proxy mode: which dataplane carries the Services. Adding a mode means a variant
/// here, its entry in [`Mode::ALL`], its crate, and one arm in the agent's constructor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Iptables,
    Nftables,
    Ipvs,
    /// Our own userspace proxy (upstream removed theirs in 1.26).
    Userspace,
}

impl Mode {
    /// Every mode, in the order `--cleanup` removes them.
    pub const ALL: [Mode; 4] = [Mode::Iptables, Mode::Nftables, Mode::Ipvs, Mode::Userspace];

    /// The spelling of the config file, `--proxy-mode` and `/proxyMode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Ipvs => "ipvs",
            Mode::Userspace => "userspace",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mode name that is not one of [`Mode::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown proxy mode {0:?}: must be iptables, nftables, ipvs or userspace")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownMode(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
            assert_eq!(m.to_string(), m.as_str());
        }
        for bad in ["", "IPTABLES", "kernelspace", "nft"] {
            assert!(bad.parse::<Mode>().is_err(), "{bad}");
        }
    }
}
