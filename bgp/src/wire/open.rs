//! OPEN (RFC 4271 §4.2): the one we send, with the capabilities we speak
//! (RFC 5492), and the checks on the peer's (§6.2).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |    Version    |     My Autonomous System      |   Hold Time   :
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! :               |                BGP Identifier                 :
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! :               | Opt Parm Len  |  Optional Parameters (var.)   |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use super::iana::{address_type, as2, family_of};
use super::notification::{Notify, OpenMessageError};
use crate::attrs::Family;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::capabilities::{
    BgpCapability, FourOctetAsCapability, GracefulRestartAddressFamily, GracefulRestartCapability,
    MultiProtocolExtensionsCapability,
};
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// What we advertise in our OPEN.
#[derive(Clone, Debug)]
pub struct OpenParams {
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub families: Vec<Family>,
    /// Graceful restart (RFC 4724): restart time, R bit, and F bit per family.
    pub graceful_restart: Option<GracefulRestart>,
    pub extended_message: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GracefulRestart {
    pub restart_time: u16,
    pub restarting: bool,
    pub forwarding: bool,
}

/// Our OPEN: multiprotocol (RFC 4760), route refresh (RFC 2918), 4-octet
/// AS (RFC 6793, with AS_TRANS in My AS when ours needs 4 octets),
/// graceful restart (RFC 4724) and extended messages (RFC 8654).
pub fn build_open(p: &OpenParams) -> BgpMessage {
    let mut caps: Vec<BgpCapability> = p
        .families
        .iter()
        .map(|f| {
            BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
                address_type(*f),
            ))
        })
        .collect();
    caps.push(BgpCapability::RouteRefresh);
    caps.push(BgpCapability::FourOctetAs(FourOctetAsCapability::new(
        p.asn,
    )));
    if let Some(gr) = &p.graceful_restart {
        let fams: Vec<GracefulRestartAddressFamily> = p
            .families
            .iter()
            .map(|f| GracefulRestartAddressFamily::new(gr.forwarding, address_type(*f)))
            .collect();
        caps.push(BgpCapability::GracefulRestartCapability(
            GracefulRestartCapability::new(gr.restarting, false, gr.restart_time.min(4095), fams),
        ));
    }
    if p.extended_message {
        caps.push(BgpCapability::ExtendedMessage);
    }
    BgpMessage::Open(BgpOpenMessage::new(
        as2(p.asn),
        p.hold_time,
        p.router_id,
        vec![BgpOpenMessageParameter::new_capabilities(caps)],
    ))
}

/// What the peer's OPEN told us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerOpen {
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub four_octet: bool,
    pub families: BTreeSet<Family>,
    pub route_refresh: bool,
    pub extended_message: bool,
    pub graceful_restart: Option<PeerGracefulRestart>,
}

/// The peer's graceful restart capability: restart time, R bit, and each
/// family with its F bit (RFC 4724 §3).
pub type PeerGracefulRestart = (u16, bool, Vec<(Family, bool)>);

/// Validate a received OPEN against the peer's configuration (RFC 4271 §6.2).
pub fn check_open(
    open: &BgpOpenMessage,
    expected_asn: u32,
    local_router_id: Ipv4Addr,
    ibgp: bool,
) -> Result<PeerOpen, Notify> {
    let p = read_capabilities(open);
    if p.asn != expected_asn {
        return Err(Notify::new(
            OpenMessageError::BadPeerAs,
            (open.my_as()).to_be_bytes().to_vec(),
            format!(
                "peer sent AS {} but is configured as AS {expected_asn}",
                p.asn
            ),
        ));
    }
    let id = p.router_id;
    if id.is_unspecified()
        || id.is_multicast()
        || id.is_broadcast()
        || (ibgp && id == local_router_id)
    {
        return Err(Notify::new(
            OpenMessageError::BadBgpIdentifier,
            id.octets().to_vec(),
            format!("unacceptable BGP identifier {id}"),
        ));
    }
    if p.hold_time == 1 || p.hold_time == 2 {
        return Err(Notify::new(
            OpenMessageError::UnacceptableHoldTime,
            p.hold_time.to_be_bytes().to_vec(),
            format!("unacceptable hold time {}", p.hold_time),
        ));
    }
    Ok(p)
}

/// RFC 4271 §6.2: a non-zero hold time below our minimum (`min`, never
/// less than 3: §4.2 forbids 1 and 2) is refused with 2/6 Unacceptable Hold
/// Time. Zero (no keepalives at all) is the peer's right under §4.2.
pub fn check_hold_time(hold_time: u16, min: u16) -> Result<(), Notify> {
    if hold_time != 0 && hold_time < min.max(3) {
        return Err(Notify::new(
            OpenMessageError::UnacceptableHoldTime,
            hold_time.to_be_bytes().to_vec(),
            format!(
                "unacceptable hold time {hold_time}: the minimum is {}",
                min.max(3)
            ),
        ));
    }
    Ok(())
}

/// The OPEN's fields and the capabilities we understand; the others are
/// ignored (RFC 5492 §3).
fn read_capabilities(open: &BgpOpenMessage) -> PeerOpen {
    let mut p = PeerOpen {
        asn: open.my_as() as u32,
        hold_time: open.hold_time(),
        router_id: open.bgp_id(),
        four_octet: false,
        families: BTreeSet::new(),
        route_refresh: false,
        extended_message: false,
        graceful_restart: None,
    };
    let mut any_mp = false;
    for cap in open.capabilities() {
        match cap {
            BgpCapability::FourOctetAs(c) => {
                p.four_octet = true;
                p.asn = c.asn4();
            }
            BgpCapability::MultiProtocolExtensions(m) => {
                any_mp = true;
                if let Some(f) = family_of(m.address_type()) {
                    p.families.insert(f);
                }
            }
            BgpCapability::RouteRefresh
            | BgpCapability::EnhancedRouteRefresh
            | BgpCapability::CiscoRouteRefresh => p.route_refresh = true,
            BgpCapability::ExtendedMessage => p.extended_message = true,
            BgpCapability::GracefulRestartCapability(g) => {
                let fams = g
                    .address_families()
                    .iter()
                    .filter_map(|af| {
                        family_of(af.address_type()).map(|f| (f, af.forwarding_state()))
                    })
                    .collect();
                p.graceful_restart = Some((g.time(), g.restart(), fams));
            }
            _ => {}
        }
    }
    // RFC 4760 §8: a peer without multiprotocol capabilities speaks IPv4 unicast.
    if !any_mp {
        p.families.insert(Family::Ipv4);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::framing::{decode, encode, parsing_context};
    use crate::wire::iana::AS_TRANS;

    #[test]
    fn open_roundtrip_and_checks() {
        let p = OpenParams {
            asn: 4_200_000_001,
            hold_time: 9,
            router_id: "192.0.2.1".parse().unwrap(),
            families: vec![Family::Ipv4, Family::Ipv6],
            graceful_restart: Some(GracefulRestart {
                restart_time: 120,
                restarting: true,
                forwarding: true,
            }),
            extended_message: true,
        };
        let bytes = encode(&build_open(&p));
        let mut ctx = parsing_context(true);
        let (m, _) = decode(&bytes, &mut ctx).unwrap();
        let BgpMessage::Open(o) = m else { panic!() };
        assert_eq!(o.my_as() as u32, AS_TRANS);
        let po = check_open(&o, 4_200_000_001, "192.0.2.2".parse().unwrap(), true).unwrap();
        assert!(po.four_octet && po.extended_message && po.route_refresh);
        assert_eq!(po.families.len(), 2);
        assert_eq!(
            po.graceful_restart,
            Some((120, true, vec![(Family::Ipv4, true), (Family::Ipv6, true)]))
        );
        assert_eq!(
            check_open(&o, 65000, "192.0.2.2".parse().unwrap(), true)
                .unwrap_err()
                .error,
            OpenMessageError::BadPeerAs.into()
        );
        assert_eq!(
            check_open(&o, 4_200_000_001, "192.0.2.1".parse().unwrap(), true)
                .unwrap_err()
                .error,
            OpenMessageError::BadBgpIdentifier.into()
        );
    }
}
