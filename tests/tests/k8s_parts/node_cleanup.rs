//! A deleted Node's blocks (BlockAffinities) are released by the elected
//! agent once the grace period has passed, and the node coming back with
//! the same name (its agent restarted on the same state directory, its
//! pod still there) keeps nothing stale: the block of its stored
//! allocation is claimed again, and `ipam check` finds nothing.

use super::cluster::{Cluster, checked};
use super::ipam::CHECK_MODEL as MODEL;
use super::ipam::blocks_of;
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

#[test]
fn a_deleted_node_is_cleaned_up_and_comes_back_with_nothing_stale() -> Result<()> {
    let k = Cluster::private("nodegone")?;
    k.apply_manifests()?;
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

/// Deleted nodes' part of the borrowing records (`IPAMBlock`): the elected
/// agent clears the marks of deleted nodes in every record, deletes a
/// record a deleted node owned once no live node holds a mark in it (and
/// releases that block), and keeps a record in which a live node still
/// holds a mark, with the deleted owner's claim of its block, so the
/// borrower keeps its address and the block cannot be claimed again; once
/// that mark is gone the record and the claim go too.
#[test]
fn a_deleted_nodes_borrowing_marks_and_records_are_cleaned_up() -> Result<()> {
    use super::ipam::record;
    let k = Cluster::private("nodebor")?;
    k.apply_manifests()?;
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], MODEL))?;
    let (cl, _dir) = super::e2e::lab_on(&k, "kbor9", 1, |_| {})?;
    // The nodes without agents join after the lab is up (the lab waits for
    // every mesh session).
    let mut yaml = String::new();
    for (n, ip) in [
        ("owner9", "192.0.2.91"),
        ("gone9", "192.0.2.92"),
        ("live9", "192.0.2.93"),
    ] {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {n}\n  annotations: {{starling.dev/ipv4-address: {ip}/24}}\n"
        ));
    }
    let (a, b, c) = ("10.244.210.0/26", "10.244.211.0/26", "10.244.212.0/26");
    for (block, owner) in [(a, "owner9"), (b, "owner9"), (c, "live9")] {
        let name = block.replace(['.', '/'], "-");
        yaml.push_str(&format!(
            "---\napiVersion: starling.dev/v1\nkind: BlockAffinity\nmetadata: {{name: {name}}}\nspec: {{cidr: {block}, node: {owner}, state: confirmed}}\n"
        ));
    }
    yaml.push_str(&record(
        a,
        "owner9",
        &[
            ("10.244.210.1", "owner9", "pods/o/eth0"),
            ("10.244.210.2", "live9", "pods/l/eth0"),
            ("10.244.210.3", "gone9", "pods/g/eth0"),
        ],
    ));
    yaml.push_str(&record(
        b,
        "owner9",
        &[
            ("10.244.211.1", "owner9", "pods/o/eth0"),
            ("10.244.211.2", "gone9", "pods/g/eth0"),
        ],
    ));
    yaml.push_str(&record(
        c,
        "live9",
        &[
            ("10.244.212.1", "live9", "pods/l/eth0"),
            ("10.244.212.2", "gone9", "pods/g/eth0"),
        ],
    ));
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], &yaml))?;

    let records = || -> Result<Vec<(String, Vec<String>)>> {
        let out = k.kubectl_ok(&["get", "ipamblocks.starling.dev", "-o", "json"])?;
        let v: Value = serde_json::from_str(&out)?;
        let mut r: Vec<(String, Vec<String>)> = v["items"]
            .as_array()
            .context("items")?
            .iter()
            .map(|i| {
                let marks = i["spec"]["allocations"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|m| {
                                format!(
                                    "{}={}",
                                    m["ip"].as_str().unwrap_or(""),
                                    m["node"].as_str().unwrap_or("")
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (i["spec"]["cidr"].as_str().unwrap_or("").to_string(), marks)
            })
            .collect();
        r.sort();
        Ok(r)
    };
    k.kubectl_ok(&["delete", "node", "owner9", "gone9"])?;
    let deleted = Instant::now();
    let want = vec![
        (a.to_string(), vec!["10.244.210.2=live9".to_string()]),
        (c.to_string(), vec!["10.244.212.1=live9".to_string()]),
    ];
    let mut seen = Vec::new();
    starling_tests::wait_for(
        "the deleted nodes' marks cleared and owner9's unused record deleted",
        Duration::from_secs(90),
        || {
            seen = records()?;
            Ok(seen == want && blocks_of(&k, "owner9")? == [a])
        },
    )
    .with_context(|| {
        let log =
            std::fs::read_to_string(cl.dir().join("node1").join("agent.log")).unwrap_or_default();
        format!("records: {seen:?}\nagent log:\n{log}")
    })?;
    let took = deleted.elapsed();
    ensure!(
        took >= GRACE,
        "cleaned after {took:?}, before the {GRACE:?} grace period"
    );
    ensure!(blocks_of(&k, "live9")? == [c], "live9 keeps its block");

    // The live borrower's pod goes (its DEL clears its mark): the record
    // and owner9's last claim go.
    let name = a.replace(['.', '/'], "-");
    k.kubectl_ok(&[
        "patch",
        "ipamblocks.starling.dev",
        &name,
        "--type=json",
        "-p",
        r#"[{"op":"test","path":"/spec/allocations/0/node","value":"live9"},{"op":"remove","path":"/spec/allocations/0"}]"#,
    ])?;
    starling_tests::wait_for(
        "owner9's record and block released once the last live mark is gone",
        Duration::from_secs(60),
        || Ok(blocks_of(&k, "owner9")?.is_empty() && records()?.len() == 1),
    )
    .with_context(|| format!("records: {:?}", records()))?;
    let log = std::fs::read_to_string(cl.dir().join("node1").join("agent.log"))?;
    ensure!(
        log.contains("kept deleted node owner9's blocks")
            && log.contains("borrowing mark(s) of deleted node gone9"),
        "the clean-up logs what it kept and cleared:\n{log}"
    );
    Ok(())
}
