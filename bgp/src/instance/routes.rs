//! Routes through the instance: UPDATEs into the Adj-RIBs-In (loop
//! detection, import policy) and the batched decision process, whose
//! moved best paths go to `outbound`.

use super::Instance;
use super::outbound::Change;
use crate::export::Kinds;
use crate::policy::{Effective, PerUpdate, RouteSource};
use crate::report::{LearnedPath, RouteChange, RouteEvent};
use crate::rib::{Best, Source};
use crate::wire;
use ipnet::IpNet;
use std::net::IpAddr;
use tokio::time::Instant;
use tracing::warn;

impl Instance {
    /// An UPDATE from `peer`: withdrawals, then the announcements that pass
    /// loop detection and the import policy, then End-of-RIB.
    pub(super) fn update(&mut self, peer: IpAddr, mut update: wire::Update) {
        if self.import(peer, &mut update).is_none() {
            return;
        }
        if self.rib.has_dirty() {
            self.schedule_flush();
        }
        self.check_max_prefixes(peer);
        if let Some(f) = update.end_of_rib {
            self.end_of_rib(peer, f);
        }
    }

    /// Apply an UPDATE to `peer`'s Adj-RIB-In (the RIB notes the entries
    /// that changed for the decision), or `None` for a peer we do not have.
    fn import(&mut self, peer: IpAddr, update: &mut wire::Update) -> Option<()> {
        let p = self.peers.get_mut(&peer)?;
        let ebgp = p.ebgp(self.asn);
        for w in &update.withdrawn {
            self.rib.remove(peer, w);
        }
        if update.announced.is_empty() {
            return Some(());
        }
        // A path that has been through us already: our AS in an eBGP peer's
        // AS_PATH (RFC 4271 §9.1.2), our router ID as ORIGINATOR_ID or our
        // cluster ID in the CLUSTER_LIST (RFC 4456 §8).
        let a = &update.attrs;
        let looped = (ebgp && a.count_as(self.asn) > p.policy.allow_local_as as usize)
            || a.originator_id == Some(self.router_id)
            || a.cluster_list.contains(&self.cluster_id);
        let policy = Effective::of(&p.policy.import, ebgp, self.ebgp_requires_policy);
        if policy == Effective::Blocked && !p.warned_policy {
            warn!(peer = %peer, "eBGP peer has no import policy: accepting nothing (RFC 8212; set import rules or ebgp_requires_policy: false)");
            p.warned_policy = true;
        }
        match policy {
            _ if looped => {
                // Not eligible; a path it replaces goes too.
                for x in &update.announced {
                    self.rib.remove(peer, x);
                }
            }
            Effective::Blocked => {}
            Effective::AcceptAll => {
                // The UPDATE's own attributes: interned without a copy.
                let attrs = self.rib.intern(std::mem::take(&mut update.attrs));
                for x in &update.announced {
                    self.rib.insert(peer, *x, attrs.clone());
                }
            }
            Effective::Rules(rules) => {
                // Once per UPDATE, not per prefix: the prefixes share one
                // attribute set, and so do those with the same outcome.
                let mut run = PerUpdate::new(rules, a, RouteSource::Peer);
                let rib = &mut self.rib;
                for x in &update.announced {
                    match run.outcome(x, a, |changed| rib.intern(changed)) {
                        None => {
                            rib.remove(peer, x);
                        }
                        Some(attrs) => rib.insert(peer, *x, attrs),
                    }
                }
            }
        }
        Some(())
    }

    pub(super) fn mark_dirty(&mut self, prefixes: Vec<IpNet>) {
        if prefixes.is_empty() {
            return;
        }
        self.dirty.extend(prefixes);
        self.schedule_flush();
    }

    /// The decision runs when the batch interval is over.
    pub(super) fn schedule_flush(&mut self) {
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + self.batch_interval);
        }
    }

    /// The Loc-RIB's paths for `p` as the embedder sees them (learned ones only).
    pub(super) fn learned_paths(&self, p: &IpNet) -> Vec<LearnedPath> {
        learned(self.rib.best(p).as_ref())
    }

    /// Run the decision process on everything that changed since the last
    /// flush, tell the embedder, and bring every peer in line with the
    /// moved best paths (`outbound`).
    pub(super) fn flush(&mut self) {
        self.flush_at = None;
        if self.dirty.is_empty() && !self.rib.has_dirty() {
            return;
        }
        // Nobody listening (starling-bgpd without debug logging): build no events.
        let emit = !self.route_tx.is_closed() && (!self.defer || self.synced);
        let mut kinds = Kinds::default();
        let mut moved = Vec::new();
        let route_tx = &self.route_tx;
        let mut note = |rib: &crate::rib::Rib, p: IpNet, old: Option<Best>, new: Option<Best>| {
            if emit {
                let paths = learned(new.as_ref());
                let _ = route_tx.send(RouteEvent::Change(RouteChange { prefix: p, paths }));
            }
            kinds.note(new.as_ref(), rib);
            moved.push(Change {
                prefix: p,
                old: old.as_ref().map(Best::path),
                new: new.as_ref().map(Best::path),
            });
        };
        // The entries whose paths changed, found by index; then what was
        // named by prefix (our own prefixes, re-decisions, sweeps).
        self.rib.decide_dirty(&mut note);
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for p in dirty {
            if let Some((old, new)) = self.rib.decide_change(&p) {
                note(&self.rib, p, old, new);
            }
        }
        // A peer that holds nothing and can be sent none of the new paths
        // has nothing to withdraw either.
        let jobs = self.jobs_unchanged(|p| {
            p.sent != [0, 0] || kinds.reach(p.ebgp(self.asn), p.policy.route_reflector_client)
        });
        self.send_changes(jobs, &moved, None, false);
        drop(moved);
        self.rib.forget_retired();
        self.rib.collect_garbage();
    }
}

/// A Loc-RIB entry's paths as the embedder sees them (learned ones only).
fn learned(best: Option<&Best>) -> Vec<LearnedPath> {
    match best {
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
