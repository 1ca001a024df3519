//! Byte layouts derived from include/uapi/linux/ip_vs.h and linux/genetlink.h, and
//! round trips through the decoder (the kernel answers dumps with the same nests it
//! accepts, plus counters and stats).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kp_netlink::{Attrs, NLA_F_NESTED, genl_payload, messages};

use crate::types::*;
use crate::wire::*;
use crate::{Error, Malformed};

const FAMILY: u16 = 0x25;

/// An attribute as the kernel lays it out: len, type, value, padding to 4.
fn tlv(ty: u16, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(value);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

fn nested(ty: u16, inner: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = inner.concat();
    let mut v = Vec::new();
    v.extend_from_slice(&((4 + body.len()) as u16).to_ne_bytes());
    v.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    v.extend_from_slice(&body);
    v
}

fn genl_msg(ty: u16, flags: u16, seq: u32, cmd: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = attrs.concat();
    let mut v = Vec::new();
    v.extend_from_slice(&((16 + 4 + body.len()) as u32).to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v.extend_from_slice(&[cmd, 1, 0, 0]);
    v.extend_from_slice(&body);
    v
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}

fn addr16_v4(o: [u8; 4]) -> Vec<u8> {
    let mut b = o.to_vec();
    b.resize(16, 0);
    b
}

/// NLM_F_REQUEST | NLM_F_ACK
const REQ_ACK: u16 = 0x5;
/// NLM_F_REQUEST | NLM_F_DUMP
const REQ_DUMP: u16 = 0x301;

fn tcp_svc() -> VirtualServer {
    VirtualServer {
        key: ServiceKey::new(Protocol::Tcp, v4(10, 96, 0, 1), 80),
        scheduler: "rr".into(),
        flags: flags::PERSISTENT,
        timeout: 10800,
        netmask: 0xffff_ff00,
    }
}

fn service_key_tlvs(af: u16, proto: u16, addr: Vec<u8>, port: u16) -> Vec<Vec<u8>> {
    vec![
        tlv(1, &af.to_ne_bytes()),
        tlv(2, &proto.to_ne_bytes()),
        tlv(3, &addr),
        tlv(4, &port.to_be_bytes()),
    ]
}

#[test]
fn add_service_layout() {
    let mut out = Attrs::new();
    encode_op(&mut out, FAMILY, 42, &Op::AddService(&tcp_svc()));
    let mut svc = service_key_tlvs(2, 6, addr16_v4([10, 96, 0, 1]), 80);
    svc.push(tlv(6, b"rr\0"));
    let mut fl = Vec::new();
    fl.extend_from_slice(&1u32.to_ne_bytes());
    fl.extend_from_slice(&u32::MAX.to_ne_bytes());
    svc.push(tlv(7, &fl));
    svc.push(tlv(8, &10800u32.to_ne_bytes()));
    // the IPv4 netmask's bytes are the mask in network order
    svc.push(tlv(9, &[255, 255, 255, 0]));
    let want = genl_msg(FAMILY, REQ_ACK, 42, 1, &[nested(1, &svc)]);
    assert_eq!(out.buf, want);
    // 16 nlmsghdr + 4 genlmsghdr + 4 nest + AF 8 + PROTO 8 + ADDR 20 + PORT 8 + SCHED 8
    // + FLAGS 12 + TIMEOUT 8 + NETMASK 8
    assert_eq!(out.buf.len(), 104);
}

#[test]
fn hashed_flag_is_never_sent() {
    let mut vs = tcp_svc();
    vs.flags |= flags::HASHED | flags::ONEPACKET;
    let mut out = Attrs::new();
    encode_op(&mut out, FAMILY, 1, &Op::UpdateService(&vs));
    let m = messages(&out.buf).next().unwrap().unwrap();
    let p = genl_payload(m.payload).unwrap();
    assert_eq!(p.cmd, CMD_SET_SERVICE);
    let parsed = parse_service(p.attrs).unwrap().into_virtual().unwrap();
    assert_eq!(parsed.flags, flags::PERSISTENT | flags::ONEPACKET);
}

#[test]
fn ipv6_service_key_and_netmask_layout() {
    let key = ServiceKey::new(Protocol::Udp, v6("fd00::a"), 53);
    let mut out = Attrs::new();
    encode_op(&mut out, FAMILY, 7, &Op::DeleteService(&key));
    let addr = v6("fd00::a");
    let IpAddr::V6(a) = addr else { unreachable!() };
    let svc = service_key_tlvs(10, 17, a.octets().to_vec(), 53);
    assert_eq!(out.buf, genl_msg(FAMILY, REQ_ACK, 7, 3, &[nested(1, &svc)]));

    let vs = VirtualServer::new(key, "sh");
    assert_eq!(vs.netmask, 128);
    out.clear();
    encode_op(&mut out, FAMILY, 8, &Op::AddService(&vs));
    // IPv6: the prefix length in host order
    let tail = &out.buf[out.buf.len() - 8..];
    assert_eq!(tail, tlv(9, &128u32.to_ne_bytes()).as_slice());
}

#[test]
fn add_and_delete_real_server_layout() {
    let key = ServiceKey::new(Protocol::Tcp, v4(10, 96, 0, 1), 80);
    let rs = RealServer::new(v4(10, 0, 0, 1), 8080, 3);
    let mut out = Attrs::new();
    encode_op(&mut out, FAMILY, 9, &Op::AddRealServer(&key, &rs));
    let svc = service_key_tlvs(2, 6, addr16_v4([10, 96, 0, 1]), 80);
    let dest = vec![
        tlv(1, &addr16_v4([10, 0, 0, 1])),
        tlv(2, &8080u16.to_be_bytes()),
        tlv(11, &2u16.to_ne_bytes()),
        tlv(3, &0u32.to_ne_bytes()), // IP_VS_CONN_F_MASQ
        tlv(4, &3u32.to_ne_bytes()),
        tlv(5, &0u32.to_ne_bytes()),
        tlv(6, &0u32.to_ne_bytes()),
    ];
    assert_eq!(
        out.buf,
        genl_msg(FAMILY, REQ_ACK, 9, 5, &[nested(1, &svc), nested(2, &dest)])
    );

    out.clear();
    encode_op(&mut out, FAMILY, 10, &Op::DeleteRealServer(&key, &rs));
    assert_eq!(
        out.buf,
        genl_msg(
            FAMILY,
            REQ_ACK,
            10,
            7,
            &[nested(1, &svc), nested(2, &dest[..3])]
        )
    );
}

#[test]
fn forward_methods_have_their_header_codes() {
    let key = ServiceKey::new(Protocol::Tcp, v4(1, 1, 1, 1), 1);
    for (fwd, code) in [
        (ForwardMethod::Masq, 0u32),
        (ForwardMethod::Local, 1),
        (ForwardMethod::Tunnel, 2),
        (ForwardMethod::Route, 3),
        (ForwardMethod::Bypass, 4),
    ] {
        let mut rs = RealServer::new(v4(2, 2, 2, 2), 2, 1);
        rs.fwd = fwd;
        let mut out = Attrs::new();
        encode_op(&mut out, FAMILY, 1, &Op::UpdateRealServer(&key, &rs));
        let want = tlv(3, &code.to_ne_bytes());
        assert!(out.buf.windows(8).any(|w| w == want.as_slice()), "{fwd}");
        let m = messages(&out.buf).next().unwrap().unwrap();
        let p = genl_payload(m.payload).unwrap();
        assert_eq!(p.cmd, CMD_SET_DEST);
        assert_eq!(parse_dest(p.attrs, Family::V4).unwrap(), rs);
    }
}

#[test]
fn dump_requests_layout() {
    let mut out = Attrs::new();
    encode_dump_services(&mut out, FAMILY, 3);
    assert_eq!(out.buf, genl_msg(FAMILY, REQ_DUMP, 3, 4, &[]));
    out.clear();
    let key = ServiceKey::new(Protocol::Sctp, v4(10, 0, 0, 9), 3868);
    encode_dump_dests(&mut out, FAMILY, 4, &key);
    let svc = service_key_tlvs(2, 132, addr16_v4([10, 0, 0, 9]), 3868);
    assert_eq!(
        out.buf,
        genl_msg(FAMILY, REQ_DUMP, 4, 8, &[nested(1, &svc)])
    );
}

#[test]
fn config_requests_layout() {
    let mut out = Attrs::new();
    encode_simple(&mut out, FAMILY, 5, CMD_GET_CONFIG);
    assert_eq!(out.buf, genl_msg(FAMILY, REQ_ACK, 5, 13, &[]));
    out.clear();
    encode_simple(&mut out, FAMILY, 6, CMD_FLUSH);
    assert_eq!(out.buf, genl_msg(FAMILY, REQ_ACK, 6, 17, &[]));
    out.clear();
    encode_set_timeouts(
        &mut out,
        FAMILY,
        7,
        &Timeouts {
            tcp: 900,
            tcp_fin: 0,
            udp: 300,
        },
    );
    let want = genl_msg(
        FAMILY,
        REQ_ACK,
        7,
        12,
        &[tlv(4, &900u32.to_ne_bytes()), tlv(6, &300u32.to_ne_bytes())],
    );
    assert_eq!(out.buf, want);
}

/// A service as the kernel dumps it: HASHED set, stats and a PE name we do not model.
fn kernel_service_reply(svc_attrs: Vec<Vec<u8>>) -> Vec<u8> {
    genl_msg(FAMILY, 0x2, 1, CMD_NEW_SERVICE, &[nested(1, &svc_attrs)])
}

fn parse_one_service(buf: &[u8]) -> Result<Service, Malformed> {
    let m = messages(buf).next().unwrap().unwrap();
    let p = genl_payload(m.payload).unwrap();
    parse_service(p.attrs)
}

#[test]
fn kernel_service_dump_decodes() {
    let mut svc = service_key_tlvs(2, 6, addr16_v4([10, 96, 0, 1]), 80);
    svc.push(tlv(6, b"sh\0"));
    svc.push(tlv(11, b"sip\0"));
    let mut fl = Vec::new();
    fl.extend_from_slice(&(0x2u32 | 0x8 | 0x10).to_ne_bytes());
    fl.extend_from_slice(&u32::MAX.to_ne_bytes());
    svc.push(tlv(7, &fl));
    svc.push(tlv(8, &0u32.to_ne_bytes()));
    svc.push(tlv(9, &[255, 255, 255, 255]));
    svc.push(nested(10, &[tlv(1, &5u32.to_ne_bytes())]));
    svc.push(nested(12, &[tlv(1, &5u64.to_ne_bytes())]));
    let got = parse_one_service(&kernel_service_reply(svc)).unwrap();
    assert_eq!(
        got,
        Service::Virtual(VirtualServer {
            key: ServiceKey::new(Protocol::Tcp, v4(10, 96, 0, 1), 80),
            scheduler: "sh".into(),
            flags: flags::SH_FALLBACK | flags::SH_PORT,
            timeout: 0,
            netmask: u32::MAX,
        })
    );
}

#[test]
fn fwmark_and_foreign_protocol_services_are_reported() {
    let svc = vec![
        tlv(1, &2u16.to_ne_bytes()),
        tlv(5, &77u32.to_ne_bytes()),
        tlv(6, b"wlc\0"),
        tlv(7, &[2, 0, 0, 0, 255, 255, 255, 255]),
        tlv(8, &0u32.to_ne_bytes()),
        tlv(9, &[255, 255, 255, 255]),
    ];
    let got = parse_one_service(&kernel_service_reply(svc)).unwrap();
    assert_eq!(
        got,
        Service::Fwmark(FwmarkService {
            family: Family::V4,
            fwmark: 77,
            scheduler: "wlc".into(),
            flags: 0,
            timeout: 0,
            netmask: u32::MAX,
        })
    );
    assert!(got.as_virtual().is_none());

    let svc = service_key_tlvs(10, 51, v6_octets("2001:db8::1"), 0);
    let got = parse_one_service(&kernel_service_reply(svc)).unwrap();
    assert_eq!(
        got.into_virtual().unwrap().key.protocol,
        Protocol::Other(51)
    );
}

fn v6_octets(s: &str) -> Vec<u8> {
    s.parse::<Ipv6Addr>().unwrap().octets().to_vec()
}

#[test]
fn malformed_services_are_errors() {
    // no AF
    let svc = vec![tlv(2, &6u16.to_ne_bytes())];
    assert!(parse_one_service(&kernel_service_reply(svc)).is_err());
    // IPv6 with a 4-byte address
    let svc = service_key_tlvs(10, 6, vec![1, 2, 3, 4], 80);
    assert!(parse_one_service(&kernel_service_reply(svc)).is_err());
    // unknown family
    let svc = service_key_tlvs(7, 6, addr16_v4([1, 2, 3, 4]), 80);
    assert!(parse_one_service(&kernel_service_reply(svc)).is_err());
    // no service nest at all
    assert!(parse_one_service(&genl_msg(FAMILY, 2, 1, 1, &[])).is_err());
}

#[test]
fn services_round_trip_through_the_decoder() {
    let mut cases = Vec::new();
    for (i, proto) in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .enumerate()
    {
        for addr in [
            v4(10, 96, i as u8, 1),
            v6("fd00:10:96::1"),
            v6("::ffff:1.2.3.4"),
        ] {
            let mut vs = VirtualServer::new(ServiceKey::new(proto, addr, 1000 + i as u16), "rr");
            cases.push(vs.clone());
            vs.scheduler = "sh".into();
            vs.flags = flags::SH_FALLBACK | flags::SH_PORT | flags::PERSISTENT;
            vs.timeout = 10800;
            vs.netmask = if addr.is_ipv6() { 64 } else { 0xffff_0000 };
            vs.key.port = 65535;
            cases.push(vs);
        }
    }
    for vs in cases {
        let mut out = Attrs::new();
        encode_op(&mut out, FAMILY, 1, &Op::AddService(&vs));
        assert_eq!(
            parse_one_service(&out.buf).unwrap(),
            Service::Virtual(vs.clone()),
            "{}",
            vs.key
        );
    }
}

#[test]
fn real_servers_round_trip_and_read_counters() {
    let key = ServiceKey::new(Protocol::Tcp, v6("fd00::1"), 443);
    for rs in [
        RealServer::new(v6("fd00:1::5"), 8443, 1),
        RealServer::new(v6("fd00:1::6"), 1, 0),
        // an IPv4 real server behind an IPv6 service (tunnel mode)
        RealServer {
            fwd: ForwardMethod::Tunnel,
            ..RealServer::new(v4(192, 168, 1, 1), 443, 100)
        },
    ] {
        let mut out = Attrs::new();
        encode_op(&mut out, FAMILY, 1, &Op::AddRealServer(&key, &rs));
        let m = messages(&out.buf).next().unwrap().unwrap();
        let p = genl_payload(m.payload).unwrap();
        assert_eq!(parse_dest(p.attrs, Family::V6).unwrap(), rs);
    }

    // A kernel dump entry without IPVS_DEST_ATTR_ADDR_FAMILY (older kernels), with
    // counters and stats.
    let dest = vec![
        tlv(1, &addr16_v4([10, 0, 0, 2])),
        tlv(2, &80u16.to_be_bytes()),
        tlv(3, &3u32.to_ne_bytes()),
        tlv(4, &7u32.to_ne_bytes()),
        tlv(5, &0u32.to_ne_bytes()),
        tlv(6, &0u32.to_ne_bytes()),
        tlv(7, &11u32.to_ne_bytes()),
        tlv(8, &12u32.to_ne_bytes()),
        tlv(9, &13u32.to_ne_bytes()),
        nested(10, &[tlv(1, &1u32.to_ne_bytes())]),
    ];
    let buf = genl_msg(FAMILY, 2, 1, CMD_NEW_DEST, &[nested(2, &dest)]);
    let m = messages(&buf).next().unwrap().unwrap();
    let p = genl_payload(m.payload).unwrap();
    assert_eq!(
        parse_dest(p.attrs, Family::V4).unwrap(),
        RealServer {
            addr: v4(10, 0, 0, 2),
            port: 80,
            weight: 7,
            fwd: ForwardMethod::Route,
            active_conns: 11,
            inactive_conns: 12,
            persist_conns: 13,
        }
    );
}

#[test]
fn info_and_timeouts_decode() {
    let attrs = [
        tlv(1, &0x010201u32.to_ne_bytes()),
        tlv(2, &4096u32.to_ne_bytes()),
    ]
    .concat();
    let info = parse_info(&attrs).unwrap();
    assert_eq!(info.version.to_string(), "1.2.1");
    assert_eq!(info.conn_table_size, 4096);
    assert!(parse_info(&tlv(2, &1u32.to_ne_bytes())).is_err());

    let attrs = [
        tlv(4, &900u32.to_ne_bytes()),
        tlv(5, &120u32.to_ne_bytes()),
        tlv(6, &300u32.to_ne_bytes()),
    ]
    .concat();
    assert_eq!(
        parse_timeouts(&attrs).unwrap(),
        Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300
        }
    );
}

#[test]
fn many_ops_share_one_datagram() {
    let svc = tcp_svc();
    let servers: Vec<RealServer> = (0..10)
        .map(|i| RealServer::new(v4(10, 0, 0, i), 80, 1))
        .collect();
    let mut ops = vec![Op::AddService(&svc)];
    ops.extend(servers.iter().map(|r| Op::AddRealServer(&svc.key, r)));
    let mut out = Attrs::new();
    for (i, op) in ops.iter().enumerate() {
        encode_op(&mut out, FAMILY, 100 + i as u32, op);
    }
    let msgs: Vec<_> = messages(&out.buf).collect::<Result<_, _>>().unwrap();
    assert_eq!(msgs.len(), 11);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.seq, 100 + i as u32);
        assert_eq!(m.msg_type, FAMILY);
        assert_eq!(m.flags, REQ_ACK);
    }
}

#[test]
fn errors_name_the_operation() {
    let key = ServiceKey::new(Protocol::Tcp, v4(10, 96, 0, 1), 80);
    let rs = RealServer::new(v4(10, 0, 0, 1), 80, 1);
    let op = Op::AddRealServer(&key, &rs);
    let err = Error::Kernel {
        op: op.to_string(),
        errno: libc::EEXIST,
        message: None,
    };
    assert_eq!(
        err.to_string(),
        "add real server 10.0.0.1:80 to TCP 10.96.0.1:80: File exists (errno 17)"
    );
    assert_eq!(err.errno(), Some(libc::EEXIST));
    let key6 = ServiceKey::new(Protocol::Udp, v6("fd00::a"), 53);
    let err = Error::Kernel {
        op: Op::DeleteService(&key6).to_string(),
        errno: libc::ESRCH,
        message: Some("gone".into()),
    };
    assert_eq!(
        err.to_string(),
        "delete service UDP [fd00::a]:53: No such process (errno 3): the virtual service does not exist: gone"
    );
    let io: std::io::Error = Error::NotAvailable.into();
    assert_eq!(io.kind(), std::io::ErrorKind::Unsupported);
}
