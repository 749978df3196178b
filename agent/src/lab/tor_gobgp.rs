//! `--tor gobgp`: the top-of-rack router as GoBGP (`gobgpd`), same address,
//! AS and peers as the BIRD one. Its API listens on 127.0.0.1:50051 inside
//! the router's namespace only; the configuration is re-read on SIGHUP.

use super::{LabState, LabTor, NODE_AS, TOR_AS, sh};
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn conf_path(lab: &LabState) -> PathBuf {
    super::state_dir(&lab.dir, &lab.name).join("gobgpd.toml")
}

fn conf(lab: &LabState) -> String {
    let mut c = format!("[global.config]\n  as = {TOR_AS}\n  router-id = \"192.0.2.254\"\n");
    for n in &lab.nodes {
        let _ = write!(
            c,
            "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {NODE_AS}\n",
            n.ipv4.addr()
        );
        if let Some(pw) = &lab.options.tor_password {
            let _ = writeln!(c, "    auth-password = \"{}\"", pw.replace('"', ""));
        }
        // idle-hold-time-after-reset defaults to 30 s: a reset session would
        // stay down for half a minute.
        c += "  [neighbors.timers.config]\n    idle-hold-time-after-reset = 1\n  \
              [neighbors.transport.config]\n    local-address = \"192.0.2.254\"\n  \
              [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv4-unicast\"\n";
    }
    c
}

/// The `gobgp` CLI against the router's API, inside its namespace.
fn gobgp(t: &LabTor, args: &[&str]) -> Result<String> {
    sh(
        "top-of-rack router: gobgp",
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &t.netns,
                "gobgp",
                "-u",
                "127.0.0.1",
                "-p",
                "50051",
            ])
            .args(args),
    )
}

/// Start gobgpd in the router's namespace; returns its pid.
pub(super) fn start(lab: &LabState, t: &LabTor) -> Result<u32> {
    let path = conf_path(lab);
    std::fs::write(&path, conf(lab)).with_context(|| format!("writing {}", path.display()))?;
    let log = std::fs::File::create(path.with_file_name("gobgpd.log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &t.netns, "gobgpd", "-f"])
        .arg(&path)
        .args([
            "-t",
            "toml",
            "--api-hosts",
            "127.0.0.1:50051",
            "--log-plain",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("top-of-rack router: starting gobgpd (Debian package gobgpd)")?;
    let pid = child.id();
    // The lab outlives this command: the child is not waited for.
    std::mem::forget(child);
    let end = Instant::now() + Duration::from_secs(20);
    while gobgp(t, &["global"]).is_err() {
        if Instant::now() >= end {
            bail!("top-of-rack router: gobgpd's API did not answer within 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // gobgpd's file has no static routes: originate through the API.
    for p in &lab.options.tor_announce {
        let afi = if p.addr().is_ipv4() { "ipv4" } else { "ipv6" };
        gobgp(t, &["global", "rib", "add", "-a", afi, &p.to_string()])?;
    }
    Ok(pid)
}

/// Rewrite the configuration (a node added later) and make gobgpd re-read it.
pub(super) fn reconfigure(lab: &LabState, t: &LabTor) -> Result<()> {
    let path = conf_path(lab);
    std::fs::write(&path, conf(lab)).with_context(|| format!("writing {}", path.display()))?;
    if let Some(pid) = t.pid {
        super::kill(pid, libc::SIGHUP);
    }
    Ok(())
}

/// The router's IPv4 table.
pub(super) fn routes(t: &LabTor) -> Result<String> {
    gobgp(t, &["global", "rib", "-a", "ipv4"])
}
