//! The speaker: one instance task that owns the peer table and the RIBs, the
//! listeners that hand incoming connections to sessions, and the embedding
//! API (`Speaker`) that the agent and `starling-bgpd` drive.

use crate::attrs::{Family, PathAttrs};
use crate::fsm::State;
use crate::rib::{Best, Rib, Source};
use crate::session::{self, Driver, FromSession, LocalInfo, Negotiated, ToSession};
use crate::wire::{self, GracefulRestart, Notify};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

fn default_port() -> u16 {
    179
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
}

impl PeerConfig {
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
    ) -> Result<(Speaker, mpsc::UnboundedReceiver<RouteChange>), SpeakerError> {
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
        let inst = Instance {
            local,
            peers: BTreeMap::new(),
            rib: Rib::default(),
            listeners,
            sess_tx,
            route_tx,
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
}

impl PeerEntry {
    fn ebgp(&self, local_asn: u32) -> bool {
        self.cfg.asn != local_asn
    }
}

struct Instance {
    local: Arc<LocalInfo>,
    peers: BTreeMap<IpAddr, PeerEntry>,
    rib: Rib,
    listeners: Vec<Arc<TcpListener>>,
    sess_tx: mpsc::UnboundedSender<FromSession>,
    route_tx: mpsc::UnboundedSender<RouteChange>,
}

impl Instance {
    async fn run(
        mut self,
        mut cmd_rx: mpsc::UnboundedReceiver<Command>,
        mut sess_rx: mpsc::UnboundedReceiver<FromSession>,
        mut conn_rx: mpsc::UnboundedReceiver<(tokio::net::TcpStream, SocketAddr)>,
    ) {
        loop {
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
            }
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
                    self.changed(vec![p]);
                }
            }
            Command::Withdraw(p) => {
                if self.rib.stop_originating(p) {
                    self.changed(vec![p]);
                }
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
        if let Some(old) = self.peers.get(&cfg.address) {
            if old.cfg == cfg {
                return Ok(());
            }
            self.remove_peer(
                cfg.address,
                Notify::new(6, 6, vec![], "peer configuration changed"),
            );
        }
        self.set_listener_md5(cfg.address, cfg.md5_password.as_deref());
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
                adj_out: HashMap::new(),
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
        let gone = self.rib.drop_peer(addr);
        self.changed(gone);
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
                    p.negotiated = negotiated;
                    p.adj_out.clear();
                    self.initial_export(peer);
                } else if was == State::Established {
                    p.negotiated = None;
                    p.adj_out.clear();
                    // Part 2 keeps these as stale under graceful restart.
                    let gone = self.rib.drop_peer(peer);
                    self.changed(gone);
                }
            }
            FromSession::Update { peer, update } => {
                let Some(p) = self.peers.get(&peer) else {
                    return;
                };
                let ebgp = p.ebgp(self.local.asn);
                let mut changed =
                    Vec::with_capacity(update.withdrawn.len() + update.announced.len());
                for w in &update.withdrawn {
                    if self.rib.remove(peer, w) {
                        changed.push(*w);
                    }
                }
                if !update.announced.is_empty() {
                    if ebgp && update.attrs.contains_as(self.local.asn) {
                        // AS loop (RFC 4271 §9.1.2): not eligible; drop any older path.
                        for a in &update.announced {
                            if self.rib.remove(peer, a) {
                                changed.push(*a);
                            }
                        }
                    } else {
                        let attrs = self.rib.intern(update.attrs.clone());
                        for a in &update.announced {
                            self.rib.insert(peer, *a, attrs.clone(), ebgp);
                            changed.push(*a);
                        }
                    }
                }
                if let Some(f) = update.end_of_rib {
                    info!(peer = %peer, family = %f, "End-of-RIB received");
                }
                self.changed(changed);
            }
            FromSession::RefreshRequest { peer, family } => {
                // RFC 2918: resend the whole Adj-RIB-Out of that family.
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.adj_out.retain(|k, _| Family::of(k) != family);
                }
                self.export_to(peer, self.rib.prefixes_of(family), false);
            }
        }
    }

    /// Recompute best paths of `prefixes`, tell the embedder, and update every peer.
    fn changed(&mut self, prefixes: Vec<IpNet>) {
        if prefixes.is_empty() {
            return;
        }
        let mut moved = Vec::new();
        for p in prefixes {
            if let Some(best) = self.rib.decide(&p, &self.local) {
                let paths = match &best {
                    Some(Best {
                        source: Source::Peer(peer),
                        attrs,
                        ..
                    }) => vec![crate::speaker::LearnedPath {
                        peer: *peer,
                        next_hop: attrs.next_hop,
                        attrs: attrs.clone(),
                    }],
                    _ => vec![],
                };
                let _ = self.route_tx.send(RouteChange { prefix: p, paths });
                moved.push(p);
            }
        }
        let addrs: Vec<IpAddr> = self.peers.keys().copied().collect();
        for a in addrs {
            self.export_to(a, moved.clone(), false);
        }
    }

    fn initial_export(&mut self, peer: IpAddr) {
        let all = self.rib.all_prefixes();
        self.export_to(peer, all, true);
    }

    /// Bring a peer's Adj-RIB-Out in line with the Loc-RIB for `prefixes`,
    /// packing announcements that share attributes into the same UPDATEs.
    fn export_to(&mut self, addr: IpAddr, prefixes: Vec<IpNet>, end_of_rib: bool) {
        let local_asn = self.local.asn;
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let Some(neg) = p.negotiated.clone() else {
            return;
        };
        let ebgp = p.ebgp(local_asn);
        let mut announce: HashMap<(Family, Arc<PathAttrs>), Vec<IpNet>> = HashMap::new();
        let mut withdraw: HashMap<Family, Vec<IpNet>> = HashMap::new();
        for prefix in prefixes {
            let family = Family::of(&prefix);
            if !neg.families.contains(&family) {
                continue;
            }
            let desired = self
                .rib
                .best(&prefix)
                .and_then(|b| export_attrs(b, addr, ebgp, local_asn, &neg, &self.rib));
            match desired {
                Some(attrs) => {
                    if p.adj_out.get(&prefix).is_some_and(|a| **a == attrs) {
                        continue;
                    }
                    let attrs = self.rib.intern(attrs);
                    p.adj_out.insert(prefix, attrs.clone());
                    announce.entry((family, attrs)).or_default().push(prefix);
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
        for ((family, attrs), prefixes) in announce {
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

/// The attributes we advertise to a peer for a best path, or `None` when the
/// path must not go to that peer (RFC 4271 §9.2).
fn export_attrs(
    best: &Best,
    to: IpAddr,
    to_ebgp: bool,
    local_asn: u32,
    neg: &Negotiated,
    rib: &Rib,
) -> Option<PathAttrs> {
    let family_local = Family::of_addr(&neg.local_addr);
    let mut a = (*best.attrs).clone();
    match best.source {
        Source::Local => {
            a.next_hop = None;
        }
        Source::Peer(from) => {
            if from == to {
                return None;
            }
            // Without route reflection, iBGP-learned paths never go to iBGP peers (§9.2).
            if !to_ebgp && !rib.is_ebgp_path(from) {
                return None;
            }
        }
    }
    if to_ebgp {
        a.prepend(local_asn);
        a.next_hop = None;
        a.local_pref = None;
        if !matches!(best.source, Source::Local) {
            // MED is not passed beyond the neighbouring AS (§5.1.4).
            a.med = None;
        }
        a.originator_id = None;
        a.cluster_list.clear();
    } else if a.local_pref.is_none() {
        a.local_pref = Some(100);
    }
    if a.next_hop.is_none() {
        // next-hop-self: our address on this session, when it is of the prefix's family.
        let prefix_family = best.family;
        if prefix_family == family_local {
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
