//! `meta.k8s.io/v1 Table` rendering, which kubectl asks for (`Accept: ...;as=Table`) to
//! print the familiar columns (CLUSTER-IP, PORT(S), READY, ...) instead of NAME/AGE only.

use serde_json::{Value, json};

/// What the client asked for: the Table version and how much of each object to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRequest {
    api_version: String,
    include_object: IncludeObject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl TableRequest {
    /// `Some` when the Accept header prefers a Table (kubectl's default for `get`).
    pub fn from_accept(accept: &str, include_object: Option<&str>) -> Option<Self> {
        let version = accept.split(',').find_map(|range| {
            let params: Vec<(&str, &str)> = range
                .split(';')
                .skip(1)
                .filter_map(|p| p.trim().split_once('='))
                .collect();
            let get = |key: &str| params.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
            (get("as") == Some("Table") && get("g") == Some("meta.k8s.io"))
                .then(|| get("v").unwrap_or("v1").to_string())
        })?;
        let include_object = match include_object {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        };
        Some(Self {
            api_version: format!("meta.k8s.io/{version}"),
            include_object,
        })
    }

    /// A Table of `objects` of `kind`, with the list metadata (resourceVersion, continue).
    pub fn render(&self, kind: &str, objects: &[Value], list_metadata: Value) -> Value {
        let rows: Vec<Value> = objects
            .iter()
            .map(|object| json!({"cells": cells(kind, object), "object": self.embedded(object)}))
            .collect();
        json!({
            "kind": "Table",
            "apiVersion": self.api_version,
            "metadata": list_metadata,
            "columnDefinitions": columns(kind)
                .iter()
                .map(|(name, ty, priority)| json!({
                    "name": name,
                    "type": ty,
                    "format": if *name == "Name" { "name" } else { "" },
                    "description": "",
                    "priority": priority,
                }))
                .collect::<Vec<_>>(),
            "rows": rows,
        })
    }

    fn embedded(&self, object: &Value) -> Value {
        match self.include_object {
            IncludeObject::None => Value::Null,
            IncludeObject::Object => object.clone(),
            IncludeObject::Metadata => json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
            }),
        }
    }
}

/// Column name, type and priority (1 = only with `-o wide`).
fn columns(kind: &str) -> &'static [(&'static str, &'static str, u8)] {
    match kind {
        "Service" => &[
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            ("Age", "string", 0),
            ("Selector", "string", 1),
        ],
        "EndpointSlice" => &[
            ("Name", "string", 0),
            ("AddressType", "string", 0),
            ("Ports", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ],
        "Pod" => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
        ],
        "Deployment" => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Up-to-date", "string", 0),
            ("Available", "string", 0),
            ("Age", "string", 0),
        ],
        "Node" => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
        ],
        "Namespace" => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Age", "string", 0),
        ],
        _ => &[("Name", "string", 0), ("Age", "string", 0)],
    }
}

fn text<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn number(object: &Value, pointer: &str) -> i64 {
    object.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn array<'a>(object: &'a Value, pointer: &str) -> &'a [Value] {
    object
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn or_none(text: String) -> String {
    if text.is_empty() {
        "<none>".to_string()
    } else {
        text
    }
}

fn cells(kind: &str, object: &Value) -> Vec<Value> {
    let name = json!(text(object, "/metadata/name"));
    let age = json!(age(text(object, "/metadata/creationTimestamp")));
    match kind {
        "Service" => {
            let service_type = text(object, "/spec/type");
            let ports = array(object, "/spec/ports")
                .iter()
                .map(|p| {
                    let node_port = p
                        .get("nodePort")
                        .and_then(Value::as_i64)
                        .map(|n| format!(":{n}"))
                        .unwrap_or_default();
                    format!("{}{node_port}/{}", number(p, "/port"), text(p, "/protocol"))
                })
                .collect::<Vec<_>>()
                .join(",");
            let selector = object
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let external = match service_type {
                "ExternalName" => text(object, "/spec/externalName").to_string(),
                "LoadBalancer" => {
                    let ingress: Vec<&str> = array(object, "/status/loadBalancer/ingress")
                        .iter()
                        .filter_map(|i| {
                            i.get("ip")
                                .or_else(|| i.get("hostname"))
                                .and_then(Value::as_str)
                        })
                        .collect();
                    if ingress.is_empty() {
                        "<pending>".to_string()
                    } else {
                        ingress.join(",")
                    }
                }
                _ => array(object, "/spec/externalIPs")
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
            };
            vec![
                name,
                json!(service_type),
                json!(or_none(text(object, "/spec/clusterIP").to_string())),
                json!(or_none(external)),
                json!(or_none(ports)),
                age,
                json!(or_none(selector)),
            ]
        }
        "EndpointSlice" => {
            let ports = array(object, "/ports")
                .iter()
                .map(|p| number(p, "/port").to_string())
                .collect::<Vec<_>>();
            let addresses: Vec<&str> = array(object, "/endpoints")
                .iter()
                .flat_map(|e| array(e, "/addresses").iter().filter_map(Value::as_str))
                .collect();
            let mut endpoints = addresses
                .iter()
                .take(3)
                .copied()
                .collect::<Vec<_>>()
                .join(",");
            if addresses.len() > 3 {
                endpoints.push_str(&format!(" + {} more...", addresses.len() - 3));
            }
            let unset = |s: String| {
                if s.is_empty() {
                    "<unset>".to_string()
                } else {
                    s
                }
            };
            vec![
                name,
                json!(text(object, "/addressType")),
                json!(unset(ports.join(","))),
                json!(unset(endpoints)),
                age,
            ]
        }
        "Pod" => {
            let statuses = array(object, "/status/containerStatuses");
            let ready = statuses
                .iter()
                .filter(|s| s.get("ready").and_then(Value::as_bool) == Some(true))
                .count();
            let total = array(object, "/spec/containers").len();
            let restarts: i64 = statuses.iter().map(|s| number(s, "/restartCount")).sum();
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(text(object, "/status/phase")),
                json!(restarts.to_string()),
                age,
                json!(or_none(text(object, "/status/podIP").to_string())),
                json!(or_none(text(object, "/spec/nodeName").to_string())),
            ]
        }
        "Deployment" => vec![
            name,
            json!(format!(
                "{}/{}",
                number(object, "/status/readyReplicas"),
                number(object, "/spec/replicas")
            )),
            json!(number(object, "/status/updatedReplicas")),
            json!(number(object, "/status/availableReplicas")),
            age,
        ],
        "Node" => {
            let ready = array(object, "/status/conditions")
                .iter()
                .any(|c| text(c, "/type") == "Ready" && text(c, "/status") == "True");
            let roles = object
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .map(|labels| {
                    labels
                        .keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                name,
                json!(if ready { "Ready" } else { "NotReady" }),
                json!(or_none(roles)),
                age,
                json!(text(object, "/status/nodeInfo/kubeletVersion")),
            ]
        }
        "Namespace" => vec![name, json!(text(object, "/status/phase")), age],
        _ => vec![name, age],
    }
}

/// Age as kubectl prints it ("45s", "3m12s", "5h", "2d3h", ...).
fn age(creation_timestamp: &str) -> String {
    let Ok(created) = creation_timestamp.parse::<jiff::Timestamp>() else {
        return "<unknown>".to_string();
    };
    let seconds = jiff::Timestamp::now().as_second() - created.as_second();
    human_duration(seconds)
}

fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".to_string();
    }
    let seconds = seconds.max(0);
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86400);
    let pair = |major: i64, major_unit: &str, minor: i64, minor_unit: &str| {
        if minor == 0 {
            format!("{major}{major_unit}")
        } else {
            format!("{major}{major_unit}{minor}{minor_unit}")
        }
    };
    match () {
        _ if seconds < 120 => format!("{seconds}s"),
        _ if minutes < 10 => pair(minutes, "m", seconds % 60, "s"),
        _ if minutes < 180 => format!("{minutes}m"),
        _ if hours < 8 => pair(hours, "h", minutes % 60, "m"),
        _ if hours < 48 => format!("{hours}h"),
        _ if hours < 192 => pair(days, "d", hours % 24, "h"),
        _ if days < 365 * 2 => format!("{days}d"),
        _ if days < 365 * 8 => pair(days / 365, "y", days % 365, "d"),
        _ => format!("{}y", days / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECTL_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

    #[test]
    fn accept_header_selects_tables() {
        let request = TableRequest::from_accept(KUBECTL_ACCEPT, None).expect("table");
        assert_eq!(request.api_version, "meta.k8s.io/v1");
        assert_eq!(request.include_object, IncludeObject::Metadata);
        assert!(TableRequest::from_accept("application/json", None).is_none());
        let beta = TableRequest::from_accept(
            "application/json;as=Table;v=v1beta1;g=meta.k8s.io",
            Some("Object"),
        )
        .expect("table");
        assert_eq!(
            (beta.api_version.as_str(), beta.include_object),
            ("meta.k8s.io/v1beta1", IncludeObject::Object)
        );
    }

    #[test]
    fn service_rows_show_ports_and_external_ips() {
        let svc = json!({"metadata": {"name": "web", "namespace": "ns", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
                "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]},
            "status": {"loadBalancer": {}}});
        let table = TableRequest::from_accept(KUBECTL_ACCEPT, None)
            .expect("table")
            .render("Service", &[svc], json!({}));
        let cells = &table["rows"][0]["cells"];
        assert_eq!(cells[2], "10.96.0.10");
        assert_eq!(cells[3], "<pending>");
        assert_eq!(cells[4], "80:30080/TCP,53/UDP");
        assert_eq!(cells[6], "app=web");
        assert_eq!(table["rows"][0]["object"]["metadata"]["namespace"], "ns");
        assert_eq!(table["columnDefinitions"].as_array().map(Vec::len), Some(7));
    }

    #[test]
    fn endpoint_slice_rows_summarise_addresses() {
        let endpoints: Vec<Value> = (1..=5)
            .map(|i| json!({"addresses": [format!("10.0.0.{i}")]}))
            .collect();
        let slice = json!({"metadata": {"name": "s"}, "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": endpoints});
        let row = cells("EndpointSlice", &slice);
        assert_eq!(row[2], "8080");
        assert_eq!(row[3], "10.0.0.1,10.0.0.2,10.0.0.3 + 2 more...");
    }

    #[test]
    fn durations_match_kubectl_style() {
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(192), "3m12s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(5 * 3600 + 60), "5h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(100 * 86400), "100d");
        assert_eq!(human_duration(-5), "<invalid>");
    }
}
