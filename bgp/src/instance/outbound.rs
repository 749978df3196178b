//! The outbound side without an Adj-RIB-Out. What a peer holds is derived,
//! never stored: it is the export rules run on the Loc-RIB with the peer's
//! outbound settings. Every change of either side (a best path moves, a
//! peer's export policy, reflection or next-hop-self changes, the cluster
//! ID changes, what we know of the peer a path came from changes) runs the
//! rules on the before and the after and sends the difference: an
//! announcement, a withdrawal or nothing. A session coming up or a
//! ROUTE-REFRESH takes "nothing" as the before, so the peer gets the table.
//!
//! Peers with the same outbound settings form a group: the rules run once
//! per prefix for the group, and the UPDATEs are encoded once and shared by
//! every member that gets the same bytes. Only a member a path came from
//! (it never gets its own path back) is handled on its own, for those
//! prefixes alone.
//!
//! The one piece of state per peer is a count of the prefixes advertised,
//! by family, for the session table and to skip peers that hold nothing.

use super::Instance;
use crate::attrs::{Family, PathAttrs};
use crate::export::{ExportTo, export_path};
use crate::policy::{Effective, PolicyRule};
use crate::rib::{Path, PeerMeta, Rib, Source};
use crate::session::{Batch, Negotiated, ToSession};
use crate::wire;
use bytes::{Bytes, BytesMut};
use foldhash::{HashMap, HashSet};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use tracing::warn;

/// One prefix before and after: its best path, or none.
pub(super) struct Change {
    pub prefix: IpNet,
    pub old: Option<Path>,
    pub new: Option<Path>,
}

/// A peer's outbound settings: everything the export rules and the
/// encoding depend on but the peer's address. Peers with equal ones get the
/// same exports (but for their own paths).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Spec {
    pub ebgp: bool,
    pub rr_client: bool,
    pub next_hop_self: bool,
    pub next_hop_keep: bool,
    pub tags: Vec<crate::policy::PrefixCommunities>,
    pub local_asn: u32,
    pub cluster_id: Ipv4Addr,
    pub export: Option<Vec<PolicyRule>>,
    pub requires_policy: bool,
    pub local_addr: IpAddr,
    pub families: Vec<Family>,
    pub four_octet: bool,
    pub max_len: usize,
}

/// One peer to bring in line: its settings before (`None`: it holds
/// nothing, as after a session came up or asked for a refresh) and now.
pub(super) struct Job {
    pub addr: IpAddr,
    pub old: Option<Spec>,
    pub new: Spec,
}

/// What we knew of a source peer before a change, when it differs from
/// what we know now (its router ID or client status changed).
pub(super) type MetaBefore = Option<(IpAddr, PeerMeta)>;

/// Index of a family in the per-peer counts.
pub(super) fn fam_idx(f: Family) -> usize {
    match f {
        Family::Ipv4 => 0,
        Family::Ipv6 => 1,
    }
}

impl Spec {
    pub fn of(
        ebgp: bool,
        policy: &crate::config::PeerPolicy,
        inst: (u32, Ipv4Addr, bool),
        neg: &Negotiated,
    ) -> Spec {
        Spec {
            ebgp,
            rr_client: policy.route_reflector_client,
            next_hop_self: policy.next_hop_self,
            next_hop_keep: policy.next_hop_keep,
            tags: policy.prefix_communities.clone(),
            local_asn: inst.0,
            cluster_id: inst.1,
            export: policy.export.clone(),
            requires_policy: inst.2,
            local_addr: neg.local_addr,
            families: neg.families.clone(),
            four_octet: neg.four_octet,
            max_len: neg.max_len,
        }
    }

    fn policy(&self) -> Effective<'_> {
        Effective::of(&self.export, self.ebgp, self.requires_policy)
    }

    /// What a member of the group is sent for `path`, the member not being
    /// the path's source (the caller handles that).
    fn export(
        &self,
        path: Option<&Path>,
        from: Option<&PeerMeta>,
        prefix: &IpNet,
    ) -> Option<PathAttrs> {
        let path = path?;
        if !self.families.contains(&Family::of(prefix)) {
            return None;
        }
        let to = ExportTo {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ebgp: self.ebgp,
            rr_client: self.rr_client,
            next_hop_self: self.next_hop_self,
            next_hop_keep: self.next_hop_keep,
            tags: &self.tags,
            local_asn: self.local_asn,
            cluster_id: self.cluster_id,
            local_addr: self.local_addr,
        };
        export_path(path.source, &path.attrs, from, &to, self.policy(), prefix)
    }
}

/// The UPDATEs for one set of recipients, being built: announcements that
/// share an attribute set, keyed by family and the interned Arc's address
/// (equal sets are the same Arc), withdrawals by family, and how the
/// count of advertised prefixes moves.
#[derive(Default)]
struct Pending {
    announce: HashMap<(Family, usize), (Arc<PathAttrs>, Vec<IpNet>)>,
    withdraw: HashMap<Family, Vec<IpNet>>,
    delta: [i64; 2],
}

impl Pending {
    fn push(&mut self, rib: &mut Rib, prefix: IpNet, old: bool, new: Option<&PathAttrs>) {
        let family = Family::of(&prefix);
        match new {
            Some(a) => {
                let a = rib.intern(a.clone());
                let key = (family, Arc::as_ptr(&a) as usize);
                self.announce
                    .entry(key)
                    .or_insert_with(|| (a, Vec::new()))
                    .1
                    .push(prefix);
                if !old {
                    self.delta[fam_idx(family)] += 1;
                }
            }
            None => {
                self.withdraw.entry(family).or_default().push(prefix);
                self.delta[fam_idx(family)] -= 1;
            }
        }
    }

    /// The UPDATEs: withdrawals first, then announcements packed by
    /// attribute set.
    ///
    /// An attribute set that does not fit the peers' maximum message size
    /// (RFC 4271 §4.1, RFC 8654) is never sent over-long: its prefixes are
    /// withdrawn instead (the peer may hold an older path for them). The
    /// same set would not fit the next time either, so deriving what the
    /// peer holds from the rules stays right for every later change.
    fn encode(self, spec: &Spec, who: &str) -> Vec<Vec<u8>> {
        let mut withdraw = self.withdraw;
        let mut announcements = Vec::new();
        for ((family, _), (attrs, prefixes)) in self.announce {
            let msgs = wire::encode_announce(
                family,
                &prefixes,
                &attrs,
                spec.four_octet,
                !spec.ebgp,
                spec.max_len,
            );
            if msgs.iter().any(|m| m.is_empty() || m.len() > spec.max_len) {
                warn!(
                    peer = %who,
                    %family,
                    prefixes = prefixes.len(),
                    first = %prefixes[0],
                    "an attribute set does not fit the peer's maximum message size of {} octets: withdrawing its prefixes instead",
                    spec.max_len
                );
                withdraw.entry(family).or_default().extend(prefixes);
                continue;
            }
            announcements.extend(msgs);
        }
        let mut out = Vec::new();
        for (family, prefixes) in withdraw {
            out.extend(wire::encode_withdraw(family, &prefixes, spec.max_len));
        }
        out.extend(announcements);
        out
    }
}

/// Encoded UPDATEs and who gets them: every member of the group but the
/// (at most two) excluded, or one member.
struct Out {
    to: Recipients,
    msgs: Vec<Vec<u8>>,
    delta: [i64; 2],
}

enum Recipients {
    AllBut([Option<IpAddr>; 2]),
    One(IpAddr),
}

/// Each member's batch for one flush: the group's shared UPDATEs are
/// concatenated into one buffer, and a member gets it whole but for the
/// ranges that exclude it (its own paths), then its own UPDATEs, then
/// End-of-RIB. One channel message per member, however many UPDATEs.
fn member_batches(
    members: &[IpAddr],
    outs: Vec<Out>,
    eor: Option<Bytes>,
) -> Vec<(IpAddr, Batch, [i64; 2])> {
    let mut shared = BytesMut::new();
    let mut total = [0i64; 2];
    // The ranges of `shared` each member is not to get, with their deltas.
    let mut excluded: HashMap<IpAddr, Vec<(usize, usize, [i64; 2])>> = HashMap::default();
    let mut own: HashMap<IpAddr, (Vec<Vec<u8>>, [i64; 2])> = HashMap::default();
    for o in outs {
        match o.to {
            Recipients::AllBut(x) => {
                let start = shared.len();
                o.msgs.iter().for_each(|m| shared.extend_from_slice(m));
                let range = (start, shared.len(), o.delta);
                for m in x.into_iter().flatten() {
                    excluded.entry(m).or_default().push(range);
                }
                total[0] += o.delta[0];
                total[1] += o.delta[1];
            }
            Recipients::One(m) => {
                let e = own.entry(m).or_default();
                e.0.extend(o.msgs);
                e.1[0] += o.delta[0];
                e.1[1] += o.delta[1];
            }
        }
    }
    let shared = shared.freeze();
    let mut out = Vec::with_capacity(members.len());
    for m in members {
        let mut batch = Batch::default();
        let mut delta = total;
        let mut at = 0;
        let mut ranges = excluded.remove(m).unwrap_or_default();
        ranges.sort_unstable_by_key(|r| r.0);
        for (start, end, d) in ranges {
            batch.push(shared.slice(at..start.max(at)));
            at = end.max(at);
            delta[0] -= d[0];
            delta[1] -= d[1];
        }
        batch.push(shared.slice(at..));
        if let Some((msgs, d)) = own.remove(m) {
            batch.push(Bytes::from(msgs.concat()));
            delta[0] += d[0];
            delta[1] += d[1];
        }
        if let Some(e) = &eor {
            batch.push(e.clone());
        }
        out.push((*m, batch, delta));
    }
    out
}

/// The source peer of a path, when it is a member of the group.
fn member_source(path: Option<&Path>, members: &HashSet<IpAddr>) -> Option<IpAddr> {
    match path?.source {
        Source::Peer(a) if members.contains(&a) => Some(a),
        _ => None,
    }
}

/// The rules run once per prefix for a group of peers with equal settings
/// (`old`, `new`); the differences go into shared buckets keyed by the
/// members excluded from them, and for an excluded member (the path's
/// source) into its own.
fn group_out(
    rib: &mut Rib,
    (old, new): (Option<&Spec>, &Spec),
    members: &[IpAddr],
    changes: &[Change],
    before: MetaBefore,
) -> Vec<Out> {
    let set: HashSet<IpAddr> = members.iter().copied().collect();
    let mut shared: HashMap<[Option<IpAddr>; 2], Pending> = HashMap::default();
    let mut own: HashMap<IpAddr, Pending> = HashMap::default();
    let meta_old = |rib: &Rib, p: Option<&Path>| -> Option<PeerMeta> {
        let Source::Peer(a) = p?.source else {
            return None;
        };
        match before {
            Some((b, m)) if b == a => Some(m),
            _ => rib.meta_any(a).copied(),
        }
    };
    let meta_new = |rib: &Rib, p: Option<&Path>| -> Option<PeerMeta> {
        let Source::Peer(a) = p?.source else {
            return None;
        };
        rib.meta_any(a).copied()
    };
    for c in changes {
        let o = old.and_then(|s| {
            s.export(
                c.old.as_ref(),
                meta_old(rib, c.old.as_ref()).as_ref(),
                &c.prefix,
            )
        });
        let n = new.export(
            c.new.as_ref(),
            meta_new(rib, c.new.as_ref()).as_ref(),
            &c.prefix,
        );
        let os = member_source(c.old.as_ref(), &set).filter(|_| old.is_some());
        let ns = member_source(c.new.as_ref(), &set);
        let mut key = [os, ns];
        if key[0] == key[1] {
            key[1] = None;
        }
        key.sort();
        if o != n {
            shared
                .entry(key)
                .or_default()
                .push(rib, c.prefix, o.is_some(), n.as_ref());
        }
        for m in key.into_iter().flatten() {
            let om = if os == Some(m) { None } else { o.as_ref() };
            let nm = if ns == Some(m) { None } else { n.as_ref() };
            if om != nm {
                own.entry(m)
                    .or_default()
                    .push(rib, c.prefix, om.is_some(), nm);
            }
        }
    }
    let who = match members {
        [one] => one.to_string(),
        [first, ..] => format!(
            "{first} (and {} more with the same settings)",
            members.len() - 1
        ),
        [] => return vec![],
    };
    let mut out = Vec::new();
    for (key, p) in shared {
        let delta = p.delta;
        out.push(Out {
            to: Recipients::AllBut(key),
            msgs: p.encode(new, &who),
            delta,
        });
    }
    for (m, p) in own {
        let delta = p.delta;
        out.push(Out {
            to: Recipients::One(m),
            msgs: p.encode(new, &m.to_string()),
            delta,
        });
    }
    out
}

impl Instance {
    /// A peer's outbound settings, or `None` when its session is not up.
    pub(super) fn spec(&self, addr: IpAddr) -> Option<Spec> {
        let p = self.peers.get(&addr)?;
        let neg = p.negotiated.as_ref()?;
        let inst = (self.asn, self.cluster_id, self.ebgp_requires_policy);
        Some(Spec::of(p.ebgp(self.asn), &p.policy, inst, neg))
    }

    /// Bring `jobs`' peers in line for `changes`: the rules run per group of
    /// equal settings, the UPDATEs are encoded once per group and bucket,
    /// and End-of-RIB follows when asked (RFC 4724 §2).
    pub(super) fn send_changes(
        &mut self,
        jobs: Vec<Job>,
        changes: &[Change],
        before: MetaBefore,
        end_of_rib: bool,
    ) {
        let mut groups: Vec<(Option<Spec>, Spec, Vec<IpAddr>)> = Vec::new();
        for j in jobs {
            self.warn_blocked(j.addr, &j.new, !changes.is_empty());
            match groups.iter_mut().find(|g| g.0 == j.old && g.1 == j.new) {
                Some(g) => g.2.push(j.addr),
                None => groups.push((j.old, j.new, vec![j.addr])),
            }
        }
        for (old, new, members) in groups {
            let outs = if changes.is_empty() {
                vec![]
            } else {
                group_out(
                    &mut self.rib,
                    (old.as_ref(), &new),
                    &members,
                    changes,
                    before,
                )
            };
            let eor = end_of_rib.then(|| {
                let eor: Vec<Vec<u8>> = new
                    .families
                    .iter()
                    .map(|f| wire::encode_end_of_rib(*f))
                    .collect();
                Bytes::from(eor.concat())
            });
            for (m, batch, delta) in member_batches(&members, outs, eor) {
                let Some(p) = self.peers.get_mut(&m) else {
                    continue;
                };
                for (i, d) in delta.iter().enumerate() {
                    p.sent[i] = (p.sent[i] as i64 + d).max(0) as usize;
                }
                if !batch.is_empty() {
                    let _ = p.tx.send(ToSession::Send(batch));
                }
            }
        }
    }

    /// RFC 8212: say once that a peer gets nothing for want of a policy.
    fn warn_blocked(&mut self, addr: IpAddr, spec: &Spec, anything: bool) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        if anything && spec.policy() == Effective::Blocked && !p.warned_policy {
            warn!(peer = %addr, "eBGP peer has no export policy: sending nothing (RFC 8212; set export rules or ebgp_requires_policy: false)");
            p.warned_policy = true;
        }
    }

    /// The whole table of `family` (or every family) to one peer, which
    /// holds nothing of it now: a session came up, or it asked for a refresh.
    pub(super) fn send_table(&mut self, addr: IpAddr, family: Option<Family>, end_of_rib: bool) {
        let Some(spec) = self.spec(addr) else { return };
        if let Some(p) = self.peers.get_mut(&addr) {
            match family {
                Some(f) => p.sent[fam_idx(f)] = 0,
                None => p.sent = [0, 0],
            }
        }
        let prefixes = match family {
            Some(f) => self.rib.prefixes_of(f),
            None => self.rib.all_prefixes(),
        };
        let changes = table(&self.rib, prefixes);
        let job = Job {
            addr,
            old: None,
            new: spec,
        };
        self.send_changes(vec![job], &changes, None, end_of_rib);
    }

    /// A peer's settings changed from `old` to its current ones (policy,
    /// reflection, next-hop-self, the cluster ID): the difference over the
    /// whole table.
    pub(super) fn resettle(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let changes = table(&self.rib, self.rib.all_prefixes());
        self.send_changes(jobs, &changes, None, false);
    }

    /// Record what we know of a source peer; when that changed (its router
    /// ID after a restart, its client status), what every peer gets of its
    /// paths is brought in line.
    pub(super) fn set_peer_meta(&mut self, addr: IpAddr, meta: PeerMeta) {
        // The paths of its last session still in the RIB were exported as
        // what we knew then, and are withdrawn by that; a new session with
        // other settings finishes their drop first.
        if self.rib.draining_from(addr) && self.rib.meta_any(addr) != Some(&meta) {
            while self.rib.draining_from(addr) {
                self.drain_step();
            }
        }
        let Some(was) = self.rib.set_peer(addr, meta) else {
            return;
        };
        if was == meta {
            return;
        }
        let changes: Vec<Change> = self
            .rib
            .best_paths_from(addr)
            .into_iter()
            .map(|(prefix, p)| Change {
                prefix,
                old: Some(p.clone()),
                new: Some(p),
            })
            .collect();
        if changes.is_empty() {
            return;
        }
        let jobs = self.jobs_unchanged(|_| true);
        self.send_changes(jobs, &changes, Some((addr, was)), false);
    }

    /// Jobs for the established peers `keep` selects, settings unchanged.
    pub(super) fn jobs_unchanged(&self, keep: impl Fn(&super::PeerEntry) -> bool) -> Vec<Job> {
        self.peers
            .iter()
            .filter(|(_, p)| keep(p))
            .filter_map(|(a, _)| {
                let s = self.spec(*a)?;
                Some(Job {
                    addr: *a,
                    old: Some(s.clone()),
                    new: s,
                })
            })
            .collect()
    }
}

/// The table as it stands, as changes from itself to itself.
fn table(rib: &Rib, prefixes: Vec<IpNet>) -> Vec<Change> {
    rib.best_paths(prefixes)
        .into_iter()
        .map(|(prefix, p)| Change {
            prefix,
            old: p.clone(),
            new: p,
        })
        .collect()
}
