//! The netlink layer kp-nftnl, kp-conntrack and kp-ipvsnl share: netlink sockets
//! ([`NetlinkSocket`], [`NetfilterSocket`]), the attribute and message writer
//! ([`Attrs`]), message and attribute parsing ([`messages`], [`attrs`], [`Message::ack`])
//! and generic netlink family resolution ([`resolve_family`]).

mod attrs;
mod genl;
mod msg;
mod socket;

pub use attrs::Attrs;
pub use genl::{
    GENL_HDRLEN, GENL_ID_CTRL, GenlFamily, GenlPayload, genl_payload, get_family_request,
    parse_family, resolve_family,
};
pub use msg::{
    Ack, AttrIter, Malformed, Message, Messages, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_ACK_TLVS,
    NLM_F_CAPPED, NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN,
    NLMSG_NOOP, NLMSG_OVERRUN, attrs, messages,
};
pub use socket::{NetfilterSocket, NetlinkSocket};

/// `NLA_F_NESTED`: set on the type of an attribute that holds attributes.
pub const NLA_F_NESTED: u16 = 0x8000;
