//! Errors from loading the configuration. Every variant displays as ONE line that
//! names the flag or field and the offending value, so the binary can log it as-is.

use std::path::PathBuf;

/// Why the command line or config file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A flag upstream kube-proxy does not have (pflag's wording).
    #[error("unknown flag: {flag}")]
    UnknownFlag { flag: String },
    #[error("flag needs an argument: {flag}")]
    MissingFlagValue { flag: String },
    #[error("invalid value {value:?} for flag --{flag}: {reason}")]
    InvalidFlagValue {
        flag: String,
        value: String,
        reason: String,
    },
    /// kube-proxy takes no positional arguments.
    #[error("unexpected argument {arg:?}: kube-proxy takes no positional arguments")]
    UnexpectedArgument { arg: String },
    #[error("invalid command line: {reason}")]
    CommandLine { reason: String },
    /// The file cannot be read or decoded.
    #[error("config file {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// A decoded file holds a value validation rejects.
    #[error("config file {}: {field}: invalid value {value}: {reason}", path.display())]
    InvalidFileField {
        path: PathBuf,
        field: String,
        value: String,
        reason: String,
    },
    /// A value validation rejects that came from neither a flag nor a file.
    #[error("configuration {field}: invalid value {value}: {reason}")]
    InvalidField {
        field: String,
        value: String,
        reason: String,
    },
    #[error("cannot write config file {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
}

/// Collapses a message onto one line (serde and clap messages may span several).
pub(crate) fn one_line(message: impl AsRef<str>) -> String {
    message
        .as_ref()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A validation failure before we know whether a flag, the file or a default set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    /// JSON path in the config file, e.g. `iptables.masqueradeBit`.
    pub field: String,
    /// The value, rendered for humans (strings quoted).
    pub value: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        FieldError {
            field: field.into(),
            value: value.into(),
            reason: one_line(reason.into()),
        }
    }

    /// For string values: quotes them like Go's `%q`.
    pub fn quoted(field: impl Into<String>, value: &str, reason: impl Into<String>) -> Self {
        FieldError::new(field, format!("{value:?}"), reason)
    }
}
