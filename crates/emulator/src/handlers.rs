//! Resource verbs: list, get, create, update, patch, delete, deletecollection, the
//! `status` and `scale` subresources; watch is handed to [`super::watch`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use base64::Engine as _;
use http::{Method, Response};
use serde_json::{Value, json};

use super::patch::{PatchKind, apply_patch};
use super::request::{ResourcePath, parse_selectors};
use super::resources;
use super::state::{Shared, error_response, json_response};
use super::status::ApiError;
use super::store::{ObjectKey, UpdateScope};
use super::table::TableRequest;
use super::watch;

fn is_true(query: &HashMap<String, String>, key: &str) -> bool {
    query
        .get(key)
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))
    })?;
    if !value.is_object() && !value.is_array() {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    }
    Ok(value)
}

fn object_key(target: &ResourcePath) -> Result<ObjectKey, ApiError> {
    let name = target
        .name
        .clone()
        .ok_or_else(|| ApiError::new(405, "a resource name is required"))?;
    Ok(ObjectKey {
        resource: target.resource,
        namespace: target.namespace.clone().unwrap_or_default(),
        name,
    })
}

/// The parts of an HTTP request the verbs need.
pub struct ApiRequest<'a> {
    pub method: &'a Method,
    pub query: &'a HashMap<String, String>,
    pub content_type: &'a str,
    pub accept: &'a str,
    pub body: &'a [u8],
}

/// Routes one resource request to its verb.
pub fn dispatch(
    shared: &Arc<Shared>,
    target: ResourcePath,
    request: &ApiRequest<'_>,
) -> Response<Body> {
    let (method, query, body) = (request.method, request.query, request.body);
    let table = TableRequest::from_accept(
        request.accept,
        query.get("includeObject").map(String::as_str),
    )
    .filter(|_| *method == Method::GET && target.subresource.is_none());
    if *method == Method::GET && target.name.is_none() && is_true(query, "watch") {
        return match watch::start_watch(shared, &target, query, table) {
            Ok(response) => response,
            Err(error) => error_response(&error),
        };
    }
    let kind = resources::resource(target.resource).kind;
    if *method != Method::GET && query.get("dryRun").is_some_and(|d| !d.is_empty()) {
        // Better refused than silently persisted: the store has no dry-run mode.
        return error_response(&ApiError::bad_request(
            "dryRun is not supported by the emulator",
        ));
    }
    let result = match (method.clone(), target.name.is_some()) {
        (Method::GET, false) => list(shared, &target, query).map(|list| match &table {
            Some(table) => {
                let items = list["items"].as_array().cloned().unwrap_or_default();
                (200, table.render(kind, &items, list["metadata"].clone()))
            }
            None => (200, list),
        }),
        (Method::GET, true) => get(shared, &target).map(|object| match &table {
            Some(table) => {
                let metadata =
                    json!({"resourceVersion": object.pointer("/metadata/resourceVersion")});
                (
                    200,
                    table.render(kind, std::slice::from_ref(&object), metadata),
                )
            }
            None => (200, object),
        }),
        (Method::POST, false) => parse_body(body)
            .and_then(|obj| create(shared, &target, obj))
            .map(|v| (201, v)),
        (Method::PUT, true) => parse_body(body)
            .and_then(|obj| update(shared, &target, obj))
            .map(|v| (200, v)),
        (Method::PATCH, true) => {
            patch(shared, &target, request.content_type, body).map(|v| (200, v))
        }
        (Method::DELETE, true) => delete(shared, &target).map(|v| (200, v)),
        (Method::DELETE, false) => delete_collection(shared, &target, query).map(|v| (200, v)),
        _ => Err(ApiError::new(
            405,
            "the server does not allow this method on the requested resource",
        )),
    };
    match result {
        Ok((status, value)) => json_response(status, &value),
        Err(error) => error_response(&error),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    ns: String,
    name: String,
}

fn encode_continue(rv: u64, key: &ObjectKey) -> String {
    let token = ContinueToken {
        rv,
        ns: key.namespace.clone(),
        name: key.name.clone(),
    };
    let json = serde_json::to_vec(&token).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim())
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| {
            ApiError::bad_request("continue key is not valid: illegal base64 data or JSON")
        })
}

fn list(
    shared: &Shared,
    target: &ResourcePath,
    query: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    let rt = resources::resource(target.resource);
    let selectors = parse_selectors(query)?;
    let limit = match query.get("limit").map(String::as_str) {
        None | Some("") => None,
        Some(text) => {
            let n: i64 = text
                .parse()
                .map_err(|_| ApiError::bad_request(format!("limit: invalid value {text:?}")))?;
            usize::try_from(n).ok().filter(|n| *n > 0)
        }
    };
    let after = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let token = decode_continue(token)?;
            Some(ObjectKey {
                resource: target.resource,
                namespace: token.ns,
                name: token.name,
            })
        }
        None => None,
    };
    let store = shared.store();
    let resource_version = store.resource_version();
    let mut matching = store
        .list(target.resource, target.namespace.as_deref(), after.as_ref())
        .filter(|(_, obj)| selectors.matches(obj));
    let mut items = Vec::new();
    let mut last_key = None;
    for (key, object) in matching.by_ref() {
        items.push(object.clone());
        last_key = Some(key.clone());
        if limit.is_some_and(|l| items.len() >= l) {
            break;
        }
    }
    let remaining = matching.count();
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if remaining > 0
        && let Some(last_key) = last_key
    {
        metadata["continue"] = json!(encode_continue(resource_version, &last_key));
        metadata["remainingItemCount"] = json!(remaining);
    }
    Ok(json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

fn get(shared: &Shared, target: &ResourcePath) -> Result<Value, ApiError> {
    let rt = resources::resource(target.resource);
    let key = object_key(target)?;
    let store = shared.store();
    let object = store
        .get(&key)
        .ok_or_else(|| ApiError::not_found(rt.group, rt.plural, &key.name))?;
    match target.subresource.as_deref() {
        Some("scale") => Ok(scale_of(object)),
        _ => Ok(object.clone()),
    }
}

fn create(shared: &Shared, target: &ResourcePath, object: Value) -> Result<Value, ApiError> {
    if target.subresource.is_some() {
        return Err(ApiError::new(
            405,
            "create is not allowed on this subresource",
        ));
    }
    shared
        .store()
        .create(target.resource, target.namespace.as_deref(), object)
}

fn update(shared: &Shared, target: &ResourcePath, object: Value) -> Result<Value, ApiError> {
    let mut store = shared.store();
    match target.subresource.as_deref() {
        Some("scale") => {
            let key = object_key(target)?;
            let rt = resources::resource(target.resource);
            let mut current = store
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(rt.group, rt.plural, &key.name))?;
            let replicas = object
                .pointer("/spec/replicas")
                .cloned()
                .ok_or_else(|| ApiError::invalid("spec.replicas: Required value"))?;
            current["spec"]["replicas"] = replicas;
            if let Some(rv) = object.pointer("/metadata/resourceVersion") {
                current["metadata"]["resourceVersion"] = rv.clone();
            }
            let updated = store.update(
                target.resource,
                target.namespace.as_deref(),
                target.name.as_deref(),
                current,
                UpdateScope::Main,
            )?;
            Ok(scale_of(&updated))
        }
        Some("status") => store.update(
            target.resource,
            target.namespace.as_deref(),
            target.name.as_deref(),
            object,
            UpdateScope::Status,
        ),
        _ => store.update(
            target.resource,
            target.namespace.as_deref(),
            target.name.as_deref(),
            object,
            UpdateScope::Main,
        ),
    }
}

fn patch(
    shared: &Shared,
    target: &ResourcePath,
    content_type: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let kind = PatchKind::from_content_type(content_type)?;
    let patch_body = parse_body(body)?;
    let rt = resources::resource(target.resource);
    let key = object_key(target)?;
    let mut store = shared.store();
    let current = store
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(rt.group, rt.plural, &key.name))?;
    let namespace = target.namespace.as_deref();
    match target.subresource.as_deref() {
        Some("scale") => {
            let mut scale = scale_of(&current);
            apply_patch(kind, &mut scale, &patch_body)?;
            let mut updated = current;
            updated["spec"]["replicas"] =
                scale.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
            let stored = store.update(
                target.resource,
                namespace,
                Some(&key.name),
                updated,
                UpdateScope::Main,
            )?;
            Ok(scale_of(&stored))
        }
        sub => {
            let mut patched = current;
            apply_patch(kind, &mut patched, &patch_body)?;
            let scope = if sub == Some("status") {
                UpdateScope::Status
            } else {
                UpdateScope::Main
            };
            store.update(target.resource, namespace, Some(&key.name), patched, scope)
        }
    }
}

fn delete(shared: &Shared, target: &ResourcePath) -> Result<Value, ApiError> {
    if target.subresource.is_some() {
        return Err(ApiError::new(
            405,
            "delete is not allowed on this subresource",
        ));
    }
    let key = object_key(target)?;
    shared.store().delete(&key)
}

fn delete_collection(
    shared: &Shared,
    target: &ResourcePath,
    query: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    let rt = resources::resource(target.resource);
    let selectors = parse_selectors(query)?;
    let mut store = shared.store();
    let keys: Vec<ObjectKey> = store
        .list(target.resource, target.namespace.as_deref(), None)
        .filter(|(_, obj)| selectors.matches(obj))
        .map(|(key, _)| key.clone())
        .collect();
    let mut deleted = Vec::new();
    for key in keys {
        deleted.push(store.delete(&key)?);
    }
    Ok(json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(),
        "metadata": {"resourceVersion": store.resource_version().to_string()},
        "items": deleted,
    }))
}

/// The autoscaling/v1 Scale view of a Deployment.
fn scale_of(object: &Value) -> Value {
    let match_labels = object
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let metadata = &object["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"],
            "creationTimestamp": metadata["creationTimestamp"],
        },
        "spec": {"replicas": object.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {
            "replicas": object.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": match_labels,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let key = ObjectKey {
            resource: 0,
            namespace: "ns".into(),
            name: "web".into(),
        };
        let token = decode_continue(&encode_continue(7, &key)).expect("decodes");
        assert_eq!(
            (token.rv, token.ns.as_str(), token.name.as_str()),
            (7, "ns", "web")
        );
        assert_eq!(decode_continue("%%%").err().map(|e| e.code), Some(400));
    }

    #[test]
    fn scale_view_reads_replicas_and_selector() {
        let deploy = json!({"metadata": {"name": "d", "namespace": "n", "resourceVersion": "4"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "d"}}}, "status": {"replicas": 2}});
        let scale = scale_of(&deploy);
        assert_eq!(scale["spec"]["replicas"], 3);
        assert_eq!(scale["status"]["replicas"], 2);
        assert_eq!(scale["status"]["selector"], "app=d");
        assert_eq!(scale["metadata"]["resourceVersion"], "4");
    }
}
