//! Parsing a request: the resource URL and the selectors of its query.

use std::collections::HashMap;

use super::resources::{self, ResourceId};
use super::selectors::{FieldSelector, LabelSelector, Selectors};
use super::status::ApiError;

/// A parsed resource URL: `/api/v1/namespaces/ns/services/name/status` and friends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourcePath {
    pub resource: ResourceId,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

fn unknown_resource() -> ApiError {
    ApiError::new(404, "the server could not find the requested resource")
}

pub fn parse_resource_path(
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<ResourcePath, ApiError> {
    let lookup = |plural: &str| {
        resources::find_by_plural(group, version, plural).ok_or_else(unknown_resource)
    };
    let namespaced_plural = |plural: &str| {
        resources::find_by_plural(group, version, plural)
            .filter(|id| resources::resource(*id).namespaced)
    };
    let path =
        |resource, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| ResourcePath {
            resource,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            subresource: sub.map(str::to_string),
        };
    let parsed = match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced_plural(plural).is_some() => {
            let resource = lookup(plural)?;
            match tail {
                [] => path(resource, Some(ns), None, None),
                [name] => path(resource, Some(ns), Some(name), None),
                [name, sub] => path(resource, Some(ns), Some(name), Some(sub)),
                _ => return Err(unknown_resource()),
            }
        }
        [plural] => path(lookup(plural)?, None, None, None),
        [plural, name] => path(lookup(plural)?, None, Some(name), None),
        [plural, name, sub] => path(lookup(plural)?, None, Some(name), Some(sub)),
        _ => return Err(unknown_resource()),
    };
    let rt = resources::resource(parsed.resource);
    if parsed.name.is_some() && rt.namespaced && parsed.namespace.is_none() {
        return Err(unknown_resource());
    }
    if let Some(sub) = &parsed.subresource
        && !rt.has_subresource(sub)
    {
        return Err(unknown_resource());
    }
    Ok(parsed)
}

pub fn parse_selectors(query: &HashMap<String, String>) -> Result<Selectors, ApiError> {
    Ok(Selectors {
        labels: LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))?,
        fields: FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_paths_cover_namespaced_cluster_and_subresources() {
        let svc = resources::find_by_plural("", "v1", "services").expect("svc");
        let ns = resources::find_by_plural("", "v1", "namespaces").expect("ns");
        let deploy = resources::find_by_plural("apps", "v1", "deployments").expect("deploy");
        assert_eq!(
            parse_resource_path("", "v1", &["namespaces", "a", "services", "web"]).expect("ok"),
            ResourcePath {
                resource: svc,
                namespace: Some("a".into()),
                name: Some("web".into()),
                subresource: None
            }
        );
        assert_eq!(
            parse_resource_path("", "v1", &["services"])
                .expect("ok")
                .namespace,
            None
        );
        let namespace_status =
            parse_resource_path("", "v1", &["namespaces", "a", "status"]).expect("ok");
        assert_eq!(
            (
                namespace_status.resource,
                namespace_status.subresource.as_deref()
            ),
            (ns, Some("status"))
        );
        let scale = parse_resource_path(
            "apps",
            "v1",
            &["namespaces", "a", "deployments", "d", "scale"],
        )
        .expect("ok");
        assert_eq!(
            (scale.resource, scale.subresource.as_deref()),
            (deploy, Some("scale"))
        );
        for bad in [
            &["secrets"][..],
            &["services", "web"],
            &["namespaces", "a", "services", "w", "exec"],
        ] {
            assert_eq!(
                parse_resource_path("", "v1", bad).expect_err("bad").code,
                404,
                "{bad:?}"
            );
        }
    }
}
