//! A deleted Node's blocks (BlockAffinities) are released by the elected
//! agent once the grace period has passed, and the node coming back with
//! the same name (its agent restarted on the same state directory, its
//! pod still there) keeps nothing stale: the block of its stored
//! allocation is claimed again, and `ipam check` finds nothing.

use super::cluster::{Cluster, checked};
use super::ipam::CHECK_MODEL as MODEL;
use anyhow::{Context, Result, ensure};
use serde_json::Value;
use std::time::{Duration, Instant};

const NODE2: &str = "\
apiVersion: v1
kind: Node
metadata:
  name: node2
  annotations: {starling.dev/ipv4-address: 192.0.2.12/24}
";

/// The clean-up's grace period (`node::cleanup::GRACE`).
const GRACE: Duration = Duration::from_secs(10);

/// The blocks the BlockAffinities give `node`.
fn blocks_of(k: &Cluster, node: &str) -> Result<Vec<String>> {
    let out = k.kubectl_ok(&["get", "blockaffinities.starling.dev", "-o", "json"])?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(v["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter(|i| i["spec"]["node"] == node)
        .filter_map(|i| i["spec"]["cidr"].as_str().map(String::from))
        .collect())
}

#[test]
fn a_deleted_node_is_cleaned_up_and_comes_back_with_nothing_stale() -> Result<()> {
    let k = Cluster::private("nodegone")?;
    k.apply_manifests()?;
    super::ipam::grant_ipamblocks(&k)?;
    let yaml = format!("{MODEL}---\n{NODE2}");
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], &yaml))?;
    let (mut c, _dir) = super::e2e::lab_on(&k, "kgone", 2, |_| {})?;
    let pod2 = c.pod("node2")?.ips[0];
    let held = blocks_of(&k, "node2")?;
    ensure!(
        held.iter()
            .any(|b| b.parse::<ipnet::IpNet>().is_ok_and(|n| n.contains(&pod2))),
        "node2 holds the block of its pod {pod2}: {held:?}"
    );

    // The machine goes (its agent with it), then its Node.
    c.lab.kill_agent("node2")?;
    k.kubectl_ok(&["delete", "node", "node2"])?;
    let deleted = Instant::now();
    starling_tests::wait_for(
        "node2's BlockAffinities released",
        Duration::from_secs(90),
        || Ok(blocks_of(&k, "node2")?.is_empty()),
    )?;
    let took = deleted.elapsed();
    ensure!(
        took >= GRACE,
        "released after {took:?}, before the {GRACE:?} grace period"
    );
    let log1 = std::fs::read_to_string(c.dir().join("node1").join("agent.log"))?;
    ensure!(
        log1.contains("released the blocks of deleted node node2"),
        "node1 (the only agent, so the Lease holder) logs the release:\n{log1}"
    );
    let lease = k.kubectl_ok(&[
        "get",
        "lease",
        "-n",
        "kube-system",
        "starling-node-cleanup",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    ensure!(lease.trim() == "node1", "Lease holder: {lease}");

    // It comes back with the same name and the same state directory: the
    // pod's block is claimed again rather than served unclaimed.
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], NODE2))?;
    c.lab.start_agent("node2")?;
    starling_tests::wait_for(
        "node2 holds its pod's block again",
        Duration::from_secs(60),
        || {
            Ok(blocks_of(&k, "node2")?
                .iter()
                .any(|b| b.parse::<ipnet::IpNet>().is_ok_and(|n| n.contains(&pod2))))
        },
    )?;
    let control = c.dir().join("node2").join("agent.sock");
    let out = std::process::Command::new(starling_tests::bin("starlingctl"))
        .args(["ipam", "check", "-o", "json", "--socket"])
        .arg(&control)
        .output()?;
    ensure!(
        out.status.success(),
        "ipam check on node2 after its return: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
