//! Reading and writing the `--config` file (YAML or JSON).
//!
//! Upstream decodes strictly first; when the only problem is strictness (unknown or
//! duplicate fields) it decodes again leniently and logs a warning. We do the same for
//! unknown fields: they become warnings naming every one, and the file loads. Type
//! errors, a wrong `apiVersion`/`kind` and malformed YAML/JSON are errors.

use std::path::Path;

use serde_json::Value;

use crate::error::{ConfigError, one_line};
use crate::types::{API_VERSION, KIND, KubeProxyConfiguration};

/// A decoded file plus the fields we did not recognise (dotted JSON paths).
#[derive(Debug)]
pub(crate) struct DecodedFile {
    pub config: KubeProxyConfiguration,
    pub unknown_fields: Vec<String>,
}

/// Decodes file contents; `path` only labels errors.
pub(crate) fn decode_config(path: &Path, text: &str) -> Result<DecodedFile, ConfigError> {
    let file_error = |reason: String| ConfigError::File {
        path: path.to_path_buf(),
        reason: one_line(reason),
    };
    let mut value: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|err| file_error(format!("invalid JSON: {err}")))?
    } else {
        serde_yaml::from_str(text).map_err(|err| file_error(format!("invalid YAML: {err}")))?
    };
    let Value::Object(object) = &value else {
        return Err(file_error(format!(
            "expected a {KIND} object, found {}",
            describe(&value)
        )));
    };
    check_type_meta(object, "apiVersion", API_VERSION).map_err(file_error)?;
    check_type_meta(object, "kind", KIND).map_err(file_error)?;
    // Go leaves a field at its zero value for `null`, exactly as if it were absent.
    strip_nulls(&mut value);

    let mut unknown_fields = Vec::new();
    let mut record_unknown = |path: serde_ignored::Path<'_>| {
        unknown_fields.push(path.to_string());
    };
    let ignoring = serde_ignored::Deserializer::new(value, &mut record_unknown);
    let config: KubeProxyConfiguration =
        serde_path_to_error::deserialize(ignoring).map_err(|err| {
            let field = err.path().to_string();
            file_error(format!("{field}: {}", err.into_inner()))
        })?;
    // Map order depends on serde_json features; report in a stable order.
    unknown_fields.sort();
    Ok(DecodedFile {
        config,
        unknown_fields,
    })
}

fn check_type_meta(
    object: &serde_json::Map<String, Value>,
    key: &str,
    expected: &str,
) -> Result<(), String> {
    match object.get(key) {
        Some(Value::String(found)) if found == expected => Ok(()),
        Some(Value::String(found)) if found.is_empty() => {
            Err(format!("{key} is missing (want {expected:?})"))
        }
        None | Some(Value::Null) => Err(format!("{key} is missing (want {expected:?})")),
        Some(Value::String(found)) => Err(format!(
            "{key}: {found:?} is not supported (want {expected:?})"
        )),
        Some(other) => Err(format!(
            "{key}: expected a string, found {}",
            describe(other)
        )),
    }
}

fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(object) => {
            object.retain(|_, field| !field.is_null());
            object.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "an empty document",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The configuration as YAML, in the shape `--write-config-to` produces; loading it
/// back with `--config` yields the same configuration.
pub fn to_yaml(config: &KubeProxyConfiguration) -> String {
    // The struct holds only strings, numbers, booleans and string-keyed maps, which
    // always serialize; the fallback keeps this function total without panicking.
    serde_yaml::to_string(config).unwrap_or_else(|err| {
        format!(
            "# cannot serialize configuration: {}\n",
            one_line(err.to_string())
        )
    })
}

/// Writes [`to_yaml`] output to `path` (what `--write-config-to` does before exiting).
pub fn write_config_file(path: &Path, config: &KubeProxyConfiguration) -> Result<(), ConfigError> {
    std::fs::write(path, to_yaml(config)).map_err(|err| ConfigError::Write {
        path: path.to_path_buf(),
        reason: one_line(err.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::GoDuration;

    fn decode(text: &str) -> Result<DecodedFile, ConfigError> {
        decode_config(Path::new("/x.yaml"), text)
    }

    const HEADER: &str =
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

    #[test]
    fn nulls_mean_zero_values_like_go() {
        let text = format!(
            "{HEADER}mode: null\niptables:\n  masqueradeBit: null\n  syncPeriod: 10s\nnodePortAddresses: null\n"
        );
        let decoded = decode(&text).expect("decodes");
        assert_eq!(decoded.config.mode, "");
        assert_eq!(decoded.config.iptables.masquerade_bit, None);
        assert_eq!(
            decoded.config.iptables.sync_period,
            GoDuration::from_secs(10)
        );
        assert!(decoded.unknown_fields.is_empty());
    }

    #[test]
    fn unknown_fields_are_collected_with_their_paths() {
        let text = format!("{HEADER}udpIdleTimeout: 250ms\niptables:\n  masqueradeAl: true\n");
        let decoded = decode(&text).expect("unknown fields do not fail decoding");
        assert_eq!(
            decoded.unknown_fields,
            vec![
                "iptables.masqueradeAl".to_string(),
                "udpIdleTimeout".to_string()
            ]
        );
    }

    #[test]
    fn type_errors_name_the_field() {
        let text = format!("{HEADER}iptables:\n  masqueradeBit: fourteen\n");
        let message = decode(&text).expect_err("string is not an int").to_string();
        assert!(
            message.starts_with("config file /x.yaml: iptables.masqueradeBit: "),
            "{message}"
        );
        assert!(!message.contains('\n'));

        let text = format!("{HEADER}configSyncPeriod: 15 minutes\n");
        let message = decode(&text).expect_err("bad duration").to_string();
        assert!(message.contains("configSyncPeriod"), "{message}");
        assert!(message.contains("15 minutes"), "{message}");
    }

    #[test]
    fn type_meta_is_required_and_checked() {
        let missing = decode("mode: iptables\n")
            .expect_err("no apiVersion")
            .to_string();
        assert!(missing.contains("apiVersion is missing"), "{missing}");
        let wrong =
            decode("apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n")
                .expect_err("unsupported version")
                .to_string();
        assert!(
            wrong.contains("\"kubeproxy.config.k8s.io/v1alpha2\" is not supported"),
            "{wrong}"
        );
        let kind =
            decode("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n")
                .expect_err("wrong kind")
                .to_string();
        assert!(kind.contains("kind: \"KubeletConfiguration\""), "{kind}");
        assert!(decode("").is_err());
        assert!(decode("- a\n- b\n").is_err());
    }

    #[test]
    fn malformed_documents_are_one_line_errors() {
        let message = decode("apiVersion: [\n")
            .expect_err("broken yaml")
            .to_string();
        assert!(
            message.starts_with("config file /x.yaml: invalid YAML"),
            "{message}"
        );
        assert!(!message.contains('\n'));
        let message = decode("{\"apiVersion\": }")
            .expect_err("broken json")
            .to_string();
        assert!(
            message.starts_with("config file /x.yaml: invalid JSON"),
            "{message}"
        );
    }
}
