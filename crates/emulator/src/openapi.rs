//! A minimal OpenAPI v3 document: no schemas, only the PATCH operations with their
//! `x-kubernetes-group-version-kind` and `fieldValidation` parameter. That is what
//! kubectl reads to decide the server validates fields itself, so `kubectl create -f`
//! and `kubectl apply -f` work without a full schema.

use serde_json::{Map, Value, json};

use super::resources::RESOURCES;

/// Fixed hash: the document never changes while the process runs.
const SPEC_HASH: &str = "kp-emulator-1";

fn group_version_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `GET /openapi/v3`: one entry per served group/version.
pub fn root() -> Value {
    let mut paths = Map::new();
    for r in RESOURCES {
        let path = group_version_path(r.group, r.version);
        paths.entry(path.clone()).or_insert_with(
            || json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={SPEC_HASH}")}),
        );
    }
    json!({"paths": paths})
}

/// `GET /openapi/v3/<api/v1 | apis/group/version>`; `None` when not served.
pub fn group_version_spec(path: &str) -> Option<Value> {
    let mut paths = Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| group_version_path(r.group, r.version) == path)
    {
        let item_path = if r.namespaced {
            format!("/{path}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("/{path}/{}/{{name}}", r.plural)
        };
        let parameters: Vec<Value> = ["dryRun", "fieldManager", "fieldValidation", "force"]
            .iter()
            .map(|name| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}}))
            .collect();
        paths.insert(
            item_path,
            json!({
                "patch": {
                    "operationId": format!("patch{}", r.kind),
                    "parameters": parameters,
                    "responses": {"200": {"description": "OK"}},
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
                }
            }),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_points_at_each_group_version_once() {
        let root = root();
        let paths = root["paths"].as_object().expect("paths");
        assert!(paths.contains_key("api/v1"));
        assert!(paths.contains_key("apis/discovery.k8s.io/v1"));
        assert_eq!(paths.len(), 4);
        let url = paths["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .expect("url");
        assert!(url.starts_with("/openapi/v3/apis/apps/v1?hash="));
    }

    #[test]
    fn group_version_spec_declares_field_validation_on_patch() {
        let spec = group_version_spec("api/v1").expect("served");
        let patch = &spec["paths"]["/api/v1/namespaces/{namespace}/services/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "Service");
        let params = patch["parameters"].as_array().expect("params");
        assert!(params.iter().any(|p| p["name"] == "fieldValidation"));
        assert!(spec["paths"].get("/api/v1/nodes/{name}").is_some());
        assert!(group_version_spec("apis/batch/v1").is_none());
    }
}
