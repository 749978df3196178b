//! `--tor frr`: the top-of-rack router as FRR (zebra + bgpd) instead of
//! BIRD, in the same namespace, address and AS, peering with every node.
//! Every file and socket lives in the lab's state directory (`frr/`).

use super::{LabState, NODE_AS, TOR_AS, sh};
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn frr_dir(lab: &LabState) -> PathBuf {
    super::state_dir(&lab.dir, &lab.name).join("frr")
}

/// bgpd's configuration: one neighbour per node, the announced prefixes.
fn bgpd_conf(lab: &LabState) -> String {
    let dir = frr_dir(lab);
    let mut c = format!(
        "frr defaults traditional\nhostname tor\nlog file {}/bgpd.log\n!\nrouter bgp {TOR_AS}\n \
         bgp router-id 192.0.2.254\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
         no bgp default ipv4-unicast\n",
        dir.display()
    );
    for n in &lab.nodes {
        neighbour_lines(lab, &n.ipv4.addr().to_string(), &mut c);
    }
    for (afi, v4) in [("ipv4", true), ("ipv6", false)] {
        let _ = writeln!(c, " address-family {afi} unicast");
        for p in lab
            .options
            .tor_announce
            .iter()
            .filter(|p| p.addr().is_ipv4() == v4)
        {
            let _ = writeln!(c, "  network {p}");
        }
        if v4 {
            for n in &lab.nodes {
                let _ = writeln!(c, "  neighbor {} activate", n.ipv4.addr());
            }
        }
        c += " exit-address-family\n";
    }
    c
}

fn neighbour_lines(lab: &LabState, addr: &str, c: &mut String) {
    let _ = writeln!(c, " neighbor {addr} remote-as {NODE_AS}");
    let _ = writeln!(c, " neighbor {addr} update-source 192.0.2.254");
    if let Some(pw) = &lab.options.tor_password {
        let _ = writeln!(c, " neighbor {addr} password {}", pw.replace(' ', ""));
    }
}

/// Start zebra and bgpd (daemonized) in `netns`; returns bgpd's pid.
pub(super) fn start(lab: &LabState, netns: &str) -> Result<Option<u32>> {
    let dir = frr_dir(lab);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("zebra.conf"),
        format!("hostname tor\nlog file {}/zebra.log\n", dir.display()),
    )?;
    std::fs::write(dir.join("bgpd.conf"), bgpd_conf(lab))?;
    let zserv = dir.join("zserv.api");
    for daemon in ["zebra", "bgpd"] {
        let conf = dir.join(format!("{daemon}.conf"));
        let pid = dir.join(format!("{daemon}.pid"));
        // `-u root -g frrvty`: stay root; `-P 0`: no TCP vty. Not `-d`:
        // `ip netns exec` execs in place, so the child's pid is the daemon's,
        // which also names the directory FRR keeps in /var/tmp/frr.
        let log = std::fs::File::create(dir.join(format!("{daemon}.out")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(format!("/usr/lib/frr/{daemon}"))
            .args(["-u", "root", "-g", "frrvty", "-P", "0", "-f"])
            .arg(&conf)
            .arg("-i")
            .arg(&pid)
            .arg("-z")
            .arg(&zserv)
            .arg("--vty_socket")
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("top-of-rack router: starting FRR {daemon}"))?;
        std::fs::write(
            dir.join(format!("{daemon}.started")),
            child.id().to_string(),
        )?;
        // The lab outlives this command: the child is not waited for.
        std::mem::forget(child);
        if daemon == "zebra" {
            wait("zebra's zserv socket", || Ok(zserv.exists()))?;
        }
    }
    wait("FRR bgpd to answer vtysh", || {
        Ok(vtysh(lab, &["show bgp summary json"]).is_ok_and(|o| o.trim_start().starts_with('{')))
    })?;
    Ok(std::fs::read_to_string(dir.join("bgpd.started"))
        .ok()
        .and_then(|s| s.trim().parse().ok()))
}

fn wait(what: &str, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    while !ok()? {
        if Instant::now() >= end {
            bail!("top-of-rack router: {what}: not within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Run vtysh commands against the lab's FRR.
pub(super) fn vtysh(lab: &LabState, commands: &[&str]) -> Result<String> {
    let mut cmd = Command::new("vtysh");
    cmd.arg("--vty_socket").arg(frr_dir(lab));
    for c in commands {
        cmd.args(["-c", c]);
    }
    sh("top-of-rack router: vtysh", &mut cmd)
}

/// Add every node as a neighbour (a node added later); idempotent.
pub(super) fn reconfigure(lab: &LabState) -> Result<()> {
    let mut lines = String::new();
    for n in &lab.nodes {
        neighbour_lines(lab, &n.ipv4.addr().to_string(), &mut lines);
    }
    let mut cmds: Vec<String> = vec!["configure terminal".into(), format!("router bgp {TOR_AS}")];
    cmds.extend(lines.lines().map(|l| l.trim().to_string()));
    cmds.push("address-family ipv4 unicast".into());
    cmds.extend(
        lab.nodes
            .iter()
            .map(|n| format!("neighbor {} activate", n.ipv4.addr())),
    );
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    vtysh(lab, &refs).map(|_| ())
}

/// FRR leaves `/var/tmp/frr/<daemon>.<pid>/` behind; remove it (at `down`).
pub(super) fn clean(lab: &LabState) {
    let dir = frr_dir(lab);
    for daemon in ["zebra", "bgpd"] {
        if let Some(pid) = std::fs::read_to_string(dir.join(format!("{daemon}.started")))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            let _ = std::fs::remove_dir_all(format!("/var/tmp/frr/{daemon}.{pid}"));
        }
    }
}
