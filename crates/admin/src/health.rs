//! Proxy health as upstream's pkg/proxy/healthcheck/proxy_health.go defines it.
//!
//! Each proxier (one per IP family) reports `queued_update` when it receives a change it has
//! not yet written and `updated` after a successful sync. A family is unhealthy when its
//! oldest still-pending queued update is at least `health_timeout` (2 x syncPeriod) old.
//! Families that never reported `updated` are ignored, so the proxy is healthy while it
//! starts up. `/healthz` also requires the Node to be eligible (not being deleted, not
//! tainted for deletion); `/livez` ignores the Node.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::{Serialize, Serializer};

use crate::metrics::{IpFamily, Metrics};

/// Taint the cluster autoscaler puts on a Node before deleting it.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Go's zero `time.Time` as JSON, shown when no proxier has synced yet.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A moment read from a [`Clock`]: wall time for reporting, monotonic time for timeouts
/// (so wall-clock steps cannot flip health).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    pub wall: SystemTime,
    pub monotonic: Instant,
}

/// Source of time for [`ProxyHealth`]; swapped for a [`ManualClock`] in tests.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> ClockReading;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> ClockReading {
        ClockReading {
            wall: SystemTime::now(),
            monotonic: Instant::now(),
        }
    }
}

/// A clock that only moves when told to; for tests without sleeping.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<ClockReading>,
}

impl ManualClock {
    /// A clock reading `wall` now.
    pub fn new(wall: SystemTime) -> Self {
        ManualClock {
            now: Mutex::new(ClockReading {
                wall,
                monotonic: Instant::now(),
            }),
        }
    }

    /// Moves both wall and monotonic time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = lock(&self.now);
        now.wall += by;
        now.monotonic += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> ClockReading {
        *lock(&self.now)
    }
}

/// Locks, recovering the data if another thread panicked while holding the lock: the
/// state here stays consistent after every single assignment.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Health of one proxier in the `status` map of the JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxierHealth {
    #[serde(rename = "lastUpdated", serialize_with = "serialize_go_time")]
    pub last_updated: Option<SystemTime>,
    pub healthy: bool,
}

/// The `/healthz` and `/livez` JSON body, field for field as upstream's `ProxyHealth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyHealthReport {
    /// Most recent successful sync of any proxier; "now" in a 200 response, as upstream
    /// does for compatibility with older releases.
    #[serde(rename = "lastUpdated", serialize_with = "serialize_go_time")]
    pub last_updated: Option<SystemTime>,
    #[serde(rename = "currentTime", serialize_with = "serialize_go_time_required")]
    pub current_time: SystemTime,
    /// Only in `/healthz` responses.
    #[serde(rename = "nodeEligible", skip_serializing_if = "Option::is_none")]
    pub node_eligible: Option<bool>,
    /// True when every proxier is healthy (the Node is not considered here).
    pub healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub status: BTreeMap<IpFamily, ProxierHealth>,
}

/// An HTTP answer for a health endpoint: status code and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthResponse {
    pub status: u16,
    pub body: String,
}

#[derive(Debug)]
struct HealthState {
    last_updated: BTreeMap<IpFamily, ClockReading>,
    oldest_pending_queued: BTreeMap<IpFamily, ClockReading>,
    node_eligible: bool,
}

#[derive(Debug)]
struct HealthInner {
    health_timeout: Duration,
    clock: Arc<dyn Clock>,
    metrics: Option<Metrics>,
    state: Mutex<HealthState>,
}

/// Shared proxy health; cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct ProxyHealth {
    inner: Arc<HealthInner>,
}

impl ProxyHealth {
    /// Health with the given timeout, the real clock and no response counting.
    pub fn new(health_timeout: Duration) -> Self {
        Self::build(health_timeout, Arc::new(SystemClock), None)
    }

    /// Upstream's default: the timeout is twice the sync period.
    pub fn for_sync_period(sync_period: Duration) -> Self {
        Self::new(sync_period.saturating_mul(2))
    }

    /// Builder step: the same timeout with `clock`. State starts empty, so call this before
    /// sharing the health or reporting updates.
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        Self::build(self.inner.health_timeout, clock, self.inner.metrics.clone())
    }

    /// Builder step: also count responses in `proxy_healthz_total` / `proxy_livez_total`.
    /// State starts empty, as for [`ProxyHealth::with_clock`].
    pub fn with_metrics(self, metrics: Metrics) -> Self {
        Self::build(
            self.inner.health_timeout,
            self.inner.clock.clone(),
            Some(metrics),
        )
    }

    fn build(health_timeout: Duration, clock: Arc<dyn Clock>, metrics: Option<Metrics>) -> Self {
        ProxyHealth {
            inner: Arc::new(HealthInner {
                health_timeout,
                clock,
                metrics,
                state: Mutex::new(HealthState {
                    last_updated: BTreeMap::new(),
                    oldest_pending_queued: BTreeMap::new(),
                    // Eligible while starting up, until a Node event says otherwise.
                    node_eligible: true,
                }),
            }),
        }
    }

    /// The configured timeout.
    pub fn health_timeout(&self) -> Duration {
        self.inner.health_timeout
    }

    /// The proxier for `family` received a change it has not written yet. Only the oldest
    /// pending one counts, so a stream of changes cannot hide a stuck sync loop.
    pub fn queued_update(&self, family: IpFamily) {
        let now = self.inner.clock.now();
        lock(&self.inner.state)
            .oldest_pending_queued
            .entry(family)
            .or_insert(now);
    }

    /// The proxier for `family` synced successfully: nothing is pending any more.
    pub fn updated(&self, family: IpFamily) {
        let now = self.inner.clock.now();
        let mut state = lock(&self.inner.state);
        state.oldest_pending_queued.remove(&family);
        state.last_updated.insert(family, now);
    }

    /// Records whether the Node may receive traffic; `false` makes `/healthz` answer 503.
    pub fn set_node_eligible(&self, eligible: bool) {
        lock(&self.inner.state).node_eligible = eligible;
    }

    /// Whether the Node is eligible (see [`ProxyHealth::set_node_eligible`]).
    pub fn node_eligible(&self) -> bool {
        lock(&self.inner.state).node_eligible
    }

    /// Proxier health only, ignoring the Node (what `/livez` reports).
    pub fn is_healthy(&self) -> bool {
        self.report().healthy
    }

    /// The proxier health report (without `nodeEligible`), at the clock's current time.
    pub fn report(&self) -> ProxyHealthReport {
        let now = self.inner.clock.now();
        let state = lock(&self.inner.state);
        let mut report = ProxyHealthReport {
            last_updated: None,
            current_time: now.wall,
            node_eligible: None,
            healthy: true,
            status: BTreeMap::new(),
        };
        let mut latest: Option<ClockReading> = None;
        for (family, updated) in &state.last_updated {
            if latest.is_none_or(|latest| updated.monotonic > latest.monotonic) {
                latest = Some(*updated);
            }
            let overdue = state
                .oldest_pending_queued
                .get(family)
                .is_some_and(|queued| {
                    now.monotonic.saturating_duration_since(queued.monotonic)
                        >= self.inner.health_timeout
                });
            if overdue {
                report.healthy = false;
            }
            report.status.insert(
                *family,
                ProxierHealth {
                    last_updated: Some(updated.wall),
                    healthy: !overdue,
                },
            );
        }
        report.last_updated = latest.map(|reading| reading.wall);
        report
    }

    /// The `/healthz` answer: 200 when every proxier is healthy and the Node is eligible,
    /// else 503. Counted in `proxy_healthz_total{code}`.
    pub fn healthz(&self) -> HealthResponse {
        let mut report = self.report();
        let node_eligible = self.node_eligible();
        report.node_eligible = Some(node_eligible);
        let healthy = report.healthy && node_eligible;
        let response = self.respond(report, healthy);
        if let Some(metrics) = &self.inner.metrics {
            metrics.record_healthz_response(response.status);
        }
        response
    }

    /// The `/livez` answer: like `/healthz` but ignoring the Node. Counted in
    /// `proxy_livez_total{code}`.
    pub fn livez(&self) -> HealthResponse {
        let report = self.report();
        let healthy = report.healthy;
        let response = self.respond(report, healthy);
        if let Some(metrics) = &self.inner.metrics {
            metrics.record_livez_response(response.status);
        }
        response
    }

    fn respond(&self, mut report: ProxyHealthReport, healthy: bool) -> HealthResponse {
        let status = if healthy {
            // Older releases reported the last sync-loop run here; "now" keeps that meaning.
            report.last_updated = Some(self.inner.clock.now().wall);
            200
        } else {
            503
        };
        let body = serde_json::to_string(&report).unwrap_or_else(|err| {
            tracing::warn!(error = %err, "encoding health report failed");
            String::from("{}")
        });
        HealthResponse { status, body }
    }
}

/// Upstream's Node eligibility rule: not being deleted and not tainted
/// [`TO_BE_DELETED_TAINT`].
pub fn is_node_eligible<'a>(
    being_deleted: bool,
    taint_keys: impl IntoIterator<Item = &'a str>,
) -> bool {
    !being_deleted && !taint_keys.into_iter().any(|key| key == TO_BE_DELETED_TAINT)
}

/// Formats like Go's `time.Time` JSON (RFC 3339 with trailing-zero-trimmed nanoseconds), in
/// UTC; `None` is Go's zero time.
pub fn format_go_time(at: Option<SystemTime>) -> String {
    let Some(at) = at else {
        return GO_ZERO_TIME.to_owned();
    };
    let Ok(timestamp) = jiff::Timestamp::try_from(at) else {
        return GO_ZERO_TIME.to_owned();
    };
    let civil = jiff::tz::Offset::UTC.to_datetime(timestamp);
    let mut text = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        civil.year(),
        civil.month(),
        civil.day(),
        civil.hour(),
        civil.minute(),
        civil.second()
    );
    let nanos = civil.subsec_nanosecond();
    if nanos > 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

fn serialize_go_time<S: Serializer>(at: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_go_time(*at))
}

fn serialize_go_time_required<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_go_time(Some(*at)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kp_dataplane::Mode;
    use std::time::UNIX_EPOCH;

    const SYNC_PERIOD: Duration = Duration::from_secs(30);

    fn start_wall() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn health_with_clock() -> (ProxyHealth, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(start_wall()));
        let health = ProxyHealth::for_sync_period(SYNC_PERIOD).with_clock(clock.clone());
        (health, clock)
    }

    fn json(response: &HealthResponse) -> serde_json::Value {
        serde_json::from_str(&response.body).expect("health body is JSON")
    }

    #[test]
    fn fresh_start_is_healthy_with_zero_last_updated() {
        let (health, _clock) = health_with_clock();
        assert!(health.is_healthy());
        let report = health.report();
        assert_eq!(report.last_updated, None);
        assert!(report.status.is_empty());
        let body = serde_json::to_value(&report).expect("json");
        assert_eq!(body["lastUpdated"], GO_ZERO_TIME);
        assert!(body.get("status").is_none(), "empty status is omitted");
    }

    #[test]
    fn queued_without_any_update_is_ignored_as_starting_up() {
        let (health, clock) = health_with_clock();
        health.queued_update(IpFamily::IPv4);
        clock.advance(SYNC_PERIOD * 10);
        assert!(health.is_healthy());
    }

    #[test]
    fn staleness_rules_follow_upstream() {
        let (health, clock) = health_with_clock();
        health.updated(IpFamily::IPv4);
        health.queued_update(IpFamily::IPv4);

        clock.advance(SYNC_PERIOD * 2 - Duration::from_millis(1));
        assert!(health.is_healthy(), "pending but within 2 x syncPeriod");

        clock.advance(Duration::from_millis(1));
        assert!(!health.is_healthy(), "pending for exactly the timeout");
        let report = health.report();
        assert!(!report.status[&IpFamily::IPv4].healthy);

        health.updated(IpFamily::IPv4);
        assert!(health.is_healthy(), "an update clears the pending change");
    }

    #[test]
    fn only_the_oldest_queued_update_counts() {
        let (health, clock) = health_with_clock();
        health.updated(IpFamily::IPv4);
        health.queued_update(IpFamily::IPv4);
        clock.advance(SYNC_PERIOD);
        health.queued_update(IpFamily::IPv4);
        clock.advance(SYNC_PERIOD);
        assert!(!health.is_healthy());
    }

    #[test]
    fn one_stale_family_makes_the_proxy_unhealthy() {
        let (health, clock) = health_with_clock();
        health.updated(IpFamily::IPv4);
        health.updated(IpFamily::IPv6);
        health.queued_update(IpFamily::IPv6);
        clock.advance(SYNC_PERIOD * 3);
        let report = health.report();
        assert!(!report.healthy);
        assert!(report.status[&IpFamily::IPv4].healthy);
        assert!(!report.status[&IpFamily::IPv6].healthy);
    }

    #[test]
    fn healthz_json_and_codes() {
        let (health, clock) = health_with_clock();
        health.updated(IpFamily::IPv4);
        clock.advance(Duration::from_millis(1500));

        let ok = health.healthz();
        assert_eq!(ok.status, 200);
        let body = json(&ok);
        // On 200 lastUpdated is "now".
        assert_eq!(body["lastUpdated"], "2023-11-14T22:13:21.5Z");
        assert_eq!(body["currentTime"], "2023-11-14T22:13:21.5Z");
        assert_eq!(body["nodeEligible"], true);
        assert_eq!(body["healthy"], true);
        assert_eq!(
            body["status"]["IPv4"]["lastUpdated"],
            "2023-11-14T22:13:20Z"
        );
        assert!(
            ok.body.starts_with("{\"lastUpdated\":"),
            "field order as Go"
        );

        health.set_node_eligible(false);
        let not_eligible = health.healthz();
        assert_eq!(not_eligible.status, 503);
        let body = json(&not_eligible);
        assert_eq!(body["nodeEligible"], false);
        assert_eq!(body["healthy"], true);
        assert_eq!(body["lastUpdated"], "2023-11-14T22:13:20Z");

        let live = health.livez();
        assert_eq!(live.status, 200, "livez ignores the Node");
        assert!(json(&live).get("nodeEligible").is_none());
    }

    #[test]
    fn livez_fails_when_stale() {
        let (health, clock) = health_with_clock();
        health.updated(IpFamily::IPv6);
        health.queued_update(IpFamily::IPv6);
        clock.advance(SYNC_PERIOD * 2);
        let live = health.livez();
        assert_eq!(live.status, 503);
        assert_eq!(json(&live)["healthy"], false);
    }

    #[test]
    fn responses_are_counted_by_code() {
        let metrics = Metrics::without_process_metrics(Mode::Iptables);
        let (health, _clock) = health_with_clock();
        let health = health.with_metrics(metrics.clone());
        health.healthz();
        health.healthz();
        health.set_node_eligible(false);
        health.healthz();
        health.livez();
        let text = metrics.encode();
        assert!(
            text.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_proxy_livez_total{code=\"200\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn node_eligibility_rule() {
        assert!(is_node_eligible(false, []));
        assert!(is_node_eligible(
            false,
            ["node.kubernetes.io/unschedulable"]
        ));
        assert!(!is_node_eligible(true, []));
        assert!(!is_node_eligible(false, ["a", TO_BE_DELETED_TAINT]));
    }

    #[test]
    fn go_time_format() {
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 123_000_000);
        assert_eq!(format_go_time(Some(at)), "2023-11-14T22:13:20.123Z");
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 1);
        assert_eq!(format_go_time(Some(at)), "2023-11-14T22:13:20.000000001Z");
        assert_eq!(format_go_time(None), GO_ZERO_TIME);
    }
}
