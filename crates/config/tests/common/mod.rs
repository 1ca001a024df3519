//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use kp_config::{ConfigError, Loaded};

/// A config file in its own temporary directory (removed on drop).
pub struct TempConfig {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TempConfig {
    pub fn new(name: &str, contents: &str) -> TempConfig {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write config");
        TempConfig { _dir: dir, path }
    }

    pub fn flag(&self) -> String {
        format!("--config={}", self.path.display())
    }
}

pub fn load(args: &[&str]) -> Result<Loaded, ConfigError> {
    kp_config::load(args.iter().copied())
}

pub fn load_ok(args: &[&str]) -> Loaded {
    match load(args) {
        Ok(loaded) => loaded,
        Err(err) => panic!("{args:?} should load: {err}"),
    }
}

pub fn load_err(args: &[&str]) -> String {
    match load(args) {
        Ok(loaded) => panic!("{args:?} should fail, loaded {:?}", loaded.settings),
        Err(err) => err.to_string(),
    }
}

pub const HEADER: &str =
    "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
