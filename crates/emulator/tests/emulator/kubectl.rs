//! kubectl against the emulator: discovery fallback, tables, create/apply/label/delete,
//! the scale subresource, client-certificate auth and Unauthorized.

use serde_json::{Value, json};

use crate::support::{endpoint_slice, kubectl, service, start, stdout_ok};

#[test]
fn kubectl_reads_and_writes_through_the_emulator() {
    let emulator = start();
    emulator
        .apply(service(
            "shop",
            "web",
            json!({"app": "web"}),
            Some("10.96.3.3"),
        ))
        .expect("apply");
    emulator
        .apply(endpoint_slice("shop", "web", "10.244.1.7"))
        .expect("apply");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    emulator
        .write_kubeconfig(&kubeconfig, &emulator.url())
        .expect("kubeconfig");
    let kc = |args: &[&str]| kubectl(&kubeconfig, args);

    let Some(version) = kc(&["get", "--raw", "/version"]) else {
        return;
    };
    let version: Value =
        serde_json::from_str(&stdout_ok(version, "get --raw /version")).expect("json");
    assert_eq!(version["major"], "1");

    let table = stdout_ok(
        kc(&["get", "svc", "-n", "shop"]).expect("kubectl"),
        "get svc table",
    );
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..5],
        ["web", "ClusterIP", "10.96.3.3", "<none>", "80/TCP"]
    );

    let services: Value = serde_json::from_str(&stdout_ok(
        kc(&["get", "svc", "-A", "-o", "json"]).expect("kubectl"),
        "get svc",
    ))
    .expect("json");
    let items = services["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["spec"]["clusterIP"], "10.96.3.3");
    assert_eq!(items[0]["metadata"]["namespace"], "shop");

    let slices = stdout_ok(
        kc(&[
            "get",
            "endpointslices.discovery.k8s.io",
            "-n",
            "shop",
            "-o",
            "json",
        ])
        .expect("kubectl"),
        "get slices",
    );
    let slices: Value = serde_json::from_str(&slices).expect("json");
    assert_eq!(
        slices["items"][0]["endpoints"][0]["addresses"][0],
        "10.244.1.7"
    );
    assert_eq!(
        slices["items"][0]["metadata"]["labels"]["kubernetes.io/service-name"],
        "web"
    );

    let manifest = dir.path().join("svc.yaml");
    std::fs::write(&manifest, "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n").expect("write");
    let manifest_arg = manifest.to_str().expect("path");
    stdout_ok(
        kc(&["create", "-f", manifest_arg]).expect("kubectl"),
        "create -f",
    );
    let created = emulator
        .get("v1", "Service", Some("shop"), "api")
        .expect("created via kubectl");
    assert!(
        created["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10."))
    );
    std::fs::write(&manifest, "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{name: http, port: 80, targetPort: 9090}]\n").expect("write");
    stdout_ok(
        kc(&["apply", "-f", manifest_arg]).expect("kubectl"),
        "apply -f",
    );
    let applied = emulator
        .get("v1", "Service", Some("shop"), "api")
        .expect("still there");
    assert_eq!(applied["spec"]["ports"][0]["targetPort"], 9090);
    assert_eq!(
        applied["spec"]["clusterIP"], created["spec"]["clusterIP"],
        "clusterIP kept across apply"
    );

    stdout_ok(
        kc(&["label", "svc", "api", "-n", "shop", "tier=back"]).expect("kubectl"),
        "label",
    );
    let labelled = emulator
        .get("v1", "Service", Some("shop"), "api")
        .expect("there");
    assert_eq!(labelled["metadata"]["labels"]["tier"], "back");

    stdout_ok(
        kc(&["delete", "svc", "api", "-n", "shop"]).expect("kubectl"),
        "delete svc",
    );
    assert!(emulator.get("v1", "Service", Some("shop"), "api").is_none());

    let cert_kubeconfig = dir.path().join("kubeconfig-cert");
    std::fs::write(
        &cert_kubeconfig,
        emulator.kubeconfig_yaml_client_cert(&emulator.url()),
    )
    .expect("write");
    stdout_ok(
        kubectl(&cert_kubeconfig, &["get", "svc", "-n", "shop"]).expect("kubectl"),
        "client-cert get",
    );

    let denied = kc(&["--token", "wrong", "get", "svc", "-A"]).expect("kubectl");
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Unauthorized"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&kubeconfig).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn kubectl_scales_deployments_through_the_scale_subresource() {
    let emulator = start();
    emulator
        .apply(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}))
        .expect("apply");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    emulator
        .write_kubeconfig(&kubeconfig, &emulator.url())
        .expect("kubeconfig");
    let Some(output) = kubectl(
        &kubeconfig,
        &["scale", "deployment", "web", "-n", "shop", "--replicas=4"],
    ) else {
        return;
    };
    stdout_ok(output, "scale");
    let deployment = emulator
        .get("apps/v1", "Deployment", Some("shop"), "web")
        .expect("stored");
    assert_eq!(deployment["spec"]["replicas"], 4);
    assert_eq!(deployment["metadata"]["generation"], 2);
    assert!(
        emulator
            .request_log()
            .iter()
            .any(|e| e.path.ends_with("/deployments/web/scale") && e.method == "PATCH")
    );
}
