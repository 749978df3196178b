//! The speaker: one instance task that owns the peer table and the RIBs, the
//! listeners that hand incoming connections to sessions, and the embedding
//! API (`Speaker`) that the agent and `starling-bgpd` drive.

use crate::attrs::{Family, PathAttrs};
use crate::fsm::State;
use crate::policy::{self, Outcome, PolicyRule};
use crate::rib::{Best, NextHopResolver, PeerMeta, Rib, Source};
use crate::session::{self, Driver, FromSession, LocalInfo, Negotiated, ToSession};
use crate::wire::{self, GracefulRestart, Notify};
use foldhash::{HashMap, HashSet};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

fn default_port() -> u16 {
    179
}

/// What to do when a peer sends more prefixes than allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaxPrefixAction {
    /// Log a warning and keep the session.
    Warn,
    /// Close the session with Cease / Maximum Number of Prefixes Reached (RFC 4486).
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxPrefixes {
    pub limit: usize,
    pub action: MaxPrefixAction,
}

/// One configured neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub address: IpAddr,
    pub asn: u32,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Only accept connections; never initiate one.
    #[serde(default)]
    pub passive: bool,
    /// TCP-MD5 signature password (RFC 2385).
    #[serde(default)]
    pub md5_password: Option<String>,
    #[serde(default)]
    pub source_address: Option<IpAddr>,
    /// GTSM (RFC 5082); `multihop` then gives the allowed hop count.
    #[serde(default)]
    pub ttl_security: bool,
    /// eBGP multihop TTL (default 1: directly connected).
    #[serde(default)]
    pub multihop: Option<u8>,
    /// Families to negotiate; default: the family of `address`.
    #[serde(default)]
    pub families: Vec<Family>,
    #[serde(default)]
    pub hold_time: Option<u16>,
    #[serde(default)]
    pub connect_retry: Option<u16>,
    /// Free text shown in the session table.
    #[serde(default)]
    pub description: Option<String>,
    /// This iBGP peer is a route-reflector client of ours (RFC 4456).
    #[serde(default)]
    pub route_reflector_client: bool,
    /// Advertise ourselves as the next hop of routes we pass to this iBGP peer.
    #[serde(default)]
    pub next_hop_self: bool,
    #[serde(default)]
    pub max_prefixes: Option<MaxPrefixes>,
    /// Import policy; without one, iBGP accepts everything and eBGP accepts
    /// nothing unless `ebgp_requires_policy` is off (RFC 8212).
    #[serde(default)]
    pub import: Option<Vec<PolicyRule>>,
    /// Export policy; same defaults as `import`.
    #[serde(default)]
    pub export: Option<Vec<PolicyRule>>,
    /// Cap on the restart time this peer advertises (graceful restart, receiving side).
    #[serde(default)]
    pub max_restart_time: Option<u16>,
}

impl PeerConfig {
    /// Whether a change from `self` to `other` needs a new session (anything
    /// but policy, reflection and limits does).
    fn session_differs(&self, other: &PeerConfig) -> bool {
        let strip = |c: &PeerConfig| PeerConfig {
            import: None,
            export: None,
            max_prefixes: None,
            route_reflector_client: false,
            next_hop_self: false,
            description: None,
            max_restart_time: None,
            ..c.clone()
        };
        strip(self) != strip(other)
    }

    pub fn new(address: IpAddr, asn: u32) -> PeerConfig {
        PeerConfig {
            address,
            asn,
            port: 179,
            passive: false,
            md5_password: None,
            source_address: None,
            ttl_security: false,
            multihop: None,
            families: vec![],
            hold_time: None,
            connect_retry: None,
            description: None,
            route_reflector_client: false,
            next_hop_self: false,
            max_prefixes: None,
            import: None,
            export: None,
            max_restart_time: None,
        }
    }

    pub fn families(&self) -> Vec<Family> {
        if self.families.is_empty() {
            vec![Family::of_addr(&self.address)]
        } else {
            self.families.clone()
        }
    }
}

/// Speaker-wide configuration.
#[derive(Clone, Debug)]
pub struct SpeakerConfig {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Addresses to accept connections on; empty: none (active sessions only).
    pub listen: Vec<SocketAddr>,
    pub hold_time: u16,
    pub connect_retry: u16,
    /// Restart time advertised in the graceful restart capability; `None`: not advertised.
    pub graceful_restart: Option<u16>,
    /// Whether forwarding state was kept across our restart (the F bit).
    pub forwarding_preserved: bool,
    pub extended_message: bool,
    /// Route reflector cluster ID (RFC 4456); peers marked
    /// `route_reflector_client` are reflected to. Default: our router ID.
    pub cluster_id: Option<Ipv4Addr>,
    /// Largest multipath (ECMP) set per prefix.
    pub max_paths: usize,
    /// RFC 8212: eBGP peers without a policy exchange nothing.
    pub ebgp_requires_policy: bool,
    /// How long changes are gathered before the Loc-RIB and Adj-RIBs-Out
    /// are updated, so that bursts go out packed.
    pub batch_interval: Duration,
    /// Reachability and cost of next hops, from the embedder.
    pub resolver: Option<Arc<dyn NextHopResolver>>,
}

impl std::fmt::Debug for dyn NextHopResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NextHopResolver")
    }
}

impl SpeakerConfig {
    pub fn new(asn: u32, router_id: Ipv4Addr) -> SpeakerConfig {
        SpeakerConfig {
            asn,
            router_id,
            listen: vec![
                "0.0.0.0:179".parse().expect("literal"),
                "[::]:179".parse().expect("literal"),
            ],
            hold_time: 90,
            connect_retry: 5,
            graceful_restart: Some(120),
            forwarding_preserved: false,
            extended_message: true,
            cluster_id: None,
            max_paths: 1,
            ebgp_requires_policy: true,
            batch_interval: Duration::from_millis(5),
            resolver: None,
        }
    }
}

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

enum Command {
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

/// Handle to a running speaker. Cloning it gives another handle to the same speaker.
#[derive(Clone)]
pub struct Speaker {
    cmd: mpsc::UnboundedSender<Command>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the speaker has stopped")]
    Stopped,
    #[error("{0}")]
    Peer(String),
}

impl Speaker {
    /// Bind the listeners and start the instance task. Returns the handle and
    /// the stream of best-path changes.
    pub async fn start(
        cfg: SpeakerConfig,
    ) -> Result<(Speaker, mpsc::UnboundedReceiver<RouteEvent>), SpeakerError> {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (route_tx, route_rx) = mpsc::unbounded_channel();
        let (sess_tx, sess_rx) = mpsc::unbounded_channel();
        let (conn_tx, conn_rx) = mpsc::unbounded_channel();
        let mut listeners = Vec::new();
        for addr in &cfg.listen {
            let l = bind(*addr).map_err(|source| SpeakerError::Listen {
                addr: *addr,
                source,
            })?;
            let l = Arc::new(l);
            listeners.push(l.clone());
            let tx = conn_tx.clone();
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, from)) => {
                            if tx.send((s, from)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        let local = Arc::new(LocalInfo {
            asn: cfg.asn,
            router_id: cfg.router_id,
            hold_time: cfg.hold_time,
            connect_retry: cfg.connect_retry,
            graceful_restart: cfg.graceful_restart.map(|t| GracefulRestart {
                restart_time: t,
                restarting: cfg.forwarding_preserved,
                forwarding: cfg.forwarding_preserved,
            }),
            extended_message: cfg.extended_message,
        });
        let sync_deadline =
            Instant::now() + Duration::from_secs(cfg.graceful_restart.unwrap_or(120).max(1) as u64);
        let inst = Instance {
            local,
            cluster_id: cfg.cluster_id.unwrap_or(cfg.router_id),
            ebgp_requires_policy: cfg.ebgp_requires_policy,
            batch_interval: cfg.batch_interval,
            defer: cfg.forwarding_preserved,
            peers: BTreeMap::new(),
            rib: Rib::new(cfg.max_paths, cfg.resolver.clone()),
            listeners,
            sess_tx,
            route_tx,
            dirty: Vec::new(),
            flush_at: None,
            stale_until: HashMap::default(),
            eor: HashSet::default(),
            synced: false,
            sync_deadline,
        };
        tokio::spawn(inst.run(cmd_rx, sess_rx, conn_rx));
        Ok((Speaker { cmd: cmd_tx }, route_rx))
    }

    fn send(&self, c: Command) -> Result<(), SpeakerError> {
        self.cmd.send(c).map_err(|_| SpeakerError::Stopped)
    }

    /// Add a peer, or replace the configuration of an existing one (the
    /// session restarts when anything changed).
    pub async fn add_peer(&self, cfg: PeerConfig) -> Result<(), SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::AddPeer(cfg, tx))?;
        rx.await
            .map_err(|_| SpeakerError::Stopped)?
            .map_err(SpeakerError::Peer)
    }

    /// Remove a peer; its session is closed with Cease / Peer De-configured.
    pub async fn remove_peer(&self, addr: IpAddr) -> Result<bool, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::RemovePeer(addr, tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }

    pub fn announce(&self, prefix: IpNet) -> Result<(), SpeakerError> {
        self.send(Command::Announce(prefix.trunc()))
    }

    pub fn withdraw(&self, prefix: IpNet) -> Result<(), SpeakerError> {
        self.send(Command::Withdraw(prefix.trunc()))
    }

    pub async fn sessions(&self) -> Result<Vec<SessionStatus>, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Sessions(tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }

    /// Next-hop reachability changed (the embedder's resolver answers
    /// differently now): run the decision process for every prefix again.
    pub fn next_hops_changed(&self) -> Result<(), SpeakerError> {
        self.send(Command::Redecide)
    }

    /// Change the route reflector cluster ID; every peer's Adj-RIB-Out is
    /// brought in line with the new CLUSTER_LIST at once.
    pub fn set_cluster_id(&self, id: Ipv4Addr) -> Result<(), SpeakerError> {
        self.send(Command::SetClusterId(id))
    }

    pub async fn summary(&self) -> Result<RibSummary, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Summary(tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }

    pub async fn routes(&self) -> Result<Vec<RouteEntry>, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Routes(tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }

    /// Close every session with Cease / Administrative Shutdown carrying
    /// `message` (RFC 9003), and stop.
    pub async fn shutdown(&self, message: &str) -> Result<(), SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Shutdown(message.to_string(), tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    TcpListener::from_std(s.into())
}

struct PeerEntry {
    cfg: PeerConfig,
    tx: mpsc::UnboundedSender<ToSession>,
    state: State,
    since: u64,
    last_error: Option<String>,
    negotiated: Option<Arc<Negotiated>>,
    /// Adj-RIB-Out: what we last advertised to this peer.
    adj_out: HashMap<IpNet, Arc<PathAttrs>>,
    /// Whether we already logged that RFC 8212 blocks this peer, and the
    /// max-prefix warning, so the log says it once.
    warned_policy: bool,
    warned_max_prefix: bool,
}

impl PeerEntry {
    fn ebgp(&self, local_asn: u32) -> bool {
        self.cfg.asn != local_asn
    }
}

/// The policy that applies to a peer in one direction: `Ok(None)` accept
/// everything, `Ok(Some(rules))` run the rules, `Err(())` RFC 8212 blocks all.
fn effective_policy(
    rules: &Option<Vec<PolicyRule>>,
    ebgp: bool,
    requires: bool,
) -> Result<Option<&[PolicyRule]>, ()> {
    match rules {
        Some(r) => Ok(Some(r.as_slice())),
        None if ebgp && requires => Err(()),
        None => Ok(None),
    }
}

struct Instance {
    local: Arc<LocalInfo>,
    cluster_id: Ipv4Addr,
    ebgp_requires_policy: bool,
    batch_interval: Duration,
    /// Restarting with forwarding kept: hold best-path changes back from the
    /// embedder until the initial sync (RFC 4724 §4.1 selection deferral).
    defer: bool,
    peers: BTreeMap<IpAddr, PeerEntry>,
    rib: Rib,
    listeners: Vec<Arc<TcpListener>>,
    sess_tx: mpsc::UnboundedSender<FromSession>,
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
}

impl Instance {
    async fn run(
        mut self,
        mut cmd_rx: mpsc::UnboundedReceiver<Command>,
        mut sess_rx: mpsc::UnboundedReceiver<FromSession>,
        mut conn_rx: mpsc::UnboundedReceiver<(tokio::net::TcpStream, SocketAddr)>,
    ) {
        loop {
            let next = [
                self.flush_at,
                self.stale_until.values().min().copied(),
                (!self.synced).then_some(self.sync_deadline),
            ]
            .into_iter()
            .flatten()
            .min();
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
                Some((stream, from)) = conn_rx.recv() => {
                    let ip = canonical(from.ip());
                    match self.peers.get(&ip) {
                        Some(p) => {
                            let _ = session::prepare_socket(&stream, &p.cfg, p.ebgp(self.local.asn));
                            let _ = p.tx.send(ToSession::Incoming(stream));
                        }
                        None => info!(from = %from, "refused a connection from an address that is not a configured peer"),
                    }
                }
                _ = timer => self.timers(),
            }
        }
    }

    fn timers(&mut self) {
        let now = Instant::now();
        if self.flush_at.is_some_and(|t| t <= now) {
            self.flush();
        }
        let expired: Vec<IpAddr> = self
            .stale_until
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in expired {
            self.stale_until.remove(&peer);
            let gone = self.rib.sweep_stale(peer, None);
            if !gone.is_empty() {
                info!(peer = %peer, routes = gone.len(), "restart time over: removing the routes the peer did not refresh");
            }
            self.mark_dirty(gone);
        }
        if !self.synced && self.sync_deadline <= now {
            info!("initial sync: not every peer sent End-of-RIB in time; going ahead");
            self.finish_sync();
        }
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
                let found = self.remove_peer(addr, Notify::new(6, 3, vec![], "peer de-configured"));
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
            Command::SetClusterId(id) => {
                if id != self.cluster_id {
                    info!(cluster_id = %id, "cluster ID changed");
                    self.cluster_id = id;
                    let all = self.rib.all_prefixes();
                    let addrs: Vec<IpAddr> = self.peers.keys().copied().collect();
                    for a in addrs {
                        self.export_to(a, all.clone(), false);
                    }
                }
            }
            Command::Redecide => {
                let all = self.rib.known_prefixes();
                self.mark_dirty(all);
            }
            Command::Sessions(tx) => {
                let _ = tx.send(self.sessions());
            }
            Command::Summary(tx) => {
                let (loc_rib_prefixes, paths, attribute_sets) = self.rib.sizes();
                let _ = tx.send(RibSummary {
                    loc_rib_prefixes,
                    paths,
                    attribute_sets,
                    sessions_established: self
                        .peers
                        .values()
                        .filter(|p| p.state == State::Established)
                        .count(),
                    sessions_configured: self.peers.len(),
                });
            }
            Command::Routes(tx) => {
                let _ = tx.send(self.rib.entries());
            }
            Command::Shutdown(..) => {}
        }
    }

    fn set_listener_md5(&self, addr: IpAddr, key: Option<&str>) {
        for l in &self.listeners {
            let fam_ok = l
                .local_addr()
                .map(|a| a.is_ipv4() == addr.is_ipv4())
                .unwrap_or(false);
            if fam_ok && let Err(e) = crate::sockopt::set_md5(l.as_ref(), addr, key) {
                warn!(peer = %addr, error = %e, "cannot set the TCP-MD5 key on the listener");
            }
        }
    }

    fn add_peer(&mut self, cfg: PeerConfig) -> Result<(), String> {
        if cfg.address.is_unspecified() || cfg.address.is_multicast() {
            return Err(format!(
                "peer address {} is not a unicast address",
                cfg.address
            ));
        }
        if cfg.md5_password.as_ref().is_some_and(|p| p.len() > 80) {
            return Err(format!(
                "peer {}: md5_password is longer than 80 bytes",
                cfg.address
            ));
        }
        for (dir, rules) in [("import", &cfg.import), ("export", &cfg.export)] {
            for (i, r) in rules.iter().flatten().enumerate() {
                r.validate()
                    .map_err(|e| format!("peer {}: {dir}[{i}].{e}", cfg.address))?;
            }
        }
        if let Some(old) = self.peers.get_mut(&cfg.address) {
            if old.cfg == cfg {
                return Ok(());
            }
            if !old.cfg.session_differs(&cfg) {
                // Policy, reflection or limits changed: keep the session.
                let import_changed = old.cfg.import != cfg.import;
                old.cfg = cfg.clone();
                old.warned_policy = false;
                old.warned_max_prefix = false;
                let addr = cfg.address;
                if let Some(neg) = old.negotiated.clone() {
                    if let Some(meta) = self.rib.meta(addr).copied() {
                        self.rib.set_peer(
                            addr,
                            PeerMeta {
                                rr_client: cfg.route_reflector_client,
                                ..meta
                            },
                        );
                    }
                    if import_changed {
                        // RFC 2918: ask the peer to send everything again, and
                        // run the new import policy on it.
                        for f in &neg.families {
                            let _ = old.tx.send(ToSession::Refresh(*f));
                        }
                    }
                    let all = self.rib.all_prefixes();
                    self.export_to(addr, all, false);
                }
                info!(peer = %addr, "peer policy updated without a session reset");
                return Ok(());
            }
            self.remove_peer(
                cfg.address,
                Notify::new(6, 6, vec![], "peer configuration changed"),
            );
        }
        if let Some(pw) = &cfg.md5_password {
            self.set_listener_md5(cfg.address, Some(pw));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = Driver::new(cfg.clone(), self.local.clone(), self.sess_tx.clone());
        tokio::spawn(driver.run(rx));
        info!(peer = %cfg.address, asn = cfg.asn, "peer added");
        self.peers.insert(
            cfg.address,
            PeerEntry {
                cfg,
                tx,
                state: State::Idle,
                since: session::now_unix(),
                last_error: None,
                negotiated: None,
                adj_out: HashMap::default(),
                warned_policy: false,
                warned_max_prefix: false,
            },
        );
        Ok(())
    }

    fn remove_peer(&mut self, addr: IpAddr, n: Notify) -> bool {
        let Some(p) = self.peers.remove(&addr) else {
            return false;
        };
        let _ = p.tx.send(ToSession::Stop(n));
        if p.cfg.md5_password.is_some() {
            self.set_listener_md5(addr, None);
        }
        self.stale_until.remove(&addr);
        let gone = self.rib.drop_peer(addr);
        self.mark_dirty(gone);
        self.check_sync();
        true
    }

    fn sessions(&self) -> Vec<SessionStatus> {
        self.peers
            .values()
            .map(|p| SessionStatus {
                peer: p.cfg.address,
                asn: p.cfg.asn,
                kind: if p.ebgp(self.local.asn) {
                    "ebgp".into()
                } else if p.cfg.route_reflector_client {
                    "ibgp rr-client".into()
                } else {
                    "ibgp".into()
                },
                state: p.state.to_string(),
                since: p.since,
                prefixes_received: self.rib.received_count(p.cfg.address),
                prefixes_sent: p.adj_out.len(),
                last_error: p.last_error.clone(),
                description: p.cfg.description.clone(),
            })
            .collect()
    }

    fn session_event(&mut self, ev: FromSession) {
        match ev {
            FromSession::State {
                peer,
                state,
                negotiated,
                error,
                graceful,
            } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                let was = p.state;
                p.state = state;
                p.since = session::now_unix();
                if error.is_some() {
                    p.last_error = error;
                }
                if state == State::Established {
                    p.negotiated = negotiated.clone();
                    p.adj_out.clear();
                    let ebgp = p.ebgp(self.local.asn);
                    let rr_client = p.cfg.route_reflector_client;
                    if let Some(neg) = &negotiated {
                        self.rib.set_peer(
                            peer,
                            PeerMeta {
                                ebgp,
                                router_id: neg.peer.router_id,
                                rr_client,
                            },
                        );
                        self.resume_stale(peer, neg);
                    }
                    let all = self.rib.all_prefixes();
                    self.export_to(peer, all, true);
                } else if was == State::Established {
                    let gr = p
                        .negotiated
                        .as_ref()
                        .and_then(|n| n.peer.graceful_restart.clone());
                    let cap = p.cfg.max_restart_time;
                    p.negotiated = None;
                    p.adj_out.clear();
                    self.session_down(peer, gr, cap, graceful);
                }
            }
            FromSession::Update { peer, update } => self.update(peer, *update),
            FromSession::RefreshRequest { peer, family } => {
                // RFC 2918: resend the whole Adj-RIB-Out of that family.
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.adj_out.retain(|k, _| Family::of(k) != family);
                }
                self.export_to(peer, self.rib.prefixes_of(family), false);
            }
        }
    }

    /// A session left Established. With graceful restart and no NOTIFICATION
    /// (RFC 4724 §4.2), its routes stay, marked stale, for the restart time.
    fn session_down(
        &mut self,
        peer: IpAddr,
        gr: Option<wire::PeerGracefulRestart>,
        cap: Option<u16>,
        graceful: bool,
    ) {
        let restart_time = gr.map(|(t, _, _)| cap.map_or(t, |c| t.min(c))).unwrap_or(0);
        if graceful && restart_time > 0 {
            let n = self.rib.mark_stale(peer);
            info!(peer = %peer, routes = n, restart_time, "peer went down; keeping its routes as stale (graceful restart)");
            self.stale_until.insert(
                peer,
                Instant::now() + Duration::from_secs(restart_time as u64),
            );
        } else {
            self.stale_until.remove(&peer);
            let gone = self.rib.drop_peer(peer);
            self.mark_dirty(gone);
        }
    }

    /// A restarting peer is back: families it kept forwarding for keep their
    /// stale routes until End-of-RIB; the others lose them now (RFC 4724 §4.2).
    fn resume_stale(&mut self, peer: IpAddr, neg: &Negotiated) {
        if self.rib.stale_count(peer) == 0 {
            return;
        }
        let kept: Vec<Family> = neg
            .peer
            .graceful_restart
            .as_ref()
            .map(|(_, _, fams)| fams.iter().filter(|(_, f)| *f).map(|(f, _)| *f).collect())
            .unwrap_or_default();
        for f in [Family::Ipv4, Family::Ipv6] {
            if !kept.contains(&f) || !neg.families.contains(&f) {
                let gone = self.rib.sweep_stale(peer, Some(f));
                self.mark_dirty(gone);
            }
        }
    }

    fn update(&mut self, peer: IpAddr, update: wire::Update) {
        let local_asn = self.local.asn;
        let router_id = self.local.router_id;
        let cluster_id = self.cluster_id;
        let requires = self.ebgp_requires_policy;
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let ebgp = p.ebgp(local_asn);
        let mut changed = Vec::with_capacity(update.withdrawn.len() + update.announced.len());
        for w in &update.withdrawn {
            if self.rib.remove(peer, w) {
                changed.push(*w);
            }
        }
        if !update.announced.is_empty() {
            let a = &update.attrs;
            let looped = (ebgp && a.contains_as(local_asn))
                || a.originator_id == Some(router_id)
                || a.cluster_list.contains(&cluster_id);
            let policy = effective_policy(&p.cfg.import, ebgp, requires);
            if policy.is_err() && !p.warned_policy {
                warn!(peer = %peer, "eBGP peer has no import policy: accepting nothing (RFC 8212; set import rules or ebgp_requires_policy: false)");
                p.warned_policy = true;
            }
            match policy {
                _ if looped => {
                    // Loop detection (RFC 4271 §9.1.2, RFC 4456 §8): not eligible.
                    for x in &update.announced {
                        if self.rib.remove(peer, x) {
                            changed.push(*x);
                        }
                    }
                }
                Err(()) => {}
                Ok(None) => {
                    let attrs = self.rib.intern(update.attrs.clone());
                    for x in &update.announced {
                        self.rib.insert(peer, *x, attrs.clone());
                        changed.push(*x);
                    }
                }
                Ok(Some(rules)) => {
                    let rules = rules.to_vec();
                    for x in &update.announced {
                        let mut attrs = update.attrs.clone();
                        match policy::apply(Some(&rules), x, &mut attrs) {
                            Outcome::Reject => {
                                if self.rib.remove(peer, x) {
                                    changed.push(*x);
                                }
                            }
                            Outcome::Accept { .. } => {
                                let attrs = self.rib.intern(attrs);
                                self.rib.insert(peer, *x, attrs);
                                changed.push(*x);
                            }
                        }
                    }
                }
            }
        }
        self.mark_dirty(changed);
        self.check_max_prefixes(peer);
        if let Some(f) = update.end_of_rib {
            info!(peer = %peer, family = %f, "End-of-RIB received");
            let gone = self.rib.sweep_stale(peer, Some(f));
            if !gone.is_empty() {
                info!(peer = %peer, routes = gone.len(), "removed stale routes not refreshed before End-of-RIB");
            }
            if self.rib.stale_count(peer) == 0 {
                self.stale_until.remove(&peer);
            }
            self.mark_dirty(gone);
            self.eor.insert((peer, f));
            self.check_sync();
        }
    }

    fn check_max_prefixes(&mut self, peer: IpAddr) {
        let count = self.rib.received_count(peer);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(max) = p.cfg.max_prefixes else {
            return;
        };
        if count <= max.limit {
            return;
        }
        match max.action {
            MaxPrefixAction::Warn => {
                if !p.warned_max_prefix {
                    warn!(peer = %peer, count, limit = max.limit, "peer exceeds its prefix limit");
                    p.warned_max_prefix = true;
                }
            }
            MaxPrefixAction::Close => {
                warn!(peer = %peer, count, limit = max.limit, "peer exceeds its prefix limit: closing the session");
                // RFC 4486 §4: AFI, SAFI and the limit.
                let mut data = vec![0, if peer.is_ipv4() { 1 } else { 2 }, 1];
                data.extend_from_slice(&(max.limit.min(u32::MAX as usize) as u32).to_be_bytes());
                let n = Notify::new(
                    6,
                    1,
                    data,
                    format!("{count} prefixes exceed the limit of {}", max.limit),
                );
                let _ = p.tx.send(ToSession::Reset(n, Duration::from_secs(30)));
            }
        }
    }

    /// The initial sync is done once every configured peer has sent
    /// End-of-RIB for each family it negotiated.
    fn check_sync(&mut self) {
        if self.synced {
            return;
        }
        let done = self.peers.values().all(|p| {
            p.cfg.families().iter().all(|f| {
                self.eor.contains(&(p.cfg.address, *f))
                    || p.negotiated
                        .as_ref()
                        .is_some_and(|n| !n.families.contains(f))
            })
        });
        if done {
            self.finish_sync();
        }
    }

    fn finish_sync(&mut self) {
        self.synced = true;
        self.flush();
        if self.defer {
            // Selection was deferred: hand the embedder the whole Loc-RIB now.
            for p in self.rib.all_prefixes() {
                let paths = self.learned_paths(&p);
                let _ = self
                    .route_tx
                    .send(RouteEvent::Change(RouteChange { prefix: p, paths }));
            }
        }
        info!("initial sync done");
        let _ = self.route_tx.send(RouteEvent::Synced);
    }

    fn mark_dirty(&mut self, prefixes: Vec<IpNet>) {
        if prefixes.is_empty() {
            return;
        }
        self.dirty.extend(prefixes);
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + self.batch_interval);
        }
    }

    fn learned_paths(&self, p: &IpNet) -> Vec<LearnedPath> {
        match self.rib.best(p) {
            Some(b) if b.source != Source::Local => b
                .members()
                .filter_map(|(source, attrs)| match source {
                    Source::Peer(peer) => Some(LearnedPath {
                        peer,
                        next_hop: attrs.next_hop,
                        attrs: attrs.clone(),
                    }),
                    Source::Local => None,
                })
                .collect(),
            _ => vec![],
        }
    }

    /// Run the decision process on everything that changed since the last
    /// flush, tell the embedder, and update every peer.
    fn flush(&mut self) {
        self.flush_at = None;
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        // Nobody listening (starling-bgpd without debug logging): build no events.
        let emit = !self.route_tx.is_closed() && (!self.defer || self.synced);
        // What kinds of source changed, to skip peers that can receive none
        // of it (RFC 4271 §9.2, RFC 4456 §6) without looking at each prefix.
        let mut kinds = Kinds::default();
        let mut moved = Vec::with_capacity(dirty.len());
        for p in dirty {
            if let Some(new) = self.rib.decide(&p) {
                if emit {
                    let paths = self.learned_paths(&p);
                    let _ = self
                        .route_tx
                        .send(RouteEvent::Change(RouteChange { prefix: p, paths }));
                }
                kinds.note(new.as_ref(), &self.rib);
                moved.push(p);
            }
        }
        if moved.len() > 1024 {
            self.rib.collect_garbage();
        }
        let mut items: Option<Vec<(IpNet, Option<Best>)>> = None;
        let addrs: Vec<IpAddr> = self.peers.keys().copied().collect();
        for a in addrs {
            let Some(p) = self.peers.get(&a) else {
                continue;
            };
            let ebgp = p.ebgp(self.local.asn);
            if p.negotiated.is_none()
                || (p.adj_out.is_empty() && !kinds.reach(ebgp, p.cfg.route_reflector_client))
            {
                continue;
            }
            let items = items.get_or_insert_with(|| self.rib.items(moved.clone()));
            self.export_items(a, items, false);
        }
    }

    /// Bring a peer's Adj-RIB-Out in line with the Loc-RIB for `prefixes`,
    /// packing announcements that share attributes into the same UPDATEs.
    fn export_to(&mut self, addr: IpAddr, prefixes: Vec<IpNet>, end_of_rib: bool) {
        let items = self.rib.items(prefixes);
        self.export_items(addr, &items, end_of_rib);
    }

    /// `export_to` with the Loc-RIB entries in hand (a flush passes its
    /// decisions, so no peer looks a prefix up again).
    fn export_items(&mut self, addr: IpAddr, items: &[(IpNet, Option<Best>)], end_of_rib: bool) {
        let prefixes = items;
        let local_asn = self.local.asn;
        let requires = self.ebgp_requires_policy;
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let Some(neg) = p.negotiated.clone() else {
            return;
        };
        let ebgp = p.ebgp(local_asn);
        let policy = effective_policy(&p.cfg.export, ebgp, requires);
        if policy.is_err() && !p.warned_policy && !prefixes.is_empty() {
            warn!(peer = %addr, "eBGP peer has no export policy: sending nothing (RFC 8212; set export rules or ebgp_requires_policy: false)");
            p.warned_policy = true;
        }
        let to = ExportTo {
            addr,
            ebgp,
            rr_client: p.cfg.route_reflector_client,
            next_hop_self: p.cfg.next_hop_self,
            local_asn,
            cluster_id: self.cluster_id,
        };
        // Keyed by the interned Arc's address: equal attribute sets are the
        // same Arc, and hashing a pointer is far cheaper than the attributes.
        let mut announce: HashMap<(Family, usize), (Arc<PathAttrs>, Vec<IpNet>)> =
            HashMap::default();
        let mut withdraw: HashMap<Family, Vec<IpNet>> = HashMap::default();
        for (prefix, best) in prefixes {
            let prefix = *prefix;
            let family = Family::of(&prefix);
            if !neg.families.contains(&family) {
                continue;
            }
            let desired = match (policy, best) {
                (Err(()), _) | (_, None) => None,
                (Ok(rules), Some(b)) => export_attrs(b, &to, &neg, &self.rib, rules, &prefix),
            };
            if desired.is_none() && p.adj_out.is_empty() {
                continue;
            }
            match desired {
                Some(attrs) => {
                    if p.adj_out.get(&prefix).is_some_and(|a| **a == attrs) {
                        continue;
                    }
                    let attrs = self.rib.intern(attrs);
                    p.adj_out.insert(prefix, attrs.clone());
                    let key = (family, Arc::as_ptr(&attrs) as usize);
                    announce
                        .entry(key)
                        .or_insert_with(|| (attrs, Vec::new()))
                        .1
                        .push(prefix);
                }
                None => {
                    if p.adj_out.remove(&prefix).is_some() {
                        withdraw.entry(family).or_default().push(prefix);
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (family, prefixes) in withdraw {
            out.extend(wire::encode_withdraw(family, &prefixes, neg.max_len));
        }
        for ((family, _), (attrs, prefixes)) in announce {
            out.extend(wire::encode_announce(
                family,
                &prefixes,
                &attrs,
                neg.four_octet,
                !ebgp,
                neg.max_len,
            ));
        }
        if end_of_rib {
            out.extend(neg.families.iter().map(|f| wire::encode_end_of_rib(*f)));
        }
        if !out.is_empty() {
            let _ = p.tx.send(ToSession::Send(out));
        }
    }
}

/// The kinds of source among the paths that changed in one flush.
#[derive(Default)]
struct Kinds {
    local: bool,
    ebgp: bool,
    ibgp_client: bool,
    ibgp_other: bool,
}

impl Kinds {
    fn note(&mut self, best: Option<&Best>, rib: &Rib) {
        match best.map(|b| b.source) {
            None => {}
            Some(Source::Local) => self.local = true,
            Some(Source::Peer(p)) => match rib.meta(p) {
                Some(m) if m.ebgp => self.ebgp = true,
                Some(m) if m.rr_client => self.ibgp_client = true,
                _ => self.ibgp_other = true,
            },
        }
    }

    /// Whether a peer (eBGP or not, our reflector client or not) could be
    /// sent any of it. Withdrawals only matter to peers with an Adj-RIB-Out,
    /// which the caller checks.
    fn reach(&self, to_ebgp: bool, to_client: bool) -> bool {
        let any = self.local || self.ebgp || self.ibgp_client || self.ibgp_other;
        if to_ebgp {
            any
        } else {
            self.local || self.ebgp || self.ibgp_client || (to_client && self.ibgp_other)
        }
    }
}

/// The receiving side of an export.
struct ExportTo {
    addr: IpAddr,
    ebgp: bool,
    rr_client: bool,
    next_hop_self: bool,
    local_asn: u32,
    cluster_id: Ipv4Addr,
}

/// The attributes we advertise to a peer for a best path, or `None` when the
/// path must not go to that peer (RFC 4271 §9.2, RFC 4456 §6).
fn export_attrs(
    best: &Best,
    to: &ExportTo,
    neg: &Negotiated,
    rib: &Rib,
    rules: Option<&[PolicyRule]>,
    prefix: &IpNet,
) -> Option<PathAttrs> {
    // The checks that need no copy of the attributes come first: most
    // (prefix, peer) pairs end here in a full mesh or a big ingest.
    let mut reflect_from = None;
    if let Source::Peer(from) = best.source {
        if from == to.addr {
            return None;
        }
        let meta = rib.meta(from)?;
        if !to.ebgp && !meta.ebgp {
            // iBGP to iBGP only through a reflector: a client's routes go to
            // everyone, a non-client's only to clients (RFC 4456 §6).
            if !(meta.rr_client || to.rr_client) {
                return None;
            }
            reflect_from = Some(meta.router_id);
        }
    }
    let mut a = (*best.attrs).clone();
    let reflected = reflect_from.is_some();
    let mut nh_self = to.next_hop_self;
    match (best.source, reflect_from) {
        (Source::Local, _) => a.next_hop = None,
        (Source::Peer(_), Some(originator)) => {
            if a.originator_id.is_none() {
                a.originator_id = Some(originator);
            }
            a.cluster_list.insert(0, to.cluster_id);
            // A reflector does not change the next hop unless told to.
        }
        (Source::Peer(_), None) => {}
    }
    if let Outcome::Accept { next_hop_self } = policy::apply(rules, prefix, &mut a) {
        if let Some(n) = next_hop_self {
            nh_self = n;
        }
    } else {
        return None;
    }
    if to.ebgp {
        a.prepend(to.local_asn);
        a.next_hop = None;
        a.local_pref = None;
        if !matches!(best.source, Source::Local) && rules.is_none() {
            // MED is not passed beyond the neighbouring AS (§5.1.4) unless policy sets it.
            a.med = None;
        }
        a.originator_id = None;
        a.cluster_list.clear();
    } else {
        if a.local_pref.is_none() {
            a.local_pref = Some(100);
        }
        if nh_self && !reflected {
            a.next_hop = None;
        }
    }
    if a.next_hop.is_none() {
        // next-hop-self: our address on this session, when it is of the prefix's family.
        if Family::of(prefix) == Family::of_addr(&neg.local_addr) {
            a.next_hop = Some(neg.local_addr);
        } else {
            return None;
        }
    }
    a.next_hop_local = None;
    Some(a)
}

/// IPv4-mapped IPv6 addresses from a dual-stack socket are IPv4 peers.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
