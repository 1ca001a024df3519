//! Watch streams: newline-delimited JSON events replayed from the store's history, with
//! synthetic initial events, bookmarks, timeouts, 410 Expired, and forced disconnects.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::request::{ResourcePath, parse_selectors};
use super::resources::{self, ResourceId};
use super::selectors::Selectors;
use super::state::Shared;
use super::status::ApiError;
use super::store::{EventType, HistoryEvent, object_namespace};
use super::table::TableRequest;

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchStart {
    /// ADDED for every current object first (resourceVersion "" / "0", or WatchList).
    CurrentState { end_bookmark: bool },
    /// Every change after this resourceVersion.
    After(u64),
}

#[derive(Debug, Clone)]
struct WatchRequest {
    resource: ResourceId,
    namespace: Option<String>,
    selectors: Selectors,
    start: WatchStart,
    bookmarks: bool,
    timeout: Option<Duration>,
    /// Wrap each object in a one-row Table (kubectl get -w).
    table: Option<TableRequest>,
}

fn parse_watch_request(
    target: &ResourcePath,
    query: &HashMap<String, String>,
) -> Result<WatchRequest, ApiError> {
    let flag = |key: &str| {
        query
            .get(key)
            .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
    };
    let resource_version = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    let bookmarks = flag("allowWatchBookmarks");
    let start = if flag("sendInitialEvents") {
        if query.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") {
            return Err(ApiError::invalid(
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !bookmarks {
            return Err(ApiError::invalid(
                "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
            ));
        }
        WatchStart::CurrentState { end_bookmark: true }
    } else if resource_version.is_empty() || resource_version == "0" {
        WatchStart::CurrentState {
            end_bookmark: false,
        }
    } else {
        let rv = resource_version.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion: Invalid value: {resource_version:?}"
            ))
        })?;
        WatchStart::After(rv)
    };
    let timeout = match query.get("timeoutSeconds").map(String::as_str) {
        None | Some("") => None,
        Some(text) => {
            let seconds: u64 = text.parse().map_err(|_| {
                ApiError::bad_request(format!("timeoutSeconds: invalid value {text:?}"))
            })?;
            (seconds > 0).then(|| Duration::from_secs(seconds))
        }
    };
    Ok(WatchRequest {
        resource: target.resource,
        namespace: target.namespace.clone(),
        selectors: parse_selectors(query)?,
        start,
        bookmarks,
        timeout,
        table: None,
    })
}

/// Answers a watch request with a streaming body fed by a task.
pub fn start_watch(
    shared: &Arc<Shared>,
    target: &ResourcePath,
    query: &HashMap<String, String>,
    table: Option<TableRequest>,
) -> Result<Response<Body>, ApiError> {
    let mut request = parse_watch_request(target, query)?;
    request.table = table;
    if let WatchStart::After(rv) = request.start {
        let current = shared.store().resource_version();
        if rv > current {
            return Err(ApiError::too_large_resource_version(rv, current));
        }
    }
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let guard = OpenWatchGuard(shared.clone());
    tokio::spawn(async move {
        run_watch(&guard.0, request, tx).await;
        drop(guard);
    });
    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(Ok::<_, std::convert::Infallible>))
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Counts a watch as open for as long as its task runs.
struct OpenWatchGuard(Arc<Shared>);

impl Drop for OpenWatchGuard {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": event_type, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark_object(resource: ResourceId, resource_version: u64, initial_events_end: bool) -> Value {
    let rt = resources::resource(resource);
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata})
}

impl WatchRequest {
    fn object_event(&self, event_type: &str, object: &Value) -> Bytes {
        match &self.table {
            Some(table) => {
                let kind = resources::resource(self.resource).kind;
                let metadata =
                    json!({"resourceVersion": object.pointer("/metadata/resourceVersion")});
                event_line(
                    event_type,
                    &table.render(kind, std::slice::from_ref(object), metadata),
                )
            }
            None => event_line(event_type, object),
        }
    }

    fn visible(&self, object: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| object_namespace(object) == Some(ns))
            && self.selectors.matches(object)
    }

    /// What this watcher sees of a change: objects entering or leaving the selector
    /// appear as ADDED / DELETED, as on the real server.
    fn translate(&self, event: &HistoryEvent) -> Option<Bytes> {
        if event.resource != self.resource {
            return None;
        }
        let now = self.visible(&event.object);
        let event_type = match event.event_type {
            EventType::Added => now.then_some("ADDED"),
            EventType::Deleted => now.then_some("DELETED"),
            EventType::Modified => {
                let before = event.previous.as_ref().is_some_and(|p| self.visible(p));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }?;
        Some(self.object_event(event_type, &event.object))
    }
}

async fn run_watch(shared: &Shared, request: WatchRequest, tx: mpsc::Sender<Bytes>) {
    let mut updates = shared.resource_version_updates.clone();
    updates.borrow_and_update();
    let mut drops = shared.drop_generation.subscribe();
    let deadline = request.timeout.map(|t| Instant::now() + t);

    let start: Result<(u64, Vec<Bytes>), ApiError> = {
        let store = shared.store();
        match request.start {
            WatchStart::CurrentState { .. } => {
                let objects: Vec<Bytes> = store
                    .list(request.resource, request.namespace.as_deref(), None)
                    .filter(|(_, obj)| request.selectors.matches(obj))
                    .map(|(_, obj)| request.object_event("ADDED", obj))
                    .collect();
                Ok((store.resource_version(), objects))
            }
            WatchStart::After(rv) if rv < store.resume_floor() => {
                Err(ApiError::expired(rv, store.resume_floor()))
            }
            WatchStart::After(rv) => Ok((rv, Vec::new())),
        }
    };
    let (mut cursor, initial) = match start {
        Ok(start) => start,
        Err(expired) => {
            let _ = tx.send(event_line("ERROR", &expired.to_status())).await;
            return;
        }
    };
    for line in initial {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    if let WatchStart::CurrentState { end_bookmark: true } = request.start {
        let bookmark = bookmark_object(request.resource, cursor, true);
        if tx.send(event_line("BOOKMARK", &bookmark)).await.is_err() {
            return;
        }
    }

    let mut caught_up_once = false;
    let mut next_bookmark = Instant::now() + shared.bookmark_interval;
    loop {
        // A drop requested before this wake-up wins over changes made after it.
        if drops.has_changed().unwrap_or(true) || shared.shutdown.is_cancelled() {
            return;
        }
        updates.borrow_and_update();
        let batch = {
            let store = shared.store();
            store
                .events_after(cursor)
                .map(|events| (events, store.resource_version()))
        };
        let (events, current) = match batch {
            Ok(batch) => batch,
            Err(expired) => {
                let _ = tx.send(event_line("ERROR", &expired.to_status())).await;
                return;
            }
        };
        for event in &events {
            if let Some(line) = request.translate(event)
                && tx.send(line).await.is_err()
            {
                return;
            }
        }
        cursor = cursor.max(current);
        if request.bookmarks && (!caught_up_once || Instant::now() >= next_bookmark) {
            caught_up_once = true;
            next_bookmark = Instant::now() + shared.bookmark_interval;
            let bookmark = bookmark_object(request.resource, cursor, false);
            if tx.send(event_line("BOOKMARK", &bookmark)).await.is_err() {
                return;
            }
        }
        let bookmark_due = async {
            if request.bookmarks {
                tokio::time::sleep_until(next_bookmark).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let timed_out = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            biased;
            _ = drops.changed() => return,
            _ = shared.shutdown.cancelled() => return,
            _ = tx.closed() => return,
            changed = updates.changed() => if changed.is_err() { return },
            _ = bookmark_due => {}
            _ = timed_out => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> ResourcePath {
        ResourcePath {
            resource: resources::find_by_plural("", "v1", "services").expect("svc"),
            namespace: Some("ns".into()),
            name: None,
            subresource: None,
        }
    }

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn watch_start_modes() {
        let parsed = |pairs: &[(&str, &str)]| parse_watch_request(&target(), &query(pairs));
        assert_eq!(
            parsed(&[]).expect("ok").start,
            WatchStart::CurrentState {
                end_bookmark: false
            }
        );
        assert_eq!(
            parsed(&[("resourceVersion", "0")]).expect("ok").start,
            WatchStart::CurrentState {
                end_bookmark: false
            }
        );
        assert_eq!(
            parsed(&[("resourceVersion", "12")]).expect("ok").start,
            WatchStart::After(12)
        );
        let watch_list = parsed(&[
            ("sendInitialEvents", "true"),
            ("resourceVersionMatch", "NotOlderThan"),
            ("allowWatchBookmarks", "true"),
        ])
        .expect("ok");
        assert_eq!(
            watch_list.start,
            WatchStart::CurrentState { end_bookmark: true }
        );
        assert_eq!(
            parsed(&[("sendInitialEvents", "true")])
                .expect_err("invalid")
                .code,
            422
        );
        assert_eq!(
            parsed(&[("resourceVersion", "x")]).expect_err("bad").code,
            400
        );
        assert_eq!(
            parsed(&[("timeoutSeconds", "5")]).expect("ok").timeout,
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let mut q = query(&[("labelSelector", "app=web")]);
        q.insert("resourceVersion".into(), "1".into());
        let request = parse_watch_request(&target(), &q).expect("ok");
        let obj = |app: &str| json!({"metadata": {"name": "s", "namespace": "ns", "labels": {"app": app}}});
        let modified = |before: &str, after: &str| HistoryEvent {
            resource_version: 2,
            resource: request.resource,
            event_type: EventType::Modified,
            object: obj(after),
            previous: Some(obj(before)),
        };
        let kind_of = |event: &HistoryEvent| {
            request.translate(event).map(|line| {
                let v: Value = serde_json::from_slice(&line).expect("json");
                v["type"].as_str().unwrap_or_default().to_string()
            })
        };
        assert_eq!(
            kind_of(&modified("web", "web")).as_deref(),
            Some("MODIFIED")
        );
        assert_eq!(kind_of(&modified("db", "web")).as_deref(), Some("ADDED"));
        assert_eq!(kind_of(&modified("web", "db")).as_deref(), Some("DELETED"));
        assert_eq!(kind_of(&modified("db", "db")), None);
        let mut other_ns = modified("web", "web");
        other_ns.object["metadata"]["namespace"] = json!("elsewhere");
        other_ns.previous = Some(other_ns.object.clone());
        assert_eq!(kind_of(&other_ns), None);
    }
}
