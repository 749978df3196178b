//! The wire format, one file per message: `framing` (the header, splitting
//! a stream into messages), `notification` (error codes and subcodes, RFC
//! 4271 §4.5/§6), `open`, `update_screen` (RFC 7606 on the raw bytes),
//! `update_decode` (one step per attribute), `update_encode` (packing, RFC 6793 for 2-octet peers) and
//! `route_refresh`; `iana` holds the numbers they share. Every rule a router
//! judges us by on the wire lives here, and only here do netgauze's types
//! meet ours: the rest of the speaker sees `attrs::PathAttrs` and `Update`.
//!
//! The items are re-exported, so callers write `wire::decode_update`.

pub mod framing;
pub mod iana;
pub mod notification;
pub mod open;
#[cfg(test)]
mod rfc7606_tests;
pub mod route_refresh;
pub mod update_decode;
pub mod update_encode;
pub mod update_screen;

pub use framing::{
    HEADER_LEN, MAX_EXTENDED_MESSAGE_LEN, MAX_MESSAGE_LEN, MessageType, decode, encode, frame,
    keepalive, parsing_context,
};
pub use iana::AS_TRANS;
pub use notification::{
    Cease, ErrorCode, FsmError, MessageHeaderError, Notify, OpenMessageError, RouteRefreshError,
    UpdateMessageError, describe_notification,
};
pub use open::{
    GracefulRestart, OpenParams, PeerGracefulRestart, PeerOpen, build_open, check_hold_time,
    check_open,
};
pub use route_refresh::{encode_route_refresh, route_refresh_family};
pub use update_decode::{Update, decode_update, receive_update};
pub use update_encode::{encode_announce, encode_end_of_rib, encode_withdraw};
pub use update_screen::{Screen, Screened, screen_update};
