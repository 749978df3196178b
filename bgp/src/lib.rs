//! Starling's BGP speaker. It knows nothing of Kubernetes or netlink: an
//! embedder (the agent, or `starling-bgpd`) configures peers and local
//! prefixes and consumes the stream of route changes.
//!
//! The modules form one-way layers (docs/architecture.md draws them); each
//! imports only from the layers before it:
//!
//! - `attrs`: our model of a path's attributes. `wire`: the messages on the
//!   wire, one file per message, converted to and from `attrs`.
//!   `policy`: import/export rules over `attrs`. `fsm`: RFC 4271 §8 as a
//!   pure function. `sockopt`: the socket options std lacks. `jsonl`:
//!   JSON-lines control sockets, with nothing of BGP in them.
//! - `config` and `report`: the public types, what the embedder tells the
//!   speaker and what it hears back.
//! - `rib`: Adj-RIBs-In, the Loc-RIB and the decision process.
//! - `sendq`: the send path's shared buffers (a session's batch of
//!   UPDATEs, its output queue), with nothing of BGP but message framing.
//! - `session`: one task per peer, driving the FSM over TCP.
//! - `export`: the export rules as pure functions.
//! - `instance`: the task that owns the peer table and the RIBs.
//! - `speaker`: the handle. `control`: `starling-bgpd`'s control socket.

pub mod attrs;
pub mod config;
pub mod control;
mod export;
pub mod fsm;
mod instance;
pub mod jsonl;
pub mod policy;
pub mod report;
pub mod rib;
pub mod sendq;
pub mod session;
pub mod sockopt;
pub mod speaker;
pub mod wire;

pub use attrs::{Family, PathAttrs};
pub use config::{
    MaxPrefixAction, MaxPrefixes, NextHopResolver, PeerConfig, PeerPolicy, SessionConfig,
    SpeakerConfig,
};
pub use report::{LearnedPath, RibSummary, RouteChange, RouteEntry, RouteEvent, SessionStatus};
pub use speaker::{Speaker, SpeakerError};

/// Entry points for the fuzz targets in `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing;
