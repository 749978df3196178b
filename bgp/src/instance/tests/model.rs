//! The RIB and the outbound side checked against a plain reference model.
//! Random announce / withdraw / session-down / session-up / route-refresh /
//! reconfiguration sequences go through the instance, whose UPDATEs are
//! applied to a per-peer table as the peer would; the model says what each
//! prefix's best path and multipath set are (RFC 4271 §9.1.2.2, step by
//! step, MED included) and what each peer should hold (§5.1 / §9.2 export,
//! RFC 4456 reflection), after one eBGP peer's import policy, written out
//! directly with no code shared with the speaker. After every flush the
//! two must agree.

use super::*;
use crate::attrs::Origin;
use crate::rib::Source;

/// A tiny seeded generator (xorshift64*): the failing seed is printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What a peer holds for a prefix, as the fields the rules decide.
#[derive(Clone, Debug, PartialEq)]
struct Held {
    next_hop: Option<IpAddr>,
    as_path: Vec<u32>,
    local_pref: Option<u32>,
    med: Option<u32>,
    origin: Origin,
    originator_id: Option<Ipv4Addr>,
    cluster_list: Vec<Ipv4Addr>,
}

fn held(a: &PathAttrs) -> Held {
    Held {
        next_hop: a.next_hop,
        as_path: a.as_path_flat(),
        local_pref: a.local_pref,
        med: a.med,
        origin: a.origin,
        originator_id: a.originator_id,
        cluster_list: a.cluster_list.clone(),
    }
}

/// One peer as the model sees it.
struct ModelPeer {
    addr: IpAddr,
    asn: u32,
    client: bool,
    nhs: bool,
    up: bool,
    /// What it announced to us and the import policy accepted, as changed
    /// by the policy, when up.
    rib_in: BTreeMap<IpNet, PathAttrs>,
    /// Whether it has the import policy of `POLICY` (`import_policy`).
    policy: bool,
}

/// The import policy of one eBGP peer, as the speaker reads it, and the
/// same written out by hand in `import_policy`.
const POLICY: &str = "[{prefix: 10.0.7.0/24, action: reject}, \
     {community: \"65000:666\", action: reject}, \
     {prefix: 10.0.0.0/22, le: 24, action: accept, set: {local_pref: 150, med: 7}}, \
     {action: accept}]";

const REJECT_ME: u32 = (65000 << 16) | 666;

fn import_policy(p: &IpNet, a: &PathAttrs) -> Option<PathAttrs> {
    if *p == net("10.0.7.0/24") || a.communities.contains(&REJECT_ME) {
        return None;
    }
    let mut a = a.clone();
    if net("10.0.0.0/22").contains(p) {
        a.local_pref = Some(150);
        a.med = Some(7);
    }
    Some(a)
}

impl ModelPeer {
    fn ebgp(&self) -> bool {
        self.asn != ASN
    }
    fn router_id(&self) -> Ipv4Addr {
        match self.addr {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => unreachable!(),
        }
    }
}

struct Model {
    peers: Vec<ModelPeer>,
    local: BTreeSet<IpNet>,
    cluster_id: Ipv4Addr,
}

const LOCAL_ADDR: &str = "192.0.2.1";

impl Model {
    /// RFC 4271 §9.1.2.2 step by step for the paths this test makes (no
    /// ORIGINATOR_ID or CLUSTER_LIST from peers, every next hop at IGP cost
    /// 0): ours first; then of the peers' paths keep the highest LOCAL_PREF,
    /// the shortest AS_PATH, the lowest ORIGIN, per neighbouring AS the
    /// lowest MED (missing = 0), eBGP over iBGP. What is left is the
    /// multipath pool; lower router ID, then lower address picks the best.
    fn pool(&self, p: &IpNet) -> Vec<(&ModelPeer, &PathAttrs)> {
        let mut c: Vec<(&ModelPeer, &PathAttrs)> = self
            .peers
            .iter()
            .filter(|m| m.up)
            .filter_map(|m| m.rib_in.get(p).map(|a| (m, a)))
            .collect();
        fn keep_min<'a, K: Ord>(
            c: &mut Vec<(&'a ModelPeer, &'a PathAttrs)>,
            key: impl Fn(&ModelPeer, &PathAttrs) -> K,
        ) {
            if let Some(min) = c.iter().map(|(m, a)| key(m, a)).min() {
                c.retain(|(m, a)| key(m, a) == min);
            }
        }
        keep_min(&mut c, |_, a| {
            std::cmp::Reverse(a.local_pref.unwrap_or(100))
        });
        keep_min(&mut c, |_, a| a.as_path_len());
        keep_min(&mut c, |_, a| a.origin);
        let first_as = |a: &PathAttrs| a.as_path_flat().first().copied();
        let all = c.clone();
        c.retain(|(_, a)| {
            !all.iter()
                .any(|(_, b)| first_as(b) == first_as(a) && b.med.unwrap_or(0) < a.med.unwrap_or(0))
        });
        keep_min(&mut c, |m, _| !m.ebgp());
        c.sort_by_key(|(m, _)| (m.router_id(), m.addr));
        c
    }

    /// The best path: `None` for ours, else the peer and its path.
    fn best(&self, p: &IpNet) -> Option<(Option<&ModelPeer>, PathAttrs)> {
        if self.local.contains(p) {
            return Some((None, PathAttrs::default()));
        }
        let (m, a) = *self.pool(p).first()?;
        Some((Some(m), a.clone()))
    }

    /// The multipath set, best first: pool members in order with a next
    /// hop not yet in the set, at most `MAX_PATHS`.
    fn multipath(&self, p: &IpNet) -> Vec<(IpAddr, Held)> {
        if self.local.contains(p) {
            return vec![];
        }
        let mut set: Vec<(IpAddr, Held)> = Vec::new();
        for (m, a) in self.pool(p) {
            if set.len() < MAX_PATHS && set.iter().all(|(_, h)| h.next_hop != a.next_hop) {
                set.push((m.addr, held(a)));
            }
        }
        set
    }

    /// What `to` should hold for `p`.
    fn export(&self, p: &IpNet, to: &ModelPeer) -> Option<Held> {
        let (from, mut a) = self.best(p)?;
        let local = ip(LOCAL_ADDR);
        let mut reflected = false;
        if let Some(f) = from {
            if f.addr == to.addr {
                return None; // never back to where it came from
            }
            if !f.ebgp() && !to.ebgp() {
                if !f.client && !to.client {
                    return None; // iBGP to iBGP only through reflection
                }
                reflected = true;
                a.originator_id.get_or_insert(f.router_id());
                a.cluster_list.insert(0, self.cluster_id);
            }
        }
        if to.ebgp() {
            let mut path = vec![ASN];
            path.extend(a.as_path_flat());
            return Some(Held {
                next_hop: Some(local),
                as_path: path,
                local_pref: None,
                // MED is not passed on to another AS (§5.1.4).
                med: None,
                origin: a.origin,
                originator_id: None,
                cluster_list: vec![],
            });
        }
        let next_hop = match from {
            None => local,
            Some(_) if to.nhs && !reflected => local,
            Some(_) => a.next_hop.unwrap(),
        };
        Some(Held {
            next_hop: Some(next_hop),
            as_path: a.as_path_flat(),
            local_pref: Some(a.local_pref.unwrap_or(100)),
            med: a.med,
            origin: a.origin,
            originator_id: a.originator_id,
            cluster_list: a.cluster_list,
        })
    }

    fn expected(&self, to: &ModelPeer, prefixes: &[IpNet]) -> BTreeMap<IpNet, Held> {
        prefixes
            .iter()
            .filter_map(|p| Some((*p, self.export(p, to)?)))
            .collect()
    }
}

/// A random path as `m` would send it.
fn random_path(rng: &mut Rng, m: &ModelPeer) -> PathAttrs {
    let len = rng.below(3);
    let mut asns: Vec<u32> = (0..len).map(|_| 64600 + rng.below(3) as u32).collect();
    if m.ebgp() {
        asns.insert(0, m.asn);
    }
    let mut a = attrs(&asns, &m.addr.to_string());
    if !m.ebgp() {
        a.local_pref = [None, Some(100), Some(200)][rng.below(3)];
    }
    a.med = [None, Some(0), Some(5), Some(10)][rng.below(4)];
    a.origin = [Origin::Igp, Origin::Igp, Origin::Egp, Origin::Incomplete][rng.below(4)];
    if rng.below(5) == 0 {
        a.communities.push(REJECT_ME);
    }
    a
}

fn config(m: &ModelPeer) -> PeerConfig {
    let mut cfg = PeerConfig::new(m.addr, m.asn);
    cfg.route_reflector_client = m.client;
    cfg.next_hop_self = m.nhs;
    if m.policy {
        cfg.import = Some(serde_yaml::from_str(POLICY).unwrap());
    }
    cfg
}

/// Apply what `addr` was sent to what it holds, one UPDATE at a time in
/// the order sent.
fn apply(h: &mut Harness, addr: IpAddr, table: &mut BTreeMap<IpNet, Held>) {
    let mut sessions = h.sessions.lock().unwrap();
    let rx = sessions.get_mut(&addr).expect("a session was started");
    while let Ok(m) = rx.try_recv() {
        let ToSession::Send(msgs) = m else { continue };
        for m in msgs.messages() {
            let mut s = Sent::default();
            decode_into(m, &mut s);
            for w in &s.withdrawn {
                table.remove(w);
            }
            for (p, a) in &s.announced {
                table.insert(*p, held(a));
            }
        }
    }
}

const MAX_PATHS: usize = 2;

/// The instance and the model with the same seven peers, all down.
fn setup() -> (Harness, Model) {
    let mut h = Harness::new(|c| {
        c.ebgp_requires_policy = false;
        c.max_paths = MAX_PATHS;
    });
    // A dropped peer's paths go two at a time (`run` steps through them).
    h.inst.drain_slice = 2;
    let specs: [(&str, u32, bool, bool); 7] = [
        ("198.51.100.2", 65001, false, false),
        ("198.51.100.3", 65002, false, false),
        ("192.0.2.11", ASN, true, false),
        ("192.0.2.12", ASN, true, false),
        ("192.0.2.21", ASN, false, false),
        ("192.0.2.22", ASN, false, true),
        ("192.0.2.23", ASN, false, false),
    ];
    let model = Model {
        peers: specs
            .iter()
            .map(|(a, asn, client, nhs)| ModelPeer {
                addr: ip(a),
                asn: *asn,
                client: *client,
                nhs: *nhs,
                up: false,
                rib_in: BTreeMap::new(),
                policy: *asn == 65002,
            })
            .collect(),
        local: BTreeSet::new(),
        cluster_id: CLUSTER_ID.parse().unwrap(),
    };
    for m in &model.peers {
        h.add(config(m));
    }
    (h, model)
}

/// `m` announces `n` prefixes from `first` on (wrapping round `prefixes`)
/// with path `a`, in one UPDATE; the model keeps what its import policy lets in.
fn announce(
    h: &mut Harness,
    m: &mut ModelPeer,
    prefixes: &[IpNet],
    first: IpNet,
    n: usize,
    a: PathAttrs,
) {
    let at = prefixes.iter().position(|x| *x == first).unwrap();
    let ps: Vec<IpNet> = (0..n)
        .map(|k| prefixes[(at + k) % prefixes.len()])
        .collect();
    for x in &ps {
        let kept = if m.policy {
            import_policy(x, &a)
        } else {
            Some(a.clone())
        };
        match kept {
            Some(k) => m.rib_in.insert(*x, k),
            None => m.rib_in.remove(x),
        };
    }
    let names: Vec<String> = ps.iter().map(|x| x.to_string()).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    h.announce(&m.addr.to_string(), &refs, a);
}

/// Each prefix's best path and multipath set in the RIB against the model.
fn check_rib(h: &Harness, model: &Model, prefixes: &[IpNet], seed: u64, step: usize) {
    for p in prefixes {
        let got: Vec<(IpAddr, Held)> = match h.inst.rib.best(p) {
            Some(b) if b.source != Source::Local => b
                .members()
                .map(|(s, a)| match s {
                    Source::Peer(x) => (x, held(a)),
                    Source::Local => unreachable!("ours is never in a set with others"),
                })
                .collect(),
            _ => vec![],
        };
        assert_eq!(
            got,
            model.multipath(p),
            "seed {seed}, step {step}: best path and multipath set of {p}"
        );
        assert_eq!(
            h.inst.rib.best(p).map(|b| b.source == Source::Local),
            model.best(p).map(|(from, _)| from.is_none()),
            "seed {seed}, step {step}: whether {p} is ours"
        );
    }
}

/// `run` over `n` prefixes, announced up to `burst` at a time.
fn run(seed: u64, steps: usize) {
    run_over(seed, steps, 8, 3);
}

fn run_over(seed: u64, steps: usize, n: usize, burst: usize) {
    let mut rng = Rng(seed);
    let (mut h, mut model) = setup();
    let prefixes: Vec<IpNet> = (0..n).map(|i| net(&format!("10.0.{i}.0/24"))).collect();
    let mut tables: Vec<BTreeMap<IpNet, Held>> = vec![BTreeMap::new(); model.peers.len()];
    let mut clock = Instant::now();
    for step in 0..steps {
        let i = rng.below(model.peers.len());
        let p = prefixes[rng.below(prefixes.len())];
        let addr = model.peers[i].addr;
        let what = rng.below(100);
        match what {
            0..40 if model.peers[i].up => {
                let a = random_path(&mut rng, &model.peers[i]);
                let n = 1 + rng.below(burst);
                announce(&mut h, &mut model.peers[i], &prefixes, p, n, a);
            }
            40..55 if model.peers[i].up => {
                model.peers[i].rib_in.remove(&p);
                h.update(
                    &addr.to_string(),
                    wire::Update {
                        withdrawn: vec![p],
                        ..Default::default()
                    },
                );
            }
            55..65 => {
                let m = &mut model.peers[i];
                if m.up {
                    m.up = false;
                    m.rib_in.clear();
                    // What was sent before goes with the session.
                    apply(&mut h, addr, &mut tables[i]);
                    h.down(&addr.to_string(), false);
                    tables[i].clear();
                } else {
                    m.up = true;
                    h.up(&addr.to_string(), None);
                }
            }
            65..72 if model.peers[i].up => {
                clock += REFRESH_EVERY * 2;
                h.inst.refresh_request(addr, Family::Ipv4, clock);
            }
            72..80 => {
                if model.local.insert(p) {
                    h.inst.command(Command::Announce(p));
                } else {
                    model.local.remove(&p);
                    h.inst.command(Command::Withdraw(p));
                }
            }
            80..85 => {
                let m = &mut model.peers[i];
                if rng.below(2) == 0 {
                    m.client = !m.client;
                } else {
                    m.nhs = !m.nhs;
                }
                let cfg = config(m);
                h.add(cfg);
            }
            85..88 => {
                let other: Ipv4Addr = "192.0.2.200".parse().unwrap();
                model.cluster_id = if model.cluster_id == other {
                    CLUSTER_ID.parse().unwrap()
                } else {
                    other
                };
                h.inst.command(Command::SetClusterId(model.cluster_id));
            }
            _ => {}
        }
        // Flush at random points, so changes pile up between decisions.
        if rng.below(3) == 0 || step + 1 == steps {
            // A dropped peer goes a slice (two paths) at a time: now and then
            // one slice, decided and exported, and more steps (the peer back
            // and announcing again, others' changes) before the next; the
            // check waits until every slice is out.
            if h.inst.rib.draining() && rng.below(2) == 0 && step + 1 != steps {
                h.inst.drain_step();
                continue;
            }
            while h.inst.rib.draining() {
                h.inst.drain_step();
            }
            h.inst.flush();
            check_rib(&h, &model, &prefixes, seed, step);
            for (j, m) in model.peers.iter().enumerate() {
                apply(&mut h, m.addr, &mut tables[j]);
                if m.up {
                    let want = model.expected(m, &prefixes);
                    assert_eq!(
                        tables[j], want,
                        "seed {seed}, step {step}: what {} holds",
                        m.addr
                    );
                    assert_eq!(
                        h.inst.sessions()[h.inst.peers.keys().position(|a| *a == m.addr).unwrap()]
                            .prefixes_sent,
                        want.len(),
                        "seed {seed}, step {step}: the count of {}",
                        m.addr
                    );
                }
            }
        }
    }
}

#[test]
fn what_each_peer_holds_matches_the_reference_model() {
    for seed in 1..=200u64 {
        run(seed * 0x9e37_79b9_7f4a_7c15, 300);
    }
}

/// Peers that are the best for dozens of prefixes dropped (two paths a
/// slice, so a drop spans many slices), back and announcing again, and
/// everyone else's changes, all while the drop is still in progress.
#[test]
fn a_peer_dropped_across_many_slices_matches_the_reference_model() {
    for seed in 1..=40u64 {
        run_over(seed * 0x2545_f491_4f6c_dd1d, 300, 64, 40);
    }
}
