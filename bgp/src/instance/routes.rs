//! Routes through the instance: UPDATEs into the Adj-RIBs-In (loop
//! detection, import policy), the batched decision process, and each peer's
//! Adj-RIB-Out kept in line with the Loc-RIB through the export rules.

use super::Instance;
use crate::attrs::{Family, PathAttrs};
use crate::export::{ExportTo, Kinds, export_attrs};
use crate::policy::{self, Effective, Outcome, RouteSource};
use crate::report::{LearnedPath, RouteChange, RouteEvent};
use crate::rib::{Best, Rib, Source};
use crate::session::{Negotiated, ToSession};
use crate::wire;
use foldhash::HashMap;
use ipnet::IpNet;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::time::Instant;
use tracing::warn;

/// Announcements that share an attribute set, keyed by family and the
/// interned Arc's address (equal sets are the same Arc, and hashing a
/// pointer is far cheaper than the attributes), and withdrawals by family.
#[derive(Default)]
struct AdjOutChanges {
    announce: HashMap<(Family, usize), (Arc<PathAttrs>, Vec<IpNet>)>,
    withdraw: HashMap<Family, Vec<IpNet>>,
}

impl Instance {
    /// An UPDATE from `peer`: withdrawals, then the announcements that pass
    /// loop detection and the import policy, then End-of-RIB.
    pub(super) fn update(&mut self, peer: IpAddr, update: wire::Update) {
        let Some(changed) = self.import(peer, &update) else {
            return;
        };
        self.mark_dirty(changed);
        self.check_max_prefixes(peer);
        if let Some(f) = update.end_of_rib {
            self.end_of_rib(peer, f);
        }
    }

    /// Apply an UPDATE to `peer`'s Adj-RIB-In; the prefixes whose paths
    /// changed, or `None` for a peer we do not have.
    fn import(&mut self, peer: IpAddr, update: &wire::Update) -> Option<Vec<IpNet>> {
        let p = self.peers.get_mut(&peer)?;
        let ebgp = p.ebgp(self.asn);
        let mut changed = Vec::with_capacity(update.withdrawn.len() + update.announced.len());
        for w in &update.withdrawn {
            if self.rib.remove(peer, w) {
                changed.push(*w);
            }
        }
        if update.announced.is_empty() {
            return Some(changed);
        }
        // A path that has been through us already: our AS in an eBGP peer's
        // AS_PATH (RFC 4271 §9.1.2), our router ID as ORIGINATOR_ID or our
        // cluster ID in the CLUSTER_LIST (RFC 4456 §8).
        let a = &update.attrs;
        let looped = (ebgp && a.contains_as(self.asn))
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
                    if self.rib.remove(peer, x) {
                        changed.push(*x);
                    }
                }
            }
            Effective::Blocked => {}
            Effective::AcceptAll => {
                let attrs = self.rib.intern(update.attrs.clone());
                for x in &update.announced {
                    self.rib.insert(peer, *x, attrs.clone());
                    changed.push(*x);
                }
            }
            Effective::Rules(rules) => {
                for x in &update.announced {
                    let mut attrs = update.attrs.clone();
                    match policy::apply(Some(rules), x, &mut attrs, RouteSource::Peer) {
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
        Some(changed)
    }

    pub(super) fn mark_dirty(&mut self, prefixes: Vec<IpNet>) {
        if prefixes.is_empty() {
            return;
        }
        self.dirty.extend(prefixes);
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + self.batch_interval);
        }
    }

    /// The Loc-RIB's paths for `p` as the embedder sees them (learned ones only).
    pub(super) fn learned_paths(&self, p: &IpNet) -> Vec<LearnedPath> {
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
    pub(super) fn flush(&mut self) {
        self.flush_at = None;
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        // Nobody listening (starling-bgpd without debug logging): build no events.
        let emit = !self.route_tx.is_closed() && (!self.defer || self.synced);
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
        self.rib.collect_garbage();
        let mut items: Option<Vec<(IpNet, Option<Best>)>> = None;
        let addrs: Vec<IpAddr> = self.peers.keys().copied().collect();
        for a in addrs {
            let Some(p) = self.peers.get(&a) else {
                continue;
            };
            let ebgp = p.ebgp(self.asn);
            if p.negotiated.is_none()
                || (p.adj_out.is_empty() && !kinds.reach(ebgp, p.policy.route_reflector_client))
            {
                continue;
            }
            let items = items.get_or_insert_with(|| self.rib.items(moved.clone()));
            self.export_items(a, items, false);
        }
    }

    /// Bring a peer's Adj-RIB-Out in line with the Loc-RIB for `prefixes`,
    /// packing announcements that share attributes into the same UPDATEs.
    pub(super) fn export_to(&mut self, addr: IpAddr, prefixes: Vec<IpNet>, end_of_rib: bool) {
        let items = self.rib.items(prefixes);
        self.export_items(addr, &items, end_of_rib);
    }

    /// `export_to` with the Loc-RIB entries in hand (a flush passes its
    /// decisions, so no peer looks a prefix up again).
    fn export_items(&mut self, addr: IpAddr, items: &[(IpNet, Option<Best>)], end_of_rib: bool) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let Some(neg) = p.negotiated.clone() else {
            return;
        };
        let ebgp = p.ebgp(self.asn);
        let policy = Effective::of(&p.policy.export, ebgp, self.ebgp_requires_policy);
        if policy == Effective::Blocked && !p.warned_policy && !items.is_empty() {
            warn!(peer = %addr, "eBGP peer has no export policy: sending nothing (RFC 8212; set export rules or ebgp_requires_policy: false)");
            p.warned_policy = true;
        }
        let to = ExportTo {
            addr,
            ebgp,
            rr_client: p.policy.route_reflector_client,
            next_hop_self: p.policy.next_hop_self,
            local_asn: self.asn,
            cluster_id: self.cluster_id,
            local_addr: neg.local_addr,
        };
        let changes = adj_out_changes(&mut p.adj_out, &mut self.rib, items, &to, policy, &neg);
        let out = changes.encode(&neg, ebgp, end_of_rib, &mut p.adj_out, addr);
        if !out.is_empty() {
            let _ = p.tx.send(ToSession::Send(out));
        }
    }
}

/// Run the export rules on `items` for one peer and record in its
/// Adj-RIB-Out what changes: only differences go out.
fn adj_out_changes(
    adj_out: &mut HashMap<IpNet, Arc<PathAttrs>>,
    rib: &mut Rib,
    items: &[(IpNet, Option<Best>)],
    to: &ExportTo,
    policy: Effective,
    neg: &Negotiated,
) -> AdjOutChanges {
    let mut changes = AdjOutChanges::default();
    for (prefix, best) in items {
        let prefix = *prefix;
        let family = Family::of(&prefix);
        if !neg.families.contains(&family) {
            continue;
        }
        let desired = best.as_ref().and_then(|b| {
            let from = match b.source {
                Source::Peer(a) => rib.meta(a),
                Source::Local => None,
            };
            export_attrs(b, from, to, policy, &prefix)
        });
        if desired.is_none() && adj_out.is_empty() {
            continue;
        }
        match desired {
            Some(attrs) => {
                if adj_out.get(&prefix).is_some_and(|a| **a == attrs) {
                    continue;
                }
                let attrs = rib.intern(attrs);
                adj_out.insert(prefix, attrs.clone());
                let key = (family, Arc::as_ptr(&attrs) as usize);
                changes
                    .announce
                    .entry(key)
                    .or_insert_with(|| (attrs, Vec::new()))
                    .1
                    .push(prefix);
            }
            None => {
                if adj_out.remove(&prefix).is_some() {
                    changes.withdraw.entry(family).or_default().push(prefix);
                }
            }
        }
    }
    changes
}

impl AdjOutChanges {
    /// The UPDATEs to send: withdrawals first, then announcements packed by
    /// attribute set, then End-of-RIB when asked (RFC 4724 §2).
    ///
    /// An attribute set that does not fit the peer's maximum message size
    /// (RFC 4271 §4.1, RFC 8654) is never sent over-long: its prefixes are
    /// withdrawn instead (the peer may hold an older path for them) and
    /// taken out of the Adj-RIB-Out, which records only what was sent.
    fn encode(
        self,
        neg: &Negotiated,
        ebgp: bool,
        end_of_rib: bool,
        adj_out: &mut HashMap<IpNet, Arc<PathAttrs>>,
        peer: IpAddr,
    ) -> Vec<Vec<u8>> {
        let mut withdraw = self.withdraw;
        let mut announcements = Vec::new();
        for ((family, _), (attrs, prefixes)) in self.announce {
            let msgs = wire::encode_announce(
                family,
                &prefixes,
                &attrs,
                neg.four_octet,
                !ebgp,
                neg.max_len,
            );
            if msgs.iter().any(|m| m.is_empty() || m.len() > neg.max_len) {
                warn!(
                    peer = %peer,
                    %family,
                    prefixes = prefixes.len(),
                    first = %prefixes[0],
                    "an attribute set does not fit the peer's maximum message size of {} octets: withdrawing its prefixes instead",
                    neg.max_len
                );
                for p in &prefixes {
                    adj_out.remove(p);
                }
                withdraw.entry(family).or_default().extend(prefixes);
                continue;
            }
            announcements.extend(msgs);
        }
        let mut out = Vec::new();
        for (family, prefixes) in withdraw {
            out.extend(wire::encode_withdraw(family, &prefixes, neg.max_len));
        }
        out.extend(announcements);
        if end_of_rib {
            out.extend(neg.families.iter().map(|f| wire::encode_end_of_rib(*f)));
        }
        out
    }
}
