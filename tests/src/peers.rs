//! Real reference BGP speakers (BIRD 2, FRR, GoBGP, ExaBGP) and our own
//! `starling-bgpd`, started inside a test's network namespace from one Rust
//! description, and questioned through each daemon's own view of the world:
//! `birdc`, `vtysh ... json`, `gobgp -j`, and for ExaBGP the JSON that its API
//! process writes to a file.
//!
//! Every daemon runs in its own process group, so a handle that is dropped
//! (or a peer that is restarted) kills the daemon together with the helper
//! processes it forked; nothing outlives the test.

use crate::{Daemon, Netns, TempDir, run, wait_for};
use anyhow::{Context, Result, anyhow, bail};
use ipnet::IpNet;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Short timers so sessions come up and fail over in seconds, not minutes.
pub const HOLD_TIME: u16 = 9;
pub const KEEPALIVE: u16 = 3;
pub const CONNECT_RETRY: u16 = 1;

/// How long a freshly started daemon may take to answer on its control channel.
const CONTROL_READY: Duration = Duration::from_secs(30);

/// Which reference implementation a [`Peer`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    Bird,
    Frr,
    Gobgp,
    Exabgp,
}

impl PeerKind {
    pub const ALL: [PeerKind; 4] = [
        PeerKind::Bird,
        PeerKind::Frr,
        PeerKind::Gobgp,
        PeerKind::Exabgp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Bird => "bird",
            PeerKind::Frr => "frr",
            PeerKind::Gobgp => "gobgp",
            PeerKind::Exabgp => "exabgp",
        }
    }

    /// Fail with the missing tool and its Debian package if this kind cannot run here.
    pub fn require_tools(self) {
        match self {
            PeerKind::Bird => {
                crate::require_tool("bird", "bird2");
                crate::require_tool("birdc", "bird2");
            }
            PeerKind::Frr => {
                crate::require_tool("/usr/lib/frr/zebra", "frr");
                crate::require_tool("/usr/lib/frr/bgpd", "frr");
                crate::require_tool("vtysh", "frr");
            }
            PeerKind::Gobgp => {
                crate::require_tool("gobgpd", "gobgpd");
                crate::require_tool("gobgp", "gobgpd");
            }
            PeerKind::Exabgp => crate::require_tool("exabgp", "exabgp"),
        }
    }
}

/// One BGP neighbor of a reference daemon.
#[derive(Clone, Debug)]
pub struct Neighbor {
    pub address: IpAddr,
    pub remote_as: u32,
    pub md5_password: Option<String>,
    /// Only accept connections, never initiate them.
    pub passive: bool,
}

impl Neighbor {
    pub fn new(address: IpAddr, remote_as: u32) -> Neighbor {
        Neighbor {
            address,
            remote_as,
            md5_password: None,
            passive: false,
        }
    }

    pub fn md5(mut self, password: &str) -> Neighbor {
        self.md5_password = Some(password.to_string());
        self
    }

    pub fn passive(mut self) -> Neighbor {
        self.passive = true;
        self
    }
}

/// What a reference daemon should look like. A neighbor's session carries
/// the unicast family of its address (IPv4 sessions ipv4, IPv6 sessions ipv6).
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub router_id: Ipv4Addr,
    pub local_as: u32,
    /// At most one of each family; used as the session source address.
    pub local_addresses: Vec<IpAddr>,
    pub neighbors: Vec<Neighbor>,
    /// Originated from the start.
    pub prefixes: Vec<IpNet>,
}

impl PeerSpec {
    fn local_for(&self, neighbor: IpAddr) -> Option<IpAddr> {
        self.local_addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == neighbor.is_ipv4())
    }
}

/// A process group started by the harness: killed (group-wide) on drop.
struct Proc {
    name: String,
    child: Child,
    /// FRR daemons leave `/var/tmp/frr/<daemon>.<pid>/` behind; remove it.
    frr_daemon: Option<&'static str>,
}

impl Proc {
    /// Start `prog args` inside namespace `ns` as the leader of a new
    /// process group, stdout and stderr appended to `log`.
    fn spawn(
        ns: &str,
        name: &str,
        prog: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<Proc> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new("ip");
        // `ip netns exec` execs the program in place, so the child's pid is the daemon's.
        cmd.args(["netns", "exec", ns, prog])
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({prog})"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            frr_daemon: None,
        })
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall; the group was created by us (process_group(0)).
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = self.frr_daemon {
            let _ = std::fs::remove_dir_all(format!("/var/tmp/frr/{d}.{pid}"));
        }
    }
}

/// A running reference BGP daemon inside a namespace.
pub struct Peer {
    pub kind: PeerKind,
    pub spec: PeerSpec,
    ns: String,
    dir: TempDir,
    /// Prefixes currently originated (start set plus runtime changes); a
    /// restart re-creates the daemon with exactly these.
    originated: BTreeSet<IpNet>,
    procs: Vec<Proc>,
}

impl Peer {
    /// Write the configuration and start the daemon; returns once its control
    /// channel answers (sessions come up later; wait for them).
    pub fn start(kind: PeerKind, ns: &Netns, spec: PeerSpec) -> Result<Peer> {
        kind.require_tools();
        let dir = TempDir::new(&format!("peer-{}", kind.name()))?;
        let originated = spec.prefixes.iter().copied().collect();
        let mut peer = Peer {
            kind,
            spec,
            ns: ns.name.clone(),
            dir,
            originated,
            procs: Vec::new(),
        };
        peer.launch()?;
        Ok(peer)
    }

    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// Prefixes this peer currently originates.
    pub fn originated(&self) -> &BTreeSet<IpNet> {
        &self.originated
    }

    fn launch(&mut self) -> Result<()> {
        match self.kind {
            PeerKind::Bird => self.launch_bird(),
            PeerKind::Frr => self.launch_frr(),
            PeerKind::Gobgp => self.launch_gobgp(),
            PeerKind::Exabgp => self.launch_exabgp(),
        }
        .with_context(|| format!("starting {} in {}", self.kind.name(), self.ns))
    }

    /// Kill the daemon (SIGKILL to its whole process group, like a crash or
    /// power loss: the kernel closes its sockets, nobody sends a NOTIFICATION).
    pub fn stop(&mut self) {
        // Reverse order: FRR's bgpd before zebra.
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }

    /// Start again after [`Peer::stop`], with the same configuration and the
    /// prefixes originated at the time of the stop.
    pub fn resume(&mut self) -> Result<()> {
        if !self.procs.is_empty() {
            bail!("{} is still running; stop it first", self.kind.name());
        }
        self.launch()
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.resume()
    }

    /// Send `signal` to each of the daemon's process groups: SIGSTOP
    /// freezes it (its kernel sockets stay open, nothing reads them),
    /// SIGCONT thaws it.
    pub fn signal(&self, signal: i32) -> Result<()> {
        for p in &self.procs {
            // SAFETY: kill(2) on a process group we started and still own.
            if unsafe { libc::kill(-(p.child.id() as i32), signal) } != 0 {
                bail!(
                    "kill -{signal} {}: {}",
                    p.name,
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        !self.procs.is_empty()
    }

    /// Fail if any of the daemon's processes has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            p.check_alive()?;
        }
        Ok(())
    }

    /// Whether the daemon itself reports the session with `neighbor` as Established.
    pub fn session_established(&self, neighbor: IpAddr) -> Result<bool> {
        match self.kind {
            PeerKind::Bird => {
                let name = self.bird_protocol(neighbor)?;
                let out = self.birdc(&["show", "protocols", &name])?;
                Ok(out.lines().any(|l| {
                    l.split_whitespace().next() == Some(name.as_str()) && l.contains("Established")
                }))
            }
            PeerKind::Frr => {
                let v = self.vtysh_json(&format!("show bgp neighbors {neighbor} json"))?;
                Ok(v.as_object()
                    .into_iter()
                    .flat_map(|m| m.iter())
                    .any(|(k, n)| {
                        k.parse::<IpAddr>().ok() == Some(neighbor) && n["bgpState"] == "Established"
                    }))
            }
            PeerKind::Gobgp => {
                let v: Value = serde_json::from_str(&self.gobgp(&["-j", "neighbor"])?)
                    .context("`gobgp -j neighbor` is not JSON")?;
                Ok(v.as_array().into_iter().flatten().any(|n| {
                    n["conf"]["neighbor_address"]
                        .as_str()
                        .and_then(|a| a.parse().ok())
                        == Some(neighbor)
                        && (n["state"]["session_state"] == 6
                            || n["state"]["session_state"] == "established")
                }))
            }
            PeerKind::Exabgp => Ok(self.exabgp_view()?.up.contains(&neighbor)),
        }
    }

    /// Every prefix the daemon holds as learned from a BGP neighbor (not its
    /// own), in canonical `ipnet` form. BIRD: not `unreachable`; FRR: `valid`.
    pub fn received_prefixes(&self) -> Result<BTreeSet<String>> {
        let mut set = BTreeSet::new();
        match self.kind {
            PeerKind::Bird => {
                let out = self.birdc(&["show", "route", "where", "source", "=", "RTS_BGP"])?;
                for line in out.lines() {
                    let mut words = line.split_whitespace();
                    let (Some(first), Some(second)) = (words.next(), words.next()) else {
                        continue;
                    };
                    if let Ok(p) = first.parse::<IpNet>()
                        && second != "unreachable"
                    {
                        set.insert(p.to_string());
                    }
                }
            }
            PeerKind::Frr => {
                for afi in ["ipv4", "ipv6"] {
                    let v = self.vtysh_json(&format!("show bgp {afi} unicast json"))?;
                    for (prefix, paths) in v["routes"].as_object().into_iter().flatten() {
                        let learned = paths.as_array().into_iter().flatten().any(|p| {
                            p["valid"] == true
                                && p["peerId"]
                                    .as_str()
                                    .is_some_and(|id| id.parse::<IpAddr>().is_ok())
                        });
                        if learned {
                            set.insert(canonical(prefix)?);
                        }
                    }
                }
            }
            PeerKind::Gobgp => {
                for afi in ["ipv4", "ipv6"] {
                    let out = self.gobgp(&["-j", "global", "rib", "-a", afi])?;
                    let v: Value = serde_json::from_str(&out).with_context(|| {
                        format!("`gobgp -j global rib -a {afi}` is not JSON: {out}")
                    })?;
                    for (prefix, paths) in v.as_object().into_iter().flatten() {
                        let learned = paths.as_array().into_iter().flatten().any(|p| {
                            p["neighbor-ip"]
                                .as_str()
                                .is_some_and(|a| a.parse::<IpAddr>().is_ok())
                        });
                        if learned {
                            set.insert(canonical(prefix)?);
                        }
                    }
                }
            }
            PeerKind::Exabgp => {
                for prefixes in self.exabgp_view()?.rib.values() {
                    set.extend(prefixes.iter().map(|p| p.to_string()));
                }
            }
        }
        Ok(set)
    }

    /// Originate `prefix` at runtime, through the daemon's own control channel.
    pub fn announce(&mut self, prefix: IpNet) -> Result<()> {
        self.originated.insert(prefix);
        self.change(prefix, true)
    }

    /// Stop originating `prefix` at runtime.
    pub fn withdraw(&mut self, prefix: IpNet) -> Result<()> {
        self.originated.remove(&prefix);
        self.change(prefix, false)
    }

    fn change(&mut self, prefix: IpNet, announce: bool) -> Result<()> {
        let afi = afi(&prefix);
        match self.kind {
            PeerKind::Bird => {
                // BIRD has no runtime route injection; rewrite the static
                // protocols and reconfigure (sessions are kept: their config is unchanged).
                std::fs::write(self.dir.join("bird.conf"), self.bird_conf())?;
                let out = self.birdc(&["configure"])?;
                if !out.contains("Reconfigured") {
                    bail!("birdc configure: {out}");
                }
            }
            PeerKind::Frr => {
                let no = if announce { "" } else { "no " };
                let out = run(
                    "vtysh",
                    &[
                        "--vty_socket",
                        path(&self.dir.path),
                        "-c",
                        "configure terminal",
                        "-c",
                        &format!("router bgp {}", self.spec.local_as),
                        "-c",
                        &format!("address-family {afi} unicast"),
                        "-c",
                        &format!("{no}network {prefix}"),
                    ],
                )?;
                if !out.trim().is_empty() {
                    bail!("vtysh {no}network {prefix}: {out}");
                }
            }
            PeerKind::Gobgp => {
                let verb = if announce { "add" } else { "del" };
                self.gobgp(&["global", "rib", verb, "-a", afi, &prefix.to_string()])?;
            }
            PeerKind::Exabgp => {
                let verb = if announce { "announce" } else { "withdraw" };
                let mut cmds = String::new();
                for n in self
                    .spec
                    .neighbors
                    .iter()
                    .filter(|n| n.address.is_ipv4() == is_v4(&prefix))
                {
                    writeln!(
                        cmds,
                        "neighbor {} {verb} route {prefix} next-hop self",
                        n.address
                    )?;
                }
                let mut f = File::options()
                    .append(true)
                    .open(self.dir.join("commands"))?;
                std::io::Write::write_all(&mut f, cmds.as_bytes())?;
            }
        }
        Ok(())
    }

    /// The daemon's own state, for failure messages.
    pub fn diagnostics(&self) -> String {
        let show = |r: Result<String>| r.unwrap_or_else(|e| format!("({e:#})"));
        let mut s = format!(
            "--- {} in {} ({}):\n",
            self.kind.name(),
            self.ns,
            self.dir.path.display()
        );
        match self.kind {
            PeerKind::Bird => {
                s += &show(self.birdc(&["show", "protocols", "all"]));
                s += &show(self.birdc(&["show", "route", "all"]));
            }
            PeerKind::Frr => {
                for c in [
                    "show bgp summary",
                    "show bgp ipv4 unicast",
                    "show bgp ipv6 unicast",
                ] {
                    s += &show(self.vtysh(c));
                }
            }
            PeerKind::Gobgp => {
                s += &show(self.gobgp(&["neighbor"]));
                s += &show(self.gobgp(&["global", "rib", "-a", "ipv4"]));
                s += &show(self.gobgp(&["global", "rib", "-a", "ipv6"]));
            }
            PeerKind::Exabgp => {
                s += &tail(&self.dir.join("received.jsonl"), 20);
            }
        }
        for log in [
            "bird.log",
            "bgpd.log",
            "zebra.log",
            "gobgpd.log",
            "exabgp.log",
            "exabgp.out",
        ] {
            let p = self.dir.join(log);
            if p.exists() {
                let _ = writeln!(s, "--- {log} (tail):\n{}", tail(&p, 25));
            }
        }
        s
    }

    fn ns_run(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.ns, cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    fn spawn(
        &self,
        name: &str,
        prog: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &str,
    ) -> Result<Proc> {
        Proc::spawn(&self.ns, name, prog, args, envs, &self.dir.join(log))
    }

    /// Wait until `probe` answers, failing early with the log if the daemon died.
    fn wait_ready(&mut self, what: &str, mut probe: impl FnMut(&Peer) -> bool) -> Result<()> {
        let r = wait_for(what, CONTROL_READY, || {
            self.check_alive()?;
            Ok(probe(self))
        });
        r.map(|_| ())
            .map_err(|e| anyhow!("{e:#}\n{}", self.diagnostics()))
    }

    // ---------------------------------------------------------------- BIRD

    fn bird_protocol(&self, neighbor: IpAddr) -> Result<String> {
        self.spec
            .neighbors
            .iter()
            .position(|n| n.address == neighbor)
            .map(|i| format!("n{i}"))
            .ok_or_else(|| anyhow!("{neighbor} is not a neighbor of this BIRD"))
    }

    fn birdc(&self, args: &[&str]) -> Result<String> {
        let sock = self.dir.join("bird.ctl");
        let mut a = vec!["-s", sock.to_str().unwrap_or_default()];
        a.extend_from_slice(args);
        run("birdc", &a)
    }

    fn bird_conf(&self) -> String {
        let s = &self.spec;
        let dir = self.dir.path.display();
        let mut c = format!(
            "log \"{dir}/bird.log\" all;\nrouter id {};\nprotocol device {{ scan time 10; }}\n\
             # connected subnets, so that iBGP next hops resolve\n\
             protocol direct {{ ipv4; ipv6; interface \"*\"; }}\n",
            s.router_id
        );
        for (name, v4) in [("s4", true), ("s6", false)] {
            let _ = write!(
                c,
                "protocol static {name} {{ {}; ",
                if v4 { "ipv4" } else { "ipv6" }
            );
            for p in self.originated.iter().filter(|p| is_v4(p) == v4) {
                let _ = write!(c, "route {p} blackhole; ");
            }
            c += "}\n";
        }
        for (i, n) in s.neighbors.iter().enumerate() {
            let local = s
                .local_for(n.address)
                .map(|a| a.to_string())
                .unwrap_or_default();
            let _ = writeln!(c, "protocol bgp n{i} {{");
            let _ = writeln!(
                c,
                "  local {local} as {};\n  neighbor {} as {};",
                s.local_as, n.address, n.remote_as
            );
            if let Some(pw) = &n.md5_password {
                let _ = writeln!(c, "  password \"{pw}\";");
            }
            if n.passive {
                c += "  passive on;\n";
            }
            // connect delay 0: BIRD otherwise waits 5 s before its first connect.
            let _ = writeln!(
                c,
                "  hold time {HOLD_TIME}; keepalive time {KEEPALIVE}; connect retry time {CONNECT_RETRY};\n  \
                 error wait time 1, 4; connect delay time 0;\n  \
                 {} {{ import all; export where source = RTS_STATIC; next hop self; }};\n}}",
                if n.address.is_ipv4() { "ipv4" } else { "ipv6" }
            );
        }
        c
    }

    fn launch_bird(&mut self) -> Result<()> {
        std::fs::write(self.dir.join("bird.conf"), self.bird_conf())?;
        let conf = self.dir.join("bird.conf");
        let ctl = self.dir.join("bird.ctl");
        let pid = self.dir.join("bird.pid");
        let p = self.spawn(
            "bird",
            "bird",
            &["-f", "-c", path(&conf), "-s", path(&ctl), "-P", path(&pid)],
            &[],
            "bird.out",
        )?;
        self.procs.push(p);
        self.wait_ready("birdc to answer", |p| p.birdc(&["show", "status"]).is_ok())
    }

    // ---------------------------------------------------------------- FRR

    fn vtysh(&self, command: &str) -> Result<String> {
        run(
            "vtysh",
            &["--vty_socket", path(&self.dir.path), "-c", command],
        )
    }

    fn vtysh_json(&self, command: &str) -> Result<Value> {
        let out = self.vtysh(command)?;
        serde_json::from_str(&out)
            .with_context(|| format!("`vtysh -c '{command}'` is not JSON: {out}"))
    }

    fn frr_conf(&self) -> String {
        let s = &self.spec;
        let dir = self.dir.path.display();
        let mut c = format!(
            "frr defaults traditional\nhostname {ns}\nlog file {dir}/bgpd.log\n!\nrouter bgp {asn}\n \
             bgp router-id {rid}\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
             no bgp default ipv4-unicast\n",
            ns = self.ns,
            asn = s.local_as,
            rid = s.router_id
        );
        for n in &s.neighbors {
            let a = n.address;
            let _ = writeln!(c, " neighbor {a} remote-as {}", n.remote_as);
            let _ = writeln!(c, " neighbor {a} timers {KEEPALIVE} {HOLD_TIME}");
            let _ = writeln!(c, " neighbor {a} timers connect {CONNECT_RETRY}");
            if let Some(local) = s.local_for(a) {
                let _ = writeln!(c, " neighbor {a} update-source {local}");
            }
            if let Some(pw) = &n.md5_password {
                let _ = writeln!(c, " neighbor {a} password {pw}");
            }
            if n.passive {
                let _ = writeln!(c, " neighbor {a} passive");
            }
        }
        for (afi, v4) in [("ipv4", true), ("ipv6", false)] {
            let _ = writeln!(c, " address-family {afi} unicast");
            for p in self.originated.iter().filter(|p| is_v4(p) == v4) {
                let _ = writeln!(c, "  network {p}");
            }
            for n in s.neighbors.iter().filter(|n| n.address.is_ipv4() == v4) {
                let _ = writeln!(c, "  neighbor {} activate", n.address);
            }
            c += " exit-address-family\n";
        }
        c
    }

    fn launch_frr(&mut self) -> Result<()> {
        let d = self.dir.path.clone();
        std::fs::write(
            d.join("zebra.conf"),
            format!("hostname {}\nlog file {}/zebra.log\n", self.ns, d.display()),
        )?;
        std::fs::write(d.join("bgpd.conf"), self.frr_conf())?;
        let zserv = d.join("zserv.api");
        let _ = std::fs::remove_file(&zserv);
        for daemon in ["zebra", "bgpd"] {
            let conf = d.join(format!("{daemon}.conf"));
            let pid = d.join(format!("{daemon}.pid"));
            // `-u root -g frrvty`: stay root (`-g root` is refused: root is not in
            // the vty group); `-P 0`: no TCP vty; every path under our dir.
            let mut p = self.spawn(
                daemon,
                &format!("/usr/lib/frr/{daemon}"),
                &[
                    "-u",
                    "root",
                    "-g",
                    "frrvty",
                    "-P",
                    "0",
                    "-f",
                    path(&conf),
                    "-i",
                    path(&pid),
                    "-z",
                    path(&zserv),
                    "--vty_socket",
                    path(&d),
                ],
                &[],
                &format!("{daemon}.out"),
            )?;
            p.frr_daemon = Some(daemon);
            self.procs.push(p);
            if daemon == "zebra" {
                // bgpd would connect later anyway; waiting keeps start-up deterministic.
                let z = zserv.clone();
                self.wait_ready("zebra's zserv socket", move |_| z.exists())?;
            }
        }
        self.wait_ready("bgpd to answer vtysh", |p| {
            p.vtysh("show bgp summary json")
                .map(|o| o.trim_start().starts_with('{'))
                .unwrap_or(false)
        })
    }

    // ---------------------------------------------------------------- GoBGP

    fn gobgp(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-u", "127.0.0.1", "-p", "50051"];
        a.extend_from_slice(args);
        self.ns_run("gobgp", &a)
    }

    fn gobgp_conf(&self) -> String {
        let s = &self.spec;
        let mut c = format!(
            "[global.config]\n  as = {}\n  router-id = \"{}\"\n",
            s.local_as, s.router_id
        );
        for n in &s.neighbors {
            let _ = write!(
                c,
                "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {}\n",
                n.address, n.remote_as
            );
            if let Some(pw) = &n.md5_password {
                let _ = writeln!(c, "    auth-password = \"{pw}\"");
            }
            // idle-hold-time-after-reset defaults to 30 s: a reset session would
            // stay down for half a minute.
            let _ = write!(
                c,
                "  [neighbors.timers.config]\n    connect-retry = {CONNECT_RETRY}\n    hold-time = {HOLD_TIME}\n    \
                 keepalive-interval = {KEEPALIVE}\n    idle-hold-time-after-reset = 1\n  \
                 [neighbors.transport.config]\n    passive-mode = {}\n",
                n.passive
            );
            if let Some(local) = s.local_for(n.address) {
                let _ = writeln!(c, "    local-address = \"{local}\"");
            }
            let _ = write!(
                c,
                "  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"{}-unicast\"\n",
                if n.address.is_ipv4() { "ipv4" } else { "ipv6" }
            );
        }
        c
    }

    fn launch_gobgp(&mut self) -> Result<()> {
        let conf = self.dir.join("gobgpd.toml");
        std::fs::write(&conf, self.gobgp_conf())?;
        let p = self.spawn(
            "gobgpd",
            "gobgpd",
            &[
                "-f",
                path(&conf),
                "-t",
                "toml",
                "--api-hosts",
                "127.0.0.1:50051",
                "--log-plain",
            ],
            &[],
            "gobgpd.log",
        )?;
        self.procs.push(p);
        self.wait_ready("gobgpd's API to answer", |p| p.gobgp(&["global"]).is_ok())?;
        // gobgpd has no static routes in its config; originate through the API.
        for p in self.originated.clone() {
            self.gobgp(&["global", "rib", "add", "-a", afi(&p), &p.to_string()])?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- ExaBGP

    fn exabgp_conf(&self) -> String {
        let s = &self.spec;
        let dir = self.dir.path.display();
        let mut c = format!("process api {{\n  run {dir}/api.sh;\n  encoder json;\n}}\n");
        for n in &s.neighbors {
            let v4 = n.address.is_ipv4();
            let _ = writeln!(c, "neighbor {} {{", n.address);
            let _ = writeln!(
                c,
                "  router-id {};\n  local-as {};\n  peer-as {};",
                s.router_id, s.local_as, n.remote_as
            );
            if let Some(local) = s.local_for(n.address) {
                // Listening too: ExaBGP alone only ever connects, with an
                // exponential back-off between attempts.
                let _ = writeln!(c, "  local-address {local};\n  listen 179;");
            }
            let _ = writeln!(c, "  hold-time {HOLD_TIME};");
            if let Some(pw) = &n.md5_password {
                let _ = writeln!(c, "  md5-password \"{pw}\";");
            }
            if n.passive {
                c += "  passive true;\n";
            }
            let _ = writeln!(
                c,
                "  family {{ {} unicast; }}",
                if v4 { "ipv4" } else { "ipv6" }
            );
            c += "  api { processes [ api ]; neighbor-changes; receive { parsed; update; } }\n  static {\n";
            for p in self.originated.iter().filter(|p| is_v4(p) == v4) {
                let _ = writeln!(c, "    route {p} next-hop self;");
            }
            c += "  }\n}\n";
        }
        c
    }

    fn launch_exabgp(&mut self) -> Result<()> {
        let d = self.dir.path.clone();
        // A fresh process has a fresh view: start both files empty.
        std::fs::write(d.join("received.jsonl"), "")?;
        std::fs::write(d.join("commands"), "")?;
        let _ = std::fs::remove_file(d.join("api.started"));
        // One API process both ways: `tail` feeds ExaBGP our commands on stdout,
        // `cat` stores what ExaBGP writes to stdin. ExaBGP treats a closed stdout
        // as a dead helper, so the writer (tail) must keep it open.
        let script = format!(
            "#!/bin/sh\ntouch {d}/api.started\ntail -n +1 -F {d}/commands 2>/dev/null &\nexec cat >> {d}/received.jsonl\n",
            d = d.display()
        );
        let api = d.join("api.sh");
        std::fs::write(&api, script)?;
        run("chmod", &["+x", path(&api)])?;
        let conf = d.join("exabgp.conf");
        std::fs::write(&conf, self.exabgp_conf())?;
        let log = d.join("exabgp.log");
        let p = self.spawn(
            "exabgp",
            "exabgp",
            &[path(&conf)],
            &[
                ("exabgp_daemon_user", "root"),
                ("exabgp_daemon_daemonize", "false"),
                ("exabgp_log_destination", path(&log)),
                ("exabgp_api_cli", "false"),
                // No "done"/"error" acknowledgements mixed into the received JSON.
                ("exabgp_api_ack", "false"),
            ],
            "exabgp.out",
        )?;
        self.procs.push(p);
        let started = d.join("api.started");
        self.wait_ready("ExaBGP's API process", move |_| started.exists())
    }

    /// Replay the API process's JSON: which sessions are up, and each
    /// neighbor's Adj-RIB-In (emptied whenever its session leaves `up`).
    fn exabgp_view(&self) -> Result<ExabgpView> {
        let file = self.dir.join("received.jsonl");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let mut view = ExabgpView::default();
        for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}: bad JSON line {line}", file.display()))?;
            let Some(peer) = v["neighbor"]["address"]["peer"]
                .as_str()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            match v["type"].as_str() {
                Some("state") => {
                    view.rib.remove(&peer);
                    if v["neighbor"]["state"] == "up" {
                        view.up.insert(peer);
                    } else {
                        view.up.remove(&peer);
                    }
                }
                Some("update") => {
                    let update = &v["neighbor"]["message"]["update"];
                    let rib = view.rib.entry(peer).or_default();
                    for (_family, by_next_hop) in
                        update["announce"].as_object().into_iter().flatten()
                    {
                        for (_nh, nlris) in by_next_hop.as_object().into_iter().flatten() {
                            for n in nlris.as_array().into_iter().flatten() {
                                rib.insert(exabgp_nlri(n)?);
                            }
                        }
                    }
                    for (_family, nlris) in update["withdraw"].as_object().into_iter().flatten() {
                        for n in nlris.as_array().into_iter().flatten() {
                            rib.remove(&exabgp_nlri(n)?);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(view)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Default)]
struct ExabgpView {
    up: BTreeSet<IpAddr>,
    rib: BTreeMap<IpAddr, BTreeSet<IpNet>>,
}

fn exabgp_nlri(n: &Value) -> Result<IpNet> {
    let s = n["nlri"]
        .as_str()
        .or(n.as_str())
        .ok_or_else(|| anyhow!("ExaBGP NLRI without a prefix: {n}"))?;
    s.parse()
        .with_context(|| format!("ExaBGP NLRI {s:?} is not a prefix"))
}

fn canonical(prefix: &str) -> Result<String> {
    prefix
        .parse::<IpNet>()
        .map(|p| p.to_string())
        .with_context(|| format!("{prefix:?} is not a prefix"))
}

fn is_v4(p: &IpNet) -> bool {
    matches!(p, IpNet::V4(_))
}

fn afi(p: &IpNet) -> &'static str {
    if is_v4(p) { "ipv4" } else { "ipv6" }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// The last `lines` lines of a file (or why it could not be read).
pub fn tail(p: &Path, lines: usize) -> String {
    match std::fs::read_to_string(p) {
        Ok(t) => {
            let all: Vec<&str> = t.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", p.display()),
    }
}

// ==================================================================== ours

/// One peer in `starling-bgpd`'s configuration.
#[derive(Clone, Debug)]
pub struct StarlingPeer {
    pub address: IpAddr,
    pub asn: u32,
    pub md5_password: Option<String>,
    pub passive: bool,
}

impl StarlingPeer {
    pub fn new(address: IpAddr, asn: u32) -> StarlingPeer {
        StarlingPeer {
            address,
            asn,
            md5_password: None,
            passive: false,
        }
    }

    pub fn md5(mut self, password: &str) -> StarlingPeer {
        self.md5_password = Some(password.to_string());
        self
    }
}

/// `starling-bgpd`'s configuration, written as the YAML of docs/bgp.md.
#[derive(Clone, Debug)]
pub struct StarlingSpec {
    pub router_id: Ipv4Addr,
    pub asn: u32,
    pub prefixes: Vec<IpNet>,
    pub peers: Vec<StarlingPeer>,
}

impl StarlingSpec {
    pub fn yaml(&self, control_socket: &Path) -> String {
        let mut y = format!(
            "router_id: {}\nasn: {}\ncontrol_socket: \"{}\"\nhold_time: {HOLD_TIME}\nconnect_retry: {CONNECT_RETRY}\n",
            self.router_id,
            self.asn,
            control_socket.display()
        );
        let list = |ps: &[IpNet]| {
            ps.iter()
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(y, "prefixes: [{}]\npeers:", list(&self.prefixes));
        for p in &self.peers {
            let _ = writeln!(y, "  - address: \"{}\"\n    asn: {}", p.address, p.asn);
            if let Some(pw) = &p.md5_password {
                let _ = writeln!(y, "    md5_password: \"{pw}\"");
            }
            if p.passive {
                y += "    passive: true\n";
            }
            if p.asn != self.asn {
                // RFC 8212: an eBGP peer without policy exchanges nothing.
                y += "    import: [{action: accept}]\n    export: [{action: accept}]\n";
            }
        }
        y
    }
}

/// Our daemon, `starling-bgpd`, running in a namespace; killed on drop.
pub struct Starling {
    pub daemon: Daemon,
    bin: PathBuf,
    dir: TempDir,
    socket: PathBuf,
}

impl Starling {
    /// Start `bin --config FILE` inside `ns`; returns once the control socket answers.
    pub fn start(ns: &Netns, bin: &Path, spec: &StarlingSpec) -> Result<Starling> {
        let dir = TempDir::new("bgpd")?;
        let socket = dir.join("bgpd.sock");
        let conf = dir.join("bgpd.yaml");
        std::fs::write(&conf, spec.yaml(&socket))?;
        let log = File::create(dir.join("bgpd.log"))?;
        let mut cmd = ns.command(path(bin));
        cmd.arg("--config")
            .arg(&conf)
            .stdout(log.try_clone()?)
            .stderr(log);
        let daemon = Daemon::spawn("starling-bgpd", cmd)?;
        let mut s = Starling {
            daemon,
            bin: bin.to_path_buf(),
            dir,
            socket,
        };
        let ready = wait_for("starling-bgpd's control socket", CONTROL_READY, || {
            s.daemon.check_alive()?;
            Ok(s.ctl(&["show", "sessions"]).is_ok())
        });
        if let Err(e) = ready {
            bail!("{e:#}\n{}", s.diagnostics());
        }
        Ok(s)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("bgpd.log")
    }

    /// `starling-bgpd <args> --socket PATH`
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut a: Vec<&str> = args.to_vec();
        a.extend_from_slice(&["--socket", path(&self.socket)]);
        run(path(&self.bin), &a)
    }

    fn ctl_json(&self, args: &[&str]) -> Result<Vec<Value>> {
        let mut a: Vec<&str> = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        let out = self.ctl(&a)?;
        let v: Value = serde_json::from_str(&out)
            .with_context(|| format!("`starling-bgpd {}` is not JSON: {out}", a.join(" ")))?;
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("`starling-bgpd {}` is not a JSON array: {out}", a.join(" ")))
    }

    /// `show sessions -o json`
    pub fn sessions(&self) -> Result<Vec<Value>> {
        self.ctl_json(&["show", "sessions"])
    }

    /// Our session with `peer`, as `show sessions -o json` reports it.
    pub fn session(&self, peer: IpAddr) -> Result<Option<Value>> {
        Ok(self
            .sessions()?
            .into_iter()
            .find(|s| s["peer"].as_str().and_then(|a| a.parse::<IpAddr>().ok()) == Some(peer)))
    }

    pub fn session_established(&self, peer: IpAddr) -> Result<bool> {
        Ok(self
            .session(peer)?
            .is_some_and(|s| s["state"] == "Established"))
    }

    /// `show routes -o json`
    pub fn routes(&self) -> Result<Vec<Value>> {
        self.ctl_json(&["show", "routes"])
    }

    /// Routes learned from `peer`, by canonical prefix.
    pub fn routes_from(&self, peer: IpAddr) -> Result<BTreeMap<String, Value>> {
        let mut m = BTreeMap::new();
        for r in self.routes()? {
            if r["peer"].as_str().and_then(|a| a.parse::<IpAddr>().ok()) == Some(peer) {
                let p = r["prefix"]
                    .as_str()
                    .ok_or_else(|| anyhow!("route without a prefix: {r}"))?;
                m.insert(canonical(p)?, r);
            }
        }
        Ok(m)
    }

    pub fn announce(&self, prefix: IpNet) -> Result<()> {
        self.ctl(&["announce", &prefix.to_string()]).map(|_| ())
    }

    pub fn withdraw(&self, prefix: IpNet) -> Result<()> {
        self.ctl(&["withdraw", &prefix.to_string()]).map(|_| ())
    }

    pub fn diagnostics(&self) -> String {
        let show = |args: &[&str]| match self.ctl(args) {
            Ok(o) => o,
            Err(e) => format!("({e:#})\n"),
        };
        format!(
            "--- starling-bgpd sessions:\n{}--- starling-bgpd routes:\n{}--- bgpd.log (tail):\n{}\n",
            show(&["show", "sessions"]),
            show(&["show", "routes"]),
            tail(&self.log_path(), 40)
        )
    }
}

/// TCP segments the namespace's kernel dropped for a TCP-MD5 reason (bad
/// digest, missing digest, unexpected digest), from its /proc/net/netstat.
pub fn md5_drops(ns: &Netns) -> Result<u64> {
    let text = ns.exec("cat", &["/proc/net/netstat"])?;
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let [names, values] = lines[..] else {
        bail!("no TcpExt section in {}'s /proc/net/netstat", ns.name);
    };
    let mut total = 0;
    for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
        if matches!(n, "TCPMD5Failure" | "TCPMD5NotFound" | "TCPMD5Unexpected") {
            total += v.parse::<u64>().with_context(|| format!("{n} = {v:?}"))?;
        }
    }
    Ok(total)
}

/// A switch namespace with a bridge; [`Lan::attach`] plugs namespaces into it.
pub struct Lan {
    pub switch: Netns,
    ports: u32,
}

impl Lan {
    pub fn new() -> Result<Lan> {
        let switch = Netns::new("sw")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        Ok(Lan { switch, ports: 0 })
    }

    /// Give `ns` an `eth0` on the bridge with `addrs` (comma-separated CIDRs;
    /// IPv6 ones without duplicate address detection).
    pub fn attach(&mut self, ns: &Netns, addrs: &str) -> Result<()> {
        // No duplicate address detection on the link-local address either:
        // FRR resets IPv6 sessions while eth0's link-local is still tentative.
        for scope in ["default", "all"] {
            ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        }
        self.ports += 1;
        let port = format!("p{}", self.ports);
        crate::veth(ns, "eth0", addrs, &self.switch, &port, "")?;
        self.switch.ip(&["link", "set", &port, "master", "br0"])?;
        Ok(())
    }
}
