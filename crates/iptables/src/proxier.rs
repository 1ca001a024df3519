//! The thin kernel-facing part of iptables mode: jump rules, canary chains, stale-chain
//! discovery and one `iptables-restore --noflush` per sync.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kp_dataplane::{Applier, CommandRunner, Dataplane, SyncError, SyncInput, SyncReport};
use kp_model::{IpFamily, NamespacedName};

use crate::render::*;

const CANARY: &str = "KUBE-PROXY-CANARY";
/// iptables' exit status when it could not get a resource, such as the xtables lock.
const RESOURCE_PROBLEM: i32 = 4;

/// Binaries for one IP family.
#[derive(Debug, Clone)]
pub struct Tools {
    pub iptables: String,
    pub save: String,
    pub restore: String,
}

impl Tools {
    pub fn for_family(family: IpFamily) -> Tools {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        Tools {
            iptables: base.into(),
            save: format!("{base}-save"),
            restore: format!("{base}-restore"),
        }
    }
}

/// A jump from a built-in chain (`from`) to one of ours (`chain`) in `table`, with its
/// comment and extra match arguments.
#[derive(Debug, Clone, Copy)]
struct Jump {
    table: &'static str,
    chain: &'static str,
    from: &'static str,
    comment: &'static str,
    extra: &'static [&'static str],
}

const fn jump(
    table: &'static str,
    chain: &'static str,
    from: &'static str,
    comment: &'static str,
    extra: &'static [&'static str],
) -> Jump {
    Jump {
        table,
        chain,
        from,
        comment,
        extra,
    }
}

const NEW: &[&str] = &["-m", "conntrack", "--ctstate", "NEW"];
const JUMPS: &[Jump] = &[
    jump(
        "filter",
        KUBE_EXTERNAL_SERVICES,
        "INPUT",
        "kubernetes externally-visible service portals",
        NEW,
    ),
    jump(
        "filter",
        KUBE_EXTERNAL_SERVICES,
        "FORWARD",
        "kubernetes externally-visible service portals",
        NEW,
    ),
    jump(
        "filter",
        KUBE_NODEPORTS,
        "INPUT",
        "kubernetes health check service ports",
        &[],
    ),
    jump(
        "filter",
        KUBE_SERVICES,
        "FORWARD",
        "kubernetes service portals",
        NEW,
    ),
    jump(
        "filter",
        KUBE_SERVICES,
        "OUTPUT",
        "kubernetes service portals",
        NEW,
    ),
    jump(
        "filter",
        KUBE_FORWARD,
        "FORWARD",
        "kubernetes forwarding rules",
        &[],
    ),
    jump(
        "filter",
        KUBE_PROXY_FIREWALL,
        "INPUT",
        "kubernetes load balancer firewall",
        NEW,
    ),
    jump(
        "filter",
        KUBE_PROXY_FIREWALL,
        "OUTPUT",
        "kubernetes load balancer firewall",
        NEW,
    ),
    jump(
        "filter",
        KUBE_PROXY_FIREWALL,
        "FORWARD",
        "kubernetes load balancer firewall",
        NEW,
    ),
    jump(
        "nat",
        KUBE_SERVICES,
        "OUTPUT",
        "kubernetes service portals",
        &[],
    ),
    jump(
        "nat",
        KUBE_SERVICES,
        "PREROUTING",
        "kubernetes service portals",
        &[],
    ),
    jump(
        "nat",
        KUBE_POSTROUTING,
        "POSTROUTING",
        "kubernetes postrouting rules",
        &[],
    ),
];

fn jump_args(j: &Jump) -> Vec<String> {
    let Jump {
        chain,
        comment,
        extra,
        ..
    } = j;
    // kubelet's KUBE-FIREWALL jumps carry no comment upstream.
    let mut a: Vec<String> = if comment.is_empty() {
        vec![]
    } else {
        vec![
            "-m".into(),
            "comment".into(),
            "--comment".into(),
            comment.to_string(),
        ]
    };
    a.extend(extra.iter().map(|s| s.to_string()));
    a.extend(["-j".to_string(), chain.to_string()]);
    a
}

/// iptables mode for one IP family.
pub struct IptablesProxier<R: CommandRunner> {
    runner: Arc<R>,
    cfg: IptablesConfig,
    tools: Tools,
    needs_full: bool,
    /// Per-service nat chains believed to exist in the kernel.
    known_chains: BTreeSet<String>,
    rule_counts: HashMap<NamespacedName, usize>,
    /// How many rules we wrote into each of our chains: what the drift check expects to
    /// find in the kernel.
    written: WrittenRules,
    /// The drift check lists whole tables: it runs at most every 100x its own cost.
    next_drift_check: Option<Instant>,
    drift_listing: Option<DriftListing>,
    /// Bumped by every restore attempt: tells a drift listing it may be stale.
    generation: u64,
    /// Whether the tools are iptables-nft (asked once), whose restore needs the nat table
    /// cached whole for large inputs (see `render`).
    nf_tables_variant: Option<bool>,
}

/// An `iptables-save` of the nat and filter tables running on its own thread.
struct DriftListing {
    generation: u64,
    thread: std::thread::JoinHandle<(Vec<(&'static str, String)>, Duration)>,
}

/// How many rules each of our chains holds after the restores applied so far, per table,
/// keyed by a hash of the chain name (names would cost megabytes at 10k services).
#[derive(Debug, Default)]
struct WrittenRules {
    hasher: std::collections::hash_map::RandomState,
    tables: BTreeMap<String, HashMap<u64, u32>>,
}

impl WrittenRules {
    fn key(&self, chain: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(chain.as_bytes());
        h.finish()
    }

    /// Applies what an `iptables-restore --noflush` input does to our chains: a declared
    /// chain is emptied, `-A` appends, `-X` deletes. Runs over every restore input, so it
    /// allocates nothing per line.
    fn apply(&mut self, restore_input: &str) {
        let hasher = self.hasher.clone();
        let key = |chain: &str| {
            let mut h = hasher.build_hasher();
            h.write(chain.as_bytes());
            h.finish()
        };
        let first_word = |rest: &str| key(rest.split_whitespace().next().unwrap_or_default());
        let mut chains: Option<&mut HashMap<u64, u32>> = None;
        for line in restore_input.lines() {
            if let Some(t) = line.strip_prefix('*') {
                chains = Some(self.tables.entry(t.to_string()).or_default());
            } else if let Some(chains) = chains.as_deref_mut() {
                if let Some(rest) = line.strip_prefix(':') {
                    chains.insert(first_word(rest), 0);
                } else if let Some(rest) = line.strip_prefix("-A ") {
                    *chains.entry(first_word(rest)).or_default() += 1;
                } else if let Some(rest) = line.strip_prefix("-X ") {
                    chains.remove(&key(rest.trim()));
                }
            }
        }
    }

    /// What `save` (an `iptables-save -t table` listing) lacks of what we wrote: a chain
    /// that is gone or holds fewer rules. Rules others add are not our business.
    fn missing(&self, table: &str, save: &str) -> Option<String> {
        let want = self.tables.get(table)?;
        let mut have: HashMap<u64, (u32, &str)> = HashMap::with_capacity(want.len());
        for line in save.lines() {
            let (chain, rule) = if let Some(rest) = line.strip_prefix(':') {
                (rest, 0)
            } else if let Some(rest) = line.strip_prefix("-A ") {
                (rest, 1)
            } else {
                continue;
            };
            let chain = chain.split_whitespace().next().unwrap_or_default();
            have.entry(self.key(chain)).or_insert((0, chain)).0 += rule;
        }
        let gone = want.keys().filter(|k| !have.contains_key(k)).count();
        if gone > 0 {
            return Some(format!("{gone} of our {table} chains are gone"));
        }
        want.iter().find_map(|(k, n)| {
            let (found, chain) = have[k];
            (found < *n).then(|| format!("{table} chain {chain} holds {found} of our {n} rules"))
        })
    }
}

impl<R: CommandRunner + 'static> IptablesProxier<R> {
    pub fn new(runner: R, cfg: IptablesConfig) -> Self {
        let tools = Tools::for_family(cfg.family);
        IptablesProxier {
            runner: Arc::new(runner),
            cfg,
            tools,
            needs_full: true,
            known_chains: BTreeSet::new(),
            rule_counts: HashMap::new(),
            written: WrittenRules::default(),
            next_drift_check: None,
            nf_tables_variant: None,
            drift_listing: None,
            generation: 0,
        }
    }

    pub fn config(&self) -> &IptablesConfig {
        &self.cfg
    }

    fn ipt(&self, args: &[&str]) -> Result<kp_dataplane::CommandOutput, SyncError> {
        Ok(self.runner.run(&self.tools.iptables, args, None)?)
    }

    fn ensure_chain(&self, table: &str, chain: &str) -> Result<(), SyncError> {
        let out = self.ipt(&["-w", "5", "-t", table, "-N", chain])?;
        if out.success() || out.stderr.contains("exists") {
            Ok(())
        } else {
            Err(apply_error(&self.tools.iptables, &out.stderr, None))
        }
    }

    /// Ensures our chains exist and the built-in chains jump to them (prepended), as
    /// upstream does on full syncs.
    fn ensure_jumps(&self) -> Result<(), SyncError> {
        let mut jumps: Vec<Jump> = JUMPS.to_vec();
        if self.cfg.localhost_node_ports_active() {
            jumps.push(jump("filter", KUBE_FIREWALL, "INPUT", "", &[]));
            jumps.push(jump("filter", KUBE_FIREWALL, "OUTPUT", "", &[]));
        }
        for j in &jumps {
            let Jump {
                table, chain, from, ..
            } = j;
            self.ensure_chain(table, chain)?;
            let args = jump_args(j);
            let mut check: Vec<&str> = vec!["-w", "5", "-t", table, "-C", from];
            check.extend(args.iter().map(|s| s.as_str()));
            if self.ipt(&check)?.success() {
                continue;
            }
            let mut insert: Vec<&str> = vec!["-w", "5", "-t", table, "-I", from];
            insert.extend(args.iter().map(|s| s.as_str()));
            let out = self.ipt(&insert)?;
            if !out.success() {
                return Err(apply_error(&self.tools.iptables, &out.stderr, None));
            }
        }
        for table in ["mangle", "nat", "filter"] {
            self.ensure_chain(table, CANARY)?;
        }
        Ok(())
    }

    /// Compares the nat and filter tables with what we wrote (a deleted or flushed
    /// KUBE-SVC chain, say, which the canary does not see). Listing the tables takes about
    /// a second at 1k services with iptables-nft, so it runs on its own thread (the sync
    /// thread only starts it and reads the answer at the next check) and at most every 100x
    /// its duration (<= 1% of a core). A listing taken while a sync changed the rules is
    /// thrown away.
    fn drift_check(&mut self) -> Option<String> {
        if let Some(listing) = self.drift_listing.take() {
            if !listing.thread.is_finished() {
                self.drift_listing = Some(listing);
                return None;
            }
            let (tables, cost) = listing.thread.join().unwrap_or_default();
            self.next_drift_check =
                Some(Instant::now() + (cost * 100).max(Duration::from_millis(100)));
            if listing.generation != self.generation {
                return None;
            }
            return tables
                .iter()
                .find_map(|(table, text)| self.written.missing(table, text));
        }
        if self.next_drift_check.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let (runner, save) = (self.runner.clone(), self.tools.save.clone());
        let thread = std::thread::Builder::new()
            .name("iptables-drift".into())
            .spawn(move || {
                let started = Instant::now();
                let tables = ["nat", "filter"]
                    .into_iter()
                    .filter_map(|table| match runner.run(&save, &["-t", table], None) {
                        Ok(out) if out.success() => Some((table, out.stdout)),
                        _ => None,
                    })
                    .collect();
                (tables, started.elapsed())
            });
        match thread {
            Ok(thread) => {
                self.drift_listing = Some(DriftListing {
                    generation: self.generation,
                    thread,
                })
            }
            Err(e) => tracing::debug!(error = %e, "cannot start the drift listing"),
        }
        None
    }

    /// Per-service chains present in the kernel (full syncs only: it lists the table).
    fn existing_service_chains(&self) -> Result<BTreeSet<String>, SyncError> {
        let out = self.runner.run(&self.tools.save, &["-t", "nat"], None)?;
        if !out.success() {
            return Err(apply_error(&self.tools.save, &out.stderr, None));
        }
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| SERVICE_CHAIN_PREFIXES.iter().any(|p| c.starts_with(p)))
            .map(str::to_string)
            .collect())
    }

    fn nf_tables_variant(&mut self) -> bool {
        let (runner, iptables) = (&self.runner, &self.tools.iptables);
        *self.nf_tables_variant.get_or_insert_with(|| {
            let variant = runner
                .run(iptables, &["--version"], None)
                .is_ok_and(|out| out.stdout.contains("nf_tables"));
            tracing::debug!(iptables, nf_tables = variant, "iptables variant");
            variant
        })
    }

    fn restore(&self, text: &str) -> Result<(), SyncError> {
        // Its stdout is the `-S` listing of a full sync (megabytes after a restart).
        let out = self.runner.run_discarding_stdout(
            &self.tools.restore,
            &["-w", "5", "-W", "100000", "--noflush", "--counters"],
            Some(text.as_bytes()),
        )?;
        if out.success() {
            Ok(())
        } else {
            Err(apply_error(&self.tools.restore, &out.stderr, Some(text)))
        }
    }
}

/// Turns a tool's stderr into an error, quoting the input line it names (`line N`).
fn apply_error(tool: &str, stderr: &str, input: Option<&str>) -> SyncError {
    let message = kp_dataplane::summarize_stderr(stderr);
    let line = input.and_then(|text| {
        let idx = stderr.find("line ")?;
        let n: usize = stderr[idx + 5..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .ok()?;
        text.lines().nth(n.checked_sub(1)?).map(str::to_string)
    });
    let tool = if tool.contains("restore") {
        Applier::IptablesRestore
    } else if tool.contains("save") {
        Applier::IptablesSave
    } else {
        Applier::Iptables
    };
    SyncError::Apply {
        tool,
        message,
        line,
    }
}

impl<R: CommandRunner + 'static> Dataplane for IptablesProxier<R> {
    fn mode(&self) -> kp_dataplane::Mode {
        kp_dataplane::Mode::Iptables
    }

    fn applier(&self) -> Applier {
        Applier::IptablesRestore
    }

    fn required_sysctls(&self) -> Vec<(&'static str, i64)> {
        // Localhost NodePorts are DNATed from 127/8, which the kernel routes only so.
        if self.cfg.localhost_node_ports_active() {
            vec![("net/ipv4/conf/all/route_localnet", 1)]
        } else {
            Vec::new()
        }
    }

    fn family(&self) -> IpFamily {
        self.cfg.family
    }

    fn sync(&mut self, input: &SyncInput<'_>) -> Result<SyncReport, SyncError> {
        let full = input.force_full || self.needs_full;
        // Until this sync succeeds, the next one must be full.
        self.needs_full = true;
        if full {
            self.ensure_jumps()?;
            let existing = self.existing_service_chains()?;
            self.known_chains.extend(existing);
        }
        let changed = (!full).then_some(&input.changes.services);
        let nft_restore = self.nf_tables_variant();
        let rendered = render(
            &self.cfg,
            input.state,
            input.node,
            changed,
            &self.known_chains,
            &self.rule_counts,
            nft_restore,
        );
        let applying = std::time::Instant::now();
        self.generation += 1;
        self.restore(&rendered.text)?;
        let apply_time = applying.elapsed();
        if full {
            // A full restore declares every chain we own: start the bookkeeping afresh.
            self.written.tables.clear();
        }
        self.written.apply(&rendered.text);
        self.needs_full = false;
        self.known_chains = rendered.active_nat_chains;
        self.rule_counts = rendered.service_rule_counts;
        Ok(SyncReport {
            full,
            rules_total: rendered.rules_total,
            rules_written: rendered.rules_written,
            no_local_endpoints_internal: rendered.no_local_endpoints_internal,
            no_local_endpoints_external: rendered.no_local_endpoints_external,
            health_checks: rendered.health_checks,
            warnings: rendered.warnings,
            bytes_written: rendered.text.len(),
            apply_time,
        })
    }

    fn needs_full_sync(&mut self) -> bool {
        if self.needs_full {
            return true;
        }
        for table in ["mangle", "nat", "filter"] {
            match self.ipt(&["-w", "5", "-t", table, "-S", CANARY]) {
                Ok(out) if out.success() => {}
                Ok(out) if out.status == RESOURCE_PROBLEM => {
                    // The xtables lock is held by someone else: no answer, not a flush.
                    tracing::info!(table, error = out.stderr.trim(), "canary check skipped");
                    return false;
                }
                _ => {
                    tracing::warn!(
                        table,
                        "canary chain missing: iptables was flushed, forcing a full sync"
                    );
                    self.needs_full = true;
                    return true;
                }
            }
        }
        // `iptables -F` keeps the (empty) canary chains but drops our jumps: check the
        // two that carry all service traffic, which upstream's canary alone misses.
        for j in JUMPS
            .iter()
            .filter(|j| j.table == "nat" && j.chain == KUBE_SERVICES)
        {
            let args = jump_args(j);
            let mut check: Vec<&str> = vec!["-w", "5", "-t", j.table, "-C", j.from];
            check.extend(args.iter().map(|s| s.as_str()));
            let out = self.ipt(&check);
            if out.as_ref().is_ok_and(|o| o.status == RESOURCE_PROBLEM) {
                return false;
            }
            if !out.is_ok_and(|o| o.success()) {
                tracing::warn!(
                    chain = j.from,
                    "jump to KUBE-SERVICES missing: rules were flushed, forcing a full sync"
                );
                self.needs_full = true;
                return true;
            }
        }
        if let Some(what) = self.drift_check() {
            tracing::warn!(found = %what, "our rules were changed by someone else, forcing a full sync");
            self.needs_full = true;
            return true;
        }
        false
    }

    fn is_installed(&mut self) -> bool {
        // Every run of this mode makes the canary chains (IPVS mode, which shares
        // KUBE-SERVICES and others, makes none).
        ["mangle", "nat"].iter().any(|table| {
            self.ipt(&["-w", "5", "-t", table, "-S", CANARY])
                .is_ok_and(|o| o.success())
        })
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        let mut jumps: Vec<Jump> = JUMPS.to_vec();
        // KUBE-FIREWALL is kubelet's chain too: its jumps go only if the chain holds
        // nothing but our localnet drop (or nothing).
        let firewall = self.ipt(&["-w", "5", "-t", "filter", "-S", KUBE_FIREWALL])?;
        let firewall_is_ours = !firewall.success()
            || firewall
                .stdout
                .lines()
                .filter(|l| l.starts_with("-A "))
                .all(|l| l.contains("block incoming localnet connections"));
        if firewall_is_ours {
            jumps.push(jump("filter", KUBE_FIREWALL, "INPUT", "", &[]));
            jumps.push(jump("filter", KUBE_FIREWALL, "OUTPUT", "", &[]));
        }
        for j in &jumps {
            let Jump { table, from, .. } = j;
            let args = jump_args(j);
            // Delete every copy of the jump.
            loop {
                let mut del: Vec<&str> = vec!["-w", "5", "-t", table, "-D", from];
                del.extend(args.iter().map(|s| s.as_str()));
                if !self.ipt(&del)?.success() {
                    break;
                }
            }
        }
        // Flush then delete our chains, per table, in one restore each.
        let nat_chains: BTreeSet<String> = self
            .existing_service_chains()
            .unwrap_or_default()
            .into_iter()
            .chain(
                [
                    KUBE_SERVICES,
                    KUBE_NODEPORTS,
                    KUBE_POSTROUTING,
                    KUBE_MARK_MASQ,
                    CANARY,
                ]
                .map(String::from),
            )
            .collect();
        let filter_chains = [
            KUBE_SERVICES,
            KUBE_EXTERNAL_SERVICES,
            KUBE_NODEPORTS,
            KUBE_FORWARD,
            KUBE_PROXY_FIREWALL,
            CANARY,
        ];
        let mut text = String::from("*filter\n");
        for c in filter_chains {
            text.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in filter_chains {
            text.push_str(&format!("-X {c}\n"));
        }
        text.push_str("COMMIT\n*nat\n");
        for c in &nat_chains {
            text.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in &nat_chains {
            text.push_str(&format!("-X {c}\n"));
        }
        text.push_str("COMMIT\n*mangle\n");
        text.push_str(&format!(":{CANARY} - [0:0]\n-X {CANARY}\nCOMMIT\n"));
        self.restore(&text)?;
        if firewall_is_ours
            && self
                .restore(&format!(
                    "*filter\n:{KUBE_FIREWALL} - [0:0]\n-X {KUBE_FIREWALL}\nCOMMIT\n"
                ))
                .is_err()
        {
            tracing::info!("KUBE-FIREWALL is still referenced by another component; left in place");
        }
        self.known_chains.clear();
        self.needs_full = true;
        Ok(())
    }
}

#[cfg(test)]
#[path = "proxier_tests.rs"]
mod tests;
