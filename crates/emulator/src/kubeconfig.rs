//! Kubeconfig documents pointing kubectl or kube-rs at the emulator.

use base64::Engine as _;
use serde_json::{Value, json};

/// Name used for the cluster, user and context entries.
pub const ENTRY_NAME: &str = "emulator";

/// A kubeconfig with the CA inlined and the given user credentials.
pub fn render(server_url: &str, ca_pem: &str, user: Value) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": ENTRY_NAME,
            "cluster": {"server": server_url, "certificate-authority-data": b64(ca_pem)},
        }],
        "users": [{"name": ENTRY_NAME, "user": user}],
        "contexts": [{
            "name": ENTRY_NAME,
            "context": {"cluster": ENTRY_NAME, "user": ENTRY_NAME, "namespace": "default"},
        }],
        "current-context": ENTRY_NAME,
        "preferences": {},
    });
    // A tree of strings and maps always serializes; fall back to JSON (valid YAML) anyway.
    serde_yaml::to_string(&config).unwrap_or_else(|_| config.to_string())
}

pub fn token_user(token: &str) -> Value {
    json!({"token": token})
}

pub fn client_cert_user(cert_pem: &str, key_pem: &str) -> Value {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_inlines_ca_and_token() {
        let yaml = render("https://127.0.0.1:6443", "CA-PEM", token_user("secret"));
        let parsed: Value = serde_yaml::from_str(&yaml).expect("yaml");
        assert_eq!(parsed["current-context"], "emulator");
        assert_eq!(
            parsed["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        let ca = parsed["clusters"][0]["cluster"]["certificate-authority-data"]
            .as_str()
            .expect("ca");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(ca)
            .expect("b64");
        assert_eq!(decoded, b"CA-PEM");
        assert_eq!(parsed["users"][0]["user"]["token"], "secret");
    }
}
