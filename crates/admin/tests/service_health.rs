//! healthCheckNodePort servers over real TCP. Plain `#[test]`s: the API is called from
//! non-async threads, as the sync loop does.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use kp_admin::{
    ENDPOINT_WEIGHT_HEADER, IpFamily, ManualClock, ProxyHealth, ServiceHealthServer, ServiceName,
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

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

fn request(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    parse(&raw)
}

fn get(addr: SocketAddr) -> HttpResponse {
    request(addr, "GET", "/")
}

fn parse(raw: &[u8]) -> HttpResponse {
    let raw = String::from_utf8(raw.to_vec()).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let headers = lines
        .filter_map(|line| line.split_once(": "))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, IO_TIMEOUT),
        Err(err) if err.kind() == ErrorKind::ConnectionRefused
    )
}

/// A port that was free a moment ago on `ip` (bind :0, read it, release it).
fn free_port(ip: IpAddr) -> u16 {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind :0");
    listener.local_addr().expect("addr").port()
}

fn svc(ns: &str, name: &str) -> ServiceName {
    (ns.to_owned(), name.to_owned())
}

fn services(entries: &[(&ServiceName, u16)]) -> BTreeMap<ServiceName, u16> {
    entries.iter().map(|(k, p)| ((*k).clone(), *p)).collect()
}

fn counts(entries: &[(&ServiceName, usize)]) -> BTreeMap<ServiceName, usize> {
    entries.iter().map(|(k, n)| ((*k).clone(), *n)).collect()
}

fn local_server() -> ServiceHealthServer {
    ServiceHealthServer::new(ProxyHealth::new(Duration::from_secs(60)), vec![LOCALHOST])
}

#[test]
fn answers_upstream_json_and_headers_on_any_path_and_method() {
    let server = local_server();
    let web = svc("shop", "web");
    let port = free_port(LOCALHOST);
    assert!(server.sync_services(&services(&[(&web, port)])).is_empty());
    server.sync_endpoints(&counts(&[(&web, 2)]));
    assert_eq!(server.ports(), services(&[(&web, port)]));
    let addr = SocketAddr::new(LOCALHOST, port);
    assert_eq!(server.local_addrs(&web), vec![addr]);

    let response = request(addr, "POST", "/some/where?x=1");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(response.header(ENDPOINT_WEIGHT_HEADER), Some("2"));
    assert_eq!(
        response.body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );
    assert_eq!(
        response.json(),
        serde_json::json!({
            "service": {"namespace": "shop", "name": "web"},
            "localEndpoints": 2,
            "serviceProxyHealthy": true,
        })
    );
    assert_eq!(
        response.header("content-length"),
        Some(response.body.len().to_string().as_str())
    );
}

#[test]
fn status_follows_local_endpoints() {
    let server = local_server();
    let web = svc("shop", "web");
    let other = svc("shop", "other");
    let port = free_port(LOCALHOST);
    let addr = SocketAddr::new(LOCALHOST, port);
    assert!(server.sync_services(&services(&[(&web, port)])).is_empty());

    let none = get(addr);
    assert_eq!(none.status, 503, "no endpoints reported yet");
    assert_eq!(none.json()["localEndpoints"], 0);
    assert_eq!(none.header(ENDPOINT_WEIGHT_HEADER), Some("0"));

    server.sync_endpoints(&counts(&[(&web, 2), (&other, 5)]));
    let two = get(addr);
    assert_eq!(two.status, 200);
    assert_eq!(two.json()["localEndpoints"], 2, "counts are per service");
    assert_eq!(two.header(ENDPOINT_WEIGHT_HEADER), Some("2"));

    server.sync_endpoints(&counts(&[(&other, 5)]));
    let gone = get(addr);
    assert_eq!(gone.status, 503, "a service left out of the counts has 0");
    assert_eq!(gone.json()["localEndpoints"], 0);
    assert_eq!(gone.header(ENDPOINT_WEIGHT_HEADER), Some("0"));
}

#[test]
fn unhealthy_proxy_answers_503_despite_endpoints() {
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    ));
    let health = ProxyHealth::for_sync_period(Duration::from_secs(30)).with_clock(clock.clone());
    let server = ServiceHealthServer::new(health.clone(), vec![LOCALHOST]);
    let web = svc("shop", "web");
    let port = free_port(LOCALHOST);
    let addr = SocketAddr::new(LOCALHOST, port);
    assert!(server.sync_services(&services(&[(&web, port)])).is_empty());
    server.sync_endpoints(&counts(&[(&web, 3)]));

    health.updated(IpFamily::IPv4);
    health.queued_update(IpFamily::IPv4);
    clock.advance(Duration::from_secs(60));
    let stale = get(addr);
    assert_eq!(stale.status, 503);
    assert_eq!(stale.json()["serviceProxyHealthy"], false);
    assert_eq!(stale.json()["localEndpoints"], 3);
    assert_eq!(stale.header(ENDPOINT_WEIGHT_HEADER), Some("3"));

    health.updated(IpFamily::IPv4);
    let fresh = get(addr);
    assert_eq!(fresh.status, 200);
    assert_eq!(fresh.json()["serviceProxyHealthy"], true);
}

#[test]
fn removing_a_service_closes_its_port_and_connections() {
    let server = local_server();
    let web = svc("shop", "web");
    let db = svc("shop", "db");
    let (web_port, db_port) = (free_port(LOCALHOST), free_port(LOCALHOST));
    let web_addr = SocketAddr::new(LOCALHOST, web_port);
    let db_addr = SocketAddr::new(LOCALHOST, db_port);
    let both = services(&[(&web, web_port), (&db, db_port)]);
    assert!(server.sync_services(&both).is_empty());
    server.sync_endpoints(&counts(&[(&web, 1), (&db, 1)]));
    assert_eq!(get(web_addr).status, 200);

    // A keep-alive connection that has already been answered once.
    let mut kept = TcpStream::connect(web_addr).expect("connect");
    kept.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut first = [0u8; 4096];
    let n = kept.read(&mut first).expect("read");
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));

    assert!(
        server
            .sync_services(&services(&[(&db, db_port)]))
            .is_empty()
    );
    assert!(refused(web_addr), "port closed when sync_services returns");
    assert_eq!(server.ports(), services(&[(&db, db_port)]));
    let mut rest = Vec::new();
    let eof = kept.read_to_end(&mut rest);
    assert!(
        matches!(eof, Ok(0)) || eof.is_err(),
        "open connections are closed too: {eof:?} {rest:?}"
    );
    assert_eq!(get(db_addr).status, 200, "the other service keeps serving");

    drop(server);
    assert!(refused(db_addr), "dropping the server closes every port");
}

#[test]
fn port_in_use_fails_only_that_service_and_is_retried() {
    let server = local_server();
    let web = svc("shop", "web");
    let db = svc("shop", "db");
    let squatter = TcpListener::bind(SocketAddr::new(LOCALHOST, 0)).expect("bind");
    let busy = squatter.local_addr().expect("addr").port();
    let db_port = free_port(LOCALHOST);
    let wanted = services(&[(&web, busy), (&db, db_port)]);

    let errors = server.sync_services(&wanted);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = &errors[0];
    assert_eq!(
        (error.namespace.as_str(), error.name.as_str()),
        ("shop", "web")
    );
    assert_eq!(error.port, busy);
    assert_eq!(error.addr, SocketAddr::new(LOCALHOST, busy));
    assert_eq!(error.source.kind(), ErrorKind::AddrInUse);
    assert!(error.event_message("node-a").starts_with(&format!(
        "node node-a failed to start healthcheck \"shop/web\" on port {busy}"
    )));
    assert_eq!(server.ports(), services(&[(&db, db_port)]));
    server.sync_endpoints(&counts(&[(&db, 1)]));
    assert_eq!(get(SocketAddr::new(LOCALHOST, db_port)).status, 200);

    let again = server.sync_services(&wanted);
    assert_eq!(again.len(), 1, "reported again while the port is taken");

    drop(squatter);
    assert!(
        server.sync_services(&wanted).is_empty(),
        "retried and opened"
    );
    assert_eq!(server.ports(), wanted);
    let web_answer = get(SocketAddr::new(LOCALHOST, busy));
    assert_eq!(web_answer.json()["service"]["name"], "web");
}

#[test]
fn port_zero_is_rejected() {
    let server = local_server();
    let web = svc("shop", "web");
    let errors = server.sync_services(&services(&[(&web, 0)]));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].source.kind(), ErrorKind::InvalidInput);
    assert!(server.ports().is_empty());
}

#[test]
fn changing_a_port_moves_the_listener() {
    let server = local_server();
    let web = svc("shop", "web");
    let db = svc("shop", "db");
    let (p1, p2, p3) = (
        free_port(LOCALHOST),
        free_port(LOCALHOST),
        free_port(LOCALHOST),
    );
    let at = |port| SocketAddr::new(LOCALHOST, port);
    assert!(
        server
            .sync_services(&services(&[(&web, p1), (&db, p2)]))
            .is_empty()
    );
    assert_eq!(get(at(p1)).json()["service"]["name"], "web");

    assert!(
        server
            .sync_services(&services(&[(&web, p3), (&db, p2)]))
            .is_empty()
    );
    assert!(refused(at(p1)), "old port closed");
    assert_eq!(get(at(p3)).json()["service"]["name"], "web");
    assert_eq!(get(at(p2)).json()["service"]["name"], "db");

    // Swapping ports in one call works because closing completes before opening.
    let swapped = services(&[(&web, p2), (&db, p3)]);
    let errors = server.sync_services(&swapped);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(server.ports(), swapped);
    assert_eq!(get(at(p2)).json()["service"]["name"], "web");
    assert_eq!(get(at(p3)).json()["service"]["name"], "db");
}

#[test]
fn unchanged_services_keep_their_listener() {
    let server = local_server();
    let web = svc("shop", "web");
    let port = free_port(LOCALHOST);
    let wanted = services(&[(&web, port)]);
    assert!(server.sync_services(&wanted).is_empty());
    server.sync_endpoints(&counts(&[(&web, 1)]));

    // A connection accepted before the second sync is still served after it.
    let mut kept = TcpStream::connect(SocketAddr::new(LOCALHOST, port)).expect("connect");
    kept.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    assert!(server.sync_services(&wanted).is_empty());
    kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut raw = Vec::new();
    kept.read_to_end(&mut raw).expect("read");
    assert_eq!(parse(&raw).status, 200);
}

#[test]
fn no_listen_ips_means_every_address_in_both_families() {
    let server = ServiceHealthServer::new(ProxyHealth::new(Duration::from_secs(60)), Vec::new());
    let web = svc("shop", "web");
    let port = free_port(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let errors = server.sync_services(&services(&[(&web, port)]));
    assert!(errors.is_empty(), "{errors:?}");
    server.sync_endpoints(&counts(&[(&web, 1)]));

    assert_eq!(get(SocketAddr::new(LOCALHOST, port)).status, 200);
    let addrs = server.local_addrs(&web);
    assert!(addrs.contains(&SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)));
    let host_has_ipv6 =
        TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0)).is_ok();
    if host_has_ipv6 {
        assert!(addrs.contains(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)));
        let v6 = get(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port));
        assert_eq!(v6.status, 200);
    } else {
        assert_eq!(addrs.len(), 1, "IPv6 skipped on a host without it");
    }

    assert!(server.sync_services(&BTreeMap::new()).is_empty());
    assert!(refused(SocketAddr::new(LOCALHOST, port)));
    if host_has_ipv6 {
        assert!(refused(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            port
        )));
    }
}

#[test]
fn usable_from_inside_an_async_runtime_and_dropped_there() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let port = free_port(LOCALHOST);
    runtime.block_on(async {
        let server = local_server();
        let web = svc("shop", "web");
        assert!(server.sync_services(&services(&[(&web, port)])).is_empty());
        server.sync_endpoints(&counts(&[(&web, 1)]));
        let addr = SocketAddr::new(LOCALHOST, port);
        let response = tokio::task::spawn_blocking(move || get(addr))
            .await
            .expect("join");
        assert_eq!(response.status, 200);
        drop(server);
    });
    assert!(refused(SocketAddr::new(LOCALHOST, port)));
}
