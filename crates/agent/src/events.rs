//! Kubernetes Events, as upstream emits them (events.k8s.io/v1 through kube-runtime's
//! Recorder). Publishing is asynchronous and best effort; the sync thread only enqueues.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

#[derive(Clone)]
pub struct EventSink {
    recorder: Arc<Recorder>,
    handle: tokio::runtime::Handle,
    node_name: String,
}

impl EventSink {
    pub fn new(client: kube::Client, node_name: &str, handle: tokio::runtime::Handle) -> Self {
        let reporter = Reporter {
            controller: "kube-proxy".into(),
            instance: Some(node_name.to_string()),
        };
        EventSink {
            recorder: Arc::new(Recorder::new(client, reporter)),
            handle,
            node_name: node_name.to_string(),
        }
    }

    fn publish(&self, ev: Event, reference: ObjectReference) {
        let recorder = self.recorder.clone();
        self.handle.spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::warn!(error = kp_watch::error_chain(&e), reason = %ev.reason, "cannot publish event");
            }
        });
    }

    /// An event about our own Node (e.g. `Starting`).
    pub fn node(&self, type_: EventType, reason: &str, action: &str, note: String) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node_name.clone()),
            ..Default::default()
        };
        self.publish(
            Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: action.into(),
                secondary: None,
            },
            reference,
        );
    }

    /// A warning about a Service (e.g. `FailedToStartServiceHealthcheck`).
    pub fn service_warning(
        &self,
        namespace: &str,
        name: &str,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(namespace.to_string()),
            name: Some(name.to_string()),
            ..Default::default()
        };
        self.publish(
            Event {
                type_: EventType::Warning,
                reason: reason.into(),
                note: Some(note),
                action: action.into(),
                secondary: None,
            },
            reference,
        );
    }
}
