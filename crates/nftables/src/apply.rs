//! Applying a transaction: over nfnetlink when the socket is there, `nft -f` otherwise
//! or for syntax the encoder does not know; split transactions part by part.

use kp_dataplane::{Applier, CommandRunner, SyncError};
use kp_model::IpFamily;

use crate::proxier::NftProxier;
use crate::render::{NftSpelling, TABLE};
use crate::txn::COMMIT_MARKER;

impl<R: CommandRunner> NftProxier<R> {
    /// Applies each part of a split transaction in order. A failure leaves the parts
    /// before it committed; the full sync that follows repairs the rest.
    pub(crate) fn apply(&mut self, text: &str) -> Result<(), SyncError> {
        let mut total = std::time::Duration::ZERO;
        let mut largest = std::time::Duration::ZERO;
        let mut parts = 0;
        for part in text.split(COMMIT_MARKER) {
            if part.trim().is_empty() {
                continue;
            }
            self.apply_one(part)?;
            total += self.last_apply;
            largest = largest.max(self.last_apply);
            parts += 1;
        }
        if parts > 1 {
            tracing::info!(
                transactions = parts,
                largest_ms = largest.as_secs_f64() * 1000.0,
                "sync split into bounded transactions"
            );
        }
        self.last_apply = total;
        Ok(())
    }

    pub(crate) fn apply_one(&mut self, text: &str) -> Result<(), SyncError> {
        let started = std::time::Instant::now();
        let Some(netlink) = self.netlink.as_mut() else {
            self.run_nft(text)?;
            self.last_apply = started.elapsed();
            return Ok(());
        };
        match netlink.apply(text) {
            Ok(r) => {
                self.last_apply = r.kernel;
                Ok(())
            }
            // Syntax the netlink encoder does not know (a renderer change ahead of it):
            // nft understands everything we write.
            Err(kp_nftnl::NftnlError::Parse(e)) => {
                tracing::warn!(error = %e, "transaction not encodable for netlink; using nft -f");
                self.run_nft(text)?;
                self.last_apply = started.elapsed();
                Ok(())
            }
            Err(kp_nftnl::NftnlError::Rejected {
                line,
                statement,
                errno,
                message,
                more,
            }) => Err(SyncError::Apply {
                tool: Applier::Nfnetlink,
                message: format!(
                    "line {line}: {message} (errno {errno}){}",
                    if more > 0 {
                        format!(", {more} more errors")
                    } else {
                        String::new()
                    }
                ),
                line: Some(statement),
            }),
            // Whether the batch was committed is unknown: report it, and the full sync
            // that follows a failure replaces the table atomically either way.
            Err(e) => Err(SyncError::Apply {
                tool: Applier::Nfnetlink,
                message: e.to_string(),
                line: None,
            }),
        }
    }

    pub(crate) fn run_nft(&self, text: &str) -> Result<(), SyncError> {
        let out = self
            .runner
            .run("nft", &["-f", "-"], Some(text.as_bytes()))?;
        if out.success() {
            return Ok(());
        }
        // nft names the input line: "/dev/stdin:12:5-9: Error: …".
        let line = out
            .stderr
            .split(':')
            .nth(1)
            .and_then(|n| n.trim().parse::<usize>().ok())
            .and_then(|n| text.lines().nth(n.checked_sub(1)?))
            .map(str::to_string);
        let message = out.stderr_summary();
        Err(SyncError::Apply {
            tool: Applier::Nft,
            message,
            line,
        })
    }

    /// A small chain stands for the table: gone after `nft flush ruleset` or
    /// `nft delete table`. Asked over netlink (a dump of that chain's rules); `nft list
    /// chain` would read the whole table first (seconds at 30k services).
    pub(crate) fn table_present(&mut self) -> bool {
        if let Some(netlink) = self.netlink.as_mut() {
            let family = match self.cfg.family {
                IpFamily::V4 => kp_nftnl::Family::Ip,
                IpFamily::V6 => kp_nftnl::Family::Ip6,
            };
            // nat-prerouting holds exactly the jump to `services`.
            match netlink.chain_rule_count(family, TABLE, "nat-prerouting") {
                Ok(n) => return n.is_some_and(|n| n >= 1),
                Err(e) => tracing::debug!(error = %e, "netlink chain probe failed; asking nft"),
            }
        }
        let f = self.cfg.nft_family();
        matches!(
            self.runner.run("nft", &["list", "chain", f, TABLE, "nat-prerouting"], None),
            Ok(out) if out.success() && out.stdout.contains("jump services")
        )
    }
}
