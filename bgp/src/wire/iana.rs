//! Numbers several messages share: the address families we carry as
//! AFI/SAFI pairs (RFC 4760), AS_TRANS (RFC 6793) and the one attribute
//! type code netgauze leaves to us.

use crate::attrs::Family;
use netgauze_iana::address_family::AddressType;

/// RFC 6793 §9: the 2-octet stand-in for a 4-octet AS number.
pub const AS_TRANS: u32 = 23456;

/// AS4_AGGREGATOR (RFC 6793 §9), which netgauze passes to us as unknown.
pub(super) const AS4_AGGREGATOR: u8 = 18;

pub(super) fn address_type(f: Family) -> AddressType {
    match f {
        Family::Ipv4 => AddressType::Ipv4Unicast,
        Family::Ipv6 => AddressType::Ipv6Unicast,
    }
}

/// Our family of an AFI/SAFI pair; `None` for one we do not carry.
pub(super) fn family_of(t: AddressType) -> Option<Family> {
    match t {
        AddressType::Ipv4Unicast => Some(Family::Ipv4),
        AddressType::Ipv6Unicast => Some(Family::Ipv6),
        _ => None,
    }
}

/// A 4-octet AS number as a 2-octet speaker sees it (RFC 6793 §4.2.2).
pub(super) fn as2(asn: u32) -> u16 {
    if asn > u16::MAX as u32 {
        AS_TRANS as u16
    } else {
        asn as u16
    }
}
