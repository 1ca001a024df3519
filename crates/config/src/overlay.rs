//! Applies explicitly set flags on top of the (file or default) configuration.
//!
//! Precedence (documented deviation from upstream, required by our issue): upstream
//! ignores most flags when `--config` is given (only logging flags and
//! `--hostname-override` win); we let EVERY flag given on the command line override
//! the file. Flags not given never touch the file's values.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::defaults::{DEFAULT_HEALTHZ_PORT, DEFAULT_METRICS_PORT};
use crate::duration::{GoDuration, parse_go_duration};
use crate::error::ConfigError;
use crate::flags::{FlagSupport, ParsedFlags};
use crate::netparse::{append_port_if_needed, replace_port};
use crate::types::{KubeProxyConfiguration, Quantity, VModuleItem};

/// Which config fields a flag set, so validation errors can name the flag.
#[derive(Debug, Default)]
pub(crate) struct FlagSources {
    by_field: BTreeMap<String, (String, String)>,
}

impl FlagSources {
    fn record(&mut self, field: &str, flag: &str, raw: &str) {
        self.by_field
            .insert(field.to_string(), (flag.to_string(), raw.to_string()));
    }

    /// `(flag name, raw value)` of the flag that set `field`, if any.
    pub fn flag_for(&self, field: &str) -> Option<&(String, String)> {
        self.by_field.get(field)
    }
}

/// Flags that steer the process rather than the proxy configuration.
#[derive(Debug, Default)]
pub(crate) struct ProcessOptions {
    pub config_file: Option<PathBuf>,
    pub write_config_to: Option<PathBuf>,
    pub cleanup: bool,
    pub init_only: bool,
    pub show_version: bool,
    pub show_help: bool,
    pub master: Option<String>,
}

pub(crate) fn process_options(
    flags: &ParsedFlags,
    warnings: &mut Vec<String>,
) -> Result<ProcessOptions, ConfigError> {
    let non_empty_path = |name: &str| {
        flags
            .last(name)
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
    };
    let bool_flag = |name: &str| {
        flags
            .last(name)
            .map(|raw| parse_bool(name, raw))
            .transpose()
    };
    let show_version = match flags.last("version") {
        None => false,
        Some("raw") => true,
        Some(raw) => match parse_bool("version", raw) {
            Ok(show) => show,
            Err(_) => {
                warnings.push(format!(
                    "flag --version={raw} (override the reported version) has no effect yet"
                ));
                false
            }
        },
    };
    Ok(ProcessOptions {
        config_file: non_empty_path("config"),
        write_config_to: non_empty_path("write-config-to"),
        cleanup: bool_flag("cleanup")?.unwrap_or(false),
        init_only: bool_flag("init-only")?.unwrap_or(false),
        show_version,
        show_help: bool_flag("help")?.unwrap_or(false),
        master: flags
            .last("master")
            .filter(|m| !m.is_empty())
            .map(str::to_string),
    })
}

fn invalid(flag: &str, raw: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::InvalidFlagValue {
        flag: flag.to_string(),
        value: raw.to_string(),
        reason: crate::error::one_line(reason.into()),
    }
}

/// Go's `strconv.ParseBool`.
pub(crate) fn parse_bool(flag: &str, raw: &str) -> Result<bool, ConfigError> {
    match raw {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(invalid(flag, raw, "must be true or false")),
    }
}

fn parse_i32(flag: &str, raw: &str) -> Result<i32, ConfigError> {
    raw.parse()
        .map_err(|_| invalid(flag, raw, "must be a 32-bit integer"))
}

fn parse_duration(flag: &str, raw: &str) -> Result<GoDuration, ConfigError> {
    parse_go_duration(raw)
        .map(GoDuration)
        .map_err(|err| invalid(flag, raw, err.to_string()))
}

/// pflag `StringSlice`: comma-separated; repeated flags append.
fn parse_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

/// `cliflag.MapStringBool`: `A=true,B=false`.
fn parse_feature_gates(flag: &str, raw: &str) -> Result<BTreeMap<String, bool>, ConfigError> {
    let mut gates = BTreeMap::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| invalid(flag, raw, format!("missing bool value for {pair}")))?;
        let enabled = parse_bool(flag, value.trim())
            .map_err(|_| invalid(flag, raw, format!("invalid value of {name}: {value}")))?;
        gates.insert(name.trim().to_string(), enabled);
    }
    Ok(gates)
}

/// `--vmodule=pattern=N,...`.
fn parse_vmodule(flag: &str, raw: &str) -> Result<Vec<VModuleItem>, ConfigError> {
    raw.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (pattern, level) = item
                .split_once('=')
                .filter(|(pattern, _)| !pattern.is_empty())
                .ok_or_else(|| invalid(flag, raw, format!("{item:?} is not pattern=N")))?;
            let verbosity = level
                .parse()
                .map_err(|_| invalid(flag, raw, format!("{level:?} is not a verbosity level")))?;
            Ok(VModuleItem {
                file_pattern: pattern.to_string(),
                verbosity,
            })
        })
        .collect()
}

/// Overlays every explicitly set flag onto `config`, recording sources and warnings.
pub(crate) fn apply_flags(
    config: &mut KubeProxyConfiguration,
    flags: &ParsedFlags,
    sources: &mut FlagSources,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    // The mode decides which section mode-dependent flags land in, so it goes first.
    if let Some(mode) = flags.last("proxy-mode") {
        config.mode = mode.to_string();
        sources.record("mode", "proxy-mode", mode);
    }
    let nftables_mode = config.mode == "nftables";
    for (spec, values) in &flags.set {
        let Some(raw) = values.last().map(String::as_str) else {
            continue;
        };
        let name = spec.name;
        let mut record = |field: &str| sources.record(field, name, raw);
        match name {
            "feature-gates" => {
                for value in values {
                    config
                        .feature_gates
                        .extend(parse_feature_gates(name, value)?);
                }
                record("featureGates");
            }
            "kubeconfig" => config.client_connection.kubeconfig = raw.to_string(),
            "kube-api-content-type" => {
                config.client_connection.content_type = raw.to_string();
                record("clientConnection.contentType");
            }
            "kube-api-burst" => {
                config.client_connection.burst = parse_i32(name, raw)?;
                record("clientConnection.burst");
            }
            "kube-api-qps" => {
                config.client_connection.qps = raw
                    .parse()
                    .map_err(|_| invalid(name, raw, "must be a number"))?;
            }
            "hostname-override" if !raw.is_empty() => {
                let trimmed = raw.trim();
                if trimmed.is_empty() {
                    return Err(invalid(name, raw, "empty hostname-override is invalid"));
                }
                config.hostname_override = trimmed.to_lowercase();
            }
            "bind-address" => {
                config.bind_address = raw.to_string();
                record("bindAddress");
            }
            "healthz-bind-address" => {
                config.healthz_bind_address = append_port_if_needed(raw, DEFAULT_HEALTHZ_PORT);
                record("healthzBindAddress");
            }
            "metrics-bind-address" => {
                config.metrics_bind_address = append_port_if_needed(raw, DEFAULT_METRICS_PORT);
                record("metricsBindAddress");
            }
            "bind-address-hard-fail" => config.bind_address_hard_fail = parse_bool(name, raw)?,
            "profiling" => config.enable_profiling = parse_bool(name, raw)?,
            "show-hidden-metrics-for-version" => {
                config.show_hidden_metrics_for_version = raw.to_string();
                record("showHiddenMetricsForVersion");
            }
            "iptables-masquerade-bit" => {
                config.iptables.masquerade_bit = Some(parse_i32(name, raw)?);
                record("iptables.masqueradeBit");
            }
            "masquerade-all" if nftables_mode => {
                config.nftables.masquerade_all = parse_bool(name, raw)?;
            }
            "masquerade-all" => config.iptables.masquerade_all = parse_bool(name, raw)?,
            "iptables-localhost-nodeports" => {
                config.iptables.localhost_node_ports = Some(parse_bool(name, raw)?);
            }
            "iptables-sync-period" => {
                let period = parse_duration(name, raw)?;
                config.iptables.sync_period = period;
                record("iptables.syncPeriod");
                if nftables_mode {
                    config.nftables.sync_period = period;
                    record("nftables.syncPeriod");
                }
            }
            "iptables-min-sync-period" => {
                let period = parse_duration(name, raw)?;
                config.iptables.min_sync_period = period;
                record("iptables.minSyncPeriod");
                if nftables_mode {
                    config.nftables.min_sync_period = period;
                    record("nftables.minSyncPeriod");
                }
            }
            "ipvs-sync-period" => {
                config.ipvs.sync_period = parse_duration(name, raw)?;
                record("ipvs.syncPeriod");
            }
            "ipvs-min-sync-period" => {
                config.ipvs.min_sync_period = parse_duration(name, raw)?;
                record("ipvs.minSyncPeriod");
            }
            "ipvs-scheduler" => {
                config.ipvs.scheduler = raw.to_string();
                record("ipvs.scheduler");
            }
            "ipvs-exclude-cidrs" => {
                config.ipvs.exclude_cidrs = parse_list(values);
                record("ipvs.excludeCIDRs");
            }
            "ipvs-strict-arp" => config.ipvs.strict_arp = parse_bool(name, raw)?,
            "ipvs-tcp-timeout" => config.ipvs.tcp_timeout = parse_duration(name, raw)?,
            "ipvs-tcpfin-timeout" => config.ipvs.tcp_fin_timeout = parse_duration(name, raw)?,
            "ipvs-udp-timeout" => config.ipvs.udp_timeout = parse_duration(name, raw)?,
            "detect-local-mode" => {
                config.detect_local_mode = raw.to_string();
                record("detectLocalMode");
            }
            "pod-bridge-interface" => {
                config.detect_local.bridge_interface = raw.to_string();
                record("detectLocal.bridgeInterface");
            }
            "pod-interface-name-prefix" => {
                config.detect_local.interface_name_prefix = raw.to_string();
                record("detectLocal.interfaceNamePrefix");
            }
            "cluster-cidr" => {
                config.cluster_cidr = raw.to_string();
                record("clusterCIDR");
            }
            "nodeport-addresses" => {
                config.node_port_addresses = parse_list(values);
                record("nodePortAddresses");
            }
            "oom-score-adj" => {
                config.oom_score_adj = Some(parse_i32(name, raw)?);
                record("oomScoreAdj");
            }
            "conntrack-max-per-core" => {
                config.conntrack.max_per_core = Some(parse_i32(name, raw)?);
                record("conntrack.maxPerCore");
            }
            "conntrack-min" => {
                config.conntrack.min = Some(parse_i32(name, raw)?);
                record("conntrack.min");
            }
            "conntrack-tcp-timeout-established" => {
                config.conntrack.tcp_established_timeout = Some(parse_duration(name, raw)?);
            }
            "conntrack-tcp-timeout-close-wait" => {
                config.conntrack.tcp_close_wait_timeout = Some(parse_duration(name, raw)?);
            }
            "conntrack-tcp-be-liberal" => config.conntrack.tcp_be_liberal = parse_bool(name, raw)?,
            "conntrack-udp-timeout" => config.conntrack.udp_timeout = parse_duration(name, raw)?,
            "conntrack-udp-timeout-stream" => {
                config.conntrack.udp_stream_timeout = parse_duration(name, raw)?;
            }
            "config-sync-period" => {
                config.config_sync_period = parse_duration(name, raw)?;
                record("configSyncPeriod");
            }
            "v" => {
                config.logging.verbosity = raw
                    .parse()
                    .map_err(|_| invalid(name, raw, "must be a non-negative integer"))?;
            }
            "vmodule" => config.logging.vmodule = parse_vmodule(name, raw)?,
            "logging-format" => {
                config.logging.format = raw.to_string();
                record("logging.format");
            }
            "log-flush-frequency" => config.logging.flush_frequency = parse_duration(name, raw)?,
            "log-text-split-stream" => {
                config.logging.options.text.split_stream = parse_bool(name, raw)?;
            }
            "log-json-split-stream" => {
                config.logging.options.json.split_stream = parse_bool(name, raw)?;
            }
            "log-text-info-buffer-size" => {
                config.logging.options.text.info_buffer_size = Quantity(raw.to_string());
            }
            "log-json-info-buffer-size" => {
                config.logging.options.json.info_buffer_size = Quantity(raw.to_string());
            }
            // Bool flags with no field still must hold a valid bool, as in pflag.
            _ if spec.kind == crate::flags::FlagKind::Bool => {
                parse_bool(name, raw)?;
            }
            _ => {}
        }
        match spec.support {
            FlagSupport::NoEffect => warnings.push(format!("flag --{name} has no effect yet")),
            FlagSupport::Deprecated => warnings.push(deprecation_warning(name)),
            FlagSupport::Implemented => {}
        }
    }
    apply_deprecated_port_flags(config, flags, sources)
}

fn deprecation_warning(name: &str) -> String {
    match name {
        "healthz-port" => "flag --healthz-port is deprecated; use --healthz-bind-address".into(),
        "metrics-port" => "flag --metrics-port is deprecated; use --metrics-bind-address".into(),
        _ => format!("flag --{name} is deprecated upstream and has no effect"),
    }
}

/// `--healthz-port`/`--metrics-port`: 0 disables the server, else replaces the port.
fn apply_deprecated_port_flags(
    config: &mut KubeProxyConfiguration,
    flags: &ParsedFlags,
    sources: &mut FlagSources,
) -> Result<(), ConfigError> {
    let targets = [
        (
            "healthz-port",
            "healthzBindAddress",
            &mut config.healthz_bind_address,
        ),
        (
            "metrics-port",
            "metricsBindAddress",
            &mut config.metrics_bind_address,
        ),
    ];
    for (name, field, address) in targets {
        let Some(raw) = flags.last(name) else {
            continue;
        };
        let port: u16 = raw
            .parse()
            .map_err(|_| invalid(name, raw, "must be a port in the range [0, 65535]"))?;
        *address = if port == 0 {
            String::new()
        } else {
            replace_port(address, port)
        };
        sources.record(field, name, raw);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_bool_spellings() {
        for raw in ["1", "t", "T", "true", "TRUE", "True"] {
            assert!(parse_bool("x", raw).expect("true spelling"));
        }
        for raw in ["0", "f", "F", "false", "FALSE", "False"] {
            assert!(!parse_bool("x", raw).expect("false spelling"));
        }
        let err = parse_bool("masquerade-all", "yes").expect_err("not a Go bool");
        assert_eq!(
            err.to_string(),
            "invalid value \"yes\" for flag --masquerade-all: must be true or false"
        );
    }

    #[test]
    fn feature_gates_and_vmodule_syntax() {
        let gates = parse_feature_gates("feature-gates", "A=true, B=false").expect("valid");
        assert_eq!(gates.get("A"), Some(&true));
        assert_eq!(gates.get("B"), Some(&false));
        assert!(parse_feature_gates("feature-gates", "A").is_err());
        assert!(parse_feature_gates("feature-gates", "A=maybe").is_err());

        let items = parse_vmodule("vmodule", "proxier*=4,sync=2").expect("valid");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].file_pattern, "proxier*");
        assert_eq!(items[1].verbosity, 2);
        assert!(parse_vmodule("vmodule", "=3").is_err());
        assert!(parse_vmodule("vmodule", "a=x").is_err());
    }

    #[test]
    fn lists_split_on_commas_and_repeats_append() {
        let values = vec![
            "10.0.0.0/8, 192.168.0.0/16".to_string(),
            "primary".to_string(),
        ];
        assert_eq!(
            parse_list(&values),
            vec!["10.0.0.0/8", "192.168.0.0/16", "primary"]
        );
        assert!(parse_list(&[String::new()]).is_empty());
    }
}
