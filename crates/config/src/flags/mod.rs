//! The upstream kube-proxy command line: every flag it accepts, parsed with clap into
//! pflag semantics (`--flag=value`, `--flag value`, booleans as `--flag` or
//! `--flag=true|false`, `-v 2`, underscores normalised to dashes like
//! `cliflag.WordSepNormalizeFunc`).

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, Command};

use crate::error::{ConfigError, one_line};

mod table;

use FlagKind::{Bool, OptionalValue, Value};
pub use table::{
    FLAG_SPECS, FlagKind, FlagSpec, FlagSupport, UPSTREAM_FLAGS, flag_spec, help_text,
};

/// Flags given on the command line, with every value in order of appearance.
#[derive(Debug, Default)]
pub(crate) struct ParsedFlags {
    pub set: Vec<(&'static FlagSpec, Vec<String>)>,
}

impl ParsedFlags {
    /// The last value of a flag (pflag: the last occurrence wins).
    pub fn last(&self, name: &str) -> Option<&str> {
        self.all(name)
            .and_then(|values| values.last())
            .map(String::as_str)
    }

    pub fn all(&self, name: &str) -> Option<&[String]> {
        self.set
            .iter()
            .find(|(spec, _)| spec.name == name)
            .map(|(_, values)| values.as_slice())
    }
}

fn command() -> Command {
    let mut command = Command::new("kube-proxy")
        .no_binary_name(true)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .disable_help_subcommand(true);
    for spec in FLAG_SPECS {
        let mut arg = Arg::new(spec.name)
            .long(spec.name)
            .action(ArgAction::Append)
            .value_parser(clap::value_parser!(String));
        if let Some(short) = spec.short {
            arg = arg.short(short);
        }
        arg = match spec.kind {
            Bool | OptionalValue => arg
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true"),
            // pflag takes the next word as the value even when it starts with `-`.
            Value => arg.num_args(1).allow_hyphen_values(true),
        };
        command = command.arg(arg);
    }
    command
}

/// Prepares argv for clap the way pflag/cobra read it: `--log_dir=x` becomes
/// `--log-dir=x` (names only, values untouched); single-dash long forms such as
/// `-config=x` and anything after `--` are rejected; non-UTF-8 arguments are errors.
fn normalize(args: Vec<OsString>) -> Result<Vec<String>, ConfigError> {
    let mut normalized = Vec::with_capacity(args.len());
    let mut after_terminator = false;
    // The previous word was a value flag without `=`, so this word is its value.
    let mut is_value = false;
    for arg in args {
        let text = arg.into_string().map_err(|raw| ConfigError::CommandLine {
            reason: format!("argument {raw:?} is not valid UTF-8"),
        })?;
        if std::mem::take(&mut is_value) {
            normalized.push(text);
            continue;
        }
        if after_terminator {
            // cobra ignores empty arguments; anything else is a positional argument.
            if text.is_empty() {
                continue;
            }
            return Err(ConfigError::UnexpectedArgument { arg: text });
        }
        if text == "--" {
            after_terminator = true;
            continue;
        }
        if let Some(long) = text.strip_prefix("--") {
            let rewritten = match long.split_once('=') {
                Some((name, value)) => format!("--{}={value}", name.replace('_', "-")),
                None => {
                    let name = long.replace('_', "-");
                    is_value = flag_spec(&name).is_some_and(|spec| spec.kind == Value);
                    format!("--{name}")
                }
            };
            normalized.push(rewritten);
            continue;
        }
        if text.len() > 1 && text.starts_with('-') {
            // Only -v and -h exist as shorthands; `-config=x` is not a pflag form.
            if !(text.starts_with("-v") || text.starts_with("-h")) {
                let flag = text.split('=').next().unwrap_or(&text).to_string();
                return Err(ConfigError::UnknownFlag { flag });
            }
            is_value = text == "-v";
        }
        normalized.push(text);
    }
    Ok(normalized)
}

/// Parses argv (without the program name).
pub(crate) fn parse_command_line<I, T>(args: I) -> Result<ParsedFlags, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = normalize(args.into_iter().map(Into::into).collect())?;
    let matches = command()
        .try_get_matches_from(args)
        .map_err(|err| map_clap_error(&err))?;
    let mut parsed = ParsedFlags::default();
    for spec in FLAG_SPECS {
        if let Some(values) = matches.get_many::<String>(spec.name) {
            parsed.set.push((spec, values.cloned().collect()));
        }
    }
    Ok(parsed)
}

fn context_text(err: &clap::Error, kind: ContextKind) -> Option<String> {
    match err.get(kind)? {
        ContextValue::String(text) => Some(text.clone()),
        ContextValue::Strings(texts) => texts.first().cloned(),
        _ => None,
    }
}

/// Maps clap's multi-line errors to one-line [`ConfigError`]s in pflag's words.
fn map_clap_error(err: &clap::Error) -> ConfigError {
    let invalid_arg = context_text(err, ContextKind::InvalidArg);
    match (err.kind(), invalid_arg) {
        (ErrorKind::UnknownArgument, Some(arg)) if arg.starts_with('-') => {
            ConfigError::UnknownFlag { flag: arg }
        }
        (ErrorKind::UnknownArgument, Some(arg)) => ConfigError::UnexpectedArgument { arg },
        (ErrorKind::InvalidValue | ErrorKind::WrongNumberOfValues, Some(arg))
            if context_text(err, ContextKind::InvalidValue).is_none_or(|v| v.is_empty()) =>
        {
            let flag = arg.split_whitespace().next().unwrap_or(&arg).to_string();
            ConfigError::MissingFlagValue { flag }
        }
        _ => {
            let rendered = err.render().to_string();
            let first_line = rendered.lines().next().unwrap_or_default();
            ConfigError::CommandLine {
                reason: one_line(first_line.trim_start_matches("error: ")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ParsedFlags, ConfigError> {
        parse_command_line(args.iter().copied())
    }

    #[test]
    fn flag_names_are_unique_and_match_the_constant() {
        let mut names: Vec<&str> = FLAG_SPECS.iter().map(|spec| spec.name).collect();
        assert_eq!(names, UPSTREAM_FLAGS);
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FLAG_SPECS.len());
    }

    #[test]
    fn pflag_value_syntaxes() {
        let parsed = parse(&[
            "--config=/a",
            "--kubeconfig",
            "/k",
            "-v",
            "4",
            "--oom-score-adj",
            "-500",
            "--masquerade-all",
            "--ipvs-strict-arp=false",
            "--log_dir=/var/log",
        ])
        .expect("valid command line");
        assert_eq!(parsed.last("config"), Some("/a"));
        assert_eq!(parsed.last("kubeconfig"), Some("/k"));
        assert_eq!(parsed.last("v"), Some("4"));
        assert_eq!(parsed.last("oom-score-adj"), Some("-500"));
        assert_eq!(parsed.last("masquerade-all"), Some("true"));
        assert_eq!(parsed.last("ipvs-strict-arp"), Some("false"));
        assert_eq!(parsed.last("log-dir"), Some("/var/log"));
        assert!(parsed.all("cleanup").is_none());
    }

    #[test]
    fn short_verbosity_forms_and_repeats() {
        for form in [
            &["-v=3"][..],
            &["-v3"][..],
            &["--v=3"][..],
            &["--v", "3"][..],
        ] {
            assert_eq!(
                parse(form).expect("parses").last("v"),
                Some("3"),
                "{form:?}"
            );
        }
        let parsed = parse(&["--v=1", "--v=5"]).expect("repeats allowed");
        assert_eq!(
            parsed.all("v"),
            Some(&["1".to_string(), "5".to_string()][..])
        );
        assert_eq!(parsed.last("v"), Some("5"));
    }

    #[test]
    fn empty_values_after_equals_are_kept() {
        let parsed = parse(&["--metrics-bind-address="]).expect("empty value allowed");
        assert_eq!(parsed.last("metrics-bind-address"), Some(""));
    }

    #[test]
    fn errors_are_one_line_and_in_pflag_words() {
        let unknown = parse(&["--foo"]).expect_err("unknown flag").to_string();
        assert_eq!(unknown, "unknown flag: --foo");
        let missing = parse(&["--config"]).expect_err("needs a value").to_string();
        assert_eq!(missing, "flag needs an argument: --config");
        let positional = parse(&["--masquerade-all", "false"]).expect_err("bool takes no word");
        assert!(
            matches!(positional, ConfigError::UnexpectedArgument { ref arg } if arg == "false")
        );
        let single_dash = parse(&["-config=/a"])
            .expect_err("not a pflag form")
            .to_string();
        assert_eq!(single_dash, "unknown flag: -config");
        let after_terminator = parse(&["--", "--foo"]).expect_err("positional after --");
        assert!(
            matches!(after_terminator, ConfigError::UnexpectedArgument { ref arg } if arg == "--foo")
        );
        assert!(
            parse(&["--", ""]).is_ok(),
            "empty arguments are ignored like cobra does"
        );
    }

    #[test]
    fn help_mentions_every_flag() {
        let help = help_text();
        for name in UPSTREAM_FLAGS {
            assert!(help.contains(&format!("--{name}")), "{name}");
        }
    }
}
