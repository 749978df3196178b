//! Routing information bases: an Adj-RIB-In per peer, our originated
//! prefixes, and the Loc-RIB of best paths with their multipath sets. Path
//! attributes are interned: every distinct attribute set is stored once and
//! shared by `Arc`, which is what keeps a path to a few dozen bytes.

use crate::attrs::{Family, PathAttrs};
use crate::config::NextHopResolver;
use crate::report::RouteEntry;
use foldhash::{HashMap, HashSet};
use ipnet::IpNet;
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Local,
    Peer(IpAddr),
}

/// What the decision process needs to know about a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerMeta {
    pub ebgp: bool,
    pub router_id: Ipv4Addr,
    pub rr_client: bool,
}

/// One path of a prefix.
#[derive(Clone, Debug, PartialEq)]
pub struct Path {
    pub source: Source,
    pub attrs: Arc<PathAttrs>,
}

/// The Loc-RIB entry of a prefix: the best path, and the other members of
/// its multipath set (at most `max_paths` in all, distinct next hops).
/// `multipath` holds only the others, so a single best path allocates nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Best {
    pub source: Source,
    pub attrs: Arc<PathAttrs>,
    pub multipath: Option<Box<Vec<Path>>>,
}

#[derive(Default)]
pub struct Rib {
    local: BTreeSet<IpNet>,
    adj_in: HashMap<IpAddr, HashMap<IpNet, Arc<PathAttrs>>>,
    meta: HashMap<IpAddr, PeerMeta>,
    /// What we knew of peers dropped since the last flush: the Loc-RIB may
    /// still hold their paths, and export needs to know what those paths
    /// were exported as to withdraw them (see `meta_any`).
    retired: HashMap<IpAddr, PeerMeta>,
    /// Routes kept for a restarting peer (RFC 4724 §4.2) until it refreshes them.
    stale: HashMap<IpAddr, HashSet<IpNet>>,
    loc: HashMap<IpNet, Best>,
    interned: HashSet<Arc<PathAttrs>>,
    /// Interned sets left by the last collection: the next one is due when
    /// the set has doubled since (amortised O(1) per interned set).
    interned_after_gc: usize,
    pub max_paths: usize,
    pub resolver: Option<Arc<dyn NextHopResolver>>,
    /// Candidate buffer reused by `decide`.
    scratch: Vec<(Path, u32)>,
}

impl Best {
    /// The best path alone.
    pub fn path(&self) -> Path {
        Path {
            source: self.source,
            attrs: self.attrs.clone(),
        }
    }

    /// The multipath set, best first: (source, attributes).
    pub fn members(&self) -> impl Iterator<Item = (Source, &Arc<PathAttrs>)> {
        std::iter::once((self.source, &self.attrs)).chain(
            self.multipath
                .iter()
                .flat_map(|v| v.iter())
                .map(|m| (m.source, &m.attrs)),
        )
    }
}

impl Rib {
    pub fn new(max_paths: usize, resolver: Option<Arc<dyn NextHopResolver>>) -> Rib {
        Rib {
            max_paths: max_paths.max(1),
            resolver,
            ..Default::default()
        }
    }

    /// One shared copy of an attribute set.
    pub fn intern(&mut self, attrs: PathAttrs) -> Arc<PathAttrs> {
        if let Some(a) = self.interned.get(&attrs) {
            return a.clone();
        }
        let a = Arc::new(attrs);
        self.interned.insert(a.clone());
        a
    }

    /// Forget attribute sets nobody uses any more, once enough may have
    /// gone out of use to be worth the walk: whenever the interned set has
    /// doubled (plus 1024) since the last collection. One prefix flapping
    /// with a new MED each time thus keeps the count bounded, where a rule
    /// on the size of one flush never collected for it.
    pub fn collect_garbage(&mut self) {
        if self.interned.len() <= 2 * self.interned_after_gc + 1024 {
            return;
        }
        self.interned.retain(|a| Arc::strong_count(a) > 1);
        self.interned_after_gc = self.interned.len();
    }

    pub fn originate(&mut self, p: IpNet) -> bool {
        self.local.insert(p)
    }

    pub fn stop_originating(&mut self, p: IpNet) -> bool {
        self.local.remove(&p)
    }

    /// Record what we know of `peer`; returns what we knew before.
    pub fn set_peer(&mut self, peer: IpAddr, meta: PeerMeta) -> Option<PeerMeta> {
        self.retired.remove(&peer);
        self.meta.insert(peer, meta)
    }

    pub fn meta(&self, peer: IpAddr) -> Option<&PeerMeta> {
        self.meta.get(&peer)
    }

    /// `meta`, or for a peer dropped since the last `forget_retired`, what
    /// we knew of it then: the Loc-RIB keeps its paths until the next
    /// decision, and what they were exported as is derived with this.
    pub fn meta_any(&self, peer: IpAddr) -> Option<&PeerMeta> {
        self.meta.get(&peer).or_else(|| self.retired.get(&peer))
    }

    /// The decision has run on everything dropped peers had: their paths
    /// are out of the Loc-RIB.
    pub fn forget_retired(&mut self) {
        self.retired.clear();
    }

    pub fn insert(&mut self, peer: IpAddr, p: IpNet, attrs: Arc<PathAttrs>) {
        self.adj_in.entry(peer).or_default().insert(p, attrs);
        if let Some(s) = self.stale.get_mut(&peer) {
            s.remove(&p);
        }
    }

    pub fn remove(&mut self, peer: IpAddr, p: &IpNet) -> bool {
        if let Some(s) = self.stale.get_mut(&peer) {
            s.remove(p);
        }
        self.adj_in
            .get_mut(&peer)
            .is_some_and(|m| m.remove(p).is_some())
    }

    /// Drop everything learned from `peer`; returns the prefixes affected.
    pub fn drop_peer(&mut self, peer: IpAddr) -> Vec<IpNet> {
        self.stale.remove(&peer);
        if let Some(m) = self.meta.remove(&peer) {
            self.retired.insert(peer, m);
        }
        self.adj_in
            .remove(&peer)
            .map(|m| m.into_keys().collect())
            .unwrap_or_default()
    }

    /// Mark every route of `peer` stale (its session went down gracefully).
    pub fn mark_stale(&mut self, peer: IpAddr) -> usize {
        let keys: HashSet<IpNet> = self
            .adj_in
            .get(&peer)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        let n = keys.len();
        self.stale.insert(peer, keys);
        n
    }

    pub fn stale_count(&self, peer: IpAddr) -> usize {
        self.stale.get(&peer).map(|s| s.len()).unwrap_or(0)
    }

    /// Remove the routes of `peer` still stale, of `family` or of every
    /// family; returns the prefixes removed.
    pub fn sweep_stale(&mut self, peer: IpAddr, family: Option<Family>) -> Vec<IpNet> {
        let Some(stale) = self.stale.get_mut(&peer) else {
            return vec![];
        };
        let gone: Vec<IpNet> = stale
            .iter()
            .filter(|p| family.is_none_or(|f| Family::of(p) == f))
            .copied()
            .collect();
        for p in &gone {
            stale.remove(p);
        }
        if stale.is_empty() {
            self.stale.remove(&peer);
        }
        if let Some(m) = self.adj_in.get_mut(&peer) {
            for p in &gone {
                m.remove(p);
            }
        }
        gone
    }

    pub fn received_count(&self, peer: IpAddr) -> usize {
        self.adj_in.get(&peer).map(|m| m.len()).unwrap_or(0)
    }

    /// (Loc-RIB prefixes, paths in all Adj-RIBs-In, interned attribute sets).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.loc.len(),
            self.adj_in.values().map(|m| m.len()).sum(),
            self.interned.len(),
        )
    }

    pub fn best(&self, p: &IpNet) -> Option<&Best> {
        self.loc.get(p)
    }

    /// The Loc-RIB entries of `prefixes`, for export.
    pub fn items(&self, prefixes: Vec<IpNet>) -> Vec<(IpNet, Option<Best>)> {
        prefixes
            .into_iter()
            .map(|p| (p, self.loc.get(&p).cloned()))
            .collect()
    }

    /// The best paths of `prefixes` (without their multipath sets), for export.
    pub fn best_paths(&self, prefixes: Vec<IpNet>) -> Vec<(IpNet, Option<Path>)> {
        prefixes
            .into_iter()
            .map(|p| (p, self.loc.get(&p).map(Best::path)))
            .collect()
    }

    /// The Loc-RIB entries whose best path came from `peer`.
    pub fn best_paths_from(&self, peer: IpAddr) -> Vec<(IpNet, Path)> {
        self.loc
            .iter()
            .filter(|(_, b)| b.source == Source::Peer(peer))
            .map(|(p, b)| (*p, b.path()))
            .collect()
    }

    pub fn all_prefixes(&self) -> Vec<IpNet> {
        self.loc.keys().copied().collect()
    }

    /// Every prefix anyone has a path for (for a full re-decision).
    pub fn known_prefixes(&self) -> Vec<IpNet> {
        let mut all: HashSet<IpNet> = self.local.iter().copied().collect();
        for m in self.adj_in.values() {
            all.extend(m.keys().copied());
        }
        all.into_iter().collect()
    }

    pub fn prefixes_of(&self, f: Family) -> Vec<IpNet> {
        self.loc
            .keys()
            .filter(|p| Family::of(p) == f)
            .copied()
            .collect()
    }

    /// IGP cost to the path's next hop, or `None` when it is unreachable.
    fn cost(&self, path: &Path) -> Option<u32> {
        match (&self.resolver, path.source, path.attrs.next_hop) {
            (_, Source::Local, _) => Some(0),
            (None, _, _) => Some(0),
            (Some(r), _, Some(nh)) => r.resolve(nh),
            (Some(_), _, None) => None,
        }
    }

    /// Run the decision process for `p`. Returns `Some(new entry)` when the
    /// best path or multipath set changed (`Some(None)`: no path left),
    /// `None` when nothing changed.
    pub fn decide(&mut self, p: &IpNet) -> Option<Option<Best>> {
        self.decide_change(p).map(|(_, new)| new)
    }

    /// `decide`, with the entry it replaced: `Some((old, new))` on a change.
    #[allow(clippy::type_complexity)]
    pub fn decide_change(&mut self, p: &IpNet) -> Option<(Option<Best>, Option<Best>)> {
        let mut cands = std::mem::take(&mut self.scratch);
        cands.clear();
        if self.local.contains(p) {
            let attrs = self.intern(PathAttrs::default());
            cands.push((
                Path {
                    source: Source::Local,
                    attrs,
                },
                0,
            ));
        } else {
            for (peer, table) in &self.adj_in {
                let Some(attrs) = table.get(p) else { continue };
                let path = Path {
                    source: Source::Peer(*peer),
                    attrs: attrs.clone(),
                };
                if let Some(cost) = self.cost(&path) {
                    cands.push((path, cost));
                }
            }
        }
        let best = if cands.is_empty() {
            None
        } else {
            if cands.len() > 1 {
                drop_med_losers(&mut cands);
                cands.sort_by(|a, b| self.prefer(a, b));
            }
            let first = &cands[0];
            let mut multipath: Vec<Path> = Vec::new();
            for c in &cands[1..] {
                if multipath.len() + 1 >= self.max_paths {
                    break;
                }
                if self.multipath_equal(first, c)
                    && c.0.attrs.next_hop != first.0.attrs.next_hop
                    && !multipath
                        .iter()
                        .any(|m| m.attrs.next_hop == c.0.attrs.next_hop)
                {
                    multipath.push(c.0.clone());
                }
            }
            Some(Best {
                source: first.0.source,
                attrs: first.0.attrs.clone(),
                multipath: (!multipath.is_empty()).then(|| Box::new(multipath)),
            })
        };
        self.scratch = cands;
        if self.loc.get(p) == best.as_ref() {
            return None;
        }
        let old = match &best {
            Some(b) => self.loc.insert(*p, b.clone()),
            None => self.loc.remove(p),
        };
        Some((old, best))
    }

    fn is_ebgp(&self, s: Source) -> bool {
        match s {
            Source::Peer(p) => self.meta.get(&p).is_some_and(|m| m.ebgp),
            Source::Local => false,
        }
    }

    /// RFC 4271 §9.1.2.2 a-e plus the IGP cost: paths equal here may share
    /// the multipath set.
    fn multipath_equal(&self, a: &(Path, u32), b: &(Path, u32)) -> bool {
        self.compare_through_cost(a, b) == Ordering::Equal
    }

    fn compare_through_cost(&self, (a, ca): &(Path, u32), (b, cb): &(Path, u32)) -> Ordering {
        let local = |x: &Path| matches!(x.source, Source::Local);
        let lp = |x: &Path| x.attrs.local_pref.unwrap_or(100);
        local(b)
            .cmp(&local(a))
            .then(lp(b).cmp(&lp(a)))
            .then(a.attrs.as_path_len().cmp(&b.attrs.as_path_len()))
            .then(a.attrs.origin.cmp(&b.attrs.origin))
            .then_with(|| {
                // c) MED only between paths from the same neighbouring AS; a
                // missing MED is the lowest (RFC 4271 §9.1.2.2 c).
                if a.attrs.neighbor_as() == b.attrs.neighbor_as() {
                    a.attrs.med.unwrap_or(0).cmp(&b.attrs.med.unwrap_or(0))
                } else {
                    Ordering::Equal
                }
            })
            .then(self.is_ebgp(b.source).cmp(&self.is_ebgp(a.source)))
            .then(ca.cmp(cb))
    }

    /// `Less` when `a` is preferred over `b`: RFC 4271 §9.1.2.2 with the
    /// RFC 4456 §9 tie-breaks (ORIGINATOR_ID in place of the BGP identifier,
    /// then the shorter CLUSTER_LIST), then the lower peer address.
    fn prefer(&self, a: &(Path, u32), b: &(Path, u32)) -> Ordering {
        let id = |x: &Path| -> u32 {
            match x.source {
                Source::Local => 0,
                Source::Peer(p) => x
                    .attrs
                    .originator_id
                    .or_else(|| self.meta.get(&p).map(|m| m.router_id))
                    .map(u32::from)
                    .unwrap_or(u32::MAX),
            }
        };
        let addr = |x: &Path| match x.source {
            Source::Peer(p) => Some(p),
            Source::Local => None,
        };
        self.compare_through_cost(a, b)
            .then(id(&a.0).cmp(&id(&b.0)))
            .then(
                a.0.attrs
                    .cluster_list
                    .len()
                    .cmp(&b.0.attrs.cluster_list.len()),
            )
            .then(addr(&a.0).cmp(&addr(&b.0)))
    }

    /// Every path we hold, for `show routes`.
    pub fn entries(&self) -> Vec<RouteEntry> {
        let entry = |prefix: IpNet, peer: String, a: &PathAttrs, flags: [bool; 3]| RouteEntry {
            prefix,
            peer,
            next_hop: a.next_hop,
            as_path: a.as_path_flat(),
            origin: format!("{:?}", a.origin).to_lowercase(),
            local_pref: a.local_pref,
            med: a.med,
            communities: a.communities.clone(),
            best: flags[0],
            stale: flags[1],
            multipath: flags[2],
        };
        let mut out = Vec::new();
        for p in &self.local {
            out.push(entry(
                *p,
                "local".into(),
                &PathAttrs::default(),
                [true, false, true],
            ));
        }
        for (peer, table) in &self.adj_in {
            let stale = self.stale.get(peer);
            for (p, a) in table {
                let loc = self.loc.get(p);
                let best = matches!(loc, Some(Best { source: Source::Peer(b), .. }) if b == peer);
                let multipath =
                    loc.is_some_and(|b| b.members().any(|m| m.0 == Source::Peer(*peer)));
                let is_stale = stale.is_some_and(|s| s.contains(p));
                out.push(entry(*p, peer.to_string(), a, [best, is_stale, multipath]));
            }
        }
        out.sort_by(|a, b| a.prefix.cmp(&b.prefix).then(a.peer.cmp(&b.peer)));
        out
    }
}

/// RFC 4271 §9.1.2.2 c: a path is out when another with the same
/// LOCAL_PREF, AS_PATH length and ORIGIN from the same neighbouring AS has
/// a lower MED (a missing MED is 0). Done as an elimination before the
/// sort, because MED compared only within one neighbouring AS is no total
/// order: paths from two ASes can form a cycle (A beats C beats B beats
/// A), and a sort would then pick a best path that depends on the order the
/// candidates happen to be in. What is left compares MED as equal wherever
/// it compares it at all. Removing one path at a time is enough: a path
/// that beat another is only ever removed by one with a still lower MED,
/// which beats that other one too.
fn drop_med_losers(cands: &mut Vec<(Path, u32)>) {
    let key = |x: &Path| {
        (
            x.attrs.local_pref.unwrap_or(100),
            x.attrs.as_path_len(),
            x.attrs.origin,
            x.attrs.neighbor_as(),
        )
    };
    let med = |x: &Path| x.attrs.med.unwrap_or(0);
    // The common case (one MED for all, usually none) costs one pass.
    if cands.iter().all(|(c, _)| med(c) == med(&cands[0].0)) {
        return;
    }
    let mut k = 0;
    while k < cands.len() {
        let c = &cands[k].0;
        if cands
            .iter()
            .any(|(s, _)| med(s) < med(c) && key(s) == key(c))
        {
            cands.swap_remove(k);
        } else {
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::{AsSegment, SegmentKind};

    fn path(asns: &[u32], lp: Option<u32>, nh: &str) -> PathAttrs {
        PathAttrs {
            as_path: vec![AsSegment {
                kind: SegmentKind::Sequence,
                asns: asns.to_vec(),
            }],
            local_pref: lp,
            next_hop: Some(nh.parse().unwrap()),
            ..Default::default()
        }
    }

    fn meta(r: &mut Rib, peer: &str, ebgp: bool, id: &str) -> IpAddr {
        let a: IpAddr = peer.parse().unwrap();
        r.set_peer(
            a,
            PeerMeta {
                ebgp,
                router_id: id.parse().unwrap(),
                rr_client: false,
            },
        );
        a
    }

    const P: &str = "10.0.0.0/24";

    #[test]
    fn interning_shares_one_copy() {
        let mut r = Rib::default();
        let a = r.intern(path(&[1], None, "192.0.2.1"));
        let b = r.intern(path(&[1], None, "192.0.2.1"));
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn decision_prefers_local_pref_then_shorter_path() {
        let mut r = Rib::new(1, None);
        let p: IpNet = P.parse().unwrap();
        let x = meta(&mut r, "192.0.2.2", false, "192.0.2.2");
        let y = meta(&mut r, "192.0.2.3", false, "192.0.2.3");
        let a = r.intern(path(&[1, 2, 3], Some(200), "192.0.2.2"));
        let b = r.intern(path(&[1], Some(100), "192.0.2.3"));
        r.insert(x, p, a);
        r.insert(y, p, b);
        assert_eq!(r.decide(&p).unwrap().unwrap().source, Source::Peer(x));
        r.remove(x, &p);
        assert_eq!(r.decide(&p).unwrap().unwrap().source, Source::Peer(y));
        assert_eq!(r.decide(&p), None, "unchanged: no event");
        r.remove(y, &p);
        assert_eq!(r.decide(&p), Some(None));
    }

    #[test]
    fn ebgp_beats_ibgp_and_med_compares_within_one_neighbour_as() {
        let mut r = Rib::new(1, None);
        let p: IpNet = P.parse().unwrap();
        let i = meta(&mut r, "192.0.2.2", false, "192.0.2.2");
        let e = meta(&mut r, "192.0.2.3", true, "192.0.2.3");
        let a = r.intern(path(&[65001], None, "192.0.2.2"));
        let b = r.intern(path(&[65001], None, "192.0.2.3"));
        r.insert(i, p, a);
        r.insert(e, p, b);
        assert_eq!(r.decide(&p).unwrap().unwrap().source, Source::Peer(e));
        let mut lower_med = path(&[65001], None, "192.0.2.2");
        lower_med.med = Some(1);
        let mut higher_med = path(&[65001], None, "192.0.2.3");
        higher_med.med = Some(50);
        let (a, b) = (r.intern(lower_med), r.intern(higher_med));
        r.insert(i, p, a);
        r.insert(e, p, b);
        assert_eq!(
            r.decide(&p).unwrap().unwrap().source,
            Source::Peer(i),
            "MED before eBGP/iBGP"
        );
    }

    #[test]
    fn med_is_applied_as_the_rfc_eliminates_not_as_a_sort_key() {
        // A and B come from the same neighbouring AS, C from another: A
        // beats C (lower router ID), C beats B, B beats A (lower MED), a
        // cycle. §9.1.2.2 c takes A out first (B has the lower MED in its
        // AS); of B and C, C has the lower router ID. Whatever order the
        // paths arrive in, C is the best path.
        let peers = ["192.0.2.2", "192.0.2.3", "192.0.2.4"];
        let orders = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        for order in orders {
            let mut r = Rib::new(1, None);
            let p: IpNet = P.parse().unwrap();
            let mut a = path(&[65001], None, "192.0.2.2");
            a.med = Some(10);
            let c = path(&[65002], None, "192.0.2.3");
            let mut b = path(&[65001], None, "192.0.2.4");
            b.med = Some(5);
            let paths = [a, c, b];
            for i in order {
                let x = meta(&mut r, peers[i], true, peers[i]);
                let attrs = r.intern(paths[i].clone());
                r.insert(x, p, attrs);
            }
            assert_eq!(
                r.decide(&p).unwrap().unwrap().source,
                Source::Peer(peers[1].parse().unwrap()),
                "arrival order {order:?}"
            );
        }
    }

    #[test]
    fn originator_id_and_cluster_list_break_ties() {
        let mut r = Rib::new(1, None);
        let p: IpNet = P.parse().unwrap();
        let x = meta(&mut r, "192.0.2.2", false, "192.0.2.2");
        let y = meta(&mut r, "192.0.2.3", false, "192.0.2.3");
        let mut a = path(&[], None, "192.0.2.9");
        a.originator_id = Some("192.0.2.200".parse().unwrap());
        let mut b = path(&[], None, "192.0.2.9");
        b.originator_id = Some("192.0.2.100".parse().unwrap());
        let (ia, ib) = (r.intern(a.clone()), r.intern(b.clone()));
        r.insert(x, p, ia);
        r.insert(y, p, ib);
        assert_eq!(
            r.decide(&p).unwrap().unwrap().source,
            Source::Peer(y),
            "lower ORIGINATOR_ID wins"
        );
        b.originator_id = a.originator_id;
        b.cluster_list = vec!["192.0.2.1".parse().unwrap(), "192.0.2.5".parse().unwrap()];
        a.cluster_list = vec!["192.0.2.1".parse().unwrap()];
        let (ia, ib) = (r.intern(a), r.intern(b));
        r.insert(x, p, ia);
        r.insert(y, p, ib);
        assert_eq!(
            r.decide(&p).unwrap().unwrap().source,
            Source::Peer(x),
            "shorter CLUSTER_LIST wins"
        );
    }

    #[test]
    fn multipath_collects_equal_paths_up_to_the_limit() {
        let mut r = Rib::new(2, None);
        let p: IpNet = P.parse().unwrap();
        for (i, peer) in ["192.0.2.2", "192.0.2.3", "192.0.2.4"].iter().enumerate() {
            let a = meta(&mut r, peer, true, peer);
            let attrs = r.intern(path(&[65001 + i as u32], None, peer));
            r.insert(a, p, attrs);
        }
        let b = r.decide(&p).unwrap().unwrap();
        let set: Vec<_> = b.members().collect();
        assert_eq!(set.len(), 2);
        assert_ne!(set[0].1.next_hop, set[1].1.next_hop);
    }

    struct Only(IpAddr);
    impl NextHopResolver for Only {
        fn resolve(&self, nh: IpAddr) -> Option<u32> {
            (nh == self.0).then_some(10)
        }
    }

    #[test]
    fn unreachable_next_hops_are_not_eligible() {
        let mut r = Rib::new(1, Some(Arc::new(Only("192.0.2.3".parse().unwrap()))));
        let p: IpNet = P.parse().unwrap();
        let x = meta(&mut r, "192.0.2.2", false, "192.0.2.2");
        let y = meta(&mut r, "192.0.2.3", false, "192.0.2.3");
        let a = r.intern(path(&[], Some(500), "192.0.2.2"));
        let b = r.intern(path(&[], Some(100), "192.0.2.3"));
        r.insert(x, p, a);
        r.insert(y, p, b);
        assert_eq!(r.decide(&p).unwrap().unwrap().source, Source::Peer(y));
    }

    #[test]
    fn stale_routes_survive_until_swept() {
        let mut r = Rib::new(1, None);
        let p: IpNet = P.parse().unwrap();
        let q: IpNet = "10.0.1.0/24".parse().unwrap();
        let x = meta(&mut r, "192.0.2.2", false, "192.0.2.2");
        let a = r.intern(path(&[], None, "192.0.2.2"));
        r.insert(x, p, a.clone());
        r.insert(x, q, a.clone());
        assert_eq!(r.mark_stale(x), 2);
        r.insert(x, p, a); // refreshed after the restart
        assert_eq!(r.sweep_stale(x, Some(Family::Ipv4)), vec![q]);
        assert_eq!(r.received_count(x), 1);
    }

    #[test]
    fn local_prefix_wins() {
        let mut r = Rib::new(1, None);
        let p: IpNet = P.parse().unwrap();
        let x = meta(&mut r, "192.0.2.2", false, "192.0.2.2");
        let a = r.intern(path(&[], Some(1000), "192.0.2.2"));
        r.insert(x, p, a);
        r.originate(p);
        assert_eq!(r.decide(&p).unwrap().unwrap().source, Source::Local);
    }
}
