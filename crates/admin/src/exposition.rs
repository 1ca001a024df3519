//! Conversion of prometheus-client's OpenMetrics text into the Prometheus text format 0.0.4
//! that upstream kube-proxy (Go client) serves on `/metrics`.
//!
//! Why: scrapers and dashboards built against kube-proxy expect its exact output. The two
//! formats differ in ways that matter to them:
//! - OpenMetrics names a counter family without `_total` in `# HELP`/`# TYPE` while its
//!   samples carry `_total`; 0.0.4 names the family as the samples (`..._total`).
//! - OpenMetrics ends with `# EOF` and may carry `# UNIT` lines; 0.0.4 has neither.
//! - prometheus-client prints floats as `1.0` and puts `le` first; Go prints `1`, uses
//!   `1.5e+09` style exponents, and writes `le` after the sorted labels.
//! - prometheus-client appends a `.` to help texts of registered metrics; upstream's
//!   `kubeproxy_*` help texts have none.
//! - Go omits families without samples, sorts families by name and series by labels, and
//!   writes histogram buckets before `_sum` and `_count`.

use std::cmp::Ordering;

/// Families whose help text got prometheus-client's extra full stop.
const HELP_PERIOD_ADDED_PREFIX: &str = "kubeproxy_";

/// Content type of the Prometheus text format 0.0.4, as Go's `promhttp` sends it.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug)]
struct Sample {
    name: String,
    /// Labels other than `le`, sorted by name; values kept escaped as written.
    labels: Vec<(String, String)>,
    le: Option<String>,
    value: String,
}

#[derive(Debug, Default)]
struct FamilyBlock {
    name: String,
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<Sample>,
}

/// Rewrites an OpenMetrics exposition as Prometheus text format 0.0.4. Lines it cannot
/// parse are dropped rather than served malformed.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut families: Vec<FamilyBlock> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.push(FamilyBlock {
                name: name.to_owned(),
                help: Some(help.to_owned()),
                ..FamilyBlock::default()
            });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            match families.last_mut() {
                Some(family) if family.name == name && family.kind.is_none() => {
                    family.kind = Some(kind.to_owned());
                }
                _ => families.push(FamilyBlock {
                    name: name.to_owned(),
                    kind: Some(kind.to_owned()),
                    ..FamilyBlock::default()
                }),
            }
        } else if line.starts_with('#') || line.trim().is_empty() {
            // `# UNIT`, `# EOF` and other comments have no 0.0.4 equivalent.
        } else if let Some(sample) = parse_sample(line) {
            match families.last_mut() {
                Some(family) => family.samples.push(sample),
                None => families.push(FamilyBlock {
                    name: sample.name.clone(),
                    samples: vec![sample],
                    ..FamilyBlock::default()
                }),
            }
        }
    }

    let mut blocks: Vec<(String, FamilyBlock)> = families
        .into_iter()
        .filter(|family| !family.samples.is_empty())
        .map(|family| (exposed_family_name(&family), family))
        .collect();
    blocks.sort_by(|a, b| a.0.cmp(&b.0));

    let mut out = String::new();
    for (name, mut family) in blocks {
        if let Some(help) = &family.help {
            let help = if name.starts_with(HELP_PERIOD_ADDED_PREFIX) {
                help.strip_suffix('.').unwrap_or(help)
            } else {
                help.as_str()
            };
            out.push_str(&format!("# HELP {name} {help}\n"));
        }
        let kind = match family.kind.as_deref() {
            None | Some("unknown") => "untyped",
            Some(other) => other,
        };
        out.push_str(&format!("# TYPE {name} {kind}\n"));

        let base = family.name.clone();
        family.samples.sort_by(|a, b| compare_samples(&base, a, b));
        for sample in &family.samples {
            write_sample(&mut out, sample);
        }
    }
    out
}

/// The 0.0.4 family name: counters are named like their `_total` samples.
fn exposed_family_name(family: &FamilyBlock) -> String {
    if family.kind.as_deref() == Some("counter") && !family.name.ends_with("_total") {
        format!("{}_total", family.name)
    } else {
        family.name.clone()
    }
}

/// Series ordered by labels, then (for histograms) buckets in ascending order, `_sum`,
/// `_count`, as Go writes them. The sort is stable, so buckets keep their order.
fn compare_samples(base: &str, a: &Sample, b: &Sample) -> Ordering {
    fn suffix_rank(base: &str, sample: &Sample) -> u8 {
        match sample.name.strip_prefix(base) {
            Some("_sum") => 1,
            Some("_count") => 2,
            _ => 0,
        }
    }
    a.labels
        .cmp(&b.labels)
        .then_with(|| suffix_rank(base, a).cmp(&suffix_rank(base, b)))
}

fn write_sample(out: &mut String, sample: &Sample) {
    out.push_str(&sample.name);
    if !sample.labels.is_empty() || sample.le.is_some() {
        out.push('{');
        let mut first = true;
        for (name, value) in &sample.labels {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&format!("{name}=\"{value}\""));
        }
        if let Some(le) = &sample.le {
            if !first {
                out.push(',');
            }
            out.push_str(&format!("le=\"{}\"", reformat_number(le)));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&reformat_number(&sample.value));
    out.push('\n');
}

/// Parses `name{l="v",...} value [timestamp] [# exemplar]`, keeping name, labels and value.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let (labels, rest) = if line[name_end..].starts_with('{') {
        parse_labels(&line[name_end + 1..])?
    } else {
        (Vec::new(), &line[name_end..])
    };
    let value = rest.split_whitespace().next()?;

    let mut le = None;
    let mut others = Vec::with_capacity(labels.len());
    for (label, label_value) in labels {
        if label == "le" {
            le = Some(label_value);
        } else {
            others.push((label, label_value));
        }
    }
    others.sort_by(|a, b| a.0.cmp(&b.0));
    Some(Sample {
        name: name.to_owned(),
        labels: others,
        le,
        value: value.to_owned(),
    })
}

/// Parses label pairs after the opening `{`; returns them and the text after `}`.
fn parse_labels(mut input: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        input = input.trim_start_matches([',', ' ']);
        if let Some(rest) = input.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = input.find('=')?;
        let name = input[..eq].trim().to_owned();
        let after_eq = input[eq + 1..].strip_prefix('"')?;
        let mut escaped = false;
        let mut value_end = None;
        for (i, c) in after_eq.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    value_end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let value_end = value_end?;
        labels.push((name, after_eq[..value_end].to_owned()));
        input = &after_eq[value_end + 1..];
    }
}

/// Re-prints a number the way Go does; text that is not a number is kept.
fn reformat_number(text: &str) -> String {
    match text {
        "+Inf" | "Inf" | "+inf" | "inf" => "+Inf".to_owned(),
        "-Inf" | "-inf" => "-Inf".to_owned(),
        "NaN" | "nan" => "NaN".to_owned(),
        _ => text
            .parse::<f64>()
            .map(format_go_float)
            .unwrap_or_else(|_| text.to_owned()),
    }
}

/// Formats like Go's `strconv.FormatFloat(v, 'g', -1, 64)` as used by the Go Prometheus
/// client: shortest round-trip digits, exponent form when the decimal exponent is below
/// -4 or at least 6 (`1.5e+09`, `1e+06`, `1e-05`), plain decimal otherwise.
pub fn format_go_float(value: f64) -> String {
    if value.is_nan() {
        return "NaN".to_owned();
    }
    if value.is_infinite() {
        return if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned();
    }
    if value == 0.0 {
        return if value.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    // `{:e}` gives the shortest round-trip digits, e.g. "1.699564821456e9" or "-5e-5".
    let scientific = format!("{value:e}");
    let Some((mantissa, exponent)) = scientific.split_once('e') else {
        return scientific;
    };
    let Ok(exponent) = exponent.parse::<i32>() else {
        return scientific;
    };
    if (-4..6).contains(&exponent) {
        // Rust's `Display` is plain decimal with the same shortest digits.
        format!("{value}")
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_float_formatting_matches_strconv_g() {
        let cases = [
            (1.0, "1"),
            (0.001, "0.001"),
            (16.384, "16.384"),
            (300.0, "300"),
            (0.25, "0.25"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1_000_000.0, "1e+06"),
            (123_456.5, "123456.5"),
            (1_699_564_821.456, "1.699564821456e+09"),
            (-2.5, "-2.5"),
            (999_999.0, "999999"),
            (1_234_567.0, "1.234567e+06"),
            (1e20, "1e+20"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
        ];
        for (value, expected) in cases {
            assert_eq!(format_go_float(value), expected, "formatting {value:?}");
        }
        assert_eq!(format_go_float(f64::NAN), "NaN");
    }

    #[test]
    fn counter_family_is_renamed_and_eof_dropped() {
        let input = "# HELP kubeproxy_x [ALPHA] Some failures.\n\
                     # TYPE kubeproxy_x counter\n\
                     kubeproxy_x_total{ip_family=\"IPv4\"} 3\n\
                     # EOF\n";
        let expected = "# HELP kubeproxy_x_total [ALPHA] Some failures\n\
                        # TYPE kubeproxy_x_total counter\n\
                        kubeproxy_x_total{ip_family=\"IPv4\"} 3\n";
        assert_eq!(to_prometheus_text(input), expected);
    }

    #[test]
    fn histogram_is_reordered_like_go() {
        let input = "# HELP h_seconds Help.\n\
                     # TYPE h_seconds histogram\n\
                     # UNIT h_seconds seconds\n\
                     h_seconds_sum{ip_family=\"IPv6\"} 0.5\n\
                     h_seconds_count{ip_family=\"IPv6\"} 1\n\
                     h_seconds_bucket{le=\"1.0\",ip_family=\"IPv6\"} 1\n\
                     h_seconds_bucket{le=\"+Inf\",ip_family=\"IPv6\"} 1\n\
                     h_seconds_sum{ip_family=\"IPv4\"} 0.0\n\
                     h_seconds_count{ip_family=\"IPv4\"} 0\n\
                     h_seconds_bucket{le=\"1.0\",ip_family=\"IPv4\"} 0\n\
                     h_seconds_bucket{le=\"+Inf\",ip_family=\"IPv4\"} 0\n";
        // Non-kubeproxy help keeps its full stop.
        let expected = "# HELP h_seconds Help.\n\
                        # TYPE h_seconds histogram\n\
                        h_seconds_bucket{ip_family=\"IPv4\",le=\"1\"} 0\n\
                        h_seconds_bucket{ip_family=\"IPv4\",le=\"+Inf\"} 0\n\
                        h_seconds_sum{ip_family=\"IPv4\"} 0\n\
                        h_seconds_count{ip_family=\"IPv4\"} 0\n\
                        h_seconds_bucket{ip_family=\"IPv6\",le=\"1\"} 1\n\
                        h_seconds_bucket{ip_family=\"IPv6\",le=\"+Inf\"} 1\n\
                        h_seconds_sum{ip_family=\"IPv6\"} 0.5\n\
                        h_seconds_count{ip_family=\"IPv6\"} 1\n";
        assert_eq!(to_prometheus_text(input), expected);
    }

    #[test]
    fn empty_families_are_omitted_and_families_sorted() {
        let input = "# HELP b_gauge B.\n# TYPE b_gauge gauge\nb_gauge 2.0\n\
                     # HELP empty_gauge E.\n# TYPE empty_gauge gauge\n\
                     # HELP a_gauge A.\n# TYPE a_gauge gauge\na_gauge 1700000000.0\n";
        let expected = "# HELP a_gauge A.\n# TYPE a_gauge gauge\na_gauge 1.7e+09\n\
                        # HELP b_gauge B.\n# TYPE b_gauge gauge\nb_gauge 2\n";
        assert_eq!(to_prometheus_text(input), expected);
    }

    #[test]
    fn escaped_label_values_survive() {
        let input = "# TYPE g gauge\ng{path=\"a\\\"b}\",z=\"1\"} 1\n";
        assert_eq!(
            to_prometheus_text(input),
            "# TYPE g gauge\ng{path=\"a\\\"b}\",z=\"1\"} 1\n"
        );
    }
}
