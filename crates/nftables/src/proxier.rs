//! nftables mode for one family: keeps the kernel's state in memory, sends only the
//! difference on partial syncs (never listing the table), and replaces the whole table in
//! one atomic transaction on full syncs.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use kp_dataplane::{CommandRunner, Dataplane, RuleKind, SyncError, SyncInput, SyncReport};
use kp_model::{IpFamily, NamespacedName, ProxyState, categorize_endpoints};

use crate::memory::*;
use crate::names::is_safe_name;
use crate::render::*;
use crate::txn::{ElementLines, Tx};

pub struct NftProxier<R: CommandRunner> {
    pub(crate) runner: R,
    pub(crate) cfg: NftConfig,
    pub(crate) needs_full: bool,
    /// What the kernel holds.
    pub(crate) mem: Memory,
    /// The node as the last sync saw it; every [`Kept`] refers to the one it was rendered
    /// with.
    pub(crate) node: Arc<NodeView>,
    /// Statements per transaction when a sync is split.
    pub(crate) transaction_statements: usize,
    /// Which service owns each NodePort (kp-model's first-claimant rule).
    pub(crate) node_ports: kp_model::NodePortClaims,
    /// Sends transactions over nfnetlink; `nft -f` reads the whole table into its cache
    /// first (about 1 s at 10k services). `None`: every transaction goes to `nft -f`.
    pub(crate) netlink: Option<kp_nftnl::NetlinkApplier>,
    /// Duration of the last successful apply (kernel time for netlink).
    pub(crate) last_apply: std::time::Duration,
}

/// Statements per transaction when a sync is split: about 40 ms of kernel work each
/// (measured: ~19 us per statement at 10k services), so nf_tables' commit lock is never
/// held long.
pub const TRANSACTION_STATEMENTS: usize = 2_000;

/// Which program applies transactions: `KUBE_PROXY_RS_NFT_APPLIER=nft` forces `nft -f`.
pub const APPLIER_ENV: &str = "KUBE_PROXY_RS_NFT_APPLIER";

impl<R: CommandRunner> NftProxier<R> {
    pub fn new(runner: R, cfg: NftConfig) -> Self {
        NftProxier {
            runner,
            cfg,
            needs_full: true,
            mem: Memory::default(),
            node: Arc::default(),
            transaction_statements: TRANSACTION_STATEMENTS,
            node_ports: kp_model::NodePortClaims::default(),
            netlink: None,
            last_apply: std::time::Duration::ZERO,
        }
    }

    /// Applies transactions over nfnetlink from now on (the socket belongs to the
    /// caller's network namespace), unless [`APPLIER_ENV`] says `nft` or the socket
    /// cannot be opened; then `nft -f` stays in charge.
    pub fn with_netlink_applier(mut self) -> Self {
        if std::env::var(APPLIER_ENV).is_ok_and(|v| v == "nft") {
            tracing::info!("{APPLIER_ENV}=nft: transactions go through nft -f");
            return self;
        }
        match kp_nftnl::NetlinkApplier::open() {
            Ok(a) => self.netlink = Some(a),
            Err(e) => tracing::warn!(error = %e, "nfnetlink socket unavailable; using nft -f"),
        }
        self
    }

    /// Statements per transaction when a sync is split (default
    /// [`TRANSACTION_STATEMENTS`]).
    pub fn with_transaction_statements(mut self, n: usize) -> Self {
        self.transaction_statements = n.max(1);
        self
    }

    /// Renders `svc` from `state` (see [`NftProxier::prepare`]). Returns the objects and
    /// what to keep to render them again.
    fn render(
        &mut self,
        state: &ProxyState,
        svc: &NamespacedName,
        warnings: &mut Vec<String>,
    ) -> (ServiceObjects, Kept) {
        let kept = self.prepare(state, svc, warnings);
        let o = self.render_checked(svc, &kept, warnings);
        (o, kept)
    }

    /// `render_kept`, with unusable names warned about and the service left out.
    fn render_checked(
        &self,
        svc: &NamespacedName,
        kept: &Kept,
        warnings: &mut Vec<String>,
    ) -> ServiceObjects {
        match self.render_kept(kept) {
            Ok(o) => o,
            Err(bad) => {
                warnings.push(format!(
                    "service {svc}: unusable object names {bad:?}; service skipped"
                ));
                ServiceObjects::default()
            }
        }
    }

    /// What rendering `svc` needs, its NodePorts claimed (first claimant wins; a clash is
    /// warned about and the later service's NodePort rules are left out).
    fn prepare(
        &mut self,
        state: &ProxyState,
        svc: &NamespacedName,
        warnings: &mut Vec<String>,
    ) -> Kept {
        self.node_ports.release(svc);
        let ports = ports_of(state, svc);
        let skipped = self
            .node_ports
            .claim(svc, ports.iter().map(|(p, _)| &**p), warnings);
        Kept {
            ports,
            node: self.node.clone(),
            skipped_node_ports: skipped.into_boxed_slice(),
        }
    }

    /// The objects of one service (all its ports merged); pure, so rendering a [`Kept`]
    /// again gives what the kernel got. `Err`: object names that cannot be used (the
    /// service is skipped).
    fn render_kept(&self, kept: &Kept) -> Result<ServiceObjects, Vec<String>> {
        let mut merged = ServiceObjects::default();
        let node = &kept.node;
        for (port, eps) in kept.ports.iter() {
            let eps = eps.as_deref().map(|v| v.as_slice()).unwrap_or(&[]);
            let cat = categorize_endpoints(port, eps, &node.topology);
            let facts = kp_model::port_facts(port, eps, &cat);
            merged.report.no_local_endpoints_internal += facts.no_local_internal as usize;
            merged.report.no_local_endpoints_external += facts.no_local_external as usize;
            if facts.health_check.is_some() {
                merged.report.health_check = facts.health_check;
            }
            let mut o = render_service(&self.cfg, port, &cat, &node.node_ips);
            if let Some(np) = port.node_port
                && kept.skipped_node_ports.contains(&(port.protocol, np))
            {
                let key = format!("{} . {np}", port.protocol.lower());
                let slot_prefix = format!("{key} . ");
                o.elements.retain(|(set, k), _| {
                    !((*set == SERVICE_NODEPORTS || *set == NO_ENDPOINT_NODEPORTS) && *k == key)
                        && !(set.starts_with(NODEPORT_ENDPOINTS) && k.starts_with(&slot_prefix))
                });
            }
            if kept.ports.len() == 1 {
                // One port: its objects are the service's (no merge to copy them into).
                o.report = std::mem::take(&mut merged.report);
                merged = o;
                break;
            }
            merged.chains.extend(o.chains);
            merged.elements.extend(o.elements);
            merged.affinity_sets.extend(o.affinity_sets);
            merged.hairpin.extend(o.hairpin);
            merged.pickers.extend(o.pickers);
        }
        let bad: Vec<String> = merged
            .chains
            .keys()
            .chain(merged.affinity_sets.keys())
            .filter(|n| !is_safe_name(n))
            .cloned()
            .collect();
        if !bad.is_empty() {
            return Err(bad);
        }
        Ok(merged)
    }

    /// Takes the node the next renders use; a different one gets a new shared copy.
    fn set_node(&mut self, node: &kp_dataplane::NodeInfo) {
        if self.node.topology != node.topology || self.node.node_ips != node.node_ips {
            self.node = Arc::new(NodeView {
                topology: node.topology.clone(),
                node_ips: node.node_ips.clone(),
            });
        }
    }

    fn addr_type(&self) -> &'static str {
        match self.cfg.family {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        }
    }

    /// `cold`: the kernel has no table yet, so the load may be split into several
    /// transactions (nothing is served before it either way). Over an existing table
    /// the replacement stays one atomic transaction. Returns the transaction and what
    /// the kernel holds once it is applied.
    ///
    /// Services are rendered one at a time and written at once: their chains and rules
    /// go straight into the transaction, their elements into [`ElementLines`] (written
    /// last, after the shared pickers they jump to), so no service's objects outlive it.
    fn full_tx(
        &mut self,
        input: &SyncInput<'_>,
        warnings: &mut Vec<String>,
        cold: bool,
    ) -> (Tx, Memory) {
        self.node_ports = kp_model::NodePortClaims::default();
        let mut tx = Tx::new(self.cfg.nft_family());
        tx.replace_table();
        if cold {
            // Objects only refer to objects written before them, so any line is a
            // valid cut.
            tx.split_every(self.transaction_statements);
        }
        let sk = skeleton(&self.cfg);
        for s in &sk.sets {
            tx.add_set(s);
        }
        for b in &sk.base_chains {
            tx.base_chain(b);
        }
        for name in sk.chains.keys() {
            if !sk.base_chains.iter().any(|b| b.name == name) {
                tx.add_chain(name);
            }
        }
        let mut elements = ElementLines::default();
        for ((s, k), v) in &sk.elements {
            elements.add(s, k, v);
        }
        let services: BTreeSet<NamespacedName> = input
            .state
            .services
            .keys()
            .map(|k| k.service.clone())
            .collect();
        // What is kept is made before the rendered objects: allocated in between, it
        // would pin their pages in the heap once they are freed.
        let kept: Vec<(NamespacedName, Kept)> = services
            .into_iter()
            .map(|svc| {
                let k = self.prepare(input.state, &svc, warnings);
                (svc, k)
            })
            .collect();
        let mut mem = Memory::default();
        mem.current.reserve(kept.len());
        let endpoints: usize = kept
            .iter()
            .flat_map(|(_, k)| k.ports.iter())
            .map(|(_, eps)| eps.as_ref().map_or(0, |e| e.len()))
            .sum();
        match self.cfg.family {
            IpFamily::V4 => mem.hairpin_refs.v4.reserve(endpoints),
            IpFamily::V6 => mem.hairpin_refs.v6.reserve(endpoints),
        }
        let addr_type = self.addr_type();
        let mut pickers: BTreeSet<Picker> = BTreeSet::new();
        for (svc, k) in kept {
            let o = self.render_checked(&svc, &k, warnings);
            for (set, t) in &o.affinity_sets {
                tx.add_affinity_set(set, *t, addr_type);
            }
            // All of the service's chains before their rules: they jump to each other
            // (service -> endpoint chains).
            for name in o.chains.keys() {
                tx.add_chain(name);
            }
            for (chain, rules) in &o.chains {
                for r in rules {
                    tx.add_rule(chain, r);
                }
            }
            for ((s, k), v) in &o.elements {
                elements.add(s, k, v);
            }
            pickers.extend(o.pickers.iter().copied());
            mem.remember(svc, &o, k, |ip| {
                elements.add(HAIRPIN_ENDPOINTS, &hairpin_key(ip), "");
            });
        }
        for p in &pickers {
            tx.add_chain(&p.chain());
        }
        for (name, rules) in &sk.chains {
            for r in rules {
                tx.add_rule(name, r);
            }
        }
        for p in &pickers {
            for r in picker_rules(&self.cfg, p) {
                tx.add_rule(&p.chain(), &r);
            }
        }
        elements.write_to(&mut tx);
        (tx, mem)
    }

    fn partial_tx(
        &mut self,
        input: &SyncInput<'_>,
        warnings: &mut Vec<String>,
    ) -> (Tx, Vec<Update>) {
        let mut tx = Tx::new(self.cfg.nft_family());
        let mut updates = Vec::new();
        let empty = ServiceObjects::default();
        let mut del_elems: Vec<(&'static str, String)> = Vec::new();
        let mut add_sets: Vec<(String, u32)> = Vec::new();
        let mut add_chains: Vec<String> = Vec::new();
        let mut rewrite: Vec<(String, bool, Vec<String>)> = Vec::new();
        let mut add_elems: Vec<(&'static str, String, String)> = Vec::new();
        let mut del_chains: Vec<String> = Vec::new();
        let mut del_sets: Vec<String> = Vec::new();
        let mut hairpin_delta: HashMap<std::net::IpAddr, i64> = HashMap::new();
        let mut replace_elems: Vec<(&'static str, String, String)> = Vec::new();
        let mut picker_delta: HashMap<Picker, i64> = HashMap::new();
        tx.split_every(self.transaction_statements);
        for svc in &input.changes.services {
            let (new, kept) = self.render(input.state, svc, warnings);
            let old_objects = self
                .mem
                .current
                .get(svc)
                .map(|k| self.render_kept(k).unwrap_or_default());
            let old = old_objects.as_ref().unwrap_or(&empty);
            for k in old.elements.keys() {
                if !new.elements.contains_key(k) {
                    del_elems.push(k.clone());
                }
            }
            for (k, v) in &new.elements {
                match old.elements.get(k) {
                    Some(was) if was == v => {}
                    // A changed value is replaced in place: delete and add in one
                    // transaction, so the key never goes missing.
                    Some(_) => replace_elems.push((k.0, k.1.clone(), v.clone())),
                    None => add_elems.push((k.0, k.1.clone(), v.clone())),
                }
            }
            for (s, t) in &new.affinity_sets {
                if old.affinity_sets.get(s) != Some(t) {
                    if old.affinity_sets.contains_key(s) {
                        del_sets.push(s.clone());
                    }
                    add_sets.push((s.clone(), *t));
                }
            }
            for s in old.affinity_sets.keys() {
                if !new.affinity_sets.contains_key(s) {
                    del_sets.push(s.clone());
                }
            }
            for (c, rules) in &new.chains {
                match old.chains.get(c) {
                    Some(r) if r == rules => {}
                    Some(_) => rewrite.push((c.clone(), true, rules.clone())),
                    None => {
                        add_chains.push(c.clone());
                        rewrite.push((c.clone(), false, rules.clone()));
                    }
                }
            }
            for c in old.chains.keys() {
                if !new.chains.contains_key(c) {
                    del_chains.push(c.clone());
                }
            }
            for p in new.pickers.difference(&old.pickers) {
                *picker_delta.entry(*p).or_default() += 1;
            }
            for p in old.pickers.difference(&new.pickers) {
                *picker_delta.entry(*p).or_default() -= 1;
            }
            for k in new.hairpin.difference(&old.hairpin) {
                *hairpin_delta.entry(*k).or_default() += 1;
            }
            for k in old.hairpin.difference(&new.hairpin) {
                *hairpin_delta.entry(*k).or_default() -= 1;
            }
            updates.push(Update {
                svc: svc.clone(),
                old: old_objects,
                new,
                kept,
            });
        }
        for (p, d) in &picker_delta {
            let before = i64::from(self.mem.picker_refs.get(p).copied().unwrap_or(0));
            match (before, before + d) {
                (0, after) if after > 0 => {
                    add_chains.push(p.chain());
                    rewrite.push((p.chain(), false, picker_rules(&self.cfg, p)));
                }
                (b, 0) if b > 0 => del_chains.push(p.chain()),
                _ => {}
            }
        }
        for (k, d) in &hairpin_delta {
            let before = i64::from(self.mem.hairpin_refs.get(*k));
            match (before, before + d) {
                (0, after) if after > 0 => {
                    add_elems.push((HAIRPIN_ENDPOINTS, hairpin_key(*k), String::new()))
                }
                (b, 0) if b > 0 => del_elems.push((HAIRPIN_ENDPOINTS, hairpin_key(*k))),
                _ => {}
            }
        }
        // Order matters within the transaction: drop references before their targets go.
        tx.delete_elements(del_elems.iter().map(|(s, k)| (*s, k.as_str())));
        let addr_type = self.addr_type();
        for (s, t) in &add_sets {
            if del_sets.contains(s) {
                continue;
            }
            tx.add_affinity_set(s, *t, addr_type);
        }
        for c in &add_chains {
            tx.add_chain(c);
        }
        // Endpoint chains before the service chains whose affinity rules jump to them.
        rewrite.sort_by_key(|(c, _, _)| !is_endpoint_chain(c));
        for (c, flush, rules) in &rewrite {
            tx.atomic(|tx| {
                if *flush {
                    tx.flush_chain(c);
                }
                for r in rules {
                    tx.add_rule(c, r);
                }
            });
        }
        tx.add_elements(
            add_elems
                .iter()
                .map(|(s, k, v)| (*s, k.as_str(), v.as_str())),
        );
        tx.atomic(|tx| {
            tx.delete_elements(replace_elems.iter().map(|(s, k, _)| (*s, k.as_str())));
            tx.add_elements(
                replace_elems
                    .iter()
                    .map(|(s, k, v)| (*s, k.as_str(), v.as_str())),
            );
        });
        // Chains that go: flush all first (they may jump to each other), then delete.
        for c in &del_chains {
            tx.flush_chain(c);
        }
        for c in &del_chains {
            tx.delete_chain(c);
        }
        for s in &del_sets {
            tx.delete_set(s);
        }
        // A re-created affinity set (timeout changed) comes back after its old one is gone.
        for (s, t) in &add_sets {
            if del_sets.contains(s) {
                tx.add_affinity_set(s, *t, addr_type);
            }
        }
        (tx, updates)
    }

    fn report(&self, full: bool, bytes: usize, ops: usize, warnings: Vec<String>) -> SyncReport {
        let mut r = SyncReport {
            full,
            bytes_written: bytes,
            apply_time: self.last_apply,
            warnings,
            ..Default::default()
        };
        r.rules_written.insert(RuleKind::NftablesOps, ops);
        r.no_local_endpoints_internal = self.mem.totals.no_local_endpoints_internal;
        r.no_local_endpoints_external = self.mem.totals.no_local_endpoints_external;
        r.health_checks = self.mem.health_checks.clone();
        r
    }
}

impl<R: CommandRunner> Dataplane for NftProxier<R> {
    fn mode(&self) -> kp_dataplane::Mode {
        kp_dataplane::Mode::Nftables
    }

    fn applier(&self) -> kp_dataplane::Applier {
        if self.netlink.is_some() {
            kp_dataplane::Applier::Nfnetlink
        } else {
            kp_dataplane::Applier::Nft
        }
    }

    fn family(&self) -> IpFamily {
        self.cfg.family
    }

    fn sync(&mut self, input: &SyncInput<'_>) -> Result<SyncReport, SyncError> {
        let full = input.force_full || self.needs_full;
        self.needs_full = true;
        self.set_node(input.node);
        let mut warnings = Vec::new();
        if full {
            let cold = self.mem.current.is_empty() && !self.table_present();
            let (tx, mem) = self.full_tx(input, &mut warnings, cold);
            let (bytes, ops) = (tx.text.len(), tx.ops);
            self.apply(&tx.text)?;
            drop(tx);
            self.mem = mem;
            self.needs_full = false;
            return Ok(self.report(true, bytes, ops, warnings));
        }
        let (tx, updates) = self.partial_tx(input, &mut warnings);
        if tx.ops > 0 {
            self.apply(&tx.text)?;
        } else {
            self.last_apply = std::time::Duration::ZERO;
        }
        for u in updates {
            if let Some(old) = &u.old {
                self.mem.forget(&u.svc, old);
            }
            if !(u.new.chains.is_empty() && u.new.elements.is_empty()) {
                self.mem.remember(u.svc, &u.new, u.kept, |_| {});
            }
        }
        self.needs_full = false;
        Ok(self.report(false, tx.text.len(), tx.ops, warnings))
    }

    fn needs_full_sync(&mut self) -> bool {
        if self.needs_full {
            return true;
        }
        if self.table_present() {
            return false;
        }
        tracing::warn!(
            family = self.cfg.nft_family(),
            "nftables table or base chain missing: rules were flushed, forcing a full sync"
        );
        self.needs_full = true;
        true
    }

    fn cleanup(&mut self) -> Result<(), SyncError> {
        let f = self.cfg.nft_family();
        let text = format!("add table {f} {TABLE}\ndelete table {f} {TABLE}\n");
        self.run_nft(&text)?;
        self.mem = Memory::default();
        self.needs_full = true;
        Ok(())
    }
}

#[cfg(test)]
#[path = "proxier_tests.rs"]
mod tests;
