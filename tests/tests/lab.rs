//! The lab, as users drive it (`starlingctl lab up|status|check|down`), and
//! the failure scenarios that hurt Calico users, each with a continuous ping
//! and its figures as JSON lines.

use anyhow::{Context, Result, ensure};
use starling_agent::lab::Topology;
use starling_tests::cluster::{Cluster, Pinger, mesh_to_reflectors, options, wait_reachable};
use starling_tests::{bench_line, bin, wait_for};
use std::process::Command;
use std::time::{Duration, Instant};

const CONVERGE: Duration = Duration::from_secs(60);

/// The README's main job: up, status, check and down through the CLI.
#[test]
fn cli_up_status_check_down() -> Result<()> {
    let name = format!("cli{}", std::process::id() % 10000);
    let dir = std::env::temp_dir().join("starling-test-labs");
    let dir_s = dir.to_str().context("temp dir")?.to_string();
    let ctl = |args: &[&str]| -> Result<std::process::Output> {
        Command::new(bin("starlingctl"))
            .arg("lab")
            .args(args)
            .args(["--name", &name, "--dir", &dir_s])
            .output()
            .context("running starlingctl lab")
    };
    // Remove it whatever happens below.
    struct Down<'a>(&'a dyn Fn(&[&str]) -> Result<std::process::Output>);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = (self.0)(&["down"]);
        }
    }
    let _down = Down(&ctl);
    let up = ctl(&["up", "--nodes", "3", "--pods-per-node", "2"])?;
    let log = String::from_utf8_lossy(&up.stderr);
    ensure!(up.status.success(), "lab up failed:\n{log}");
    for step in [
        "node1: starting starling-agent",
        "node3: pod2 has",
        "converged",
    ] {
        ensure!(log.contains(step), "no progress line {step:?} in\n{log}");
    }
    let status = ctl(&["status"])?;
    let text = String::from_utf8_lossy(&status.stdout);
    ensure!(status.status.success(), "{text}");
    ensure!(text.matches("Established").count() >= 6, "{text}");
    ensure!(text.contains("pod node2-pod1"), "{text}");
    let check = ctl(&["check"])?;
    let text = String::from_utf8_lossy(&check.stdout);
    ensure!(check.status.success(), "lab check failed:\n{text}");
    ensure!(text.contains("30 of 30 pairs answer"), "{text}");
    let down = ctl(&["down"])?;
    ensure!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let left = starling_tests::run("ip", &["netns", "list"])?;
    ensure!(
        !left.lines().any(|l| l.starts_with(&format!("{name}-"))),
        "namespaces left after down:\n{left}"
    );
    // Checking a lab that is gone fails and says so.
    let again = ctl(&["check"])?;
    ensure!(!again.status.success());
    ensure!(
        String::from_utf8_lossy(&again.stderr).contains("lab up"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    Ok(())
}

fn report(scenario: &str, count: starling_tests::cluster::PingCount) {
    bench_line(
        scenario,
        "starling",
        "pings_sent",
        count.sent as f64,
        "packets",
    );
    bench_line(
        scenario,
        "starling",
        "pings_lost",
        count.lost() as f64,
        "packets",
    );
}

/// SIGKILL an agent and start it again: the kernel keeps forwarding, the
/// peers keep its routes (graceful restart), the new agent adopts the routes
/// and removes nothing that is still valid. Target: 0 lost.
#[test]
fn agent_sigkill_and_restart() -> Result<()> {
    let mut c = Cluster::up(options("kill", 3, Topology::Mesh))?;
    c.converged(CONVERGE)?;
    let from = c.pod("node1")?.netns.clone();
    let to = c.pod("node2")?.ips[0];
    let back_from = c.pod("node2")?.netns.clone();
    let back_to = c.pod("node3")?.ips[0];
    wait_reachable(&from, to)?;
    wait_reachable(&back_from, back_to)?;
    let ping = Pinger::start(&from, to)?;
    let ping_back = Pinger::start(&back_from, back_to)?;
    c.lab.kill_agent("node2")?;
    // The peers noticed and kept node2's routes as stale.
    c.wait_all("node2's sessions down everywhere", CONVERGE, |n| {
        Ok(n == "node2"
            || !c
                .established(n)?
                .iter()
                .any(|p| p.to_string() == "192.0.2.12"))
    })?;
    let t = Instant::now();
    c.lab.start_agent("node2")?;
    wait_for("node2 synced after its restart", CONVERGE, || {
        let st = c.status("node2")?;
        Ok(st.synced && st.forwarding_preserved)
    })?;
    c.converged(CONVERGE)?;
    bench_line(
        "lab-agent-restart",
        "starling",
        "restart_to_synced",
        t.elapsed().as_secs_f64() * 1000.0,
        "ms",
    );
    let count = ping.stop()?;
    let back = ping_back.stop()?;
    report("lab-agent-restart", count);
    report("lab-agent-restart-from-restarted-node", back);
    ensure!(count.lost() == 0, "to the restarted node: {count:?}");
    ensure!(back.lost() == 0, "from the restarted node: {back:?}");
    c.all_pairs_answer()?;
    Ok(())
}

/// Remove a node from the model: its routes are gone from every node within
/// 1 s of the removal being seen (the lab's agents poll the model every
/// 100 ms).
#[test]
fn node_removed() -> Result<()> {
    let c = Cluster::up(options("rm", 3, Topology::Mesh))?;
    c.converged(CONVERGE)?;
    let block = c.status("node3")?.blocks[0].to_string();
    c.lab.write_model_without("node3")?;
    let took = c.wait_all("node3's block gone from node1 and node2", CONVERGE, |n| {
        Ok(n == "node3" || !c.kernel_routes(n)?.contains(&block))
    })?;
    bench_line(
        "lab-node-removed",
        "starling",
        "routes_gone_after_model_change",
        took.as_secs_f64() * 1000.0,
        "ms",
    );
    ensure!(
        took <= Duration::from_millis(1100),
        "routes took {took:?} to go (1 s after the 100 ms model poll allowed)"
    );
    Ok(())
}

/// Kill one of two reflectors (SIGKILL): clients keep every route through
/// the other, and the reflector comes back. Target: 0 lost.
#[test]
fn reflector_killed() -> Result<()> {
    let mut c = Cluster::up(options("rrk", 4, Topology::Reflectors))?;
    c.converged(CONVERGE)?;
    let from = c.pod("node3")?.netns.clone();
    let to = c.pod("node4")?.ips[0];
    wait_reachable(&from, to)?;
    let ping = Pinger::start(&from, to)?;
    c.lab.kill_agent("node1")?;
    wait_for("node3 sees reflector node1 go", CONVERGE, || {
        Ok(!c
            .established("node3")?
            .iter()
            .any(|p| p.to_string() == "192.0.2.11"))
    })?;
    c.lab.start_agent("node1")?;
    c.converged(CONVERGE)?;
    let count = ping.stop()?;
    report("lab-reflector-killed", count);
    ensure!(count.lost() == 0, "{count:?}");
    Ok(())
}

/// Take node2's uplink down for a moment and up again: sessions survive a
/// blip shorter than the hold time, and traffic flows again once it is up.
#[test]
fn uplink_down_and_up() -> Result<()> {
    let c = Cluster::up(options("link", 3, Topology::Mesh))?;
    c.converged(CONVERGE)?;
    let from = c.pod("node1")?.netns.clone();
    let to = c.pod("node2")?.ips[0];
    wait_reachable(&from, to)?;
    let ping = Pinger::start(&from, to)?;
    c.lab.set_uplink("node2", false)?;
    let ns2 = c.lab.node("node2")?.netns.clone();
    wait_for("node2's eth0 without carrier", CONVERGE, || {
        Ok(
            starling_tests::run("ip", &["-n", &ns2, "link", "show", "eth0"])?
                .contains("NO-CARRIER"),
        )
    })?;
    // The outage is real: requests go unanswered.
    wait_for("pings to node2 unanswered", CONVERGE, || {
        Ok(ping.unanswered() >= 3)
    })?;
    c.lab.set_uplink("node2", true)?;
    let back = wait_reachable(&from, to)?;
    bench_line(
        "lab-uplink-flap",
        "starling",
        "reachable_after_up",
        back.as_secs_f64() * 1000.0,
        "ms",
    );
    c.converged(CONVERGE)?;
    let count = ping.stop()?;
    report("lab-uplink-flap", count);
    ensure!(count.lost() > 0, "the outage lost nothing? {count:?}");
    c.all_pairs_answer()?;
    Ok(())
}

/// Switch from mesh to reflectors under a continuous ping. Target: 0 lost.
#[test]
fn mesh_to_reflectors_switch() -> Result<()> {
    let count = mesh_to_reflectors("lm2r")?;
    report("lab-mesh-to-reflectors", count);
    ensure!(count.lost() == 0, "{count:?}");
    Ok(())
}

#[path = "lab_parts/vxlan.rs"]
mod vxlan;

#[path = "lab_parts/tor.rs"]
mod tor;
