//! Go-style durations (`time.ParseDuration` / `time.Duration.String`).
//!
//! kube-proxy config files and flags carry durations as Go strings such as `30s`,
//! `1m0s` or `1h2m3.5s`; we must read them exactly like Go does and write them back
//! the way upstream's `--write-config-to` does so files round-trip unchanged.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest duration Go can represent (`math.MaxInt64` nanoseconds).
const MAX_NANOS: u128 = i64::MAX as u128;

/// Why a Go duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}")]
    Invalid(String),
    #[error("missing unit in duration {0:?}")]
    MissingUnit(String),
    #[error("unknown unit {unit:?} in duration {input:?}")]
    UnknownUnit { unit: String, input: String },
    /// Go accepts negative durations but upstream validation rejects every negative
    /// period, and `std::time::Duration` cannot hold one, so we refuse them here.
    #[error("negative duration {0:?} is not allowed")]
    Negative(String),
}

/// Nanoseconds per unit, longest unit names first so `ms` wins over `m`.
const UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("\u{00b5}s", 1_000),
    ("\u{03bc}s", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Parses a Go duration string (`300ms`, `1.5h`, `2h45m`, `0`).
pub fn parse_go_duration(input: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(input.to_string());
    let (negative, mut rest) = match input.as_bytes().first() {
        Some(b'-') => (true, &input[1..]),
        Some(b'+') => (false, &input[1..]),
        _ => (false, input),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let int_digits = &rest[..int_len];
        rest = &rest[int_len..];
        let mut frac_digits = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            frac_digits = &after_dot[..frac_len];
            rest = &after_dot[frac_len..];
        }
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(invalid());
        }
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(rest.len(), |(i, _)| i);
        if unit_len == 0 {
            return Err(DurationError::MissingUnit(input.to_string()));
        }
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(|| DurationError::UnknownUnit {
                unit: unit.to_string(),
                input: input.to_string(),
            })?;
        let whole = parse_digits(int_digits).ok_or_else(invalid)?;
        let mut part = whole.checked_mul(scale).ok_or_else(invalid)?;
        if !frac_digits.is_empty() {
            // Go keeps at most the precision that fits in nanoseconds and truncates.
            let mut frac_value: u128 = 0;
            let mut frac_scale: u128 = 1;
            for digit in frac_digits.bytes().take(30) {
                frac_value = frac_value * 10 + u128::from(digit - b'0');
                frac_scale *= 10;
            }
            part += frac_value * scale / frac_scale;
        }
        total = total.checked_add(part).ok_or_else(invalid)?;
        if total > MAX_NANOS {
            return Err(invalid());
        }
    }
    if negative && total != 0 {
        return Err(DurationError::Negative(input.to_string()));
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| invalid())?;
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| invalid())?;
    Ok(Duration::new(secs, nanos))
}

/// Decimal digits to a number; `None` on overflow. Empty input is zero (`.5s`).
fn parse_digits(digits: &str) -> Option<u128> {
    digits.bytes().try_fold(0u128, |acc, digit| {
        acc.checked_mul(10)?.checked_add(u128::from(digit - b'0'))
    })
}

/// Formats like Go's `time.Duration.String`: `0s`, `500ms`, `1.5s`, `1m0s`, `1h0m0s`.
pub fn format_go_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos().min(MAX_NANOS);
    if nanos == 0 {
        return "0s".to_string();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}\u{00b5}s", with_fraction(nanos, 3));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", with_fraction(nanos, 6));
    }
    let seconds_text = with_fraction(nanos, 9);
    let whole_seconds = nanos / 1_000_000_000;
    let seconds_in_minute = whole_seconds % 60;
    let fraction = seconds_text
        .split_once('.')
        .map(|(_, frac)| format!(".{frac}"))
        .unwrap_or_default();
    let minutes = whole_seconds / 60;
    if minutes == 0 {
        return format!("{seconds_in_minute}{fraction}s");
    }
    let hours = minutes / 60;
    if hours == 0 {
        return format!("{minutes}m{seconds_in_minute}{fraction}s");
    }
    format!("{hours}h{}m{seconds_in_minute}{fraction}s", minutes % 60)
}

/// `value / 10^digits` printed with the fractional digits Go would keep (no trailing zeros).
fn with_fraction(value: u128, digits: u32) -> String {
    let divisor = 10u128.pow(digits);
    let whole = value / divisor;
    let frac = value % divisor;
    if frac == 0 {
        return whole.to_string();
    }
    let frac_text = format!("{frac:0width$}", width = digits as usize);
    format!("{whole}.{}", frac_text.trim_end_matches('0'))
}

/// A duration that (de)serializes as a Go duration string, like `metav1.Duration`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    pub const ZERO: GoDuration = GoDuration(Duration::ZERO);

    pub const fn from_secs(secs: u64) -> Self {
        GoDuration(Duration::from_secs(secs))
    }

    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for GoDuration {
    fn from(value: Duration) -> Self {
        GoDuration(value)
    }
}

impl From<GoDuration> for Duration {
    fn from(value: GoDuration) -> Self {
        value.0
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_go_duration(self.0))
    }
}

impl std::str::FromStr for GoDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_go_duration(s).map(GoDuration)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_go_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurationVisitor {
            accept_nanos: false,
        })
    }
}

/// Deserializes a duration given either as a Go string or as integer nanoseconds,
/// which is what `logging.flushFrequency` accepts upstream (kubeadm writes `0`).
pub(crate) fn string_or_nanos<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<GoDuration, D::Error> {
    deserializer.deserialize_any(DurationVisitor { accept_nanos: true })
}

struct DurationVisitor {
    accept_nanos: bool,
}

impl<'de> Visitor<'de> for DurationVisitor {
    type Value = GoDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.accept_nanos {
            f.write_str("a duration string such as \"5s\" or integer nanoseconds")
        } else {
            f.write_str("a duration string such as \"30s\" or \"1m0s\"")
        }
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<GoDuration, E> {
        parse_go_duration(value)
            .map(GoDuration)
            .map_err(|err| E::custom(err.to_string()))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<GoDuration, E> {
        if !self.accept_nanos {
            return Err(E::invalid_type(de::Unexpected::Unsigned(value), &self));
        }
        Ok(GoDuration(Duration::from_nanos(value)))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<GoDuration, E> {
        if !self.accept_nanos {
            return Err(E::invalid_type(de::Unexpected::Signed(value), &self));
        }
        u64::try_from(value)
            .map(|nanos| GoDuration(Duration::from_nanos(nanos)))
            .map_err(|_| E::custom(format!("negative duration {value} is not allowed")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn parses_the_forms_go_accepts() {
        let cases: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("-0s", Duration::ZERO),
            ("30s", Duration::from_secs(30)),
            ("+5s", Duration::from_secs(5)),
            ("1m0s", Duration::from_secs(60)),
            ("15m", Duration::from_secs(900)),
            ("1h2m3.5s", ms(3_723_500)),
            ("500ms", ms(500)),
            ("1.5h", Duration::from_secs(5400)),
            (".5s", ms(500)),
            ("1.s", Duration::from_secs(1)),
            ("2h45m", Duration::from_secs(9900)),
            ("100ns", Duration::from_nanos(100)),
            ("3us", Duration::from_micros(3)),
            ("3\u{00b5}s", Duration::from_micros(3)),
            ("3\u{03bc}s", Duration::from_micros(3)),
            ("1.0000000019s", Duration::from_nanos(1_000_000_001)),
            ("2562047h", Duration::from_secs(2_562_047 * 3600)),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_go_duration(input).as_ref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn rejects_what_go_rejects() {
        for input in [
            "", "s", "abc", "1", "10", ".s", "1.5", "-", "1x", "1sm5", "3000000h",
        ] {
            assert!(parse_go_duration(input).is_err(), "{input:?} should fail");
        }
        assert_eq!(
            parse_go_duration("10"),
            Err(DurationError::MissingUnit("10".to_string()))
        );
        assert_eq!(
            parse_go_duration("5d"),
            Err(DurationError::UnknownUnit {
                unit: "d".to_string(),
                input: "5d".to_string()
            })
        );
        assert_eq!(
            parse_go_duration("-1s"),
            Err(DurationError::Negative("-1s".to_string()))
        );
    }

    #[test]
    fn formats_like_go_duration_string() {
        let cases: &[(Duration, &str)] = &[
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1), "1ns"),
            (Duration::from_nanos(1_500), "1.5\u{00b5}s"),
            (ms(500), "500ms"),
            (Duration::from_micros(1_250), "1.25ms"),
            (Duration::from_secs(1), "1s"),
            (ms(1_500), "1.5s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(900), "15m0s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (ms(3_723_500), "1h2m3.5s"),
            (Duration::from_secs(86_400), "24h0m0s"),
        ];
        for (duration, expected) in cases {
            assert_eq!(format_go_duration(*duration), *expected);
        }
    }

    #[test]
    fn format_then_parse_is_identity() {
        let samples = [
            Duration::from_nanos(7),
            Duration::from_nanos(123_456),
            Duration::from_nanos(987_654_321),
            Duration::new(59, 999_999_999),
            Duration::new(3_661, 1),
            Duration::from_secs(2_562_047 * 3600),
        ];
        for sample in samples {
            let text = format_go_duration(sample);
            assert_eq!(parse_go_duration(&text), Ok(sample), "{text}");
        }
    }

    #[test]
    fn serde_uses_go_strings_and_flush_frequency_accepts_nanos() {
        let parsed: GoDuration = serde_json::from_str("\"1m30s\"").expect("valid duration");
        assert_eq!(parsed, GoDuration::from_secs(90));
        assert_eq!(
            serde_json::to_string(&GoDuration::from_secs(900)).expect("serializes"),
            "\"15m0s\""
        );
        assert!(serde_json::from_str::<GoDuration>("5").is_err());
        let mut de = serde_json::Deserializer::from_str("5000000000");
        assert_eq!(
            string_or_nanos(&mut de).expect("nanos accepted"),
            GoDuration::from_secs(5)
        );
    }
}
