//! The object store: objects as Kubernetes JSON, one global resourceVersion counter and a
//! bounded event history that watches replay from.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::defaults::ServiceAllocator;
use super::resources::{self, ResourceId, ResourceType};
use super::status::ApiError;

/// Kind of change, as watch events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One recorded change. `previous` is the state before a modification, so a watch with a
/// selector can tell objects that start or stop matching.
#[derive(Debug, Clone)]
pub struct HistoryEvent {
    pub resource_version: u64,
    pub resource: ResourceId,
    pub event_type: EventType,
    pub object: Value,
    pub previous: Option<Value>,
}

/// Where an object lives; ordering gives lists in namespace/name order like etcd keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectKey {
    pub resource: ResourceId,
    pub namespace: String,
    pub name: String,
}

/// How an update treats the `status` stanza, mirroring the main resource vs `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateScope {
    /// PUT on the object: status changes are ignored for kinds with a status subresource.
    Main,
    /// PUT on `/status`: only status changes.
    Status,
    /// Test API: the object is stored as given.
    Whole,
}

pub struct Store {
    objects: BTreeMap<ObjectKey, Value>,
    resource_version: u64,
    history: VecDeque<HistoryEvent>,
    history_limit: usize,
    /// Events with a resourceVersion above this are all still in `history`.
    history_floor: u64,
    /// New watches must start at or above this resourceVersion (below: 410 Expired).
    resume_floor: u64,
    allocator: ServiceAllocator,
    notify: watch::Sender<u64>,
    /// Off only inside [`Store::upsert_unvalidated`]: lets tests store objects a real API
    /// server would refuse, to check that clients survive them.
    admission: bool,
}

fn now_timestamp() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn new_uid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn random_suffix() -> String {
    // The API server's generateName alphabet: no vowels, no look-alike digits.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| char::from(ALPHABET[rand::random::<usize>() % ALPHABET.len()]))
        .collect()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn spec_content(object: &Value) -> Map<String, Value> {
    object
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "metadata" | "status" | "kind" | "apiVersion")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn metadata_mut(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let root = object
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("object must be a JSON object"))?;
    let metadata = root.entry("metadata").or_insert_with(|| json!({}));
    metadata
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))
}

pub fn object_namespace(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
}

pub fn object_resource_version(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
}

/// What the API server fills in on a Namespace: the name label, the `kubernetes`
/// finalizer and phase Active.
fn default_namespace(object: &mut Value) -> Result<(), ApiError> {
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let metadata = metadata_mut(object)?;
    let labels = metadata.entry("labels").or_insert_with(|| json!({}));
    if let Some(labels) = labels.as_object_mut() {
        labels.insert("kubernetes.io/metadata.name".into(), json!(name));
    }
    let root = object
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("object must be a JSON object"))?;
    root.entry("spec")
        .or_insert_with(|| json!({"finalizers": ["kubernetes"]}));
    let status = root.entry("status").or_insert_with(|| json!({}));
    if let Some(status) = status.as_object_mut() {
        status.entry("phase").or_insert_with(|| json!("Active"));
    }
    Ok(())
}

impl Store {
    pub fn new(
        history_limit: usize,
        allocator: ServiceAllocator,
        notify: watch::Sender<u64>,
    ) -> Self {
        Self {
            objects: BTreeMap::new(),
            resource_version: 0,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            history_floor: 0,
            resume_floor: 0,
            allocator,
            notify,
            admission: true,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    pub fn resume_floor(&self) -> u64 {
        self.resume_floor
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Objects of one resource, optionally in one namespace, strictly after `after`.
    pub fn list<'a>(
        &'a self,
        resource: ResourceId,
        namespace: Option<&'a str>,
        after: Option<&ObjectKey>,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a Value)> + 'a {
        let start = ObjectKey {
            resource,
            namespace: namespace.unwrap_or("").to_string(),
            name: String::new(),
        };
        let lower = match after {
            Some(after) if *after >= start => std::ops::Bound::Excluded(after.clone()),
            _ => std::ops::Bound::Included(start),
        };
        self.objects
            .range((lower, std::ops::Bound::Unbounded))
            .take_while(move |(k, _)| {
                k.resource == resource && namespace.is_none_or(|ns| k.namespace == ns)
            })
    }

    /// Recorded changes after `cursor`, or 410 Expired when some were already discarded.
    pub fn events_after(&self, cursor: u64) -> Result<Vec<HistoryEvent>, ApiError> {
        if cursor < self.history_floor {
            return Err(ApiError::expired(cursor, self.history_floor));
        }
        let start = self
            .history
            .partition_point(|e| e.resource_version <= cursor);
        Ok(self.history.range(start..).cloned().collect())
    }

    /// Makes every resourceVersion up to now too old to resume a watch from. Open watches
    /// that are caught up keep going (they miss nothing); the version is bumped so a
    /// relist gets a resourceVersion that is not too old.
    pub fn compact(&mut self) {
        self.history.clear();
        self.history_floor = self.resource_version;
        self.resource_version += 1;
        self.resume_floor = self.resource_version;
        self.notify.send_replace(self.resource_version);
    }

    /// As after etcd is restored from a backup: the same objects, renumbered from 1, and a
    /// resourceVersion counter at half of what clients have seen. Resuming from a version
    /// above it is "too large" now; clients must relist.
    pub fn restore_with_new_history(&mut self) {
        let rv = (self.resource_version / 2).max(1);
        for (i, object) in self.objects.values_mut().enumerate() {
            let object_rv = (i as u64 + 1).min(rv);
            if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                metadata.insert("resourceVersion".into(), json!(object_rv.to_string()));
            }
        }
        self.resource_version = rv;
        self.history.clear();
        self.history_floor = rv;
        self.resume_floor = rv;
        self.notify.send_replace(self.resource_version);
    }

    fn next_resource_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    fn record(
        &mut self,
        resource: ResourceId,
        event_type: EventType,
        object: Value,
        previous: Option<Value>,
    ) {
        self.history.push_back(HistoryEvent {
            resource_version: self.resource_version,
            resource,
            event_type,
            object,
            previous,
        });
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.history_floor = self.history_floor.max(dropped.resource_version);
                self.resume_floor = self.resume_floor.max(dropped.resource_version);
            }
        }
        self.notify.send_replace(self.resource_version);
    }

    /// Resolves the key of `object` for `resource`, defaulting the namespace from the URL.
    fn prepare_identity(
        resource: ResourceId,
        url_namespace: Option<&str>,
        object: &mut Value,
        check_name: bool,
    ) -> Result<ObjectKey, ApiError> {
        let rt = resources::resource(resource);
        let api_version = rt.api_version();
        let root = object
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("object must be a JSON object"))?;
        for (field, expected) in [("apiVersion", api_version.as_str()), ("kind", rt.kind)] {
            match root.get(field).and_then(Value::as_str) {
                Some(given) if !given.is_empty() && given != expected => {
                    return Err(ApiError::bad_request(format!(
                        "the API version/kind in the data ({given}) does not match the expected {field} {expected}"
                    )));
                }
                _ => {
                    root.insert(field.to_string(), json!(expected));
                }
            }
        }
        let metadata = metadata_mut(object)?;
        let namespace = if rt.namespaced {
            let body_ns = metadata
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let ns = match (url_namespace, body_ns) {
                (Some(url), Some(body)) if url != body => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                (Some(url), _) => url.to_string(),
                (None, Some(body)) => body.to_string(),
                (None, None) => "default".to_string(),
            };
            metadata.insert("namespace".into(), json!(ns));
            ns
        } else {
            metadata.remove("namespace");
            String::new()
        };
        let name = match metadata
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            Some(name) => name.to_string(),
            None => match metadata
                .get("generateName")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                Some(prefix) => {
                    let name = format!("{prefix}{}", random_suffix());
                    metadata.insert("name".into(), json!(name));
                    name
                }
                None => {
                    return Err(ApiError::invalid(format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        rt.kind
                    )));
                }
            },
        };
        if check_name && !valid_name(&name) {
            return Err(ApiError::invalid(format!(
                "{} {name:?} is invalid: metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
                rt.kind
            )));
        }
        Ok(ObjectKey {
            resource,
            namespace,
            name,
        })
    }

    fn apply_defaults(
        &mut self,
        rt: &ResourceType,
        object: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        if !self.admission {
            return Ok(());
        }
        if rt.kind == "Service" && rt.group.is_empty() {
            self.allocator.default_service(object, old)?;
        }
        if rt.kind == "Namespace" && rt.group.is_empty() {
            default_namespace(object)?;
        }
        Ok(())
    }

    fn track_allocations(&mut self, rt: &ResourceType, old: Option<&Value>, new: Option<&Value>) {
        if rt.kind == "Service" && rt.group.is_empty() {
            if let Some(old) = old {
                self.allocator.release(old);
            }
            if let Some(new) = new {
                self.allocator.claim(new);
            }
        }
    }

    /// POST: stores a new object; 409 AlreadyExists when the name is taken.
    pub fn create(
        &mut self,
        resource: ResourceId,
        url_namespace: Option<&str>,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let rt = resources::resource(resource);
        let key = Self::prepare_identity(resource, url_namespace, &mut object, true)?;
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt.group, rt.plural, &key.name));
        }
        self.insert_new(rt, key, object)
    }

    fn insert_new(
        &mut self,
        rt: &ResourceType,
        key: ObjectKey,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        self.apply_defaults(rt, &mut object, None)?;
        let resource_version = self.next_resource_version();
        let metadata = metadata_mut(&mut object)?;
        metadata.insert("uid".into(), json!(new_uid()));
        metadata.insert("creationTimestamp".into(), json!(now_timestamp()));
        metadata.insert("generation".into(), json!(1));
        metadata.insert(
            "resourceVersion".into(),
            json!(resource_version.to_string()),
        );
        metadata.remove("deletionTimestamp");
        self.track_allocations(rt, None, Some(&object));
        self.objects.insert(key.clone(), object.clone());
        self.record(key.resource, EventType::Added, object.clone(), None);
        Ok(object)
    }

    /// PUT (and the test API's replace): stores a new version of an existing object.
    /// A stale `metadata.resourceVersion` gives 409 Conflict; an unchanged object is not
    /// written again (no new resourceVersion, no event), as on a real server.
    pub fn update(
        &mut self,
        resource: ResourceId,
        url_namespace: Option<&str>,
        url_name: Option<&str>,
        mut object: Value,
        scope: UpdateScope,
    ) -> Result<Value, ApiError> {
        let rt = resources::resource(resource);
        let key = Self::prepare_identity(resource, url_namespace, &mut object, true)?;
        if let Some(url_name) = url_name
            && url_name != key.name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({url_name})",
                key.name
            )));
        }
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(rt.group, rt.plural, &key.name));
        };
        let old_rv = object_resource_version(&old).unwrap_or("").to_string();
        if scope != UpdateScope::Whole
            && let Some(given) = object_resource_version(&object).filter(|s| !s.is_empty())
            && given != old_rv
        {
            return Err(ApiError::conflict(rt.group, rt.plural, &key.name));
        }
        object = match scope {
            UpdateScope::Status => {
                let mut merged = old.clone();
                match object.get("status") {
                    Some(status) => merged["status"] = status.clone(),
                    None => {
                        if let Some(map) = merged.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
                merged
            }
            UpdateScope::Main if rt.has_subresource("status") => {
                if let Some(map) = object.as_object_mut() {
                    match old.get("status") {
                        Some(status) => map.insert("status".into(), status.clone()),
                        None => map.remove("status"),
                    };
                }
                object
            }
            _ => object,
        };
        self.apply_defaults(rt, &mut object, Some(&old))?;
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let new_generation = if spec_content(&old) != spec_content(&object) {
            generation + 1
        } else {
            generation
        };
        {
            let metadata = metadata_mut(&mut object)?;
            for field in ["uid", "creationTimestamp"] {
                match old.pointer(&format!("/metadata/{field}")) {
                    Some(value) => metadata.insert(field.into(), value.clone()),
                    None => metadata.remove(field),
                };
            }
            metadata.insert("generation".into(), json!(new_generation));
            metadata.insert("resourceVersion".into(), json!(old_rv));
        }
        if object == old {
            return Ok(old);
        }
        let resource_version = self.next_resource_version();
        metadata_mut(&mut object)?.insert(
            "resourceVersion".into(),
            json!(resource_version.to_string()),
        );
        self.track_allocations(rt, Some(&old), Some(&object));
        self.objects.insert(key.clone(), object.clone());
        self.record(resource, EventType::Modified, object.clone(), Some(old));
        Ok(object)
    }

    /// The test API's apply: create, or replace whatever is stored under the same key.
    /// Like [`Store::upsert`] but without defaulting or validation.
    pub fn upsert_unvalidated(
        &mut self,
        resource: ResourceId,
        object: Value,
    ) -> Result<Value, ApiError> {
        self.admission = false;
        let result = self.upsert(resource, object);
        self.admission = true;
        result
    }

    pub fn upsert(&mut self, resource: ResourceId, mut object: Value) -> Result<Value, ApiError> {
        let rt = resources::resource(resource);
        let key = Self::prepare_identity(resource, None, &mut object, self.admission)?;
        if self.objects.contains_key(&key) {
            let namespace = (!key.namespace.is_empty()).then_some(key.namespace.as_str());
            self.update(resource, namespace, None, object, UpdateScope::Whole)
        } else {
            self.insert_new(rt, key, object)
        }
    }

    /// DELETE: removes the object and returns its final state (with the deletion's
    /// resourceVersion). Deleting a namespace deletes the objects in it too.
    pub fn delete(&mut self, key: &ObjectKey) -> Result<Value, ApiError> {
        let rt = resources::resource(key.resource);
        let Some(mut object) = self.objects.remove(key) else {
            return Err(ApiError::not_found(rt.group, rt.plural, &key.name));
        };
        self.track_allocations(rt, Some(&object), None);
        let resource_version = self.next_resource_version();
        metadata_mut(&mut object)?.insert(
            "resourceVersion".into(),
            json!(resource_version.to_string()),
        );
        self.record(key.resource, EventType::Deleted, object.clone(), None);
        if rt.kind == "Namespace" && rt.group.is_empty() {
            let contained: Vec<ObjectKey> = self
                .objects
                .keys()
                .filter(|k| resources::resource(k.resource).namespaced && k.namespace == key.name)
                .cloned()
                .collect();
            for child in contained {
                self.delete(&child)?;
            }
        }
        Ok(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(history_limit: usize) -> Store {
        let (tx, _rx) = watch::channel(0);
        let allocator = ServiceAllocator::new("10.96.0.0/12".parse().expect("cidr"), 30000..=32767);
        Store::new(history_limit, allocator, tx)
    }

    fn services() -> ResourceId {
        resources::find_by_plural("", "v1", "services").expect("services")
    }

    fn svc(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"ports": [{"port": 80}]}})
    }

    #[test]
    fn create_sets_server_fields_and_rejects_duplicates() {
        let mut s = store(100);
        let created = s
            .create(services(), Some("ns"), svc("web"))
            .expect("created");
        assert_eq!(created["kind"], "Service");
        assert_eq!(created["apiVersion"], "v1");
        assert_eq!(created["metadata"]["namespace"], "ns");
        assert_eq!(created["metadata"]["resourceVersion"], "1");
        assert_eq!(created["metadata"]["generation"], 1);
        assert_eq!(created["metadata"]["uid"].as_str().map(str::len), Some(36));
        assert!(created["spec"]["clusterIP"].is_string());
        let dup = s
            .create(services(), Some("ns"), svc("web"))
            .expect_err("dup");
        assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
        let generated = s
            .create(
                services(),
                Some("ns"),
                json!({"metadata": {"generateName": "web-"}}),
            )
            .expect("generated");
        let name = generated["metadata"]["name"].as_str().expect("name");
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
    }

    #[test]
    fn update_checks_resource_version_and_skips_no_ops() {
        let mut s = store(100);
        let created = s
            .create(services(), Some("ns"), svc("web"))
            .expect("created");
        let same = s
            .update(
                services(),
                Some("ns"),
                Some("web"),
                created.clone(),
                UpdateScope::Main,
            )
            .expect("no-op");
        assert_eq!(same, created);
        assert_eq!(s.resource_version(), 1);
        let mut changed = created.clone();
        changed["spec"]["ports"][0]["port"] = json!(81);
        let updated = s
            .update(
                services(),
                Some("ns"),
                Some("web"),
                changed.clone(),
                UpdateScope::Main,
            )
            .expect("updated");
        assert_eq!(updated["metadata"]["resourceVersion"], "2");
        assert_eq!(updated["metadata"]["generation"], 2);
        assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
        let stale = s
            .update(
                services(),
                Some("ns"),
                Some("web"),
                changed,
                UpdateScope::Main,
            )
            .expect_err("stale rv");
        assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));
    }

    #[test]
    fn history_is_bounded_and_expires_old_cursors() {
        let mut s = store(2);
        for name in ["a", "b", "c"] {
            s.create(services(), Some("ns"), svc(name))
                .expect("created");
        }
        assert_eq!(s.events_after(1).expect("kept").len(), 2);
        assert_eq!(s.events_after(0).expect_err("trimmed").code, 410);
        s.compact();
        assert_eq!(s.resource_version(), 4);
        assert_eq!(s.resume_floor(), 4);
        assert!(s.events_after(2).is_err());
        assert!(
            s.events_after(3)
                .expect("caught-up watch keeps going")
                .is_empty()
        );
        assert!(s.events_after(4).expect("current").is_empty());
    }

    #[test]
    fn deleting_a_namespace_deletes_its_objects() {
        let mut s = store(100);
        let namespaces = resources::find_by_plural("", "v1", "namespaces").expect("ns");
        s.create(namespaces, None, json!({"metadata": {"name": "team"}}))
            .expect("ns");
        s.create(services(), Some("team"), svc("web")).expect("svc");
        s.create(services(), Some("other"), svc("web"))
            .expect("svc");
        let ns_key = ObjectKey {
            resource: namespaces,
            namespace: String::new(),
            name: "team".into(),
        };
        s.delete(&ns_key).expect("deleted");
        assert_eq!(s.list(services(), None, None).count(), 1);
        let events = s.events_after(3).expect("events");
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.event_type == EventType::Deleted));
    }
}
