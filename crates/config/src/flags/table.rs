//! The table of upstream flags: names, value kinds, what we do with them, help.

/// How a flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    /// `--flag` or `--flag=true|false`; a following word is NOT its value.
    Bool,
    /// `--flag=value` or `--flag value`.
    Value,
    /// `--version`, `--version=raw`, `--version=vX.Y.Z` (value only after `=`).
    OptionalValue,
}

/// What kube-proxy-rs does with a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagSupport {
    /// Parsed into the typed [`crate::Settings`] / [`crate::Loaded`].
    Implemented,
    /// Accepted (and kept in the config where it has a field) but nothing acts on it
    /// yet; setting it adds a warning.
    NoEffect,
    /// Deprecated or removed upstream; accepted for old manifests, with a warning.
    Deprecated,
}

/// One upstream flag.
#[derive(Debug, Clone, Copy)]
pub struct FlagSpec {
    pub name: &'static str,
    pub short: Option<char>,
    pub kind: FlagKind,
    pub support: FlagSupport,
    pub help: &'static str,
}

const fn flag(
    name: &'static str,
    kind: FlagKind,
    support: FlagSupport,
    help: &'static str,
) -> FlagSpec {
    FlagSpec {
        name,
        short: None,
        kind,
        support,
        help,
    }
}

use FlagKind::{Bool, OptionalValue, Value};
use FlagSupport::{Deprecated, Implemented, NoEffect};

/// Every flag upstream kube-proxy 1.3x registers on Linux (options.go `AddFlags`,
/// `logsapi.AddFlags`, the klog flags, `--version`, `--help`) plus a few deprecated
/// ones old manifests still pass.
pub const FLAG_SPECS: &[FlagSpec] = &[
    flag(
        "config",
        Value,
        Implemented,
        "Path to a KubeProxyConfiguration file (YAML or JSON); flags set explicitly override it.",
    ),
    flag(
        "write-config-to",
        Value,
        Implemented,
        "Write the effective configuration to this file and exit.",
    ),
    flag(
        "cleanup",
        Bool,
        Implemented,
        "Remove the rules of every proxy mode and exit.",
    ),
    flag(
        "init-only",
        Bool,
        Implemented,
        "Do the privileged initialisation (sysctls) and exit.",
    ),
    flag(
        "feature-gates",
        Value,
        Implemented,
        "Comma-separated key=true|false feature gates.",
    ),
    flag(
        "kubeconfig",
        Value,
        Implemented,
        "Path to a kubeconfig file with the API server location and credentials.",
    ),
    flag(
        "master",
        Value,
        Implemented,
        "API server address; overrides the kubeconfig server.",
    ),
    flag(
        "kube-api-content-type",
        Value,
        Implemented,
        "Content type of requests sent to the API server.",
    ),
    flag(
        "kube-api-burst",
        Value,
        Implemented,
        "Burst to allow towards the API server.",
    ),
    flag(
        "kube-api-qps",
        Value,
        Implemented,
        "Queries per second towards the API server.",
    ),
    flag(
        "hostname-override",
        Value,
        Implemented,
        "Node name to use instead of the hostname (trimmed, lower-cased).",
    ),
    flag(
        "bind-address",
        Value,
        Implemented,
        "Overrides the node's primary IP (no socket is bound to it).",
    ),
    flag(
        "healthz-bind-address",
        Value,
        Implemented,
        "IP[:port] of the health server (default 0.0.0.0:10256); empty disables it.",
    ),
    flag(
        "metrics-bind-address",
        Value,
        Implemented,
        "IP[:port] of the metrics server (default 127.0.0.1:10249); empty disables it.",
    ),
    flag(
        "bind-address-hard-fail",
        Bool,
        Implemented,
        "Exit when the health or metrics port cannot be bound.",
    ),
    flag(
        "profiling",
        Bool,
        NoEffect,
        "Serve /debug/pprof on the metrics server.",
    ),
    flag(
        "show-hidden-metrics-for-version",
        Value,
        NoEffect,
        "Previous minor version (e.g. 1.35) whose hidden metrics to show.",
    ),
    flag(
        "proxy-mode",
        Value,
        Implemented,
        "iptables (default), nftables, ipvs or userspace.",
    ),
    flag(
        "iptables-masquerade-bit",
        Value,
        Implemented,
        "fwmark bit [0, 31] marking packets that need SNAT.",
    ),
    flag(
        "masquerade-all",
        Bool,
        Implemented,
        "SNAT all traffic sent to Service cluster IPs.",
    ),
    flag(
        "iptables-localhost-nodeports",
        Bool,
        Implemented,
        "Allow NodePorts on 127.0.0.1 in iptables mode (IPv4).",
    ),
    flag(
        "iptables-sync-period",
        Value,
        Implemented,
        "Maximum interval between full rule syncs (iptables/nftables), > 0.",
    ),
    flag(
        "iptables-min-sync-period",
        Value,
        Implemented,
        "Minimum interval between rule syncs (iptables/nftables); 0 syncs on every change.",
    ),
    flag(
        "ipvs-sync-period",
        Value,
        Implemented,
        "Maximum interval between IPVS rule syncs, > 0.",
    ),
    flag(
        "ipvs-min-sync-period",
        Value,
        Implemented,
        "Minimum interval between IPVS rule syncs.",
    ),
    flag(
        "ipvs-scheduler",
        Value,
        Implemented,
        "IPVS scheduler (default rr).",
    ),
    flag(
        "ipvs-exclude-cidrs",
        Value,
        Implemented,
        "Comma-separated CIDRs the IPVS cleanup must not touch.",
    ),
    flag(
        "ipvs-strict-arp",
        Bool,
        Implemented,
        "Set arp_ignore=1 and arp_announce=2.",
    ),
    flag(
        "ipvs-tcp-timeout",
        Value,
        Implemented,
        "IPVS idle TCP timeout; 0 leaves it as-is.",
    ),
    flag(
        "ipvs-tcpfin-timeout",
        Value,
        Implemented,
        "IPVS TCP timeout after FIN; 0 leaves it as-is.",
    ),
    flag(
        "ipvs-udp-timeout",
        Value,
        Implemented,
        "IPVS UDP timeout; 0 leaves it as-is.",
    ),
    flag(
        "detect-local-mode",
        Value,
        Implemented,
        "ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix.",
    ),
    flag(
        "pod-bridge-interface",
        Value,
        Implemented,
        "Bridge whose traffic is local (BridgeInterface mode).",
    ),
    flag(
        "pod-interface-name-prefix",
        Value,
        Implemented,
        "Interface prefix whose traffic is local (InterfaceNamePrefix mode).",
    ),
    flag(
        "cluster-cidr",
        Value,
        Implemented,
        "Pod CIDR, or comma-separated dual-stack pair (ClusterCIDR mode).",
    ),
    flag(
        "nodeport-addresses",
        Value,
        Implemented,
        "Comma-separated CIDRs and/or keywords primary, localhost, all for NodePorts.",
    ),
    flag(
        "oom-score-adj",
        Value,
        Implemented,
        "oom_score_adj for the process, in [-1000, 1000].",
    ),
    flag(
        "conntrack-max-per-core",
        Value,
        Implemented,
        "Conntrack entries per CPU; 0 leaves the limit as-is.",
    ),
    flag(
        "conntrack-min",
        Value,
        Implemented,
        "Minimum conntrack entries regardless of CPU count.",
    ),
    flag(
        "conntrack-tcp-timeout-established",
        Value,
        Implemented,
        "Idle timeout of established TCP entries; 0 leaves it as-is.",
    ),
    flag(
        "conntrack-tcp-timeout-close-wait",
        Value,
        Implemented,
        "Timeout of CLOSE_WAIT TCP entries; 0 leaves it as-is.",
    ),
    flag(
        "conntrack-tcp-be-liberal",
        Bool,
        Implemented,
        "Set nf_conntrack_tcp_be_liberal=1.",
    ),
    flag(
        "conntrack-udp-timeout",
        Value,
        Implemented,
        "Idle timeout of UNREPLIED UDP entries; 0 leaves it as-is.",
    ),
    flag(
        "conntrack-udp-timeout-stream",
        Value,
        Implemented,
        "Idle timeout of ASSURED UDP entries; 0 leaves it as-is.",
    ),
    flag(
        "config-sync-period",
        Value,
        Implemented,
        "Informer resync period, > 0.",
    ),
    flag(
        "healthz-port",
        Value,
        Deprecated,
        "Deprecated: port of the health server; 0 disables it.",
    ),
    flag(
        "metrics-port",
        Value,
        Deprecated,
        "Deprecated: port of the metrics server; 0 disables it.",
    ),
    FlagSpec {
        short: Some('v'),
        ..flag("v", Value, Implemented, "Log verbosity.")
    },
    flag(
        "vmodule",
        Value,
        NoEffect,
        "Comma-separated pattern=N per-file verbosity.",
    ),
    flag(
        "logging-format",
        Value,
        NoEffect,
        "Log format: text or json.",
    ),
    flag(
        "log-flush-frequency",
        Value,
        NoEffect,
        "Maximum time between log flushes.",
    ),
    flag(
        "log-text-split-stream",
        Bool,
        NoEffect,
        "Text logs: errors to stderr, info to stdout.",
    ),
    flag(
        "log-text-info-buffer-size",
        Value,
        NoEffect,
        "Text logs: info buffer size with split streams.",
    ),
    flag(
        "log-json-split-stream",
        Bool,
        NoEffect,
        "JSON logs: errors to stderr, info to stdout.",
    ),
    flag(
        "log-json-info-buffer-size",
        Value,
        NoEffect,
        "JSON logs: info buffer size with split streams.",
    ),
    flag(
        "add-dir-header",
        Bool,
        NoEffect,
        "klog: add the file directory to log headers.",
    ),
    flag(
        "alsologtostderr",
        Bool,
        NoEffect,
        "klog: log to stderr as well as files.",
    ),
    flag(
        "log-backtrace-at",
        Value,
        NoEffect,
        "klog: emit a stack trace at file:N.",
    ),
    flag(
        "log-dir",
        Value,
        NoEffect,
        "klog: write log files in this directory.",
    ),
    flag(
        "log-file",
        Value,
        NoEffect,
        "klog: write logs to this file.",
    ),
    flag(
        "log-file-max-size",
        Value,
        NoEffect,
        "klog: maximum log file size in MB.",
    ),
    flag(
        "logtostderr",
        Bool,
        NoEffect,
        "klog: log to stderr instead of files.",
    ),
    flag(
        "one-output",
        Bool,
        NoEffect,
        "klog: write logs only at their own severity.",
    ),
    flag(
        "skip-headers",
        Bool,
        NoEffect,
        "klog: no header prefixes in log lines.",
    ),
    flag(
        "skip-log-headers",
        Bool,
        NoEffect,
        "klog: no headers when opening log files.",
    ),
    flag(
        "stderrthreshold",
        Value,
        NoEffect,
        "klog: severity at or above which logs go to stderr.",
    ),
    flag(
        "proxy-port-range",
        Value,
        Deprecated,
        "Removed userspace proxy's port range; ignored.",
    ),
    flag(
        "udp-timeout",
        Value,
        Deprecated,
        "Removed userspace proxy's UDP idle timeout; ignored.",
    ),
    flag(
        "version",
        OptionalValue,
        Implemented,
        "Print version information and exit (--version=raw also).",
    ),
    FlagSpec {
        short: Some('h'),
        ..flag("help", Bool, Implemented, "Print this help and exit.")
    },
];

const FLAG_COUNT: usize = FLAG_SPECS.len();

const FLAG_NAMES: [&str; FLAG_COUNT] = {
    let mut names = [""; FLAG_COUNT];
    let mut index = 0;
    while index < FLAG_COUNT {
        names[index] = FLAG_SPECS[index].name;
        index += 1;
    }
    names
};

/// Every long flag name accepted (without the leading `--`).
pub const UPSTREAM_FLAGS: &[&str] = &FLAG_NAMES;

/// Looks a flag up by its long name.
pub fn flag_spec(name: &str) -> Option<&'static FlagSpec> {
    FLAG_SPECS.iter().find(|spec| spec.name == name)
}

/// `--help` text: every flag with what it does and whether kube-proxy-rs acts on it.
pub fn help_text() -> String {
    let mut text = String::from(
        "kube-proxy-rs: a drop-in replacement for kube-proxy.\n\nUsage: kube-proxy [flags]\n\nFlags:\n",
    );
    for spec in FLAG_SPECS {
        let short = spec.short.map(|c| format!("-{c}, ")).unwrap_or_default();
        let value = match spec.kind {
            Bool => "",
            Value => " value",
            OptionalValue => "[=value]",
        };
        let note = match spec.support {
            Implemented => "",
            NoEffect => " (accepted, no effect yet)",
            Deprecated => " (deprecated)",
        };
        text.push_str(&format!(
            "  {short}--{}{value}\n      {}{note}\n",
            spec.name, spec.help
        ));
    }
    text
}
