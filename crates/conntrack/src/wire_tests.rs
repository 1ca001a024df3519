use super::*;
use kp_netlink::NLA_F_NESTED;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Encodes `entry` the way the kernel dumps it (both tuples, status, id, zone), with
/// an extra unknown attribute that the decoder must skip.
fn encode_dumped(entry: &FlowEntry) -> Vec<u8> {
    let mut buf = MessageBuf::new();
    buf.begin_message(CT_NEW, 0x2, 7, af(entry.family));
    for (kind, src, dst, sport, dport) in [
        (
            CTA_TUPLE_ORIG,
            entry.orig_src,
            entry.orig_dst,
            entry.orig_sport,
            entry.orig_dport,
        ),
        (
            CTA_TUPLE_REPLY,
            entry.reply_src,
            entry.reply_dst,
            entry.reply_sport,
            entry.reply_dport,
        ),
    ] {
        buf.begin_nest(kind);
        buf.begin_nest(CTA_TUPLE_IP);
        buf.ip_attr(CTA_IP_V4_SRC, CTA_IP_V6_SRC, src);
        buf.ip_attr(CTA_IP_V4_DST, CTA_IP_V6_DST, dst);
        buf.end_nest();
        buf.begin_nest(CTA_TUPLE_PROTO);
        buf.attr(CTA_PROTO_NUM, &[entry.protocol]);
        buf.attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes());
        buf.attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes());
        buf.end_nest();
        buf.end_nest();
    }
    buf.attr(CTA_STATUS, &entry.status.to_be_bytes());
    buf.attr(7 /* CTA_TIMEOUT */, &30u32.to_be_bytes());
    if let Some(id) = entry.id {
        buf.attr(CTA_ID, &id.to_be_bytes());
    }
    buf.attr(CTA_ZONE, &entry.zone.to_be_bytes());
    buf.end_message();
    buf.as_bytes().to_vec()
}

fn sample_v4() -> FlowEntry {
    FlowEntry {
        status: 0x18e,
        id: Some(0xdead_beef),
        zone: 3,
        reply_dst: ip("10.244.1.1"),
        reply_dport: 49637,
        ..FlowEntry::udp(
            ip("198.18.0.2"),
            40000,
            ip("10.96.0.10"),
            53,
            ip("10.244.1.2"),
            5353,
        )
    }
}

fn sample_v6() -> FlowEntry {
    FlowEntry::udp(
        ip("fd18::2"),
        1234,
        ip("fd96::a"),
        53,
        ip("fd44:0:0:1::2"),
        5353,
    )
}

#[test]
fn dumped_entries_round_trip() {
    for entry in [sample_v4(), sample_v6()] {
        let bytes = encode_dumped(&entry);
        let messages = split_messages(&bytes).expect("split");
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].msg_type, CT_NEW);
        assert_eq!(messages[0].seq, 7);
        assert_eq!(parse_entry(messages[0].payload), Ok(entry));
    }
}

#[test]
fn delete_request_names_the_original_tuple() {
    let entry = sample_v4();
    let mut buf = MessageBuf::new();
    buf.delete_request(42, &entry);
    buf.delete_request(43, &sample_v6());
    let bytes = buf.as_bytes().to_vec();
    let messages = split_messages(&bytes).expect("split");
    assert_eq!(messages.len(), 2);
    let first = messages[0];
    assert_eq!(first.msg_type, (1 << 8) | 2, "IPCTNL_MSG_CT_DELETE");
    assert_eq!(first.flags, NLM_F_REQUEST | NLM_F_ACK);
    assert_eq!(first.seq, 42);
    assert_eq!(first.payload[0], libc::AF_INET as u8);
    assert_eq!(messages[1].payload[0], libc::AF_INET6 as u8);
    let attrs: Vec<(u16, Vec<u8>)> = attributes(&first.payload[4..])
        .map(|a| a.map(|(k, v)| (k, v.to_vec())))
        .collect::<Result<_, _>>()
        .expect("attributes");
    let kinds: Vec<u16> = attrs.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, vec![CTA_TUPLE_ORIG, CTA_ZONE, CTA_ID]);
    let tuple = parse_tuple(&attrs[0].1).expect("tuple");
    assert_eq!(tuple.src, Some(entry.orig_src));
    assert_eq!(tuple.dst, Some(entry.orig_dst));
    assert_eq!((tuple.sport, tuple.dport), (40000, 53));
    assert_eq!(tuple.protocol, Some(17));
    assert_eq!(attrs[1].1, 3u16.to_be_bytes());
    assert_eq!(attrs[2].1, 0xdead_beefu32.to_be_bytes());
    // The nested flag is set on nests, as the kernel's strict parsers expect.
    let raw_type = u16::from_ne_bytes([first.payload[6], first.payload[7]]);
    assert_eq!(raw_type, CTA_TUPLE_ORIG | NLA_F_NESTED);
}

#[test]
fn dump_request_layout() {
    let mut buf = MessageBuf::new();
    buf.dump_request(1, IpFamily::V6, true);
    let bytes = buf.as_bytes().to_vec();
    let messages = split_messages(&bytes).expect("split");
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].flags, NLM_F_REQUEST | NLM_F_DUMP);
    assert_eq!(messages[0].payload[0], libc::AF_INET6 as u8);
    let kinds: Vec<u16> = attributes(&messages[0].payload[4..])
        .map(|a| a.map(|(k, _)| k))
        .collect::<Result<_, _>>()
        .expect("attributes");
    assert_eq!(kinds, vec![CTA_TUPLE_ORIG, CTA_FILTER]);

    buf.clear();
    buf.dump_request(2, IpFamily::V4, false);
    assert_eq!(buf.as_bytes().len(), NLMSG_HDRLEN + 4);
}

#[test]
fn truncated_input_is_an_error_not_a_panic() {
    let bytes = encode_dumped(&sample_v4());
    let payload = &bytes[NLMSG_HDRLEN..];
    for cut in 0..payload.len() {
        // Any prefix either fails to decode or (cut at an attribute boundary after the
        // tuples) decodes; it must never panic.
        let _ = parse_entry(&payload[..cut]);
        let _ = split_messages(&bytes[..cut]);
    }
    assert!(parse_entry(&payload[..4]).is_err());
    assert_eq!(
        split_messages(&bytes[..NLMSG_HDRLEN + 3]),
        Err(DecodeError::Truncated("nlmsghdr"))
    );
}

#[test]
fn unknown_family_is_rejected() {
    let mut bytes = encode_dumped(&sample_v4());
    bytes[NLMSG_HDRLEN] = 7;
    assert_eq!(
        parse_entry(&bytes[NLMSG_HDRLEN..]),
        Err(DecodeError::Family(7))
    );
}

#[test]
fn error_messages_decode() {
    // nlmsgerr: error -2 (ENOENT), then the echoed request header with seq 9.
    let mut payload = (-2i32).to_ne_bytes().to_vec();
    payload.extend_from_slice(&36u32.to_ne_bytes());
    payload.extend_from_slice(&0u16.to_ne_bytes());
    payload.extend_from_slice(&0u16.to_ne_bytes());
    payload.extend_from_slice(&9u32.to_ne_bytes());
    payload.extend_from_slice(&0u32.to_ne_bytes());
    let msg = RawMessage {
        msg_type: NLMSG_ERROR,
        flags: 0,
        seq: 9,
        payload: &payload,
    };
    assert_eq!(msg.error_code(), Ok(-2));
    assert_eq!(msg.acked_seq(), 9);
    let short = RawMessage {
        payload: &payload[..2],
        ..msg
    };
    assert!(short.error_code().is_err());
}
