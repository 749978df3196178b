//! Framing (RFC 4271 §4.1): the 19-octet header every message starts with,
//! splitting a byte stream into messages, and handing each to netgauze's
//! decoder; the other way, serialising a message.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                                                               +
//! |                           Marker                              |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Length               |      Type     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use super::notification::{ErrorCode, MessageHeaderError, Notify, UpdateMessageError, parts};
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::notification::BgpNotificationMessage;
use netgauze_bgp_pkt::wire::deserializer::{BgpParsingContext, BgpParsingIgnoredErrors};
use netgauze_parse_utils::WritablePdu;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;
use std::collections::HashMap;

pub const HEADER_LEN: usize = 19;
/// RFC 4271 §4.1.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// RFC 8654: only once both sides advertised the Extended Message capability.
pub const MAX_EXTENDED_MESSAGE_LEN: usize = 65535;

/// The message types (RFC 4271 §4.1, RFC 2918 §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    Open = 1,
    Update = 2,
    Notification = 3,
    Keepalive = 4,
    RouteRefresh = 5,
}

impl MessageType {
    pub fn of(octet: u8) -> Option<MessageType> {
        Some(match octet {
            1 => MessageType::Open,
            2 => MessageType::Update,
            3 => MessageType::Notification,
            4 => MessageType::Keepalive,
            5 => MessageType::RouteRefresh,
            _ => return None,
        })
    }

    /// The shortest valid message of this type, header included (RFC 4271
    /// §4.2-§4.4, RFC 2918 §3).
    fn min_len(self) -> usize {
        match self {
            MessageType::Open => 29,
            MessageType::Update => 23,
            MessageType::Notification => 21,
            MessageType::Keepalive => 19,
            MessageType::RouteRefresh => 23,
        }
    }

    /// The longest: OPEN and KEEPALIVE never exceed 4096 (RFC 8654 §3), the
    /// others the session's limit.
    fn max_len(self, session_max: usize) -> usize {
        match self {
            MessageType::Open | MessageType::Keepalive => MAX_MESSAGE_LEN,
            _ => session_max,
        }
    }
}

/// Check a buffered message header. Returns the full message length once the
/// whole message is in `buf`, `None` while more bytes are needed, or the
/// NOTIFICATION that a bad header requires (RFC 4271 §6.1).
pub fn frame(buf: &[u8], max_len: usize) -> Result<Option<usize>, Notify> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(Notify::new(
            MessageHeaderError::ConnectionNotSynchronized,
            vec![],
            "message marker is not all ones",
        ));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    let kind = buf[18];
    let Some(ty) = MessageType::of(kind) else {
        return Err(Notify::new(
            MessageHeaderError::BadMessageType,
            vec![kind],
            format!("unknown message type {kind}"),
        ));
    };
    if len < ty.min_len()
        || len > ty.max_len(max_len)
        || (ty == MessageType::Keepalive && len != HEADER_LEN)
    {
        return Err(Notify::new(
            MessageHeaderError::BadMessageLength,
            (len as u16).to_be_bytes().to_vec(),
            format!("bad message length {len} for type {kind}"),
        ));
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
    let ty = msg.get(18).copied().and_then(MessageType::of);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut reader = SliceReader::new(msg);
        let r = BgpMessage::parse(&mut reader, ctx);
        (r, ctx.reset_parsing_errors())
    }));
    let kind = msg.get(18).copied().unwrap_or(0);
    let update = ty == Some(MessageType::Update);
    match result {
        Ok((Ok(m), errs)) => Ok((m, errs)),
        Ok((Err(e), _)) => {
            let reason = e.to_string();
            let n: BgpNotificationMessage = e.into();
            let (code, sub, data) = parts(&n);
            let header_unspecific = ErrorCode::MessageHeader(MessageHeaderError::Unspecific);
            let mut error = ErrorCode::from_parts(code, sub).unwrap_or(header_unspecific);
            // netgauze reports a truncated UPDATE body as a generic header
            // error; RFC 4271 §6.3 calls it a malformed attribute list.
            if update && error == header_unspecific {
                error = UpdateMessageError::MalformedAttributeList.into();
            }
            Err(Notify::new(error, data.to_vec(), reason))
        }
        Err(_) => Err(Notify::new(
            if update {
                ErrorCode::UpdateMessage(UpdateMessageError::MalformedAttributeList)
            } else {
                ErrorCode::MessageHeader(MessageHeaderError::Unspecific)
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::Family;
    use crate::wire::notification::OpenMessageError;
    use crate::wire::open::{OpenParams, build_open};

    #[test]
    fn header_errors_get_their_codes() {
        let mut k = keepalive();
        k[0] = 0;
        assert_eq!(
            frame(&k, 4096).unwrap_err().error,
            MessageHeaderError::ConnectionNotSynchronized.into()
        );
        let mut k = keepalive();
        k[18] = 9;
        assert_eq!(
            frame(&k, 4096).unwrap_err().error,
            MessageHeaderError::BadMessageType.into()
        );
        let mut k = keepalive();
        k[17] = 18;
        assert_eq!(
            frame(&k, 4096).unwrap_err().error,
            MessageHeaderError::BadMessageLength.into()
        );
        assert_eq!(frame(&keepalive()[..10], 4096).unwrap(), None);
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
        assert_eq!(
            e.error,
            UpdateMessageError::MalformedAttributeList.into(),
            "{e}"
        );
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
        assert_eq!(
            e.error,
            OpenMessageError::UnsupportedVersionNumber.into(),
            "{e}"
        );
    }
}
