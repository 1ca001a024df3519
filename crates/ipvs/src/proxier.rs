//! The kernel-facing part of IPVS mode. One dump of IPVS, kube-ipvs0 and the ipsets on a
//! full sync; after that the proxier diffs the plan against what it wrote and applies
//! only the difference: ipsets first, then the iptables rules, then IPVS, then the VIPs
//! (so no VIP answers before its virtual server and SNAT rules exist).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use kp_dataplane::{
    Applier, CommandRunner, Dataplane, DataplaneConfig, Mode, RuleKind, SyncError, SyncInput,
    SyncReport,
};
use kp_model::{IpFamily, Protocol};

use crate::ipset::{self, Set, SetContents};
use crate::kernel::{IpvsKernel, KernelRs, KernelVs, Op};
use crate::link::VipDevice;
use crate::plan::{FLAG_HASHED, Plan, PlanInput, VsKey, plan};
use crate::rules::{self, JUMPS};

/// The dummy device holding the VIPs.
pub const DEVICE: &str = "kube-ipvs0";
/// Where the scheduler probe puts its throw-away virtual server (TEST-NET-2, as upstream).
const PROBE_VS: &str = "198.51.100.0";

/// Opens the kernel's IPVS (or says why it cannot).
pub type KernelOpener = Box<dyn Fn() -> Result<Box<dyn IpvsKernel>, String> + Send>;

/// A virtual server as we last wrote it, with its real servers' weights.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AppliedVs {
    vs: KernelVs,
    reals: BTreeMap<SocketAddr, i32>,
}

/// IPVS mode for one IP family.
pub struct IpvsProxier<R: CommandRunner> {
    runner: R,
    cfg: DataplaneConfig,
    open: KernelOpener,
    kernel: Option<Box<dyn IpvsKernel>>,
    device: Box<dyn VipDevice>,
    iptables_restore: &'static str,
    iptables: &'static str,
    needs_full: bool,
    timeouts_set: bool,
    applied: BTreeMap<VsKey, AppliedVs>,
    bound: BTreeSet<IpAddr>,
    sets: Option<SetContents>,
    rules: Option<String>,
    /// Real servers at weight 0, and since when.
    draining: BTreeMap<(VsKey, SocketAddr), Instant>,
}

fn apply_err(tool: Applier, message: impl Into<String>) -> SyncError {
    SyncError::Apply {
        tool,
        message: message.into(),
        line: None,
    }
}

impl<R: CommandRunner> IpvsProxier<R> {
    pub fn new(
        runner: R,
        cfg: DataplaneConfig,
        open: KernelOpener,
        device: Box<dyn VipDevice>,
    ) -> Self {
        let (iptables, iptables_restore) = match cfg.family {
            IpFamily::V4 => ("iptables", "iptables-restore"),
            IpFamily::V6 => ("ip6tables", "ip6tables-restore"),
        };
        IpvsProxier {
            runner,
            cfg,
            open,
            kernel: None,
            device,
            iptables,
            iptables_restore,
            needs_full: true,
            timeouts_set: false,
            applied: BTreeMap::new(),
            bound: BTreeSet::new(),
            sets: None,
            rules: None,
            draining: BTreeMap::new(),
        }
    }

    fn kernel(&mut self) -> Result<&mut Box<dyn IpvsKernel>, SyncError> {
        if self.kernel.is_none() {
            let k = (self.open)().map_err(|e| apply_err(Applier::IpvsNetlink, e))?;
            self.kernel = Some(k);
        }
        Ok(self.kernel.as_mut().expect("opened above"))
    }

    fn run(
        &self,
        tool: Applier,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, SyncError> {
        let out = self.runner.run(program, args, stdin.map(str::as_bytes))?;
        if out.success() {
            Ok(out.stdout)
        } else {
            let message = out.stderr_summary();
            Err(apply_err(
                tool,
                format!("{program} {}: {message}", args.join(" ")),
            ))
        }
    }

    fn device_exists(&mut self) -> bool {
        self.device.exists().unwrap_or(false)
    }

    fn ensure_device(&mut self) -> Result<(), SyncError> {
        let dev = |e: String| apply_err(Applier::Rtnetlink, e);
        if !self.device.exists().map_err(dev)? {
            self.device.create().map_err(dev)?;
            tracing::info!(device = DEVICE, "created the VIP device");
        }
        Ok(())
    }

    /// The addresses of our family on kube-ipvs0.
    fn read_bound(&mut self) -> Result<BTreeSet<IpAddr>, SyncError> {
        self.device
            .addresses(self.cfg.family)
            .map_err(|e| apply_err(Applier::Rtnetlink, e))
    }

    fn read_sets(&self) -> Result<SetContents, SyncError> {
        let out = self.run(Applier::Ipset, "ipset", &["save"], None)?;
        Ok(ipset::parse_save(&out, self.cfg.family))
    }

    /// Our family's virtual servers and their real servers, from the kernel.
    fn read_ipvs(&mut self) -> Result<BTreeMap<VsKey, AppliedVs>, SyncError> {
        let family = self.cfg.family;
        let k = self.kernel()?;
        let mut out = BTreeMap::new();
        let all = k.virtual_servers().map_err(|e| {
            apply_err(
                Applier::IpvsNetlink,
                format!("listing virtual servers: {e}"),
            )
        })?;
        for vs in all
            .into_iter()
            .filter(|v| IpFamily::of(&v.key.addr) == family)
        {
            let reals = k
                .real_servers(&vs.key)
                .map_err(|e| {
                    apply_err(
                        Applier::IpvsNetlink,
                        format!("listing real servers of {}: {e}", vs.key),
                    )
                })?
                .into_iter()
                .map(|r| (r.addr, r.weight))
                .collect();
            out.insert(vs.key, AppliedVs { vs, reals });
        }
        Ok(out)
    }

    fn excluded(&self, ip: &IpAddr) -> bool {
        self.cfg.ipvs.exclude_cidrs.iter().any(|c| c.contains(ip))
    }

    /// Inserts the jumps from the built-in chains that are missing: one `iptables-save`
    /// per table to look, one restore to insert (a process costs ~0.3 s in an emulated
    /// guest; nine `-C` and nine `-I` cost seconds).
    fn ensure_jumps(&self) -> Result<(), SyncError> {
        let save = if self.cfg.family == IpFamily::V4 {
            "iptables-save"
        } else {
            "ip6tables-save"
        };
        let mut text = String::new();
        let all = self.run(Applier::IptablesSave, save, &[], None)?;
        for table in ["nat", "filter"] {
            let listed = table_section(&all, table);
            let missing: Vec<_> = JUMPS
                .iter()
                .filter(|j| j.table == table)
                .filter(|j| !listed.lines().any(|l| is_jump_line(l, j)))
                .collect();
            if missing.is_empty() {
                continue;
            }
            text.push_str(&format!("*{table}\n"));
            for j in missing {
                text.push_str(&format!(
                    "-I {} 1 -m comment --comment \"{}\" -j {}\n",
                    j.from, j.comment, j.to
                ));
            }
            text.push_str("COMMIT\n");
        }
        if !text.is_empty() {
            self.run(
                Applier::IptablesRestore,
                self.iptables_restore,
                &["-w", "5", "--noflush"],
                Some(&text),
            )?;
        }
        Ok(())
    }

    /// The IPVS operations turning `applied` into `plan`, and the drains they start.
    fn diff(&self, plan: &Plan, full: bool, now: Instant) -> (Vec<Op>, Vec<(VsKey, SocketAddr)>) {
        let mut ops = Vec::new();
        let mut drains = Vec::new();
        for (key, spec) in &plan.virtual_servers {
            let want = KernelVs {
                key: *key,
                scheduler: spec.scheduler.clone(),
                flags: spec.flags,
                timeout: spec.timeout,
            };
            let have = self.applied.get(key);
            match have {
                None => ops.push(Op::AddVs(want)),
                Some(a) if !same_vs(&a.vs, &want) => ops.push(Op::UpdateVs(want)),
                Some(_) => {}
            }
            let have_reals = have.map(|a| &a.reals);
            for rs in &spec.real_servers {
                match have_reals.and_then(|r| r.get(rs)) {
                    None => ops.push(Op::AddRs(*key, *rs, 1)),
                    // Back from draining, or a weight someone (or an older run) changed.
                    Some(&w) if w != 1 => ops.push(Op::UpdateRs(*key, *rs, 1)),
                    Some(_) => {}
                }
            }
            if let Some(reals) = have_reals {
                for (rs, &w) in reals {
                    if spec.real_servers.contains(rs) {
                        continue;
                    }
                    if key.protocol != Protocol::Tcp {
                        // UDP and SCTP have no end of connection to wait for; with
                        // expire_nodest_conn their flows move on at the next packet.
                        ops.push(Op::DelRs(*key, *rs));
                    } else if w != 0 {
                        ops.push(Op::UpdateRs(*key, *rs, 0));
                        drains.push((*key, *rs));
                    } else if full && !self.draining.contains_key(&(*key, *rs)) {
                        // Found at weight 0 after a restart: drain it from now.
                        drains.push((*key, *rs));
                    }
                }
            }
        }
        for (key, a) in &self.applied {
            if plan.virtual_servers.contains_key(key) || self.excluded(&key.addr) {
                continue;
            }
            let _ = (a, now);
            ops.push(Op::DelVs(*key));
        }
        (ops, drains)
    }

    /// Records a successful op in `applied`.
    fn note(&mut self, op: &Op) {
        match op {
            Op::AddVs(v) | Op::UpdateVs(v) => {
                let e = self.applied.entry(v.key).or_insert_with(|| AppliedVs {
                    vs: v.clone(),
                    reals: BTreeMap::new(),
                });
                e.vs = v.clone();
            }
            Op::DelVs(k) => {
                self.applied.remove(k);
                self.draining.retain(|(vk, _), _| vk != k);
            }
            Op::AddRs(k, rs, w) | Op::UpdateRs(k, rs, w) => {
                if let Some(a) = self.applied.get_mut(k) {
                    a.reals.insert(*rs, *w);
                }
                if *w != 0 {
                    self.draining.remove(&(*k, *rs));
                }
            }
            Op::DelRs(k, rs) => {
                if let Some(a) = self.applied.get_mut(k) {
                    a.reals.remove(rs);
                }
                self.draining.remove(&(*k, *rs));
            }
        }
    }

    /// Deletes drained real servers: no connection left, or past the drain bound.
    fn finish_drains(&mut self, now: Instant) -> Result<usize, SyncError> {
        if self.draining.is_empty() {
            return Ok(0);
        }
        let cap = self.cfg.ipvs.drain_timeout;
        let vss: BTreeSet<VsKey> = self.draining.keys().map(|(k, _)| *k).collect();
        let mut ops = Vec::new();
        for vs in vss {
            let reals: BTreeMap<SocketAddr, KernelRs> = match self.kernel()?.real_servers(&vs) {
                Ok(r) => r.into_iter().map(|r| (r.addr, r)).collect(),
                Err(_) => {
                    // The virtual server is gone: nothing left to drain.
                    self.draining.retain(|(k, _), _| *k != vs);
                    continue;
                }
            };
            let done: Vec<SocketAddr> = self
                .draining
                .iter()
                .filter(|((k, _), _)| *k == vs)
                .filter(|((_, rs), since)| match reals.get(rs) {
                    None => true,
                    Some(r) if r.weight != 0 => true,
                    Some(r) => {
                        r.active_conns + r.inactive_conns == 0 || now.duration_since(**since) >= cap
                    }
                })
                .map(|((_, rs), _)| *rs)
                .collect();
            for rs in done {
                match reals.get(&rs) {
                    Some(r) if r.weight == 0 => {
                        if now.duration_since(self.draining[&(vs, rs)]) >= cap {
                            tracing::info!(virtual_server = %vs, real_server = %rs, after = ?cap, connections = r.active_conns + r.inactive_conns, "drain bound reached; deleting the real server");
                        }
                        ops.push(Op::DelRs(vs, rs));
                    }
                    _ => {
                        self.draining.remove(&(vs, rs));
                    }
                }
            }
        }
        let failures = self.kernel()?.apply(&ops);
        for (i, op) in ops.iter().enumerate() {
            if !failures.iter().any(|(f, _)| *f == i) {
                self.note(op);
            }
        }
        Ok(ops.len() - failures.len())
    }

    fn node_addresses(&self, local: &[IpAddr]) -> BTreeSet<IpAddr> {
        local
            .iter()
            .filter(|ip| IpFamily::of(ip) == self.cfg.family)
            .filter(|ip| !self.bound.contains(ip))
            .filter(|ip| !ip.is_loopback() && !is_v6_link_local(ip))
            .copied()
            .collect()
    }

    /// The bound the proxier uses for draining (for tests and logs).
    pub fn drain_timeout(&self) -> Duration {
        self.cfg.ipvs.drain_timeout
    }

    /// The periodic check without the drift part (the host of the unit tests has no
    /// kube-ipvs0): finishes drains.
    #[cfg(test)]
    fn needs_full_sync_without_drift_for_tests(&mut self) -> bool {
        if let Err(e) = self.finish_drains(Instant::now()) {
            panic!("{e}");
        }
        self.needs_full
    }

    /// Real servers now draining at weight 0.
    pub fn draining(&self) -> Vec<(VsKey, SocketAddr)> {
        self.draining.keys().copied().collect()
    }
}

/// The lines of `table` in `iptables-save` output.
fn table_section<'a>(save: &'a str, table: &str) -> &'a str {
    let head = format!("*{table}\n");
    let Some(start) = save.find(&head) else {
        return "";
    };
    let rest = &save[start..];
    match rest.find("\nCOMMIT") {
        Some(end) => &rest[..end],
        None => rest,
    }
}

/// Whether an `iptables-save` line is jump `j` (`-A FROM -m comment --comment "C" -j TO`).
fn is_jump_line(line: &str, j: &rules::Jump) -> bool {
    line.starts_with(&format!("-A {} ", j.from))
        && line.ends_with(&format!("-j {}", j.to))
        && line.contains(j.comment)
}

fn is_v6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// Same virtual server settings (the kernel adds the hashed flag on its own).
fn same_vs(a: &KernelVs, b: &KernelVs) -> bool {
    a.scheduler == b.scheduler
        && (a.flags & !FLAG_HASHED) == (b.flags & !FLAG_HASHED)
        && a.timeout == b.timeout
}

impl<R: CommandRunner + 'static> Dataplane for IpvsProxier<R> {
    fn mode(&self) -> Mode {
        Mode::Ipvs
    }

    fn family(&self) -> IpFamily {
        self.cfg.family
    }

    fn applier(&self) -> Applier {
        Applier::IpvsNetlink
    }

    fn required_sysctls(&self) -> Vec<(&'static str, i64)> {
        let mut s = vec![
            ("net/ipv4/vs/conntrack", 1),
            ("net/ipv4/vs/expire_nodest_conn", 1),
            ("net/ipv4/vs/expire_quiescent_template", 1),
            ("net/ipv4/ip_forward", 1),
        ];
        if conn_reuse_mode_needs_zero(&kernel_release()) {
            s.push(("net/ipv4/vs/conn_reuse_mode", 0));
        }
        if self.cfg.ipvs.strict_arp {
            s.push(("net/ipv4/conf/all/arp_ignore", 1));
            s.push(("net/ipv4/conf/all/arp_announce", 2));
        }
        s
    }

    fn preflight(&mut self) -> Result<(), String> {
        let scheduler = self.cfg.ipvs.scheduler.clone();
        let k = self
            .kernel()
            .map_err(|e| format!("IPVS mode needs the kernel's IPVS (ip_vs): {e}"))?;
        let existing = k
            .virtual_servers()
            .map_err(|e| format!("cannot list IPVS virtual servers: {e}"))?;
        if !existing.iter().any(|v| v.scheduler == scheduler) {
            let probe = KernelVs {
                key: VsKey {
                    addr: PROBE_VS.parse().expect("literal"),
                    protocol: Protocol::Tcp,
                    port: 20000,
                },
                scheduler: scheduler.clone(),
                flags: 0,
                timeout: 0,
            };
            let key = probe.key;
            if let Some((_, e)) = k.apply(&[Op::AddVs(probe)]).into_iter().next() {
                return Err(format!(
                    "IPVS scheduler {scheduler:?} is not available in this kernel (is ip_vs_{scheduler} built?): {e}"
                ));
            }
            let _ = k.apply(&[Op::DelVs(key)]);
        }
        let out = self
            .runner
            .run("ipset", &["version"], None)
            .map_err(|e| format!("IPVS mode needs the ipset tool: {e}"))?;
        if !out.success() {
            return Err(format!("ipset version failed: {}", out.stderr.trim()));
        }
        Ok(())
    }

    fn sync(&mut self, input: &SyncInput<'_>) -> Result<SyncReport, SyncError> {
        let full = input.force_full || self.needs_full;
        self.needs_full = true;
        let now = Instant::now();
        let applying = Instant::now();
        if full {
            self.ensure_device()?;
            self.bound = self.read_bound()?;
            self.sets = Some(self.read_sets()?);
            self.applied = self.read_ipvs()?;
            self.rules = None;
            let o = &self.cfg.ipvs;
            let (tcp, fin, udp) = (o.tcp_timeout, o.tcp_fin_timeout, o.udp_timeout);
            if !self.timeouts_set && (tcp > 0 || fin > 0 || udp > 0) {
                if let Err(e) = self.kernel()?.set_timeouts(tcp, fin, udp) {
                    tracing::warn!(error = %e, "cannot set the IPVS timeouts");
                }
                self.timeouts_set = true;
            }
        }
        let node_addresses = self.node_addresses(&input.node.local_addresses);
        let all: Vec<IpAddr> = node_addresses.iter().copied().collect();
        let node_port_ips: Vec<IpAddr> = if self.cfg.node_port_addresses.match_all() {
            all
        } else {
            self.cfg.node_port_addresses.filter(&all)
        };
        let plan = plan(
            input.state,
            &PlanInput {
                family: self.cfg.family,
                scheduler: &self.cfg.ipvs.scheduler,
                topology: &input.node.topology,
                node_ips: &input.node.node_ips,
                node_addresses: &node_addresses,
                node_port_ips: &node_port_ips,
            },
        );
        let mut written = BTreeMap::new();

        // 1. ipsets: what the rules match must exist before the rules.
        let (script, set_ops) =
            ipset::restore_script(self.cfg.family, self.sets.as_ref(), &plan.sets);
        if !script.is_empty()
            && let Err(e) = self.run(
                Applier::Ipset,
                "ipset",
                &["restore", "-exist"],
                Some(&script),
            )
        {
            // Unknown what got in: read the sets back on the (full) retry.
            self.sets = None;
            return Err(e);
        }
        self.sets = Some(plan.sets.clone());
        written.insert(RuleKind::IpsetMembers, set_ops);

        tracing::debug!(family = self.cfg.family.k8s_name(), full, set_ops, elapsed = ?applying.elapsed(), "ipsets written");
        // 2. iptables: the SNAT and filter rules before any VIP answers.
        let rules = rules::render(&self.cfg, &plan.sets, &plan.lb_no_node_access);
        let rules_changed = self.rules.as_deref() != Some(rules.text.as_str());
        if rules_changed {
            let out = self.runner.run_discarding_stdout(
                self.iptables_restore,
                &["-w", "5", "-W", "100000", "--noflush", "--counters"],
                Some(rules.text.as_bytes()),
            )?;
            if !out.success() {
                return Err(SyncError::Apply {
                    tool: Applier::IptablesRestore,
                    message: out.stderr_summary(),
                    line: None,
                });
            }
            if full {
                self.ensure_jumps()?;
            }
            self.rules = Some(rules.text.clone());
            written.insert(RuleKind::IptablesNat, rules.nat_rules);
            written.insert(RuleKind::IptablesFilter, rules.filter_rules);
        }

        tracing::debug!(family = self.cfg.family.k8s_name(), elapsed = ?applying.elapsed(), "rules written");
        // 3. IPVS.
        let (ops, drains) = self.diff(&plan, full, now);
        tracing::debug!(
            family = self.cfg.family.k8s_name(),
            ops = ops.len(),
            "applying IPVS changes"
        );
        let failures = self.kernel()?.apply(&ops);
        for (i, op) in ops.iter().enumerate() {
            if !failures.iter().any(|(f, _)| *f == i) {
                self.note(op);
            }
        }
        for d in drains {
            self.draining.entry(d).or_insert(now);
        }
        let vs_ops = ops
            .iter()
            .filter(|o| matches!(o, Op::AddVs(_) | Op::UpdateVs(_) | Op::DelVs(_)))
            .count();
        written.insert(RuleKind::IpvsVirtualServers, vs_ops);
        written.insert(RuleKind::IpvsRealServers, ops.len() - vs_ops);
        if let Some((i, msg)) = failures.first() {
            for (i, msg) in &failures {
                tracing::error!(op = %ops[*i], error = %msg, "IPVS change failed");
            }
            return Err(apply_err(
                Applier::IpvsNetlink,
                format!(
                    "{} of {} IPVS changes failed; first: {}: {msg}",
                    failures.len(),
                    ops.len(),
                    ops[*i]
                ),
            ));
        }

        tracing::debug!(family = self.cfg.family.k8s_name(), elapsed = ?applying.elapsed(), "IPVS changes applied");
        // 4. VIPs: bind new ones now that their virtual servers exist; unbind stale ones.
        let add: Vec<IpAddr> = plan.bound.difference(&self.bound).copied().collect();
        let del: Vec<IpAddr> = self.bound.difference(&plan.bound).copied().collect();
        if !add.is_empty() || !del.is_empty() {
            let failures = self.device.change(&add, &del);
            if let Some(first) = failures.first() {
                // The (full) retry reads back what is there.
                return Err(apply_err(
                    Applier::Rtnetlink,
                    format!(
                        "{} of {} VIP changes failed; first: {first}",
                        failures.len(),
                        add.len() + del.len()
                    ),
                ));
            }
            self.bound = plan.bound.clone();
        }
        let vip_changes = add.len() + del.len();

        // 5. Drains that ended.
        self.finish_drains(now)?;

        self.needs_full = false;
        let real_total: usize = self.applied.values().map(|a| a.reals.len()).sum();
        let mut total = BTreeMap::new();
        total.insert(RuleKind::IpvsVirtualServers, self.applied.len());
        total.insert(RuleKind::IpvsRealServers, real_total);
        total.insert(
            RuleKind::IpsetMembers,
            plan.sets.values().map(BTreeSet::len).sum(),
        );
        total.insert(RuleKind::IptablesNat, rules.nat_rules);
        total.insert(RuleKind::IptablesFilter, rules.filter_rules);
        Ok(SyncReport {
            full,
            rules_total: total,
            rules_written: written,
            no_local_endpoints_internal: plan.no_local_endpoints_internal,
            no_local_endpoints_external: plan.no_local_endpoints_external,
            health_checks: plan.health_checks,
            warnings: plan.warnings,
            // ipset script, rules text when rewritten, ~40 bytes per VIP message.
            bytes_written: script.len()
                + if rules_changed { rules.text.len() } else { 0 }
                + vip_changes * 40,
            apply_time: applying.elapsed(),
        })
    }

    fn needs_full_sync(&mut self) -> bool {
        if self.needs_full {
            return true;
        }
        let drift = self.drift();
        if let Some(what) = drift {
            tracing::warn!(found = %what, "IPVS-mode objects were changed by someone else, forcing a full sync");
            self.needs_full = true;
            return true;
        }
        if let Err(e) = self.finish_drains(Instant::now()) {
            tracing::warn!(error = %e, "checking draining real servers");
        }
        false
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        let family = self.cfg.family;
        // IPVS: our family's virtual servers, except the excluded ones.
        if let Ok(k) = self.kernel() {
            let all = k.virtual_servers().unwrap_or_default();
            let ops: Vec<Op> = all
                .into_iter()
                .filter(|v| IpFamily::of(&v.key.addr) == family)
                .filter(|v| {
                    !self
                        .cfg
                        .ipvs
                        .exclude_cidrs
                        .iter()
                        .any(|c| c.contains(&v.key.addr))
                })
                .map(|v| Op::DelVs(v.key))
                .collect();
            let failures = self.kernel()?.apply(&ops);
            if let Some((i, e)) = failures.first() {
                return Err(apply_err(Applier::IpvsNetlink, format!("{}: {e}", ops[*i])));
            }
        }
        self.device
            .delete()
            .map_err(|e| apply_err(Applier::Rtnetlink, e))?;
        // iptables: jumps, then our chains (sets are referenced until then).
        for j in JUMPS {
            let args = j.args();
            loop {
                let mut del = vec!["-w", "5", "-t", j.table, "-D", j.from];
                del.extend(&args);
                match self.runner.run(self.iptables, &del, None) {
                    Ok(out) if out.success() => continue,
                    _ => break,
                }
            }
        }
        let text = rules::cleanup_text();
        let out = self.runner.run(
            self.iptables_restore,
            &["-w", "5", "--noflush"],
            Some(text.as_bytes()),
        );
        if let Ok(out) = &out
            && !out.success()
        {
            tracing::debug!(
                error = out.stderr.trim(),
                "IPVS-mode chains not all removed (some absent)"
            );
            // One by one, so a missing chain does not keep the others.
            for (table, chains) in [
                ("nat", &rules::NAT_CHAINS[..]),
                ("filter", &rules::FILTER_CHAINS[..]),
            ] {
                for c in chains {
                    let _ =
                        self.runner
                            .run(self.iptables, &["-w", "5", "-t", table, "-F", c], None);
                }
                for c in chains {
                    let _ =
                        self.runner
                            .run(self.iptables, &["-w", "5", "-t", table, "-X", c], None);
                }
            }
        }
        // ipsets.
        let mut destroy = String::new();
        if let Ok(save) = self.runner.run("ipset", &["save"], None) {
            let present = ipset::parse_save(&save.stdout, family);
            for set in Set::ALL {
                if present.contains_key(&set) {
                    destroy.push_str(&format!("destroy {}\n", set.name(family)));
                }
            }
        }
        if !destroy.is_empty() {
            self.run(Applier::Ipset, "ipset", &["restore"], Some(&destroy))?;
        }
        self.applied.clear();
        self.bound.clear();
        self.sets = None;
        self.rules = None;
        self.draining.clear();
        self.needs_full = true;
        Ok(())
    }

    fn is_installed(&mut self) -> bool {
        if self.device_exists() {
            return true;
        }
        let chain = self.runner.run(
            self.iptables,
            &["-w", "5", "-t", "filter", "-S", rules::KUBE_IPVS_FILTER],
            None,
        );
        if chain.is_ok_and(|o| o.success()) {
            return true;
        }
        self.runner
            .run("ipset", &["list", "-n"], None)
            .is_ok_and(|o| {
                let ours: BTreeSet<String> =
                    Set::ALL.iter().map(|s| s.name(self.cfg.family)).collect();
                o.stdout.lines().any(|l| ours.contains(l.trim()))
            })
    }
}

impl<R: CommandRunner> IpvsProxier<R> {
    /// What someone else changed since our last sync, if anything: kube-ipvs0, its
    /// addresses, our chains and jumps, our sets, our virtual servers.
    fn drift(&mut self) -> Option<String> {
        if !self.device_exists() {
            return Some(format!("{DEVICE} is gone"));
        }
        match self.read_bound() {
            Ok(b) if b != self.bound => return Some(format!("addresses of {DEVICE} changed")),
            Err(e) => return Some(e.to_string()),
            _ => {}
        }
        // Our jumps and chains, from one listing.
        let save = if self.cfg.family == IpFamily::V4 {
            "iptables-save"
        } else {
            "ip6tables-save"
        };
        match self.runner.run(save, &[], None) {
            Ok(o) if o.success() => {
                for table in ["nat", "filter"] {
                    let listed = table_section(&o.stdout, table);
                    if let Some(j) = JUMPS
                        .iter()
                        .filter(|j| j.table == table)
                        .find(|j| !listed.lines().any(|l| is_jump_line(l, j)))
                    {
                        return Some(format!("jump {} -> {} is gone", j.from, j.to));
                    }
                }
                let filter_rules = format!("-A {} ", rules::KUBE_IPVS_FILTER);
                if !table_section(&o.stdout, "filter")
                    .lines()
                    .any(|l| l.starts_with(&filter_rules))
                {
                    return Some(format!("{} was flushed", rules::KUBE_IPVS_FILTER));
                }
            }
            // No answer (the xtables lock, a missing tool): not a flush.
            _ => return None,
        }
        // The sets by their headers only (`ipset list -t`: name and member count), not a
        // dump of every member each period (10k members: 0.1 s on a node, minutes in the
        // emulated guest).
        match self.runner.run("ipset", &["list", "-t"], None) {
            Ok(o) if o.success() => {
                let counts = ipset::parse_terse(&o.stdout, self.cfg.family);
                let want = self.sets.as_ref();
                for set in Set::ALL {
                    let expected = want.and_then(|w| w.get(&set)).map_or(0, BTreeSet::len);
                    match counts.get(&set) {
                        None => {
                            return Some(format!("ipset {} is gone", set.name(self.cfg.family)));
                        }
                        Some(n) if *n != expected => {
                            return Some(format!(
                                "ipset {} has {n} members, not {expected}",
                                set.name(self.cfg.family)
                            ));
                        }
                        _ => {}
                    }
                }
            }
            Ok(o) => return Some(format!("ipset list: {}", o.stderr.trim())),
            Err(e) => return Some(e.to_string()),
        }
        let family = self.cfg.family;
        let listed = match self.kernel().map(|k| k.virtual_servers()) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Some(format!("listing virtual servers: {e}")),
            Err(e) => return Some(e.to_string()),
        };
        let have: BTreeSet<VsKey> = listed
            .iter()
            .filter(|v| IpFamily::of(&v.key.addr) == family)
            .map(|v| v.key)
            .collect();
        let ours: BTreeSet<VsKey> = self.applied.keys().copied().collect();
        if let Some(k) = ours.difference(&have).next() {
            return Some(format!("virtual server {k} is gone"));
        }
        None
    }
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default()
}

/// Upstream's rule: conn_reuse_mode=0 only on kernels from 4.1 (where it exists) before
/// 5.9 (where its 1-second SYN stall is fixed); newer kernels keep their default.
pub fn conn_reuse_mode_needs_zero(release: &str) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (4, 1) && (major, minor) < (5, 9)
}

#[cfg(test)]
#[path = "proxier_tests.rs"]
mod tests;
