//! What the speaker tells its embedder: the session table, the paths it
//! holds, the sizes of its tables, and the stream of best-path changes. A
//! leaf of the crate next to `config`: plain data, built by the RIB and the
//! instance, read by the agent, `starling-bgpd` and the control socket.

use crate::attrs::PathAttrs;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::sync::Arc;

/// A session's row in the session table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SessionStatus {
    pub peer: IpAddr,
    pub asn: u32,
    #[serde(rename = "type")]
    pub kind: String,
    pub state: String,
    /// Unix seconds of the last state change.
    pub since: u64,
    pub prefixes_received: usize,
    pub prefixes_sent: usize,
    pub last_error: Option<String>,
    pub description: Option<String>,
}

/// One path in the RIB, for `routes()`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RouteEntry {
    pub prefix: IpNet,
    /// Peer address, or "local" for our own prefixes.
    pub peer: String,
    pub next_hop: Option<IpAddr>,
    pub as_path: Vec<u32>,
    pub origin: String,
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
    pub communities: Vec<u32>,
    pub best: bool,
    /// Kept for a restarting peer, not yet refreshed (RFC 4724).
    pub stale: bool,
    /// In the prefix's multipath (ECMP) set.
    pub multipath: bool,
}

/// Sizes of the speaker's tables, cheap to ask for even with millions of paths.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RibSummary {
    /// Prefixes with a best path in the Loc-RIB.
    pub loc_rib_prefixes: usize,
    /// Paths held in all Adj-RIBs-In.
    pub paths: usize,
    /// Distinct interned attribute sets.
    pub attribute_sets: usize,
    pub sessions_established: usize,
    pub sessions_configured: usize,
    /// Connections refused because their source is not a configured peer.
    #[serde(default)]
    pub connections_refused: u64,
}

/// A change of the best path of a prefix learned from a peer: what an
/// embedder programs. `paths` empty means the prefix is gone.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteChange {
    pub prefix: IpNet,
    pub paths: Vec<LearnedPath>,
}

/// What the speaker tells its embedder.
#[derive(Clone, Debug, PartialEq)]
pub enum RouteEvent {
    /// The best paths of a prefix changed.
    Change(RouteChange),
    /// Every configured peer has sent End-of-RIB (or the restart time ran
    /// out): the Loc-RIB is complete, and routes the embedder holds that it
    /// has not been told about since start can go (RFC 4724 §4.1).
    Synced,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LearnedPath {
    pub peer: IpAddr,
    pub next_hop: Option<IpAddr>,
    pub attrs: Arc<PathAttrs>,
}
