//! `starling-bgpd` against the real BIRD 2, FRR, GoBGP and ExaBGP, each in
//! its own network namespaces on a bridge. Every check is read from both
//! sides' own views: ours through `starling-bgpd show ... -o json`, theirs
//! through `birdc`, `vtysh`, `gobgp` or ExaBGP's API output.
//!
//! One `#[test]` per reference implementation runs its cases in sequence, so
//! cargo's two test threads run at most two labs at a time on this 2-core box.
//! Each check prints one line: `bird ibgp v4 ours->peer ok (1.2s)`.

use anyhow::{Context, Result, anyhow, bail};
use ipnet::IpNet;
use starling_tests::peers::{
    Lan, Neighbor, Peer, PeerKind, PeerSpec, Starling, StarlingPeer, StarlingSpec, md5_drops,
};
use starling_tests::{Netns, wait_for};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

/// Session establishment: the first connect may wait out one connect-retry
/// (1 s) or, for ExaBGP, its back-off; 30 s is generous on a loaded 2-core box.
const ESTABLISH: Duration = Duration::from_secs(30);
/// An UPDATE or withdrawal reaching the other side's table.
const PROPAGATE: Duration = Duration::from_secs(15);
/// Our side noticing a killed peer: the kernel closes the TCP connection at
/// once; the hold timer (9 s) is the fallback.
const NOTICE_DOWN: Duration = Duration::from_secs(15);
/// The MD5 window ends after this many MD5-rejected segments (see `md5_cases`).
const MD5_REJECTS: u64 = 3;
const MD5_WINDOW_LIMIT: Duration = Duration::from_secs(30);

const OUR_AS: u32 = 65010;
const EBGP_AS: u32 = 65002;
const MD5_OK_AS: u32 = 65003;
const MD5_BAD_AS: u32 = 65004;
const PASSWORD: &str = "starling-md5";
const WRONG_PASSWORD: &str = "not-the-password";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("literal prefix")
}

/// Prints one line per passed check and collects failures, so one run shows
/// every broken case instead of only the first.
struct Report {
    kind: &'static str,
    failures: Vec<String>,
}

impl Report {
    fn new(kind: PeerKind) -> Report {
        Report {
            kind: kind.name(),
            failures: Vec::new(),
        }
    }

    fn wait<F>(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: F,
        context: &dyn Fn() -> String,
    ) -> bool
    where
        F: FnMut() -> Result<bool>,
    {
        match wait_for(what, timeout, cond) {
            Ok(took) => {
                println!("{} {what} ok ({:.1}s)", self.kind, took.as_secs_f64());
                true
            }
            Err(e) => {
                let msg = format!("{} {what} FAILED: {e:#}", self.kind);
                println!("{msg}");
                self.failures.push(format!("{msg}\n{}", context()));
                false
            }
        }
    }

    fn ok(&mut self, what: &str, took: Duration) {
        println!("{} {what} ok ({:.1}s)", self.kind, took.as_secs_f64());
    }

    fn fail(&mut self, what: &str, e: anyhow::Error, context: String) {
        let msg = format!("{} {what} FAILED: {e:#}", self.kind);
        println!("{msg}");
        self.failures.push(format!("{msg}\n{context}"));
    }

    fn finish(self) {
        if !self.failures.is_empty() {
            panic!(
                "{} case(s) failed:\n\n{}",
                self.failures.len(),
                self.failures.join("\n\n")
            );
        }
    }
}

/// One reference peer of our daemon and the prefixes each side originates to it.
struct Role {
    label: &'static str,
    v4: IpAddr,
    v6: Option<IpAddr>,
    peer: Peer,
    /// Originated by the peer from the start / at runtime, per family.
    start: [IpNet; 2],
    runtime: [IpNet; 2],
}

impl Role {
    fn addr(&self, v4: bool) -> Option<IpAddr> {
        if v4 { Some(self.v4) } else { self.v6 }
    }
}

fn family(v4: bool) -> &'static str {
    if v4 { "v4" } else { "v6" }
}

struct Lab {
    // Field order is drop order: daemons before the namespaces they live in.
    ours: Starling,
    roles: Vec<Role>,
    md5_ok: Peer,
    md5_bad: Peer,
    me: Netns,
    md5_bad_ns: Netns,
    _others: Vec<Netns>,
    _lan: Lan,
}

const OURS_V4: &str = "192.0.2.10";
const OURS_V6: &str = "2001:db8::10";
const OUR_START: [&str; 2] = ["10.99.0.0/24", "2001:db8:9900::/48"];
const OUR_RUNTIME: [&str; 2] = ["10.99.1.0/24", "2001:db8:9901::/48"];

impl Lab {
    fn start(kind: PeerKind) -> Result<Lab> {
        kind.require_tools();
        let mut lan = Lan::new()?;
        let me = Netns::new("me")?;
        lan.attach(&me, &format!("{OURS_V4}/24,{OURS_V6}/64"))?;
        let mut nss = Vec::new();
        let mut roles = Vec::new();
        // (session type, last octet of the peer's addresses, peer AS)
        for (label, n, asn) in [("ibgp", 1u8, OUR_AS), ("ebgp", 2, EBGP_AS)] {
            let ns = Netns::new(label)?;
            let v4 = ip(&format!("192.0.2.{n}"));
            let v6 = ip(&format!("2001:db8::{n}"));
            lan.attach(&ns, &format!("{v4}/24,{v6}/64"))?;
            let start = [
                net(&format!("10.{n}.0.0/24")),
                net(&format!("2001:db8:{n}00::/48")),
            ];
            let runtime = [
                net(&format!("10.{n}.1.0/24")),
                net(&format!("2001:db8:{n}01::/48")),
            ];
            let spec = PeerSpec {
                router_id: Ipv4Addr::new(192, 0, 2, n),
                local_as: asn,
                local_addresses: vec![v4, v6],
                neighbors: vec![
                    Neighbor::new(ip(OURS_V4), OUR_AS),
                    Neighbor::new(ip(OURS_V6), OUR_AS),
                ],
                prefixes: start.to_vec(),
            };
            let peer = Peer::start(kind, &ns, spec)?;
            roles.push(Role {
                label,
                v4,
                v6: Some(v6),
                peer,
                start,
                runtime,
            });
            nss.push(ns);
        }
        let md5_ok_ns = Netns::new("md5ok")?;
        lan.attach(&md5_ok_ns, "192.0.2.3/24")?;
        let md5_bad_ns = Netns::new("md5bad")?;
        lan.attach(&md5_bad_ns, "192.0.2.4/24")?;
        let md5_spec = |n: u8, asn: u32, pw: &str| PeerSpec {
            router_id: Ipv4Addr::new(192, 0, 2, n),
            local_as: asn,
            local_addresses: vec![ip(&format!("192.0.2.{n}"))],
            neighbors: vec![Neighbor::new(ip(OURS_V4), OUR_AS).md5(pw)],
            prefixes: vec![net(&format!("10.{n}.0.0/24"))],
        };
        let md5_ok = Peer::start(kind, &md5_ok_ns, md5_spec(3, MD5_OK_AS, PASSWORD))?;
        let md5_bad = Peer::start(kind, &md5_bad_ns, md5_spec(4, MD5_BAD_AS, WRONG_PASSWORD))?;
        nss.push(md5_ok_ns);

        let mut peers = Vec::new();
        for r in &roles {
            let asn = r.peer.spec.local_as;
            peers.push(StarlingPeer::new(r.v4, asn));
            peers.extend(r.v6.map(|a| StarlingPeer::new(a, asn)));
        }
        peers.push(StarlingPeer::new(ip("192.0.2.3"), MD5_OK_AS).md5(PASSWORD));
        peers.push(StarlingPeer::new(ip("192.0.2.4"), MD5_BAD_AS).md5(PASSWORD));
        let spec = StarlingSpec {
            router_id: ip(OURS_V4).to_string().parse()?,
            asn: OUR_AS,
            prefixes: OUR_START.iter().map(|p| net(p)).collect(),
            peers,
        };
        let ours = Starling::start(&me, &starling_tests::bin("starling-bgpd"), &spec)?;
        Ok(Lab {
            ours,
            roles,
            md5_ok,
            md5_bad,
            me,
            md5_bad_ns,
            _others: nss,
            _lan: lan,
        })
    }

    fn context(&self, role: Option<&Role>) -> String {
        let mut s = self.ours.diagnostics();
        if let Some(r) = role {
            s += &r.peer.diagnostics();
        }
        s
    }
}

fn matrix(kind: PeerKind) {
    let mut report = Report::new(kind);
    let mut lab = match Lab::start(kind) {
        Ok(l) => l,
        Err(e) => panic!("{} lab did not start: {e:#}", kind.name()),
    };
    let ours_addr = |v4: bool| ip(if v4 { OURS_V4 } else { OURS_V6 });

    // --- Established, both views; session type as we report it.
    let mut up = vec![];
    for r in &lab.roles {
        for v4 in [true, false] {
            let Some(addr) = r.addr(v4) else { continue };
            let what = format!("{} {} established", r.label, family(v4));
            let ours = &lab.ours;
            let ok = report.wait(
                &what,
                ESTABLISH,
                || {
                    let s = ours
                        .session(addr)?
                        .ok_or_else(|| anyhow!("no session for {addr} in show sessions"))?;
                    if s["state"] != "Established" {
                        return Ok(false);
                    }
                    if s["type"] != r.label {
                        bail!(
                            "our session with {addr} has type {}, expected {}",
                            s["type"],
                            r.label
                        );
                    }
                    r.peer.session_established(ours_addr(v4))
                },
                &|| lab.context(Some(r)),
            );
            up.push(((r.label, v4), ok));
        }
    }
    let is_up =
        |label: &str, v4: bool| up.iter().any(|((l, f), ok)| *l == label && *f == v4 && *ok);

    // --- Prefixes originated at start flow both ways.
    for r in &lab.roles {
        for v4 in [true, false] {
            if !is_up(r.label, v4) {
                continue;
            }
            let i = usize::from(!v4);
            let addr = r.addr(v4).expect("role has this family");
            flow_peer_to_ours(&mut report, &lab, r, addr, r.start[i], true, "");
            flow_ours_to_peer(&mut report, &lab, r, v4, net(OUR_START[i]), true, "");
        }
    }

    // --- Runtime announcements, then withdrawals, both directions.
    runtime_changes(&mut report, &mut lab, &is_up, true);
    runtime_changes(&mut report, &mut lab, &is_up, false);

    md5_cases(&mut report, &lab);

    // --- A peer restart (SIGKILL, then the same config again) recovers.
    restart_case(&mut report, &mut lab);

    // STARLING_INTEROP_VERBOSE=1: every daemon's own state and log tail, also on success.
    if std::env::var_os("STARLING_INTEROP_VERBOSE").is_some() {
        println!("{}", lab.ours.diagnostics());
        for r in &lab.roles {
            println!("{}", r.peer.diagnostics());
        }
        println!("{}{}", lab.md5_ok.diagnostics(), lab.md5_bad.diagnostics());
    }
    report.finish();
}

/// `prefix`, originated by the peer, is (or is no longer) in our Adj-RIB-In
/// for `addr`; for eBGP the AS path must be the peer's AS alone, for iBGP empty.
/// Runtime announcements (`announce`) or withdrawals of the runtime
/// prefixes on both sides, then the checks that they arrived or went.
fn runtime_changes(
    report: &mut Report,
    lab: &mut Lab,
    is_up: &dyn Fn(&str, bool) -> bool,
    announce: bool,
) {
    let verb = if announce { "announce" } else { "withdraw" };
    for p in OUR_RUNTIME {
        let r = if announce {
            lab.ours.announce(net(p))
        } else {
            lab.ours.withdraw(net(p))
        };
        if let Err(e) = r {
            report.fail(&format!("starling-bgpd {verb} {p}"), e, lab.context(None));
        }
    }
    for r in &mut lab.roles {
        for p in r.runtime {
            let res = if announce {
                r.peer.announce(p)
            } else {
                r.peer.withdraw(p)
            };
            if let Err(e) = res {
                let ctx = r.peer.diagnostics();
                report.fail(&format!("{} peer {verb} {p}", r.label), e, ctx);
            }
        }
    }
    let tag = format!(" {verb}");
    for r in &lab.roles {
        for v4 in [true, false] {
            if !is_up(r.label, v4) {
                continue;
            }
            let i = usize::from(!v4);
            let addr = r.addr(v4).expect("role has this family");
            flow_ours_to_peer(report, lab, r, v4, net(OUR_RUNTIME[i]), announce, &tag);
            flow_peer_to_ours(report, lab, r, addr, r.runtime[i], announce, &tag);
        }
    }
}

fn flow_peer_to_ours(
    report: &mut Report,
    lab: &Lab,
    r: &Role,
    addr: IpAddr,
    prefix: IpNet,
    present: bool,
    tag: &str,
) {
    let what = format!("{} {} peer->ours{tag}", r.label, family(addr.is_ipv4()));
    let want_path: Vec<u64> = if r.label == "ebgp" {
        vec![u64::from(r.peer.spec.local_as)]
    } else {
        vec![]
    };
    report.wait(
        &what,
        PROPAGATE,
        || {
            let routes = lab.ours.routes_from(addr)?;
            match routes.get(&prefix.to_string()) {
                None => Ok(!present),
                Some(_) if !present => Ok(false),
                Some(route) => {
                    let path: Vec<u64> = route["as_path"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_u64())
                        .collect();
                    if path != want_path {
                        bail!(
                            "{prefix} from {addr} has AS path {}, expected {want_path:?}",
                            route["as_path"]
                        );
                    }
                    Ok(true)
                }
            }
        },
        &|| lab.context(Some(r)),
    );
}

/// `prefix`, originated by us, is (or is no longer) in the peer's own table.
fn flow_ours_to_peer(
    report: &mut Report,
    lab: &Lab,
    r: &Role,
    v4: bool,
    prefix: IpNet,
    present: bool,
    tag: &str,
) {
    let what = format!("{} {} ours->peer{tag}", r.label, family(v4));
    let p = prefix.to_string();
    report.wait(
        &what,
        PROPAGATE,
        || Ok(r.peer.received_prefixes()?.contains(&p) == present),
        &|| lab.context(Some(r)),
    );
}

/// Matching TCP-MD5 passwords establish; mismatching ones never do.
///
/// "Never" is checked over a window that is bounded by a condition, not by a
/// sleep: it lasts until the kernels of both namespaces have dropped
/// `MD5_REJECTS` more segments for a TCP-MD5 reason (each one a connection
/// attempt by one of the two daemons that would have opened the session had
/// the keys matched), and the control session with matching keys, started at
/// the same moment, has reached Established. On every poll in the window
/// neither side may report the session Established.
fn md5_cases(report: &mut Report, lab: &Lab) {
    let ok_addr = ip("192.0.2.3");
    let bad_addr = ip("192.0.2.4");
    let ours_v4 = ip(OURS_V4);
    let ctx_ok = || format!("{}{}", lab.ours.diagnostics(), lab.md5_ok.diagnostics());
    let ctx_bad = || format!("{}{}", lab.ours.diagnostics(), lab.md5_bad.diagnostics());
    report.wait(
        "md5 matching v4 established",
        ESTABLISH,
        || Ok(lab.ours.session_established(ok_addr)? && lab.md5_ok.session_established(ours_v4)?),
        &ctx_ok,
    );

    let drops = || -> Result<u64> { Ok(md5_drops(&lab.me)? + md5_drops(&lab.md5_bad_ns)?) };
    let result = (|| -> Result<(u64, Duration)> {
        let start = Instant::now();
        let first = drops()?;
        let mut polls = 0u64;
        wait_for(
            "MD5-rejected connection attempts in the mismatching pair",
            MD5_WINDOW_LIMIT,
            || {
                polls += 1;
                if lab.ours.session_established(bad_addr)? {
                    bail!("starling-bgpd reports the mismatching-MD5 session Established");
                }
                if lab.md5_bad.session_established(ours_v4)? {
                    bail!("the peer reports the mismatching-MD5 session Established");
                }
                Ok(drops()? >= first + MD5_REJECTS && lab.ours.session_established(ok_addr)?)
            },
        )
        .context("mismatching MD5 window")?;
        Ok((drops()? - first, start.elapsed()))
    })();
    match result {
        Ok((n, took)) => report.ok(
            &format!("md5 mismatching v4 stays down over {n} MD5-rejected segments"),
            took,
        ),
        Err(e) => report.fail("md5 mismatching v4 stays down", e, ctx_bad()),
    }
}

fn restart_case(report: &mut Report, lab: &mut Lab) {
    let ours_v4 = ip(OURS_V4);
    let ours_v6 = ip(OURS_V6);
    let Some(idx) = lab.roles.iter().position(|r| r.label == "ibgp") else {
        return;
    };
    let (v4, v6) = (lab.roles[idx].v4, lab.roles[idx].v6.expect("ibgp has v6"));

    let t = Instant::now();
    lab.roles[idx].peer.stop();
    let ours = &lab.ours;
    report.wait(
        "ibgp restart: ours sees v4+v6 sessions drop",
        NOTICE_DOWN,
        || Ok(!ours.session_established(v4)? && !ours.session_established(v6)?),
        &|| ours.diagnostics(),
    );
    if let Err(e) = lab.roles[idx].peer.resume() {
        let ctx = lab.context(Some(&lab.roles[idx]));
        report.fail("ibgp restart: peer starts again", e, ctx);
        return;
    }
    let r = &lab.roles[idx];
    for (addr, local, i) in [(v4, ours_v4, 0usize), (v6, ours_v6, 1)] {
        let fam = family(addr.is_ipv4());
        report.wait(
            &format!("ibgp restart: {fam} re-established"),
            ESTABLISH,
            || Ok(lab.ours.session_established(addr)? && r.peer.session_established(local)?),
            &|| lab.context(Some(r)),
        );
        flow_peer_to_ours(report, lab, r, addr, r.start[i], true, " after restart");
        flow_ours_to_peer(
            report,
            lab,
            r,
            addr.is_ipv4(),
            net(OUR_START[i]),
            true,
            " after restart",
        );
    }
    // The start prefixes above might be copies we kept across the restart
    // (graceful restart allows that); a prefix announced only now proves the
    // new sessions carry updates.
    let runtime = lab.roles[idx].runtime;
    for p in runtime {
        if let Err(e) = lab.roles[idx].peer.announce(p) {
            let ctx = lab.roles[idx].peer.diagnostics();
            report.fail(&format!("ibgp restart: peer announce {p}"), e, ctx);
        }
    }
    let r = &lab.roles[idx];
    for (addr, i) in [(v4, 0usize), (v6, 1)] {
        flow_peer_to_ours(
            report,
            lab,
            r,
            addr,
            runtime[i],
            true,
            " announce after restart",
        );
    }
    println!(
        "{} ibgp restart: whole case {:.1}s",
        report.kind,
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn bird() {
    matrix(PeerKind::Bird);
}

#[test]
fn frr() {
    matrix(PeerKind::Frr);
}

#[test]
fn gobgp() {
    matrix(PeerKind::Gobgp);
}

#[test]
fn exabgp() {
    matrix(PeerKind::Exabgp);
}

/// The harness itself, without our daemon: BIRD peers with each of FRR,
/// GoBGP and ExaBGP over IPv4 (they are passive) and IPv6, and start-up prefixes, runtime
/// announcements and withdrawals show up in both daemons' own views; then
/// the other side restarts and comes back.
#[test]
fn harness_reference_daemons_peer_with_bird() {
    for kind in PeerKind::ALL {
        kind.require_tools();
    }
    let mut lan = Lan::new().expect("bridge");
    let hub_ns = Netns::new("hub").expect("netns");
    lan.attach(&hub_ns, "192.0.2.1/24,2001:db8::1/64")
        .expect("attach");
    let others = [
        (PeerKind::Frr, 4u8),
        (PeerKind::Gobgp, 5),
        (PeerKind::Exabgp, 6),
    ];
    let mut hub_neighbors = Vec::new();
    for (_, n) in others {
        hub_neighbors.push(Neighbor::new(
            ip(&format!("192.0.2.{n}")),
            65000 + u32::from(n),
        ));
        hub_neighbors.push(Neighbor::new(
            ip(&format!("2001:db8::{n}")),
            65000 + u32::from(n),
        ));
    }
    let hub = Peer::start(
        PeerKind::Bird,
        &hub_ns,
        PeerSpec {
            router_id: Ipv4Addr::new(192, 0, 2, 1),
            local_as: 65001,
            local_addresses: vec![ip("192.0.2.1"), ip("2001:db8::1")],
            neighbors: hub_neighbors,
            prefixes: vec![net("10.1.0.0/24"), net("2001:db8:100::/48")],
        },
    )
    .expect("BIRD hub");
    let mut spokes = Vec::new();
    for (kind, n) in others {
        let ns = Netns::new(kind.name()).expect("netns");
        let (v4, v6) = (ip(&format!("192.0.2.{n}")), ip(&format!("2001:db8::{n}")));
        lan.attach(&ns, &format!("{v4}/24,{v6}/64"))
            .expect("attach");
        let peer = Peer::start(
            kind,
            &ns,
            PeerSpec {
                router_id: Ipv4Addr::new(192, 0, 2, n),
                local_as: 65000 + u32::from(n),
                local_addresses: vec![v4, v6],
                // Passive on IPv4: BIRD's connection must be accepted, which
                // exercises each kind's listener and passive configuration.
                neighbors: vec![
                    Neighbor::new(ip("192.0.2.1"), 65001).passive(),
                    Neighbor::new(ip("2001:db8::1"), 65001),
                ],
                prefixes: vec![
                    net(&format!("10.{n}.0.0/24")),
                    net(&format!("2001:db8:{n}00::/48")),
                ],
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        spokes.push((ns, peer, v4, v6, n));
    }
    let check = |what: String, cond: &mut dyn FnMut() -> Result<bool>, ctx: &dyn Fn() -> String| {
        match wait_for(&what, ESTABLISH, cond) {
            Ok(t) => println!("harness {what} ok ({:.1}s)", t.as_secs_f64()),
            Err(e) => panic!("harness {what}: {e:#}\n{}", ctx()),
        }
    };
    let hub_v4 = ip("192.0.2.1");
    let hub_v6 = ip("2001:db8::1");
    for (_, spoke, v4, v6, n) in &mut spokes {
        let k = spoke.kind.name();
        let ctx = |s: &Peer| format!("{}{}", hub.diagnostics(), s.diagnostics());
        for (mine, theirs) in [(hub_v4, *v4), (hub_v6, *v6)] {
            check(
                format!("bird<->{k} {theirs} established"),
                &mut || Ok(hub.session_established(theirs)? && spoke.session_established(mine)?),
                &|| ctx(spoke),
            );
        }
        let theirs = [format!("10.{n}.0.0/24"), format!("2001:db8:{n}00::/48")];
        check(
            format!("bird<->{k} start prefixes both ways"),
            &mut || {
                let at_hub = hub.received_prefixes()?;
                let at_spoke = spoke.received_prefixes()?;
                Ok(theirs.iter().all(|p| at_hub.contains(p))
                    && at_spoke.contains("10.1.0.0/24")
                    && at_spoke.contains("2001:db8:100::/48"))
            },
            &|| ctx(spoke),
        );
        let extra = [
            net(&format!("10.{n}.1.0/24")),
            net(&format!("2001:db8:{n}01::/48")),
        ];
        for p in extra {
            spoke
                .announce(p)
                .unwrap_or_else(|e| panic!("{k} announce {p}: {e:#}"));
        }
        check(
            format!("{k} runtime announce -> bird"),
            &mut || {
                let at_hub = hub.received_prefixes()?;
                Ok(extra.iter().all(|p| at_hub.contains(&p.to_string())))
            },
            &|| ctx(spoke),
        );
        for p in extra {
            spoke
                .withdraw(p)
                .unwrap_or_else(|e| panic!("{k} withdraw {p}: {e:#}"));
        }
        check(
            format!("{k} runtime withdraw -> bird"),
            &mut || {
                let at_hub = hub.received_prefixes()?;
                Ok(extra.iter().all(|p| !at_hub.contains(&p.to_string())))
            },
            &|| ctx(spoke),
        );
        spoke.stop();
        check(
            format!("{k} killed -> bird session down"),
            &mut || Ok(!hub.session_established(*v4)?),
            &|| ctx(spoke),
        );
        spoke
            .resume()
            .unwrap_or_else(|e| panic!("{k} resume: {e:#}"));
        check(
            format!("{k} restarted -> established, prefixes back"),
            &mut || {
                Ok(hub.session_established(*v4)?
                    && spoke.received_prefixes()?.contains("10.1.0.0/24")
                    && hub.received_prefixes()?.contains(&theirs[0]))
            },
            &|| ctx(spoke),
        );
    }
    // BIRD's own runtime announce/withdraw, seen by every spoke.
    let mut hub = hub;
    let extra = [net("10.1.1.0/24"), net("2001:db8:101::/48")];
    for p in extra {
        hub.announce(p).expect("bird announce");
    }
    for (_, spoke, ..) in &spokes {
        check(
            format!("bird runtime announce -> {}", spoke.kind.name()),
            &mut || {
                let s = spoke.received_prefixes()?;
                Ok(extra.iter().all(|p| s.contains(&p.to_string())))
            },
            &|| spoke.diagnostics(),
        );
    }
    for p in extra {
        hub.withdraw(p).expect("bird withdraw");
    }
    for (_, spoke, ..) in &spokes {
        check(
            format!("bird runtime withdraw -> {}", spoke.kind.name()),
            &mut || {
                let s = spoke.received_prefixes()?;
                Ok(extra.iter().all(|p| !s.contains(&p.to_string())))
            },
            &|| spoke.diagnostics(),
        );
    }
}

// ================================================ RFC 7606 over a real session

/// What one malformed UPDATE should do to the route it carries.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    /// The route is learned (the error was an attribute discard, or a
    /// non-unicast prefix beside it was ignored).
    Kept,
    /// The route, first learned from a valid UPDATE, is withdrawn by the
    /// malformed one (treat-as-withdraw).
    Withdrawn,
}

/// A sample of the RFC 7606 rules (docs/bgp.md has them all, with their
/// in-process tests), sent over a real session by a hand-made peer to
/// `starling-bgpd`: the session must stay Established with no NOTIFICATION,
/// each route be kept or withdrawn as the RFC says, and a BIRD peer of the
/// speaker see the same result. Last, the one sample the RFC answers with a
/// session reset (a repeated MP_UNREACH_NLRI, §3 g) must reset it.
#[test]
fn rfc7606_from_a_hand_made_peer() {
    use starling_tests::raw_peer::RawPeer;
    use starling_tests::raw_peer::update::{
        OPT, OPT_TRANS, WELL_KNOWN, attr, mandatory, message, nlri,
    };
    PeerKind::Bird.require_tools();
    const RAW_AS: u32 = 65005;
    let raw_addr = ip("192.0.2.5");
    let bird_addr = ip("192.0.2.6");
    let mut lan = Lan::new().expect("lan");
    let me = Netns::new("me").expect("netns");
    lan.attach(&me, &format!("{OURS_V4}/24")).expect("attach");
    let raw_ns = Netns::new("raw").expect("netns");
    lan.attach(&raw_ns, "192.0.2.5/24").expect("attach");
    let bird_ns = Netns::new("bird").expect("netns");
    lan.attach(&bird_ns, "192.0.2.6/24").expect("attach");
    let bird = Peer::start(
        PeerKind::Bird,
        &bird_ns,
        PeerSpec {
            router_id: Ipv4Addr::new(192, 0, 2, 6),
            local_as: OUR_AS,
            local_addresses: vec![bird_addr],
            neighbors: vec![Neighbor::new(ip(OURS_V4), OUR_AS)],
            prefixes: vec![],
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let mut raw_peer = StarlingPeer::new(raw_addr, RAW_AS);
    raw_peer.passive = true;
    let ours = Starling::start(
        &me,
        &starling_tests::bin("starling-bgpd"),
        &StarlingSpec {
            router_id: ip(OURS_V4).to_string().parse().expect("v4"),
            asn: OUR_AS,
            prefixes: vec![],
            peers: vec![raw_peer, StarlingPeer::new(bird_addr, OUR_AS)],
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let raw = RawPeer::establish(
        &raw_ns,
        ip(OURS_V4),
        RAW_AS,
        Ipv4Addr::new(192, 0, 2, 5),
        starling_tests::peers::HOLD_TIME,
        ESTABLISH,
    )
    .unwrap_or_else(|e| panic!("hand-made peer: {e:#}\n{}", ours.diagnostics()));
    let ctx = || format!("{}{}", ours.diagnostics(), bird.diagnostics());
    let check = |what: &str, cond: &mut dyn FnMut() -> Result<bool>| match wait_for(
        what, PROPAGATE, cond,
    ) {
        Ok(t) => println!("rfc7606 {what} ok ({:.1}s)", t.as_secs_f64()),
        Err(e) => panic!("rfc7606 {what}: {e:#}\n{}", ctx()),
    };
    check("session and BIRD up", &mut || {
        Ok(ours.session_established(raw_addr)? && bird.session_established(ip(OURS_V4))?)
    });

    let nh = [192, 0, 2, 5];
    let valid = |p: &str| {
        message(
            &[],
            &mandatory(RAW_AS, nh),
            &nlri(p.parse().expect("prefix")),
        )
    };
    let with = |p: &str, extra: Vec<u8>| {
        let mut a = mandatory(RAW_AS, nh);
        a.push(extra);
        message(&[], &a, &nlri(p.parse().expect("prefix")))
    };
    // (name, prefix, malformed UPDATE, expected)
    let overrun = {
        // MULTI_EXIT_DISC claims 9 octets, 4 remain in the attribute list (§4).
        let mut a = mandatory(RAW_AS, nh);
        a.push(vec![OPT, 4, 9, 0, 0, 0, 1]);
        message(&[], &a, &nlri("10.50.7.0/24".parse().expect("prefix")))
    };
    let multicast_beside = {
        let mut n = vec![16, 224, 1];
        n.extend(nlri("10.50.5.0/24".parse().expect("prefix")));
        message(&[8, 239], &mandatory(RAW_AS, nh), &n)
    };
    let cases: Vec<(&str, &str, Vec<u8>, Expect)> = vec![
        (
            "MED of length 3 (§7.4)",
            "10.50.2.0/24",
            with("10.50.2.0/24", attr(OPT, 4, &[0, 0, 1])),
            Expect::Withdrawn,
        ),
        (
            "COMMUNITIES of length 5 (§7.8)",
            "10.50.4.0/24",
            with("10.50.4.0/24", attr(OPT_TRANS, 8, &[0, 1, 0, 2, 9])),
            Expect::Withdrawn,
        ),
        (
            "LARGE_COMMUNITY of length 13 (RFC 8092 §6)",
            "10.50.6.0/24",
            with("10.50.6.0/24", attr(OPT_TRANS, 32, &[0; 13])),
            Expect::Withdrawn,
        ),
        (
            "attribute overruns the list (§4)",
            "10.50.7.0/24",
            overrun,
            Expect::Withdrawn,
        ),
        (
            "NEXT_HOP multicast (§7.3)",
            "10.50.8.0/24",
            {
                let mut a = mandatory(RAW_AS, [224, 0, 0, 5]);
                a.truncate(3);
                message(&[], &a, &nlri("10.50.8.0/24".parse().expect("prefix")))
            },
            Expect::Withdrawn,
        ),
        (
            "ATOMIC_AGGREGATE of length 1 (§7.6)",
            "10.50.3.0/24",
            with("10.50.3.0/24", attr(WELL_KNOWN, 6, &[1])),
            Expect::Kept,
        ),
        (
            "LOCAL_PREF from an external peer (§7.5)",
            "10.50.9.0/24",
            with("10.50.9.0/24", attr(WELL_KNOWN, 5, &[0, 0, 1])),
            Expect::Kept,
        ),
        (
            "multicast prefixes announced and withdrawn beside a unicast one (RFC 4271 §6.3)",
            "10.50.5.0/24",
            multicast_beside,
            Expect::Kept,
        ),
    ];
    raw.send(&valid("10.50.1.0/24")).expect("send");
    for (_, p, _, e) in &cases {
        if *e == Expect::Withdrawn {
            raw.send(&valid(p)).expect("send");
        }
    }
    check("valid routes learned, here and at BIRD", &mut || {
        let have = ours.routes_from(raw_addr)?;
        let at_bird = bird.received_prefixes()?;
        Ok(have.contains_key("10.50.1.0/24")
            && cases
                .iter()
                .filter(|c| c.3 == Expect::Withdrawn)
                .all(|c| have.contains_key(c.1) && at_bird.contains(c.1)))
    });
    for (what, _, m, _) in &cases {
        raw.send(m).unwrap_or_else(|e| panic!("send {what}: {e:#}"));
    }
    for (what, p, _, e) in &cases {
        let want = *e == Expect::Kept;
        check(&format!("{what}: {p} {e:?} here and at BIRD"), &mut || {
            Ok(ours.routes_from(raw_addr)?.contains_key(*p) == want
                && bird.received_prefixes()?.contains(*p) == want)
        });
    }
    check(
        "10.50.1.0/24 untouched, session Established, no NOTIFICATION",
        &mut || {
            if !raw.notifications().is_empty() || raw.closed() {
                bail!(
                    "the speaker sent {:?} / closed the session",
                    raw.notifications()
                );
            }
            Ok(ours.session_established(raw_addr)?
                && ours.routes_from(raw_addr)?.contains_key("10.50.1.0/24"))
        },
    );

    // §3 g: a repeated MP_UNREACH_NLRI is the one session reset here.
    let un = attr(OPT, 15, &[0, 1, 1, 8, 10]);
    raw.send(&message(&[], &[un.clone(), un], &[]))
        .expect("send");
    check(
        "repeated MP_UNREACH_NLRI: NOTIFICATION 3/1, routes gone",
        &mut || {
            Ok(raw.notifications().contains(&(3, 1))
                && !ours.session_established(raw_addr)?
                && ours.routes_from(raw_addr)?.is_empty()
                && !bird.received_prefixes()?.contains("10.50.1.0/24"))
        },
    );
}

// ================================================ a peer that stops reading

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    Ok(kb / 1024.0)
}

/// A BIRD peer is frozen with SIGSTOP (process stopped, kernel alive, its
/// socket reading nothing) while a hand-made peer feeds `starling-bgpd` a
/// large table with one attribute set per prefix, which the speaker
/// re-advertises to both BIRDs. The frozen one must be dropped within its
/// hold time (send hold timer, RFC 9687, or its silence), the prefix it
/// originated withdrawn, while the other BIRD gets the whole table and the
/// feeding session stays up; the speaker's memory is printed and bounded.
#[test]
fn a_frozen_peer_is_dropped_and_the_others_get_the_table() {
    use starling_tests::raw_peer::RawPeer;
    use starling_tests::raw_peer::update::{OPT, attr, mandatory, message, nlri};
    PeerKind::Bird.require_tools();
    const RAW_AS: u32 = 65005;
    const TABLE: u32 = 300_000;
    let raw_addr = ip("192.0.2.5");
    let (frozen_addr, healthy_addr) = (ip("192.0.2.6"), ip("192.0.2.7"));
    let mut lan = Lan::new().expect("lan");
    let me = Netns::new("me").expect("netns");
    lan.attach(&me, &format!("{OURS_V4}/24")).expect("attach");
    let raw_ns = Netns::new("raw").expect("netns");
    lan.attach(&raw_ns, "192.0.2.5/24").expect("attach");
    let mut birds = Vec::new();
    for (n, tag) in [(6u8, "frozen"), (7, "healthy")] {
        let ns = Netns::new(tag).expect("netns");
        lan.attach(&ns, &format!("192.0.2.{n}/24")).expect("attach");
        let bird = Peer::start(
            PeerKind::Bird,
            &ns,
            PeerSpec {
                router_id: Ipv4Addr::new(192, 0, 2, n),
                local_as: OUR_AS,
                local_addresses: vec![ip(&format!("192.0.2.{n}"))],
                neighbors: vec![Neighbor::new(ip(OURS_V4), OUR_AS)],
                prefixes: vec![net(&format!("10.6{n}.0.0/24"))],
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        birds.push((ns, bird));
    }
    let mut raw_peer = StarlingPeer::new(raw_addr, RAW_AS);
    raw_peer.passive = true;
    let ours = Starling::start(
        &me,
        &starling_tests::bin("starling-bgpd"),
        &StarlingSpec {
            router_id: ip(OURS_V4).to_string().parse().expect("v4"),
            asn: OUR_AS,
            prefixes: vec![],
            peers: vec![
                raw_peer,
                StarlingPeer::new(frozen_addr, OUR_AS),
                StarlingPeer::new(healthy_addr, OUR_AS),
            ],
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let raw = RawPeer::establish(
        &raw_ns,
        ip(OURS_V4),
        RAW_AS,
        Ipv4Addr::new(192, 0, 2, 5),
        starling_tests::peers::HOLD_TIME,
        ESTABLISH,
    )
    .unwrap_or_else(|e| panic!("hand-made peer: {e:#}\n{}", ours.diagnostics()));
    let (frozen, healthy) = (&birds[0].1, &birds[1].1);
    // Not the frozen BIRD's diagnostics: birdc would wait on it forever.
    let ctx = || format!("{}{}", ours.diagnostics(), healthy.diagnostics());
    let check =
        |what: &str, timeout: Duration, cond: &mut dyn FnMut() -> Result<bool>| match wait_for(
            what, timeout, cond,
        ) {
            Ok(t) => println!("frozen-peer {what} ok ({:.1}s)", t.as_secs_f64()),
            Err(e) => panic!("frozen-peer {what}: {e:#}\n{}", ctx()),
        };
    check(
        "sessions up, the BIRDs' prefixes learned",
        ESTABLISH,
        &mut || {
            let r = ours.routes()?;
            let has = |p: &str| r.iter().any(|x| x["prefix"] == p);
            Ok(ours.session_established(frozen_addr)?
                && ours.session_established(healthy_addr)?
                && has("10.66.0.0/24")
                && has("10.67.0.0/24"))
        },
    );
    let rss_before = rss_mib(ours.daemon.pid()).expect("rss");

    frozen.signal(libc::SIGSTOP).expect("SIGSTOP");
    let frozen_at = Instant::now();
    // One attribute set per prefix (MED = its index): nothing packs, so the
    // speaker's output to the frozen BIRD is far beyond the socket buffers.
    let mut batch = Vec::new();
    for i in 0..TABLE {
        let mut a = mandatory(RAW_AS, [192, 0, 2, 5]);
        a.push(attr(OPT, 4, &i.to_be_bytes()));
        let p = ipnet::Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + i), 32).expect("prefix");
        batch.extend(message(&[], &a, &nlri(p)));
        if batch.len() > 1 << 20 {
            raw.send(&batch).expect("feed");
            batch.clear();
        }
    }
    raw.send(&batch).expect("feed");

    let hold = Duration::from_secs(starling_tests::peers::HOLD_TIME as u64);
    check("the frozen BIRD dropped", hold + NOTICE_DOWN, &mut || {
        Ok(!ours.session_established(frozen_addr)?)
    });
    let took = frozen_at.elapsed();
    let why = ours
        .session(frozen_addr)
        .ok()
        .flatten()
        .map(|s| s["last_error"].to_string())
        .unwrap_or_default();
    println!(
        "frozen-peer dropped after {:.1}s: {why}",
        took.as_secs_f64()
    );
    check(
        "its prefix withdrawn, here and at the healthy BIRD",
        PROPAGATE,
        &mut || {
            Ok(
                !ours.routes()?.iter().any(|x| x["prefix"] == "10.66.0.0/24")
                    && !healthy.received_prefixes()?.contains("10.66.0.0/24"),
            )
        },
    );
    check(
        "the healthy BIRD has the whole table",
        Duration::from_secs(120),
        &mut || Ok(healthy.received_prefixes()?.len() as u32 >= TABLE),
    );
    check("the feeding session is untouched", PROPAGATE, &mut || {
        if !raw.notifications().is_empty() || raw.closed() {
            bail!(
                "the speaker sent {:?} / closed the session",
                raw.notifications()
            );
        }
        ours.session_established(raw_addr)
    });
    let rss_after = rss_mib(ours.daemon.pid()).expect("rss");
    println!(
        "frozen-peer starling-bgpd RSS {rss_before:.0} MiB before, {rss_after:.0} MiB with {TABLE} paths and the frozen peer dropped"
    );
    // The table itself: 300k paths with their own attribute sets, plus
    // one Adj-RIB-Out. A frozen peer's unsent output must not add another.
    assert!(rss_after < 512.0, "starling-bgpd uses {rss_after:.0} MiB");
    frozen.signal(libc::SIGCONT).expect("SIGCONT");
}

// ================================================ the fuzz seed corpus

/// Not a check: records what BIRD, FRR and GoBGP really send and writes it
/// as the fuzz seed corpus (fuzz/seeds/, docs/bgp.md "Fuzzing"). For each
/// implementation and each of an iBGP and an eBGP daemon, one IPv4 and one
/// IPv6 session to a recording listener: the OPEN, the table up to
/// End-of-RIB, the UPDATE after one prefix is withdrawn at runtime, and the
/// NOTIFICATION the daemon sends back for a message of bad length.
/// `decode` gets one file per message; `session` gets, per session, the
/// UPDATEs in order behind the setup octet of each configuration that fits
/// (eBGP, eBGP with graceful restart; iBGP, reflector client, reflector
/// client with graceful restart). Run by hand:
/// `STARLING_FUZZ_SEEDS=$PWD/fuzz/seeds cargo test --release -p starling-tests
/// --test bgp_interop capture_fuzz_corpus -- --ignored --nocapture`.
#[test]
#[ignore = "writes the fuzz seed corpus; run by hand"]
fn capture_fuzz_corpus() {
    let out = std::path::PathBuf::from(
        std::env::var("STARLING_FUZZ_SEEDS")
            .expect("STARLING_FUZZ_SEEDS names the directory to write (fuzz/seeds)"),
    );
    // Identical messages (KEEPALIVEs above all) are written once.
    let mut seen = std::collections::BTreeSet::new();
    for kind in [PeerKind::Bird, PeerKind::Frr, PeerKind::Gobgp] {
        for ebgp in [false, true] {
            capture_daemon(kind, ebgp, &out, &mut seen)
                .unwrap_or_else(|e| panic!("capturing {}: {e:#}", kind.name()));
        }
    }
}

fn capture_daemon(
    kind: PeerKind,
    ebgp: bool,
    out: &std::path::Path,
    seen: &mut std::collections::BTreeSet<Vec<u8>>,
) -> Result<()> {
    use starling_bgp::Family;
    use starling_bgp::fuzzing::{EXTERNAL_AS, LOCAL_AS, Role, SessionSetup};
    use starling_tests::capture::{self, NOTIFICATION, Recording};
    kind.require_tools();
    let mut lan = Lan::new()?;
    let me = Netns::new("me")?;
    lan.attach(&me, &format!("{OURS_V4}/24,{OURS_V6}/64"))?;
    let ns = Netns::new("ref")?;
    lan.attach(&ns, "192.0.2.1/24,2001:db8::1/64")?;
    let role = if ebgp { "ebgp" } else { "ibgp" };
    let asn = if ebgp { EXTERNAL_AS } else { LOCAL_AS };
    let listeners = [
        (
            Family::Ipv4,
            capture::listen_in(&me, format!("{OURS_V4}:179").parse()?)?,
        ),
        (
            Family::Ipv6,
            capture::listen_in(&me, format!("[{OURS_V6}]:179").parse()?)?,
        ),
    ];
    let prefixes = [
        "10.1.0.0/24",
        "10.1.128.0/17",
        "2001:db8:100::/48",
        "2001:db8:101:8000::/56",
    ];
    let mut peer = Peer::start(
        kind,
        &ns,
        PeerSpec {
            router_id: Ipv4Addr::new(192, 0, 2, 1),
            local_as: asn,
            local_addresses: vec![ip("192.0.2.1"), ip("2001:db8::1")],
            neighbors: vec![
                Neighbor::new(ip(OURS_V4), LOCAL_AS),
                Neighbor::new(ip(OURS_V6), LOCAL_AS),
            ],
            prefixes: prefixes.iter().map(|p| net(p)).collect(),
        },
    )?;
    let setups: &[SessionSetup] = if ebgp {
        &[
            SessionSetup {
                role: Role::External,
                graceful_restart: false,
            },
            SessionSetup {
                role: Role::External,
                graceful_restart: true,
            },
        ]
    } else {
        &[
            SessionSetup {
                role: Role::Internal,
                graceful_restart: false,
            },
            SessionSetup {
                role: Role::ReflectorClient,
                graceful_restart: false,
            },
            SessionSetup {
                role: Role::ReflectorClient,
                graceful_restart: true,
            },
        ]
    };
    for (family, l) in &listeners {
        let fam = if *family == Family::Ipv4 { "v4" } else { "v6" };
        let mut rec = Recording::accept(l, LOCAL_AS, ESTABLISH)?;
        // The whole table: End-of-RIB, or (GoBGP sends none unless it
        // has graceful restart configured itself) both of its prefixes.
        let mut got = 0;
        rec.until("the table", |m| {
            got += capture::announced(m, *family);
            capture::is_end_of_rib(m, *family) || got >= 2
        })?;
        let gone = net(if *family == Family::Ipv4 {
            prefixes[0]
        } else {
            prefixes[2]
        });
        peer.withdraw(gone)?;
        rec.until("the runtime withdrawal", |m| {
            capture::is_withdrawal(m, *family)
        })?;
        // A header whose length (16) is below the minimum: the daemon must
        // answer 1/2 Bad Message Length (RFC 4271 §6.1).
        let mut bad = vec![0xff; 16];
        bad.extend_from_slice(&[0, 16, 4]);
        rec.send(&bad)?;
        rec.until("a NOTIFICATION", |m| m[18] == NOTIFICATION)?;
        peer.announce(gone)?;
        let stem = format!("{}-{role}-{fam}", kind.name());
        let mut session = Vec::new();
        for (i, m) in rec.messages.iter().enumerate() {
            let what = match m[18] {
                capture::OPEN => "open",
                capture::UPDATE => "update",
                capture::NOTIFICATION => "notification",
                capture::KEEPALIVE => "keepalive",
                _ => "other",
            };
            if m[18] == capture::UPDATE || m[18] == NOTIFICATION {
                session.extend_from_slice(m);
            }
            if seen.insert(m.clone()) {
                write_seed(out, "decode", &format!("{stem}-{i:02}-{what}"), m)?;
            }
        }
        for s in setups {
            let name = match (s.role, s.graceful_restart) {
                (Role::ReflectorClient, false) => "rr-client",
                (Role::ReflectorClient, true) => "rr-client-gr",
                (_, true) => "gr",
                _ => "plain",
            };
            let mut seed = vec![s.octet()];
            seed.extend_from_slice(&session);
            write_seed(out, "session", &format!("{stem}-{name}"), &seed)?;
        }
        println!(
            "{stem}: {} messages, {} octets of UPDATEs and NOTIFICATION",
            rec.messages.len(),
            session.len()
        );
    }
    Ok(())
}

fn write_seed(out: &std::path::Path, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let dir = out.join(target);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))
}
