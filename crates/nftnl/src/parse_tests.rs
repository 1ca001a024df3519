use super::*;

fn one(line: &str) -> Stmt {
    let mut v = parse(line).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v.len(), 1);
    v.remove(0).stmt
}

fn rule(line: &str) -> Vec<RuleItem> {
    match one(line) {
        Stmt::AddRule { rule, .. } => rule.items,
        s => panic!("{s:?}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn obj(f: Family, name: &str) -> Obj {
    Obj {
        family: f,
        table: "kube-proxy".into(),
        name: name.into(),
    }
}

#[test]
fn tables() {
    assert_eq!(
        one("add table ip kube-proxy"),
        Stmt::AddTable {
            family: Family::Ip,
            name: "kube-proxy".into(),
            comment: None
        }
    );
    assert_eq!(
        one("delete table ip6 kube-proxy"),
        Stmt::DeleteTable {
            family: Family::Ip6,
            name: "kube-proxy".into()
        }
    );
    assert_eq!(
        one("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }"),
        Stmt::AddTable {
            family: Family::Ip,
            name: "kube-proxy".into(),
            comment: Some("rules for kube-proxy".into())
        }
    );
}

#[test]
fn chains() {
    assert_eq!(
        one("add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }"),
        Stmt::AddChain {
            obj: obj(Family::Ip, "nat-prerouting"),
            hook: Some(Hook {
                kind: "nat".into(),
                hooknum: 0,
                priority: -100
            })
        }
    );
    assert_eq!(
        one("add chain ip6 kube-proxy filter-output { type filter hook output priority -110 ; }"),
        Stmt::AddChain {
            obj: obj(Family::Ip6, "filter-output"),
            hook: Some(Hook {
                kind: "filter".into(),
                hooknum: 3,
                priority: -110
            })
        }
    );
    let name = "service-ULMVA6XW-ns1/svc1/tcp/p80";
    assert_eq!(
        one(&format!("add chain ip kube-proxy {name}")),
        Stmt::AddChain {
            obj: obj(Family::Ip, name),
            hook: None
        }
    );
    assert_eq!(
        one("flush chain ip kube-proxy x"),
        Stmt::FlushChain(obj(Family::Ip, "x"))
    );
    assert_eq!(
        one("delete chain ip kube-proxy x"),
        Stmt::DeleteChain(obj(Family::Ip, "x"))
    );
}

#[test]
fn sets_and_maps() {
    let Stmt::AddSet { spec, .. } = one(
        "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"c\" ; }",
    ) else {
        panic!()
    };
    assert_eq!(
        spec.key,
        SetKey::Type(vec![
            KeyField::Ipv4Addr,
            KeyField::InetProto,
            KeyField::InetService
        ])
    );
    assert!(spec.verdict_map);
    assert_eq!(spec.comment.as_deref(), Some("c"));
    let Stmt::AddSet { spec, .. } = one(
        "add map ip kube-proxy endpoint-slots { typeof numgen random mod 1 : verdict ; comment \"x\" ; }",
    ) else {
        panic!()
    };
    assert_eq!(spec.key, SetKey::NumgenRandom { modulus: 1 });
    let Stmt::AddSet { spec, .. } = one(
        "add set ip6 kube-proxy affinity-X { type ipv6_addr ; flags dynamic,timeout ; timeout 10800s ; }",
    ) else {
        panic!()
    };
    assert!(spec.dynamic && spec.timeout_flag && !spec.verdict_map);
    assert_eq!(spec.timeout, Some(10800));
    assert_eq!(
        one("delete set ip kube-proxy affinity-X"),
        Stmt::DeleteSet(obj(Family::Ip, "affinity-X"))
    );
    // A map without a value and a set with one are refused.
    assert!(parse("add map ip kube-proxy m { type ipv4_addr ; }").is_err());
    assert!(parse("add set ip kube-proxy m { type ipv4_addr : verdict ; }").is_err());
}

#[test]
fn elements() {
    let Stmt::AddElements { elements, .. } = one(
        "add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 : goto service-a, 10.96.0.2 . udp . 53 : drop }",
    ) else {
        panic!()
    };
    assert_eq!(
        elements,
        vec![
            Element {
                key: vec![
                    KeyPart::Addr(ip("10.96.0.1")),
                    KeyPart::Proto(6),
                    KeyPart::Port(80)
                ],
                value: Some(Verdict::Goto("service-a".into())),
                data: None,
            },
            Element {
                key: vec![
                    KeyPart::Addr(ip("10.96.0.2")),
                    KeyPart::Proto(17),
                    KeyPart::Port(53)
                ],
                value: Some(Verdict::Drop),
                data: None,
            },
        ]
    );
    let Stmt::AddElements { elements, .. } =
        one("add element ip kube-proxy endpoint-slots { 1000 : goto e }")
    else {
        panic!()
    };
    assert_eq!(elements[0].key, vec![KeyPart::Int(1000)]);
    let Stmt::DeleteElements { keys, .. } =
        one("delete element ip6 kube-proxy x { sctp . 30080, fd00::1 }")
    else {
        panic!()
    };
    assert_eq!(
        keys,
        vec![
            vec![KeyPart::Proto(132), KeyPart::Port(30080)],
            vec![KeyPart::Addr(ip("fd00::1"))]
        ]
    );
    assert!(parse("add element ip kube-proxy m { tcp . 70000 : drop }").is_err());
}

#[test]
fn rule_shapes() {
    use RuleItem::*;
    let v = |s: &str| Verdict(super::Verdict::Jump(s.into()));
    assert_eq!(
        rule("add rule ip kube-proxy c ct state new jump x"),
        vec![CtStateNew, v("x")]
    );
    assert_eq!(
        rule("add rule ip kube-proxy c meta mark set meta mark or 0x4000"),
        vec![MarkSet {
            xor: false,
            value: 0x4000
        }]
    );
    assert_eq!(
        rule("add rule ip kube-proxy c meta mark and 0x4000 == 0 return"),
        vec![
            MarkAndCmp {
                mask: 0x4000,
                neg: false,
                value: 0
            },
            Verdict(super::Verdict::Return)
        ]
    );
    assert_eq!(
        rule("add rule ip kube-proxy c masquerade fully-random"),
        vec![Masquerade { fully_random: true }]
    );
    assert_eq!(
        rule("add rule ip kube-proxy c ip daddr . meta l4proto . th dport vmap @service-ips"),
        vec![TupleVmap {
            addr: Some(Dir::Daddr),
            map: "service-ips".into()
        }]
    );
    assert_eq!(
        rule(
            "add rule ip kube-proxy c fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @np"
        ),
        vec![
            FibLocal(Dir::Daddr),
            Addr {
                dir: Dir::Daddr,
                neg: true,
                rhs: AddrRhs::Prefix(ip("127.0.0.0"), 8)
            },
            TupleVmap {
                addr: None,
                map: "np".into()
            }
        ]
    );
    let r = match one("add rule ip kube-proxy c ip daddr @cluster-ips reject comment \"Reject it\"")
    {
        Stmt::AddRule { rule, .. } => rule,
        s => panic!("{s:?}"),
    };
    assert_eq!(r.comment.as_deref(), Some("Reject it"));
    assert_eq!(
        r.items,
        vec![
            Addr {
                dir: Dir::Daddr,
                neg: false,
                rhs: AddrRhs::Set("cluster-ips".into())
            },
            Reject
        ]
    );
    assert_eq!(
        rule(
            "add rule ip kube-proxy c ip daddr 10.96.0.1 tcp dport 80 iifname != \"veth*\" jump m"
        ),
        vec![
            Addr {
                dir: Dir::Daddr,
                neg: false,
                rhs: AddrRhs::Prefix(ip("10.96.0.1"), 32)
            },
            Dport { proto: 6, port: 80 },
            Iifname {
                neg: true,
                name: "veth".into(),
                wildcard: true
            },
            v("m")
        ]
    );
    assert_eq!(
        rule("add rule ip kube-proxy c ip saddr != { 198.18.0.2/32, 203.0.113.10 } drop"),
        vec![
            Addr {
                dir: Dir::Saddr,
                neg: true,
                rhs: AddrRhs::List(vec![(ip("198.18.0.2"), 32), (ip("203.0.113.10"), 32)])
            },
            Verdict(super::Verdict::Drop)
        ]
    );
    assert_eq!(
        rule("add rule ip kube-proxy c numgen random mod 3 offset 8 vmap @endpoint-slots"),
        vec![NumgenVmap {
            modulus: 3,
            offset: 8,
            map: "endpoint-slots".into()
        }]
    );
    assert_eq!(
        rule("add rule ip6 kube-proxy c update @affinity-X { ip6 saddr }"),
        vec![Update {
            set: "affinity-X".into(),
            dir: Dir::Saddr
        }]
    );
    assert_eq!(
        rule("add rule ip6 kube-proxy c meta l4proto sctp dnat to [fd00::1]:80"),
        vec![
            L4Proto(132),
            Dnat {
                addr: ip("fd00::1"),
                port: 80
            }
        ]
    );
    assert_eq!(
        rule(
            "add rule ip6 kube-proxy c fib saddr type local goto x comment \"short-circuit local traffic\""
        )[0],
        FibLocal(Dir::Saddr)
    );
}

#[test]
fn unknown_statements_name_the_line() {
    let text = "add table ip kube-proxy\n\nadd rule ip kube-proxy c tcp flags syn drop\n";
    let e = parse(text).unwrap_err();
    assert_eq!(e.line, 3);
    assert_eq!(e.text, "add rule ip kube-proxy c tcp flags syn drop");
    for bad in [
        "add table inet kube-proxy",
        "list table ip kube-proxy",
        "add rule ip kube-proxy c ip daddr 10.0.0.1/8 drop",
        "add rule ip kube-proxy c ip6 daddr ::1 drop",
        "add rule ip kube-proxy c meta l4proto tcp dnat to [fd00::1]:80",
        "add rule ip kube-proxy c comment \"a\\\"b\" drop",
        "add chain ip kube-proxy x { type route hook output priority 0 ; }",
        "add rule ip kube-proxy c",
        "add chain ip kube-proxy bad\"name",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
}
