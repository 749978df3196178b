//! BGP routing against real daemons: route reflection both ways, graceful
//! restart as BIRD and FRR see it, ECMP, max-prefix and policy.
//!
//! Every case builds its own namespaces on a bridge and checks the other
//! daemon's own view (`birdc`, `vtysh`) as well as ours.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use starling_tests::peers::{Lan, Neighbor, Peer, PeerKind, PeerSpec};
use starling_tests::{Daemon, Netns, TempDir, bin, run, wait_for};
use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SESSION_UP: Duration = Duration::from_secs(30);
const ROUTES: Duration = Duration::from_secs(20);

/// `starling-bgpd` with a YAML configuration written by the test.
struct Ours {
    ns: String,
    dir: TempDir,
    daemon: Option<Daemon>,
}

impl Ours {
    fn start(ns: &Netns, yaml: &str) -> Result<Ours> {
        let dir = TempDir::new("bgpd")?;
        let mut o = Ours {
            ns: ns.name.clone(),
            dir,
            daemon: None,
        };
        o.write(yaml)?;
        o.launch()?;
        Ok(o)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("bgpd.sock")
    }

    fn write(&self, yaml: &str) -> Result<()> {
        let y = format!(
            "control_socket: \"{}\"\nhold_time: 9\nconnect_retry: 1\n{yaml}",
            self.socket().display()
        );
        std::fs::write(self.dir.join("bgpd.yaml"), y)?;
        Ok(())
    }

    fn launch(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("bgpd.log"))?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(bin("starling-bgpd"))
            .arg("--config")
            .arg(self.dir.join("bgpd.yaml"))
            .stdout(log.try_clone()?)
            .stderr(log);
        self.daemon = Some(Daemon::spawn("starling-bgpd", cmd)?);
        wait_for(
            "starling-bgpd's control socket",
            Duration::from_secs(15),
            || {
                if let Some(d) = &mut self.daemon {
                    d.check_alive()?;
                }
                Ok(self.ctl(&["show", "sessions"]).is_ok())
            },
        )
        .map_err(|e| anyhow!("{e:#}\n{}", self.log()))?;
        Ok(())
    }

    /// SIGKILL: no NOTIFICATION, the kernel just closes the sockets.
    fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    /// Re-read the configuration (SIGHUP).
    fn reload(&self, yaml: &str) -> Result<()> {
        self.write(yaml)?;
        let pid = self
            .daemon
            .as_ref()
            .ok_or_else(|| anyhow!("not running"))?
            .pid();
        run("kill", &["-HUP", &pid.to_string()]).map(|_| ())
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut a: Vec<&str> = args.to_vec();
        let sock = self.socket();
        a.extend_from_slice(&["--socket", sock.to_str().unwrap_or_default()]);
        run(bin("starling-bgpd").to_str().unwrap_or_default(), &a)
    }

    fn json(&self, what: &str) -> Result<Vec<Value>> {
        let out = self.ctl(&["show", what, "-o", "json"])?;
        let v: Value = serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))?;
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("not an array: {out}"))
    }

    fn session(&self, peer: &str) -> Result<Value> {
        self.json("sessions")?
            .into_iter()
            .find(|s| s["peer"] == peer)
            .ok_or_else(|| anyhow!("no session with {peer}"))
    }

    fn established(&self, peer: &str) -> Result<bool> {
        Ok(self.session(peer)?["state"] == "Established")
    }

    /// Paths we hold for `prefix` (any peer).
    fn paths(&self, prefix: &str) -> Result<Vec<Value>> {
        Ok(self
            .json("routes")?
            .into_iter()
            .filter(|r| r["prefix"] == prefix && r["peer"] != "local")
            .collect())
    }

    /// `show summary`: table sizes, cheap with millions of paths.
    fn summary(&self) -> Result<Value> {
        let out = self.ctl(&["show", "summary", "-o", "json"])?;
        serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))
    }

    fn log(&self) -> String {
        starling_tests::peers::tail(&self.dir.join("bgpd.log"), 40)
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        self.kill();
    }
}

fn birdc(peer: &Peer, args: &[&str]) -> Result<String> {
    let sock = peer.dir().join("bird.ctl");
    let mut a = vec!["-s", sock.to_str().unwrap_or_default()];
    a.extend_from_slice(args);
    run("birdc", &a)
}

fn vtysh(peer: &Peer, cmd: &str) -> Result<String> {
    run(
        "vtysh",
        &[
            "--vty_socket",
            peer.dir().to_str().unwrap_or_default(),
            "-c",
            cmd,
        ],
    )
}

fn has(peer: &Peer, prefix: &str) -> Result<bool> {
    Ok(peer.received_prefixes()?.contains(prefix))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

fn spec(router_id: &str, asn: u32, neighbors: Vec<Neighbor>, prefixes: &[&str]) -> PeerSpec {
    PeerSpec {
        router_id: router_id.parse().expect("literal"),
        local_as: asn,
        local_addresses: vec![ip(router_id)],
        neighbors,
        prefixes: prefixes
            .iter()
            .map(|p| p.parse().expect("literal"))
            .collect(),
    }
}

fn check(what: &str, t0: Instant) {
    println!("ok  {what} ({:.1}s)", t0.elapsed().as_secs_f64());
}

/// Our reflector between a BIRD client and an FRR client: each client's
/// route reaches the other with ORIGINATOR_ID and CLUSTER_LIST set.
#[test]
fn our_reflector_between_bird_and_frr_clients() -> Result<()> {
    let t0 = Instant::now();
    let mut lan = Lan::new()?;
    let (rr, b, f) = (Netns::new("rr")?, Netns::new("bird")?, Netns::new("frr")?);
    lan.attach(&rr, "192.0.2.1/24")?;
    lan.attach(&b, "192.0.2.2/24")?;
    lan.attach(&f, "192.0.2.3/24")?;
    let ours = Ours::start(
        &rr,
        "router_id: 192.0.2.1\nasn: 65000\ncluster_id: 198.51.100.1\npeers:\n\
         - {address: 192.0.2.2, asn: 65000, route_reflector_client: true}\n\
         - {address: 192.0.2.3, asn: 65000, route_reflector_client: true}\n",
    )?;
    let bird = Peer::start(
        PeerKind::Bird,
        &b,
        spec(
            "192.0.2.2",
            65000,
            vec![Neighbor::new(ip("192.0.2.1"), 65000)],
            &["10.2.0.0/24"],
        ),
    )?;
    let frr = Peer::start(
        PeerKind::Frr,
        &f,
        spec(
            "192.0.2.3",
            65000,
            vec![Neighbor::new(ip("192.0.2.1"), 65000)],
            &["10.3.0.0/24"],
        ),
    )?;
    let diag = || {
        format!(
            "{}\n{}\n{}",
            ours.log(),
            bird.diagnostics(),
            frr.diagnostics()
        )
    };
    wait_for("both clients Established", SESSION_UP, || {
        Ok(ours.established("192.0.2.2")? && ours.established("192.0.2.3")?)
    })
    .map_err(|e| anyhow!("{e:#}\n{}", diag()))?;
    check(
        "reflector: sessions with BIRD and FRR clients Established",
        t0,
    );
    wait_for("FRR to learn BIRD's route and BIRD FRR's", ROUTES, || {
        Ok(has(&frr, "10.2.0.0/24")? && has(&bird, "10.3.0.0/24")?)
    })
    .map_err(|e| anyhow!("{e:#}\n{}", diag()))?;
    let b_view = birdc(&bird, &["show", "route", "10.3.0.0/24", "all"])?;
    if !(b_view.contains("BGP.originator_id: 192.0.2.3")
        && b_view.contains("BGP.cluster_list: 198.51.100.1"))
    {
        bail!("BIRD's view of the reflected route lacks ORIGINATOR_ID/CLUSTER_LIST:\n{b_view}");
    }
    let f_view: Value =
        serde_json::from_str(&vtysh(&frr, "show bgp ipv4 unicast 10.2.0.0/24 json")?)?;
    let path = &f_view["paths"][0];
    if path["originatorId"] != "192.0.2.2"
        || !path["clusterList"].to_string().contains("198.51.100.1")
    {
        bail!("FRR's view of the reflected route lacks ORIGINATOR_ID/CLUSTER_LIST: {f_view}");
    }
    // Reflection keeps the originating client's next hop.
    if path["nexthops"][0]["ip"] != "192.0.2.2" {
        bail!("FRR's next hop for 10.2.0.0/24 is not BIRD's address: {f_view}");
    }
    check(
        "reflector: BIRD <-> FRR routes reflected with ORIGINATOR_ID, CLUSTER_LIST, next hop kept",
        t0,
    );
    Ok(())
}

/// BIRD as the reflector, two of our speakers as plain iBGP clients (no
/// special configuration): each learns the other's route through BIRD.
#[test]
fn bird_reflector_with_starling_clients() -> Result<()> {
    let t0 = Instant::now();
    let mut lan = Lan::new()?;
    let (r, a, c) = (Netns::new("birdrr")?, Netns::new("c1")?, Netns::new("c2")?);
    lan.attach(&r, "192.0.2.1/24")?;
    lan.attach(&a, "192.0.2.11/24")?;
    lan.attach(&c, "192.0.2.12/24")?;
    let dir = TempDir::new("birdrr")?;
    let conf = format!(
        "log \"{d}/bird.log\" all;\nrouter id 192.0.2.1;\nprotocol device {{}}\nprotocol direct {{ ipv4; interface \"*\"; }}\n\
         template bgp rrc {{ local 192.0.2.1 as 65000; rr client; rr cluster id 198.51.100.9;\n  \
         hold time 9; keepalive time 3; connect retry time 1; error wait time 1, 4; connect delay time 0;\n  \
         ipv4 {{ import all; export all; }}; }}\n\
         protocol bgp c1 from rrc {{ neighbor 192.0.2.11 as 65000; }}\n\
         protocol bgp c2 from rrc {{ neighbor 192.0.2.12 as 65000; }}\n",
        d = dir.path.display()
    );
    std::fs::write(dir.join("bird.conf"), conf)?;
    let ctl = dir.join("bird.ctl");
    let mut cmd = r.command("bird");
    cmd.args(["-f", "-c"])
        .arg(dir.join("bird.conf"))
        .arg("-s")
        .arg(&ctl)
        .arg("-P")
        .arg(dir.join("bird.pid"));
    let _bird = Daemon::spawn("bird", cmd)?;
    let ctl_s = ctl.to_str().unwrap_or_default().to_string();
    let client = |rid: &str, prefix: &str| {
        format!(
            "router_id: {rid}\nasn: 65000\nprefixes: [{prefix}]\npeers:\n- {{address: 192.0.2.1, asn: 65000}}\n"
        )
    };
    let one = Ours::start(&a, &client("192.0.2.11", "10.11.0.0/24"))?;
    let two = Ours::start(&c, &client("192.0.2.12", "10.12.0.0/24"))?;
    let diag = || {
        format!(
            "{}\n{}\n{}",
            one.log(),
            two.log(),
            run("birdc", &["-s", &ctl_s, "show", "route", "all"]).unwrap_or_default()
        )
    };
    wait_for("both clients Established with BIRD", SESSION_UP, || {
        Ok(one.established("192.0.2.1")? && two.established("192.0.2.1")?)
    })
    .map_err(|e| anyhow!("{e:#}\n{}", diag()))?;
    check("BIRD reflector: our clients Established", t0);
    wait_for("each client to learn the other's route", ROUTES, || {
        Ok(!one.paths("10.12.0.0/24")?.is_empty() && !two.paths("10.11.0.0/24")?.is_empty())
    })
    .map_err(|e| anyhow!("{e:#}\n{}", diag()))?;
    let p = &one.paths("10.12.0.0/24")?[0];
    if p["next_hop"] != "192.0.2.12" {
        bail!("client 1 should reach 10.12.0.0/24 via client 2 (192.0.2.12): {p}");
    }
    let p = &two.paths("10.11.0.0/24")?[0];
    if p["next_hop"] != "192.0.2.11" {
        bail!("client 2 should reach 10.11.0.0/24 via client 1 (192.0.2.11): {p}");
    }
    check(
        "BIRD reflector: our clients learn each other's routes with the original next hop",
        t0,
    );
    Ok(())
}

/// SIGKILL our speaker: BIRD and FRR keep its routes for the restart time
/// and drop them after it. Then restart within the time: the routes stay
/// the whole way through.
#[test]
fn graceful_restart_as_bird_and_frr_see_it() -> Result<()> {
    const RESTART: u64 = 8;
    let t0 = Instant::now();
    let mut lan = Lan::new()?;
    let (s, b, f) = (
        Netns::new("gr")?,
        Netns::new("grbird")?,
        Netns::new("grfrr")?,
    );
    lan.attach(&s, "192.0.2.21/24")?;
    lan.attach(&b, "192.0.2.22/24")?;
    lan.attach(&f, "192.0.2.23/24")?;
    let yaml = format!(
        "router_id: 192.0.2.21\nasn: 65000\nprefixes: [10.21.0.0/24]\ngraceful_restart: {{restart_time: {RESTART}, forwarding_preserved: true}}\npeers:\n\
         - {{address: 192.0.2.22, asn: 65000}}\n- {{address: 192.0.2.23, asn: 65000}}\n"
    );
    let mut ours = Ours::start(&s, &yaml)?;
    let bird = Peer::start(
        PeerKind::Bird,
        &b,
        spec(
            "192.0.2.22",
            65000,
            vec![Neighbor::new(ip("192.0.2.21"), 65000)],
            &[],
        ),
    )?;
    let frr = Peer::start(
        PeerKind::Frr,
        &f,
        spec(
            "192.0.2.23",
            65000,
            vec![Neighbor::new(ip("192.0.2.21"), 65000)],
            &[],
        ),
    )?;
    let both = || -> Result<(bool, bool)> {
        Ok((has(&bird, "10.21.0.0/24")?, has(&frr, "10.21.0.0/24")?))
    };
    wait_for("BIRD and FRR to learn 10.21.0.0/24", SESSION_UP, || {
        Ok(both()? == (true, true))
    })
    .map_err(|e| {
        anyhow!(
            "{e:#}\n{}\n{}\n{}",
            ours.log(),
            bird.diagnostics(),
            frr.diagnostics()
        )
    })?;
    check("graceful restart: BIRD and FRR hold our route", t0);

    // 1. Killed and not back: kept for the restart time, then dropped.
    ours.kill();
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(RESTART - 2) {
        let seen = both()?;
        if seen != (true, true) {
            bail!(
                "{:.1}s after SIGKILL (restart time {RESTART}s) the route is gone: BIRD {}, FRR {}",
                killed.elapsed().as_secs_f64(),
                seen.0,
                seen.1
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check(
        &format!(
            "graceful restart: route kept by BIRD and FRR for {}s after SIGKILL",
            RESTART - 2
        ),
        t0,
    );
    wait_for(
        "BIRD and FRR to drop the route after the restart time",
        Duration::from_secs(RESTART + 20),
        || Ok(both()? == (false, false)),
    )?;
    let gone = killed.elapsed().as_secs_f64();
    if gone < (RESTART - 2) as f64 {
        bail!("dropped after {gone:.1}s, before the restart time of {RESTART}s");
    }
    check(
        &format!("graceful restart: dropped {gone:.1}s after SIGKILL (restart time {RESTART}s)"),
        t0,
    );

    // 2. Back again; then killed and restarted within the restart time.
    ours.launch()?;
    wait_for("the route to come back", SESSION_UP, || {
        Ok(both()? == (true, true))
    })?;
    ours.kill();
    let killed = Instant::now();
    ours.launch()?;
    let mut polls = 0;
    // Watch through the restart and past the restart time: never missing.
    while killed.elapsed() < Duration::from_secs(RESTART + 3) {
        let seen = both()?;
        if seen != (true, true) {
            bail!(
                "{:.1}s after SIGKILL + restart the route was missing: BIRD {}, FRR {}\n{}",
                killed.elapsed().as_secs_f64(),
                seen.0,
                seen.1,
                ours.log()
            );
        }
        polls += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    if !(ours.established("192.0.2.22")? && ours.established("192.0.2.23")?) {
        bail!(
            "sessions did not come back after the restart:\n{}",
            ours.log()
        );
    }
    check(
        &format!(
            "graceful restart: restarted within the restart time, route present in all {polls} polls"
        ),
        t0,
    );
    Ok(())
}

/// Two eBGP peers announce the same prefix; both next hops make the
/// multipath set.
#[test]
fn ecmp_from_two_peers() -> Result<()> {
    let t0 = Instant::now();
    let mut lan = Lan::new()?;
    let (s, b, f) = (
        Netns::new("ecmp")?,
        Netns::new("ebird")?,
        Netns::new("efrr")?,
    );
    lan.attach(&s, "192.0.2.31/24")?;
    lan.attach(&b, "192.0.2.32/24")?;
    lan.attach(&f, "192.0.2.33/24")?;
    let ours = Ours::start(
        &s,
        "router_id: 192.0.2.31\nasn: 65000\nmax_paths: 4\npeers:\n\
         - {address: 192.0.2.32, asn: 65101, import: [{action: accept}], export: [{action: reject}]}\n\
         - {address: 192.0.2.33, asn: 65102, import: [{action: accept}], export: [{action: reject}]}\n",
    )?;
    let _bird = Peer::start(
        PeerKind::Bird,
        &b,
        spec(
            "192.0.2.32",
            65101,
            vec![Neighbor::new(ip("192.0.2.31"), 65000)],
            &["10.99.0.0/24"],
        ),
    )?;
    let _frr = Peer::start(
        PeerKind::Frr,
        &f,
        spec(
            "192.0.2.33",
            65102,
            vec![Neighbor::new(ip("192.0.2.31"), 65000)],
            &["10.99.0.0/24"],
        ),
    )?;
    wait_for(
        "two paths for 10.99.0.0/24, both in the multipath set",
        ROUTES + SESSION_UP,
        || {
            let p = ours.paths("10.99.0.0/24")?;
            Ok(p.len() == 2 && p.iter().all(|r| r["multipath"] == true))
        },
    )
    .map_err(|e| anyhow!("{e:#}\n{}", ours.log()))?;
    let hops: Vec<String> = ours
        .paths("10.99.0.0/24")?
        .iter()
        .map(|r| r["next_hop"].to_string())
        .collect();
    if !(hops.contains(&"\"192.0.2.32\"".to_string())
        && hops.contains(&"\"192.0.2.33\"".to_string()))
    {
        bail!("multipath next hops are {hops:?}");
    }
    check(
        "ECMP: BIRD and FRR paths both in the multipath set (next hops 192.0.2.32, 192.0.2.33)",
        t0,
    );
    Ok(())
}

/// Import and export policy by prefix range, a live policy change applied
/// through route refresh, and a max-prefix limit that closes the session
/// with Cease / Maximum Number of Prefixes Reached.
#[test]
fn policy_and_max_prefix() -> Result<()> {
    let t0 = Instant::now();
    let mut lan = Lan::new()?;
    let (s, b, f) = (
        Netns::new("pol")?,
        Netns::new("pbird")?,
        Netns::new("pfrr")?,
    );
    lan.attach(&s, "192.0.2.41/24")?;
    lan.attach(&b, "192.0.2.42/24")?;
    lan.attach(&f, "192.0.2.43/24")?;
    let cfg = |import_66: &str| {
        format!(
            "router_id: 192.0.2.41\nasn: 65000\nprefixes: [10.60.0.0/24, 10.61.0.0/24]\npeers:\n\
             - address: 192.0.2.42\n  asn: 65201\n  import:\n  - {{prefix: 10.66.0.0/16, le: 32, action: {import_66}}}\n  \
             - {{prefix: 10.0.0.0/8, le: 32, action: accept, set: {{local_pref: 150}}}}\n  \
             export: [{{prefix: 10.60.0.0/24, action: accept}}]\n\
             - address: 192.0.2.43\n  asn: 65202\n  import: [{{action: accept}}]\n  export: [{{action: reject}}]\n  \
             max_prefixes: {{limit: 2, action: close}}\n"
        )
    };
    let ours = Ours::start(&s, &cfg("reject"))?;
    let bird = Peer::start(
        PeerKind::Bird,
        &b,
        spec(
            "192.0.2.42",
            65201,
            vec![Neighbor::new(ip("192.0.2.41"), 65000)],
            &[
                "10.50.0.0/24",
                "10.51.0.0/24",
                "10.66.0.0/24",
                "10.66.1.0/24",
            ],
        ),
    )?;
    let frr = Peer::start(
        PeerKind::Frr,
        &f,
        spec(
            "192.0.2.43",
            65202,
            vec![Neighbor::new(ip("192.0.2.41"), 65000)],
            &["10.70.0.0/24", "10.71.0.0/24", "10.72.0.0/24"],
        ),
    )?;
    wait_for(
        "10.50/10.51 accepted from BIRD, and BIRD holding our 10.60",
        ROUTES + SESSION_UP,
        || {
            Ok(!ours.paths("10.50.0.0/24")?.is_empty()
                && !ours.paths("10.51.0.0/24")?.is_empty()
                && has(&bird, "10.60.0.0/24")?)
        },
    )
    .map_err(|e| anyhow!("{e:#}\n{}\n{}", ours.log(), bird.diagnostics()))?;
    if !ours.paths("10.66.0.0/24")?.is_empty() || !ours.paths("10.66.1.0/24")?.is_empty() {
        bail!("import policy let 10.66.0.0/16 through");
    }
    if ours.paths("10.50.0.0/24")?[0]["local_pref"] != 150 {
        bail!(
            "import policy did not set local_pref 150: {:?}",
            ours.paths("10.50.0.0/24")?
        );
    }
    if has(&bird, "10.61.0.0/24")? {
        bail!("export policy let 10.61.0.0/24 through to BIRD");
    }
    check(
        "policy: import rejects 10.66/16 and sets local_pref; export sends only 10.60/24 (BIRD's view)",
        t0,
    );

    // Accept 10.66/16 now: the speaker asks BIRD for a route refresh.
    ours.reload(&cfg("accept"))?;
    wait_for(
        "10.66.0.0/24 and 10.66.1.0/24 after the policy change",
        ROUTES,
        || Ok(!ours.paths("10.66.0.0/24")?.is_empty() && !ours.paths("10.66.1.0/24")?.is_empty()),
    )
    .map_err(|e| anyhow!("{e:#}\n{}", ours.log()))?;
    if !ours.established("192.0.2.42")? {
        bail!("the policy change reset the session with BIRD");
    }
    check(
        "policy: a live import change is applied through route refresh, session kept",
        t0,
    );

    // FRR sends 3 prefixes against a limit of 2.
    wait_for(
        "the session with FRR closed for exceeding max-prefix",
        ROUTES + SESSION_UP,
        || {
            let s = ours.session("192.0.2.43")?;
            Ok(s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("Maximum Number of Prefixes")))
        },
    )
    .map_err(|e| anyhow!("{e:#}\n{}\n{}", ours.log(), frr.diagnostics()))?;
    let frr_view = vtysh(&frr, "show bgp neighbors 192.0.2.41")?;
    if !frr_view
        .to_lowercase()
        .contains("maximum number of prefixes")
    {
        bail!("FRR does not report the max-prefix Cease:\n{frr_view}");
    }
    check(
        "max-prefix: 3 prefixes over a limit of 2 close the session with Cease 6/1 (FRR's view agrees)",
        t0,
    );
    Ok(())
}

/// Several of our reflectors: two in one cluster (the cluster check stops
/// them re-reflecting each other's copies, clients still get two paths),
/// and two in different clusters (a route crosses both, CLUSTER_LIST grows).
#[test]
fn our_reflectors_in_one_cluster_and_in_two() -> Result<()> {
    let t0 = Instant::now();
    let mut lan = Lan::new()?;
    let names = ["rr1", "rr2", "ca", "cb"];
    let ns: Vec<Netns> = names.iter().map(|n| Netns::new(n)).collect::<Result<_>>()?;
    for (i, n) in ns.iter().enumerate() {
        lan.attach(n, &format!("192.0.2.{}/24", 51 + i))?;
    }
    let (rr1, rr2, ca, cb) = ("192.0.2.51", "192.0.2.52", "192.0.2.53", "192.0.2.54");
    let rr = |me: &str, other: &str, cluster: &str, clients: &[&str]| {
        let mut y = format!(
            "router_id: {me}\nasn: 65000\ncluster_id: {cluster}\npeers:\n- {{address: {other}, asn: 65000}}\n"
        );
        for c in clients {
            y += &format!("- {{address: {c}, asn: 65000, route_reflector_client: true}}\n");
        }
        y
    };
    let client = |me: &str, prefix: &str, rrs: &[&str]| {
        let mut y = format!("router_id: {me}\nasn: 65000\nprefixes: [{prefix}]\npeers:\n");
        for r in rrs {
            y += &format!("- {{address: {r}, asn: 65000}}\n");
        }
        y
    };
    // One cluster: both reflectors serve both clients.
    let r1 = Ours::start(&ns[0], &rr(rr1, rr2, "198.51.100.7", &[ca, cb]))?;
    let r2 = Ours::start(&ns[1], &rr(rr2, rr1, "198.51.100.7", &[ca, cb]))?;
    let a = Ours::start(&ns[2], &client(ca, "10.53.0.0/24", &[rr1, rr2]))?;
    let b = Ours::start(&ns[3], &client(cb, "10.54.0.0/24", &[rr1, rr2]))?;
    let diag = || format!("{}\n{}\n{}\n{}", r1.log(), r2.log(), a.log(), b.log());
    wait_for(
        "client B to hold A's route from both reflectors",
        SESSION_UP,
        || Ok(b.paths("10.53.0.0/24")?.len() == 2 && a.paths("10.54.0.0/24")?.len() == 2),
    )
    .map_err(|e| anyhow!("{e:#}\n{}", diag()))?;
    // The reflectors hold the client's route only from the client itself:
    // each other's reflected copy carries their own cluster ID and is dropped.
    for r in [&r1, &r2] {
        let p = r.paths("10.53.0.0/24")?;
        if p.len() != 1 || p[0]["peer"] != ca {
            bail!("a reflector accepted a copy from its own cluster: {p:?}");
        }
    }
    check(
        "reflectors in one cluster: clients get a path from each, the cluster check drops re-reflections",
        t0,
    );

    // Two clusters: rr1 serves A only, rr2 serves B only.
    r1.reload(&rr(rr1, rr2, "198.51.100.1", &[ca]))?;
    r2.reload(&rr(rr2, rr1, "198.51.100.2", &[cb]))?;
    a.reload(&client(ca, "10.53.0.0/24", &[rr1]))?;
    b.reload(&client(cb, "10.54.0.0/24", &[rr2]))?;
    wait_for(
        "B to reach A's route through both clusters",
        SESSION_UP,
        || {
            let p = b.paths("10.53.0.0/24")?;
            Ok(p.len() == 1 && p[0]["peer"] == rr2 && a.paths("10.54.0.0/24")?.len() == 1)
        },
    )
    .map_err(|e| anyhow!("{e:#}\n{}", diag()))?;
    check(
        "reflectors in two clusters: a client's route crosses both to the other client",
        t0,
    );
    Ok(())
}

/// Two speakers sending each other full tables at once never deadlock: two
/// `starling-bgpd` (iBGP between them) are each fed a large table by a
/// hand-made eBGP peer at the same moment, one attribute set per prefix so
/// nothing packs; each re-advertises its table to the other while receiving
/// the other's, both directions far beyond the socket buffers. Both must end
/// up with both tables, the session between them never leaving Established.
#[test]
fn two_speakers_sending_each_other_full_tables_never_deadlock() -> Result<()> {
    use starling_tests::raw_peer::RawPeer;
    use starling_tests::raw_peer::update::{OPT, attr, mandatory, message, nlri};
    use std::net::Ipv4Addr;
    const TABLE: u32 = 300_000;
    let t0 = Instant::now();
    let mut lan = Lan::new()?;
    let names = ["dla", "dlb", "dlfa", "dlfb"];
    let ns: Vec<Netns> = names.iter().map(|n| Netns::new(n)).collect::<Result<_>>()?;
    for (i, n) in ns.iter().enumerate() {
        lan.attach(n, &format!("192.0.2.{}/24", 61 + i))?;
    }
    let speaker = |me: &str, other: &str, feeder: &str, feeder_as: u32| {
        format!(
            "router_id: {me}\nasn: 65000\npeers:\n- {{address: {other}, asn: 65000}}\n\
             - {{address: {feeder}, asn: {feeder_as}, passive: true, import: [{{action: accept}}], export: [{{action: reject}}]}}\n"
        )
    };
    let a = Ours::start(
        &ns[0],
        &speaker("192.0.2.61", "192.0.2.62", "192.0.2.63", 65101),
    )?;
    let b = Ours::start(
        &ns[1],
        &speaker("192.0.2.62", "192.0.2.61", "192.0.2.64", 65102),
    )?;
    let diag = || format!("{}\n{}", a.log(), b.log());
    let feeder = |n: usize, asn: u32| {
        RawPeer::establish(
            &ns[n],
            ip(&format!("192.0.2.{}", 59 + n)),
            asn,
            Ipv4Addr::new(192, 0, 2, 61 + n as u8),
            starling_tests::peers::HOLD_TIME,
            SESSION_UP,
        )
        .map_err(|e| anyhow!("hand-made peer {asn}: {e:#}\n{}", diag()))
    };
    let (fa, fb) = (feeder(2, 65101)?, feeder(3, 65102)?);
    wait_for(
        "A and B to be Established with each other",
        SESSION_UP,
        || Ok(a.established("192.0.2.62")? && b.established("192.0.2.61")?),
    )
    .map_err(|e| anyhow!("{e:#}\n{}", diag()))?;
    let since = |o: &Ours, peer: &str| -> Result<u64> {
        o.session(peer)?["since"]
            .as_u64()
            .ok_or_else(|| anyhow!("no since for {peer}"))
    };
    let (a_since, b_since) = (since(&a, "192.0.2.62")?, since(&b, "192.0.2.61")?);
    check("A-B and both feeders Established", t0);

    // Each feeder sends its table as fast as the speaker takes it, both at
    // once: while A sends its table to B, B sends its own to A.
    let feed = |peer: &RawPeer, asn: u32, nh: [u8; 4], base: u32| -> Result<()> {
        let mut batch = Vec::new();
        for i in 0..TABLE {
            let mut at = mandatory(asn, nh);
            at.push(attr(OPT, 4, &i.to_be_bytes()));
            let p = ipnet::Ipv4Net::new(Ipv4Addr::from(base + i), 32)?;
            batch.extend(message(&[], &at, &nlri(p)));
            if batch.len() > 1 << 20 {
                peer.send(&batch)?;
                batch.clear();
            }
        }
        peer.send(&batch)
    };
    std::thread::scope(|s| -> Result<()> {
        let ta = s.spawn(|| feed(&fa, 65101, [192, 0, 2, 63], 0x6440_0000));
        let tb = s.spawn(|| feed(&fb, 65102, [192, 0, 2, 64], 0x6480_0000));
        ta.join().map_err(|_| anyhow!("feeder A panicked"))??;
        tb.join().map_err(|_| anyhow!("feeder B panicked"))??;
        Ok(())
    })?;
    check("both tables fed", t0);

    let full = 2 * TABLE as u64;
    wait_for(
        "each speaker to hold both tables",
        Duration::from_secs(300),
        || {
            for (o, peer, started) in [(&a, "192.0.2.62", a_since), (&b, "192.0.2.61", b_since)] {
                // A reset between them would show as a later `since`.
                if !o.established(peer)? || since(o, peer)? != started {
                    bail!("the session with {peer} left Established");
                }
            }
            Ok(a.summary()?["paths"] == full && b.summary()?["paths"] == full)
        },
    )
    .map_err(|e| {
        let s = |o: &Ours| o.summary().map(|v| v.to_string()).unwrap_or_default();
        anyhow!("{e:#}\nA {}\nB {}\n{}", s(&a), s(&b), diag())
    })?;
    for (o, peer) in [(&a, "192.0.2.62"), (&b, "192.0.2.61")] {
        let got = o.session(peer)?["prefixes_received"].as_u64();
        if got != Some(TABLE as u64) {
            bail!("{peer} sent {got:?} prefixes, not {TABLE}");
        }
    }
    for (f, who) in [(&fa, "A's feeder"), (&fb, "B's feeder")] {
        if !f.notifications().is_empty() || f.closed() {
            bail!("{who}'s session was closed: {:?}", f.notifications());
        }
    }
    check(
        &format!("{TABLE} paths each way at once: both tables everywhere, no session reset"),
        t0,
    );
    Ok(())
}
