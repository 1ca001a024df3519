//! PATCH bodies: JSON merge patch (RFC 7386), a light strategic merge patch (what kubectl
//! sends for label/annotate/scale/apply on built-in types) and JSON patch (RFC 6902).

use serde_json::{Map, Value};

use super::status::ApiError;

/// The patch formats the emulator accepts, by request Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Strategic,
    Json,
}

impl PatchKind {
    /// Maps a Content-Type to a patch kind; server-side apply is answered with 415.
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/json-patch+json" => Ok(Self::Json),
            other => Err(ApiError::new(
                415,
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"
                ),
            )),
        }
    }
}

/// Applies `patch` to `target` in place.
pub fn apply_patch(kind: PatchKind, target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    match kind {
        PatchKind::Merge => {
            merge_patch(target, patch);
            Ok(())
        }
        PatchKind::Strategic => {
            let mut path = Vec::new();
            strategic_merge(target, patch, &mut path);
            Ok(())
        }
        PatchKind::Json => json_patch(target, patch),
    }
}

/// RFC 7386: objects merge recursively, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Merge keys of the lists that kubectl patches element-wise, by path suffix.
const MERGE_KEYS: &[(&[&str], &str)] = &[
    (&["spec", "ports"], "port"),
    (&["containers", "ports"], "containerPort"),
    (&["initContainers", "ports"], "containerPort"),
    (&["containers"], "name"),
    (&["initContainers"], "name"),
    (&["env"], "name"),
    (&["volumes"], "name"),
    (&["volumeMounts"], "mountPath"),
    (&["imagePullSecrets"], "name"),
    (&["status", "conditions"], "type"),
    (&["status", "addresses"], "type"),
];

fn merge_key_for(path: &[String]) -> Option<&'static str> {
    MERGE_KEYS.iter().find_map(|(suffix, key)| {
        let matches = path.len() >= suffix.len()
            && path[path.len() - suffix.len()..]
                .iter()
                .zip(suffix.iter())
                .all(|(a, b)| a == b);
        matches.then_some(*key)
    })
}

fn strategic_merge(target: &mut Value, patch: &Value, path: &mut Vec<String>) {
    let Value::Object(patch_map) = patch else {
        *target = strip_directives(patch);
        return;
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        return;
    };
    for (key, value) in patch_map {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Value::Array(remove)) =
                (target_map.get_mut(field), value)
            {
                items.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            target_map.remove(key);
            continue;
        }
        path.push(key.clone());
        let slot = target_map.entry(key.clone()).or_insert(Value::Null);
        match (merge_key_for(path), value, &mut *slot) {
            (Some(merge_key), Value::Array(patch_items), Value::Array(target_items))
                if patch_items.iter().all(Value::is_object)
                    && target_items.iter().all(Value::is_object) =>
            {
                merge_list_by_key(target_items, patch_items, merge_key, path);
            }
            (_, Value::Object(_), _) => strategic_merge(slot, value, path),
            _ => *slot = strip_directives(value),
        }
        path.pop();
    }
}

fn merge_list_by_key(
    target: &mut Vec<Value>,
    patch: &[Value],
    merge_key: &str,
    path: &mut Vec<String>,
) {
    for item in patch {
        let key_value = item.get(merge_key);
        let position =
            key_value.and_then(|k| target.iter().position(|t| t.get(merge_key) == Some(k)));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(index), true) => {
                target.remove(index);
            }
            (None, true) => {}
            (Some(index), false) => strategic_merge(&mut target[index], item, path),
            (None, false) => target.push(strip_directives(item)),
        }
    }
}

/// Removes `$`-prefixed strategic-merge directives from a value that is stored as is.
fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// RFC 6902 JSON patch: add, remove, replace, test, move, copy.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| ApiError::bad_request("json patch must be an array of operations"))?;
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("json patch operation without path"))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| ApiError::bad_request(format!("json patch {name} without value")))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_request(format!("json patch {name} without from")))
        };
        match name {
            "add" => pointer_add(target, path, value()?)?,
            "remove" => {
                pointer_remove(target, path)?;
            }
            "replace" => {
                let slot = target.pointer_mut(path).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "replace operation does not apply: doc is missing path: {path}"
                    ))
                })?;
                *slot = value()?;
            }
            "test" => {
                if target.pointer(path) != Some(&value()?) {
                    return Err(ApiError::invalid(format!("testing value {path} failed")));
                }
            }
            "move" => {
                let moved = pointer_remove(target, from()?)?;
                pointer_add(target, path, moved)?;
            }
            "copy" => {
                let copied = target
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| ApiError::invalid(format!("copy from missing path: {path}")))?;
                pointer_add(target, path, copied)?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown json patch op {other:?}"
                )));
            }
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> Result<(String, String), ApiError> {
    let index = path
        .rfind('/')
        .ok_or_else(|| ApiError::bad_request(format!("invalid json pointer {path:?}")))?;
    let last = path[index + 1..].replace("~1", "/").replace("~0", "~");
    Ok((path[..index].to_string(), last))
}

fn pointer_add(target: &mut Value, path: &str, value: Value) -> Result<(), ApiError> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent_path, last) = split_pointer(path)?;
    let parent = target.pointer_mut(&parent_path).ok_or_else(|| {
        ApiError::invalid(format!(
            "add operation does not apply: doc is missing path: {path}"
        ))
    })?;
    match parent {
        Value::Object(map) => {
            map.insert(last, value);
            Ok(())
        }
        Value::Array(items) => {
            let index = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= items.len())
                    .ok_or_else(|| ApiError::invalid(format!("add index out of range: {path}")))?
            };
            items.insert(index, value);
            Ok(())
        }
        _ => Err(ApiError::invalid(format!(
            "add operation does not apply: {path}"
        ))),
    }
}

fn pointer_remove(target: &mut Value, path: &str) -> Result<Value, ApiError> {
    let (parent_path, last) = split_pointer(path)?;
    let missing = || {
        ApiError::invalid(format!(
            "remove operation does not apply: doc is missing path: {path}"
        ))
    };
    match target.pointer_mut(&parent_path).ok_or_else(missing)? {
        Value::Object(map) => map.remove(&last).ok_or_else(missing),
        Value::Array(items) => {
            let index = last
                .parse::<usize>()
                .ok()
                .filter(|i| *i < items.len())
                .ok_or_else(missing)?;
            Ok(items.remove(index))
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_adds_replaces_and_removes() {
        let mut obj =
            json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"replicas": 1}});
        merge_patch(
            &mut obj,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"replicas": 3}}),
        );
        assert_eq!(
            obj,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"replicas": 3}})
        );
    }

    #[test]
    fn strategic_patch_merges_service_ports_by_port() {
        let mut svc = json!({"spec": {"ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"}
        ]}});
        let patch = json!({"spec": {
            "$setElementOrder/ports": [{"port": 80}, {"port": 53}, {"port": 443}],
            "ports": [{"port": 80, "targetPort": 9090}, {"port": 53, "$patch": "delete"}, {"port": 443, "name": "https"}]
        }});
        apply_patch(PatchKind::Strategic, &mut svc, &patch).expect("applies");
        assert_eq!(
            svc,
            json!({"spec": {"ports": [
                {"name": "http", "port": 80, "targetPort": 9090, "protocol": "TCP"},
                {"port": 443, "name": "https"}
            ]}})
        );
    }

    #[test]
    fn strategic_patch_replaces_atomic_lists() {
        let mut slice =
            json!({"endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"port": 80}]});
        apply_patch(
            PatchKind::Strategic,
            &mut slice,
            &json!({"ports": [{"port": 81}]}),
        )
        .expect("applies");
        assert_eq!(slice["ports"], json!([{"port": 81}]));
    }

    #[test]
    fn json_patch_operations() {
        let mut obj = json!({"metadata": {"labels": {"a/b": "1"}}, "items": [1, 2]});
        let ops = json!([
            {"op": "add", "path": "/items/-", "value": 3},
            {"op": "remove", "path": "/metadata/labels/a~1b"},
            {"op": "replace", "path": "/items/0", "value": 0},
            {"op": "test", "path": "/items/2", "value": 3},
            {"op": "copy", "from": "/items/2", "path": "/copied"},
        ]);
        json_patch(&mut obj, &ops).expect("applies");
        assert_eq!(
            obj,
            json!({"metadata": {"labels": {}}, "items": [0, 2, 3], "copied": 3})
        );
        let err = json_patch(
            &mut obj,
            &json!([{"op": "test", "path": "/copied", "value": 4}]),
        )
        .expect_err("test fails");
        assert_eq!(err.code, 422);
        assert_eq!(
            json_patch(&mut obj, &json!({"op": "add"}))
                .expect_err("not array")
                .code,
            400
        );
    }

    #[test]
    fn apply_patch_content_type_is_unsupported() {
        let err = PatchKind::from_content_type("application/apply-patch+yaml").expect_err("415");
        assert_eq!(err.code, 415);
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8")
                .expect("merge"),
            PatchKind::Merge
        );
    }
}
