//! Graceful restart (RFC 4724) on both sides: a restarting peer's routes
//! kept as stale and swept, and our own initial sync, which tells the
//! embedder when the Loc-RIB is complete after we started.

use super::Instance;
use crate::attrs::Family;
use crate::report::{RouteChange, RouteEvent};
use crate::session::Negotiated;
use crate::wire::PeerGracefulRestart;
use std::net::IpAddr;
use std::time::Duration;
use tokio::time::Instant;
use tracing::info;

impl Instance {
    /// A session left Established. With graceful restart and no NOTIFICATION
    /// (RFC 4724 §4.2), its routes stay, marked stale, for the restart time
    /// (the peer's, capped by `max_restart_time`).
    pub(super) fn session_down(
        &mut self,
        peer: IpAddr,
        gr: Option<PeerGracefulRestart>,
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
            self.rib.retire_peer(peer);
        }
    }

    /// A restarting peer is back: families it kept forwarding for keep their
    /// stale routes until End-of-RIB; the others lose them now (RFC 4724 §4.2).
    pub(super) fn resume_stale(&mut self, peer: IpAddr, neg: &Negotiated) {
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

    /// End-of-RIB from a peer (RFC 4724 §2): what it did not refresh of that
    /// family goes, and the initial sync may be complete.
    pub(super) fn end_of_rib(&mut self, peer: IpAddr, f: Family) {
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

    /// Peers whose restart time is over at `now` lose the routes they did
    /// not refresh (RFC 4724 §4.2).
    pub(super) fn stale_timers(&mut self, now: Instant) {
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
    }

    /// The initial sync is done once every configured peer has sent
    /// End-of-RIB for each family it negotiated.
    pub(super) fn check_sync(&mut self) {
        if self.synced {
            return;
        }
        let done = self.peers.values().all(|p| {
            p.session.families().iter().all(|f| {
                self.eor.contains(&(p.session.address, *f))
                    || p.negotiated
                        .as_ref()
                        .is_some_and(|n| !n.families.contains(f))
            })
        });
        if done {
            self.finish_sync();
        }
    }

    /// Tell the embedder the Loc-RIB is complete (RFC 4724 §4.1); with
    /// selection deferred, hand it the whole Loc-RIB first.
    pub(super) fn finish_sync(&mut self) {
        self.synced = true;
        self.flush();
        if self.defer {
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
}
