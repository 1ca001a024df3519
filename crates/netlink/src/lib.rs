//! The netlink layer kp-nftnl and kp-conntrack share: a `NETLINK_NETFILTER` socket
//! ([`NetfilterSocket`]) and the attribute writer ([`Attrs`]).

mod attrs;
mod socket;

pub use attrs::Attrs;
pub use socket::NetfilterSocket;

/// `NLA_F_NESTED`: set on the type of an attribute that holds attributes.
pub const NLA_F_NESTED: u16 = 0x8000;
