//! The exposed metric names, types, labels and buckets must equal upstream kube-proxy's
//! (Kubernetes metrics reference v1.34, pkg/proxy/metrics/metrics.go).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kp_admin::{IpFamily, IptablesTable, Metrics, SyncKind, TrafficPolicy};
use kp_dataplane::Mode;

/// Upstream's kube-proxy metric families registered in every Linux mode.
const COMMON: &[(&str, &str)] = &[
    (
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
        "counter",
    ),
    (
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
        "histogram",
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
    ),
    ("kubeproxy_proxy_healthz_total", "counter"),
    ("kubeproxy_proxy_livez_total", "counter"),
    ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
    ),
    ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
    ),
];

/// kube-proxy-rs's own families, in every mode: kept apart so the lists above stay
/// exactly upstream's.
const OURS: &[(&str, &str)] = &[
    ("kubeproxy_conntrack_table_full_total", "counter"),
    ("kubeproxy_sync_proxy_rules_drift_repairs_total", "counter"),
];

const IPTABLES_ONLY: &[(&str, &str)] = &[
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
    ),
    ("kubeproxy_sync_proxy_rules_iptables_last", "gauge"),
    (
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
        "counter",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        "counter",
    ),
    ("kubeproxy_sync_proxy_rules_iptables_total", "gauge"),
];

const NFTABLES_ONLY: &[(&str, &str)] = &[
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
        "counter",
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "counter",
    ),
];

/// Touches every metric so each family has at least one series.
fn exercise(metrics: &Metrics) {
    let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
    for family in [IpFamily::IPv4, IpFamily::IPv6] {
        let proxier = metrics.proxier(family);
        proxier.observe_sync(SyncKind::Full, Duration::from_millis(3));
        proxier.observe_sync(SyncKind::Partial, Duration::from_millis(1));
        proxier.observe_network_programming(Duration::from_secs(2));
        proxier.set_last_sync_time(at);
        proxier.set_last_queued_time(at);
        proxier.set_no_local_endpoints(TrafficPolicy::Internal, 1);
        proxier.set_no_local_endpoints(TrafficPolicy::External, 0);
        proxier.set_iptables_rules_total(IptablesTable::Nat, 42);
        proxier.set_iptables_rules_total(IptablesTable::Filter, 7);
        proxier.set_iptables_rules_last(IptablesTable::Nat, 5);
        proxier.set_iptables_rules_last(IptablesTable::Filter, 1);
        proxier.record_iptables_restore_failure();
        proxier.record_iptables_partial_restore_failure();
        proxier.record_nftables_sync_failure();
        proxier.record_nftables_cleanup_failure();
        proxier.observe_conntrack_reconcile(Duration::from_millis(20), 4);
    }
    metrics.record_endpoint_change();
    metrics.set_endpoint_changes_pending(2);
    metrics.record_service_change();
    metrics.set_service_changes_pending(1);
    metrics.record_healthz_response(200);
    metrics.record_livez_response(503);
}

fn kubeproxy_families(text: &str) -> BTreeSet<(String, String)> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter(|rest| rest.starts_with("kubeproxy_"))
        .map(|rest| {
            let (name, kind) = rest.split_once(' ').expect("TYPE line has a type");
            (name.to_owned(), kind.to_owned())
        })
        .collect()
}

fn expected(extra: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    COMMON
        .iter()
        .chain(OURS)
        .chain(extra)
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect()
}

#[test]
fn iptables_mode_exposes_exactly_upstreams_families() {
    let metrics = Metrics::without_process_metrics(Mode::Iptables);
    exercise(&metrics);
    assert_eq!(
        kubeproxy_families(&metrics.encode()),
        expected(IPTABLES_ONLY)
    );
}

#[test]
fn nftables_mode_exposes_exactly_upstreams_families() {
    let metrics = Metrics::without_process_metrics(Mode::Nftables);
    exercise(&metrics);
    assert_eq!(
        kubeproxy_families(&metrics.encode()),
        expected(NFTABLES_ONLY)
    );
}

#[test]
fn ipvs_mode_exposes_restore_failures_only() {
    let metrics = Metrics::without_process_metrics(Mode::Ipvs);
    exercise(&metrics);
    let extra = [(
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        "counter",
    )];
    assert_eq!(kubeproxy_families(&metrics.encode()), expected(&extra));
}

#[test]
fn samples_help_and_buckets_match_upstream_text() {
    let metrics = Metrics::without_process_metrics(Mode::Iptables);
    exercise(&metrics);
    let text = metrics.encode();
    let expected_lines = [
        "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds",
        "# HELP kubeproxy_sync_proxy_rules_iptables_restore_failures_total [ALPHA] Cumulative proxy iptables restore failures",
        "# TYPE kubeproxy_sync_proxy_rules_iptables_restore_failures_total counter",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.001\"} 1",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.004\"} 2",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"16.384\"} 2",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"+Inf\"} 2",
        "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 1",
        "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0\"} 0",
        "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"1\"} 0",
        "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"2\"} 1",
        "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"300\"} 1",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv6\"} 1.70000000025e+09",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 1",
        "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"} 42",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv6\"} 1",
        "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 4",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending 2",
        "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
        "kubeproxy_proxy_livez_total{code=\"503\"} 1",
    ];
    for line in expected_lines {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in:\n{text}"
        );
    }
    assert!(!text.contains("_total_total"), "{text}");
    assert!(!text.contains("# EOF"), "{text}");
    assert!(!text.contains("# UNIT"), "{text}");
    // 81 upstream boundaries plus +Inf per family.
    let network_buckets = text
        .lines()
        .filter(|l| {
            l.starts_with(
                "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\"",
            )
        })
        .count();
    assert_eq!(network_buckets, 82);
    let sync_buckets = text
        .lines()
        .filter(|l| {
            l.starts_with("kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\"")
        })
        .count();
    assert_eq!(sync_buckets, 16);
}

#[test]
fn unused_series_are_absent_until_touched() {
    let metrics = Metrics::without_process_metrics(Mode::Iptables);
    let before = metrics.encode();
    assert!(!before.contains("ip_family"), "{before}");
    let _v4 = metrics.proxier(IpFamily::IPv4);
    let after = metrics.encode();
    // Counters start at zero so rate() works; gauges stay absent until set.
    assert!(after.contains(
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 0\n"
    ));
    assert!(!after.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{"));
    assert!(!after.contains("ip_family=\"IPv6\""));
}

#[test]
fn process_metrics_are_exposed_with_go_names() {
    let metrics = Metrics::new(Mode::Nftables);
    let text = metrics.encode();
    for family in [
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_start_time_seconds gauge",
        "# TYPE process_open_fds gauge",
        "# TYPE process_max_fds gauge",
        "# TYPE process_virtual_memory_bytes gauge",
        "# HELP process_resident_memory_bytes Resident memory size in bytes.",
    ] {
        assert!(text.contains(family), "missing {family:?} in:\n{text}");
    }
    let start: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("process_start_time_seconds "))
        .and_then(|v| v.parse().ok())
        .expect("start time sample");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after epoch")
        .as_secs_f64();
    assert!(
        start <= now + 1.0 && start > now - 86_400.0 * 365.0,
        "{start}"
    );
}

#[test]
fn openmetrics_output_is_available_too() {
    let metrics = Metrics::without_process_metrics(Mode::Iptables);
    metrics.record_service_change();
    let text = metrics.encode_openmetrics();
    assert!(text.ends_with("# EOF\n"));
    assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_service_changes counter\n"));
    assert!(text.contains("kubeproxy_sync_proxy_rules_service_changes_total 1\n"));
}

#[test]
fn bucket_boundaries_are_upstreams() {
    assert_eq!(
        kp_admin::metrics::sync_duration_buckets(),
        vec![
            0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
            4.096, 8.192, 16.384
        ]
    );
    let network = kp_admin::metrics::network_programming_buckets();
    assert_eq!(network[..5], [0.0, 0.25, 0.5, 1.0, 2.0]);
    assert_eq!(network[61..64], [59.0, 60.0, 65.0]);
    assert_eq!(
        network[73..],
        [115.0, 120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0]
    );
}

#[test]
#[ignore = "prints a sample scrape for manual inspection"]
fn print_sample_scrape() {
    let metrics = Metrics::new(Mode::Iptables);
    exercise(&metrics);
    println!("{}", metrics.encode());
}
