//! The instance task: the one owner of the peer table and the RIBs, and
//! what every peer is sent (derived from the Loc-RIB: there is no
//! Adj-RIB-Out). It reacts to the handle's commands, to the sessions' events
//! (`FromSession`), to connections the listeners accepted, and to its own
//! timers (the batching flush, graceful-restart stale timers, the initial
//! sync deadline); it answers sessions only with `ToSession` messages.
//!
//! Each job has its file: `peers` (the peer table and session states),
//! `routes` (UPDATE import, the decision flush), `outbound` (what each
//! peer is sent, derived from the Loc-RIB, per group of peers with the same
//! outbound settings) and `restart` (graceful restart and the initial sync). Everything is a
//! synchronous method on `Instance`, so the tests drive it with session
//! events and read what it sends, with no socket and no clock.

mod outbound;
mod peers;
mod restart;
mod routes;
#[cfg(test)]
mod tests;

use crate::attrs::Family;
use crate::config::{PeerConfig, PeerPolicy, SessionConfig, SpeakerConfig, canonical};
use crate::fsm::State;
use crate::report::{RibSummary, RouteEntry, RouteEvent, SessionStatus};
use crate::rib::Rib;
use crate::session::{self, FromSession, Negotiated, ToSession};
use crate::wire::{Cease, Notify};
use foldhash::{HashMap, HashSet};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

/// The handle's messages to the instance.
pub(crate) enum Command {
    AddPeer(PeerConfig, oneshot::Sender<Result<(), String>>),
    RemovePeer(IpAddr, oneshot::Sender<bool>),
    Announce(IpNet),
    Withdraw(IpNet),
    Sessions(oneshot::Sender<Vec<SessionStatus>>),
    Routes(oneshot::Sender<Vec<RouteEntry>>),
    Summary(oneshot::Sender<RibSummary>),
    Redecide,
    SetClusterId(Ipv4Addr),
    Shutdown(String, oneshot::Sender<()>),
}

/// Starts the session task of a new peer, which then reads the receiver.
/// The speaker spawns a `session::Driver`; tests keep the receiver to see
/// what the instance sends.
pub(crate) type SessionStarter =
    Box<dyn FnMut(SessionConfig, mpsc::UnboundedReceiver<ToSession>) + Send>;

/// One row of the peer table.
struct PeerEntry {
    session: SessionConfig,
    policy: PeerPolicy,
    tx: mpsc::UnboundedSender<ToSession>,
    state: State,
    since: u64,
    last_error: Option<String>,
    negotiated: Option<Arc<Negotiated>>,
    /// How many prefixes the export rules advertise to this peer, by
    /// family (IPv4, IPv6). No Adj-RIB-Out is kept: what the peer holds is
    /// derived from the Loc-RIB (`outbound`); this count is for the session
    /// table and to skip a peer that holds nothing.
    sent: [usize; 2],
    /// Whether we already logged that RFC 8212 blocks this peer, and the
    /// max-prefix warning, so the log says it once.
    warned_policy: bool,
    warned_max_prefix: bool,
    /// ROUTE-REFRESH: when each family was last resent, and the families
    /// asked for again inside the window (served when it ends).
    refreshed_at: HashMap<Family, Instant>,
    refresh_due: BTreeMap<Family, Instant>,
}

/// How many of a dropped peer's paths go per slice: each slice is decided
/// and its withdrawals sent before the next, so what a drop holds at once
/// (Loc-RIB entries kept for the decision, changes, encoded UPDATEs) is
/// bounded by this, not by the peer's table.
const DRAIN_SLICE: usize = 4096;

/// At most one ROUTE-REFRESH answer per peer and family in this long: each
/// answer resends the whole Adj-RIB-Out of the family, so a peer asking in
/// a loop must not turn us into an amplifier. Requests inside the window
/// are coalesced into one answer at its end, so none is lost.
const REFRESH_EVERY: Duration = Duration::from_secs(10);

impl PeerEntry {
    fn ebgp(&self, local_asn: u32) -> bool {
        self.session.ebgp(local_asn)
    }
}

pub(crate) struct Instance {
    asn: u32,
    router_id: Ipv4Addr,
    cluster_id: Ipv4Addr,
    ebgp_requires_policy: bool,
    batch_interval: Duration,
    /// Restarting with forwarding kept: hold best-path changes back from the
    /// embedder until the initial sync (RFC 4724 §4.1 selection deferral).
    defer: bool,
    peers: BTreeMap<IpAddr, PeerEntry>,
    rib: Rib,
    /// Our listening sockets, which carry each peer's TCP-MD5 key.
    listeners: Vec<Arc<TcpListener>>,
    start_session: SessionStarter,
    route_tx: mpsc::UnboundedSender<RouteEvent>,
    /// Prefixes whose paths changed since the last flush.
    /// (A Vec, sorted and deduplicated at flush: cheaper than a set for
    /// the million-prefix bursts of a full table.)
    dirty: Vec<IpNet>,
    flush_at: Option<Instant>,
    /// Restarting peers whose stale routes go when the time is up.
    stale_until: HashMap<IpAddr, Instant>,
    /// End-of-RIB received, per peer and family, for the initial sync.
    eor: HashSet<(IpAddr, Family)>,
    synced: bool,
    sync_deadline: Instant,
    refused: Refusals,
    /// `DRAIN_SLICE`; the tests make it small.
    drain_slice: usize,
}

/// Connections refused from unknown addresses, and when one was last logged.
#[derive(Default)]
struct Refusals {
    total: u64,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    /// At most one log line per this long.
    const LOG_EVERY: Duration = Duration::from_secs(10);

    /// Count one refusal; `Some(n)` when it is to be logged, `n` being the
    /// refusals not logged since the last line.
    fn count(&mut self, now: Instant) -> Option<u64> {
        self.total += 1;
        if self
            .last_logged
            .is_some_and(|t| now.duration_since(t) < Self::LOG_EVERY)
        {
            self.unlogged += 1;
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

impl Instance {
    pub(crate) fn new(
        cfg: &SpeakerConfig,
        listeners: Vec<Arc<TcpListener>>,
        start_session: SessionStarter,
        route_tx: mpsc::UnboundedSender<RouteEvent>,
    ) -> Instance {
        let restart_time = cfg.graceful_restart.unwrap_or(120).max(1);
        Instance {
            asn: cfg.asn,
            router_id: cfg.router_id,
            cluster_id: cfg.cluster_id.unwrap_or(cfg.router_id),
            ebgp_requires_policy: cfg.ebgp_requires_policy,
            batch_interval: cfg.batch_interval,
            defer: cfg.forwarding_preserved,
            peers: BTreeMap::new(),
            rib: Rib::new(cfg.max_paths, cfg.resolver.clone()),
            listeners,
            start_session,
            route_tx,
            dirty: Vec::new(),
            flush_at: None,
            stale_until: HashMap::default(),
            eor: HashSet::default(),
            synced: false,
            refused: Refusals::default(),
            drain_slice: DRAIN_SLICE,
            sync_deadline: Instant::now() + Duration::from_secs(restart_time as u64),
        }
    }

    pub(crate) async fn run(
        mut self,
        mut cmd_rx: mpsc::UnboundedReceiver<Command>,
        mut sess_rx: mpsc::UnboundedReceiver<FromSession>,
        mut conn_rx: mpsc::UnboundedReceiver<(TcpStream, SocketAddr)>,
    ) {
        loop {
            let next = self.next_deadline();
            let timer = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = cmd_rx.recv() => match c {
                    None => { self.stop_all("speaker handle dropped"); return; }
                    Some(Command::Shutdown(msg, done)) => {
                        self.stop_all(&msg);
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => self.command(c),
                },
                Some(ev) = sess_rx.recv() => self.session_event(ev),
                Some((stream, from)) = conn_rx.recv() => self.incoming(stream, from),
                _ = timer => self.timers(Instant::now()),
                // A dropped peer's paths go a slice at a time, the runtime
                // (the sessions) served between slices.
                _ = tokio::task::yield_now(), if self.rib.draining() => self.drain_step(),
            }
        }
    }

    /// The earliest of the flush, the stale timers and the sync deadline.
    fn next_deadline(&self) -> Option<Instant> {
        [
            self.flush_at,
            self.stale_until.values().min().copied(),
            self.peers
                .values()
                .flat_map(|p| p.refresh_due.values())
                .min()
                .copied(),
            (!self.synced).then_some(self.sync_deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A listener accepted a connection: hand it to the peer's session, which
    /// decides what to do with it (RFC 4271 §6.8 collisions included).
    fn incoming(&mut self, stream: TcpStream, from: SocketAddr) {
        let ip = canonical(from.ip());
        match self.peers.get(&ip) {
            Some(p) => {
                let _ = session::prepare_socket(&stream, &p.session, p.ebgp(self.asn));
                let _ = p.tx.send(ToSession::Incoming(stream));
            }
            // Dropping the stream closes it; nothing was read from it. The
            // log is rate-limited: a scan of port 179 must not flood it.
            None => {
                if let Some(more) = self.refused.count(Instant::now()) {
                    warn!(
                        from = %from,
                        "refused a connection from an address that is not a configured peer \
                         ({more} more refused since the last such line)"
                    );
                }
            }
        }
    }

    /// Whatever is due at `now`: the flush, stale routes whose restart time
    /// is over, the initial sync deadline.
    fn timers(&mut self, now: Instant) {
        if self.flush_at.is_some_and(|t| t <= now) {
            self.flush();
        }
        self.stale_timers(now);
        self.refresh_timers(now);
        if !self.synced && self.sync_deadline <= now {
            info!("initial sync: not every peer sent End-of-RIB in time; going ahead");
            self.finish_sync();
        }
    }

    /// One slice of a dropped peer's paths out of the RIB, decided and
    /// exported at once.
    pub(super) fn drain_step(&mut self) {
        // The RIB notes the entries it takes paths out of for the decision.
        self.rib.drain_step(self.drain_slice);
        self.flush();
    }

    fn stop_all(&mut self, msg: &str) {
        for p in self.peers.values() {
            let _ = p.tx.send(ToSession::Stop(Notify::admin_shutdown(msg)));
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::AddPeer(cfg, done) => {
                let r = self.add_peer(cfg);
                let _ = done.send(r);
            }
            Command::RemovePeer(addr, done) => {
                let found = self.remove_peer(
                    addr,
                    Notify::new(Cease::PeerDeconfigured, vec![], "peer de-configured"),
                );
                let _ = done.send(found);
            }
            Command::Announce(p) => {
                if self.rib.originate(p) {
                    self.mark_dirty(vec![p]);
                }
            }
            Command::Withdraw(p) => {
                if self.rib.stop_originating(p) {
                    self.mark_dirty(vec![p]);
                }
            }
            Command::SetClusterId(id) => self.set_cluster_id(id),
            Command::Redecide => {
                let all = self.rib.known_prefixes();
                self.mark_dirty(all);
            }
            Command::Sessions(tx) => {
                let _ = tx.send(self.sessions());
            }
            Command::Summary(tx) => {
                let _ = tx.send(self.summary());
            }
            Command::Routes(tx) => {
                let _ = tx.send(self.rib.entries());
            }
            Command::Shutdown(..) => {}
        }
    }

    /// A new cluster ID: every peer is brought in line with the new
    /// CLUSTER_LIST at once.
    fn set_cluster_id(&mut self, id: Ipv4Addr) {
        if id == self.cluster_id {
            return;
        }
        info!(cluster_id = %id, "cluster ID changed");
        let before = self.jobs_unchanged(|_| true);
        self.cluster_id = id;
        let jobs = before
            .into_iter()
            .filter_map(|j| {
                let new = self.spec(j.addr)?;
                Some(outbound::Job { new, ..j })
            })
            .collect();
        self.resettle(jobs);
    }

    fn summary(&self) -> RibSummary {
        let (loc_rib_prefixes, paths, attribute_sets) = self.rib.sizes();
        RibSummary {
            loc_rib_prefixes,
            paths,
            attribute_sets,
            sessions_established: self
                .peers
                .values()
                .filter(|p| p.state == State::Established)
                .count(),
            sessions_configured: self.peers.len(),
            connections_refused: self.refused.total,
        }
    }
}
