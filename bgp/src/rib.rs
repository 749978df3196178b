//! Routing information bases: one table keyed by prefix whose entries hold
//! every peer's path for the prefix in-line (what the Adj-RIBs-In were) and
//! the Loc-RIB's best path and multipath set as indices into them; our
//! originated prefixes beside it. Path attributes are interned: every
//! distinct attribute set is stored once and shared by `Arc`, which is what
//! keeps a path to a few dozen bytes.

use crate::attrs::{Family, PathAttrs};
use crate::config::NextHopResolver;
use crate::report::RouteEntry;
use foldhash::HashMap;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry as TableEntry;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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

/// Index of a peer in `Rib::peers`: a path names its peer with four bytes,
/// not an `IpAddr`.
type PeerIx = u32;

/// One path in a prefix's entry: the peer it came from, its shared
/// attribute set, and whether it is kept stale for a restarting peer.
#[derive(Clone, Debug)]
struct Slot {
    attrs: Arc<PathAttrs>,
    peer: PeerIx,
    stale: bool,
}

/// A prefix's paths, in-line: one path (the common case) takes no
/// allocation of its own.
#[derive(Debug, Default)]
enum Paths {
    #[default]
    Empty,
    One(Slot),
    Many(Box<Many>),
}

#[derive(Debug)]
struct Many {
    paths: Vec<Slot>,
    /// The Loc-RIB's multipath set beyond the best path, as indices into
    /// `paths`, in preference order.
    multipath: Vec<u32>,
}

impl Paths {
    fn slots(&self) -> &[Slot] {
        match self {
            Paths::Empty => &[],
            Paths::One(s) => std::slice::from_ref(s),
            Paths::Many(m) => &m.paths,
        }
    }

    fn slots_mut(&mut self) -> &mut [Slot] {
        match self {
            Paths::Empty => &mut [],
            Paths::One(s) => std::slice::from_mut(s),
            Paths::Many(m) => &mut m.paths,
        }
    }

    fn find(&self, peer: PeerIx) -> Option<usize> {
        self.slots().iter().position(|s| s.peer == peer)
    }

    fn is_empty(&self) -> bool {
        matches!(self, Paths::Empty)
    }

    fn multipath(&self) -> &[u32] {
        match self {
            Paths::Many(m) => &m.multipath,
            _ => &[],
        }
    }

    fn set_multipath(&mut self, mp: Vec<u32>) {
        if let Paths::Many(m) = self {
            m.multipath = mp;
        }
    }

    fn push(&mut self, s: Slot) {
        match std::mem::take(self) {
            Paths::Empty => *self = Paths::One(s),
            Paths::One(first) => {
                *self = Paths::Many(Box::new(Many {
                    paths: vec![first, s],
                    multipath: Vec::new(),
                }))
            }
            Paths::Many(mut m) => {
                m.paths.push(s);
                *self = Paths::Many(m);
            }
        }
    }

    /// Take out path `i`; the indices of the others may change, so the
    /// caller has saved the Loc-RIB entry first (the multipath set goes).
    fn remove(&mut self, i: usize) -> Slot {
        match std::mem::take(self) {
            Paths::Empty => unreachable!("remove from an empty entry"),
            Paths::One(s) => s,
            Paths::Many(mut m) => {
                let s = m.paths.swap_remove(i);
                m.multipath.clear();
                *self = if m.paths.len() == 1 {
                    Paths::One(m.paths.pop().expect("one path left"))
                } else {
                    Paths::Many(m)
                };
                s
            }
        }
    }
}

/// `Entry::best` when there is no best path.
const NO_BEST: u32 = u32::MAX;
/// `Entry::best` when the prefix is ours (originated).
const LOCAL_BEST: u32 = u32::MAX - 1;
/// `Entry::best` when a path of the Loc-RIB entry changed or went before
/// the decision ran: the entry as it was is in `Rib::saved`.
const SAVED_BEST: u32 = u32::MAX - 2;

/// Everything about one prefix: every peer's path (the Adj-RIBs-In) and
/// the Loc-RIB entry as an index into them.
#[derive(Debug)]
struct Entry {
    paths: Paths,
    best: u32,
    /// Its paths changed since the decision last ran on it: it is in
    /// `Rib::dirty4` or `Rib::dirty6` (once).
    dirty: bool,
}

impl Default for Entry {
    fn default() -> Entry {
        Entry {
            paths: Paths::Empty,
            best: NO_BEST,
            dirty: false,
        }
    }
}

impl Entry {
    /// Whether path `i` is in the Loc-RIB (the best path or its multipath set).
    fn in_loc(&self, i: usize) -> bool {
        self.best == i as u32 || self.paths.multipath().contains(&(i as u32))
    }

    fn best_is_path(&self) -> bool {
        self.best < SAVED_BEST
    }
}

/// A peer's place in the table: its address and how many paths it has
/// there (stale ones too).
#[derive(Clone, Copy, Debug)]
struct PeerSlot {
    addr: IpAddr,
    received: usize,
    stale: usize,
    /// Dropped, its paths being taken out slice by slice (`drain_step`):
    /// they are no longer candidates in the decision.
    draining: bool,
}

/// A dropped peer whose paths are being taken out: the IPv6 entries it
/// has a path in (collected when it was dropped; tables of IPv6 are small),
/// then the slab walked from `next` on for the IPv4 ones.
#[derive(Debug)]
struct Drain {
    px: PeerIx,
    addr: IpAddr,
    v6: Vec<(IpNet, u32)>,
    next: usize,
}

/// `Rib::keys` of an IPv6 entry (no packed IPv4 key is this large).
const V6_KEY: u64 = u64::MAX;

/// An IPv4 prefix packed into one word: the address, then the length.
fn v4_key(n: &Ipv4Net) -> u64 {
    (u64::from(u32::from(n.addr())) << 8) | u64::from(n.prefix_len())
}

fn v4_net(k: u64) -> IpNet {
    let addr = Ipv4Addr::from((k >> 8) as u32);
    IpNet::V4(Ipv4Net::new(addr, (k & 0xff) as u8).expect("packed from a valid prefix"))
}

fn v6_key(n: &Ipv6Net) -> (u128, u8) {
    (u128::from(n.addr()), n.prefix_len())
}

fn v6_net((a, l): (u128, u8)) -> IpNet {
    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).expect("packed from a valid prefix"))
}

/// A free slab index for an entry with packed key `key`.
fn alloc(slab: &mut Vec<Entry>, free: &mut Vec<u32>, keys: &mut Vec<u64>, key: u64) -> u32 {
    match free.pop() {
        Some(i) => {
            keys[i as usize] = key;
            i
        }
        None => {
            slab.push(Entry::default());
            keys.push(key);
            (slab.len() - 1) as u32
        }
    }
}

/// A decision candidate: the path, its IGP cost, its index in the entry.
type Cand = (Path, u32, u32);

/// The RIB: one table keyed by prefix (IPv4 packed into a `u64`, IPv6
/// apart) whose values index a slab of entries; each entry holds the
/// prefix's paths in-line and the Loc-RIB entry as indices into them. One
/// hash operation finds everything about a prefix.
pub struct Rib {
    local: BTreeSet<IpNet>,
    /// IPv4 prefixes: the slab index alone (4 bytes a bucket); the packed
    /// key is in `keys`.
    v4: HashTable<u32>,
    v6: HashMap<(u128, u8), u32>,
    slab: Vec<Entry>,
    /// The packed IPv4 key of each slab entry (`V6_KEY` for IPv6 ones).
    keys: Vec<u64>,
    free: Vec<u32>,
    hasher: foldhash::fast::RandomState,
    /// Loc-RIB entries whose paths changed before the decision ran
    /// (`SAVED_BEST`): export needs what was there to bring peers in line.
    saved: HashMap<IpNet, Best>,
    /// Prefixes with a Loc-RIB entry.
    loc_len: usize,
    peers: Vec<PeerSlot>,
    peer_ix: HashMap<IpAddr, PeerIx>,
    free_peers: Vec<PeerIx>,
    /// The last peer looked up (an UPDATE's prefixes all come from one).
    last_peer: Option<(IpAddr, PeerIx)>,
    meta: HashMap<IpAddr, PeerMeta>,
    /// What we knew of peers dropped since the last flush: the Loc-RIB may
    /// still hold their paths, and export needs to know what those paths
    /// were exported as to withdraw them (see `meta_any`).
    retired: HashMap<IpAddr, PeerMeta>,
    /// Entries whose paths changed since the decision last ran on them:
    /// IPv4 ones by slab index (the decision finds them without hashing),
    /// IPv6 ones by prefix.
    dirty4: Vec<u32>,
    dirty6: Vec<IpNet>,
    /// Dropped peers whose paths are still being taken out, oldest first.
    drains: std::collections::VecDeque<Drain>,
    /// Interned attribute sets with their hash: a set is hashed once, when
    /// interned, not again each time the table grows.
    interned: HashTable<(u64, Arc<PathAttrs>)>,
    /// Interned sets left by the last collection: the next one is due when
    /// the set has doubled since (amortised O(1) per interned set).
    interned_after_gc: usize,
    /// The attributes of our own prefixes (no attributes: export adds them).
    local_attrs: Arc<PathAttrs>,
    pub max_paths: usize,
    pub resolver: Option<Arc<dyn NextHopResolver>>,
    /// Candidate buffer reused by `decide`.
    scratch: Vec<Cand>,
}

impl Default for Rib {
    fn default() -> Rib {
        Rib::new(1, None)
    }
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
            local: BTreeSet::new(),
            v4: HashTable::new(),
            v6: HashMap::default(),
            slab: Vec::new(),
            keys: Vec::new(),
            free: Vec::new(),
            hasher: Default::default(),
            saved: HashMap::default(),
            loc_len: 0,
            peers: Vec::new(),
            peer_ix: HashMap::default(),
            free_peers: Vec::new(),
            last_peer: None,
            meta: HashMap::default(),
            retired: HashMap::default(),
            dirty4: Vec::new(),
            dirty6: Vec::new(),
            drains: Default::default(),
            interned: HashTable::new(),
            interned_after_gc: 0,
            local_attrs: Arc::new(PathAttrs::default()),
            max_paths: max_paths.max(1),
            resolver,
            scratch: Vec::new(),
        }
    }

    /// One shared copy of an attribute set.
    pub fn intern(&mut self, attrs: PathAttrs) -> Arc<PathAttrs> {
        let h = self.hasher.hash_one(&attrs);
        let found = self
            .interned
            .entry(h, |(hh, a)| *hh == h && **a == attrs, |(hh, _)| *hh);
        match found {
            TableEntry::Occupied(o) => o.get().1.clone(),
            TableEntry::Vacant(v) => {
                let a = Arc::new(attrs);
                v.insert((h, a.clone()));
                a
            }
        }
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
        self.interned.retain(|(_, a)| Arc::strong_count(a) > 1);
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
    /// are out of the Loc-RIB. A peer still being drained stays known.
    pub fn forget_retired(&mut self) {
        if self.drains.is_empty() {
            self.retired.clear();
        } else {
            let drains = &self.drains;
            self.retired
                .retain(|a, _| drains.iter().any(|d| d.addr == *a));
        }
    }

    /// The index of a peer we hold paths of.
    fn peer_of(&self, peer: IpAddr) -> Option<PeerIx> {
        match self.last_peer {
            Some((a, ix)) if a == peer => Some(ix),
            _ => self.peer_ix.get(&peer).copied(),
        }
    }

    /// The index of `peer`, given one (a dropped peer's index is reused).
    fn peer_index(&mut self, peer: IpAddr) -> PeerIx {
        if let Some(ix) = self.peer_of(peer) {
            self.last_peer = Some((peer, ix));
            return ix;
        }
        let slot = PeerSlot {
            addr: peer,
            received: 0,
            stale: 0,
            draining: false,
        };
        let ix = match self.free_peers.pop() {
            Some(ix) => {
                self.peers[ix as usize] = slot;
                ix
            }
            None => {
                self.peers.push(slot);
                (self.peers.len() - 1) as PeerIx
            }
        };
        self.peer_ix.insert(peer, ix);
        self.last_peer = Some((peer, ix));
        ix
    }

    /// The slab index of `p`'s entry.
    fn slot_of(&self, p: &IpNet) -> Option<u32> {
        match p {
            IpNet::V4(n) => {
                let k = v4_key(n);
                let keys = &self.keys;
                let found = self
                    .v4
                    .find(self.hasher.hash_one(k), |i| keys[*i as usize] == k);
                found.copied()
            }
            IpNet::V6(n) => self.v6.get(&v6_key(n)).copied(),
        }
    }

    /// The slab index of `p`'s entry, made empty when there is none.
    fn slot_or_new(&mut self, p: &IpNet) -> u32 {
        match p {
            IpNet::V4(n) => {
                let k = v4_key(n);
                let h = self.hasher.hash_one(k);
                let (keys, state) = (&self.keys, &self.hasher);
                let vacant = match self.v4.entry(
                    h,
                    |i| keys[*i as usize] == k,
                    |i| state.hash_one(keys[*i as usize]),
                ) {
                    TableEntry::Occupied(o) => return *o.get(),
                    TableEntry::Vacant(v) => v,
                };
                let i = alloc(&mut self.slab, &mut self.free, &mut self.keys, k);
                vacant.insert(i);
                i
            }
            IpNet::V6(n) => {
                let (slab, free, keys) = (&mut self.slab, &mut self.free, &mut self.keys);
                *self
                    .v6
                    .entry(v6_key(n))
                    .or_insert_with(|| alloc(slab, free, keys, V6_KEY))
            }
        }
    }

    /// Forget `p`'s entry (no paths, no Loc-RIB entry).
    fn release(&mut self, p: &IpNet, ix: u32) {
        match p {
            IpNet::V4(n) => {
                let h = self.hasher.hash_one(v4_key(n));
                if let Ok(o) = self.v4.find_entry(h, |i| *i == ix) {
                    o.remove();
                }
            }
            IpNet::V6(n) => {
                self.v6.remove(&v6_key(n));
            }
        }
        self.slab[ix as usize] = Entry::default();
        self.free.push(ix);
    }

    /// Every prefix with an entry, of `family` or of all, and its slab index.
    fn keyed(&self, family: Option<Family>) -> impl Iterator<Item = (IpNet, u32)> + '_ {
        let v4 = family != Some(Family::Ipv6);
        let v6 = family != Some(Family::Ipv4);
        let n4 = if v4 { usize::MAX } else { 0 };
        let n6 = if v6 { usize::MAX } else { 0 };
        self.v4
            .iter()
            .take(n4)
            .map(|i| (v4_net(self.keys[*i as usize]), *i))
            .chain(self.v6.iter().take(n6).map(|(k, i)| (v6_net(*k), *i)))
    }

    /// The Loc-RIB entry of `p` (at slab index `ix`).
    fn loc_at(&self, p: &IpNet, ix: u32) -> Option<Best> {
        let e = &self.slab[ix as usize];
        match e.best {
            NO_BEST => None,
            LOCAL_BEST => Some(Best {
                source: Source::Local,
                attrs: self.local_attrs.clone(),
                multipath: None,
            }),
            SAVED_BEST => self.saved.get(p).cloned(),
            i => {
                let slots = e.paths.slots();
                let path = |j: u32| {
                    let s = &slots[j as usize];
                    Path {
                        source: Source::Peer(self.peers[s.peer as usize].addr),
                        attrs: s.attrs.clone(),
                    }
                };
                let b = path(i);
                let mp = e.paths.multipath();
                Some(Best {
                    source: b.source,
                    attrs: b.attrs,
                    multipath: (!mp.is_empty())
                        .then(|| Box::new(mp.iter().map(|j| path(*j)).collect())),
                })
            }
        }
    }

    /// Keep `p`'s Loc-RIB entry aside before one of its paths changes.
    fn save(&mut self, p: &IpNet, ix: u32) {
        if let Some(b) = self.loc_at(p, ix) {
            self.saved.insert(*p, b);
        }
        let e = &mut self.slab[ix as usize];
        e.best = SAVED_BEST;
        e.paths.set_multipath(Vec::new());
    }

    /// Note that `p`'s paths (entry `ix`) changed: the decision runs on it
    /// at the next `decide_dirty`.
    fn touch(&mut self, p: &IpNet, ix: u32) {
        let e = &mut self.slab[ix as usize];
        if std::mem::replace(&mut e.dirty, true) {
            return;
        }
        match p {
            IpNet::V4(_) => self.dirty4.push(ix),
            IpNet::V6(_) => self.dirty6.push(*p),
        }
    }

    /// Whether any entry's paths changed since the last `decide_dirty`.
    pub fn has_dirty(&self) -> bool {
        !self.dirty4.is_empty() || !self.dirty6.is_empty()
    }

    /// Run the decision on every entry whose paths changed since the last
    /// call; `changed` gets each prefix whose Loc-RIB entry moved, with the
    /// entry it replaced and the new one.
    pub fn decide_dirty(
        &mut self,
        mut changed: impl FnMut(&Rib, IpNet, Option<Best>, Option<Best>),
    ) {
        let v4 = std::mem::take(&mut self.dirty4);
        for &ix in &v4 {
            if !self.slab[ix as usize].dirty {
                continue; // decided already, or released
            }
            let p = v4_net(self.keys[ix as usize]);
            if let Some((old, new)) = self.decide_at(&p, ix) {
                changed(self, p, old, new);
            }
        }
        // The buffer is kept for the next round, unless a big one.
        if v4.capacity() <= 1 << 16 {
            self.dirty4 = v4;
            self.dirty4.clear();
        }
        for p in std::mem::take(&mut self.dirty6) {
            if let Some((old, new)) = self.decide_change(&p) {
                changed(self, p, old, new);
            }
        }
    }

    pub fn insert(&mut self, peer: IpAddr, p: IpNet, attrs: Arc<PathAttrs>) {
        let px = self.peer_index(peer);
        let ix = self.slot_or_new(&p);
        self.touch(&p, ix);
        let e = &self.slab[ix as usize];
        match e.paths.find(px) {
            Some(i) => {
                if e.best_is_path() && e.in_loc(i) {
                    self.save(&p, ix);
                }
                let s = &mut self.slab[ix as usize].paths.slots_mut()[i];
                s.attrs = attrs;
                if std::mem::take(&mut s.stale) {
                    self.peers[px as usize].stale -= 1;
                }
            }
            None => {
                self.slab[ix as usize].paths.push(Slot {
                    attrs,
                    peer: px,
                    stale: false,
                });
                self.peers[px as usize].received += 1;
            }
        }
    }

    pub fn remove(&mut self, peer: IpAddr, p: &IpNet) -> bool {
        let Some(px) = self.peer_of(peer) else {
            return false;
        };
        let Some(ix) = self.slot_of(p) else {
            return false;
        };
        let Some(i) = self.slab[ix as usize].paths.find(px) else {
            return false;
        };
        self.remove_at(p, ix, i);
        true
    }

    /// Take path `i` out of `p`'s entry at slab index `ix`.
    fn remove_at(&mut self, p: &IpNet, ix: u32, i: usize) {
        self.touch(p, ix);
        if self.slab[ix as usize].best_is_path() {
            self.save(p, ix);
        }
        let e = &mut self.slab[ix as usize];
        let s = e.paths.remove(i);
        let gone = e.paths.is_empty() && e.best == NO_BEST;
        let ps = &mut self.peers[s.peer as usize];
        ps.received -= 1;
        if s.stale {
            ps.stale -= 1;
        }
        if gone {
            self.release(p, ix);
        }
    }

    /// Where `peer` has a path, matching `pick`, of `family` or of all:
    /// (prefix, slab index, path index).
    fn paths_of(
        &self,
        px: PeerIx,
        family: Option<Family>,
        pick: impl Fn(&Slot) -> bool,
    ) -> Vec<(IpNet, u32, usize)> {
        self.keyed(family)
            .filter_map(|(p, ix)| {
                let slots = self.slab[ix as usize].paths.slots();
                let i = slots.iter().position(|s| s.peer == px)?;
                pick(&slots[i]).then_some((p, ix, i))
            })
            .collect()
    }

    /// Drop everything learned from `peer` at once; returns the prefixes
    /// affected. (The instance drops a peer in slices: `retire_peer`, then
    /// `drain_step` until `draining` is false.)
    pub fn drop_peer(&mut self, peer: IpAddr) -> Vec<IpNet> {
        self.retire_peer(peer);
        let mut all = Vec::new();
        while self.draining() {
            all.extend(self.drain_step(usize::MAX));
        }
        all
    }

    /// `peer` is gone: its paths stop being candidates in the decision at
    /// once, and are taken out by `drain_step`, a slice at a time. A new
    /// session from the same address gets a new index meanwhile.
    pub fn retire_peer(&mut self, peer: IpAddr) {
        if let Some(m) = self.meta.remove(&peer) {
            self.retired.insert(peer, m);
        }
        let Some(px) = self.peer_ix.remove(&peer) else {
            return;
        };
        self.last_peer = None;
        if self.peers[px as usize].received == 0 {
            self.free_peers.push(px);
            return;
        }
        self.peers[px as usize].draining = true;
        let slab = &self.slab;
        let v6 = self
            .v6
            .iter()
            .filter(|(_, ix)| slab[**ix as usize].paths.find(px).is_some())
            .map(|(k, ix)| (v6_net(*k), *ix))
            .collect();
        self.drains.push_back(Drain {
            px,
            addr: peer,
            v6,
            next: 0,
        });
    }

    /// Whether a dropped peer's paths are still being taken out.
    pub fn draining(&self) -> bool {
        !self.drains.is_empty()
    }

    /// Whether paths of an earlier session of `peer` are still being taken out.
    pub fn draining_from(&self, peer: IpAddr) -> bool {
        self.drains.iter().any(|d| d.addr == peer)
    }

    /// Take out up to `max` paths of the oldest dropped peer (looking at
    /// no more than 16 times as many entries); returns their prefixes,
    /// whose Loc-RIB entries wait in `saved` for the decision.
    pub fn drain_step(&mut self, max: usize) -> Vec<IpNet> {
        let Some(mut d) = self.drains.pop_front() else {
            return vec![];
        };
        let mut out = Vec::new();
        while out.len() < max {
            let Some((p, ix)) = d.v6.pop() else { break };
            if let Some(i) = self.slab[ix as usize].paths.find(d.px) {
                self.remove_at(&p, ix, i);
                out.push(p);
            }
        }
        let mut budget = max.saturating_mul(16);
        while out.len() < max && budget > 0 && d.next < self.slab.len() {
            let ix = d.next;
            d.next += 1;
            budget -= 1;
            let key = self.keys[ix];
            if key == V6_KEY {
                continue;
            }
            if let Some(i) = self.slab[ix].paths.find(d.px) {
                let p = v4_net(key);
                self.remove_at(&p, ix as u32, i);
                out.push(p);
            }
        }
        let ps = &mut self.peers[d.px as usize];
        if ps.received == 0 || (d.v6.is_empty() && d.next >= self.slab.len()) {
            ps.draining = false;
            self.free_peers.push(d.px);
        } else {
            self.drains.push_front(d);
        }
        out
    }

    /// Mark every route of `peer` stale (its session went down gracefully).
    pub fn mark_stale(&mut self, peer: IpAddr) -> usize {
        let Some(px) = self.peer_of(peer) else {
            return 0;
        };
        let mut n = 0;
        for e in &mut self.slab {
            for s in e.paths.slots_mut() {
                if s.peer == px {
                    s.stale = true;
                    n += 1;
                }
            }
        }
        self.peers[px as usize].stale = n;
        n
    }

    pub fn stale_count(&self, peer: IpAddr) -> usize {
        self.peer_of(peer)
            .map_or(0, |px| self.peers[px as usize].stale)
    }

    /// Remove the routes of `peer` still stale, of `family` or of every
    /// family; returns the prefixes removed.
    pub fn sweep_stale(&mut self, peer: IpAddr, family: Option<Family>) -> Vec<IpNet> {
        let Some(px) = self.peer_of(peer) else {
            return vec![];
        };
        if self.peers[px as usize].stale == 0 {
            return vec![];
        }
        let hits = self.paths_of(px, family, |s| s.stale);
        for (p, ix, i) in &hits {
            self.remove_at(p, *ix, *i);
        }
        hits.into_iter().map(|(p, _, _)| p).collect()
    }

    pub fn received_count(&self, peer: IpAddr) -> usize {
        self.peer_of(peer)
            .map_or(0, |px| self.peers[px as usize].received)
    }

    /// (Loc-RIB prefixes, paths from peers, interned attribute sets).
    pub fn sizes(&self) -> (usize, usize, usize) {
        let paths = self
            .peer_ix
            .values()
            .map(|px| self.peers[*px as usize].received);
        (self.loc_len, paths.sum(), self.interned.len())
    }

    /// The Loc-RIB entry of `p`.
    pub fn best(&self, p: &IpNet) -> Option<Best> {
        self.loc_at(p, self.slot_of(p)?)
    }

    /// The Loc-RIB entries of `prefixes`, for export.
    pub fn items(&self, prefixes: Vec<IpNet>) -> Vec<(IpNet, Option<Best>)> {
        prefixes.into_iter().map(|p| (p, self.best(&p))).collect()
    }

    /// The best paths of `prefixes` (without their multipath sets), for export.
    pub fn best_paths(&self, prefixes: Vec<IpNet>) -> Vec<(IpNet, Option<Path>)> {
        prefixes
            .into_iter()
            .map(|p| (p, self.best(&p).as_ref().map(Best::path)))
            .collect()
    }

    /// The Loc-RIB entries whose best path came from `peer`.
    pub fn best_paths_from(&self, peer: IpAddr) -> Vec<(IpNet, Path)> {
        let px = self.peer_of(peer);
        self.keyed(None)
            .filter(|(p, ix)| {
                let e = &self.slab[*ix as usize];
                match e.best {
                    NO_BEST | LOCAL_BEST => false,
                    SAVED_BEST => self
                        .saved
                        .get(p)
                        .is_some_and(|b| b.source == Source::Peer(peer)),
                    i => Some(e.paths.slots()[i as usize].peer) == px,
                }
            })
            .filter_map(|(p, ix)| Some((p, self.loc_at(&p, ix)?.path())))
            .collect()
    }

    pub fn all_prefixes(&self) -> Vec<IpNet> {
        self.loc_prefixes(None)
    }

    /// Every prefix anyone has a path for (for a full re-decision).
    pub fn known_prefixes(&self) -> Vec<IpNet> {
        let mut all: Vec<IpNet> = self
            .keyed(None)
            .filter(|(_, ix)| !self.slab[*ix as usize].paths.is_empty())
            .map(|(p, _)| p)
            .collect();
        for p in &self.local {
            if self
                .slot_of(p)
                .is_none_or(|ix| self.slab[ix as usize].paths.is_empty())
            {
                all.push(*p);
            }
        }
        all
    }

    pub fn prefixes_of(&self, f: Family) -> Vec<IpNet> {
        self.loc_prefixes(Some(f))
    }

    fn loc_prefixes(&self, f: Option<Family>) -> Vec<IpNet> {
        self.keyed(f)
            .filter(|(_, ix)| self.slab[*ix as usize].best != NO_BEST)
            .map(|(p, _)| p)
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
        let local = !self.local.is_empty() && self.local.contains(p);
        let ix = match self.slot_of(p) {
            Some(ix) => ix,
            None if local => self.slot_or_new(p),
            None => return None,
        };
        self.decide_at(p, ix)
    }

    /// `decide_change` for `p`, whose entry is at slab index `ix`.
    #[allow(clippy::type_complexity)]
    fn decide_at(&mut self, p: &IpNet, ix: u32) -> Option<(Option<Best>, Option<Best>)> {
        let local = !self.local.is_empty() && self.local.contains(p);
        self.slab[ix as usize].dirty = false;
        let old = match self.slab[ix as usize].best {
            SAVED_BEST => self.saved.remove(p),
            _ => self.loc_at(p, ix),
        };
        let mut cands = std::mem::take(&mut self.scratch);
        cands.clear();
        if local {
            let attrs = self.local_attrs.clone();
            let path = Path {
                source: Source::Local,
                attrs,
            };
            cands.push((path, 0, LOCAL_BEST));
        } else {
            for (i, s) in self.slab[ix as usize].paths.slots().iter().enumerate() {
                if self.peers[s.peer as usize].draining {
                    continue;
                }
                let path = Path {
                    source: Source::Peer(self.peers[s.peer as usize].addr),
                    attrs: s.attrs.clone(),
                };
                if let Some(cost) = self.cost(&path) {
                    cands.push((path, cost, i as u32));
                }
            }
        }
        let (best, at, mp) = self.choose(&mut cands);
        self.scratch = cands;
        let e = &mut self.slab[ix as usize];
        e.best = at;
        e.paths.set_multipath(mp);
        let gone = e.paths.is_empty() && at == NO_BEST;
        if gone {
            self.release(p, ix);
        }
        self.loc_len = self.loc_len + usize::from(best.is_some()) - usize::from(old.is_some());
        if old == best {
            return None;
        }
        Some((old, best))
    }

    /// The best path of `cands` and its multipath set: the entry, the best
    /// path's index, the multipath set's indices. Leaves `cands` sorted.
    fn choose(&self, cands: &mut Vec<Cand>) -> (Option<Best>, u32, Vec<u32>) {
        if cands.is_empty() {
            return (None, NO_BEST, Vec::new());
        }
        if cands.len() > 1 {
            drop_med_losers(cands);
            cands.sort_by(|a, b| self.prefer(a, b));
        }
        let first = &cands[0];
        let mut multipath: Vec<Path> = Vec::new();
        let mut at: Vec<u32> = Vec::new();
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
                at.push(c.2);
            }
        }
        let best = Best {
            source: first.0.source,
            attrs: first.0.attrs.clone(),
            multipath: (!multipath.is_empty()).then(|| Box::new(multipath)),
        };
        (Some(best), first.2, at)
    }

    fn is_ebgp(&self, s: Source) -> bool {
        match s {
            Source::Peer(p) => self.meta.get(&p).is_some_and(|m| m.ebgp),
            Source::Local => false,
        }
    }

    /// RFC 4271 §9.1.2.2 a-e plus the IGP cost: paths equal here may share
    /// the multipath set.
    fn multipath_equal(&self, a: &Cand, b: &Cand) -> bool {
        self.compare_through_cost(a, b) == Ordering::Equal
    }

    fn compare_through_cost(&self, (a, ca, _): &Cand, (b, cb, _): &Cand) -> Ordering {
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
    fn prefer(&self, a: &Cand, b: &Cand) -> Ordering {
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
        for (p, ix) in self.keyed(None) {
            let loc = self.loc_at(&p, ix);
            for s in self.slab[ix as usize].paths.slots() {
                let peer = self.peers[s.peer as usize].addr;
                let best = loc.as_ref().is_some_and(|b| b.source == Source::Peer(peer));
                let multipath = loc
                    .as_ref()
                    .is_some_and(|b| b.members().any(|m| m.0 == Source::Peer(peer)));
                out.push(entry(
                    p,
                    peer.to_string(),
                    &s.attrs,
                    [best, s.stale, multipath],
                ));
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
fn drop_med_losers(cands: &mut Vec<Cand>) {
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
    if cands.iter().all(|(c, _, _)| med(c) == med(&cands[0].0)) {
        return;
    }
    let mut k = 0;
    while k < cands.len() {
        let c = &cands[k].0;
        if cands
            .iter()
            .any(|(s, _, _)| med(s) < med(c) && key(s) == key(c))
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

    #[test]
    fn an_entry_with_one_path_stays_small() {
        // The key (8 bytes) and slab index (4) in the map, and this.
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    #[test]
    fn many_peers_per_prefix_and_index_reuse_after_drop_peer() {
        let mut r = Rib::new(4, None);
        let p: IpNet = P.parse().unwrap();
        let q: IpNet = "2001:db8::/48".parse().unwrap();
        let peers: Vec<IpAddr> = (2..12)
            .map(|i| {
                let a = format!("192.0.2.{i}");
                meta(&mut r, &a, true, &a)
            })
            .collect();
        for (i, x) in peers.iter().enumerate() {
            let a = r.intern(path(&[65001 + i as u32, 1], None, &x.to_string()));
            r.insert(*x, p, a.clone());
            r.insert(*x, q, a);
        }
        let b = r.decide(&p).unwrap().unwrap();
        assert_eq!(b.source, Source::Peer(peers[0]), "lowest router ID");
        assert_eq!(b.members().count(), 4);
        r.decide(&q);
        assert_eq!(r.sizes(), (2, 20, 10));
        // The best path's peer goes; the entry as it was stays until decided.
        assert_eq!(r.drop_peer(peers[0]).len(), 2);
        assert_eq!(r.best(&p).unwrap().source, Source::Peer(peers[0]));
        // A new peer takes the freed index before the decision runs.
        let n = meta(&mut r, "192.0.2.99", true, "192.0.2.1");
        let a = r.intern(path(&[65099, 1], None, "192.0.2.99"));
        r.insert(n, p, a);
        let (old, new) = r.decide_change(&p).unwrap();
        assert_eq!(old.unwrap().source, Source::Peer(peers[0]));
        assert_eq!(
            new.unwrap().source,
            Source::Peer(n),
            "its router ID is lower"
        );
        assert_eq!(r.received_count(n), 1);
        assert_eq!(r.received_count(peers[0]), 0);
        assert_eq!(r.known_prefixes().len(), 2);
        for x in &peers[1..] {
            r.drop_peer(*x);
        }
        r.drop_peer(n);
        assert_eq!(r.decide(&p), Some(None));
        assert_eq!(r.decide(&q), Some(None));
        assert_eq!(r.sizes().0, 0);
        assert!(r.known_prefixes().is_empty());
    }

    #[test]
    fn a_replaced_best_path_is_reported_as_it_was() {
        let mut r = Rib::new(1, None);
        let p: IpNet = P.parse().unwrap();
        let x = meta(&mut r, "192.0.2.2", false, "192.0.2.2");
        let a = r.intern(path(&[1], None, "192.0.2.2"));
        let b = r.intern(path(&[1, 2], None, "192.0.2.2"));
        r.insert(x, p, a.clone());
        r.decide(&p);
        r.insert(x, p, b.clone());
        assert_eq!(r.best(&p).unwrap().attrs, a, "the Loc-RIB until decided");
        let (old, new) = r.decide_change(&p).unwrap();
        assert_eq!((old.unwrap().attrs, new.unwrap().attrs), (a, b));
        assert_eq!(r.all_prefixes(), vec![p]);
    }
}
