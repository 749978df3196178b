//! ROUTE-REFRESH (RFC 2918 §3): asking a peer to send a family again, and
//! reading which family a peer asks us for.

use super::framing::encode;
use super::iana::{address_type, family_of};
use crate::attrs::Family;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::iana::RouteRefreshSubcode;
use netgauze_bgp_pkt::route_refresh::BgpRouteRefreshMessage;

/// A ROUTE-REFRESH request (RFC 2918).
pub fn encode_route_refresh(family: Family) -> Vec<u8> {
    encode(&BgpMessage::RouteRefresh(BgpRouteRefreshMessage::new(
        address_type(family),
        RouteRefreshSubcode::NormalRequest,
    )))
}

/// The family a peer asks us to send again; `None` for one we do not carry.
pub fn route_refresh_family(m: &BgpRouteRefreshMessage) -> Option<Family> {
    family_of(m.address_type())
}
