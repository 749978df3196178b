//! The agent's control socket, for `starlingctl status|routes|ipam` and the
//! lab: its requests and replies, spoken as JSON lines on a root-only Unix
//! socket ([`starling_bgp::jsonl`]); the server, which answers from what the
//! event loop publishes (`Shared`) and live queries to the speaker and
//! the FIB; and [`ask`], the one client of it.

use super::ipam_ops::{IpamOps, ReleaseReport};
use super::routes::Refused;
use crate::fib::{FibStatus, Reconciler, Route};
use crate::ipam::check::CheckReport;
use crate::model::IPPoolSpec;
use crate::nat::{NatReconciler, NatStatus};
use anyhow::Context;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use starling_bgp::jsonl::{self, ErrorReply, RequestError};
use starling_bgp::{RibSummary, RouteEntry, SessionStatus, Speaker};
use starling_cni_proto::PodRoute;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Where `starlingctl` looks by default.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/starling/agent.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Routes,
    Ipam,
    /// The speaker's table sizes; the same request and reply as
    /// `starling-bgpd`'s control socket, so its tools work on the agent.
    Summary,
    /// `starlingctl ipam check`.
    IpamCheck,
    /// `starlingctl ipam release --ip ADDR [--force]`.
    IpamRelease {
        ip: IpAddr,
        #[serde(default)]
        force: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    Status(NodeStatus),
    Routes(RoutesReport),
    Ipam(IpamReport),
    Summary(RibSummary),
    IpamCheck(CheckReport),
    IpamReleased(ReleaseReport),
    Error(String),
}

impl ErrorReply for Reply {
    fn error(message: String) -> Reply {
        Reply::Error(message)
    }
}

/// What `starlingctl status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub version: String,
    /// The node's addresses as BGP uses them, and where they came from.
    pub addresses: Vec<IpNet>,
    pub address_source: String,
    pub asn: u32,
    pub router_id: Option<Ipv4Addr>,
    /// Set when this node is a route reflector.
    pub cluster_id: Option<Ipv4Addr>,
    /// "file /etc/starling/model.yaml" or "kubernetes".
    pub datastore: String,
    /// Where the other nodes' blocks come from: "bgp", or "datastore" with
    /// `bgpEnabled: false` (no BGP port, no sessions).
    #[serde(default)]
    pub route_source: String,
    /// Why the newest model was refused, when it was (the last good one is in force).
    pub datastore_error: Option<String>,
    /// Forwarding state was kept across a restart (graceful restart F bit).
    pub forwarding_preserved: bool,
    /// Every peer sent End-of-RIB since start: stale routes were removed.
    pub synced: bool,
    pub sessions: Vec<SessionStatus>,
    /// Sessions kept until their routes are learned another way (make-before-break).
    pub draining: Vec<IpAddr>,
    /// What the peering plan could not do.
    pub warnings: Vec<String>,
    pub blocks: Vec<IpNet>,
    /// The Service prefixes this node advertises (configured CIDRs and the
    /// host routes of its `externalTrafficPolicy: Local` Services).
    #[serde(default)]
    pub services: Vec<IpNet>,
    pub pods: usize,
    pub fib: FibStatus,
    /// natOutgoing: our nftables table, or why it is not in place.
    #[serde(default)]
    pub nat: NatStatus,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoutesReport {
    /// Every path in the speaker's RIB.
    pub bgp: Vec<RouteEntry>,
    /// The desired kernel routes (blackholes, pods, learned).
    pub fib: Vec<Route>,
    /// Learned prefixes kept out of the kernel, with why.
    #[serde(default)]
    pub refused: Vec<Refused>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IpamReport {
    pub node: String,
    pub pools: Vec<PoolUsage>,
    pub blocks: Vec<BlockUsage>,
    pub pods: Vec<PodRoute>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolUsage {
    pub cidr: IpNet,
    pub block_size: u8,
    /// Blocks of this pool held by this node.
    pub blocks: usize,
    /// Addresses in this node's blocks of the pool.
    pub addresses: u128,
    pub in_use: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockUsage {
    pub cidr: IpNet,
    pub addresses: u128,
    pub in_use: usize,
}

/// The number of addresses in a prefix (saturating for huge IPv6 ones).
pub fn size(net: &IpNet) -> u128 {
    let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
    1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
}

/// What the control socket shows of the node; the event loop writes it
/// after every change.
#[derive(Default)]
pub(super) struct Shared {
    pub status: NodeStatus,
    pub desired: Vec<Route>,
    /// Learned prefixes the import path refused (hijacks).
    pub refused: Vec<Refused>,
    pub pods: Vec<PodRoute>,
    pub pools: Vec<IPPoolSpec>,
}

/// The lock on [`Shared`]; a panic elsewhere never keeps the socket from
/// answering.
pub(super) fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why the datastore refused the newest model, when it did.
pub(super) type LastError = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The control socket's server: what it answers from.
#[derive(Clone)]
pub(super) struct Server {
    pub shared: Arc<Mutex<Shared>>,
    pub speaker: Speaker,
    pub fib: Reconciler,
    pub nat: NatReconciler,
    pub datastore_error: LastError,
    pub ipam: IpamOps,
}

impl Server {
    /// Serve `path` until accepting fails.
    pub(super) async fn serve(self, path: PathBuf) -> anyhow::Result<()> {
        let listener =
            jsonl::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
        jsonl::serve(listener, move |req| {
            let server = self.clone();
            async move { server.answer(req).await }
        })
        .await?;
        Ok(())
    }

    async fn answer(&self, req: Request) -> Reply {
        match req {
            Request::Status => match self.speaker.sessions().await {
                Ok(sessions) => {
                    let mut st = lock(&self.shared).status.clone();
                    st.sessions = sessions;
                    st.fib = self.fib.status();
                    st.nat = self.nat.status();
                    st.datastore_error = (self.datastore_error)();
                    Reply::Status(st)
                }
                Err(e) => Reply::Error(e.to_string()),
            },
            Request::Routes => match self.speaker.routes().await {
                Ok(bgp) => {
                    let sh = lock(&self.shared);
                    Reply::Routes(RoutesReport {
                        bgp,
                        fib: sh.desired.clone(),
                        refused: sh.refused.clone(),
                    })
                }
                Err(e) => Reply::Error(e.to_string()),
            },
            Request::Ipam => Reply::Ipam(ipam_report(&lock(&self.shared))),
            Request::Summary => match self.speaker.summary().await {
                Ok(s) => Reply::Summary(s),
                Err(e) => Reply::Error(e.to_string()),
            },
            Request::IpamCheck => match self.ipam.check().await {
                Ok(r) => Reply::IpamCheck(r),
                Err(e) => Reply::Error(e),
            },
            Request::IpamRelease { ip, force } => match self.ipam.release(ip, force).await {
                Ok(r) => Reply::IpamReleased(r),
                Err(e) => Reply::Error(e),
            },
        }
    }
}

fn ipam_report(sh: &Shared) -> IpamReport {
    let in_block = |b: &IpNet| {
        sh.pods
            .iter()
            .filter(|p| b.contains(&p.destination))
            .count()
    };
    let blocks: Vec<BlockUsage> = sh
        .status
        .blocks
        .iter()
        .map(|b| BlockUsage {
            cidr: *b,
            addresses: size(b),
            in_use: in_block(b),
        })
        .collect();
    let pools = sh
        .pools
        .iter()
        .map(|p| {
            let mine: Vec<&BlockUsage> =
                blocks.iter().filter(|b| p.cidr.contains(&b.cidr)).collect();
            PoolUsage {
                cidr: p.cidr,
                block_size: p.block_size(),
                blocks: mine.len(),
                addresses: mine.iter().map(|b| b.addresses).sum(),
                in_use: mine.iter().map(|b| b.in_use).sum(),
            }
        })
        .collect();
    IpamReport {
        node: sh.status.node.clone(),
        pools,
        blocks,
        pods: sh.pods.clone(),
    }
}

/// How long a client waits for the agent's reply.
const ASK_DEADLINE: Duration = Duration::from_secs(10);

/// Why [`ask`] got no answer it could use.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("{0} (is starling-agent running? --socket names another one)")]
    Unreachable(RequestError),
    #[error(transparent)]
    Socket(RequestError),
    #[error("the agent says: {0}")]
    Refused(String),
    #[error("the agent answered {0} with another kind of reply")]
    Unexpected(&'static str),
}

/// Send one request to the agent at `socket` and wait (at most 10 s) for
/// its reply; the agent's refusal ([`Reply::Error`]) is an error.
pub fn ask(socket: &Path, req: &Request) -> Result<Reply, AskError> {
    match jsonl::request(socket, req, ASK_DEADLINE) {
        Ok(Reply::Error(e)) => Err(AskError::Refused(e)),
        Ok(reply) => Ok(reply),
        Err(e @ RequestError::Connect { .. }) => Err(AskError::Unreachable(e)),
        Err(e) => Err(AskError::Socket(e)),
    }
}

/// The node's status (`starlingctl status`).
pub fn status(socket: &Path) -> Result<NodeStatus, AskError> {
    match ask(socket, &Request::Status)? {
        Reply::Status(s) => Ok(s),
        _ => Err(AskError::Unexpected("status")),
    }
}

/// The RIB and the desired kernel routes (`starlingctl routes`).
pub fn routes(socket: &Path) -> Result<RoutesReport, AskError> {
    match ask(socket, &Request::Routes)? {
        Reply::Routes(r) => Ok(r),
        _ => Err(AskError::Unexpected("routes")),
    }
}

/// IPAM on the node (`starlingctl ipam show`).
pub fn ipam_check(socket: &Path) -> Result<CheckReport, AskError> {
    match ask(socket, &Request::IpamCheck)? {
        Reply::IpamCheck(r) => Ok(r),
        _ => Err(AskError::Unexpected("ipam check")),
    }
}

pub fn ipam_release(socket: &Path, ip: IpAddr, force: bool) -> Result<ReleaseReport, AskError> {
    match ask(socket, &Request::IpamRelease { ip, force })? {
        Reply::IpamReleased(r) => Ok(r),
        _ => Err(AskError::Unexpected("ipam release")),
    }
}

pub fn ipam(socket: &Path) -> Result<IpamReport, AskError> {
    match ask(socket, &Request::Ipam)? {
        Reply::Ipam(r) => Ok(r),
        _ => Err(AskError::Unexpected("ipam")),
    }
}

/// Sessions with PEER TYPE as the plan names it ("node-to-node mesh",
/// "route reflector", "global", ...), as `calicoctl node status` shows it.
pub fn with_plan_types(sessions: &[SessionStatus]) -> Vec<SessionStatus> {
    sessions
        .iter()
        .map(|s| {
            let mut s = s.clone();
            if let Some((kind, _)) = s.description.as_deref().and_then(|d| d.split_once(": ")) {
                s.kind = kind.to_string();
            }
            s
        })
        .collect()
}
