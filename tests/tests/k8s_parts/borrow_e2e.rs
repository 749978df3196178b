//! Borrowing across real agents (docs/cni.md Borrowing): the pool is one
//! block, node1 claims it with its first pod, so node2's ADD (the real
//! `starling` plugin) borrows an address of node1's block through the
//! `IPAMBlock` record; the pods on both nodes ping each other through the
//! kernels' routes, and node2's DEL clears its mark and its `/32` leaves
//! node1's kernel table. Without BGP (`bgpEnabled: false`) the same with a
//! third node: every node routes the borrowed `/32`s from the records.

use super::cluster::{Cluster, checked};
use super::ipam::{Mark, blocks_of, ipam_record};
use anyhow::{Context, Result, bail, ensure};
use starling_agent::lab::LabPod;
use starling_tests::TempDir;
use starling_tests::cluster::{Cluster as LabCluster, wait_reachable};
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One pool of exactly one block: whoever claims it holds every block.
const MODEL: &str = "\
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: tiny}
spec: {cidr: 10.244.0.0/28, blockSize: 28}
---
apiVersion: starling.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {asNumber: 64512}
---
apiVersion: v1
kind: Node
metadata:
  name: node1
  annotations: {starling.dev/ipv4-address: 192.0.2.11/24}
---
apiVersion: v1
kind: Node
metadata:
  name: node2
  annotations: {starling.dev/ipv4-address: 192.0.2.12/24}
";

const BLOCK: &str = "10.244.0.0/28";
const RECORD: &str = "10-244-0-0-28";

/// The lab plugin's network name: attachments are `NETWORK/CONTAINER/IFNAME`.
const NETWORK: &str = "starling-lab";

/// The record's state and marks.
fn record(k: &Cluster) -> Result<(String, Vec<Mark>)> {
    ipam_record(k, BLOCK)
}

/// A CNI DEL of the lab pod in `pod_netns` on the node in `node_netns`,
/// through the real plugin, as a runtime does.
fn del(node_netns: &str, socket: &std::path::Path, pod_netns: &str) -> Result<()> {
    let conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": NETWORK,
        "type": "starling",
        "socketPath": socket,
    });
    let cni = starling_tests::bin("starling");
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_netns])
        .arg(&cni)
        .env("CNI_COMMAND", "DEL")
        .env("CNI_CONTAINERID", pod_netns)
        .env("CNI_NETNS", format!("/var/run/netns/{pod_netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni.parent().context("plugin directory")?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running the starling plugin")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "CNI DEL of {pod_netns} failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Wait (30 s at most) until the record of `block` carries no mark of
/// `node`.
fn marks_cleared(k: &Cluster, block: &str, node: &str) -> Result<()> {
    let mut last = Vec::new();
    starling_tests::wait_for(
        &format!("{node}'s marks cleared from the record of {block}"),
        Duration::from_secs(30),
        || {
            last = ipam_record(k, block)?.1;
            Ok(!last.iter().any(|m| m.1 == node))
        },
    )
    .with_context(|| format!("marks: {last:?}"))?;
    Ok(())
}

/// Whether `ip route show` output has a route for exactly `ip` (a `/32`).
fn has_host_route(routes: &str, ip: IpAddr) -> bool {
    let want = ip.to_string();
    routes
        .lines()
        .any(|l| l.split_whitespace().next() == Some(want.as_str()))
}

/// The shared setup: the one-block pool and its two Nodes applied to `k`,
/// and a lab of two agents on it with no pods (node1's first pod claims
/// the pool's only block).
fn two_agents(k: &Cluster, lab_name: &str) -> Result<(LabCluster, TempDir)> {
    lab_with(k, MODEL, lab_name, 2, |o| o.pods_per_node = 0)
}

/// The manifests and `model` applied to `k`, then a lab of `nodes` agents
/// on it with the options `opts` sets.
fn lab_with(
    k: &Cluster,
    model: &str,
    lab_name: &str,
    nodes: usize,
    opts: impl FnOnce(&mut starling_agent::lab::LabOptions),
) -> Result<(LabCluster, TempDir)> {
    k.apply_manifests()?;
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], model))?;
    super::e2e::lab_on(k, lab_name, nodes, opts)
}

/// The one-block pool over VXLAN and three Nodes, for agents without BGP.
const MODEL_NO_BGP: &str = "\
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: tiny}
spec: {cidr: 10.244.0.0/28, blockSize: 28, vxlanMode: Always}
---
apiVersion: v1
kind: Node
metadata:
  name: node1
  annotations: {starling.dev/ipv4-address: 192.0.2.11/24}
---
apiVersion: v1
kind: Node
metadata:
  name: node2
  annotations: {starling.dev/ipv4-address: 192.0.2.12/24}
---
apiVersion: v1
kind: Node
metadata:
  name: node3
  annotations: {starling.dev/ipv4-address: 192.0.2.13/24}
";

/// node1's first pod, which claims the pool's only block.
fn owner_claims(k: &Cluster, c: &mut LabCluster) -> Result<LabPod> {
    let a = c.lab.add_pod("node1", "a")?;
    ensure!(
        blocks_of(k, "node1")? == [BLOCK],
        "node1 holds the pool's only block: {:?}",
        blocks_of(k, "node1")?
    );
    Ok(a)
}

#[test]
fn a_node_with_no_block_borrows_an_address_reachable_from_the_owner() -> Result<()> {
    let k = Cluster::private("borrowe2e")?;
    let (mut c, _dir) = two_agents(&k, "kbe2e")?;
    let r = borrow_ping_release(&k, &mut c);
    r.map_err(|e| e.context(starling_tests::cluster::logs(&c.dir())))
}

fn borrow_ping_release(k: &Cluster, c: &mut LabCluster) -> Result<()> {
    let a = owner_claims(k, c)?;
    let b = c.lab.add_pod("node2", "b")?;
    let (a_ip, b_ip) = (a.ips[0], b.ips[0]);
    let block: ipnet::IpNet = BLOCK.parse()?;
    ensure!(
        block.contains(&b_ip) && b_ip != a_ip,
        "node2's pod got {b_ip}, not a second address of node1's block {BLOCK} (node1's pod: {a_ip})"
    );
    ensure!(
        blocks_of(k, "node2")?.is_empty(),
        "node2 claimed no block: {:?}",
        blocks_of(k, "node2")?
    );
    let (state, marks) = record(k)?;
    ensure!(state == "open", "record {RECORD} is {state:?}, not open");
    let b_key = format!("{NETWORK}/{}/eth0", b.netns);
    ensure!(
        marks.contains(&(b_ip.to_string(), "node2".into(), b_key.clone())),
        "record {RECORD} carries node2's mark for {b_ip} ({b_key}): {marks:?}"
    );
    ensure!(
        marks
            .iter()
            .any(|m| m.0 == a_ip.to_string() && m.1 == "node1"),
        "the owner's opening marked its own pod's {a_ip}: {marks:?}"
    );

    // Both ways through the kernels: node1 routes the borrowed /32 to node2
    // (longer than its own block's blackhole), node2 the block to node1.
    starling_tests::wait_for(
        "node1's kernel to route node2's borrowed address",
        Duration::from_secs(30),
        || Ok(has_host_route(&c.kernel_routes("node1")?, b_ip)),
    )
    .with_context(|| format!("node1: {:?}", c.kernel_routes("node1")))?;
    wait_reachable(&a.netns, b_ip).context("node1's pod pings node2's borrowed address")?;
    wait_reachable(&b.netns, a_ip).context("node2's pod pings node1's pod")?;

    // DEL on node2 clears the mark, and the /32 leaves node1's kernel.
    let node2 = c.lab.node("node2")?.clone();
    del(&node2.netns, &node2.dir.join("cni.sock"), &b.netns)?;
    marks_cleared(k, BLOCK, "node2")?;
    starling_tests::wait_for(
        "node2's /32 gone from node1's kernel",
        Duration::from_secs(30),
        || Ok(!has_host_route(&c.kernel_routes("node1")?, b_ip)),
    )
    .with_context(|| format!("node1: {:?}", c.kernel_routes("node1")))?;
    Ok(())
}

/// `bgpEnabled: false`: no route is learned, so the borrowed addresses'
/// `/32`s come from the IPAMBlock records. node1 owns the pool's only
/// block; node2's and node3's pods borrow from it; every node routes the
/// other borrowers' `/32`s via the borrower (over VXLAN, as the block),
/// the owner's pod and node3's pod ping node2's borrowed address, and after
/// node2's DEL its `/32` is gone from node1's and node3's kernels.
#[test]
fn borrowed_addresses_are_routed_from_the_records_without_bgp() -> Result<()> {
    let k = Cluster::private("borrownobgp")?;
    let (mut c, _dir) = lab_with(&k, MODEL_NO_BGP, "kbnob", 3, |o| {
        o.pods_per_node = 0;
        o.no_bgp = true;
    })?;
    let r = borrow_without_bgp(&k, &mut c);
    r.map_err(|e| e.context(starling_tests::cluster::logs(&c.dir())))
}

/// `node`'s kernel route for exactly `ip`, if any.
fn host_route(c: &LabCluster, node: &str, ip: IpAddr) -> Result<Option<String>> {
    let want = ip.to_string();
    Ok(c.kernel_routes(node)?
        .lines()
        .find(|l| l.split_whitespace().next() == Some(want.as_str()))
        .map(str::to_string))
}

fn borrow_without_bgp(k: &Cluster, c: &mut LabCluster) -> Result<()> {
    let a = owner_claims(k, c)?;
    let b = c.lab.add_pod("node2", "b")?;
    let d = c.lab.add_pod("node3", "d")?;
    let (a_ip, b_ip, d_ip) = (a.ips[0], b.ips[0], d.ips[0]);
    let block: ipnet::IpNet = BLOCK.parse()?;
    ensure!(
        block.contains(&b_ip) && block.contains(&d_ip) && b_ip != d_ip,
        "node2's {b_ip} and node3's {d_ip} are two borrowed addresses of {BLOCK}"
    );
    for n in ["node2", "node3"] {
        ensure!(blocks_of(k, n)?.is_empty(), "{n} claimed no block");
        let st = c.status(n)?;
        ensure!(st.route_source == "datastore", "{n}: {}", st.route_source);
    }
    let (_, marks) = record(k)?;
    ensure!(
        marks
            .iter()
            .any(|m| m.0 == b_ip.to_string() && m.1 == "node2")
            && marks
                .iter()
                .any(|m| m.0 == d_ip.to_string() && m.1 == "node3"),
        "record {RECORD} carries both borrowers' marks: {marks:?}"
    );
    // Every node but the borrower routes each borrowed /32 via the
    // borrower, through the VXLAN device like the block.
    for (ip, via, others) in [
        (b_ip, "192.0.2.12", ["node1", "node3"]),
        (d_ip, "192.0.2.13", ["node1", "node2"]),
    ] {
        for n in others {
            let mut last = None;
            starling_tests::wait_for(
                &format!("{n}'s kernel to route {ip} via {via}"),
                Duration::from_secs(30),
                || {
                    last = host_route(c, n, ip)?;
                    Ok(last
                        .as_deref()
                        .is_some_and(|r| r.contains(via) && r.contains("vxlan.starling")))
                },
            )
            .with_context(|| format!("{n}: {last:?}; {:?}", c.kernel_routes(n)))?;
        }
    }
    wait_reachable(&a.netns, b_ip).context("the owner's pod pings node2's borrowed address")?;
    wait_reachable(&d.netns, b_ip).context("node3's pod pings node2's borrowed address")?;
    wait_reachable(&b.netns, d_ip).context("node2's pod pings node3's borrowed address")?;
    wait_reachable(&b.netns, a_ip).context("node2's pod pings the owner's pod")?;

    let node2 = c.lab.node("node2")?.clone();
    del(&node2.netns, &node2.dir.join("cni.sock"), &b.netns)?;
    for n in ["node1", "node3"] {
        starling_tests::wait_for(
            &format!("node2's /32 gone from {n}'s kernel"),
            Duration::from_secs(30),
            || Ok(host_route(c, n, b_ip)?.is_none()),
        )
        .with_context(|| format!("{n}: {:?}", c.kernel_routes(n)))?;
    }
    // node3's borrowed address keeps its route.
    ensure!(
        host_route(c, "node1", d_ip)?.is_some(),
        "node1 still routes node3's {d_ip}: {:?}",
        c.kernel_routes("node1")
    );
    Ok(())
}

/// An agent killed between its mark and its store write (the fault hook
/// `STARLING_TEST_FAULT=ipamblock-after-write` aborts it right after the
/// record's replace) leaves its mark in the record; restarted without the
/// hook, it clears that mark at start (docs/cni.md "Healing at start"), and
/// its next ADD borrows an address nobody else holds.
#[test]
fn an_agent_killed_mid_borrow_clears_its_mark_when_it_restarts() -> Result<()> {
    let k = Cluster::private("borrowkill")?;
    let (mut c, _dir) = two_agents(&k, "kbkil")?;
    let r = crash_heal_borrow(&k, &mut c);
    r.map_err(|e| e.context(starling_tests::cluster::logs(&c.dir())))
}

fn crash_heal_borrow(k: &Cluster, c: &mut LabCluster) -> Result<()> {
    let a = owner_claims(k, c)?;
    c.lab.kill_agent("node2")?;
    let pid = c
        .lab
        .start_agent_with_env("node2", &[("STARLING_TEST_FAULT", "ipamblock-after-write")])?;
    let node2 = c.lab.node("node2")?.clone();
    let err = match c.lab.add_pod("node2", "b") {
        Ok(p) => bail!("node2's ADD with the fault hook succeeded: {:?}", p.ips),
        Err(e) => e,
    };
    let status = exit_of(pid, Duration::from_secs(10))
        .with_context(|| format!("node2's agent (pid {pid}) after the failed ADD: {err:#}"))?;
    ensure!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGABRT,
        "node2's agent ended by the hook's abort, not with wait status {status:#x}"
    );
    let b_key = format!("{NETWORK}/{}-b/eth0", node2.netns);
    let (state, marks) = record(k)?;
    ensure!(state == "open", "record {RECORD} is {state:?}, not open");
    let leaked: Vec<&Mark> = marks.iter().filter(|m| m.1 == "node2").collect();
    ensure!(
        leaked.len() == 1 && leaked[0].2 == b_key && leaked[0].0 != a.ips[0].to_string(),
        "the crash left exactly node2's mark for {b_key} (on an address other than node1's pod's {}): {marks:?}",
        a.ips[0]
    );

    // Restarted without the hook, it clears the mark its store does not hold.
    c.lab.start_agent("node2")?;
    marks_cleared(k, BLOCK, "node2")?;

    // Its next ADD borrows an address of the block that no one else holds.
    let d = c.lab.add_pod("node2", "d")?;
    let d_ip = d.ips[0];
    let block: ipnet::IpNet = BLOCK.parse()?;
    ensure!(
        block.contains(&d_ip) && d_ip != a.ips[0],
        "node2's new pod got {d_ip}, not a second address of node1's block {BLOCK}"
    );
    ensure!(
        blocks_of(k, "node2")?.is_empty(),
        "node2 claimed no block: {:?}",
        blocks_of(k, "node2")?
    );
    let (_, marks) = record(k)?;
    let d_key = format!("{NETWORK}/{}/eth0", d.netns);
    let holders: Vec<&Mark> = marks.iter().filter(|m| m.0 == d_ip.to_string()).collect();
    ensure!(
        holders == [&(d_ip.to_string(), "node2".to_string(), d_key.clone())],
        "{d_ip} is marked once, by node2 for {d_key}: {marks:?}"
    );
    ensure!(
        marks.iter().filter(|m| m.1 == "node2").count() == 1,
        "node2 holds one mark, the new pod's: {marks:?}"
    );
    Ok(())
}

/// Reap the agent `pid` (a child of this process: the lab starts agents
/// from it) once it has ended, within `within`; its wait status.
fn exit_of(pid: u32, within: Duration) -> Result<i32> {
    let mut status = 0;
    starling_tests::wait_for("the agent to exit", within, || {
        // SAFETY: waitpid on one specific pid with WNOHANG.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        ensure!(r >= 0, "waitpid {pid}: {}", std::io::Error::last_os_error());
        Ok(r == pid as i32)
    })?;
    Ok(status)
}

/// Dual stack: one one-block pool per family, the nodes with IPv6
/// addresses too. node1's first pod claims both blocks; node2's pod
/// borrows one address of each from node1's blocks (one mark per record),
/// the pods ping each other over IPv4 and IPv6, node1's kernel routes the
/// borrowed `/128` to node2, and node2's DEL clears both marks and the
/// `/128`.
const MODEL_DUAL: &str = "\
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: tiny}
spec: {cidr: 10.244.0.0/28, blockSize: 28}
---
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: tiny6}
spec: {cidr: 'fd00:10:244::/124', blockSize: 124}
---
apiVersion: starling.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {asNumber: 64512}
---
apiVersion: v1
kind: Node
metadata:
  name: node1
  annotations:
    starling.dev/ipv4-address: 192.0.2.11/24
    starling.dev/ipv6-address: 2001:db8::11/64
---
apiVersion: v1
kind: Node
metadata:
  name: node2
  annotations:
    starling.dev/ipv4-address: 192.0.2.12/24
    starling.dev/ipv6-address: 2001:db8::12/64
";

const BLOCK6: &str = "fd00:10:244::/124";

#[test]
fn a_node_with_no_block_borrows_one_address_per_family() -> Result<()> {
    let k = Cluster::private("borrowdual")?;
    let (mut c, _dir) = lab_with(&k, MODEL_DUAL, "kbdual", 2, |o| {
        o.pods_per_node = 0;
        o.ipv6 = true;
    })?;
    let r = borrow_dual(&k, &mut c);
    r.map_err(|e| e.context(starling_tests::cluster::logs(&c.dir())))
}

/// `node`'s IPv6 kernel routes of ours (`ip -6 route show proto 73`).
fn kernel_routes6(c: &LabCluster, node: &str) -> Result<String> {
    let ns = &c.lab.node(node)?.netns;
    starling_tests::run("ip", &["-6", "-n", ns, "route", "show", "proto", "73"])
}

/// The pod's address of each family: (IPv4, IPv6).
fn per_family(pod: &LabPod) -> Result<(IpAddr, IpAddr)> {
    let v4 = pod.ips.iter().find(|ip| ip.is_ipv4());
    let v6 = pod.ips.iter().find(|ip| ip.is_ipv6());
    match (v4, v6) {
        (Some(a), Some(b)) => Ok((*a, *b)),
        _ => bail!(
            "pod {} has not one address per family: {:?}",
            pod.name,
            pod.ips
        ),
    }
}

fn borrow_dual(k: &Cluster, c: &mut LabCluster) -> Result<()> {
    let a = c.lab.add_pod("node1", "a")?;
    let mut held = blocks_of(k, "node1")?;
    held.sort();
    ensure!(
        held == [BLOCK, BLOCK6],
        "node1 holds both pools' only blocks: {held:?}"
    );
    let b = c.lab.add_pod("node2", "b")?;
    let ((a4, a6), (b4, b6)) = (per_family(&a)?, per_family(&b)?);
    let (block4, block6): (ipnet::IpNet, ipnet::IpNet) = (BLOCK.parse()?, BLOCK6.parse()?);
    ensure!(
        block4.contains(&b4) && b4 != a4 && block6.contains(&b6) && b6 != a6,
        "node2's pod got {b4} and {b6}, not second addresses of node1's blocks {BLOCK} and {BLOCK6} (node1's pod: {a4}, {a6})"
    );
    ensure!(
        blocks_of(k, "node2")?.is_empty(),
        "node2 claimed no block: {:?}",
        blocks_of(k, "node2")?
    );
    let b_key = format!("{NETWORK}/{}/eth0", b.netns);
    for (block, ip) in [(BLOCK, b4), (BLOCK6, b6)] {
        let (state, marks) = ipam_record(k, block)?;
        ensure!(
            state == "open",
            "the record of {block} is {state:?}, not open"
        );
        let mine: Vec<&Mark> = marks.iter().filter(|m| m.1 == "node2").collect();
        ensure!(
            mine == [&(ip.to_string(), "node2".to_string(), b_key.clone())],
            "the record of {block} carries exactly node2's mark for {ip} ({b_key}): {marks:?}"
        );
    }

    starling_tests::wait_for(
        "node1's kernel to route node2's borrowed IPv6 address",
        Duration::from_secs(30),
        || Ok(has_host_route(&kernel_routes6(c, "node1")?, b6)),
    )
    .with_context(|| format!("node1: {:?}", kernel_routes6(c, "node1")))?;
    for (from, to) in [(&a, b4), (&a, b6), (&b, a4), (&b, a6)] {
        wait_reachable(&from.netns, to)
            .with_context(|| format!("{}'s pod pings {to}", from.node))?;
    }

    let node2 = c.lab.node("node2")?.clone();
    del(&node2.netns, &node2.dir.join("cni.sock"), &b.netns)?;
    for block in [BLOCK, BLOCK6] {
        marks_cleared(k, block, "node2")?;
    }
    starling_tests::wait_for(
        "node2's /128 gone from node1's kernel",
        Duration::from_secs(30),
        || Ok(!has_host_route(&kernel_routes6(c, "node1")?, b6)),
    )
    .with_context(|| format!("node1: {:?}", kernel_routes6(c, "node1")))?;
    Ok(())
}
