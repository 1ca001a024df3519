//! Validation parity with the API server, as a property test driven by the table in the
//! crate README: every Service and EndpointSlice the API server admits (names at their
//! length limits and in every allowed character class, every protocol, single- and
//! dual-stack, legacy IP forms, named and numeric target ports, many ports) is converted
//! whole: no port, address or endpoint lost, no warning. Its invalid twin moves one field
//! one step past the API server's limit and checks that exactly that part is dropped, with
//! one warning naming it, or (for the object's key and primary cluster IP only) that the
//! object is refused with an error naming the field.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kp_model::{IpFamily, Protocol, endpoints_from_slice, service_ports_from_service};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};

const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const INNER: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";

/// A label of exactly `len` characters: first from `first`, last alphanumeric, '-' inside.
fn label_of_len(len: usize, first: &'static [u8]) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<Index>(), len).prop_map(move |idx| {
        idx.iter()
            .enumerate()
            .map(|(i, ix)| {
                let set = match i {
                    0 => first,
                    _ if i == len - 1 => ALNUM,
                    _ => INNER,
                };
                set[ix.index(set.len())] as char
            })
            .collect()
    })
}

/// A label of 1..=max characters, the boundaries (1 and max) drawn often.
fn label(max: usize, first: &'static [u8]) -> impl Strategy<Value = String> {
    prop_oneof![Just(1usize), Just(max), 1..=max].prop_flat_map(move |len| label_of_len(len, first))
}

/// DNS-1123 label (namespaces, port names, endpoint slice ports).
fn dns1123_label() -> impl Strategy<Value = String> {
    label(63, ALNUM)
}

/// DNS-1035 label (Service names: a letter first).
fn dns1035_label() -> impl Strategy<Value = String> {
    label(63, LETTERS)
}

/// DNS-1123 subdomain up to 253 characters (EndpointSlice names), exactly 253 often.
fn dns1123_subdomain() -> impl Strategy<Value = String> {
    let exact = (
        label_of_len(63, ALNUM),
        label_of_len(63, ALNUM),
        label_of_len(63, ALNUM),
        label_of_len(61, ALNUM),
    )
        .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}"));
    prop_oneof![
        dns1123_label(),
        exact,
        proptest::collection::vec(dns1123_label(), 1..4).prop_map(|v| v.join(".")),
    ]
}

/// An IANA service name (a Service's string targetPort): 1-15 chars, a letter somewhere,
/// no leading, trailing or double '-'.
fn iana_name() -> impl Strategy<Value = String> {
    label(15, LETTERS).prop_map(|s| s.replace("--", "-a"))
}

/// An IPv4 address and the ways the API server may have stored it.
fn ipv4() -> impl Strategy<Value = (IpAddr, String)> {
    (any::<[u8; 4]>(), 0..4u8).prop_map(|(o, form)| {
        let ip = IpAddr::from(o);
        let text = match form {
            // Leading zeros, stored by API servers before 1.33 (decimal, as Go reads them).
            1 => format!("{:03}.{:02}.{}.{:03}", o[0], o[1], o[2], o[3]),
            // IPv4-mapped IPv6: IPv4 to Go.
            2 => format!("::ffff:{ip}"),
            _ => ip.to_string(),
        };
        (ip, text)
    })
}

fn ipv6() -> impl Strategy<Value = (IpAddr, String)> {
    (any::<[u16; 7]>(), any::<bool>()).prop_map(|(s, upper)| {
        let mut segs = [0xfd00u16; 8];
        segs[1..].copy_from_slice(&s);
        let ip = IpAddr::from(segs);
        let text = if upper {
            ip.to_string().to_uppercase()
        } else {
            ip.to_string()
        };
        (ip, text)
    })
}

fn ip_of(family: IpFamily) -> BoxedStrategy<(IpAddr, String)> {
    match family {
        IpFamily::V4 => ipv4().boxed(),
        IpFamily::V6 => ipv6().boxed(),
    }
}

fn protocol() -> impl Strategy<Value = (Protocol, Option<&'static str>)> {
    prop_oneof![
        Just((Protocol::Tcp, None)),
        Just((Protocol::Tcp, Some("TCP"))),
        Just((Protocol::Udp, Some("UDP"))),
        Just((Protocol::Sctp, Some("SCTP"))),
    ]
}

fn port_number() -> impl Strategy<Value = u16> {
    prop_oneof![Just(1u16), Just(65535u16), 1..=65535u16]
}

/// What a valid Service must become, per family.
#[derive(Debug, Clone)]
struct ExpectedService {
    cluster_ips: Vec<IpAddr>,
    /// (name, port, protocol, nodePort)
    ports: Vec<(String, u16, Protocol, Option<u16>)>,
    external_ips: Vec<IpAddr>,
    source_ranges: Vec<String>,
    lb_vips: Vec<IpAddr>,
}

/// A Service as the API server stores it, and what it must become.
fn valid_service() -> impl Strategy<Value = (Value, ExpectedService)> {
    let families = prop_oneof![
        Just(vec![IpFamily::V4]),
        Just(vec![IpFamily::V6]),
        Just(vec![IpFamily::V4, IpFamily::V6]),
        Just(vec![IpFamily::V6, IpFamily::V4]),
    ];
    let svc_type = prop_oneof![Just("ClusterIP"), Just("NodePort"), Just("LoadBalancer")];
    let port_count = prop_oneof![Just(1usize), Just(100usize), 1..=20usize];
    (
        dns1123_label(),
        dns1035_label(),
        families,
        svc_type,
        port_count,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|(ns, name, families, svc_type, n, affinity, local)| {
            let ips: Vec<_> = families.iter().map(|f| ip_of(*f)).collect();
            let ports = proptest::collection::vec(
                (
                    dns1123_label(),
                    port_number(),
                    protocol(),
                    port_number(),
                    prop_oneof![port_number().prop_map(|p| json!(p)), iana_name().prop_map(|s| json!(s))],
                ),
                n,
            );
            let ext = proptest::collection::vec(prop_oneof![ipv4(), ipv6()], 0..3);
            let ingress = proptest::collection::vec(prop_oneof![ipv4(), ipv6()], 0..2);
            let ranges = proptest::collection::vec((ipv4(), 0..=32u8, any::<bool>()), 0..3);
            (
                Just((ns, name, svc_type, affinity, local)),
                ips,
                ports,
                ext,
                ingress,
                ranges,
            )
        })
        .prop_map(|((ns, name, svc_type, affinity, local), ips, raw_ports, ext, ingress, ranges)| {
            let external = svc_type != "ClusterIP";
            let mut names = BTreeSet::new();
            let mut taken = BTreeSet::new();
            let mut node_ports = BTreeSet::new();
            let mut ports = Vec::new();
            let mut expected_ports = Vec::new();
            for (i, (pname, mut port, (proto, proto_text), mut node_port, target)) in
                raw_ports.into_iter().enumerate()
            {
                // The API server keeps names, port/protocol and nodePort/protocol unique.
                let pname = if names.insert(pname.clone()) { pname } else { format!("p{i}") };
                names.insert(pname.clone());
                while !taken.insert((port, proto)) {
                    port = port % 65535 + 1;
                }
                let node_port = external.then(|| {
                    while !node_ports.insert((node_port, proto)) {
                        node_port = node_port % 65535 + 1;
                    }
                    node_port
                });
                let mut p = json!({"name": pname, "port": port, "targetPort": target});
                if let Some(t) = proto_text {
                    p["protocol"] = json!(t);
                }
                if let Some(np) = node_port {
                    p["nodePort"] = json!(np);
                }
                ports.push(p);
                expected_ports.push((pname, port, proto, node_port));
            }
            let mut spec = json!({
                "type": svc_type,
                "clusterIP": ips[0].1,
                "clusterIPs": ips.iter().map(|i| i.1.clone()).collect::<Vec<_>>(),
                "ports": ports,
                "externalIPs": ext.iter().map(|i| i.1.clone()).collect::<Vec<_>>(),
            });
            if affinity {
                spec["sessionAffinity"] = json!("ClientIP");
                spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 86400}});
            }
            if external && local {
                spec["externalTrafficPolicy"] = json!("Local");
                spec["healthCheckNodePort"] = json!(65535);
            }
            let mut source_ranges = Vec::new();
            if svc_type == "LoadBalancer" {
                // Padding is admitted here (the API server trims only when validating).
                let texts: Vec<String> = ranges
                    .iter()
                    .map(|((ip, t), len, pad)| {
                        // An IPv4-mapped CIDR is a different family to Go: plain forms only.
                        let t = if t.starts_with("::") { ip.to_string() } else { t.clone() };
                        if *pad { format!(" {t}/{len} ") } else { format!("{t}/{len}") }
                    })
                    .collect();
                source_ranges = ranges
                    .iter()
                    .map(|((ip, _), len, _)| {
                        ipnet::IpNet::new(*ip, *len).unwrap().trunc().to_string()
                    })
                    .collect();
                spec["loadBalancerSourceRanges"] = json!(texts);
            }
            let mut obj = json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": ns, "name": name,
                    "labels": {format!("{}/{}", "a".repeat(253), "b".repeat(63)): "c".repeat(63)},
                    "annotations": {"note": "x".repeat(4096)}},
                "spec": spec});
            let mut lb_vips = Vec::new();
            if svc_type == "LoadBalancer" {
                obj["status"] = json!({"loadBalancer": {"ingress":
                    ingress.iter().map(|i| json!({"ip": i.1, "ipMode": "VIP"})).collect::<Vec<_>>()}});
                lb_vips = ingress.iter().map(|i| i.0).collect();
            }
            let expected = ExpectedService {
                cluster_ips: ips.iter().map(|i| i.0).collect(),
                ports: expected_ports,
                external_ips: ext.iter().map(|i| i.0).collect(),
                source_ranges,
                lb_vips,
            };
            (obj, expected)
        })
}

fn decode_service(v: &Value) -> Service {
    serde_json::from_value(v.clone()).expect("decodes")
}

fn decode_slice(v: &Value) -> EndpointSlice {
    serde_json::from_value(v.clone()).expect("decodes")
}

fn family_of(ip: &IpAddr) -> IpFamily {
    IpFamily::of(ip)
}

/// Converts `obj` for each family of `want`, checking every port, address and range.
fn check_service_whole(obj: &Value, want: &ExpectedService) -> Result<(), TestCaseError> {
    let svc = decode_service(obj);
    for cluster_ip in &want.cluster_ips {
        let fam = family_of(cluster_ip);
        let mut warnings = Vec::new();
        let ports = service_ports_from_service(&svc, fam, &mut warnings)
            .map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
        prop_assert!(warnings.is_empty(), "warnings: {:?}", warnings);
        let got: Vec<_> = ports
            .iter()
            .map(|p| (p.name.port.clone(), p.port, p.protocol, p.node_port))
            .collect();
        prop_assert_eq!(&got, &want.ports);
        for p in &ports {
            prop_assert_eq!(&p.cluster_ip, cluster_ip);
            let ext: Vec<_> = want
                .external_ips
                .iter()
                .filter(|i| family_of(i) == fam)
                .copied()
                .collect();
            prop_assert_eq!(&p.external_ips, &ext);
            let vips: Vec<_> = want
                .lb_vips
                .iter()
                .filter(|i| family_of(i) == fam)
                .copied()
                .collect();
            prop_assert_eq!(&p.load_balancer_vips, &vips);
            if fam == IpFamily::V4 {
                let ranges: Vec<String> = p
                    .load_balancer_source_ranges
                    .iter()
                    .map(|r| r.to_string())
                    .collect();
                prop_assert_eq!(&ranges, &want.source_ranges);
            }
        }
    }
    Ok(())
}

/// What a break must do: `Ok(Some(port index))` drops that port, `Ok(None)` drops one
/// list entry (an external IP, a source range), `Err(field)` refuses the object.
type Outcome = Result<Option<usize>, String>;

/// One field of a valid Service moved one step past the API server's limit, applied to
/// port `i` (>= 1) where it concerns a port.
type ServiceBreak = (&'static str, fn(&mut Value, usize) -> Outcome);

fn set_port(obj: &mut Value, i: usize, field: &str, v: Value) -> Outcome {
    obj["spec"]["ports"][i][field] = v;
    Ok(Some(i))
}

const SERVICE_BREAKS: &[ServiceBreak] = &[
    ("port name of 64", |o, i| {
        set_port(o, i, "name", json!("a".repeat(64)))
    }),
    ("port name upper case", |o, i| {
        set_port(o, i, "name", json!("Http"))
    }),
    ("port name leading dash", |o, i| {
        set_port(o, i, "name", json!("-http"))
    }),
    ("port name underscore", |o, i| {
        set_port(o, i, "name", json!("my_port"))
    }),
    ("port 0", |o, i| set_port(o, i, "port", json!(0))),
    ("port 65536", |o, i| set_port(o, i, "port", json!(65536))),
    ("protocol lower case", |o, i| {
        set_port(o, i, "protocol", json!("tcp"))
    }),
    ("protocol ICMP", |o, i| {
        set_port(o, i, "protocol", json!("ICMP"))
    }),
    ("nodePort 65536", |o, i| {
        set_port(o, i, "nodePort", json!(65536))
    }),
    ("nodePort -1", |o, i| set_port(o, i, "nodePort", json!(-1))),
    ("repeated port name", |o, i| {
        let first = o["spec"]["ports"][0]["name"].clone();
        set_port(o, i, "name", first)
    }),
    ("repeated port and protocol", |o, i| {
        let first = o["spec"]["ports"][0].clone();
        let protocol = first.get("protocol").cloned().unwrap_or(json!("TCP"));
        set_port(o, i, "protocol", protocol)?;
        set_port(o, i, "port", first["port"].clone())
    }),
    ("external IP octet 256", |o, _| {
        o["spec"]["externalIPs"]
            .as_array_mut()
            .unwrap()
            .push(json!("10.0.0.256"));
        Ok(None)
    }),
    ("source range /33", |o, _| {
        o["spec"]["loadBalancerSourceRanges"] = json!(["10.0.0.0/33", "192.0.2.0/24"]);
        Ok(None)
    }),
    ("namespace of 64", |o, _| {
        o["metadata"]["namespace"] = json!("n".repeat(64));
        Err("metadata.namespace".into())
    }),
    ("name upper case", |o, _| {
        o["metadata"]["name"] = json!("Web");
        Err("metadata.name".into())
    }),
    ("clusterIP octet 256", |o, _| {
        o["spec"]["clusterIP"] = json!("10.0.0.256");
        o["spec"]["clusterIPs"] = json!(["10.0.0.256"]);
        Err("spec.clusterIP".into())
    }),
];

/// A valid EndpointSlice and what it must become: port -> endpoint IPs.
fn valid_slice() -> impl Strategy<
    Value = (
        Value,
        IpFamily,
        BTreeMap<(String, Protocol), BTreeSet<IpAddr>>,
    ),
> {
    let family = prop_oneof![Just(IpFamily::V4), Just(IpFamily::V6)];
    let endpoint_count = prop_oneof![Just(1usize), Just(1000usize), 1..=30usize];
    let port_count = prop_oneof![Just(1usize), Just(100usize), 1..=8usize];
    (
        dns1123_label(),
        dns1123_subdomain(),
        dns1035_label(),
        family,
        endpoint_count,
        port_count,
    )
        .prop_flat_map(|(ns, name, svc, family, n_eps, n_ports)| {
            let eps = proptest::collection::vec(
                (
                    ip_of(family),
                    proptest::option::of(any::<bool>()),
                    proptest::option::of(any::<bool>()),
                    proptest::option::of(any::<bool>()),
                    proptest::option::of(dns1123_subdomain()),
                ),
                n_eps,
            );
            let ports =
                proptest::collection::vec((dns1123_label(), port_number(), protocol()), n_ports);
            (Just((ns, name, svc, family)), eps, ports)
        })
        .prop_map(|((ns, name, svc, family), eps, ports)| {
            let mut seen_ips = BTreeSet::new();
            let endpoints: Vec<Value> = eps
                .into_iter()
                .filter(|((ip, _), ..)| seen_ips.insert(*ip))
                .map(|((_, text), ready, serving, terminating, node)| {
                    let mut conditions = serde_json::Map::new();
                    for (k, v) in [
                        ("ready", ready),
                        ("serving", serving),
                        ("terminating", terminating),
                    ] {
                        if let Some(v) = v {
                            conditions.insert(k.into(), json!(v));
                        }
                    }
                    let mut ep = json!({"addresses": [text], "conditions": conditions,
                        "hints": {"forZones": [{"name": "z".repeat(63)}]}});
                    if let Some(n) = node {
                        ep["nodeName"] = json!(n);
                    }
                    ep
                })
                .collect();
            let mut names = BTreeSet::new();
            let mut expected = BTreeMap::new();
            let mut port_objs = Vec::new();
            for (i, (pname, port, (proto, _))) in ports.into_iter().enumerate() {
                let pname = if names.insert(pname.clone()) {
                    pname
                } else {
                    format!("p{i}")
                };
                names.insert(pname.clone());
                port_objs.push(json!({"name": pname, "port": port, "protocol": proto.upper()}));
                expected.insert((pname, proto), seen_ips.clone());
            }
            let obj = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": ns, "name": name, "labels": {
                    "kubernetes.io/service-name": svc,
                    "endpointslice.kubernetes.io/managed-by": "x".repeat(63)}},
                "addressType": if family == IpFamily::V4 { "IPv4" } else { "IPv6" },
                "endpoints": endpoints, "ports": port_objs});
            (obj, family, expected)
        })
}

type SlicePorts = BTreeMap<(String, Protocol), BTreeSet<IpAddr>>;

fn convert_slice(obj: &Value, family: IpFamily) -> Result<(SlicePorts, Vec<String>), String> {
    let slice = decode_slice(obj);
    let mut warnings = Vec::new();
    let got = endpoints_from_slice(&slice, family, "node1", &mut warnings)
        .map_err(|e| e.to_string())?
        .ok_or("slice not used")?;
    let ports = got
        .by_port
        .iter()
        .map(|p| {
            (
                (p.port.clone(), p.protocol),
                p.endpoints.iter().map(|e| e.ip).collect(),
            )
        })
        .collect();
    Ok((ports, warnings))
}

proptest! {
    // No regression files in the source tree: a failure prints its minimal input.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_valid_service_is_converted_whole((obj, want) in valid_service()) {
        check_service_whole(&obj, &want)?;
    }

    #[test]
    fn a_service_field_past_its_limit_drops_only_its_part(
        (obj, want) in valid_service().prop_filter("two ports", |(_, w)| w.ports.len() >= 2),
        b in proptest::sample::select(SERVICE_BREAKS),
        pick in any::<Index>(),
    ) {
        let mut obj = obj;
        // The Service's first family: the one whose cluster IP the break keeps.
        let fam = family_of(&want.cluster_ips[0]);
        let i = 1 + pick.index(want.ports.len() - 1);
        let (what, apply) = b;
        let outcome = apply(&mut obj, i);
        let svc = decode_service(&obj);
        let mut warnings = Vec::new();
        let result = service_ports_from_service(&svc, fam, &mut warnings);
        match outcome {
            Err(field) => {
                let err = result.expect_err("refused").to_string();
                prop_assert!(err.contains(&field), "{} should name {}", err, field);
            }
            Ok(dropped) => {
                let ports = result.map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
                let got: Vec<_> = ports.iter().map(|p| (p.name.port.clone(), p.port)).collect();
                let mut expect: Vec<_> = want.ports.iter().map(|p| (p.0.clone(), p.1)).collect();
                if let Some(i) = dropped {
                    expect.remove(i);
                    prop_assert_eq!(warnings.len(), 1, "{}: {:?}", what, warnings);
                    let field = format!("spec.ports[{i}]");
                    prop_assert!(warnings[0].contains(&field), "{:?} should name {}", warnings, field);
                } else {
                    // A bad list entry: that entry only.
                    prop_assert_eq!(warnings.len(), 1, "{}: {:?}", what, warnings);
                    prop_assert!(warnings.iter().all(|w| w.contains("spec.externalIPs[") || w.contains("spec.loadBalancerSourceRanges[0]")), "{:?}", warnings);
                }
                prop_assert_eq!(got, expect, "{}", what);
            }
        }
    }

    #[test]
    fn every_valid_slice_is_converted_whole((obj, family, want) in valid_slice()) {
        let (got, warnings) = convert_slice(&obj, family).map_err(TestCaseError::fail)?;
        prop_assert!(warnings.is_empty(), "{:?}", warnings);
        prop_assert_eq!(got, want);
    }

    #[test]
    fn a_slice_field_past_its_limit_drops_only_its_part(
        (obj, family, want) in valid_slice(),
        which in 0..5u8,
        pick in any::<Index>(),
    ) {
        let mut obj = obj;
        let mut want = want;
        let ports: Vec<(String, Protocol)> = want.keys().cloned().collect();
        let n_eps = obj["endpoints"].as_array().unwrap().len();
        match which {
            0 => {
                obj["metadata"]["name"] = json!("a".repeat(254));
                prop_assert!(convert_slice(&obj, family).unwrap_err().contains("metadata.name"));
                return Ok(());
            }
            1 => {
                // One endpoint's address one octet past the limit: that endpoint only.
                let e = pick.index(n_eps);
                let ip: IpAddr = {
                    let s = obj["endpoints"][e]["addresses"][0].as_str().unwrap().to_string();
                    kp_model::parse_ip_sloppy(&s).unwrap()
                };
                obj["endpoints"][e]["addresses"][0] = json!(if family == IpFamily::V4 { "10.0.0.256" } else { "fd00::1::2" });
                for set in want.values_mut() {
                    set.remove(&ip);
                }
            }
            2 | 3 => {
                // One port number or protocol past the limit: that port only.
                let p = pick.index(ports.len());
                let name = obj["ports"][p]["name"].as_str().unwrap().to_string();
                let key = want.keys().find(|k| k.0 == name).cloned().unwrap();
                want.remove(&key);
                if which == 2 {
                    obj["ports"][p]["port"] = json!(65536);
                } else {
                    obj["ports"][p]["protocol"] = json!("ICMP");
                }
            }
            _ => {
                obj["metadata"]["labels"]["kubernetes.io/service-name"] = json!("Not_A_Service");
                let slice = decode_slice(&obj);
                let mut warnings = Vec::new();
                let got = endpoints_from_slice(&slice, family, "node1", &mut warnings).unwrap();
                prop_assert!(got.is_none());
                prop_assert_eq!(warnings.len(), 1);
                return Ok(());
            }
        }
        let (got, warnings) = convert_slice(&obj, family).map_err(TestCaseError::fail)?;
        prop_assert_eq!(warnings.len(), 1, "{:?}", warnings);
        // Exactly the remaining ports: a dropped port must be absent, and a port whose only
        // endpoint was dropped is still listed (empty), as an empty slice port is.
        prop_assert_eq!(got, want);
    }
}
