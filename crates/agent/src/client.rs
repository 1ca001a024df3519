//! Kubernetes client from `--kubeconfig` / `--master` or the in-cluster service account.

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub async fn build_client(settings: &kp_config::Settings) -> anyhow::Result<Client> {
    let mut config = match &settings.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => match &settings.master {
            Some(master) => Config::new(
                master
                    .parse()
                    .with_context(|| format!("--master {master:?}"))?,
            ),
            None => {
                Config::incluster().context("no --kubeconfig given and not running in a cluster")?
            }
        },
    };
    if let Some(master) = &settings.master {
        config.cluster_url = master
            .parse()
            .with_context(|| format!("--master {master:?}"))?;
    }
    // The watchers back off and retry on their own. The client's built-in retries (15
    // attempts over ~3 minutes for 429/503/504) would also swallow the 504 "Too large
    // resource version" that tells a watcher to relist after etcd was restored.
    config.default_retry = false;
    Client::try_from(config).context("building the API client")
}
