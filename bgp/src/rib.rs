//! Routing information bases: an Adj-RIB-In per peer, our originated
//! prefixes, and the Loc-RIB of best paths. Path attributes are interned:
//! every distinct attribute set is stored once and shared by `Arc`.
//!
//! The decision process here is the part of RFC 4271 §9.1.2.2 that part 1
//! needs; the full process with RFC 4456 tie-breaks and multipath replaces
//! `prefer` without changing the callers.

use crate::attrs::{Family, PathAttrs};
use crate::session::LocalInfo;
use crate::speaker::RouteEntry;
use ipnet::IpNet;
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Local,
    Peer(IpAddr),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Best {
    pub source: Source,
    pub attrs: Arc<PathAttrs>,
    pub family: Family,
}

#[derive(Default)]
pub struct Rib {
    local: BTreeSet<IpNet>,
    adj_in: HashMap<IpAddr, HashMap<IpNet, Arc<PathAttrs>>>,
    peer_ebgp: HashMap<IpAddr, bool>,
    loc: HashMap<IpNet, Best>,
    interned: HashSet<Arc<PathAttrs>>,
}

impl Rib {
    /// One shared copy of an attribute set.
    pub fn intern(&mut self, attrs: PathAttrs) -> Arc<PathAttrs> {
        if let Some(a) = self.interned.get(&attrs) {
            return a.clone();
        }
        let a = Arc::new(attrs);
        self.interned.insert(a.clone());
        a
    }

    /// Forget attribute sets nobody uses any more.
    fn collect_garbage(&mut self) {
        self.interned.retain(|a| Arc::strong_count(a) > 1);
    }

    pub fn originate(&mut self, p: IpNet) -> bool {
        self.local.insert(p)
    }

    pub fn stop_originating(&mut self, p: IpNet) -> bool {
        self.local.remove(&p)
    }

    pub fn insert(&mut self, peer: IpAddr, p: IpNet, attrs: Arc<PathAttrs>, ebgp: bool) {
        self.peer_ebgp.insert(peer, ebgp);
        self.adj_in.entry(peer).or_default().insert(p, attrs);
    }

    pub fn remove(&mut self, peer: IpAddr, p: &IpNet) -> bool {
        self.adj_in
            .get_mut(&peer)
            .is_some_and(|m| m.remove(p).is_some())
    }

    /// Drop everything learned from `peer`; returns the prefixes affected.
    pub fn drop_peer(&mut self, peer: IpAddr) -> Vec<IpNet> {
        let gone: Vec<IpNet> = self
            .adj_in
            .remove(&peer)
            .map(|m| m.into_keys().collect())
            .unwrap_or_default();
        self.peer_ebgp.remove(&peer);
        gone
    }

    /// (Loc-RIB prefixes, paths in all Adj-RIBs-In, interned attribute sets).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.loc.len(),
            self.adj_in.values().map(|m| m.len()).sum(),
            self.interned.len(),
        )
    }

    pub fn received_count(&self, peer: IpAddr) -> usize {
        self.adj_in.get(&peer).map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_ebgp_path(&self, peer: IpAddr) -> bool {
        self.peer_ebgp.get(&peer).copied().unwrap_or(false)
    }

    pub fn best(&self, p: &IpNet) -> Option<&Best> {
        self.loc.get(p)
    }

    pub fn all_prefixes(&self) -> Vec<IpNet> {
        self.loc.keys().copied().collect()
    }

    pub fn prefixes_of(&self, f: Family) -> Vec<IpNet> {
        self.loc
            .keys()
            .filter(|p| Family::of(p) == f)
            .copied()
            .collect()
    }

    /// Run the decision process for `p`. Returns `Some(new best)` when the
    /// best path changed (`Some(None)`: no path left), `None` when it did not.
    pub fn decide(&mut self, p: &IpNet, _local: &LocalInfo) -> Option<Option<Best>> {
        let family = Family::of(p);
        let mut best: Option<Best> = if self.local.contains(p) {
            Some(Best {
                source: Source::Local,
                attrs: self.local_attrs(),
                family,
            })
        } else {
            None
        };
        if best.is_none() {
            for (peer, table) in &self.adj_in {
                let Some(attrs) = table.get(p) else { continue };
                let cand = Best {
                    source: Source::Peer(*peer),
                    attrs: attrs.clone(),
                    family,
                };
                best = match best {
                    Some(b) if self.prefer(&b, &cand) != Ordering::Greater => Some(b),
                    _ => Some(cand),
                };
            }
        }
        let old = self.loc.get(p);
        if old == best.as_ref() {
            return None;
        }
        match &best {
            Some(b) => {
                self.loc.insert(*p, b.clone());
            }
            None => {
                self.loc.remove(p);
                if self.loc.len().is_multiple_of(1024) {
                    self.collect_garbage();
                }
            }
        }
        Some(best)
    }

    fn local_attrs(&mut self) -> Arc<PathAttrs> {
        self.intern(PathAttrs::default())
    }

    /// `Less` when `a` is preferred over `b` (RFC 4271 §9.1.2.2).
    fn prefer(&self, a: &Best, b: &Best) -> Ordering {
        let lp = |x: &Best| x.attrs.local_pref.unwrap_or(100);
        let ebgp = |x: &Best| match x.source {
            Source::Peer(p) => self.is_ebgp_path(p),
            Source::Local => true,
        };
        let addr = |x: &Best| match x.source {
            Source::Peer(p) => Some(p),
            Source::Local => None,
        };
        lp(b)
            .cmp(&lp(a))
            .then(a.attrs.as_path_len().cmp(&b.attrs.as_path_len()))
            .then(a.attrs.origin.cmp(&b.attrs.origin))
            .then_with(|| {
                if a.attrs.neighbor_as() == b.attrs.neighbor_as() {
                    a.attrs.med.unwrap_or(0).cmp(&b.attrs.med.unwrap_or(0))
                } else {
                    Ordering::Equal
                }
            })
            .then(ebgp(b).cmp(&ebgp(a)))
            .then(addr(a).cmp(&addr(b)))
    }

    /// Every path we hold, for `show routes`.
    pub fn entries(&self) -> Vec<RouteEntry> {
        let mut out = Vec::new();
        let entry = |prefix: IpNet, peer: String, a: &PathAttrs, best: bool| RouteEntry {
            prefix,
            peer,
            next_hop: a.next_hop,
            as_path: a.as_path_flat(),
            origin: format!("{:?}", a.origin).to_lowercase(),
            local_pref: a.local_pref,
            med: a.med,
            communities: a.communities.clone(),
            best,
        };
        for p in &self.local {
            out.push(entry(*p, "local".into(), &PathAttrs::default(), true));
        }
        for (peer, table) in &self.adj_in {
            for (p, a) in table {
                let best = matches!(self.loc.get(p), Some(Best { source: Source::Peer(b), .. }) if b == peer);
                out.push(entry(*p, peer.to_string(), a, best));
            }
        }
        out.sort_by(|a, b| a.prefix.cmp(&b.prefix).then(a.peer.cmp(&b.peer)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::{AsSegment, SegmentKind};

    fn local() -> LocalInfo {
        LocalInfo {
            asn: 65000,
            router_id: "192.0.2.1".parse().unwrap(),
            hold_time: 90,
            connect_retry: 5,
            graceful_restart: None,
            extended_message: true,
        }
    }

    fn path(asns: &[u32], lp: Option<u32>) -> PathAttrs {
        PathAttrs {
            as_path: vec![AsSegment {
                kind: SegmentKind::Sequence,
                asns: asns.to_vec(),
            }],
            local_pref: lp,
            next_hop: Some("192.0.2.9".parse().unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn interning_shares_one_copy() {
        let mut r = Rib::default();
        let a = r.intern(path(&[1], None));
        let b = r.intern(path(&[1], None));
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn decision_prefers_local_pref_then_shorter_path() {
        let mut r = Rib::default();
        let p: IpNet = "10.0.0.0/24".parse().unwrap();
        let x: IpAddr = "192.0.2.2".parse().unwrap();
        let y: IpAddr = "192.0.2.3".parse().unwrap();
        let a = r.intern(path(&[1, 2, 3], Some(200)));
        let b = r.intern(path(&[1], Some(100)));
        r.insert(x, p, a, false);
        r.insert(y, p, b, false);
        let best = r.decide(&p, &local()).unwrap().unwrap();
        assert_eq!(best.source, Source::Peer(x));
        r.remove(x, &p);
        let best = r.decide(&p, &local()).unwrap().unwrap();
        assert_eq!(best.source, Source::Peer(y));
        // Unchanged: no event.
        assert_eq!(r.decide(&p, &local()), None);
        r.remove(y, &p);
        assert_eq!(r.decide(&p, &local()), Some(None));
    }

    #[test]
    fn local_prefix_wins() {
        let mut r = Rib::default();
        let p: IpNet = "10.0.0.0/24".parse().unwrap();
        let a = r.intern(path(&[], Some(1000)));
        r.insert("192.0.2.2".parse().unwrap(), p, a, false);
        r.originate(p);
        assert_eq!(
            r.decide(&p, &local()).unwrap().unwrap().source,
            Source::Local
        );
    }
}
