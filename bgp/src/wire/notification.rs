//! NOTIFICATION (RFC 4271 §4.5 and §6): the error codes and subcodes as
//! enums with the RFCs' names, the `Notify` a session sends, and the
//! description of one it receives.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | Error code    | Error subcode |   Data (variable)             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::notification as ng;
use std::fmt;

/// The error code of a NOTIFICATION with its subcode (RFC 4271 §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: Message Header Error (§6.1).
    MessageHeader(MessageHeaderError),
    /// 2: OPEN Message Error (§6.2).
    OpenMessage(OpenMessageError),
    /// 3: UPDATE Message Error (§6.3).
    UpdateMessage(UpdateMessageError),
    /// 4: Hold Timer Expired (§6.5); it has no subcodes.
    HoldTimerExpired,
    /// 5: Finite State Machine Error (§6.6; subcodes RFC 6608).
    FiniteStateMachine(FsmError),
    /// 6: Cease (§6.7; subcodes RFC 4486).
    Cease(Cease),
    /// 7: ROUTE-REFRESH Message Error (RFC 7313 §5).
    RouteRefresh(RouteRefreshError),
}

/// Message Header Error subcodes (RFC 4271 §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageHeaderError {
    Unspecific = 0,
    ConnectionNotSynchronized = 1,
    BadMessageLength = 2,
    BadMessageType = 3,
}

/// OPEN Message Error subcodes (RFC 4271 §4.5, RFC 5492 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpenMessageError {
    Unspecific = 0,
    UnsupportedVersionNumber = 1,
    BadPeerAs = 2,
    BadBgpIdentifier = 3,
    UnsupportedOptionalParameter = 4,
    UnacceptableHoldTime = 6,
    UnsupportedCapability = 7,
}

/// UPDATE Message Error subcodes (RFC 4271 §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum UpdateMessageError {
    Unspecific = 0,
    MalformedAttributeList = 1,
    UnrecognizedWellKnownAttribute = 2,
    MissingWellKnownAttribute = 3,
    AttributeFlagsError = 4,
    AttributeLengthError = 5,
    InvalidOriginAttribute = 6,
    InvalidNextHopAttribute = 8,
    OptionalAttributeError = 9,
    InvalidNetworkField = 10,
    MalformedAsPath = 11,
}

/// Finite State Machine Error subcodes (RFC 6608 §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FsmError {
    Unspecified = 0,
    UnexpectedMessageInOpenSent = 1,
    UnexpectedMessageInOpenConfirm = 2,
    UnexpectedMessageInEstablished = 3,
}

/// Cease subcodes (RFC 4486 §4, RFC 8538 for Hard Reset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Cease {
    /// No subcode we name (a peer's); we never send it.
    Unspecific = 0,
    MaximumNumberOfPrefixesReached = 1,
    AdministrativeShutdown = 2,
    PeerDeconfigured = 3,
    AdministrativeReset = 4,
    ConnectionRejected = 5,
    OtherConfigurationChange = 6,
    ConnectionCollisionResolution = 7,
    OutOfResources = 8,
    HardReset = 9,
}

/// ROUTE-REFRESH Message Error subcodes (RFC 7313 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RouteRefreshError {
    InvalidMessageLength = 1,
}

macro_rules! into_error_code {
    ($($sub:ident => $variant:ident),*) => {$(
        impl From<$sub> for ErrorCode {
            fn from(s: $sub) -> ErrorCode {
                ErrorCode::$variant(s)
            }
        }
    )*};
}

into_error_code!(
    MessageHeaderError => MessageHeader,
    OpenMessageError => OpenMessage,
    UpdateMessageError => UpdateMessage,
    FsmError => FiniteStateMachine,
    Cease => Cease,
    RouteRefreshError => RouteRefresh
);

impl ErrorCode {
    pub fn code(self) -> u8 {
        match self {
            ErrorCode::MessageHeader(_) => 1,
            ErrorCode::OpenMessage(_) => 2,
            ErrorCode::UpdateMessage(_) => 3,
            ErrorCode::HoldTimerExpired => 4,
            ErrorCode::FiniteStateMachine(_) => 5,
            ErrorCode::Cease(_) => 6,
            ErrorCode::RouteRefresh(_) => 7,
        }
    }

    pub fn subcode(self) -> u8 {
        match self {
            ErrorCode::MessageHeader(s) => s as u8,
            ErrorCode::OpenMessage(s) => s as u8,
            ErrorCode::UpdateMessage(s) => s as u8,
            ErrorCode::HoldTimerExpired => 0,
            ErrorCode::FiniteStateMachine(s) => s as u8,
            ErrorCode::Cease(s) => s as u8,
            ErrorCode::RouteRefresh(s) => s as u8,
        }
    }

    /// The code and subcode of a received NOTIFICATION. A subcode we do not
    /// name becomes the code's unspecific one; `None` for an unknown code.
    pub fn from_parts(code: u8, subcode: u8) -> Option<ErrorCode> {
        use ErrorCode as C;
        Some(match code {
            1 => C::MessageHeader(match subcode {
                1 => MessageHeaderError::ConnectionNotSynchronized,
                2 => MessageHeaderError::BadMessageLength,
                3 => MessageHeaderError::BadMessageType,
                _ => MessageHeaderError::Unspecific,
            }),
            2 => C::OpenMessage(match subcode {
                1 => OpenMessageError::UnsupportedVersionNumber,
                2 => OpenMessageError::BadPeerAs,
                3 => OpenMessageError::BadBgpIdentifier,
                4 => OpenMessageError::UnsupportedOptionalParameter,
                6 => OpenMessageError::UnacceptableHoldTime,
                7 => OpenMessageError::UnsupportedCapability,
                _ => OpenMessageError::Unspecific,
            }),
            3 => C::UpdateMessage(update_subcode(subcode)),
            4 => C::HoldTimerExpired,
            5 => C::FiniteStateMachine(match subcode {
                1 => FsmError::UnexpectedMessageInOpenSent,
                2 => FsmError::UnexpectedMessageInOpenConfirm,
                3 => FsmError::UnexpectedMessageInEstablished,
                _ => FsmError::Unspecified,
            }),
            6 => C::Cease(cease_subcode(subcode)),
            7 => C::RouteRefresh(RouteRefreshError::InvalidMessageLength),
            _ => return None,
        })
    }

    /// The error a received NOTIFICATION reports (see `from_parts`).
    pub fn of_message(n: &ng::BgpNotificationMessage) -> Option<ErrorCode> {
        let (code, subcode, _) = parts(n);
        ErrorCode::from_parts(code, subcode)
    }

    /// The name in logs and the session table: the code's name, and the
    /// subcode's where RFC 4271 §4.5 and RFC 4486 give one.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MessageHeader(s) => header_name(s),
            ErrorCode::OpenMessage(s) => open_name(s),
            ErrorCode::UpdateMessage(s) => update_name(s),
            ErrorCode::HoldTimerExpired => "Hold Timer Expired",
            ErrorCode::FiniteStateMachine(_) => "Finite State Machine Error",
            ErrorCode::Cease(s) => cease_name(s),
            ErrorCode::RouteRefresh(_) => "ROUTE-REFRESH Message Error",
        }
    }
}

fn update_subcode(subcode: u8) -> UpdateMessageError {
    use UpdateMessageError as U;
    match subcode {
        1 => U::MalformedAttributeList,
        2 => U::UnrecognizedWellKnownAttribute,
        3 => U::MissingWellKnownAttribute,
        4 => U::AttributeFlagsError,
        5 => U::AttributeLengthError,
        6 => U::InvalidOriginAttribute,
        8 => U::InvalidNextHopAttribute,
        9 => U::OptionalAttributeError,
        10 => U::InvalidNetworkField,
        11 => U::MalformedAsPath,
        _ => U::Unspecific,
    }
}

fn cease_subcode(subcode: u8) -> Cease {
    match subcode {
        1 => Cease::MaximumNumberOfPrefixesReached,
        2 => Cease::AdministrativeShutdown,
        3 => Cease::PeerDeconfigured,
        4 => Cease::AdministrativeReset,
        5 => Cease::ConnectionRejected,
        6 => Cease::OtherConfigurationChange,
        7 => Cease::ConnectionCollisionResolution,
        8 => Cease::OutOfResources,
        9 => Cease::HardReset,
        _ => Cease::Unspecific,
    }
}

fn header_name(s: MessageHeaderError) -> &'static str {
    match s {
        MessageHeaderError::Unspecific => "Message Header Error",
        MessageHeaderError::ConnectionNotSynchronized => {
            "Message Header Error / Connection Not Synchronized"
        }
        MessageHeaderError::BadMessageLength => "Message Header Error / Bad Message Length",
        MessageHeaderError::BadMessageType => "Message Header Error / Bad Message Type",
    }
}

fn open_name(s: OpenMessageError) -> &'static str {
    use OpenMessageError as O;
    match s {
        O::Unspecific => "OPEN Message Error",
        O::UnsupportedVersionNumber => "OPEN Message Error / Unsupported Version Number",
        O::BadPeerAs => "OPEN Message Error / Bad Peer AS",
        O::BadBgpIdentifier => "OPEN Message Error / Bad BGP Identifier",
        O::UnsupportedOptionalParameter => "OPEN Message Error / Unsupported Optional Parameter",
        O::UnacceptableHoldTime => "OPEN Message Error / Unacceptable Hold Time",
        O::UnsupportedCapability => "OPEN Message Error / Unsupported Capability",
    }
}

fn update_name(s: UpdateMessageError) -> &'static str {
    use UpdateMessageError as U;
    match s {
        U::Unspecific => "UPDATE Message Error",
        U::MalformedAttributeList => "UPDATE Message Error / Malformed Attribute List",
        U::UnrecognizedWellKnownAttribute => {
            "UPDATE Message Error / Unrecognized Well-known Attribute"
        }
        U::MissingWellKnownAttribute => "UPDATE Message Error / Missing Well-known Attribute",
        U::AttributeFlagsError => "UPDATE Message Error / Attribute Flags Error",
        U::AttributeLengthError => "UPDATE Message Error / Attribute Length Error",
        U::InvalidOriginAttribute => "UPDATE Message Error / Invalid ORIGIN Attribute",
        U::InvalidNextHopAttribute => "UPDATE Message Error / Invalid NEXT_HOP Attribute",
        U::OptionalAttributeError => "UPDATE Message Error / Optional Attribute Error",
        U::InvalidNetworkField => "UPDATE Message Error / Invalid Network Field",
        U::MalformedAsPath => "UPDATE Message Error / Malformed AS_PATH",
    }
}

fn cease_name(s: Cease) -> &'static str {
    match s {
        Cease::Unspecific => "Cease",
        Cease::MaximumNumberOfPrefixesReached => "Cease / Maximum Number of Prefixes Reached",
        Cease::AdministrativeShutdown => "Cease / Administrative Shutdown",
        Cease::PeerDeconfigured => "Cease / Peer De-configured",
        Cease::AdministrativeReset => "Cease / Administrative Reset",
        Cease::ConnectionRejected => "Cease / Connection Rejected",
        Cease::OtherConfigurationChange => "Cease / Other Configuration Change",
        Cease::ConnectionCollisionResolution => "Cease / Connection Collision Resolution",
        Cease::OutOfResources => "Cease / Out of Resources",
        Cease::HardReset => "Cease / Hard Reset",
    }
}

/// A NOTIFICATION we must send (and why, for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    pub error: ErrorCode,
    pub data: Vec<u8>,
    pub reason: String,
}

impl Notify {
    pub fn new(error: impl Into<ErrorCode>, data: Vec<u8>, reason: impl Into<String>) -> Notify {
        Notify {
            error: error.into(),
            data,
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> u8 {
        self.error.code()
    }

    pub fn subcode(&self) -> u8 {
        self.error.subcode()
    }

    /// Cease / Administrative Shutdown with an RFC 9003 message (at most 255 octets of UTF-8).
    pub fn admin_shutdown(message: &str) -> Notify {
        Notify::new(
            Cease::AdministrativeShutdown,
            shutdown_data(message),
            format!("administrative shutdown: {message}"),
        )
    }

    pub fn to_message(&self) -> BgpMessage {
        BgpMessage::Notification(to_netgauze(self.error, &self.data))
    }
}

impl fmt::Display for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}/{}): {}",
            self.error.name(),
            self.code(),
            self.subcode(),
            self.reason
        )
    }
}

/// RFC 9003 §2: length octet then UTF-8, truncated on a character boundary.
fn shutdown_data(message: &str) -> Vec<u8> {
    let mut end = message.len().min(255);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut d = vec![end as u8];
    d.extend_from_slice(&message.as_bytes()[..end]);
    d
}

/// netgauze's NOTIFICATION for an error code and its data.
fn to_netgauze(error: ErrorCode, data: &[u8]) -> ng::BgpNotificationMessage {
    let value: Box<[u8]> = data.into();
    use ng::BgpNotificationMessage as N;
    match error {
        ErrorCode::MessageHeader(s) => N::MessageHeaderError(match s {
            MessageHeaderError::Unspecific => ng::MessageHeaderError::Unspecific { value },
            MessageHeaderError::ConnectionNotSynchronized => {
                ng::MessageHeaderError::ConnectionNotSynchronized { value }
            }
            MessageHeaderError::BadMessageLength => {
                ng::MessageHeaderError::BadMessageLength { value }
            }
            MessageHeaderError::BadMessageType => ng::MessageHeaderError::BadMessageType { value },
        }),
        ErrorCode::OpenMessage(s) => N::OpenMessageError(open_to_netgauze(s, value)),
        ErrorCode::UpdateMessage(s) => N::UpdateMessageError(update_to_netgauze(s, value)),
        ErrorCode::HoldTimerExpired => {
            N::HoldTimerExpiredError(ng::HoldTimerExpiredError::Unspecific { sub_code: 0, value })
        }
        ErrorCode::FiniteStateMachine(s) => N::FiniteStateMachineError(match s {
            FsmError::Unspecified => ng::FiniteStateMachineError::Unspecific { value },
            FsmError::UnexpectedMessageInOpenSent => {
                ng::FiniteStateMachineError::ReceiveUnexpectedMessageInOpenSentState { value }
            }
            FsmError::UnexpectedMessageInOpenConfirm => {
                ng::FiniteStateMachineError::ReceiveUnexpectedMessageInOpenConfirmState { value }
            }
            FsmError::UnexpectedMessageInEstablished => {
                ng::FiniteStateMachineError::ReceiveUnexpectedMessageInEstablishedState { value }
            }
        }),
        ErrorCode::Cease(s) => N::CeaseError(cease_to_netgauze(s, value)),
        ErrorCode::RouteRefresh(RouteRefreshError::InvalidMessageLength) => {
            N::RouteRefreshError(ng::RouteRefreshError::InvalidMessageLength { value })
        }
    }
}

fn open_to_netgauze(s: OpenMessageError, value: Box<[u8]>) -> ng::OpenMessageError {
    use OpenMessageError as O;
    match s {
        O::Unspecific => ng::OpenMessageError::Unspecific { value },
        O::UnsupportedVersionNumber => ng::OpenMessageError::UnsupportedVersionNumber { value },
        O::BadPeerAs => ng::OpenMessageError::BadPeerAs { value },
        O::BadBgpIdentifier => ng::OpenMessageError::BadBgpIdentifier { value },
        O::UnsupportedOptionalParameter => {
            ng::OpenMessageError::UnsupportedOptionalParameter { value }
        }
        O::UnacceptableHoldTime => ng::OpenMessageError::UnacceptableHoldTime { value },
        O::UnsupportedCapability => ng::OpenMessageError::UnsupportedCapability { value },
    }
}

fn update_to_netgauze(s: UpdateMessageError, value: Box<[u8]>) -> ng::UpdateMessageError {
    use UpdateMessageError as U;
    use ng::UpdateMessageError as G;
    match s {
        U::Unspecific => G::Unspecific { value },
        U::MalformedAttributeList => G::MalformedAttributeList { value },
        U::UnrecognizedWellKnownAttribute => G::UnrecognizedWellKnownAttribute { value },
        U::MissingWellKnownAttribute => G::MissingWellKnownAttribute { value },
        U::AttributeFlagsError => G::AttributeFlagsError { value },
        U::AttributeLengthError => G::AttributeLengthError { value },
        U::InvalidOriginAttribute => G::InvalidOriginAttribute { value },
        U::InvalidNextHopAttribute => G::InvalidNextHopAttribute { value },
        U::OptionalAttributeError => G::OptionalAttributeError { value },
        U::InvalidNetworkField => G::InvalidNetworkField { value },
        U::MalformedAsPath => G::MalformedAsPath { value },
    }
}

fn cease_to_netgauze(s: Cease, value: Box<[u8]>) -> ng::CeaseError {
    use ng::CeaseError as G;
    match s {
        Cease::MaximumNumberOfPrefixesReached => G::MaximumNumberOfPrefixesReached { value },
        // netgauze has no unspecific Cease; we never send one.
        Cease::AdministrativeShutdown | Cease::Unspecific => G::AdministrativeShutdown { value },
        Cease::PeerDeconfigured => G::PeerDeConfigured { value },
        Cease::AdministrativeReset => G::AdministrativeReset { value },
        Cease::ConnectionRejected => G::ConnectionRejected { value },
        Cease::OtherConfigurationChange => G::OtherConfigurationChange { value },
        Cease::ConnectionCollisionResolution => G::ConnectionCollisionResolution { value },
        Cease::OutOfResources => G::OutOfResources { value },
        Cease::HardReset => G::HardReset { value },
    }
}

/// Code, subcode and data of a NOTIFICATION as they were on the wire.
pub(super) fn parts(n: &ng::BgpNotificationMessage) -> (u8, u8, &[u8]) {
    use ng::BgpNotificationMessage as N;
    match n {
        N::MessageHeaderError(e) => header_parts(e),
        N::OpenMessageError(e) => open_parts(e),
        N::UpdateMessageError(e) => update_parts(e),
        N::HoldTimerExpiredError(ng::HoldTimerExpiredError::Unspecific { sub_code, value }) => {
            (4, *sub_code, value)
        }
        N::FiniteStateMachineError(e) => fsm_parts(e),
        N::CeaseError(e) => cease_parts(e),
        N::RouteRefreshError(ng::RouteRefreshError::InvalidMessageLength { value }) => {
            (7, 1, value)
        }
    }
}

fn header_parts(e: &ng::MessageHeaderError) -> (u8, u8, &[u8]) {
    use ng::MessageHeaderError as G;
    match e {
        G::Unspecific { value } => (1, 0, value),
        G::ConnectionNotSynchronized { value } => (1, 1, value),
        G::BadMessageLength { value } => (1, 2, value),
        G::BadMessageType { value } => (1, 3, value),
    }
}

fn open_parts(e: &ng::OpenMessageError) -> (u8, u8, &[u8]) {
    use ng::OpenMessageError as G;
    match e {
        G::Unspecific { value } => (2, 0, value),
        G::UnsupportedVersionNumber { value } => (2, 1, value),
        G::BadPeerAs { value } => (2, 2, value),
        G::BadBgpIdentifier { value } => (2, 3, value),
        G::UnsupportedOptionalParameter { value } => (2, 4, value),
        G::UnacceptableHoldTime { value } => (2, 6, value),
        G::UnsupportedCapability { value } => (2, 7, value),
        G::RoleMismatch { value } => (2, 11, value),
    }
}

fn update_parts(e: &ng::UpdateMessageError) -> (u8, u8, &[u8]) {
    use ng::UpdateMessageError as G;
    match e {
        G::Unspecific { value } => (3, 0, value),
        G::MalformedAttributeList { value } => (3, 1, value),
        G::UnrecognizedWellKnownAttribute { value } => (3, 2, value),
        G::MissingWellKnownAttribute { value } => (3, 3, value),
        G::AttributeFlagsError { value } => (3, 4, value),
        G::AttributeLengthError { value } => (3, 5, value),
        G::InvalidOriginAttribute { value } => (3, 6, value),
        G::InvalidNextHopAttribute { value } => (3, 8, value),
        G::OptionalAttributeError { value } => (3, 9, value),
        G::InvalidNetworkField { value } => (3, 10, value),
        G::MalformedAsPath { value } => (3, 11, value),
    }
}

fn fsm_parts(e: &ng::FiniteStateMachineError) -> (u8, u8, &[u8]) {
    use ng::FiniteStateMachineError as G;
    match e {
        G::Unspecific { value } => (5, 0, value),
        G::ReceiveUnexpectedMessageInOpenSentState { value } => (5, 1, value),
        G::ReceiveUnexpectedMessageInOpenConfirmState { value } => (5, 2, value),
        G::ReceiveUnexpectedMessageInEstablishedState { value } => (5, 3, value),
    }
}

fn cease_parts(e: &ng::CeaseError) -> (u8, u8, &[u8]) {
    use ng::CeaseError as G;
    match e {
        G::MaximumNumberOfPrefixesReached { value } => (6, 1, value),
        G::AdministrativeShutdown { value } => (6, 2, value),
        G::PeerDeConfigured { value } => (6, 3, value),
        G::AdministrativeReset { value } => (6, 4, value),
        G::ConnectionRejected { value } => (6, 5, value),
        G::OtherConfigurationChange { value } => (6, 6, value),
        G::ConnectionCollisionResolution { value } => (6, 7, value),
        G::OutOfResources { value } => (6, 8, value),
        G::HardReset { value } => (6, 9, value),
        G::BfdDown { value } => (6, 10, value),
    }
}

/// Describe a received NOTIFICATION: code, subcode, and the RFC 9003 shutdown
/// message when there is one.
pub fn describe_notification(n: &ng::BgpNotificationMessage) -> String {
    let (code, sub, value) = parts(n);
    let error = ErrorCode::from_parts(code, sub);
    let name = error.map_or("Unknown error", ErrorCode::name);
    let mut s = format!("{name} ({code}/{sub})");
    // RFC 9003 §2: these two may carry the operator's message.
    let with_message = matches!(
        error,
        Some(ErrorCode::Cease(
            Cease::AdministrativeShutdown | Cease::AdministrativeReset
        ))
    );
    if with_message && !value.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::framing::{decode, encode, parsing_context};

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
    fn every_code_we_send_survives_the_wire() {
        let all: Vec<ErrorCode> = (1..=7)
            .flat_map(|c| (0..=12).filter_map(move |s| ErrorCode::from_parts(c, s)))
            .filter(|e| *e != ErrorCode::Cease(Cease::Unspecific))
            .collect();
        for e in all {
            let bytes = encode(&Notify::new(e, vec![1, 2], "x").to_message());
            // 19-octet header, then code and subcode (RFC 4271 §4.5).
            assert_eq!((bytes[19], bytes[20]), (e.code(), e.subcode()), "{e:?}");
            let (m, _) = decode(&bytes, &mut parsing_context(true)).unwrap();
            let BgpMessage::Notification(n) = m else {
                panic!()
            };
            assert_eq!(parts(&n), (e.code(), e.subcode(), &[1u8, 2][..]), "{e:?}");
            assert!(describe_notification(&n).starts_with(e.name()));
        }
    }

    #[test]
    fn names_follow_the_rfcs() {
        let n = Notify::new(Cease::PeerDeconfigured, vec![], "bye");
        assert_eq!(n.to_string(), "Cease / Peer De-configured (6/3): bye");
        let n = Notify::new(FsmError::UnexpectedMessageInOpenSent, vec![], "x");
        assert_eq!(n.to_string(), "Finite State Machine Error (5/1): x");
        assert_eq!(
            ErrorCode::from_parts(6, 10).map(ErrorCode::name),
            Some("Cease")
        );
        assert_eq!(ErrorCode::from_parts(8, 0), None);
    }
}
