//! The emulator's shared state (store, faults, request log, watch signals) and the JSON
//! response helpers every layer uses.

use std::sync::atomic::AtomicUsize;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Body;
use http::{HeaderValue, Method, Response, StatusCode, header};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::status::ApiError;
use super::store::Store;

/// One answered request, for test assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLogEntry {
    pub method: String,
    /// Path plus query string, as sent.
    pub path: String,
    pub status: u16,
}

/// Keeps the request log from growing without bound in long runs (sandbox demo).
const REQUEST_LOG_LIMIT: usize = 100_000;

#[derive(Debug, Default)]
pub struct Faults {
    pub fail_remaining: u32,
    pub fail_status: u16,
    pub stall: Option<Duration>,
}

/// State shared by the serving tasks and the synchronous [`super::Emulator`] handle.
pub struct Shared {
    pub store: Mutex<Store>,
    /// Follows the global resourceVersion; watches wake up on changes.
    pub resource_version_updates: watch::Receiver<u64>,
    /// Bumped by `drop_watches()`; every open watch ends when it changes.
    pub drop_generation: watch::Sender<u64>,
    pub open_watches: AtomicUsize,
    pub faults: Mutex<Faults>,
    pub request_log: Mutex<Vec<RequestLogEntry>>,
    pub token: String,
    pub client_cert_der: Vec<u8>,
    pub bookmark_interval: Duration,
    pub shutdown: CancellationToken,
    pub server_address: String,
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    pub(crate) fn log(&self, method: &Method, path: String, status: StatusCode) {
        let mut log = lock(&self.request_log);
        if log.len() >= REQUEST_LOG_LIMIT {
            log.drain(..REQUEST_LOG_LIMIT / 10);
        }
        log.push(RequestLogEntry {
            method: method.to_string(),
            path,
            status: status.as_u16(),
        });
    }

    /// Consumes one injected failure, if any are pending.
    pub(crate) fn take_injected_failure(&self) -> Option<u16> {
        let mut faults = lock(&self.faults);
        if faults.fail_remaining == 0 {
            return None;
        }
        faults.fail_remaining -= 1;
        Some(faults.fail_status)
    }
}

pub fn json_response(status: u16, body: &Value) -> Response<Body> {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub fn error_response(error: &ApiError) -> Response<Body> {
    json_response(error.code, &error.to_status())
}
