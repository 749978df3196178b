//! The instance driven in-process: peers are added as the handle adds them,
//! their sessions are played by the test through `FromSession` events, and
//! every `ToSession` message the instance sends is read back (UPDATEs
//! decoded with the real wire code). No socket, no clock: the test calls
//! `flush` and `timers(at)` itself.

use super::*;
use crate::attrs::{AsSegment, PathAttrs, SegmentKind};
use crate::config::{MaxPrefixAction, MaxPrefixes};
use crate::policy::PolicyRule;
use crate::report::RouteChange;
use crate::wire::{self, Cease, PeerGracefulRestart, PeerOpen};
use netgauze_bgp_pkt::BgpMessage;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

mod model;

const ASN: u32 = 65000;
const ROUTER_ID: &str = "192.0.2.1";
const CLUSTER_ID: &str = "192.0.2.100";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// The instance and the far ends of everything it talks to.
struct Harness {
    inst: Instance,
    /// Each peer's session channel, as the instance started it (a new
    /// entry replaces the old one when a session is restarted).
    sessions: Arc<Mutex<BTreeMap<IpAddr, mpsc::UnboundedReceiver<ToSession>>>>,
    routes: mpsc::UnboundedReceiver<RouteEvent>,
}

/// What one peer was sent since the last look.
#[derive(Debug, Default)]
struct Sent {
    announced: BTreeMap<IpNet, PathAttrs>,
    withdrawn: BTreeSet<IpNet>,
    end_of_rib: Vec<Family>,
    /// Stop, Reset, Refresh and Incoming, as `(kind, code, subcode)` (0s
    /// but for the NOTIFICATIONs of Stop and Reset).
    control: Vec<(&'static str, u8, u8)>,
}

/// A path as a peer sends it; an empty `asns` is an empty AS_PATH (iBGP).
fn attrs(asns: &[u32], next_hop: &str) -> PathAttrs {
    let seq = AsSegment {
        kind: SegmentKind::Sequence,
        asns: asns.to_vec(),
    };
    PathAttrs {
        as_path: if asns.is_empty() { vec![] } else { vec![seq] },
        next_hop: Some(ip(next_hop)),
        ..Default::default()
    }
}

fn rules(yaml: &str) -> Option<Vec<PolicyRule>> {
    Some(serde_yaml::from_str(yaml).unwrap())
}

impl Harness {
    fn new(tune: impl FnOnce(&mut SpeakerConfig)) -> Harness {
        let mut cfg = SpeakerConfig::new(ASN, ROUTER_ID.parse().unwrap());
        cfg.listen = vec![];
        cfg.cluster_id = Some(CLUSTER_ID.parse().unwrap());
        tune(&mut cfg);
        let sessions = Arc::new(Mutex::new(BTreeMap::new()));
        let seen = sessions.clone();
        let start: SessionStarter = Box::new(move |s: SessionConfig, rx| {
            seen.lock().unwrap().insert(s.address, rx);
        });
        let (route_tx, routes) = mpsc::unbounded_channel();
        Harness {
            inst: Instance::new(&cfg, vec![], start, route_tx),
            sessions,
            routes,
        }
    }

    fn add(&mut self, cfg: PeerConfig) {
        self.inst.add_peer(cfg).unwrap();
    }

    /// An iBGP peer of ours (AS 65000), or an eBGP one with another AS.
    fn peer(&mut self, addr: &str, asn: u32, tune: impl FnOnce(&mut PeerConfig)) {
        let mut cfg = PeerConfig::new(ip(addr), asn);
        tune(&mut cfg);
        self.add(cfg);
    }

    /// The peer's session reaches Established; its router ID is its address.
    fn up(&mut self, addr: &str, graceful_restart: Option<PeerGracefulRestart>) {
        let peer = ip(addr);
        let asn = self.inst.peers[&peer].session.asn;
        let negotiated = Negotiated {
            local_addr: ip(ROUTER_ID),
            families: vec![Family::Ipv4],
            four_octet: true,
            max_len: wire::MAX_MESSAGE_LEN,
            hold_time: 90,
            peer: PeerOpen {
                asn,
                hold_time: 90,
                router_id: addr.parse().unwrap(),
                four_octet: true,
                families: [Family::Ipv4].into(),
                route_refresh: true,
                extended_message: false,
                graceful_restart,
            },
        };
        self.state(addr, State::Established, Some(Arc::new(negotiated)), true);
    }

    /// The session leaves Established: `graceful` without a NOTIFICATION.
    fn down(&mut self, addr: &str, graceful: bool) {
        self.state(addr, State::Idle, None, graceful);
    }

    fn state(
        &mut self,
        addr: &str,
        state: State,
        negotiated: Option<Arc<Negotiated>>,
        graceful: bool,
    ) {
        self.inst.session_event(FromSession::State {
            peer: ip(addr),
            state,
            negotiated,
            error: None,
            graceful,
        });
    }

    fn update(&mut self, addr: &str, update: wire::Update) {
        self.inst.session_event(FromSession::Update {
            peer: ip(addr),
            update: Box::new(update),
        });
    }

    fn announce(&mut self, addr: &str, prefixes: &[&str], a: PathAttrs) {
        self.update(
            addr,
            wire::Update {
                announced: prefixes.iter().map(|p| net(p)).collect(),
                attrs: a,
                ..Default::default()
            },
        );
    }

    fn end_of_rib(&mut self, addr: &str) {
        self.update(
            addr,
            wire::Update {
                end_of_rib: Some(Family::Ipv4),
                ..Default::default()
            },
        );
    }

    /// Everything `addr`'s session was sent since the last look.
    fn sent(&mut self, addr: &str) -> Sent {
        let mut out = Sent::default();
        let mut sessions = self.sessions.lock().unwrap();
        let rx = sessions.get_mut(&ip(addr)).expect("a session was started");
        while let Ok(m) = rx.try_recv() {
            match m {
                ToSession::Send(msgs) => msgs.messages().for_each(|m| decode_into(m, &mut out)),
                ToSession::Stop(n) => out.control.push(("stop", n.code(), n.subcode())),
                ToSession::Reset(n, _) => out.control.push(("reset", n.code(), n.subcode())),
                ToSession::Refresh(_) => out.control.push(("refresh", 0, 0)),
                ToSession::Incoming(_) => out.control.push(("incoming", 0, 0)),
            }
        }
        out
    }

    /// Dropped peers' paths all out (every slice), then the decision on
    /// whatever else changed.
    fn flush(&mut self) {
        while self.inst.rib.draining() {
            self.inst.drain_step();
        }
        self.inst.flush();
    }

    /// Peers up and their initial End-of-RIB read, so tests see only what
    /// they cause.
    fn settle(&mut self, addrs: &[&str]) {
        self.flush();
        for a in addrs {
            self.sent(a);
        }
    }

    /// The route events sent to the embedder since the last look.
    fn events(&mut self) -> Vec<RouteEvent> {
        std::iter::from_fn(|| self.routes.try_recv().ok()).collect()
    }

    fn stale(&self, prefix: &str) -> Vec<bool> {
        self.inst
            .rib
            .entries()
            .iter()
            .filter(|e| e.prefix == net(prefix))
            .map(|e| e.stale)
            .collect()
    }
}

/// Decode one UPDATE we sent, as an iBGP receiver would (so LOCAL_PREF,
/// ORIGINATOR_ID and CLUSTER_LIST are all visible).
fn decode_into(msg: &[u8], out: &mut Sent) {
    let mut ctx = wire::parsing_context(true);
    let (m, ignored) = wire::decode(msg, &mut ctx).expect("we send valid messages");
    let BgpMessage::Update(u) = m else {
        panic!("not an UPDATE: {m:?}")
    };
    let u = wire::decode_update(&u, &ignored, true, false).expect("valid UPDATE");
    if let Some(f) = u.end_of_rib {
        out.end_of_rib.push(f);
    }
    out.withdrawn.extend(u.withdrawn);
    for p in u.announced {
        out.announced.insert(p, u.attrs.clone());
    }
}

#[test]
fn a_new_session_gets_the_table_and_end_of_rib() {
    let mut h = Harness::new(|_| {});
    h.inst.command(Command::Announce(net("10.9.0.0/24")));
    h.flush();
    h.peer("192.0.2.2", ASN, |_| {});
    h.up("192.0.2.2", None);
    let s = h.sent("192.0.2.2");
    let a = &s.announced[&net("10.9.0.0/24")];
    assert_eq!(
        a.next_hop,
        Some(ip(ROUTER_ID)),
        "our own prefix: our address"
    );
    assert_eq!(a.local_pref, Some(100));
    assert_eq!(s.end_of_rib, vec![Family::Ipv4]);
}

/// A session that comes up within the batch interval of an announcement
/// (a restarted agent's peers reconnect in about a millisecond) must get
/// that prefix before End-of-RIB: a restarting peer's receiver sweeps what
/// End-of-RIB did not refresh (RFC 4724 §4.2), and a prefix sent after it
/// is a withdraw and a re-add in every peer's kernel.
#[test]
fn a_session_up_before_the_flush_gets_the_prefix_before_end_of_rib() {
    let mut h = Harness::new(|_| {});
    h.inst.command(Command::Announce(net("10.9.0.0/24")));
    h.peer("192.0.2.2", ASN, |_| {});
    h.up("192.0.2.2", None);
    let s = h.sent("192.0.2.2");
    assert_eq!(s.end_of_rib, vec![Family::Ipv4]);
    assert!(
        s.announced.contains_key(&net("10.9.0.0/24")),
        "End-of-RIB went out without the prefix announced before the session came up: {s:?}"
    );
}

#[test]
fn reflection_follows_client_and_non_client_rules() {
    let mut h = Harness::new(|_| {});
    let clients = ["192.0.2.11", "192.0.2.12"];
    let others = ["192.0.2.21", "192.0.2.22"];
    for c in clients {
        h.peer(c, ASN, |p| p.route_reflector_client = true);
    }
    for o in others {
        h.peer(o, ASN, |_| {});
    }
    let all = [clients, others].concat();
    for p in &all {
        h.up(p, None);
    }
    h.settle(&all);

    // A non-client's route goes to the clients only (RFC 4456 §6).
    h.announce("192.0.2.21", &["10.1.0.0/24"], attrs(&[], "192.0.2.21"));
    h.flush();
    for c in clients {
        let s = h.sent(c);
        let a = &s.announced[&net("10.1.0.0/24")];
        assert_eq!(a.originator_id, Some("192.0.2.21".parse().unwrap()));
        assert_eq!(
            a.cluster_list,
            vec![CLUSTER_ID.parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            a.next_hop,
            Some(ip("192.0.2.21")),
            "the reflector keeps the next hop"
        );
    }
    for o in others {
        assert!(h.sent(o).announced.is_empty(), "{o} is not a client");
    }

    // A client's route goes to everyone but itself.
    h.announce("192.0.2.11", &["10.2.0.0/24"], attrs(&[], "192.0.2.11"));
    h.flush();
    assert!(h.sent("192.0.2.11").announced.is_empty());
    for p in ["192.0.2.12", "192.0.2.21", "192.0.2.22"] {
        let s = h.sent(p);
        let a = &s.announced[&net("10.2.0.0/24")];
        assert_eq!(a.originator_id, Some("192.0.2.11".parse().unwrap()), "{p}");
    }

    // A path that carries our cluster ID has looped (RFC 4456 §8).
    let mut looped = attrs(&[], "192.0.2.22");
    looped.cluster_list = vec![CLUSTER_ID.parse().unwrap()];
    h.announce("192.0.2.22", &["10.3.0.0/24"], looped);
    h.flush();
    assert!(h.inst.rib.best(&net("10.3.0.0/24")).is_none());

    // A new cluster ID reaches every Adj-RIB-Out at once.
    h.inst
        .command(Command::SetClusterId("192.0.2.200".parse().unwrap()));
    let a = &h.sent("192.0.2.12").announced[&net("10.1.0.0/24")];
    assert_eq!(
        a.cluster_list,
        vec!["192.0.2.200".parse::<Ipv4Addr>().unwrap()]
    );
}

#[test]
fn allow_local_as_accepts_our_as_up_to_the_count() {
    let mut h = Harness::new(|c| c.ebgp_requires_policy = false);
    h.peer("198.51.100.2", 65001, |p| p.allow_local_as = 1);
    h.peer("198.51.100.3", 65001, |_| {});
    h.up("198.51.100.2", None);
    h.up("198.51.100.3", None);
    let once = attrs(&[65001, ASN, 65002], "198.51.100.2");
    let twice = attrs(&[65001, ASN, ASN], "198.51.100.2");
    h.announce("198.51.100.2", &["10.4.0.0/24"], once.clone());
    h.announce("198.51.100.2", &["10.5.0.0/24"], twice);
    h.announce("198.51.100.3", &["10.6.0.0/24"], once);
    h.flush();
    assert!(
        h.inst.rib.best(&net("10.4.0.0/24")).is_some(),
        "once: allowed"
    );
    assert!(
        h.inst.rib.best(&net("10.5.0.0/24")).is_none(),
        "twice: looped"
    );
    assert!(
        h.inst.rib.best(&net("10.6.0.0/24")).is_none(),
        "a peer without allow_local_as: looped"
    );
}

#[test]
fn ebgp_and_ibgp_get_their_attributes() {
    let mut h = Harness::new(|c| c.ebgp_requires_policy = false);
    h.peer("192.0.2.2", ASN, |_| {});
    h.peer("192.0.2.3", ASN, |p| p.next_hop_self = true);
    h.peer("198.51.100.2", 65001, |_| {});
    let all = ["192.0.2.2", "192.0.2.3", "198.51.100.2"];
    for p in all {
        h.up(p, None);
    }
    h.settle(&all);

    // From eBGP: LOCAL_PREF 100 added for iBGP, MED kept, next hop kept
    // unless next-hop-self.
    let mut from_ebgp = attrs(&[65001], "198.51.100.2");
    from_ebgp.med = Some(5);
    h.announce("198.51.100.2", &["10.1.0.0/24"], from_ebgp);
    h.flush();
    let a = h.sent("192.0.2.2").announced[&net("10.1.0.0/24")].clone();
    assert_eq!((a.local_pref, a.med), (Some(100), Some(5)));
    assert_eq!(a.next_hop, Some(ip("198.51.100.2")));
    assert_eq!(a.as_path_flat(), vec![65001], "no prepend on iBGP");
    let a = h.sent("192.0.2.3").announced[&net("10.1.0.0/24")].clone();
    assert_eq!(a.next_hop, Some(ip(ROUTER_ID)), "next-hop-self");

    // From iBGP to eBGP: our AS prepended, no LOCAL_PREF, MED not passed on
    // (no export policy), our address as next hop.
    let mut from_ibgp = attrs(&[], "192.0.2.2");
    from_ibgp.local_pref = Some(200);
    from_ibgp.med = Some(9);
    h.announce("192.0.2.2", &["10.2.0.0/24"], from_ibgp);
    h.flush();
    let a = h.sent("198.51.100.2").announced[&net("10.2.0.0/24")].clone();
    assert_eq!(a.as_path_flat(), vec![ASN]);
    assert_eq!((a.local_pref, a.med), (None, None));
    assert_eq!(a.next_hop, Some(ip(ROUTER_ID)));
    // And the eBGP peer's own route never goes back to it.
    assert!(
        !h.sent("198.51.100.2")
            .announced
            .contains_key(&net("10.1.0.0/24"))
    );
}

#[test]
fn rfc8212_ebgp_without_policy_exchanges_nothing_until_given_one() {
    let mut h = Harness::new(|_| {});
    h.inst.command(Command::Announce(net("10.9.0.0/24")));
    h.peer("192.0.2.2", ASN, |_| {});
    h.peer("198.51.100.2", 65001, |_| {});
    h.up("192.0.2.2", None);
    h.up("198.51.100.2", None);
    h.flush();
    let s = h.sent("198.51.100.2");
    assert!(s.announced.is_empty(), "no export policy: nothing sent");
    assert_eq!(
        s.end_of_rib,
        vec![Family::Ipv4],
        "but End-of-RIB all the same"
    );
    h.sent("192.0.2.2");

    h.announce(
        "198.51.100.2",
        &["10.1.0.0/24"],
        attrs(&[65001], "198.51.100.2"),
    );
    h.flush();
    assert!(
        h.inst.rib.best(&net("10.1.0.0/24")).is_none(),
        "nothing imported"
    );
    assert!(h.sent("192.0.2.2").announced.is_empty());

    // Policy arrives: the session stays, the import side is refreshed
    // (RFC 2918) and the export side is sent at once.
    let mut cfg = PeerConfig::new(ip("198.51.100.2"), 65001);
    cfg.import = rules("[{action: accept}]");
    cfg.export = rules("[{prefix: 10.9.0.0/24, action: accept}]");
    h.add(cfg);
    let s = h.sent("198.51.100.2");
    assert_eq!(s.control, vec![("refresh", 0, 0)], "no reset");
    assert!(s.announced.contains_key(&net("10.9.0.0/24")));
    h.announce(
        "198.51.100.2",
        &["10.1.0.0/24"],
        attrs(&[65001], "198.51.100.2"),
    );
    h.flush();
    assert!(
        h.sent("192.0.2.2")
            .announced
            .contains_key(&net("10.1.0.0/24"))
    );
}

#[test]
fn a_session_setting_change_restarts_the_session_and_removal_stops_it() {
    let mut h = Harness::new(|_| {});
    let take = |h: &mut Harness| h.sessions.lock().unwrap().remove(&ip("192.0.2.2")).unwrap();
    h.peer("192.0.2.2", ASN, |_| {});
    let mut first = take(&mut h);
    h.peer("192.0.2.2", ASN, |p| p.hold_time = Some(30));
    assert!(
        matches!(first.try_recv(), Ok(ToSession::Stop(n)) if n.error == Cease::OtherConfigurationChange.into()),
        "Cease / Other Configuration Change"
    );
    let mut second = take(&mut h);
    assert_eq!(h.inst.peers[&ip("192.0.2.2")].session.hold_time, Some(30));
    // The same configuration again changes nothing.
    h.peer("192.0.2.2", ASN, |p| p.hold_time = Some(30));
    assert!(second.try_recv().is_err());
    assert!(h.sessions.lock().unwrap().is_empty(), "no new session");
    let (tx, _rx) = oneshot::channel();
    h.inst.command(Command::RemovePeer(ip("192.0.2.2"), tx));
    assert!(
        matches!(second.try_recv(), Ok(ToSession::Stop(n)) if n.error == Cease::PeerDeconfigured.into()),
        "Cease / Peer De-configured"
    );
}

#[test]
fn graceful_restart_keeps_stale_routes_until_end_of_rib() {
    let mut h = Harness::new(|_| {});
    h.peer("192.0.2.2", ASN, |_| {});
    h.peer("192.0.2.3", ASN, |p| p.route_reflector_client = true);
    let gr: PeerGracefulRestart = (120, false, vec![(Family::Ipv4, true)]);
    h.up("192.0.2.2", Some(gr.clone()));
    h.up("192.0.2.3", None);
    h.settle(&["192.0.2.2", "192.0.2.3"]);
    h.announce(
        "192.0.2.2",
        &["10.1.0.0/24", "10.2.0.0/24"],
        attrs(&[], "192.0.2.2"),
    );
    h.flush();
    assert_eq!(h.sent("192.0.2.3").announced.len(), 2);
    h.events();

    // Down without a NOTIFICATION: the routes stay, stale (RFC 4724 §4.2).
    h.down("192.0.2.2", true);
    h.flush();
    assert_eq!(h.stale("10.1.0.0/24"), vec![true]);
    assert!(h.sent("192.0.2.3").withdrawn.is_empty());
    assert!(h.events().is_empty(), "the embedder keeps forwarding");

    // Back, refreshes one route, End-of-RIB: the other one goes.
    h.up("192.0.2.2", Some(gr));
    h.announce("192.0.2.2", &["10.1.0.0/24"], attrs(&[], "192.0.2.2"));
    assert_eq!(h.stale("10.1.0.0/24"), vec![false]);
    assert_eq!(h.stale("10.2.0.0/24"), vec![true]);
    h.end_of_rib("192.0.2.2");
    h.flush();
    assert_eq!(h.stale("10.2.0.0/24"), Vec::<bool>::new());
    let s = h.sent("192.0.2.3");
    assert_eq!(s.withdrawn, [net("10.2.0.0/24")].into());
    assert!(s.announced.is_empty(), "the refreshed route is unchanged");
    let gone = RouteEvent::Change(RouteChange {
        prefix: net("10.2.0.0/24"),
        paths: vec![],
    });
    assert_eq!(h.events(), vec![gone]);
}

#[test]
fn stale_routes_go_when_the_restart_time_is_over() {
    let mut h = Harness::new(|_| {});
    h.peer("192.0.2.2", ASN, |p| p.max_restart_time = Some(30));
    h.peer("192.0.2.3", ASN, |p| p.route_reflector_client = true);
    h.up("192.0.2.2", Some((120, false, vec![(Family::Ipv4, true)])));
    h.up("192.0.2.3", None);
    h.settle(&["192.0.2.2", "192.0.2.3"]);
    h.announce("192.0.2.2", &["10.1.0.0/24"], attrs(&[], "192.0.2.2"));
    h.flush();
    h.sent("192.0.2.3");
    h.down("192.0.2.2", true);
    let now = Instant::now();
    // The peer asked for 120 s, its configuration caps it at 30 s.
    h.inst.timers(now + Duration::from_secs(29));
    assert_eq!(h.stale("10.1.0.0/24"), vec![true]);
    h.inst.timers(now + Duration::from_secs(31));
    h.flush();
    assert_eq!(h.stale("10.1.0.0/24"), Vec::<bool>::new());
    assert_eq!(h.sent("192.0.2.3").withdrawn, [net("10.1.0.0/24")].into());
}

#[test]
fn without_graceful_restart_or_after_a_notification_routes_go_at_once() {
    for (gr, graceful) in [(None, true), (Some((120, false, vec![])), false)] {
        let mut h = Harness::new(|_| {});
        h.peer("192.0.2.2", ASN, |_| {});
        h.peer("192.0.2.3", ASN, |p| p.route_reflector_client = true);
        h.up("192.0.2.2", gr);
        h.up("192.0.2.3", None);
        h.settle(&["192.0.2.2", "192.0.2.3"]);
        h.announce("192.0.2.2", &["10.1.0.0/24"], attrs(&[], "192.0.2.2"));
        h.flush();
        h.sent("192.0.2.3");
        h.down("192.0.2.2", graceful);
        h.flush();
        assert_eq!(h.sent("192.0.2.3").withdrawn, [net("10.1.0.0/24")].into());
    }
}

#[test]
fn a_peer_back_without_the_forwarding_bit_loses_its_stale_routes() {
    let mut h = Harness::new(|_| {});
    h.peer("192.0.2.2", ASN, |_| {});
    h.up("192.0.2.2", Some((120, false, vec![(Family::Ipv4, true)])));
    h.announce("192.0.2.2", &["10.1.0.0/24"], attrs(&[], "192.0.2.2"));
    h.down("192.0.2.2", true);
    assert_eq!(h.stale("10.1.0.0/24"), vec![true]);
    h.up("192.0.2.2", Some((120, true, vec![(Family::Ipv4, false)])));
    assert_eq!(h.stale("10.1.0.0/24"), Vec::<bool>::new());
}

#[test]
fn initial_sync_waits_for_every_peer_or_the_deadline() {
    let mut h = Harness::new(|_| {});
    h.peer("192.0.2.2", ASN, |_| {});
    h.peer("192.0.2.3", ASN, |_| {});
    h.up("192.0.2.2", None);
    h.up("192.0.2.3", None);
    h.end_of_rib("192.0.2.2");
    assert!(!h.events().contains(&RouteEvent::Synced));
    h.end_of_rib("192.0.2.3");
    assert_eq!(h.events().last(), Some(&RouteEvent::Synced));

    let mut h = Harness::new(|c| c.graceful_restart = Some(60));
    h.peer("192.0.2.2", ASN, |_| {});
    h.inst.timers(Instant::now() + Duration::from_secs(59));
    assert!(h.events().is_empty());
    h.inst.timers(Instant::now() + Duration::from_secs(61));
    assert_eq!(h.events(), vec![RouteEvent::Synced]);
}

#[test]
fn max_prefixes_warns_or_closes_with_cease_1() {
    let mut h = Harness::new(|_| {});
    let limit = |action| {
        move |p: &mut PeerConfig| {
            p.max_prefixes = Some(MaxPrefixes { limit: 1, action });
        }
    };
    h.peer("192.0.2.2", ASN, limit(MaxPrefixAction::Warn));
    h.peer("192.0.2.3", ASN, limit(MaxPrefixAction::Close));
    for p in ["192.0.2.2", "192.0.2.3"] {
        h.up(p, None);
        h.announce(p, &["10.1.0.0/24", "10.2.0.0/24"], attrs(&[], p));
    }
    assert!(h.sent("192.0.2.2").control.is_empty());
    assert_eq!(h.sent("192.0.2.3").control, vec![("reset", 6, 1)]);
}

#[test]
fn the_session_table_shows_type_and_counts() {
    let mut h = Harness::new(|c| c.ebgp_requires_policy = false);
    h.peer("192.0.2.2", ASN, |p| p.route_reflector_client = true);
    h.peer("198.51.100.2", 65001, |p| {
        p.description = Some("tor".into())
    });
    h.up("192.0.2.2", None);
    h.announce("192.0.2.2", &["10.1.0.0/24"], attrs(&[], "192.0.2.2"));
    let t = h.inst.sessions();
    assert_eq!(t[0].kind, "ibgp rr-client");
    assert_eq!(
        (t[0].state.as_str(), t[0].prefixes_received),
        ("Established", 1)
    );
    assert_eq!(
        (t[1].kind.as_str(), t[1].description.as_deref()),
        ("ebgp", Some("tor"))
    );
    assert_eq!(h.inst.summary().sessions_established, 1);
}

#[tokio::test]
async fn accepted_connections_go_to_their_peers_session() {
    let mut h = Harness::new(|_| {});
    h.peer("127.0.0.1", ASN, |_| {});
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let accept = async || {
        let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        l.accept().await.unwrap()
    };
    let (stream, from) = accept().await;
    h.inst.incoming(stream, from);
    assert_eq!(h.sent("127.0.0.1").control, vec![("incoming", 0, 0)]);
    // From a dual-stack listener the address is IPv4-mapped.
    let (stream, from) = accept().await;
    let mapped = SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), from.port());
    h.inst.incoming(stream, mapped);
    assert_eq!(h.sent("127.0.0.1").control, vec![("incoming", 0, 0)]);
    // An address that is not a peer's is refused (the stream is dropped).
    let (stream, _) = accept().await;
    h.inst.incoming(stream, "127.0.0.2:40000".parse().unwrap());
    assert!(h.sent("127.0.0.1").control.is_empty());
}

#[tokio::test]
async fn unknown_addresses_are_refused_and_logged_at_a_rate_limit() {
    let mut h = Harness::new(|_| {});
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(TcpStream::connect(l.local_addr().unwrap()).await.unwrap());
        let (stream, _) = l.accept().await.unwrap();
        h.inst.incoming(stream, "127.0.0.2:40000".parse().unwrap());
    }
    assert_eq!(h.inst.summary().connections_refused, 50);
    // One line for the first; the other 49 wait for the next window.
    assert_eq!(h.inst.refused.unlogged, 49);
    let later = h.inst.refused.last_logged.unwrap() + Refusals::LOG_EVERY;
    assert_eq!(h.inst.refused.count(later), Some(49));
    // The refused connections were closed.
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 1];
    assert_eq!(clients[0].read(&mut b).await.unwrap(), 0);
}

#[test]
fn route_refresh_is_rate_limited_per_peer_and_none_is_lost() {
    let mut h = Harness::new(|_| {});
    h.peer("192.0.2.2", ASN, |_| {});
    h.up("192.0.2.2", None);
    h.inst.command(Command::Announce(net("10.0.0.0/24")));
    h.settle(&["192.0.2.2"]);
    let t0 = Instant::now();
    // The first request is answered at once with the whole table.
    h.inst.refresh_request(ip("192.0.2.2"), Family::Ipv4, t0);
    h.flush();
    assert_eq!(h.sent("192.0.2.2").announced.len(), 1);
    // A hundred more inside the window: nothing now...
    for i in 0..100 {
        h.inst
            .refresh_request(ip("192.0.2.2"), Family::Ipv4, t0 + Duration::from_millis(i));
    }
    h.flush();
    assert!(h.sent("192.0.2.2").announced.is_empty());
    // ...and one answer when the window ends.
    h.inst.timers(t0 + REFRESH_EVERY);
    h.flush();
    assert_eq!(h.sent("192.0.2.2").announced.len(), 1);
    h.inst.timers(t0 + REFRESH_EVERY * 3);
    h.flush();
    assert!(h.sent("192.0.2.2").announced.is_empty());
}

#[test]
fn a_million_flaps_with_a_changing_med_leave_the_attribute_sets_flat() {
    let mut h = Harness::new(|_| {});
    h.peer("192.0.2.2", ASN, |_| {});
    h.up("192.0.2.2", None);
    let mut most = 0;
    for med in 0..1_000_000u32 {
        let mut a = attrs(&[], "192.0.2.2");
        a.med = Some(med);
        h.announce("192.0.2.2", &["10.0.0.0/24"], a);
        h.flush();
        // The embedder consumes its events (they hold the paths).
        h.events();
        most = most.max(h.inst.summary().attribute_sets);
    }
    // One prefix, one live set; what waits for collection is bounded.
    // Collection runs once the set passes twice the live sets plus 1024.
    assert!(most <= 1027, "{most} attribute sets at most");
    assert_eq!(h.inst.summary().loc_rib_prefixes, 1);
}

#[test]
fn an_attribute_set_too_large_for_the_peer_is_withdrawn_not_sent_over_long() {
    let mut h = Harness::new(|c| c.ebgp_requires_policy = false);
    h.peer("192.0.2.2", ASN, |_| {});
    h.peer("198.51.100.2", 65001, |_| {});
    h.up("192.0.2.2", None);
    h.up("198.51.100.2", None);
    h.announce("192.0.2.2", &["10.0.0.0/24"], attrs(&[], "192.0.2.2"));
    h.flush();
    assert_eq!(h.sent("198.51.100.2").announced.len(), 1);
    // 1100 communities: 4400 octets, past the 4096 the session allows.
    let mut big = attrs(&[], "192.0.2.2");
    big.communities = (0..1100).collect();
    h.announce("192.0.2.2", &["10.0.0.0/24"], big);
    h.flush();
    let sent = h.sent("198.51.100.2");
    assert!(sent.announced.is_empty(), "{sent:?}");
    assert_eq!(sent.withdrawn, [net("10.0.0.0/24")].into());
    // The peer holds nothing for it now; the next path that fits goes out.
    h.announce("192.0.2.2", &["10.0.0.0/24"], attrs(&[], "192.0.2.2"));
    h.flush();
    assert_eq!(h.sent("198.51.100.2").announced.len(), 1);
}

/// A dropped peer's paths go a slice at a time: each slice's withdrawals
/// are sent before the next slice is taken out, the paths not yet taken
/// out are no longer candidates, and the peer back with a new session
/// announcing a prefix its old session still has a path for gets that
/// prefix advertised with its new path, not withdrawn by the drop.
#[test]
fn a_dropped_peer_goes_a_slice_at_a_time_and_may_come_back_meanwhile() {
    let mut h = Harness::new(|c| c.ebgp_requires_policy = false);
    h.inst.drain_slice = 3;
    h.peer("198.51.100.2", 65001, |_| {});
    h.peer("198.51.100.3", 65002, |_| {});
    h.up("198.51.100.2", None);
    h.up("198.51.100.3", None);
    h.settle(&["198.51.100.2", "198.51.100.3"]);
    let all: Vec<String> = (0..10).map(|i| format!("10.1.{i}.0/24")).collect();
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    h.announce("198.51.100.2", &refs, attrs(&[65001], "198.51.100.2"));
    h.flush();
    assert_eq!(h.sent("198.51.100.3").announced.len(), 10);

    h.down("198.51.100.2", false);
    assert!(h.inst.rib.draining());
    h.inst.drain_step();
    let first = h.sent("198.51.100.3").withdrawn;
    assert_eq!(first.len(), 3, "one slice withdrawn: {first:?}");
    let left: Vec<IpNet> = all
        .iter()
        .map(|p| net(p))
        .filter(|p| !first.contains(p))
        .collect();
    // The peer is back and announces one prefix its old session still has
    // a path for, with a new path.
    h.up("198.51.100.2", None);
    h.sent("198.51.100.2");
    let again = left[0].to_string();
    h.announce(
        "198.51.100.2",
        &[&again],
        attrs(&[65001, 7], "198.51.100.2"),
    );
    h.flush();
    assert!(!h.inst.rib.draining());
    let s = h.sent("198.51.100.3");
    let want: BTreeSet<IpNet> = left[1..].iter().copied().collect();
    assert_eq!(
        s.withdrawn, want,
        "the rest withdrawn, the one announced again kept"
    );
    assert_eq!(s.announced[&left[0]].as_path_flat(), vec![65000, 65001, 7]);
    let b = h.inst.rib.best(&left[0]).unwrap();
    assert_eq!(
        b.attrs.as_path_flat(),
        vec![65001, 7],
        "the new session's path"
    );
    assert_eq!(h.inst.rib.received_count(ip("198.51.100.2")), 1);
    assert_eq!(h.inst.rib.sizes().0, 1, "one prefix in the Loc-RIB");
    assert_eq!(h.inst.sessions()[1].prefixes_sent, 1);
}
