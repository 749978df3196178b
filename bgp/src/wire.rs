//! The wire format: framing, and conversion between netgauze's message types
//! and ours. Every rule a router judges us by on the wire lives here: the
//! NOTIFICATION codes for header, OPEN and UPDATE errors (RFC 4271 §6), the
//! revised UPDATE error handling (RFC 7606), 4-octet AS numbers with AS_TRANS
//! and AS4_PATH for 2-octet peers (RFC 6793), and extended messages (RFC 8654).

use crate::attrs::{AsSegment, Family, Origin, PathAttrs, SegmentKind, UnknownAttr};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::capabilities::{
    BgpCapability, FourOctetAsCapability, GracefulRestartAddressFamily, GracefulRestartCapability,
    MultiProtocolExtensionsCapability,
};
use netgauze_bgp_pkt::community::{Community, LargeCommunity};
use netgauze_bgp_pkt::nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress};
use netgauze_bgp_pkt::notification::{
    BgpNotificationMessage, CeaseError, FiniteStateMachineError, HoldTimerExpiredError,
    MessageHeaderError, OpenMessageError, RouteRefreshError, UpdateMessageError,
};
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use netgauze_bgp_pkt::path_attribute::{
    As2PathSegment, As4Aggregator, As4Path, As4PathSegment, AsPath, AsPathSegmentType,
    AtomicAggregate, ClusterId, ClusterList, Communities, LargeCommunities, LocalPreference,
    MpReach, MpUnreach, MultiExitDiscriminator, NextHop, Originator, PathAttribute,
    PathAttributeValue, UnknownAttribute,
};
use netgauze_bgp_pkt::route_refresh::BgpRouteRefreshMessage;
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_bgp_pkt::wire::deserializer::path_attribute::PathAttributeParsingError;
use netgauze_bgp_pkt::wire::deserializer::{BgpParsingContext, BgpParsingIgnoredErrors};
use netgauze_iana::address_family::AddressType;
use netgauze_parse_utils::WritablePdu;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const HEADER_LEN: usize = 19;
/// RFC 4271 §4.1.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// RFC 8654: only once both sides advertised the Extended Message capability.
pub const MAX_EXTENDED_MESSAGE_LEN: usize = 65535;
/// RFC 6793 §9.
pub const AS_TRANS: u32 = 23456;

const AS4_AGGREGATOR: u8 = 18;

/// A NOTIFICATION we must send (and why, for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
    pub reason: String,
}

impl Notify {
    pub fn new(code: u8, subcode: u8, data: Vec<u8>, reason: impl Into<String>) -> Notify {
        Notify {
            code,
            subcode,
            data,
            reason: reason.into(),
        }
    }

    /// Cease / Administrative Shutdown with an RFC 9003 message (at most 255 octets of UTF-8).
    pub fn admin_shutdown(message: &str) -> Notify {
        Notify::new(
            6,
            2,
            shutdown_data(message),
            format!("administrative shutdown: {message}"),
        )
    }

    pub fn to_message(&self) -> BgpMessage {
        BgpMessage::Notification(notification(self.code, self.subcode, &self.data))
    }
}

impl fmt::Display for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}/{}): {}",
            code_name(self.code, self.subcode),
            self.code,
            self.subcode,
            self.reason
        )
    }
}

fn shutdown_data(message: &str) -> Vec<u8> {
    // RFC 9003 §2: length octet then UTF-8, truncated on a character boundary.
    let mut end = message.len().min(255);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut d = vec![end as u8];
    d.extend_from_slice(&message.as_bytes()[..end]);
    d
}

/// Human name of a NOTIFICATION code/subcode (RFC 4271 §4.5, RFC 4486).
pub fn code_name(code: u8, subcode: u8) -> &'static str {
    match (code, subcode) {
        (1, 1) => "Message Header Error / Connection Not Synchronized",
        (1, 2) => "Message Header Error / Bad Message Length",
        (1, 3) => "Message Header Error / Bad Message Type",
        (1, _) => "Message Header Error",
        (2, 1) => "OPEN Message Error / Unsupported Version Number",
        (2, 2) => "OPEN Message Error / Bad Peer AS",
        (2, 3) => "OPEN Message Error / Bad BGP Identifier",
        (2, 4) => "OPEN Message Error / Unsupported Optional Parameter",
        (2, 6) => "OPEN Message Error / Unacceptable Hold Time",
        (2, 7) => "OPEN Message Error / Unsupported Capability",
        (2, _) => "OPEN Message Error",
        (3, 1) => "UPDATE Message Error / Malformed Attribute List",
        (3, 2) => "UPDATE Message Error / Unrecognized Well-known Attribute",
        (3, 3) => "UPDATE Message Error / Missing Well-known Attribute",
        (3, 4) => "UPDATE Message Error / Attribute Flags Error",
        (3, 5) => "UPDATE Message Error / Attribute Length Error",
        (3, 6) => "UPDATE Message Error / Invalid ORIGIN Attribute",
        (3, 8) => "UPDATE Message Error / Invalid NEXT_HOP Attribute",
        (3, 9) => "UPDATE Message Error / Optional Attribute Error",
        (3, 10) => "UPDATE Message Error / Invalid Network Field",
        (3, 11) => "UPDATE Message Error / Malformed AS_PATH",
        (3, _) => "UPDATE Message Error",
        (4, _) => "Hold Timer Expired",
        (5, _) => "Finite State Machine Error",
        (6, 1) => "Cease / Maximum Number of Prefixes Reached",
        (6, 2) => "Cease / Administrative Shutdown",
        (6, 3) => "Cease / Peer De-configured",
        (6, 4) => "Cease / Administrative Reset",
        (6, 5) => "Cease / Connection Rejected",
        (6, 6) => "Cease / Other Configuration Change",
        (6, 7) => "Cease / Connection Collision Resolution",
        (6, 8) => "Cease / Out of Resources",
        (6, 9) => "Cease / Hard Reset",
        (6, _) => "Cease",
        (7, _) => "ROUTE-REFRESH Message Error",
        _ => "Unknown error",
    }
}

/// Build netgauze's NOTIFICATION from code, subcode and data.
pub fn notification(code: u8, subcode: u8, data: &[u8]) -> BgpNotificationMessage {
    let value: Box<[u8]> = data.into();
    use BgpNotificationMessage as N;
    match code {
        1 => N::MessageHeaderError(match subcode {
            1 => MessageHeaderError::ConnectionNotSynchronized { value },
            2 => MessageHeaderError::BadMessageLength { value },
            3 => MessageHeaderError::BadMessageType { value },
            _ => MessageHeaderError::Unspecific { value },
        }),
        2 => N::OpenMessageError(match subcode {
            1 => OpenMessageError::UnsupportedVersionNumber { value },
            2 => OpenMessageError::BadPeerAs { value },
            3 => OpenMessageError::BadBgpIdentifier { value },
            4 => OpenMessageError::UnsupportedOptionalParameter { value },
            6 => OpenMessageError::UnacceptableHoldTime { value },
            7 => OpenMessageError::UnsupportedCapability { value },
            _ => OpenMessageError::Unspecific { value },
        }),
        3 => N::UpdateMessageError(match subcode {
            1 => UpdateMessageError::MalformedAttributeList { value },
            2 => UpdateMessageError::UnrecognizedWellKnownAttribute { value },
            3 => UpdateMessageError::MissingWellKnownAttribute { value },
            4 => UpdateMessageError::AttributeFlagsError { value },
            5 => UpdateMessageError::AttributeLengthError { value },
            6 => UpdateMessageError::InvalidOriginAttribute { value },
            8 => UpdateMessageError::InvalidNextHopAttribute { value },
            9 => UpdateMessageError::OptionalAttributeError { value },
            10 => UpdateMessageError::InvalidNetworkField { value },
            11 => UpdateMessageError::MalformedAsPath { value },
            _ => UpdateMessageError::Unspecific { value },
        }),
        4 => N::HoldTimerExpiredError(HoldTimerExpiredError::Unspecific {
            sub_code: subcode,
            value,
        }),
        5 => N::FiniteStateMachineError(match subcode {
            1 => FiniteStateMachineError::ReceiveUnexpectedMessageInOpenSentState { value },
            2 => FiniteStateMachineError::ReceiveUnexpectedMessageInOpenConfirmState { value },
            3 => FiniteStateMachineError::ReceiveUnexpectedMessageInEstablishedState { value },
            _ => FiniteStateMachineError::Unspecific { value },
        }),
        7 => N::RouteRefreshError(RouteRefreshError::InvalidMessageLength { value }),
        _ => N::CeaseError(match subcode {
            1 => CeaseError::MaximumNumberOfPrefixesReached { value },
            3 => CeaseError::PeerDeConfigured { value },
            4 => CeaseError::AdministrativeReset { value },
            5 => CeaseError::ConnectionRejected { value },
            6 => CeaseError::OtherConfigurationChange { value },
            7 => CeaseError::ConnectionCollisionResolution { value },
            8 => CeaseError::OutOfResources { value },
            9 => CeaseError::HardReset { value },
            _ => CeaseError::AdministrativeShutdown { value },
        }),
    }
}

/// Code, subcode and data of a NOTIFICATION (RFC 4271 §4.5).
fn notification_parts(n: &BgpNotificationMessage) -> (u8, u8, &[u8]) {
    use BgpNotificationMessage as N;
    match n {
        N::MessageHeaderError(e) => match e {
            MessageHeaderError::Unspecific { value } => (1, 0, value),
            MessageHeaderError::ConnectionNotSynchronized { value } => (1, 1, value),
            MessageHeaderError::BadMessageLength { value } => (1, 2, value),
            MessageHeaderError::BadMessageType { value } => (1, 3, value),
        },
        N::OpenMessageError(e) => match e {
            OpenMessageError::Unspecific { value } => (2, 0, value),
            OpenMessageError::UnsupportedVersionNumber { value } => (2, 1, value),
            OpenMessageError::BadPeerAs { value } => (2, 2, value),
            OpenMessageError::BadBgpIdentifier { value } => (2, 3, value),
            OpenMessageError::UnsupportedOptionalParameter { value } => (2, 4, value),
            OpenMessageError::UnacceptableHoldTime { value } => (2, 6, value),
            OpenMessageError::UnsupportedCapability { value } => (2, 7, value),
            OpenMessageError::RoleMismatch { value } => (2, 11, value),
        },
        N::UpdateMessageError(e) => match e {
            UpdateMessageError::Unspecific { value } => (3, 0, value),
            UpdateMessageError::MalformedAttributeList { value } => (3, 1, value),
            UpdateMessageError::UnrecognizedWellKnownAttribute { value } => (3, 2, value),
            UpdateMessageError::MissingWellKnownAttribute { value } => (3, 3, value),
            UpdateMessageError::AttributeFlagsError { value } => (3, 4, value),
            UpdateMessageError::AttributeLengthError { value } => (3, 5, value),
            UpdateMessageError::InvalidOriginAttribute { value } => (3, 6, value),
            UpdateMessageError::InvalidNextHopAttribute { value } => (3, 8, value),
            UpdateMessageError::OptionalAttributeError { value } => (3, 9, value),
            UpdateMessageError::InvalidNetworkField { value } => (3, 10, value),
            UpdateMessageError::MalformedAsPath { value } => (3, 11, value),
        },
        N::HoldTimerExpiredError(HoldTimerExpiredError::Unspecific { sub_code, value }) => {
            (4, *sub_code, value)
        }
        N::FiniteStateMachineError(e) => match e {
            FiniteStateMachineError::Unspecific { value } => (5, 0, value),
            FiniteStateMachineError::ReceiveUnexpectedMessageInOpenSentState { value } => {
                (5, 1, value)
            }
            FiniteStateMachineError::ReceiveUnexpectedMessageInOpenConfirmState { value } => {
                (5, 2, value)
            }
            FiniteStateMachineError::ReceiveUnexpectedMessageInEstablishedState { value } => {
                (5, 3, value)
            }
        },
        N::CeaseError(e) => match e {
            CeaseError::MaximumNumberOfPrefixesReached { value } => (6, 1, value),
            CeaseError::AdministrativeShutdown { value } => (6, 2, value),
            CeaseError::PeerDeConfigured { value } => (6, 3, value),
            CeaseError::AdministrativeReset { value } => (6, 4, value),
            CeaseError::ConnectionRejected { value } => (6, 5, value),
            CeaseError::OtherConfigurationChange { value } => (6, 6, value),
            CeaseError::ConnectionCollisionResolution { value } => (6, 7, value),
            CeaseError::OutOfResources { value } => (6, 8, value),
            CeaseError::HardReset { value } => (6, 9, value),
            CeaseError::BfdDown { value } => (6, 10, value),
        },
        N::RouteRefreshError(RouteRefreshError::InvalidMessageLength { value }) => (7, 1, value),
    }
}

/// Describe a received NOTIFICATION: code, subcode, and the RFC 9003 shutdown
/// message when there is one.
pub fn describe_notification(n: &BgpNotificationMessage) -> String {
    let (code, sub, value) = notification_parts(n);
    let mut s = format!("{} ({code}/{sub})", code_name(code, sub));
    if code == 6 && (sub == 2 || sub == 4) && !value.is_empty() {
        let len = value[0] as usize;
        if let Some(text) = value
            .get(1..1 + len)
            .and_then(|b| std::str::from_utf8(b).ok())
        {
            s.push_str(&format!(": \"{text}\""));
        }
    }
    s
}

/// Check a buffered message header. Returns the full message length once the
/// whole message is in `buf`, `None` while more bytes are needed, or the
/// NOTIFICATION that a bad header requires (RFC 4271 §6.1).
pub fn frame(buf: &[u8], max_len: usize) -> Result<Option<usize>, Notify> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(Notify::new(1, 1, vec![], "message marker is not all ones"));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    let kind = buf[18];
    let bad_len = || {
        Notify::new(
            1,
            2,
            (len as u16).to_be_bytes().to_vec(),
            format!("bad message length {len} for type {kind}"),
        )
    };
    if !(1..=5).contains(&kind) {
        return Err(Notify::new(
            1,
            3,
            vec![kind],
            format!("unknown message type {kind}"),
        ));
    }
    let min = match kind {
        1 => 29,
        2 => 23,
        3 => 21,
        4 => 19,
        _ => 23,
    };
    // OPEN and KEEPALIVE never exceed 4096 (RFC 8654 §3).
    let max = if kind == 1 || kind == 4 {
        MAX_MESSAGE_LEN
    } else {
        max_len
    };
    if len < min || len > max || (kind == 4 && len != 19) {
        return Err(bad_len());
    }
    if buf.len() < len {
        Ok(None)
    } else {
        Ok(Some(len))
    }
}

/// A parsing context for a session. `asn4` is whether both sides advertised
/// 4-octet AS support; attribute errors are collected, not fatal, so that we
/// can apply RFC 7606 ourselves.
pub fn parsing_context(asn4: bool) -> BgpParsingContext {
    BgpParsingContext::new(
        asn4,
        HashMap::new(),
        HashMap::new(),
        true,
        true,
        false,
        false,
    )
}

/// Decode one framed message. Decoder panics are caught and turned into a
/// NOTIFICATION so one bad peer can never take the daemon down.
pub fn decode(
    msg: &[u8],
    ctx: &mut BgpParsingContext,
) -> Result<(BgpMessage, BgpParsingIgnoredErrors), Notify> {
    let kind = msg.get(18).copied().unwrap_or(0);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut reader = SliceReader::new(msg);
        let r = BgpMessage::parse(&mut reader, ctx);
        (r, ctx.reset_parsing_errors())
    }));
    match result {
        Ok((Ok(m), errs)) => Ok((m, errs)),
        Ok((Err(e), _)) => {
            let reason = e.to_string();
            let n: BgpNotificationMessage = e.into();
            let (code, sub, data) = notification_parts(&n);
            // netgauze reports a truncated UPDATE body as a generic header
            // error; RFC 4271 §6.3 calls it a malformed attribute list.
            let (code, sub) = if kind == 3 && code == 1 && sub == 0 {
                (3, 1)
            } else {
                (code, sub)
            };
            Err(Notify::new(code, sub, data.to_vec(), reason))
        }
        Err(_) => Err(Notify::new(
            if kind == 3 { 3 } else { 1 },
            if kind == 3 { 1 } else { 0 },
            vec![],
            format!("the decoder panicked on a type {kind} message; closing the session"),
        )),
    }
}

/// Serialise a message.
pub fn encode(msg: &BgpMessage) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    // Writing into a Vec only fails on values we never build (e.g. an
    // over-long attribute); such a bug must not go out on the wire silently.
    if let Err(e) = msg.write(&mut buf) {
        tracing::error!(error = ?e, "cannot encode a BGP message; sending nothing");
        buf.clear();
    }
    buf
}

pub fn keepalive() -> Vec<u8> {
    encode(&BgpMessage::KeepAlive)
}

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

fn address_type(f: Family) -> AddressType {
    match f {
        Family::Ipv4 => AddressType::Ipv4Unicast,
        Family::Ipv6 => AddressType::Ipv6Unicast,
    }
}

fn family_of(t: AddressType) -> Option<Family> {
    match t {
        AddressType::Ipv4Unicast => Some(Family::Ipv4),
        AddressType::Ipv6Unicast => Some(Family::Ipv6),
        _ => None,
    }
}

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
    let my_as = if p.asn > u16::MAX as u32 {
        AS_TRANS as u16
    } else {
        p.asn as u16
    };
    BgpMessage::Open(BgpOpenMessage::new(
        my_as,
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
    if p.asn != expected_asn {
        return Err(Notify::new(
            2,
            2,
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
            2,
            3,
            id.octets().to_vec(),
            format!("unacceptable BGP identifier {id}"),
        ));
    }
    if p.hold_time == 1 || p.hold_time == 2 {
        return Err(Notify::new(
            2,
            6,
            p.hold_time.to_be_bytes().to_vec(),
            format!("unacceptable hold time {}", p.hold_time),
        ));
    }
    Ok(p)
}

/// A decoded UPDATE in our model, after RFC 7606 handling.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Update {
    pub withdrawn: Vec<IpNet>,
    pub announced: Vec<IpNet>,
    pub attrs: PathAttrs,
    pub end_of_rib: Option<Family>,
    /// Errors handled without a reset (treat-as-withdraw, attribute discard), for the log.
    pub problems: Vec<String>,
}

enum Severity {
    Discard,
    TreatAsWithdraw,
    Reset(Notify),
}

/// RFC 7606 §7: the approach each attribute's errors take.
fn classify(err: &PathAttributeParsingError) -> Severity {
    use PathAttributeParsingError as E;
    match err {
        E::AtomicAggregateError(_)
        | E::AggregatorError(_)
        | E::OnlyToCustomerError(_)
        | E::AigpError(_)
        | E::BgpLsError(_)
        | E::SegmentIdentifierParsingError(_)
        | E::UnknownAttributeError(_) => Severity::Discard,
        E::MpReachErrorError(_) | E::MpUnreachErrorError(_) => Severity::Reset(Notify::new(
            3,
            9,
            vec![],
            format!("malformed multiprotocol attribute: {err}"),
        )),
        _ => Severity::TreatAsWithdraw,
    }
}

/// Turn a parsed UPDATE into our model. `four_octet` is whether the session
/// negotiated 4-octet AS numbers; without it, AS4_PATH and AS4_AGGREGATOR are
/// merged as RFC 6793 §4.2.3 says.
pub fn decode_update(
    msg: &BgpUpdateMessage,
    ignored: &BgpParsingIgnoredErrors,
    four_octet: bool,
    ebgp: bool,
) -> Result<Update, Notify> {
    let mut u = Update {
        end_of_rib: msg.end_of_rib().and_then(family_of),
        ..Default::default()
    };
    let mut treat_as_withdraw = false;
    for err in ignored.path_attr_errors() {
        match classify(err) {
            Severity::Discard => u
                .problems
                .push(format!("attribute discarded (RFC 7606): {err}")),
            Severity::TreatAsWithdraw => {
                treat_as_withdraw = true;
                u.problems
                    .push(format!("treat-as-withdraw (RFC 7606): {err}"));
            }
            Severity::Reset(n) => return Err(n),
        }
    }
    for w in msg.withdraw_routes() {
        u.withdrawn.push(IpNet::V4(w.network().address()));
    }
    for n in msg.nlri() {
        u.announced.push(IpNet::V4(n.network().address()));
    }
    let mut seen = BTreeSet::new();
    let mut as4_path: Option<Vec<AsSegment>> = None;
    let mut as4_aggregator: Option<(u32, Ipv4Addr)> = None;
    let mut mp_reach_seen = false;
    let mut has_origin = false;
    let mut has_as_path = false;
    let mut has_next_hop = false;
    let a = &mut u.attrs;
    for attr in msg.path_attributes() {
        let code = attr
            .path_attribute_type()
            .map(|t| t as u8)
            .unwrap_or_else(|c| c);
        if !seen.insert(code) {
            // RFC 7606 §3 g: repeated MP attributes reset, other repeats keep the first.
            if matches!(
                attr.value(),
                PathAttributeValue::MpReach(_) | PathAttributeValue::MpUnreach(_)
            ) {
                return Err(Notify::new(
                    3,
                    1,
                    vec![],
                    format!("attribute {code} appears twice"),
                ));
            }
            u.problems
                .push(format!("duplicate attribute {code} discarded (RFC 7606)"));
            continue;
        }
        match attr.value() {
            PathAttributeValue::Origin(o) => {
                has_origin = true;
                a.origin = match o {
                    netgauze_bgp_pkt::path_attribute::Origin::IGP => Origin::Igp,
                    netgauze_bgp_pkt::path_attribute::Origin::EGP => Origin::Egp,
                    netgauze_bgp_pkt::path_attribute::Origin::Incomplete => Origin::Incomplete,
                }
            }
            PathAttributeValue::AsPath(p) => {
                has_as_path = true;
                a.as_path = match p {
                    AsPath::As2PathSegments(segs) => segs
                        .iter()
                        .map(|s| AsSegment {
                            kind: seg_kind(s.segment_type()),
                            asns: s.as_numbers().iter().map(|x| *x as u32).collect(),
                        })
                        .collect(),
                    AsPath::As4PathSegments(segs) => segs
                        .iter()
                        .map(|s| AsSegment {
                            kind: seg_kind(s.segment_type()),
                            asns: s.as_numbers().to_vec(),
                        })
                        .collect(),
                }
            }
            PathAttributeValue::As4Path(p) => {
                as4_path = Some(
                    p.segments()
                        .iter()
                        .map(|s| AsSegment {
                            kind: seg_kind(s.segment_type()),
                            asns: s.as_numbers().to_vec(),
                        })
                        .collect(),
                )
            }
            PathAttributeValue::NextHop(nh) => {
                has_next_hop = true;
                a.next_hop.get_or_insert(IpAddr::V4(nh.next_hop()));
            }
            PathAttributeValue::MultiExitDiscriminator(m) => a.med = Some(m.metric()),
            // RFC 4271 §5.1.5: LOCAL_PREF from an external peer is ignored.
            PathAttributeValue::LocalPreference(l) if !ebgp => a.local_pref = Some(l.metric()),
            PathAttributeValue::AtomicAggregate(_) => a.atomic_aggregate = true,
            PathAttributeValue::Aggregator(ag) => {
                a.aggregator = Some(match ag {
                    netgauze_bgp_pkt::path_attribute::Aggregator::As2Aggregator(x) => {
                        (*x.asn() as u32, x.origin())
                    }
                    netgauze_bgp_pkt::path_attribute::Aggregator::As4Aggregator(x) => {
                        (*x.asn(), x.origin())
                    }
                })
            }
            PathAttributeValue::Communities(c) => {
                a.communities = c.communities().iter().map(|c| c.value()).collect()
            }
            PathAttributeValue::LargeCommunities(c) => {
                a.large_communities = c
                    .communities()
                    .iter()
                    .map(|c| (c.global_admin(), c.local_data1(), c.local_data2()))
                    .collect()
            }
            PathAttributeValue::Originator(o) => a.originator_id = Some(o.id()),
            PathAttributeValue::ClusterList(c) => {
                a.cluster_list = c.cluster_list().iter().map(|c| c.id()).collect()
            }
            PathAttributeValue::MpReach(r) => {
                mp_reach_seen = true;
                match r {
                    MpReach::Ipv4Unicast { next_hop, nlri, .. } => {
                        a.next_hop = Some(*next_hop);
                        u.announced
                            .extend(nlri.iter().map(|n| IpNet::V4(n.network().address())));
                    }
                    MpReach::Ipv6Unicast {
                        next_hop_global,
                        next_hop_local,
                        nlri,
                    } => {
                        a.next_hop = Some(IpAddr::V6(*next_hop_global));
                        a.next_hop_local = *next_hop_local;
                        u.announced
                            .extend(nlri.iter().map(|n| IpNet::V6(n.network().address())));
                    }
                    other => u.problems.push(format!(
                        "ignored MP_REACH_NLRI for a family we did not negotiate: {:?}",
                        other.address_type()
                    )),
                }
            }
            PathAttributeValue::MpUnreach(r) => match r {
                MpUnreach::Ipv4Unicast { nlri } => u
                    .withdrawn
                    .extend(nlri.iter().map(|n| IpNet::V4(n.network().address()))),
                MpUnreach::Ipv6Unicast { nlri } => u
                    .withdrawn
                    .extend(nlri.iter().map(|n| IpNet::V6(n.network().address()))),
                _ => u
                    .problems
                    .push("ignored MP_UNREACH_NLRI for a family we did not negotiate".into()),
            },
            PathAttributeValue::UnknownAttribute(x)
                if x.code() == AS4_AGGREGATOR && x.value().len() == 8 =>
            {
                let v = x.value();
                as4_aggregator = Some((
                    u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
                    Ipv4Addr::new(v[4], v[5], v[6], v[7]),
                ));
            }
            PathAttributeValue::UnknownAttribute(x) => {
                if !attr.optional() {
                    // RFC 4271 §6.3: an unrecognised well-known attribute.
                    return Err(Notify::new(
                        3,
                        2,
                        vec![],
                        format!("unrecognised well-known attribute {}", x.code()),
                    ));
                }
                // Optional non-transitive attributes we do not know are dropped;
                // transitive ones travel on.
                if attr.transitive() {
                    a.unknown.push(UnknownAttr {
                        code: x.code(),
                        transitive: true,
                        partial: attr.partial(),
                        value: x.value().to_vec(),
                    });
                }
            }
            _ => {}
        }
    }
    // RFC 6793 §4.2.3: rebuild the path of a 2-octet peer from AS4_PATH.
    if !four_octet {
        if let Some(p4) = as4_path {
            let len2 = a.as_path_len();
            let len4: usize = p4
                .iter()
                .map(|s| {
                    if s.kind == SegmentKind::Set {
                        1
                    } else {
                        s.asns.len()
                    }
                })
                .sum();
            if len4 <= len2 {
                let keep = len2 - len4;
                let mut merged: Vec<AsSegment> = Vec::new();
                let mut taken = 0;
                for seg in &a.as_path {
                    if taken >= keep {
                        break;
                    }
                    match seg.kind {
                        SegmentKind::Sequence => {
                            let n = (keep - taken).min(seg.asns.len());
                            merged.push(AsSegment {
                                kind: seg.kind,
                                asns: seg.asns[..n].to_vec(),
                            });
                            taken += n;
                        }
                        SegmentKind::Set => {
                            merged.push(seg.clone());
                            taken += 1;
                        }
                    }
                }
                merged.extend(p4);
                a.as_path = merged;
            } else {
                u.problems
                    .push("AS4_PATH longer than AS_PATH ignored (RFC 6793 §4.2.3)".into());
            }
        }
        if let (Some((AS_TRANS, _)), Some(ag4)) = (a.aggregator, as4_aggregator) {
            a.aggregator = Some(ag4);
        }
    }
    if !u.announced.is_empty() {
        let mut missing = Vec::new();
        if !has_origin {
            missing.push("ORIGIN");
        }
        if !has_as_path {
            missing.push("AS_PATH");
        }
        if !has_next_hop && !mp_reach_seen {
            missing.push("NEXT_HOP");
        }
        if !missing.is_empty() {
            // RFC 7606 §3 d: a missing well-known mandatory attribute is treat-as-withdraw.
            treat_as_withdraw = true;
            u.problems.push(format!(
                "treat-as-withdraw (RFC 7606): missing {}",
                missing.join(", ")
            ));
        }
    }
    if treat_as_withdraw {
        let announced = std::mem::take(&mut u.announced);
        u.withdrawn.extend(announced);
    }
    Ok(u)
}

fn seg_kind(t: AsPathSegmentType) -> SegmentKind {
    match t {
        AsPathSegmentType::AsSet => SegmentKind::Set,
        AsPathSegmentType::AsSequence => SegmentKind::Sequence,
    }
}

fn seg_type(k: SegmentKind) -> AsPathSegmentType {
    match k {
        SegmentKind::Set => AsPathSegmentType::AsSet,
        SegmentKind::Sequence => AsPathSegmentType::AsSequence,
    }
}

fn attr(
    optional: bool,
    transitive: bool,
    partial: bool,
    value: PathAttributeValue,
) -> Option<PathAttribute> {
    // Flags we choose always match the attribute's definition, so this only
    // fails on a programming error; drop the attribute rather than panic.
    // Variable-length attributes may exceed 255 octets (a packed MP_REACH_NLRI
    // always can); the Extended Length flag is always legal for them.
    let extended = matches!(
        value,
        PathAttributeValue::MpReach(_)
            | PathAttributeValue::MpUnreach(_)
            | PathAttributeValue::AsPath(_)
            | PathAttributeValue::As4Path(_)
            | PathAttributeValue::Communities(_)
            | PathAttributeValue::LargeCommunities(_)
            | PathAttributeValue::ClusterList(_)
            | PathAttributeValue::UnknownAttribute(_)
    );
    PathAttribute::from(optional, transitive, partial, extended, value).ok()
}

/// The path attributes of an UPDATE we send (without MP_REACH / NEXT_HOP).
fn encode_attrs(a: &PathAttrs, four_octet: bool, ibgp: bool) -> Vec<PathAttribute> {
    let mut out = Vec::with_capacity(8);
    out.extend(attr(
        false,
        true,
        false,
        PathAttributeValue::Origin(match a.origin {
            Origin::Igp => netgauze_bgp_pkt::path_attribute::Origin::IGP,
            Origin::Egp => netgauze_bgp_pkt::path_attribute::Origin::EGP,
            Origin::Incomplete => netgauze_bgp_pkt::path_attribute::Origin::Incomplete,
        }),
    ));
    let needs_as4 = !four_octet
        && a.as_path
            .iter()
            .any(|s| s.asns.iter().any(|x| *x > u16::MAX as u32));
    let path = if four_octet {
        AsPath::As4PathSegments(
            a.as_path
                .iter()
                .map(|s| As4PathSegment::new(seg_type(s.kind), s.asns.clone()))
                .collect(),
        )
    } else {
        AsPath::As2PathSegments(
            a.as_path
                .iter()
                .map(|s| {
                    As2PathSegment::new(
                        seg_type(s.kind),
                        s.asns
                            .iter()
                            .map(|x| {
                                if *x > u16::MAX as u32 {
                                    AS_TRANS as u16
                                } else {
                                    *x as u16
                                }
                            })
                            .collect::<Vec<u16>>(),
                    )
                })
                .collect(),
        )
    };
    out.extend(attr(false, true, false, PathAttributeValue::AsPath(path)));
    if let Some(m) = a.med {
        out.extend(attr(
            true,
            false,
            false,
            PathAttributeValue::MultiExitDiscriminator(MultiExitDiscriminator::new(m)),
        ));
    }
    if ibgp {
        out.extend(attr(
            false,
            true,
            false,
            PathAttributeValue::LocalPreference(LocalPreference::new(a.local_pref.unwrap_or(100))),
        ));
    }
    if a.atomic_aggregate {
        out.extend(attr(
            false,
            true,
            false,
            PathAttributeValue::AtomicAggregate(AtomicAggregate),
        ));
    }
    if let Some((asn, id)) = a.aggregator {
        if four_octet {
            out.extend(attr(
                true,
                true,
                false,
                PathAttributeValue::Aggregator(
                    netgauze_bgp_pkt::path_attribute::Aggregator::As4Aggregator(
                        As4Aggregator::new(asn, id),
                    ),
                ),
            ));
        } else {
            let small = if asn > u16::MAX as u32 {
                AS_TRANS as u16
            } else {
                asn as u16
            };
            out.extend(attr(
                true,
                true,
                false,
                PathAttributeValue::Aggregator(
                    netgauze_bgp_pkt::path_attribute::Aggregator::As2Aggregator(
                        netgauze_bgp_pkt::path_attribute::As2Aggregator::new(small, id),
                    ),
                ),
            ));
            if asn > u16::MAX as u32 {
                let mut v = asn.to_be_bytes().to_vec();
                v.extend_from_slice(&id.octets());
                out.extend(attr(
                    true,
                    true,
                    false,
                    PathAttributeValue::UnknownAttribute(UnknownAttribute::new(AS4_AGGREGATOR, v)),
                ));
            }
        }
    }
    if !a.communities.is_empty() {
        out.extend(attr(
            true,
            true,
            false,
            PathAttributeValue::Communities(Communities::new(
                a.communities
                    .iter()
                    .map(|c| Community::new(*c))
                    .collect::<Vec<_>>(),
            )),
        ));
    }
    if ibgp {
        if let Some(o) = a.originator_id {
            out.extend(attr(
                true,
                false,
                false,
                PathAttributeValue::Originator(Originator::new(o)),
            ));
        }
        if !a.cluster_list.is_empty() {
            out.extend(attr(
                true,
                false,
                false,
                PathAttributeValue::ClusterList(ClusterList::new(
                    a.cluster_list
                        .iter()
                        .map(|c| ClusterId::new(*c))
                        .collect::<Vec<_>>(),
                )),
            ));
        }
    }
    if needs_as4 {
        out.extend(attr(
            true,
            true,
            false,
            PathAttributeValue::As4Path(As4Path::new(
                a.as_path
                    .iter()
                    .map(|s| As4PathSegment::new(seg_type(s.kind), s.asns.clone()))
                    .collect::<Vec<_>>(),
            )),
        ));
    }
    if !a.large_communities.is_empty() {
        out.extend(attr(
            true,
            true,
            false,
            PathAttributeValue::LargeCommunities(LargeCommunities::new(
                a.large_communities
                    .iter()
                    .map(|(g, l1, l2)| LargeCommunity::new(*g, *l1, *l2))
                    .collect::<Vec<_>>(),
            )),
        ));
    }
    for x in &a.unknown {
        // RFC 4271 §5: an unrecognised optional transitive attribute is passed
        // on with the Partial bit set.
        if x.transitive {
            out.extend(attr(
                true,
                true,
                true,
                PathAttributeValue::UnknownAttribute(UnknownAttribute::new(
                    x.code,
                    x.value.clone(),
                )),
            ));
        }
    }
    out
}

/// Encode announcements of `prefixes` (all of `family`) sharing `attrs`,
/// packed into as few UPDATEs as fit in `max_len` octets.
pub fn encode_announce(
    family: Family,
    prefixes: &[IpNet],
    attrs: &PathAttrs,
    four_octet: bool,
    ibgp: bool,
    max_len: usize,
) -> Vec<Vec<u8>> {
    let base = encode_attrs(attrs, four_octet, ibgp);
    let mut out = Vec::new();
    match family {
        Family::Ipv4 => {
            let nh = match attrs.next_hop {
                Some(IpAddr::V4(a)) => a,
                _ => Ipv4Addr::UNSPECIFIED,
            };
            let mut pa = base;
            pa.extend(attr(
                false,
                true,
                false,
                PathAttributeValue::NextHop(NextHop::new(nh)),
            ));
            let empty = BgpMessage::Update(BgpUpdateMessage::new(vec![], pa.clone(), vec![]));
            let room = max_len.saturating_sub(empty.len()).max(5);
            for chunk in prefixes.chunks(room / 5) {
                let nlri: Vec<Ipv4UnicastAddress> = chunk.iter().filter_map(v4_nlri).collect();
                out.push(encode(&BgpMessage::Update(BgpUpdateMessage::new(
                    vec![],
                    pa.clone(),
                    nlri,
                ))));
            }
        }
        Family::Ipv6 => {
            let nh = match attrs.next_hop {
                Some(IpAddr::V6(a)) => a,
                Some(IpAddr::V4(a)) => a.to_ipv6_mapped(),
                None => Ipv6Addr::UNSPECIFIED,
            };
            let mp = |nlri: Vec<Ipv6UnicastAddress>| {
                let mut pa = base.clone();
                pa.extend(attr(
                    true,
                    false,
                    false,
                    PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
                        next_hop_global: nh,
                        next_hop_local: attrs.next_hop_local,
                        nlri: nlri.into(),
                    }),
                ));
                BgpMessage::Update(BgpUpdateMessage::new(vec![], pa, vec![]))
            };
            let room = max_len.saturating_sub(mp(vec![]).len()).max(17);
            for chunk in prefixes.chunks(room / 17) {
                out.push(encode(&mp(chunk.iter().filter_map(v6_nlri).collect())));
            }
        }
    }
    out
}

/// Encode withdrawals of `prefixes` (all of `family`).
pub fn encode_withdraw(family: Family, prefixes: &[IpNet], max_len: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    match family {
        Family::Ipv4 => {
            for chunk in prefixes.chunks((max_len - 23) / 5) {
                let w: Vec<Ipv4UnicastAddress> = chunk.iter().filter_map(v4_nlri).collect();
                out.push(encode(&BgpMessage::Update(BgpUpdateMessage::new(
                    w,
                    vec![],
                    vec![],
                ))));
            }
        }
        Family::Ipv6 => {
            for chunk in prefixes.chunks((max_len - 40) / 17) {
                let nlri: Vec<Ipv6UnicastAddress> = chunk.iter().filter_map(v6_nlri).collect();
                let pa: Vec<PathAttribute> = attr(
                    true,
                    false,
                    false,
                    PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast { nlri: nlri.into() }),
                )
                .into_iter()
                .collect();
                out.push(encode(&BgpMessage::Update(BgpUpdateMessage::new(
                    vec![],
                    pa,
                    vec![],
                ))));
            }
        }
    }
    out
}

/// The End-of-RIB marker of a family (RFC 4724 §2).
pub fn encode_end_of_rib(family: Family) -> Vec<u8> {
    match family {
        Family::Ipv4 => encode(&BgpMessage::Update(BgpUpdateMessage::new(
            vec![],
            vec![],
            vec![],
        ))),
        Family::Ipv6 => {
            let pa: Vec<PathAttribute> = attr(
                true,
                false,
                false,
                PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast {
                    nlri: vec![].into(),
                }),
            )
            .into_iter()
            .collect();
            encode(&BgpMessage::Update(BgpUpdateMessage::new(
                vec![],
                pa,
                vec![],
            )))
        }
    }
}

/// A ROUTE-REFRESH request (RFC 2918).
pub fn encode_route_refresh(family: Family) -> Vec<u8> {
    encode(&BgpMessage::RouteRefresh(BgpRouteRefreshMessage::new(
        address_type(family),
        netgauze_bgp_pkt::iana::RouteRefreshSubcode::NormalRequest,
    )))
}

pub fn route_refresh_family(m: &BgpRouteRefreshMessage) -> Option<Family> {
    family_of(m.address_type())
}

fn v4_nlri(p: &IpNet) -> Option<Ipv4UnicastAddress> {
    match p {
        IpNet::V4(n) => Ipv4Unicast::from_net(Ipv4Net::new(n.network(), n.prefix_len()).ok()?)
            .ok()
            .map(Ipv4UnicastAddress::new_no_path_id),
        _ => None,
    }
}

fn v6_nlri(p: &IpNet) -> Option<Ipv6UnicastAddress> {
    match p {
        IpNet::V6(n) => Ipv6Unicast::from_net(Ipv6Net::new(n.network(), n.prefix_len()).ok()?)
            .ok()
            .map(|n| Ipv6UnicastAddress::new(None, n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> PathAttrs {
        PathAttrs {
            origin: Origin::Igp,
            as_path: vec![AsSegment {
                kind: SegmentKind::Sequence,
                asns: vec![4_200_000_001, 65001],
            }],
            next_hop: Some("192.0.2.1".parse().unwrap()),
            med: Some(5),
            communities: vec![0xfde8_0001],
            large_communities: vec![(4_200_000_001, 1, 2)],
            aggregator: Some((4_200_000_001, "192.0.2.9".parse().unwrap())),
            atomic_aggregate: true,
            unknown: vec![UnknownAttr {
                code: 99,
                transitive: true,
                partial: false,
                value: vec![1, 2, 3],
            }],
            ..Default::default()
        }
    }

    fn roundtrip(bytes: &[u8], asn4: bool) -> Update {
        let len = frame(bytes, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(len, bytes.len());
        let mut ctx = parsing_context(asn4);
        let (m, errs) = decode(bytes, &mut ctx).unwrap();
        match m {
            BgpMessage::Update(u) => decode_update(&u, &errs, asn4, true).unwrap(),
            other => panic!("not an update: {other:?}"),
        }
    }

    #[test]
    fn ipv4_update_roundtrips_with_4_octet_as() {
        let p: Vec<IpNet> = vec![
            "10.1.0.0/24".parse().unwrap(),
            "10.2.0.0/26".parse().unwrap(),
        ];
        let msgs = encode_announce(Family::Ipv4, &p, &attrs(), true, false, MAX_MESSAGE_LEN);
        assert_eq!(msgs.len(), 1);
        let u = roundtrip(&msgs[0], true);
        assert_eq!(u.announced, p);
        assert_eq!(u.attrs.as_path, attrs().as_path);
        assert_eq!(u.attrs.aggregator, attrs().aggregator);
        assert_eq!(u.attrs.large_communities, attrs().large_communities);
        // The unknown transitive attribute went out with the Partial bit set.
        assert!(u.attrs.unknown[0].partial);
    }

    #[test]
    fn two_octet_peer_gets_as_trans_and_as4_path() {
        let p: Vec<IpNet> = vec!["10.1.0.0/24".parse().unwrap()];
        let msgs = encode_announce(Family::Ipv4, &p, &attrs(), false, false, MAX_MESSAGE_LEN);
        let mut ctx = parsing_context(false);
        let (m, errs) = decode(&msgs[0], &mut ctx).unwrap();
        let BgpMessage::Update(raw) = m else { panic!() };
        // On the wire the path carries AS_TRANS...
        let wire_path = raw.path_attributes().iter().find_map(|a| match a.value() {
            PathAttributeValue::AsPath(AsPath::As2PathSegments(s)) => {
                Some(s[0].as_numbers().to_vec())
            }
            _ => None,
        });
        assert_eq!(wire_path, Some(vec![AS_TRANS as u16, 65001]));
        // ...and the receiver rebuilds the real path from AS4_PATH.
        let u = decode_update(&raw, &errs, false, true).unwrap();
        assert_eq!(u.attrs.as_path_flat(), vec![4_200_000_001, 65001]);
        assert_eq!(u.attrs.aggregator, attrs().aggregator);
    }

    #[test]
    fn ipv6_update_and_withdraw_roundtrip() {
        let mut a = attrs();
        a.next_hop = Some("2001:db8::1".parse().unwrap());
        a.next_hop_local = Some("fe80::1".parse().unwrap());
        let p: Vec<IpNet> = vec!["2001:db8:100::/48".parse().unwrap()];
        let u = roundtrip(
            &encode_announce(Family::Ipv6, &p, &a, true, false, MAX_MESSAGE_LEN)[0],
            true,
        );
        assert_eq!(u.announced, p);
        assert_eq!(u.attrs.next_hop, a.next_hop);
        assert_eq!(u.attrs.next_hop_local, a.next_hop_local);
        let w = roundtrip(&encode_withdraw(Family::Ipv6, &p, MAX_MESSAGE_LEN)[0], true);
        assert_eq!(w.withdrawn, p);
        let eor = roundtrip(&encode_end_of_rib(Family::Ipv6), true);
        assert_eq!(eor.end_of_rib, Some(Family::Ipv6));
    }

    #[test]
    fn packing_splits_at_the_message_limit() {
        let p: Vec<IpNet> = (0..2000u32)
            .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap()))
            .collect();
        let msgs = encode_announce(Family::Ipv4, &p, &attrs(), true, true, MAX_MESSAGE_LEN);
        assert!(msgs.len() > 1);
        assert!(msgs.iter().all(|m| m.len() <= MAX_MESSAGE_LEN));
        let total: usize = msgs
            .iter()
            .map(|m| roundtrip(m, true).announced.len())
            .sum();
        assert_eq!(total, 2000);
        let p6: Vec<IpNet> = (0..2000u128)
            .map(|i| {
                IpNet::V6(
                    Ipv6Net::new(Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 80)), 48).unwrap(),
                )
            })
            .collect();
        let mut a6 = attrs();
        a6.next_hop = Some("2001:db8::1".parse().unwrap());
        let msgs = encode_announce(Family::Ipv6, &p6, &a6, true, true, MAX_MESSAGE_LEN);
        assert!(msgs.iter().all(|m| m.len() <= MAX_MESSAGE_LEN));
        let total: usize = msgs
            .iter()
            .map(|m| roundtrip(m, true).announced.len())
            .sum();
        assert_eq!(total, 2000);
        let w = encode_withdraw(Family::Ipv6, &p6, MAX_MESSAGE_LEN);
        let total: usize = w.iter().map(|m| roundtrip(m, true).withdrawn.len()).sum();
        assert_eq!(total, 2000);
        let big = encode_announce(
            Family::Ipv4,
            &p,
            &attrs(),
            true,
            true,
            MAX_EXTENDED_MESSAGE_LEN,
        );
        assert_eq!(big.len(), 1);
        // An extended message is refused unless negotiated.
        assert_eq!(frame(&big[0], MAX_MESSAGE_LEN).unwrap_err().subcode, 2);
        assert!(frame(&big[0], MAX_EXTENDED_MESSAGE_LEN).unwrap().is_some());
    }

    #[test]
    fn header_errors_get_their_codes() {
        let mut k = keepalive();
        k[0] = 0;
        assert_eq!(
            (
                frame(&k, 4096).unwrap_err().code,
                frame(&k, 4096).unwrap_err().subcode
            ),
            (1, 1)
        );
        let mut k = keepalive();
        k[18] = 9;
        assert_eq!(frame(&k, 4096).unwrap_err().subcode, 3);
        let mut k = keepalive();
        k[17] = 18;
        assert_eq!(frame(&k, 4096).unwrap_err().subcode, 2);
        assert_eq!(frame(&keepalive()[..10], 4096).unwrap(), None);
    }

    #[test]
    fn missing_mandatory_attribute_is_treat_as_withdraw() {
        // UPDATE with NLRI 10.0.0.0/8 but only ORIGIN.
        let mut m = vec![0xff; 16];
        let body = [0u8, 0, 0, 4, 0x40, 1, 1, 0, 8, 10];
        m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        m.push(2);
        m.extend_from_slice(&body);
        let u = roundtrip(&m, true);
        assert!(u.announced.is_empty());
        assert_eq!(u.withdrawn, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert!(u.problems[0].contains("AS_PATH"));
    }

    #[test]
    fn malformed_origin_is_treat_as_withdraw_not_a_reset() {
        let mut m = vec![0xff; 16];
        // ORIGIN value 7 (invalid), AS_PATH empty, NEXT_HOP 192.0.2.1, NLRI 10/8
        let body = [
            0u8, 0, 0, 14, 0x40, 1, 1, 7, 0x40, 2, 0, 0x40, 3, 4, 192, 0, 2, 1, 8, 10,
        ];
        m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        m.push(2);
        m.extend_from_slice(&body);
        let u = roundtrip(&m, true);
        assert!(u.announced.is_empty(), "{u:?}");
        assert_eq!(u.withdrawn.len(), 1);
    }

    #[test]
    fn decode_errors_get_update_and_open_codes() {
        // UPDATE whose path attribute length runs past the message: 3/1.
        let mut m = vec![0xff; 16];
        let body = [0u8, 0, 0, 40, 0x40, 1, 1, 0];
        m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        m.push(2);
        m.extend_from_slice(&body);
        let e = decode(&m, &mut parsing_context(true)).unwrap_err();
        assert_eq!((e.code, e.subcode), (3, 1), "{e}");
        // OPEN with BGP version 3: 2/1.
        let mut open = encode(&build_open(&OpenParams {
            asn: 65000,
            hold_time: 90,
            router_id: "192.0.2.1".parse().unwrap(),
            families: vec![Family::Ipv4],
            graceful_restart: None,
            extended_message: false,
        }));
        open[19] = 3;
        let e = decode(&open, &mut parsing_context(true)).unwrap_err();
        assert_eq!((e.code, e.subcode), (2, 1), "{e}");
    }

    #[test]
    fn admin_shutdown_carries_its_message() {
        let n = Notify::admin_shutdown("maintenance: rebooting node-3");
        let bytes = encode(&n.to_message());
        let mut ctx = parsing_context(true);
        let (m, _) = decode(&bytes, &mut ctx).unwrap();
        let BgpMessage::Notification(n) = m else {
            panic!()
        };
        assert!(describe_notification(&n).contains("\"maintenance: rebooting node-3\""));
    }

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
                .subcode,
            2
        );
        assert_eq!(
            check_open(&o, 4_200_000_001, "192.0.2.1".parse().unwrap(), true)
                .unwrap_err()
                .subcode,
            3
        );
    }
}
