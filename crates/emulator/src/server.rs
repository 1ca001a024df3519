//! HTTPS serving: the accept loop, per-connection TLS and client-certificate identity,
//! authentication, fault injection, request logging and top-level routing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::handlers;
use super::openapi;
use super::request::parse_resource_path;
use super::resources;
use super::state::{Shared, error_response, json_response, lock};
use super::status::ApiError;
use super::tls::CLIENT_CERT_USER;

const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Accepts connections until shutdown.
pub async fn accept_loop(shared: Arc<Shared>, acceptor: TlsAcceptor, listener: TcpListener) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    tokio::spawn(serve_connection(shared.clone(), acceptor.clone(), tcp));
                }
                Err(error) => {
                    tracing::debug!(%error, "emulator accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, acceptor: TlsAcceptor, tcp: tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%error, "emulator TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    // The verifier already checked the chain; a certificate we issued maps to its user.
    let cert_user: Option<Arc<str>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| {
            if leaf.as_ref() == shared.client_cert_der.as_slice() {
                Arc::from(CLIENT_CERT_USER)
            } else {
                Arc::from("system:unknown-client-certificate")
            }
        });
    let shutdown = shared.shutdown.clone();
    let service = service_fn(move |request| {
        let shared = shared.clone();
        let cert_user = cert_user.clone();
        async move { Ok::<_, Infallible>(handle(shared, cert_user, request).await) }
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "emulator connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {}
    }
}

async fn handle(
    shared: Arc<Shared>,
    cert_user: Option<Arc<str>>,
    request: Request<Incoming>,
) -> Response<Body> {
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let response = route(&shared, cert_user, request).await;
    shared.log(&method, path, response.status());
    response
}

/// Paths the real API server serves to anonymous clients.
fn is_public(path: &str) -> bool {
    ["/healthz", "/livez", "/readyz", "/version"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

fn bearer_token(request: &Request<Incoming>) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Decodes `a=b&c=d` with percent-escapes and `+` as space; later keys win.
pub fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    let mut params = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(percent_decode(key), percent_decode(value));
    }
    params
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-kp-emulator",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

async fn route(
    shared: &Arc<Shared>,
    cert_user: Option<Arc<str>>,
    request: Request<Incoming>,
) -> Response<Body> {
    let path = request.uri().path().to_string();
    if !is_public(&path) {
        let token_ok = bearer_token(&request).is_some_and(|t| t == shared.token);
        if !token_ok && cert_user.is_none() {
            return error_response(&ApiError::new(401, "Unauthorized"));
        }
    }
    let stall = lock(&shared.faults).stall;
    if let Some(stall) = stall {
        tokio::select! {
            _ = tokio::time::sleep(stall) => {}
            _ = shared.shutdown.cancelled() => return error_response(&ApiError::new(503, "emulator shutting down")),
        }
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get_only = |response: Response<Body>| {
        if request.method() == Method::GET || request.method() == Method::HEAD {
            response
        } else {
            error_response(&ApiError::new(
                405,
                "the server does not allow this method on the requested resource",
            ))
        }
    };
    match segments.as_slice() {
        ["healthz" | "livez" | "readyz", ..] => get_only(text_response(StatusCode::OK, "ok")),
        ["version"] => get_only(json_response(200, &version_info())),
        ["api"] => get_only(json_response(
            200,
            &resources::core_api_versions(&shared.server_address),
        )),
        ["apis"] => get_only(json_response(200, &resources::api_group_list())),
        ["openapi", "v3"] => get_only(json_response(200, &openapi::root())),
        ["openapi", "v3", rest @ ..] => match openapi::group_version_spec(&rest.join("/")) {
            Some(spec) => get_only(json_response(200, &spec)),
            None => error_response(&ApiError::new(
                404,
                "the server could not find the requested resource",
            )),
        },
        ["api", version] => discovery(&request, "", version),
        ["apis", group, version] => discovery(&request, group, version),
        ["api", version, rest @ ..] => resource_request(shared, "", version, rest, request).await,
        ["apis", group, version, rest @ ..] => {
            resource_request(shared, group, version, rest, request).await
        }
        _ => error_response(&ApiError::new(
            404,
            "the server could not find the requested resource",
        )),
    }
}

fn discovery(request: &Request<Incoming>, group: &str, version: &str) -> Response<Body> {
    if request.method() != Method::GET {
        return error_response(&ApiError::new(
            405,
            "the server does not allow this method on the requested resource",
        ));
    }
    match resources::api_resource_list(group, version) {
        Some(list) => json_response(200, &list),
        None => error_response(&ApiError::new(
            404,
            "the server could not find the requested resource",
        )),
    }
}

async fn resource_request(
    shared: &Arc<Shared>,
    group: &str,
    version: &str,
    rest: &[&str],
    request: Request<Incoming>,
) -> Response<Body> {
    if let Some(status) = shared.take_injected_failure() {
        return error_response(&ApiError::new(
            status,
            format!("injected failure (status {status})"),
        ));
    }
    let target = match parse_resource_path(group, version, rest) {
        Ok(target) => target,
        Err(error) => return error_response(&error),
    };
    let query = parse_query(request.uri().query());
    let method = request.method().clone();
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let body = if matches!(method, Method::POST | Method::PUT | Method::PATCH) {
        match axum::body::to_bytes(Body::new(request.into_body()), MAX_BODY_BYTES).await {
            Ok(bytes) => bytes,
            Err(error) => {
                return error_response(&ApiError::bad_request(format!(
                    "reading request body: {error}"
                )));
            }
        }
    } else {
        bytes::Bytes::new()
    };
    let request = handlers::ApiRequest {
        method: &method,
        query: &query,
        content_type: &content_type,
        accept: &accept,
        body: &body,
    };
    handlers::dispatch(shared, target, &request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_percent_decoded() {
        let q = parse_query(Some(
            "labelSelector=app%3Dweb%2Ctier+in+%28a%2Cb%29&watch=1&x=%zz&y=%4",
        ));
        assert_eq!(q["labelSelector"], "app=web,tier in (a,b)");
        assert_eq!(q["watch"], "1");
        assert_eq!(q["x"], "%zz");
        assert_eq!(q["y"], "%4");
        assert!(parse_query(None).is_empty());
    }

    #[test]
    fn health_and_version_are_public() {
        assert!(is_public("/healthz"));
        assert!(is_public("/readyz/ping"));
        assert!(is_public("/version"));
        assert!(!is_public("/api/v1/services"));
        assert!(!is_public("/versionx"));
    }
}
