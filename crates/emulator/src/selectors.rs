//! Label and field selectors, parsed the way the API server accepts them in query strings.

use serde_json::Value;

use super::status::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed `labelSelector`; requirements are ANDed. Empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in split_top_level(text)? {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_label_term(term)?);
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.requirements.iter().all(|req| match req {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
            LabelRequirement::GreaterThan(k, n) => label(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l > *n),
            LabelRequirement::LessThan(k, n) => label(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l < *n),
        })
    }
}

/// Splits on commas that are not inside `( ... )` value sets.
fn split_top_level(text: &str) -> Result<Vec<&str>, ApiError> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth.checked_sub(1).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unable to parse requirement: unbalanced ')' in {text:?}"
                    ))
                })?
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(ApiError::bad_request(format!(
            "unable to parse requirement: unbalanced '(' in {text:?}"
        )));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_error(term: &str) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: {term:?}"))
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn checked_key(key: &str, term: &str) -> Result<String, ApiError> {
    let key = key.trim();
    if valid_key(key) {
        Ok(key.to_string())
    } else {
        Err(parse_error(term))
    }
}

fn checked_value(value: &str, term: &str) -> Result<String, ApiError> {
    let value = value.trim();
    if valid_value(value) {
        Ok(value.to_string())
    } else {
        Err(parse_error(term))
    }
}

fn parse_label_term(term: &str) -> Result<LabelRequirement, ApiError> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelRequirement::NotExists(checked_key(key, term)?));
    }
    if let Some(open) = term.find('(') {
        let close = term
            .rfind(')')
            .filter(|c| *c > open && term[c + 1..].trim().is_empty());
        let close = close.ok_or_else(|| parse_error(term))?;
        let mut head = term[..open].split_whitespace();
        let (key, op) = match (head.next(), head.next(), head.next()) {
            (Some(key), Some(op), None) => (key, op),
            _ => return Err(parse_error(term)),
        };
        let key = checked_key(key, term)?;
        let values = term[open + 1..close]
            .split(',')
            .map(|v| checked_value(v, term))
            .collect::<Result<Vec<_>, _>>()?;
        return match op {
            "in" => Ok(LabelRequirement::In(key, values)),
            "notin" => Ok(LabelRequirement::NotIn(key, values)),
            _ => Err(parse_error(term)),
        };
    }
    for (op, len) in [("!=", 2), ("==", 2), ("=", 1), (">", 1), ("<", 1)] {
        if let Some(pos) = term.find(op) {
            let key = checked_key(&term[..pos], term)?;
            let value = checked_value(&term[pos + len..], term)?;
            return match op {
                "!=" => Ok(LabelRequirement::NotEquals(key, value)),
                "==" | "=" => Ok(LabelRequirement::Equals(key, value)),
                _ => {
                    let number = value.parse::<i64>().map_err(|_| parse_error(term))?;
                    if op == ">" {
                        Ok(LabelRequirement::GreaterThan(key, number))
                    } else {
                        Ok(LabelRequirement::LessThan(key, number))
                    }
                }
            };
        }
    }
    Ok(LabelRequirement::Exists(checked_key(term, term)?))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    path: String,
    value: String,
    negated: bool,
}

/// A parsed `fieldSelector`: `path=value` / `path==value` / `path!=value`, ANDed.
/// Any dotted path into the object works (`metadata.name`, `spec.clusterIP`, ...);
/// a missing field reads as the empty string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, value, negated) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, true)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, v, false)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, v, false)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{text}'; can't understand '{term}'"
                )));
            };
            let path = path.trim();
            if path.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {term:?}"
                )));
            }
            requirements.push(FieldRequirement {
                path: path.to_string(),
                value: value.trim().to_string(),
                negated,
            });
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|req| {
            let actual = field_value(object, &req.path);
            (actual == req.value) != req.negated
        })
    }
}

fn field_value(object: &Value, path: &str) -> String {
    let mut current = object;
    for segment in path.split('.') {
        match current.get(segment) {
            Some(next) => current = next,
            None => return String::new(),
        }
    }
    match current {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Label and field selectors together, as given on a list or watch request.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}, "spec": {"clusterIP": "10.0.0.1"}})
    }

    fn matches(selector: &str, labels: Value) -> bool {
        LabelSelector::parse(selector)
            .expect("parses")
            .matches(&labelled(labels))
    }

    #[test]
    fn equality_and_inequality() {
        assert!(matches("app=web", json!({"app": "web"})));
        assert!(matches("app==web", json!({"app": "web"})));
        assert!(!matches("app=web", json!({"app": "db"})));
        assert!(matches("app!=web", json!({"app": "db"})));
        assert!(matches("app!=web", json!({})));
        assert!(!matches("app!=web", json!({"app": "web"})));
    }

    #[test]
    fn set_based_requirements() {
        assert!(matches("tier in (front, back)", json!({"tier": "back"})));
        assert!(!matches("tier in (front,back)", json!({"tier": "db"})));
        assert!(!matches("tier in (front,back)", json!({})));
        assert!(matches("tier notin (front,back)", json!({"tier": "db"})));
        assert!(matches("tier notin (front,back)", json!({})));
        assert!(!matches(
            "tier notin (front,back)",
            json!({"tier": "front"})
        ));
    }

    #[test]
    fn existence_and_conjunction() {
        let upstream = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
        assert!(matches(upstream, json!({"app": "x"})));
        assert!(!matches(
            upstream,
            json!({"service.kubernetes.io/headless": ""})
        ));
        assert!(matches(
            "kubernetes.io/service-name",
            json!({"kubernetes.io/service-name": "web"})
        ));
        assert!(!matches("kubernetes.io/service-name", json!({})));
        assert!(matches("a=1,b in (2,3),!c", json!({"a": "1", "b": "3"})));
        assert!(!matches(
            "a=1,b in (2,3),!c",
            json!({"a": "1", "b": "3", "c": ""})
        ));
    }

    #[test]
    fn numeric_comparisons() {
        assert!(matches("rank>3", json!({"rank": "5"})));
        assert!(!matches("rank<3", json!({"rank": "5"})));
    }

    #[test]
    fn malformed_selectors_are_rejected() {
        for bad in ["tier in (a", "a=b=c d", "tier on (a)", "=x", "!", "a in b)"] {
            let err = LabelSelector::parse(bad).expect_err(bad);
            assert_eq!(err.code, 400, "{bad}");
        }
    }

    #[test]
    fn field_selectors_read_dotted_paths() {
        let svc = labelled(json!({}));
        let sel = |s: &str| FieldSelector::parse(s).expect("parses").matches(&svc);
        assert!(sel("metadata.name=a"));
        assert!(sel("metadata.namespace==ns,metadata.name=a"));
        assert!(!sel("metadata.name=b"));
        assert!(sel("spec.clusterIP!=None"));
        assert!(!sel("spec.clusterIP!=10.0.0.1"));
        assert!(sel("spec.type="));
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
