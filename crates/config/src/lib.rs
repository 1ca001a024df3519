//! kube-proxy's configuration layer: upstream-compatible flags plus the
//! `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration` file, merged,
//! defaulted and validated into typed [`Settings`].
//!
//! Pure: no kernel, network or async. The binary calls
//! `kp_config::load(std::env::args_os().skip(1))`.
//!
//! Order of work in [`load`]:
//! 1. parse the command line (unknown flag or bad syntax: error);
//! 2. read `--config` if given (YAML or JSON; unknown fields are warnings, as upstream's
//!    lenient fallback decoder makes them) or start from an empty object;
//! 3. apply upstream scheme defaults;
//! 4. overlay every flag set explicitly on the command line (flags win over the
//!    file; upstream ignores most flags when `--config` is given, we do not);
//! 5. apply Linux platform defaults (mode `iptables`, nftables `nodePortAddresses:
//!    [primary]`, `detectLocalMode: ClusterCIDR`);
//! 6. validate and build [`Settings`]; errors name the flag when a flag set the
//!    value, otherwise the file field.

mod defaults;
mod duration;
mod error;
mod file;
mod flags;
mod netparse;
mod overlay;
mod settings;
mod types;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub use defaults::{
    DEFAULT_HEALTHZ_PORT, DEFAULT_IPVS_SCHEDULER, DEFAULT_METRICS_PORT, DEFAULT_OOM_SCORE_ADJ,
    default_config,
};
pub use duration::{DurationError, GoDuration, format_go_duration, parse_go_duration};
pub use error::ConfigError;
pub use file::{to_yaml, write_config_file};
pub use flags::{
    FLAG_SPECS, FlagKind, FlagSpec, FlagSupport, UPSTREAM_FLAGS, flag_spec, help_text,
};
pub use settings::{
    ConntrackSettings, DetectLocalMode, IpvsSettings, Mode, NodePortAddress, Settings,
};
pub use types::{
    API_VERSION, ClientConnectionConfiguration, DetectLocalConfiguration, FormatOptions, KIND,
    KubeProxyConfiguration, KubeProxyConntrackConfiguration, KubeProxyIPTablesConfiguration,
    KubeProxyIPVSConfiguration, KubeProxyNFTablesConfiguration, KubeProxyWinkernelConfiguration,
    LoggingConfiguration, OutputRoutingOptions, Quantity, VModuleItem,
};

use error::FieldError;
use overlay::FlagSources;

/// The result of [`load`].
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Effective, defaulted configuration: what `/configz` and `--write-config-to` show.
    pub config: KubeProxyConfiguration,
    /// Typed view the daemon uses.
    pub settings: Settings,
    /// Non-fatal findings (ignored fields, flags without effect, deprecations).
    pub warnings: Vec<String>,
    pub cleanup: bool,
    pub write_config_to: Option<PathBuf>,
    pub show_version: bool,
    pub init_only: bool,
    /// `--help`/`-h`: print [`help_text`] and exit. Config is not read in that case.
    pub show_help: bool,
    /// The `--config` path; upstream exits when this file changes, so the daemon may
    /// watch it.
    pub config_file: Option<PathBuf>,
}

/// Parses argv WITHOUT the program name, reads `--config`, merges, defaults and
/// validates. With `--help` or `--version` only the command line is checked.
pub fn load<I, T>(args: I) -> Result<Loaded, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let flags = flags::parse_command_line(args)?;
    let mut warnings = Vec::new();
    let options = overlay::process_options(&flags, &mut warnings)?;
    if options.show_help || options.show_version {
        let mut config = default_config();
        defaults::apply_platform_defaults(&mut config);
        let settings = settings::build_settings(&config, options.master.clone(), &mut warnings)
            .map_err(|err| attribute(err, &FlagSources::default(), None))?;
        return Ok(Loaded {
            config,
            settings,
            warnings,
            cleanup: false,
            write_config_to: None,
            show_version: options.show_version,
            init_only: false,
            show_help: options.show_help,
            config_file: options.config_file,
        });
    }

    let mut config = match &options.config_file {
        Some(path) => read_config_file(path, &mut warnings)?,
        None => KubeProxyConfiguration {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            ..KubeProxyConfiguration::default()
        },
    };
    defaults::apply_scheme_defaults(&mut config);
    let mut sources = FlagSources::default();
    overlay::apply_flags(&mut config, &flags, &mut sources, &mut warnings)?;
    defaults::apply_platform_defaults(&mut config);
    let settings = settings::build_settings(&config, options.master.clone(), &mut warnings)
        .map_err(|err| attribute(err, &sources, options.config_file.as_deref()))?;
    Ok(Loaded {
        config,
        settings,
        warnings,
        cleanup: options.cleanup,
        write_config_to: options.write_config_to,
        show_version: false,
        init_only: options.init_only,
        show_help: false,
        config_file: options.config_file,
    })
}

fn read_config_file(
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<KubeProxyConfiguration, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::File {
        path: path.to_path_buf(),
        reason: error::one_line(format!("cannot read: {err}")),
    })?;
    let decoded = file::decode_config(path, &text)?;
    let shown = path.display();
    for field in &decoded.unknown_fields {
        warnings.push(format!(
            "config file {shown}: ignoring unknown field {field:?}"
        ));
    }
    let config = decoded.config;
    let mut no_effect = |field: &str| {
        warnings.push(format!("config file {shown}: {field} has no effect yet"));
    };
    if config.enable_profiling {
        no_effect("enableProfiling");
    }
    if !config.show_hidden_metrics_for_version.is_empty() {
        no_effect("showHiddenMetricsForVersion");
    }
    if config.iptables.snat_node_internal_ip == Some(true) {
        no_effect("iptables.snatNodeInternalIP");
    }
    if !config.logging.vmodule.is_empty() {
        no_effect("logging.vmodule");
    }
    if !config.port_range.is_empty() {
        no_effect("portRange (unused upstream since the userspace proxy was removed)");
    }
    if config.winkernel != KubeProxyWinkernelConfiguration::default()
        || config.windows_run_as_service
    {
        no_effect("winkernel/windowsRunAsService (Windows-only)");
    }
    Ok(config)
}

/// Turns a validation failure into an error naming the flag that set the value, or
/// else the file field.
fn attribute(err: FieldError, sources: &FlagSources, config_file: Option<&Path>) -> ConfigError {
    let base_field = err.field.split('[').next().unwrap_or(&err.field);
    if let Some((flag, raw)) = sources.flag_for(base_field) {
        return ConfigError::InvalidFlagValue {
            flag: flag.clone(),
            value: raw.clone(),
            reason: err.reason,
        };
    }
    // A detector whose companion setting is missing: blame --detect-local-mode.
    if err.field.starts_with("detectLocal.")
        && let Some((flag, raw)) = sources.flag_for("detectLocalMode")
    {
        return ConfigError::InvalidFlagValue {
            flag: flag.clone(),
            value: raw.clone(),
            reason: format!("{} must be set too ({})", err.field, err.reason),
        };
    }
    // min > sync where only the sync period came from a flag: blame that flag.
    if let Some(section) = err.field.strip_suffix(".minSyncPeriod")
        && let Some((flag, raw)) = sources.flag_for(&format!("{section}.syncPeriod"))
    {
        return ConfigError::InvalidFlagValue {
            flag: flag.clone(),
            value: raw.clone(),
            reason: format!(
                "must be greater than or equal to {section}.minSyncPeriod ({})",
                err.value
            ),
        };
    }
    match config_file {
        Some(path) => ConfigError::InvalidFileField {
            path: path.to_path_buf(),
            field: err.field,
            value: err.value,
            reason: err.reason,
        },
        None => ConfigError::InvalidField {
            field: err.field,
            value: err.value,
            reason: err.reason,
        },
    }
}
