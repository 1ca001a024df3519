//! Service defaulting the real API server does on write: ClusterIP and NodePort
//! allocation, `type`, `ipFamilies`, traffic policies, port protocols and target ports.

use std::collections::HashSet;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use ipnet::IpNet;
use serde_json::{Map, Value, json};

use super::status::ApiError;

/// Hands out ClusterIPs and NodePorts and remembers which ones services hold.
#[derive(Debug)]
pub struct ServiceAllocator {
    cidr: IpNet,
    node_ports: RangeInclusive<u16>,
    used_ips: HashSet<IpAddr>,
    used_node_ports: HashSet<u16>,
    next_ip_offset: u128,
    next_node_port: u16,
}

fn cluster_ips(svc: &Value) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = svc
        .pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(|s| s.parse().ok())
        .collect();
    if let Some(ip) = svc
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

fn node_ports(svc: &Value) -> Vec<u16> {
    svc.pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
        .chain(
            svc.pointer("/spec/healthCheckNodePort")
                .and_then(Value::as_u64),
        )
        .filter_map(|p| u16::try_from(p).ok())
        .collect()
}

fn network_size(cidr: &IpNet) -> u128 {
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
}

fn ip_at(cidr: &IpNet, offset: u128) -> Option<IpAddr> {
    match cidr {
        IpNet::V4(net) => {
            let base = u32::from(net.network());
            let offset = u32::try_from(offset).ok()?;
            Some(IpAddr::V4(base.checked_add(offset)?.into()))
        }
        IpNet::V6(net) => Some(IpAddr::V6(
            u128::from(net.network()).checked_add(offset)?.into(),
        )),
    }
}

impl ServiceAllocator {
    pub fn new(cidr: IpNet, node_ports: RangeInclusive<u16>) -> Self {
        let size = network_size(&cidr);
        let next_ip_offset = if size > 64 { 10 } else { 1 };
        let next_node_port = *node_ports.start();
        Self {
            cidr,
            node_ports,
            used_ips: HashSet::new(),
            used_node_ports: HashSet::new(),
            next_ip_offset,
            next_node_port,
        }
    }

    pub fn claim(&mut self, svc: &Value) {
        self.used_ips.extend(cluster_ips(svc));
        self.used_node_ports.extend(node_ports(svc));
    }

    pub fn release(&mut self, svc: &Value) {
        for ip in cluster_ips(svc) {
            self.used_ips.remove(&ip);
        }
        for port in node_ports(svc) {
            self.used_node_ports.remove(&port);
        }
    }

    fn allocate_ip(&mut self) -> Result<IpAddr, ApiError> {
        let size = network_size(&self.cidr);
        // Usable offsets: skip the network address and (IPv4) the broadcast address.
        let last = if self.cidr.max_prefix_len() == 32 {
            size.saturating_sub(2)
        } else {
            size.saturating_sub(1)
        };
        if last < 1 {
            return Err(ApiError::new(500, "service CIDR has no usable addresses"));
        }
        let attempts = (self.used_ips.len() as u128).saturating_add(1).min(last);
        for _ in 0..attempts.max(1) {
            let offset = self.next_ip_offset;
            self.next_ip_offset = if offset >= last { 1 } else { offset + 1 };
            if let Some(ip) = ip_at(&self.cidr, offset)
                && !self.used_ips.contains(&ip)
            {
                return Ok(ip);
            }
        }
        Err(ApiError::new(
            500,
            "failed to allocate a serviceIP: range is full",
        ))
    }

    fn allocate_node_port(&mut self, taken: &HashSet<u16>) -> Result<u16, ApiError> {
        let (start, end) = (*self.node_ports.start(), *self.node_ports.end());
        for _ in 0..=(end - start) {
            let port = self.next_node_port;
            self.next_node_port = if port >= end { start } else { port + 1 };
            if !self.used_node_ports.contains(&port) && !taken.contains(&port) {
                return Ok(port);
            }
        }
        Err(ApiError::new(
            500,
            "failed to allocate a nodePort: range is full",
        ))
    }

    /// Fills in the fields the API server defaults on a Service; `old` is the stored
    /// version on update, whose allocations are kept when the new object omits them.
    pub fn default_service(
        &mut self,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let old_spec = old
            .and_then(|o| o.get("spec"))
            .cloned()
            .unwrap_or(Value::Null);
        let root = svc
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("service must be an object"))?;
        let spec = root.entry("spec").or_insert_with(|| json!({}));
        if !spec.is_object() {
            return Err(ApiError::invalid("spec: Invalid value: must be an object"));
        }
        let spec_map = spec
            .as_object_mut()
            .ok_or_else(|| ApiError::invalid("spec must be an object"))?;
        let service_type =
            string_field(spec_map, "type").unwrap_or_else(|| "ClusterIP".to_string());
        spec_map.insert("type".into(), json!(service_type));
        set_default(spec_map, "sessionAffinity", json!("None"));

        if service_type != "ExternalName" {
            self.default_cluster_ip(spec_map, &old_spec)?;
            set_default(spec_map, "internalTrafficPolicy", json!("Cluster"));
        }
        let wants_node_ports = service_type == "NodePort" || service_type == "LoadBalancer";
        if wants_node_ports {
            set_default(spec_map, "externalTrafficPolicy", json!("Cluster"));
        }
        if service_type == "LoadBalancer" {
            set_default(spec_map, "allocateLoadBalancerNodePorts", json!(true));
        }
        self.default_ports(spec_map, &old_spec, wants_node_ports)?;
        // LoadBalancer + externalTrafficPolicy Local gets a healthCheckNodePort, kept across
        // updates, as the real API server allocates it.
        let etp_local = spec_map
            .get("externalTrafficPolicy")
            .and_then(Value::as_str)
            == Some("Local");
        if service_type == "LoadBalancer" && etp_local {
            let given = spec_map
                .get("healthCheckNodePort")
                .and_then(Value::as_u64)
                .filter(|p| *p > 0);
            if given.is_none() {
                let port = match old_spec
                    .get("healthCheckNodePort")
                    .and_then(Value::as_u64)
                    .filter(|p| *p > 0)
                {
                    Some(p) => p as u16,
                    None => {
                        let taken: HashSet<u16> = spec_map
                            .get("ports")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
                            .filter_map(|p| u16::try_from(p).ok())
                            .collect();
                        self.allocate_node_port(&taken)?
                    }
                };
                spec_map.insert("healthCheckNodePort".into(), json!(port));
            }
        } else {
            spec_map.remove("healthCheckNodePort");
        }
        root.entry("status")
            .or_insert_with(|| json!({"loadBalancer": {}}));
        Ok(())
    }

    fn default_cluster_ip(
        &mut self,
        spec: &mut Map<String, Value>,
        old_spec: &Value,
    ) -> Result<(), ApiError> {
        let requested = string_field(spec, "clusterIP").filter(|s| !s.is_empty());
        let cluster_ip = match requested {
            Some(ip) => ip,
            None => match old_spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                Some(previous) => {
                    for key in ["clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                        if let Some(v) = old_spec.get(key) {
                            spec.entry(key).or_insert_with(|| v.clone());
                        }
                    }
                    previous.to_string()
                }
                None => self.allocate_ip()?.to_string(),
            },
        };
        let family = if cluster_ip == "None" {
            if self.cidr.max_prefix_len() == 32 {
                "IPv4"
            } else {
                "IPv6"
            }
        } else {
            let ip: IpAddr = cluster_ip.parse().map_err(|_| {
                ApiError::invalid(format!("spec.clusterIP: Invalid value: {cluster_ip:?}: must be a valid IP address or \"None\""))
            })?;
            let previously_held = cluster_ips(&json!({"spec": old_spec})).contains(&ip);
            if self.used_ips.contains(&ip) && !previously_held {
                return Err(ApiError::invalid(format!(
                    "spec.clusterIPs: Invalid value: [\"{cluster_ip}\"]: failed to allocate IP {cluster_ip}: provided IP is already allocated"
                )));
            }
            if ip.is_ipv4() { "IPv4" } else { "IPv6" }
        };
        spec.insert("clusterIP".into(), json!(cluster_ip));
        let has_ips = spec
            .get("clusterIPs")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        if !has_ips {
            spec.insert("clusterIPs".into(), json!([cluster_ip]));
        }
        set_default(spec, "ipFamilies", json!([family]));
        set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
        Ok(())
    }

    fn default_ports(
        &mut self,
        spec: &mut Map<String, Value>,
        old_spec: &Value,
        wants_node_ports: bool,
    ) -> Result<(), ApiError> {
        let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) else {
            return Ok(());
        };
        let old_ports = old_spec
            .get("ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut taken: HashSet<u16> = HashSet::new();
        for (index, port) in ports.iter_mut().enumerate() {
            let port_map = port.as_object_mut().ok_or_else(|| {
                ApiError::invalid(format!("spec.ports[{index}]: must be an object"))
            })?;
            let number = port_map
                .get("port")
                .and_then(Value::as_u64)
                .filter(|p| (1..=65535).contains(p))
                .ok_or_else(|| ApiError::invalid(format!("spec.ports[{index}].port: Invalid value: must be between 1 and 65535, inclusive")))?;
            set_default(port_map, "protocol", json!("TCP"));
            set_default(port_map, "targetPort", json!(number));
            if !wants_node_ports {
                continue;
            }
            let existing = port_map
                .get("nodePort")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok());
            let protocol = port_map.get("protocol").cloned();
            let carried = old_ports
                .iter()
                .find(|p| {
                    p.get("port").and_then(Value::as_u64) == Some(number)
                        && p.get("protocol") == protocol.as_ref()
                })
                .and_then(|p| p.get("nodePort").and_then(Value::as_u64))
                .and_then(|p| u16::try_from(p).ok());
            let node_port = match existing.or(carried) {
                Some(p) => p,
                None => self.allocate_node_port(&taken)?,
            };
            taken.insert(node_port);
            port_map.insert("nodePort".into(), json!(node_port));
        }
        Ok(())
    }
}

fn string_field(map: &Map<String, Value>, key: &str) -> Option<String> {
    map.get(key).and_then(Value::as_str).map(str::to_string)
}

fn set_default(map: &mut Map<String, Value>, key: &str, value: Value) {
    let missing = match map.get(key) {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    };
    if missing {
        map.insert(key.to_string(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocator() -> ServiceAllocator {
        ServiceAllocator::new("10.96.0.0/12".parse().expect("cidr"), 30000..=30002)
    }

    #[test]
    fn allocates_distinct_cluster_ips_and_fills_defaults() {
        let mut alloc = allocator();
        let mut first = json!({"spec": {"ports": [{"port": 80}]}});
        alloc.default_service(&mut first, None).expect("defaults");
        alloc.claim(&first);
        let mut second = json!({"spec": {}});
        alloc.default_service(&mut second, None).expect("defaults");
        let ip1 = first["spec"]["clusterIP"].as_str().expect("ip");
        let ip2 = second["spec"]["clusterIP"].as_str().expect("ip");
        assert_ne!(ip1, ip2);
        assert!(alloc.cidr.contains(&ip1.parse::<IpAddr>().expect("ip")));
        assert_eq!(first["spec"]["clusterIPs"], json!([ip1]));
        assert_eq!(first["spec"]["type"], "ClusterIP");
        assert_eq!(first["spec"]["ipFamilies"], json!(["IPv4"]));
        assert_eq!(
            first["spec"]["ports"][0],
            json!({"port": 80, "protocol": "TCP", "targetPort": 80})
        );
    }

    #[test]
    fn keeps_given_ip_rejects_taken_ip_and_carries_on_update() {
        let mut alloc = allocator();
        let mut svc = json!({"spec": {"clusterIP": "10.96.5.5"}});
        alloc.default_service(&mut svc, None).expect("defaults");
        assert_eq!(svc["spec"]["clusterIP"], "10.96.5.5");
        alloc.claim(&svc);
        let mut clash = json!({"spec": {"clusterIP": "10.96.5.5"}});
        assert_eq!(
            alloc
                .default_service(&mut clash, None)
                .expect_err("taken")
                .code,
            422
        );
        let mut update = json!({"spec": {"ports": [{"port": 53, "protocol": "UDP"}]}});
        alloc
            .default_service(&mut update, Some(&svc))
            .expect("update keeps ip");
        assert_eq!(update["spec"]["clusterIP"], "10.96.5.5");
        let mut bad = json!({"spec": {"clusterIP": "not-an-ip"}});
        assert_eq!(
            alloc
                .default_service(&mut bad, None)
                .expect_err("invalid")
                .code,
            422
        );
    }

    #[test]
    fn node_ports_are_unique_carried_and_bounded() {
        let mut alloc = allocator();
        let mut svc = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 443}]}});
        alloc.default_service(&mut svc, None).expect("defaults");
        alloc.claim(&svc);
        assert_eq!(svc["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(svc["spec"]["ports"][1]["nodePort"], 30001);
        assert_eq!(svc["spec"]["externalTrafficPolicy"], "Cluster");
        let mut update = json!({"spec": {"type": "NodePort", "ports": [{"port": 443}]}});
        alloc
            .default_service(&mut update, Some(&svc))
            .expect("update");
        assert_eq!(update["spec"]["ports"][0]["nodePort"], 30001);
        let mut too_many =
            json!({"spec": {"type": "NodePort", "ports": [{"port": 1}, {"port": 2}]}});
        assert_eq!(
            alloc
                .default_service(&mut too_many, None)
                .expect_err("full")
                .code,
            500
        );
    }

    #[test]
    fn headless_and_external_name() {
        let mut alloc = allocator();
        let mut headless = json!({"spec": {"clusterIP": "None"}});
        alloc
            .default_service(&mut headless, None)
            .expect("defaults");
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
        let mut external = json!({"spec": {"type": "ExternalName", "externalName": "example.org"}});
        alloc
            .default_service(&mut external, None)
            .expect("defaults");
        assert!(external["spec"].get("clusterIP").is_none());
    }
}
