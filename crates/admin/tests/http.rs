//! The admin servers over real TCP, queried with a minimal HTTP/1.1 client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use kp_admin::{
    AdminError, IpFamily, ManualClock, Metrics, MetricsServerState, PROMETHEUS_TEXT_CONTENT_TYPE,
    ProxyHealth, serve_healthz, serve_healthz_on, serve_metrics, serve_metrics_on,
};
use kp_dataplane::Mode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(": "))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    let response = HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    };
    let length: usize = response
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .expect("content-length");
    assert_eq!(response.body.len(), length);
    response
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn metrics_state(mode: Mode) -> (Metrics, MetricsServerState) {
    let metrics = Metrics::new(mode);
    let config = serde_json::json!({"mode": mode.as_str(), "syncPeriod": "30s"});
    (metrics.clone(), MetricsServerState::new(metrics, config))
}

#[tokio::test]
async fn metrics_server_routes() {
    let (metrics, state) = metrics_state(Mode::Nftables);
    metrics
        .proxier(IpFamily::IPv4)
        .record_nftables_sync_failure();
    let (task, addr) = serve_metrics(localhost(), state).await.expect("serve");
    assert_ne!(addr.port(), 0, "port 0 resolves to the bound port");

    let mode = get(addr, "/proxyMode").await;
    assert_eq!(mode.status, 200);
    assert_eq!(mode.body, "nftables");
    assert_eq!(
        mode.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(mode.header("x-content-type-options"), Some("nosniff"));

    let scrape = get(addr, "/metrics").await;
    assert_eq!(scrape.status, 200);
    assert_eq!(
        scrape.header("content-type"),
        Some(PROMETHEUS_TEXT_CONTENT_TYPE)
    );
    assert!(scrape.body.contains(
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"} 1\n"
    ));
    assert!(
        scrape
            .body
            .contains("# TYPE process_cpu_seconds_total counter\n")
    );

    let configz = get(addr, "/configz").await;
    assert_eq!(configz.status, 200);
    assert_eq!(configz.header("content-type"), Some("application/json"));
    assert_eq!(
        configz.json(),
        serde_json::json!({"kubeproxy.config.k8s.io": {"mode": "nftables", "syncPeriod": "30s"}})
    );

    let ping = get(addr, "/healthz").await;
    assert_eq!((ping.status, ping.body.as_str()), (200, "ok"));
    let verbose = get(addr, "/healthz?verbose").await;
    assert_eq!(verbose.body, "[+]ping ok\nhealthz check passed\n");

    let missing = get(addr, "/nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body, "404 page not found\n");

    task.abort();
}

#[tokio::test]
async fn health_server_codes_and_json() {
    let metrics = Metrics::without_process_metrics(Mode::Iptables);
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    ));
    let health = ProxyHealth::for_sync_period(Duration::from_secs(30))
        .with_clock(clock.clone())
        .with_metrics(metrics.clone());
    let (task, addr) = serve_healthz(localhost(), health.clone())
        .await
        .expect("serve");

    let fresh = get(addr, "/healthz").await;
    assert_eq!(fresh.status, 200);
    assert_eq!(fresh.header("content-type"), Some("application/json"));
    let body = fresh.json();
    assert_eq!(body["lastUpdated"], "2023-11-14T22:13:20Z");
    assert_eq!(body["currentTime"], "2023-11-14T22:13:20Z");
    assert_eq!(body["nodeEligible"], true);
    assert_eq!(body["healthy"], true);

    health.updated(IpFamily::IPv4);
    health.queued_update(IpFamily::IPv4);
    clock.advance(Duration::from_secs(61));
    let stale = get(addr, "/healthz").await;
    assert_eq!(stale.status, 503);
    let body = stale.json();
    assert_eq!(body["healthy"], false);
    assert_eq!(body["lastUpdated"], "2023-11-14T22:13:20Z");
    assert_eq!(body["currentTime"], "2023-11-14T22:14:21Z");
    assert_eq!(body["status"]["IPv4"]["healthy"], false);
    assert_eq!(get(addr, "/livez").await.status, 503);

    health.updated(IpFamily::IPv4);
    assert_eq!(get(addr, "/healthz").await.status, 200);
    health.set_node_eligible(false);
    let deleting = get(addr, "/healthz").await;
    assert_eq!(deleting.status, 503);
    assert_eq!(deleting.json()["nodeEligible"], false);
    let live = get(addr, "/livez").await;
    assert_eq!(live.status, 200);
    assert!(live.json().get("nodeEligible").is_none());

    let text = metrics.encode();
    assert!(
        text.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_proxy_livez_total{code=\"200\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_proxy_livez_total{code=\"503\"} 1\n"),
        "{text}"
    );

    task.abort();
}

#[tokio::test]
async fn binding_a_used_port_is_an_error() {
    let taken = std::net::TcpListener::bind(localhost()).expect("bind");
    let addr = taken.local_addr().expect("addr");
    let health = ProxyHealth::new(Duration::from_secs(60));
    match serve_healthz(addr, health).await {
        Err(AdminError::Bind { addr: failed, .. }) => assert_eq!(failed, addr),
        other => panic!("expected a bind error, got {other:?}"),
    }
}

#[tokio::test]
async fn pre_bound_listeners_are_served() {
    let listener = std::net::TcpListener::bind(localhost()).expect("bind");
    let bound = listener.local_addr().expect("addr");
    let (_metrics, state) = metrics_state(Mode::Ipvs);
    let (task, addr) = serve_metrics_on(listener, state).expect("serve");
    assert_eq!(addr, bound);
    assert_eq!(get(addr, "/proxyMode").await.body, "ipvs");
    task.abort();

    let listener = std::net::TcpListener::bind(localhost()).expect("bind");
    let (task, addr) =
        serve_healthz_on(listener, ProxyHealth::new(Duration::from_secs(60))).expect("serve");
    assert_eq!(get(addr, "/livez").await.status, 200);
    task.abort();
}
