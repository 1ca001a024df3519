//! Kubernetes objects -> model, with upstream's filters and the API server's validation.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::ip::{parse_cidr_sloppy, parse_ip_sloppy};
use crate::names::{is_dns1123_label, is_dns1123_subdomain};
use crate::types::*;

/// Why an object, or one part of it, is not proxied. Display names the field and the
/// value, escaped. Only a problem with the object's key or its primary cluster IP skips a
/// whole Service; everything else drops one port, one address or one endpoint and is
/// reported through the `warnings` of the conversion (see the crate README's table).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("{field}: invalid name {value:?}")]
    InvalidName { field: String, value: String },
    #[error("{field}: invalid IP address {value:?}")]
    InvalidIp { field: String, value: String },
    #[error("{field}: invalid port {value}")]
    InvalidPort { field: String, value: i64 },
    #[error("{field}: unknown protocol {value:?}")]
    InvalidProtocol { field: String, value: String },
    #[error("{field}: duplicate {what} {value:?}")]
    DuplicatePort {
        field: String,
        what: &'static str,
        value: String,
    },
    #[error("missing {0}")]
    Missing(&'static str),
}

/// Label selecting the service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Annotation carrying the time of the change that produced an EndpointSlice.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Default ClientIP affinity timeout (the API server's default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// Checks that a string is a DNS-1123 label, as the API server does for namespaces and
/// service names.
pub fn validate_dns_label(field: &str, value: &str) -> Result<(), ConvertError> {
    if is_dns1123_label(value) {
        Ok(())
    } else {
        Err(ConvertError::InvalidName {
            field: field.into(),
            value: value.to_string(),
        })
    }
}

/// [`parse_ip_sloppy`] with the field named in the error.
fn parse_ip(field: impl Into<String>, s: &str) -> Result<IpAddr, ConvertError> {
    parse_ip_sloppy(s.trim()).ok_or_else(|| ConvertError::InvalidIp {
        field: field.into(),
        value: s.to_string(),
    })
}

/// IP families of a Service's valid cluster IPs (empty for headless/ExternalName).
pub fn service_families(svc: &Service) -> Vec<IpFamily> {
    let Some(spec) = svc.spec.as_ref() else {
        return vec![];
    };
    let mut out = Vec::new();
    for ip in spec
        .cluster_ip
        .iter()
        .chain(spec.cluster_ips.iter().flatten())
    {
        if let Some(ip) = parse_ip_sloppy(ip.trim()) {
            let f = IpFamily::of(&ip);
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    out
}

/// The service's ports for one IP family. `Ok(vec![])` means "not proxied" (headless,
/// ExternalName, no cluster IP of this family); `Err` means the object has no usable key
/// or primary cluster IP and is skipped as a whole. `warnings` collects problems that
/// drop one part only (a port, an external IP, a source range), one line each.
pub fn service_ports_from_service(
    svc: &Service,
    family: IpFamily,
    warnings: &mut Vec<String>,
) -> Result<Vec<ServicePort>, ConvertError> {
    let meta = &svc.metadata;
    let namespace = meta
        .namespace
        .as_deref()
        .ok_or(ConvertError::Missing("metadata.namespace"))?;
    let name = meta
        .name
        .as_deref()
        .ok_or(ConvertError::Missing("metadata.name"))?;
    validate_dns_label("metadata.namespace", namespace)?;
    validate_dns_label("metadata.name", name)?;
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(vec![]);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(vec![]);
    }
    let primary = spec.cluster_ip.as_deref().unwrap_or("");
    if primary.is_empty() || primary == "None" {
        return Ok(vec![]);
    }
    // The primary cluster IP must parse; a secondary one that does not drops only that
    // family. Then pick this family's.
    let mut cluster_ips = vec![parse_ip("spec.clusterIP", primary)?];
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        match parse_ip(format!("spec.clusterIPs[{i}]"), ip) {
            Ok(ip) if !cluster_ips.contains(&ip) => cluster_ips.push(ip),
            Ok(_) => {}
            Err(e) => warnings.push(e.to_string()),
        }
    }
    let Some(cluster_ip) = cluster_ips
        .iter()
        .copied()
        .find(|ip| IpFamily::of(ip) == family)
    else {
        return Ok(vec![]);
    };

    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let externally_typed = svc_type == "NodePort" || svc_type == "LoadBalancer";

    let mut external_ips = Vec::new();
    for (i, s) in spec.external_ips.iter().flatten().enumerate() {
        match parse_ip(format!("spec.externalIPs[{i}]"), s) {
            Ok(ip) if IpFamily::of(&ip) == family => external_ips.push(ip),
            Ok(_) => {}
            Err(e) => warnings.push(e.to_string()),
        }
    }
    let mut load_balancer_vips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
            if ing.hostname.as_deref().is_some_and(|h| !h.is_empty()) {
                warnings.push(format!(
                    "status.loadBalancer.ingress[{i}]: hostname-only ingress is not proxied (no IP)"
                ));
            }
            continue;
        };
        // ipMode Proxy: the load balancer delivers to the node itself; no VIP rules.
        if ing.ip_mode.as_deref().is_some_and(|m| m != "VIP") {
            continue;
        }
        match parse_ip(format!("status.loadBalancer.ingress[{i}].ip"), ip) {
            Ok(ip) if IpFamily::of(&ip) == family => load_balancer_vips.push(ip),
            Ok(_) => {}
            Err(e) => warnings.push(e.to_string()),
        }
    }
    let mut load_balancer_source_ranges = Vec::new();
    for (i, s) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        // The API server admits padding here (upstream trims it too).
        match parse_cidr_sloppy(s.trim()) {
            Some(net) if IpFamily::of(&net.addr()) == family => {
                load_balancer_source_ranges.push(net.trunc())
            }
            Some(_) => {}
            None => warnings.push(format!(
                "spec.loadBalancerSourceRanges[{i}]: invalid CIDR {s:?}"
            )),
        }
    }

    let session_affinity_timeout =
        (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .filter(|t| *t > 0)
                .map(|t| t as u32)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
        });
    let has_external = externally_typed || !external_ips.is_empty();
    let external_policy_local =
        has_external && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = match spec.health_check_node_port {
        _ if svc_type != "LoadBalancer" || !external_policy_local => None,
        None | Some(0) => None,
        Some(p) => match u16::try_from(p) {
            Ok(p) => Some(p),
            Err(_) => {
                warnings.push(format!(
                    "spec.healthCheckNodePort: invalid port {p}; no health check server"
                ));
                None
            }
        },
    };

    let ports = spec.ports.as_deref().unwrap_or(&[]);
    let mut seen = SeenPorts::default();
    let mut out = Vec::with_capacity(ports.len());
    let service = NamespacedName::new(namespace, name);
    for (i, p) in ports.iter().enumerate() {
        let (port_name, protocol, port, node_port) = match check_service_port(i, p, &mut seen) {
            Ok(checked) => checked,
            Err(e) => {
                warnings.push(format!("{e}: port not proxied"));
                continue;
            }
        };
        out.push(ServicePort {
            name: ServicePortName {
                service: service.clone(),
                port: port_name,
                protocol,
            },
            cluster_ip,
            port,
            protocol,
            node_port,
            session_affinity_timeout,
            external_ips: external_ips.clone(),
            load_balancer_vips: load_balancer_vips.clone(),
            load_balancer_source_ranges: load_balancer_source_ranges.clone(),
            health_check_node_port,
            external_policy_local,
            internal_policy_local,
        });
    }
    Ok(out)
}

/// Names, port/protocol pairs and NodePort/protocol pairs already taken by earlier ports
/// of a Service (the API server refuses duplicates of each; the first one wins here).
#[derive(Default)]
struct SeenPorts {
    names: HashSet<String>,
    ports: HashSet<(i32, Protocol)>,
    node_ports: HashSet<(u16, Protocol)>,
}

/// One Service port as the API server validates it: `(name, protocol, port, nodePort)`.
fn check_service_port(
    i: usize,
    p: &k8s_openapi::api::core::v1::ServicePort,
    seen: &mut SeenPorts,
) -> Result<(String, Protocol, u16, Option<u16>), ConvertError> {
    let port_name = p.name.clone().unwrap_or_default();
    // A DNS-1123 label, as the API server checks it (not the 15-character IANA rule of
    // container ports); it also keeps the name safe in rule comments and nft names.
    if !port_name.is_empty() && !is_dns1123_label(&port_name) {
        return Err(ConvertError::InvalidName {
            field: format!("spec.ports[{i}].name"),
            value: port_name,
        });
    }
    let protocol =
        Protocol::from_k8s(p.protocol.as_deref()).ok_or_else(|| ConvertError::InvalidProtocol {
            field: format!("spec.ports[{i}].protocol"),
            value: p.protocol.clone().unwrap_or_default(),
        })?;
    let port = u16::try_from(p.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ConvertError::InvalidPort {
            field: format!("spec.ports[{i}].port"),
            value: p.port.into(),
        })?;
    let node_port = match p.node_port {
        None | Some(0) => None,
        Some(n) => Some(u16::try_from(n).map_err(|_| ConvertError::InvalidPort {
            field: format!("spec.ports[{i}].nodePort"),
            value: n.into(),
        })?),
    };
    if seen.names.contains(&port_name) {
        return Err(ConvertError::DuplicatePort {
            field: format!("spec.ports[{i}].name"),
            what: "port name",
            value: port_name,
        });
    }
    if seen.ports.contains(&(p.port, protocol)) {
        return Err(ConvertError::DuplicatePort {
            field: format!("spec.ports[{i}]"),
            what: "port",
            value: format!("{}/{}", p.port, protocol.upper()),
        });
    }
    if let Some(n) = node_port
        && seen.node_ports.contains(&(n, protocol))
    {
        return Err(ConvertError::DuplicatePort {
            field: format!("spec.ports[{i}].nodePort"),
            what: "nodePort",
            value: format!("{n}/{}", protocol.upper()),
        });
    }
    seen.names.insert(port_name.clone());
    seen.ports.insert((p.port, protocol));
    if let Some(n) = node_port {
        seen.node_ports.insert((n, protocol));
    }
    Ok((port_name, protocol, port, node_port))
}

/// What one EndpointSlice contributes: endpoints per (port name, protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoints {
    pub service: NamespacedName,
    /// Sorted by port name and protocol.
    pub by_port: Vec<PortEndpoints>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, if present and valid.
    pub trigger_time: Option<std::time::SystemTime>,
}

/// The endpoints of one port of a slice, in the order (and with the duplicates collapsed)
/// of a service port's merged endpoints, so a service with one slice shares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortEndpoints {
    pub port: String,
    pub protocol: Protocol,
    pub endpoints: Arc<Vec<Endpoint>>,
}

/// See [`addr_key`].
pub(crate) type AddrKey = ([u8; 48], u8);

/// `ip:port` (`[ip]:port` for IPv6) as bytes, without allocating: the order of a service
/// port's endpoints.
pub(crate) fn addr_key(ep: &Endpoint) -> AddrKey {
    use std::io::Write;
    let mut buf = [0u8; 48];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    // At most 47 bytes: "[" + 39 (IPv6) + "]:" + 5.
    let _ = write!(cur, "{}", std::net::SocketAddr::new(ep.ip, ep.port));
    let len = cur.position() as u8;
    (buf, len)
}

/// Adds `eps` to a service port's endpoints, keyed by [`addr_key`]: an address seen
/// before is kept, unless the new one is on this node and the kept one is not.
pub(crate) fn merge_endpoints(
    merged: &mut BTreeMap<AddrKey, Endpoint>,
    eps: impl IntoIterator<Item = Endpoint>,
) {
    for ep in eps {
        match merged.entry(addr_key(&ep)) {
            std::collections::btree_map::Entry::Occupied(mut e) => {
                if ep.is_local && !e.get().is_local {
                    e.insert(ep);
                }
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(ep);
            }
        }
    }
}

/// Converts an EndpointSlice for one family. `Ok(None)`: not for us (FQDN, other family,
/// no service-name label). Invalid endpoints are dropped with a warning each.
pub fn endpoints_from_slice(
    slice: &EndpointSlice,
    family: IpFamily,
    node_name: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<SliceEndpoints>, ConvertError> {
    let meta = &slice.metadata;
    let namespace = meta
        .namespace
        .as_deref()
        .ok_or(ConvertError::Missing("metadata.namespace"))?;
    let name = meta
        .name
        .as_deref()
        .ok_or(ConvertError::Missing("metadata.name"))?;
    validate_dns_label("metadata.namespace", namespace)?;
    if !is_dns1123_subdomain(name) {
        return Err(ConvertError::InvalidName {
            field: "metadata.name".into(),
            value: name.to_string(),
        });
    }
    let Some(service) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
        return Ok(None);
    };
    // Any label value is admitted here, but only a DNS label can name a Service: a slice
    // labelled otherwise belongs to no Service and contributes nothing.
    if !is_dns1123_label(service) {
        warnings.push(format!(
            "metadata.labels[{LABEL_SERVICE_NAME}]: {service:?} is not a Service name; slice not used"
        ));
        return Ok(None);
    }
    let slice_family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        _ => return Ok(None),
    };
    if slice_family != family {
        return Ok(None);
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        // Upstream uses only the first address.
        let Some(addr) = ep.addresses.first() else {
            continue;
        };
        let ip = match parse_ip(format!("endpoints[{i}].addresses[0]"), addr) {
            Ok(ip) if IpFamily::of(&ip) == family => ip,
            Ok(_) => continue,
            Err(e) => {
                warnings.push(e.to_string());
                continue;
            }
        };
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(true);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        let zone_hints: BTreeSet<String> = hints
            .and_then(|h| h.for_zones.as_ref())
            .into_iter()
            .flatten()
            .map(|z| z.name.clone())
            .collect();
        let node_hints: BTreeSet<String> = hints
            .and_then(|h| h.for_nodes.as_ref())
            .into_iter()
            .flatten()
            .map(|n| n.name.clone())
            .collect();
        let is_local = !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name);
        endpoints.push((
            ip,
            ready,
            serving,
            terminating,
            is_local,
            zone_hints,
            node_hints,
        ));
    }

    let mut by_port: BTreeMap<(String, Protocol), BTreeMap<AddrKey, Endpoint>> = BTreeMap::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(port) = p.port.filter(|p| *p != 0) else {
            continue;
        };
        if !(1..=65535).contains(&port) {
            warnings.push(format!("ports[{i}].port: invalid port {port}"));
            continue;
        }
        let Some(protocol) = Protocol::from_k8s(p.protocol.as_deref()) else {
            warnings.push(format!(
                "ports[{i}].protocol: unknown protocol {:?}",
                p.protocol.as_deref().unwrap_or_default()
            ));
            continue;
        };
        let port_name = p.name.clone().unwrap_or_default();
        let list = by_port.entry((port_name, protocol)).or_default();
        let eps = endpoints.iter().map(
            |(ip, ready, serving, terminating, is_local, zone_hints, node_hints)| Endpoint {
                ip: *ip,
                port: port as u16,
                ready: *ready,
                serving: *serving,
                terminating: *terminating,
                is_local: *is_local,
                zone_hints: zone_hints.clone(),
                node_hints: node_hints.clone(),
            },
        );
        merge_endpoints(list, eps);
    }
    let by_port = by_port
        .into_iter()
        .map(|((port, protocol), eps)| PortEndpoints {
            port,
            protocol,
            endpoints: Arc::new(eps.into_values().collect()),
        })
        .collect();
    let trigger_time = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_TRIGGER_TIME))
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .map(std::time::SystemTime::from);
    Ok(Some(SliceEndpoints {
        service: NamespacedName::new(namespace, service),
        by_port,
        trigger_time,
    }))
}
