//! The peer table: adding, changing and removing peers, the session states
//! the session tasks report, and the per-peer limits.

use super::outbound::Job;
use super::{Instance, PeerEntry, REFRESH_EVERY};
use crate::attrs::Family;
use crate::config::{MaxPrefixAction, PeerConfig, PeerPolicy, SessionConfig};
use crate::fsm::State;
use crate::report::SessionStatus;
use crate::rib::PeerMeta;
use crate::session::{self, FromSession, Negotiated, ToSession};
use crate::sockopt;
use crate::wire::{Cease, Notify};
use foldhash::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

impl Instance {
    /// Add a peer, or apply a new configuration to one we have: a change of
    /// policy keeps the session, any other change restarts it.
    pub(super) fn add_peer(&mut self, cfg: PeerConfig) -> Result<(), String> {
        cfg.validate()?;
        let (session, policy) = cfg.split();
        let addr = session.address;
        if let Some(old) = self.peers.get(&addr) {
            if old.session == session {
                if old.policy != policy {
                    self.update_policy(addr, policy);
                }
                return Ok(());
            }
            self.remove_peer(
                addr,
                Notify::new(
                    Cease::OtherConfigurationChange,
                    vec![],
                    "peer configuration changed",
                ),
            );
        }
        self.start_peer(session, policy);
        Ok(())
    }

    /// Policy, reflection or limits changed: keep the session, ask the peer
    /// to send everything again when the import policy changed (RFC 2918),
    /// and send it the difference the new export settings make.
    fn update_policy(&mut self, addr: IpAddr, policy: PeerPolicy) {
        // The paths of its last session still in the RIB go first, under
        // the settings they were exported with (`set_peer_meta`).
        while self.rib.draining_from(addr) {
            self.drain_step();
        }
        let Some(old) = self.peers.get(&addr) else {
            return;
        };
        let import_changed = old.policy.import != policy.import
            || old.policy.allow_local_as != policy.allow_local_as;
        let rr_client = policy.route_reflector_client;
        let before = self.spec(addr);
        let Some(old) = self.peers.get_mut(&addr) else {
            return;
        };
        old.policy = policy;
        old.warned_policy = false;
        old.warned_max_prefix = false;
        if let Some(neg) = old.negotiated.clone() {
            if import_changed {
                for f in &neg.families {
                    let _ = old.tx.send(ToSession::Refresh(*f));
                }
            }
            // What others get of its paths (reflection follows client
            // status), then what it gets.
            if let Some(meta) = self.rib.meta(addr).copied() {
                self.set_peer_meta(addr, PeerMeta { rr_client, ..meta });
            }
            if let (Some(old), Some(new)) = (before, self.spec(addr))
                && old != new
            {
                self.resettle(vec![Job {
                    addr,
                    old: Some(old),
                    new,
                }]);
            }
        }
        info!(peer = %addr, "peer policy updated without a session reset");
    }

    fn start_peer(&mut self, session: SessionConfig, policy: PeerPolicy) {
        if let Some(pw) = &session.md5_password {
            self.set_listener_md5(session.address, Some(pw));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        (self.start_session)(session.clone(), rx);
        info!(peer = %session.address, asn = session.asn, "peer added");
        self.peers.insert(
            session.address,
            PeerEntry {
                session,
                policy,
                tx,
                state: State::Idle,
                since: session::now_unix(),
                last_error: None,
                negotiated: None,
                sent: [0, 0],
                warned_policy: false,
                warned_max_prefix: false,
                refreshed_at: HashMap::default(),
                refresh_due: Default::default(),
            },
        );
    }

    pub(super) fn remove_peer(&mut self, addr: IpAddr, n: Notify) -> bool {
        let Some(p) = self.peers.remove(&addr) else {
            return false;
        };
        let _ = p.tx.send(ToSession::Stop(n));
        if p.session.md5_password.is_some() {
            self.set_listener_md5(addr, None);
        }
        self.stale_until.remove(&addr);
        self.rib.retire_peer(addr);
        self.check_sync();
        true
    }

    /// TCP-MD5 (RFC 2385) needs the key on the listening socket too, or the
    /// peer's SYN is dropped before we see it.
    fn set_listener_md5(&self, addr: IpAddr, key: Option<&str>) {
        for l in &self.listeners {
            let fam_ok = l
                .local_addr()
                .map(|a| a.is_ipv4() == addr.is_ipv4())
                .unwrap_or(false);
            if fam_ok && let Err(e) = sockopt::set_md5(l.as_ref(), addr, key) {
                warn!(peer = %addr, error = %e, "cannot set the TCP-MD5 key on the listener");
            }
        }
    }

    pub(super) fn session_event(&mut self, ev: FromSession) {
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
                    self.session_up(peer, negotiated);
                } else if was == State::Established {
                    self.session_left(peer, graceful);
                }
            }
            FromSession::Update { peer, update } => self.update(peer, *update),
            FromSession::Panicked { peer, message } => self.session_panicked(peer, message),
            FromSession::RefreshRequest { peer, family } => {
                self.refresh_request(peer, family, Instant::now())
            }
        }
    }

    /// A ROUTE-REFRESH from the peer, rate-limited (`REFRESH_EVERY`).
    pub(super) fn refresh_request(&mut self, peer: IpAddr, family: Family, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        match p.refreshed_at.get(&family) {
            Some(t) if now.duration_since(*t) < REFRESH_EVERY => {
                if let std::collections::btree_map::Entry::Vacant(e) = p.refresh_due.entry(family) {
                    info!(peer = %peer, %family, "ROUTE-REFRESH within {}s of the last: answered when the window ends", REFRESH_EVERY.as_secs());
                    e.insert(*t + REFRESH_EVERY);
                }
            }
            _ => self.refresh(peer, family, now),
        }
    }

    /// Deferred ROUTE-REFRESH answers whose window has ended.
    pub(super) fn refresh_timers(&mut self, now: Instant) {
        let due: Vec<(IpAddr, Family)> = self
            .peers
            .iter()
            .flat_map(|(a, p)| {
                p.refresh_due
                    .iter()
                    .filter(|(_, t)| **t <= now)
                    .map(|(f, _)| (*a, *f))
            })
            .collect();
        for (peer, family) in due {
            self.refresh(peer, family, now);
        }
    }

    /// RFC 2918: resend everything we advertise of that family.
    fn refresh(&mut self, peer: IpAddr, family: Family, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.refreshed_at.insert(family, now);
            p.refresh_due.remove(&family);
        }
        self.send_table(peer, Some(family), false);
    }

    /// The peer's session task panicked and its connection went with it:
    /// the session is down without a NOTIFICATION, so its routes are
    /// withdrawn (not kept as for graceful restart: the task that lost them
    /// was ours), and a new task starts the session again.
    fn session_panicked(&mut self, peer: IpAddr, message: String) {
        error!(peer = %peer, "the session task panicked: {message}; resetting the session");
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let was = p.state;
        p.state = State::Idle;
        p.since = session::now_unix();
        p.last_error = Some(format!("session task panicked: {message}"));
        let (tx, rx) = mpsc::unbounded_channel();
        p.tx = tx;
        let cfg = p.session.clone();
        if was == State::Established {
            self.session_left(peer, false);
        }
        (self.start_session)(cfg, rx);
    }

    /// Established: the RIB learns who the peer is, a restarting peer's
    /// stale routes are sorted out, and the peer gets our whole table and
    /// End-of-RIB.
    fn session_up(&mut self, peer: IpAddr, negotiated: Option<Arc<Negotiated>>) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        // Decide what is waiting for the batch timer first: the table below
        // is the Loc-RIB, and a prefix announced a few milliseconds ago
        // (our own block, right after a restart) is not in it until then.
        // Sent after End-of-RIB it would be swept by a peer that kept our
        // routes across the restart (RFC 4724 §4.2), then re-added.
        self.flush();
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.negotiated = negotiated.clone();
        p.sent = [0, 0];
        let ebgp = p.ebgp(self.asn);
        let rr_client = p.policy.route_reflector_client;
        if let Some(neg) = &negotiated {
            // Its paths kept across a graceful restart go out again under a
            // new router ID, if it has one.
            self.set_peer_meta(
                peer,
                PeerMeta {
                    ebgp,
                    router_id: neg.peer.router_id,
                    rr_client,
                },
            );
            self.resume_stale(peer, neg);
        }
        self.send_table(peer, None, true);
    }

    /// The session left Established: forget what we sent, and keep or drop
    /// what we learned (graceful restart).
    fn session_left(&mut self, peer: IpAddr, graceful: bool) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let gr = p
            .negotiated
            .as_ref()
            .and_then(|n| n.peer.graceful_restart.clone());
        let cap = p.policy.max_restart_time;
        p.negotiated = None;
        p.sent = [0, 0];
        self.session_down(peer, gr, cap, graceful);
    }

    /// The peer sent more prefixes than its limit: warn once, or close the
    /// session with Cease / Maximum Number of Prefixes Reached.
    pub(super) fn check_max_prefixes(&mut self, peer: IpAddr) {
        let count = self.rib.received_count(peer);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(max) = p.policy.max_prefixes else {
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
                    Cease::MaximumNumberOfPrefixesReached,
                    data,
                    format!("{count} prefixes exceed the limit of {}", max.limit),
                );
                let _ = p.tx.send(ToSession::Reset(n, Duration::from_secs(30)));
            }
        }
    }

    /// The session table.
    pub(super) fn sessions(&self) -> Vec<SessionStatus> {
        self.peers
            .values()
            .map(|p| SessionStatus {
                peer: p.session.address,
                asn: p.session.asn,
                kind: if p.ebgp(self.asn) {
                    "ebgp".into()
                } else if p.policy.route_reflector_client {
                    "ibgp rr-client".into()
                } else {
                    "ibgp".into()
                },
                state: p.state.to_string(),
                since: p.since,
                prefixes_received: self.rib.received_count(p.session.address),
                prefixes_sent: p.sent.iter().sum(),
                last_error: p.last_error.clone(),
                description: p.policy.description.clone(),
            })
            .collect()
    }
}
