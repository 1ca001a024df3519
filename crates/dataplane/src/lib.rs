//! What every backend shares: the [`Dataplane`] trait, upstream's kernel-object naming,
//! local-traffic detection, node-port address selection, and the one boundary through which
//! backends run kernel tools ([`CommandRunner`]).

mod config;
mod exec;
mod local;
mod mode;
mod names;
mod nodeport;
mod schedule;

pub use config::{DataplaneConfig, IpvsOptions};
pub use mode::{Mode, UnknownMode};

pub use exec::{
    CommandError, CommandOutput, CommandRunner, RecordedCall, RecordingRunner, SystemRunner,
    summarize_stderr,
};
pub use local::LocalDetector;
pub use names::{endpoint_chain_name, hash_suffix, service_chain_name};
pub use nodeport::NodePortAddresses;
pub use schedule::{Action, ScheduleConfig, SyncSchedule};

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use kp_model::{ChangeSet, IpFamily, NamespacedName, NodeTopology, ProxyState};

/// What the proxy knows about its node.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub topology: NodeTopology,
    /// Addresses of the Node object (InternalIP first).
    pub node_ips: Vec<IpAddr>,
    /// `spec.podCIDRs` of the Node object.
    pub pod_cidrs: Vec<IpNet>,
    /// Addresses configured on this node's interfaces (for `--nodeport-addresses`).
    pub local_addresses: Vec<IpAddr>,
}

/// Input of one sync.
#[derive(Debug, Clone, Copy)]
pub struct SyncInput<'a> {
    pub state: &'a ProxyState,
    pub changes: &'a ChangeSet,
    pub node: &'a NodeInfo,
    /// Rewrite everything (start, after a failure, after a flush was detected).
    pub force_full: bool,
}

/// What a sync counts, per kind of kernel object (rules per iptables table, nftables
/// operations; IPVS objects to come). The runner maps each kind to its metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleKind {
    IptablesFilter,
    IptablesNat,
    /// Operations (adds, deletes, flushes) in an nftables transaction.
    NftablesOps,
    /// IPVS virtual servers.
    IpvsVirtualServers,
    /// IPVS real servers, over all virtual servers.
    IpvsRealServers,
    /// Members of IPVS mode's ipsets (written: members added or deleted).
    IpsetMembers,
}

impl RuleKind {
    /// The name in logs (`nat_rules=...`).
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::IptablesFilter => "filter",
            RuleKind::IptablesNat => "nat",
            RuleKind::NftablesOps => "nft-ops",
            RuleKind::IpvsVirtualServers => "ipvs-services",
            RuleKind::IpvsRealServers => "ipvs-real-servers",
            RuleKind::IpsetMembers => "ipset-members",
        }
    }
}

/// The program or kernel interface that applied (or refused) a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Applier {
    IptablesRestore,
    IptablesSave,
    Iptables,
    Nft,
    Nfnetlink,
    /// The IPVS generic netlink family.
    IpvsNetlink,
    /// `ipset restore`.
    Ipset,
    /// rtnetlink (kube-ipvs0 and its addresses).
    Rtnetlink,
}

impl Applier {
    pub fn as_str(self) -> &'static str {
        match self {
            Applier::IptablesRestore => "iptables-restore",
            Applier::IptablesSave => "iptables-save",
            Applier::Iptables => "iptables",
            Applier::Nft => "nft",
            Applier::Nfnetlink => "nfnetlink",
            Applier::IpvsNetlink => "ipvs-netlink",
            Applier::Ipset => "ipset",
            Applier::Rtnetlink => "rtnetlink",
        }
    }
}

impl std::fmt::Display for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a sync did, for metrics, health-check servers and logs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncReport {
    pub full: bool,
    /// Rules this proxy owns, per table (kept even for chains a partial sync skipped).
    pub rules_total: BTreeMap<RuleKind, usize>,
    /// Rules written by this sync, per table.
    pub rules_written: BTreeMap<RuleKind, usize>,
    /// Services with internalTrafficPolicy Local and no local endpoints.
    pub no_local_endpoints_internal: usize,
    /// Services with externalTrafficPolicy Local and no local endpoints.
    pub no_local_endpoints_external: usize,
    /// Services needing a healthCheckNodePort server, and their local ready endpoint count.
    pub health_checks: BTreeMap<NamespacedName, (u16, usize)>,
    /// Problems found while rendering, one line each naming the objects.
    pub warnings: Vec<String>,
    /// Bytes handed to the kernel tool.
    pub bytes_written: usize,
    /// Time spent applying: the kernel's processing of the netlink batch (nftables mode
    /// with the netlink applier), else the whole tool run (`iptables-restore`, `nft -f`).
    pub apply_time: std::time::Duration,
}

/// A failed sync. The next sync after a failure is a full one.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The tool or the kernel refused the input (or, for netlink, its outcome is unknown).
    #[error("{tool} failed: {message}")]
    Apply {
        tool: Applier,
        message: String,
        /// The input line the tool complained about, when it named one.
        line: Option<String>,
    },
    /// The tool could not be run.
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl SyncError {
    /// The backend's tool is not installed (a mode whose objects cannot be present).
    pub fn is_tool_missing(&self) -> bool {
        matches!(self, SyncError::Command(CommandError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// One dataplane for one IP family.
pub trait Dataplane: Send {
    fn mode(&self) -> Mode;
    fn family(&self) -> IpFamily;
    /// What applies its syncs (logged at start).
    fn applier(&self) -> Applier;
    /// Makes the kernel match `input.state`. Idempotent. Partial unless forced or after a
    /// failure.
    fn sync(&mut self, input: &SyncInput<'_>) -> Result<SyncReport, SyncError>;
    /// Cheap check, run every syncPeriod, whether someone removed our rules (canary).
    fn needs_full_sync(&mut self) -> bool;
    /// Removes everything this mode ever installed. Nothing there is not an error.
    fn cleanup(&mut self) -> Result<(), SyncError>;
    /// Kernel settings (`/proc/sys` paths and values) the mode needs before its first
    /// sync; the agent writes them (and logs what it could not).
    fn required_sysctls(&self) -> Vec<(&'static str, i64)> {
        Vec::new()
    }
    /// Checks, before anything is written, that the kernel and tools can run this mode
    /// as configured; an error is one line for the operator, and the proxy exits.
    fn preflight(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Whether anything of this mode is in the kernel (cheap; no side effects). The
    /// agent removes another mode's objects at start only when this says so, so that
    /// chains two modes share are never flushed on a plain restart.
    fn is_installed(&mut self) -> bool {
        true
    }
}
