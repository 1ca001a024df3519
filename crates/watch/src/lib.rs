//! Watchers for what kube-proxy consumes: Services, EndpointSlices and its own Node, with
//! upstream's label and field selectors.
//!
//! Each watcher turns kube-runtime's event stream into plain [`ObjectEvent`]s. A relist
//! (after a 410 Gone or a dropped watch) re-applies every object and deletes only those
//! that really disappeared, so a broken connection never removes working rules.

use std::collections::HashSet;
use std::fmt::Debug;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// Services and EndpointSlices handled by another proxy, or headless, are not ours.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// Headless services have no cluster IP to proxy.
pub const SERVICE_FIELD_SELECTOR: &str = "spec.clusterIP!=None";

/// What a watcher reports.
#[derive(Debug, Clone)]
pub enum ObjectEvent<K> {
    Applied(K),
    Deleted {
        namespace: Option<String>,
        name: String,
    },
    /// The first complete list has been delivered (sent once per watcher).
    Synced,
}

/// The API server's answer to a watch from a resourceVersion it has not reached.
const TOO_LARGE_RESOURCE_VERSION: &str = "Too large resource version";

/// Watcher configuration for Services.
pub fn service_config() -> watcher::Config {
    watcher::Config::default()
        .labels(PROXY_LABEL_SELECTOR)
        .fields(SERVICE_FIELD_SELECTOR)
}

/// Watcher configuration for EndpointSlices.
pub fn endpoint_slice_config() -> watcher::Config {
    watcher::Config::default().labels(PROXY_LABEL_SELECTOR)
}

/// Watcher configuration for the proxy's own Node.
pub fn node_config(node_name: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("metadata.name={node_name}"))
}

fn key_of<K: Resource>(obj: &K) -> (Option<String>, String) {
    (
        obj.meta().namespace.clone(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

/// Runs one watcher until the stream ends (it does not: errors are retried with backoff),
/// calling `on_event` for every change.
pub async fn run_watcher<K>(
    api: Api<K>,
    config: watcher::Config,
    mut on_event: impl FnMut(ObjectEvent<K>),
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    let mut known: HashSet<(Option<String>, String)> = HashSet::new();
    let mut relist: Option<HashSet<(Option<String>, String)>> = None;
    let mut synced = false;
    let mut stream = watcher::watcher(api.clone(), config.clone())
        .default_backoff()
        .boxed();
    while let Some(item) = stream.next().await {
        match item {
            Ok(Event::Init) => relist = Some(HashSet::new()),
            Ok(Event::InitApply(obj)) => {
                let key = key_of(&obj);
                if let Some(seen) = relist.as_mut() {
                    seen.insert(key.clone());
                }
                known.insert(key);
                on_event(ObjectEvent::Applied(obj));
            }
            Ok(Event::InitDone) => {
                let seen = relist.take().unwrap_or_default();
                let gone: Vec<_> = known.difference(&seen).cloned().collect();
                for (namespace, name) in gone {
                    known.remove(&(namespace.clone(), name.clone()));
                    on_event(ObjectEvent::Deleted { namespace, name });
                }
                if !synced {
                    synced = true;
                    tracing::info!(kind, objects = known.len(), "initial list complete");
                    on_event(ObjectEvent::Synced);
                } else {
                    tracing::info!(kind, objects = known.len(), "relist complete");
                }
            }
            Ok(Event::Apply(obj)) => {
                known.insert(key_of(&obj));
                on_event(ObjectEvent::Applied(obj));
            }
            Ok(Event::Delete(obj)) => {
                let (namespace, name) = key_of(&obj);
                known.remove(&(namespace.clone(), name.clone()));
                on_event(ObjectEvent::Deleted { namespace, name });
            }
            Err(e) => {
                let error = error_chain(&e);
                if error.contains(TOO_LARGE_RESOURCE_VERSION) {
                    // The server's history went back (etcd restored from a backup): resuming
                    // from our version can never work. Relist from scratch, as client-go's
                    // reflector does; the relist deletes only what really disappeared.
                    tracing::warn!(
                        kind,
                        error,
                        "API server's resourceVersion history was reset; relisting"
                    );
                    stream = watcher::watcher(api.clone(), config.clone())
                        .default_backoff()
                        .boxed();
                    continue;
                }
                // Retried with backoff by the stream; state is kept as it is.
                tracing::warn!(kind, error, "watch failed; retrying, rules are kept");
            }
        }
    }
}

/// The three watchers kube-proxy runs.
pub struct Watchers {
    pub services: Api<Service>,
    pub slices: Api<EndpointSlice>,
    pub nodes: Api<Node>,
}

impl Watchers {
    pub fn new(client: Client) -> Self {
        Watchers {
            services: Api::all(client.clone()),
            slices: Api::all(client.clone()),
            nodes: Api::all(client),
        }
    }
}

/// `namespace/name` of an object for logs, with control characters and quotes escaped so
/// a hostile name cannot forge log lines.
pub fn object_name<K: Resource>(obj: &K) -> String {
    let raw = match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    };
    raw.escape_debug().to_string()
}

/// An error with its causes (`a: b: c`): kube's errors say "client error (Connect)" and
/// keep the reason, such as an untrusted certificate, in their sources.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn error_chain_names_every_cause_once() {
        let e = Layer(
            "client error (Connect)",
            Some(Box::new(Layer(
                "Connect",
                Some(Box::new(Layer(
                    "invalid peer certificate: UnknownIssuer",
                    None,
                ))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
    }
}
