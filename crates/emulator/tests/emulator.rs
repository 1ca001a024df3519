//! End-to-end tests of the API-server emulator over real HTTPS: kube-rs clients and
//! watchers (with fault injection) and the kubectl binary.

#[path = "emulator/support.rs"]
mod support;

#[path = "emulator/kubectl.rs"]
mod kubectl;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kp_emulator::EmulatorOptions;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};

use support::{
    Mirror, client, client_for, client_without_retries, endpoint_slice, service, start, start_with,
    upstream_service_config, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_lists_with_selectors_and_pages() {
    let emulator = start();
    emulator
        .apply(service(
            "a",
            "web",
            json!({"app": "web"}),
            Some("10.96.1.1"),
        ))
        .expect("apply");
    emulator
        .apply(service("a", "db", json!({"app": "db"}), None))
        .expect("apply");
    emulator
        .apply(service(
            "b",
            "web",
            json!({"app": "web", "tier": "front"}),
            None,
        ))
        .expect("apply");
    emulator
        .apply(service("b", "headless", json!({}), Some("None")))
        .expect("apply");
    let client = client(&emulator).await;
    let all: Api<Service> = Api::all(client.clone());

    let names = |list: kube::core::ObjectList<Service>| -> Vec<String> {
        list.items
            .iter()
            .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
            .collect()
    };
    let listed = all.list(&ListParams::default()).await.expect("list");
    assert_eq!(
        listed.metadata.resource_version,
        Some(emulator.resource_version().to_string())
    );
    assert_eq!(names(listed), ["a/db", "a/web", "b/headless", "b/web"]);
    let web = all
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list");
    assert_eq!(names(web), ["a/web", "b/web"]);
    let not_front = all
        .list(&ListParams::default().labels("app in (web,db),tier notin (front)"))
        .await
        .expect("list");
    assert_eq!(names(not_front), ["a/db", "a/web"]);
    let with_ip = all
        .list(&ListParams::default().fields("spec.clusterIP!=None"))
        .await
        .expect("list");
    assert_eq!(names(with_ip), ["a/db", "a/web", "b/web"]);
    let in_b: Api<Service> = Api::namespaced(client.clone(), "b");
    assert_eq!(
        names(in_b.list(&ListParams::default()).await.expect("list")),
        ["b/headless", "b/web"]
    );

    let fetched = Api::<Service>::namespaced(client.clone(), "a")
        .get("web")
        .await
        .expect("get");
    assert_eq!(
        fetched.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("10.96.1.1")
    );

    let mut paged = Vec::new();
    let mut params = ListParams::default().limit(1);
    loop {
        let page = all.list(&params).await.expect("page");
        assert!(page.items.len() <= 1);
        paged.extend(names(page.clone()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = ListParams::default().limit(1).continue_token(&token),
            None => break,
        }
    }
    assert_eq!(paged, ["a/db", "a/web", "b/headless", "b/web"]);

    emulator
        .apply(endpoint_slice("a", "web", "10.244.0.9"))
        .expect("apply");
    emulator
        .apply(endpoint_slice("b", "other", "10.244.0.10"))
        .expect("apply");
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let for_web = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .expect("list");
    assert_eq!(for_web.items.len(), 1);
    let slice = &for_web.items[0];
    assert_eq!(slice.address_type, "IPv4");
    let endpoint = &slice.endpoints.as_ref().expect("endpoints")[0];
    assert_eq!(endpoint.addresses, ["10.244.0.9"]);
    assert_eq!(endpoint.node_name.as_deref(), Some("node-1"));
    assert_eq!(
        endpoint.conditions.as_ref().and_then(|c| c.ready),
        Some(true)
    );

    let missing = Api::<Service>::namespaced(client, "a")
        .get("nope")
        .await
        .expect_err("404");
    match missing {
        kube::Error::Api(status) => {
            assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"))
        }
        other => panic!("unexpected error {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_added_modified_deleted_with_upstream_selectors() {
    let emulator = start();
    emulator
        .apply(service("ns", "web", json!({}), Some("10.96.0.50")))
        .expect("apply");
    emulator
        .apply(service("ns", "headless", json!({}), Some("None")))
        .expect("apply");
    let client = client(&emulator).await;
    let mirror = Mirror::start(Api::all(client), upstream_service_config());
    mirror
        .wait_for("initial list", |m| {
            m.get("ns/web").map(String::as_str) == Some("10.96.0.50")
        })
        .await;
    assert!(!mirror.snapshot().contains_key("ns/headless"));

    emulator
        .apply(service("ns", "api", json!({}), Some("10.96.0.51")))
        .expect("add");
    mirror.wait_for("ADDED", |m| m.contains_key("ns/api")).await;
    emulator
        .apply(service("ns", "api", json!({}), Some("10.96.0.52")))
        .expect("modify");
    mirror
        .wait_for("MODIFIED", |m| {
            m.get("ns/api").map(String::as_str) == Some("10.96.0.52")
        })
        .await;
    emulator
        .apply(service(
            "ns",
            "web",
            json!({"service.kubernetes.io/headless": ""}),
            Some("10.96.0.50"),
        ))
        .expect("relabel");
    mirror
        .wait_for("selector exit as DELETED", |m| !m.contains_key("ns/web"))
        .await;
    assert!(
        emulator
            .delete("v1", "Service", Some("ns"), "api")
            .expect("delete")
    );
    mirror.wait_for("DELETED", |m| m.is_empty()).await;
    assert!(
        !emulator
            .delete("v1", "Service", Some("ns"), "api")
            .expect("second delete")
    );
    assert_eq!(
        mirror.relists.load(Ordering::SeqCst),
        1,
        "no relist without faults"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_watch_streams_bookmarks_selector_transitions_and_times_out() {
    let emulator = start_with(EmulatorOptions {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    });
    emulator
        .apply(service("ns", "web", json!({"app": "web"}), None))
        .expect("apply");
    let api: Api<Service> = Api::namespaced(client(&emulator).await, "ns");
    let start_rv = emulator.resource_version().to_string();
    let params = WatchParams::default().labels("app=web").timeout(2);
    let mut stream = api.watch(&params, &start_rv).await.expect("watch").boxed();

    emulator
        .apply(service("ns", "web", json!({"app": "other"}), None))
        .expect("relabel out");
    emulator
        .apply(service("ns", "web", json!({"app": "web"}), None))
        .expect("relabel in");
    let began = Instant::now();
    let mut kinds = Vec::new();
    let mut bookmarks = 0;
    while let Some(event) = stream.try_next().await.expect("event") {
        match event {
            WatchEvent::Added(s) => kinds.push(format!("ADDED {}", s.labels()["app"])),
            WatchEvent::Modified(s) => kinds.push(format!("MODIFIED {}", s.labels()["app"])),
            WatchEvent::Deleted(s) => kinds.push(format!("DELETED {}", s.labels()["app"])),
            WatchEvent::Bookmark(b) => {
                bookmarks += 1;
                assert!(
                    b.metadata.resource_version.parse::<u64>().expect("rv")
                        >= start_rv.parse::<u64>().expect("rv")
                );
            }
            WatchEvent::Error(e) => panic!("unexpected error event {e:?}"),
        }
    }
    let elapsed = began.elapsed();
    assert_eq!(kinds, ["DELETED other", "ADDED web"]);
    assert!(
        bookmarks >= 4,
        "periodic bookmarks every 200ms over 2s, got {bookmarks}"
    );
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(5),
        "timeoutSeconds=2 ended after {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_gives_410_and_watcher_relists_and_converges() {
    let emulator = start();
    emulator
        .apply(service("ns", "one", json!({}), None))
        .expect("apply");
    let api: Api<Service> = Api::all(client(&emulator).await);
    let old_rv = emulator.resource_version();
    let mirror = Mirror::start(api.clone(), upstream_service_config());
    mirror
        .wait_for("initial list", |m| m.contains_key("ns/one"))
        .await;
    wait_until("watch open", || emulator.open_watch_count() == 1).await;

    emulator.compact();
    let mut resumed = api
        .watch(&WatchParams::default(), &old_rv.to_string())
        .await
        .expect("watch")
        .boxed();
    match resumed.try_next().await.expect("event") {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(
                status
                    .message
                    .starts_with(&format!("too old resource version: {old_rv} (")),
                "{}",
                status.message
            );
        }
        other => panic!("expected 410 ERROR event, got {other:?}"),
    }
    assert!(
        resumed.try_next().await.expect("end").is_none(),
        "stream closes after the error"
    );

    assert_eq!(emulator.drop_watches(), 1);
    emulator
        .apply(service("ns", "two", json!({}), None))
        .expect("apply");
    mirror
        .wait_for("convergence after relist", |m| {
            m.contains_key("ns/one") && m.contains_key("ns/two")
        })
        .await;
    assert!(
        mirror.relists.load(Ordering::SeqCst) >= 2,
        "watcher relisted after 410"
    );
    assert!(
        mirror.errors.load(Ordering::SeqCst) >= 1,
        "the 410 surfaced as an error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_history_makes_old_versions_too_large() {
    let emulator = start();
    for name in ["one", "two", "three"] {
        emulator
            .apply(service("ns", name, json!({}), None))
            .expect("apply");
    }
    // Updates push the counter well past the object count.
    for i in 0..5 {
        emulator
            .apply(service("ns", "one", json!({"round": i.to_string()}), None))
            .expect("apply");
    }
    let api: Api<Service> = Api::all(client_without_retries(&emulator).await);
    let old_rv = emulator.resource_version();
    emulator.restore_with_new_history();
    let current = emulator.resource_version();
    assert!(current < old_rv, "{current} < {old_rv}");
    // The objects survive, renumbered at or below the new counter.
    let listed = api.list(&Default::default()).await.expect("list");
    assert_eq!(listed.items.len(), 3);
    assert_eq!(listed.metadata.resource_version, Some(current.to_string()));
    for item in &listed.items {
        let rv: u64 = item
            .metadata
            .resource_version
            .as_ref()
            .unwrap()
            .parse()
            .unwrap();
        assert!(rv <= current);
    }
    match api
        .watch(&WatchParams::default(), &old_rv.to_string())
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 504);
            assert_eq!(status.reason, "Timeout");
            assert_eq!(
                status.message,
                format!("Too large resource version: {old_rv}, current: {current}")
            );
        }
        Err(other) => panic!("expected a 504 Status, got {other:?}"),
        Ok(_) => panic!("a watch from a version the server never reached was accepted"),
    }
    // Watching from the new history works.
    let mut resumed = api
        .watch(&WatchParams::default().timeout(1), &current.to_string())
        .await
        .expect("watch from the new history")
        .boxed();
    while let Some(event) = resumed.try_next().await.expect("no error") {
        assert!(
            matches!(event, WatchEvent::Bookmark(_)),
            "nothing happened since the restore: {event:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_resume_without_relisting() {
    let emulator = start();
    let mirror = Mirror::start(Api::all(client(&emulator).await), upstream_service_config());
    wait_until("watch open", || emulator.open_watch_count() == 1).await;
    emulator
        .apply(service("ns", "first", json!({}), None))
        .expect("apply");
    mirror
        .wait_for("first", |m| m.contains_key("ns/first"))
        .await;
    for round in 0..3 {
        assert_eq!(emulator.drop_watches(), 1);
        let name = format!("after-drop-{round}");
        emulator
            .apply(service("ns", &name, json!({}), None))
            .expect("apply");
        mirror
            .wait_for("change after drop", |m| {
                m.contains_key(&format!("ns/{name}"))
            })
            .await;
    }
    assert_eq!(
        mirror.relists.load(Ordering::SeqCst),
        1,
        "resumed from the last resourceVersion"
    );
    let watches = emulator
        .request_log()
        .iter()
        .filter(|e| e.path.contains("watch=true"))
        .count();
    assert!(
        watches >= 4,
        "each drop caused a new watch request, saw {watches}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_survives_a_burst_of_500s_and_stalls() {
    let emulator = start();
    let mirror = Mirror::start(Api::all(client(&emulator).await), upstream_service_config());
    wait_until("watch open", || emulator.open_watch_count() == 1).await;
    emulator.set_fail_requests(3, 500);
    emulator.drop_watches();
    emulator
        .apply(service("ns", "late", json!({}), None))
        .expect("apply");
    mirror
        .wait_for("change after 500s", |m| m.contains_key("ns/late"))
        .await;
    let failures = emulator
        .request_log()
        .iter()
        .filter(|e| e.status == 500)
        .count();
    assert_eq!(failures, 3);
    assert!(mirror.errors.load(Ordering::SeqCst) >= 3);

    emulator.set_stall(Some(Duration::from_millis(300)));
    let began = Instant::now();
    let api: Api<Service> = Api::all(client(&emulator).await);
    api.list(&ListParams::default())
        .await
        .expect("stalled list");
    assert!(began.elapsed() >= Duration::from_millis(300));
    emulator.set_stall(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_watcher_gets_initial_events_end_bookmark() {
    let emulator = start();
    emulator
        .apply(service("ns", "web", json!({}), None))
        .expect("apply");
    let config = upstream_service_config().streaming_lists();
    let mirror = Mirror::start(Api::all(client(&emulator).await), config);
    mirror
        .wait_for("initial events", |m| m.contains_key("ns/web"))
        .await;
    emulator
        .apply(service("ns", "api", json!({}), None))
        .expect("apply");
    mirror
        .wait_for("follow-up change", |m| m.contains_key("ns/api"))
        .await;
    let log = emulator.request_log();
    assert!(
        log.iter()
            .any(|e| e.path.contains("sendInitialEvents=true") && e.status == 200)
    );
    assert!(!log.iter().any(|e| e.method == "GET"
        && e.path.starts_with("/api/v1/services?")
        && !e.path.contains("watch=")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_kubernetes_status_objects() {
    let emulator = start();
    let client = client(&emulator).await;
    let send = |method: &str, path: &str, content_type: &str, body: &[u8]| {
        http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type)
            .body(body.to_vec())
            .expect("request")
    };
    let status_of = |result: Result<String, kube::Error>| match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        other => panic!("expected a Status error, got {other:?}"),
    };
    let bad_json = client
        .request_text(send(
            "POST",
            "/api/v1/namespaces/ns/services",
            "application/json",
            b"{not json",
        ))
        .await;
    assert_eq!(status_of(bad_json), (400, "BadRequest".to_string()));
    let unknown = client
        .request_text(send("GET", "/api/v1/secrets", "application/json", b""))
        .await;
    assert_eq!(status_of(unknown), (404, "NotFound".to_string()));
    let svc = serde_json::to_vec(&service("ns", "web", json!({}), None)).expect("json");
    client
        .request_text(send(
            "POST",
            "/api/v1/namespaces/ns/services",
            "application/json",
            &svc,
        ))
        .await
        .expect("created");
    let dup = client
        .request_text(send(
            "POST",
            "/api/v1/namespaces/ns/services",
            "application/json",
            &svc,
        ))
        .await;
    assert_eq!(status_of(dup), (409, "AlreadyExists".to_string()));
    let mut stale = emulator
        .get("v1", "Service", Some("ns"), "web")
        .expect("stored");
    stale["metadata"]["resourceVersion"] = json!("1");
    let stale = serde_json::to_vec(&stale).expect("json");
    let conflict = client
        .request_text(send(
            "PUT",
            "/api/v1/namespaces/ns/services/web",
            "application/json",
            &stale,
        ))
        .await;
    assert_eq!(status_of(conflict), (409, "Conflict".to_string()));
    let apply = client
        .request_text(send(
            "PATCH",
            "/api/v1/namespaces/ns/services/web",
            "application/apply-patch+yaml",
            b"{}",
        ))
        .await;
    assert_eq!(status_of(apply).0, 415);
    let dry_run = client
        .request_text(send(
            "DELETE",
            "/api/v1/namespaces/ns/services/web?dryRun=All",
            "application/json",
            b"",
        ))
        .await;
    assert_eq!(status_of(dry_run).0, 400);
    assert!(emulator.get("v1", "Service", Some("ns"), "web").is_some());
    let patched = client
        .request_text(send(
            "PATCH",
            "/api/v1/namespaces/ns/services/web",
            "application/merge-patch+json",
            br#"{"metadata":{"labels":{"x":"y"}}}"#,
        ))
        .await
        .expect("merge patch");
    let patched: Value = serde_json::from_str(&patched).expect("json");
    assert_eq!(patched["metadata"]["labels"]["x"], "y");

    let wrong = client_for(
        &emulator
            .kubeconfig_yaml(&emulator.url())
            .replace(&emulator.token(), "wrong-token"),
    )
    .await;
    let denied = Api::<Service>::all(wrong)
        .list(&ListParams::default())
        .await
        .expect_err("401");
    assert!(
        matches!(denied, kube::Error::Api(ref s) if s.code == 401 && s.reason == "Unauthorized"),
        "{denied:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_extra_listeners_and_events() {
    let emulator = start();
    let by_cert = client_for(&emulator.kubeconfig_yaml_client_cert(&emulator.url())).await;
    Api::<Service>::all(by_cert)
        .list(&ListParams::default())
        .await
        .expect("client-cert auth");

    let extra = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let extra_url = format!("https://{}", extra.local_addr().expect("addr"));
    emulator
        .serve_listener(extra)
        .expect("serve extra listener");
    let via_extra = client_for(&emulator.kubeconfig_yaml(&extra_url)).await;

    let core: Api<CoreEvent> = Api::namespaced(via_extra.clone(), "ns");
    let core_event = serde_json::from_value(json!({
        "metadata": {"generateName": "kube-proxy-"},
        "involvedObject": {"kind": "Node", "name": "node-1"},
        "reason": "Starting", "message": "Starting kube-proxy.", "type": "Normal",
    }))
    .expect("event");
    core.create(&PostParams::default(), &core_event)
        .await
        .expect("core event");
    let modern: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(via_extra, "ns");
    let modern_event = serde_json::from_value(json!({
        "metadata": {"name": "node-1.kube-proxy"},
        "eventTime": "2025-01-01T00:00:00.000000Z",
        "reportingController": "kube-proxy", "reportingInstance": "kube-proxy-node-1",
        "action": "StartKubeProxy", "reason": "Starting", "type": "Normal",
        "regarding": {"kind": "Node", "name": "node-1"},
    }))
    .expect("event");
    modern
        .create(&PostParams::default(), &modern_event)
        .await
        .expect("events.k8s.io event");
    let reasons: Vec<String> = emulator
        .events()
        .iter()
        .map(|e| format!("{} {}", e["apiVersion"], e["reason"]))
        .collect();
    assert_eq!(
        reasons,
        ["\"v1\" \"Starting\"", "\"events.k8s.io/v1\" \"Starting\""]
    );
    let generated = emulator.events()[0]["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(generated.starts_with("kube-proxy-") && generated.len() > "kube-proxy-".len());
}

#[test]
fn yaml_manifests_and_the_object_api() {
    let emulator = start();
    let applied = emulator
        .apply_yaml_multi(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  type: NodePort\n  ports: [{port: 80}]\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec: {replicas: 2, selector: {matchLabels: {app: web}}}\n",
        )
        .expect("applied");
    assert_eq!(applied.len(), 2);
    let svc = emulator
        .get("v1", "Service", Some("shop"), "web")
        .expect("stored");
    assert_eq!(svc["spec"]["ports"][0]["nodePort"], 30000);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 80);
    assert!(
        emulator.get("v1", "Namespace", None, "shop").is_some(),
        "namespace created for the fixture"
    );
    let before = emulator.resource_version();
    let again = emulator.apply(applied[1].clone()).expect("no-op apply");
    assert_eq!(
        emulator.resource_version(),
        before,
        "unchanged object is not rewritten"
    );
    assert_eq!(again["metadata"]["generation"], 1);
    assert!(
        emulator
            .apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}}))
            .is_err()
    );
    assert_eq!(emulator.list("apps/v1", "Deployment").len(), 1);
}

#[test]
fn emulator_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<kp_emulator::Emulator>();
    let emulator = std::sync::Arc::new(start());
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let emulator = emulator.clone();
            std::thread::spawn(move || {
                for j in 0..25 {
                    let name = format!("svc-{i}-{j}");
                    emulator
                        .apply(service("ns", &name, json!({}), None))
                        .expect("apply");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
    let services = emulator.list("v1", "Service");
    assert_eq!(services.len(), 100);
    let mut ips: Vec<&str> = services
        .iter()
        .filter_map(|s| s["spec"]["clusterIP"].as_str())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    assert_eq!(ips.len(), 100, "every service got its own clusterIP");
}

#[test]
fn shutdown_stops_serving() {
    let emulator = start();
    let addr = emulator.local_addr();
    emulator.shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener still accepting after shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
