//! Change tracking: watchers record every Service and EndpointSlice they see; the sync
//! loop drains once per sync and gets the new state plus what changed.
//!
//! Conversion happens at update time (cheap, and bad objects are reported where they
//! arrive); merging and comparison happen at drain time, only for services touched since
//! the last drain, so a sync costs O(changes), and a change that is undone before the next
//! sync (A -> B -> A) reports nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::convert::{
    ConvertError, PortEndpoints, SliceEndpoints, endpoints_from_slice, merge_endpoints,
    service_ports_from_service,
};
use crate::types::*;

/// The proxy's view of the cluster for one IP family, as of the last drain.
#[derive(Debug, Clone, Default)]
pub struct ProxyState {
    /// Every proxied service port, in a stable order.
    pub services: BTreeMap<ServicePortName, Arc<ServicePort>>,
    /// Endpoints per service port name (from EndpointSlices; may exist without a service).
    pub endpoints: BTreeMap<ServicePortName, Arc<Vec<Endpoint>>>,
}

impl ProxyState {
    /// Endpoints of a service port; empty when it has none.
    pub fn endpoints_of(&self, name: &ServicePortName) -> &[Endpoint] {
        self.endpoints
            .get(name)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    /// Total number of endpoints over all service ports.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.values().map(|v| v.len()).sum()
    }
}

/// What one drain found changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeSet {
    /// Services whose ports or endpoints differ from the previous drain.
    pub services: BTreeSet<NamespacedName>,
    /// Change-trigger times of the endpoint changes applied (for the network programming
    /// latency metric).
    pub trigger_times: Vec<SystemTime>,
    /// UDP endpoints (`ip`, `port`) that were removed or stopped being ready, per service
    /// port: candidates for stale conntrack cleanup.
    pub stale_udp_endpoints: Vec<(ServicePortName, Endpoint)>,
    /// UDP service ports that went from no endpoints to some.
    pub udp_services_gained_endpoints: Vec<ServicePortName>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// Identifies an EndpointSlice.
pub type SliceKey = NamespacedName;

/// Records Service and EndpointSlice updates between syncs. One per IP family.
#[derive(Debug)]
pub struct ChangeTracker {
    family: IpFamily,
    node_name: String,
    start_time: SystemTime,
    state: ProxyState,
    /// Latest valid ports per service (the desired state, not yet drained); shared with
    /// the state once drained.
    desired_services: HashMap<NamespacedName, Vec<Arc<ServicePort>>>,
    /// Latest converted slices, grouped by the service they belong to, sorted by slice.
    /// A service port with endpoints in one slice shares them with the state.
    slices: HashMap<NamespacedName, Vec<(SliceKey, Vec<PortEndpoints>)>>,
    slice_owner: HashMap<SliceKey, NamespacedName>,
    dirty_services: BTreeSet<NamespacedName>,
    dirty_endpoints: BTreeSet<NamespacedName>,
    pending_trigger_times: HashMap<NamespacedName, Vec<SystemTime>>,
    /// Endpoints in the drained state, kept as services change.
    drained_endpoints: isize,
    /// Counters for the `*_changes_total` metrics.
    pub service_changes_total: u64,
    pub endpoint_changes_total: u64,
}

impl ChangeTracker {
    pub fn new(family: IpFamily, node_name: impl Into<String>) -> Self {
        ChangeTracker {
            family,
            node_name: node_name.into(),
            start_time: SystemTime::now(),
            state: ProxyState::default(),
            desired_services: HashMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            dirty_services: BTreeSet::new(),
            dirty_endpoints: BTreeSet::new(),
            pending_trigger_times: HashMap::new(),
            drained_endpoints: 0,
            service_changes_total: 0,
            endpoint_changes_total: 0,
        }
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// The state as of the last drain.
    pub fn state(&self) -> &ProxyState {
        &self.state
    }

    /// Endpoints over all service ports of the drained state (as
    /// [`ProxyState::endpoint_count`], without the walk).
    pub fn drained_endpoint_count(&self) -> usize {
        self.drained_endpoints.max(0) as usize
    }

    /// Services with changes not yet drained.
    pub fn pending_service_changes(&self) -> usize {
        self.dirty_services.len()
    }

    /// Services with endpoint changes not yet drained.
    pub fn pending_endpoint_changes(&self) -> usize {
        self.dirty_endpoints.len()
    }

    pub fn has_pending(&self) -> bool {
        !self.dirty_services.is_empty() || !self.dirty_endpoints.is_empty()
    }

    /// Records a Service add/update. Returns whether anything may have changed. An invalid
    /// Service is reported and ignored: the last valid version (if any) stays in effect.
    /// `warnings` gets problems that only drop one entry of the Service.
    pub fn update_service(
        &mut self,
        svc: &Service,
        warnings: &mut Vec<String>,
    ) -> Result<bool, ConvertError> {
        let mut ports = service_ports_from_service(svc, self.family, warnings)?;
        let key = NamespacedName::new(
            svc.metadata.namespace.as_deref().unwrap_or_default(),
            svc.metadata.name.as_deref().unwrap_or_default(),
        );
        // One copy of the name for the key and every port (the state's keys and the
        // dataplanes' clone it too).
        let key = self.shared_key(key);
        for p in &mut ports {
            p.name.service = key.clone();
        }
        Ok(self.set_service(key, ports))
    }

    /// `key` with the strings of the same key already held, if any.
    fn shared_key(&self, key: NamespacedName) -> NamespacedName {
        match self.desired_services.get_key_value(&key) {
            Some((k, _)) => k.clone(),
            None => match self.slices.get_key_value(&key) {
                Some((k, _)) => k.clone(),
                None => key,
            },
        }
    }

    /// Records a Service deletion.
    pub fn delete_service(&mut self, namespace: &str, name: &str) -> bool {
        self.set_service(NamespacedName::new(namespace, name), Vec::new())
    }

    fn set_service(&mut self, key: NamespacedName, ports: Vec<ServicePort>) -> bool {
        let unchanged = match self.desired_services.get(&key) {
            Some(old) => old.len() == ports.len() && old.iter().zip(&ports).all(|(o, n)| **o == *n),
            None => ports.is_empty(),
        };
        if unchanged {
            return false;
        }
        self.service_changes_total += 1;
        if ports.is_empty() {
            self.desired_services.remove(&key);
        } else {
            // Collected anew: an in-place collect would keep the capacity of the
            // Vec<ServicePort> (four of them for one port).
            let mut shared = Vec::with_capacity(ports.len());
            shared.extend(ports.into_iter().map(Arc::new));
            self.desired_services.insert(key.clone(), shared);
        }
        self.dirty_services.insert(key);
        true
    }

    /// Records an EndpointSlice add/update. Returns whether anything may have changed.
    pub fn update_slice(
        &mut self,
        slice: &EndpointSlice,
        warnings: &mut Vec<String>,
    ) -> Result<bool, ConvertError> {
        let mut key = NamespacedName::new(
            slice.metadata.namespace.as_deref().unwrap_or_default(),
            slice.metadata.name.as_deref().unwrap_or_default(),
        );
        let mut converted = endpoints_from_slice(slice, self.family, &self.node_name, warnings)?;
        // Names shared with the service's and the slice's earlier keys.
        if let Some(c) = converted.as_mut() {
            c.service = self.shared_key(c.service.clone());
            if key.namespace == c.service.namespace {
                key.namespace = c.service.namespace.clone();
            }
        }
        if let Some((k, _)) = self.slice_owner.get_key_value(&key) {
            key = k.clone();
        }
        Ok(self.set_slice(key, converted))
    }

    /// Records an EndpointSlice deletion.
    pub fn delete_slice(&mut self, namespace: &str, name: &str) -> bool {
        self.set_slice(NamespacedName::new(namespace, name), None)
    }

    fn set_slice(&mut self, key: SliceKey, converted: Option<SliceEndpoints>) -> bool {
        let old_owner = self.slice_owner.get(&key).cloned();
        if let (Some(owner), Some(new)) = (&old_owner, &converted)
            && owner == &new.service
            && self
                .slices
                .get(owner)
                .and_then(|m| m.iter().find(|(k, _)| *k == key))
                .is_some_and(|(_, old)| *old == new.by_port)
        {
            return false;
        }
        if old_owner.is_none() && converted.is_none() {
            return false;
        }
        self.endpoint_changes_total += 1;
        if let Some(owner) = old_owner {
            if let Some(m) = self.slices.get_mut(&owner) {
                m.retain(|(k, _)| *k != key);
                if m.is_empty() {
                    self.slices.remove(&owner);
                }
            }
            self.slice_owner.remove(&key);
            self.dirty_endpoints.insert(owner);
        }
        if let Some(new) = converted {
            let owner = new.service.clone();
            if let Some(t) = new.trigger_time.filter(|t| *t >= self.start_time) {
                self.pending_trigger_times
                    .entry(owner.clone())
                    .or_default()
                    .push(t);
            }
            self.slice_owner.insert(key.clone(), owner.clone());
            let m = self.slices.entry(owner.clone()).or_default();
            let at = m.partition_point(|(k, _)| *k < key);
            m.insert(at, (key, new.by_port));
            self.dirty_endpoints.insert(owner);
        }
        true
    }

    /// Applies every recorded change to the state and reports what really changed.
    pub fn drain(&mut self) -> ChangeSet {
        let mut state = std::mem::take(&mut self.state);
        let changes = self.drain_into(&mut state);
        self.state = state;
        changes
    }

    /// [`ChangeTracker::drain`] into a state the caller keeps (the sync loop's own, so
    /// there is one copy of it, not two): `state` must be the one every earlier drain of
    /// this tracker went into; [`ChangeTracker::state`] then stays empty.
    pub fn drain_into(&mut self, state: &mut ProxyState) -> ChangeSet {
        let mut changes = ChangeSet::default();
        let touched: BTreeSet<NamespacedName> = std::mem::take(&mut self.dirty_services)
            .into_iter()
            .chain(std::mem::take(&mut self.dirty_endpoints))
            .collect();
        for svc in touched {
            let mut changed = self.drain_service_ports(state, &svc);
            changed |= self.drain_endpoints(state, &svc, &mut changes);
            let times = self.pending_trigger_times.remove(&svc).unwrap_or_default();
            if changed {
                changes.trigger_times.extend(times);
                changes.services.insert(svc);
            }
        }
        changes
    }

    fn drain_service_ports(&mut self, state: &mut ProxyState, svc: &NamespacedName) -> bool {
        let desired = self.desired_services.get(svc).cloned().unwrap_or_default();
        let old: Vec<ServicePortName> = service_range(&state.services, svc)
            .map(|(k, _)| k.clone())
            .collect();
        let same = old.len() == desired.len()
            && desired.iter().all(|p| {
                state
                    .services
                    .get(&p.name)
                    .is_some_and(|o| Arc::ptr_eq(o, p) || **o == **p)
            });
        if same {
            return false;
        }
        for k in old {
            state.services.remove(&k);
        }
        for p in desired {
            state.services.insert(p.name.clone(), p);
        }
        true
    }

    fn drain_endpoints(
        &mut self,
        state: &mut ProxyState,
        svc: &NamespacedName,
        changes: &mut ChangeSet,
    ) -> bool {
        // Merge all slices of the service: duplicates collapse, a local copy wins. A port
        // found in one slice only takes that slice's endpoints as they are (already in
        // merged order), shared.
        let mut by_port: BTreeMap<(&str, Protocol), Vec<&Arc<Vec<Endpoint>>>> = BTreeMap::new();
        for (_, ports) in self.slices.get(svc).into_iter().flatten() {
            for p in ports {
                by_port
                    .entry((p.port.as_str(), p.protocol))
                    .or_default()
                    .push(&p.endpoints);
            }
        }
        let new: BTreeMap<ServicePortName, Arc<Vec<Endpoint>>> = by_port
            .into_iter()
            .filter_map(|((port, protocol), lists)| {
                let eps = match lists.as_slice() {
                    [one] => Arc::clone(one),
                    _ => {
                        let mut merged = BTreeMap::new();
                        for eps in lists {
                            merge_endpoints(&mut merged, eps.iter().cloned());
                        }
                        Arc::new(merged.into_values().collect())
                    }
                };
                let name = ServicePortName {
                    service: svc.clone(),
                    port: port.to_string(),
                    protocol,
                };
                (!eps.is_empty()).then_some((name, eps))
            })
            .collect();
        let old_keys: Vec<ServicePortName> = service_range(&state.endpoints, svc)
            .map(|(k, _)| k.clone())
            .collect();
        let same = old_keys.len() == new.len()
            && new.iter().all(|(k, v)| {
                state
                    .endpoints
                    .get(k)
                    .is_some_and(|o| Arc::ptr_eq(o, v) || **o == **v)
            });
        if same {
            return false;
        }
        // Stale UDP: endpoints that were ready and are gone or no longer ready.
        for k in &old_keys {
            if k.protocol != Protocol::Udp {
                continue;
            }
            let old_eps = state.endpoints.get(k).cloned().unwrap_or_default();
            let new_eps = new.get(k);
            for ep in old_eps.iter().filter(|e| e.ready) {
                let still = new_eps.is_some_and(|n| {
                    n.iter()
                        .any(|e| e.ip == ep.ip && e.port == ep.port && e.ready)
                });
                if !still {
                    changes.stale_udp_endpoints.push((k.clone(), ep.clone()));
                }
            }
        }
        for (k, v) in &new {
            if k.protocol == Protocol::Udp
                && v.iter().any(|e| e.ready)
                && !state
                    .endpoints
                    .get(k)
                    .is_some_and(|o| o.iter().any(|e| e.ready))
            {
                changes.udp_services_gained_endpoints.push(k.clone());
            }
        }
        for k in old_keys {
            if let Some(v) = state.endpoints.remove(&k) {
                self.drained_endpoints -= v.len() as isize;
            }
        }
        for (k, v) in new {
            self.drained_endpoints += v.len() as isize;
            state.endpoints.insert(k, v);
        }
        true
    }
}

/// All entries of one service in a map keyed by ServicePortName.
fn service_range<'a, V>(
    map: &'a BTreeMap<ServicePortName, V>,
    svc: &NamespacedName,
) -> impl Iterator<Item = (&'a ServicePortName, &'a V)> {
    let lo = ServicePortName {
        service: svc.clone(),
        port: String::new(),
        protocol: Protocol::Tcp,
    };
    map.range(lo..).take_while(move |(k, _)| k.service == *svc)
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;
