//! The whole system through a real API server: Nodes created by the test,
//! IPPool and BGPConfiguration applied with kubectl, agents in network
//! namespaces reading them as the DaemonSet's ServiceAccount, BGP between
//! them, FIBs filled, pods created through the CNI plugin pinging each other,
//! and an API server restart that withdraws nothing.

use super::cluster::Cluster;
use anyhow::{Context, Result, ensure};
use starling_agent::lab::{LabOptions, Topology};
use starling_tests::TempDir;
use starling_tests::cluster::{self as lab, Pinger, wait_reachable};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Bind a TCP listener inside a named network namespace (a thread of its
/// own enters it; the socket stays there after the thread ends).
pub(super) fn listen_in(netns: &str, port: u16) -> Result<TcpListener> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<TcpListener> {
            let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this (scoped, short-lived) thread only.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
            Ok(TcpListener::bind(("127.0.0.1", port))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("listener thread panicked"))?
    })
}

/// Copy `from` to `to` until `from` ends, then end `to`'s writing side.
/// The relay forwards each read at once (`TCP_NODELAY` on the socket it
/// writes to): with Nagle's algorithm on, a request or answer split over
/// two reads waited for the far end's delayed ACK (40 ms), a delay of the
/// harness that no real cluster has, and one that made the borrow's
/// compare-and-swap of a record with more than a few dozen marks cost
/// 40-100 ms instead of about 5 (docs/benchmarks.md).
pub(super) fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = to.set_nodelay(true);
    let mut buf = [0u8; 16384];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A lab of `nodes` agents named `name` reading the API server `k` as the
/// agent's ServiceAccount (`opts` adjusts the lab first), with the
/// directory of its kubeconfig, which must outlive the lab.
pub(super) fn lab_on(
    k: &Cluster,
    name: &str,
    nodes: usize,
    opts: impl FnOnce(&mut LabOptions),
) -> Result<(lab::Cluster, TempDir)> {
    let port = k.port()?;
    let dir = TempDir::new(name)?;
    let kubeconfig = dir.join("agent.kubeconfig");
    let token = k.token_for("kube-system", "starling-agent")?;
    k.kubeconfig_with_token(&token, &kubeconfig)?;
    let mut o = lab::options(name, nodes, Topology::Mesh);
    o.kubeconfig = Some(kubeconfig);
    opts(&mut o);
    let stop = Arc::new(AtomicBool::new(false));
    relay(o.name.clone(), nodes, port, stop.clone());
    let c = lab::Cluster::up(o);
    stop.store(true, Ordering::Relaxed);
    Ok((c?, dir))
}

/// The node namespaces cannot reach the host's loopback, where the API
/// server listens: relay 127.0.0.1:PORT in each node namespace to it, as
/// the namespaces appear.
pub(super) fn relay(lab_name: String, nodes: usize, port: u16, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut done = vec![false; nodes];
        while !stop.load(Ordering::Relaxed) && done.iter().any(|d| !d) {
            for (i, d) in done.iter_mut().enumerate() {
                let ns = format!("{lab_name}-node{}", i + 1);
                if *d || !std::path::Path::new(&format!("/var/run/netns/{ns}")).exists() {
                    continue;
                }
                let Ok(l) = listen_in(&ns, port) else {
                    continue;
                };
                *d = true;
                std::thread::spawn(move || {
                    for conn in l.incoming().flatten() {
                        let Ok(up) = TcpStream::connect(("127.0.0.1", port)) else {
                            continue;
                        };
                        let (a, b) = (conn.try_clone(), up.try_clone());
                        if let (Ok(a), Ok(b)) = (a, b) {
                            std::thread::spawn(move || pipe(a, up));
                            std::thread::spawn(move || pipe(b, conn));
                        }
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

#[test]
fn three_nodes_through_the_api_server() -> Result<()> {
    let k = Cluster::private("e2e")?;
    k.apply_manifests()?;
    let mut yaml = String::from(
        "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.244.0.0/16, blockSize: 26}\n\
         ---\napiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 64512}\n",
    );
    for i in 1..=3 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node{i}\n  annotations:\n    \
             starling.dev/ipv4-address: 192.0.2.{}/24\nspec:\n  podCIDR: 10.244.{i}.0/26\n  podCIDRs: [10.244.{i}.0/26]\n",
            10 + i
        ));
    }
    let out = k.kubectl_stdin(&["apply", "-f", "-"], &yaml);
    super::cluster::checked(&["apply"], out)?;

    let (c, _dir) = lab_on(&k, "k8s", 3, |_| {})?;
    c.converged(Duration::from_secs(60))?;
    c.all_pairs_answer()?;
    for i in 1..=3 {
        let st = c.status(&format!("node{i}"))?;
        ensure!(st.datastore == "kubernetes", "{}", st.datastore);
        let block: ipnet::IpNet = format!("10.244.{i}.0/26").parse()?;
        ensure!(st.blocks.contains(&block), "node{i} holds {:?}", st.blocks);
    }
    let claims = k.kubectl_ok(&[
        "get",
        "blockaffinities",
        "-o",
        "jsonpath={.items[*].spec.cidr}",
    ])?;
    for i in 1..=3 {
        ensure!(
            claims.contains(&format!("10.244.{i}.0/26")),
            "no BlockAffinity for node{i}'s podCIDR: {claims}"
        );
    }
    for n in ["node1", "node2", "node3"] {
        let logs = std::fs::read_to_string(c.dir().join(n).join("agent.log"))?;
        // The API's refusal says "Forbidden" (HTTP 403); a bare "403"
        // would match timestamps.
        ensure!(
            !logs.to_lowercase().contains("forbidden"),
            "{n}: a request was forbidden:\n{logs}"
        );
    }

    // The API server restarts under a continuous ping: the agents resync and
    // no route is withdrawn.
    let from = c.pod("node1")?.netns.clone();
    let to = c.pod("node3")?.ips[0];
    wait_reachable(&from, to)?;
    let ping = Pinger::start(&from, to)?;
    let before: Vec<String> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| c.kernel_routes(n))
        .collect::<Result<_>>()?;
    k.restart_apiserver()?;
    // A change after the restart reaches every agent: they watch again.
    let out = k.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: after-restart}\nspec: {peerIP: 192.0.2.250, asNumber: 64512}\n",
    );
    super::cluster::checked(&["apply"], out)?;
    c.wait_all(
        "the BGPPeer created after the restart planned",
        Duration::from_secs(60),
        |n| {
            Ok(c.status(n)?
                .sessions
                .iter()
                .any(|s| s.peer.to_string() == "192.0.2.250"))
        },
    )?;
    let count = ping.stop()?;
    ensure!(
        count.lost() == 0,
        "lost pings across the API server restart: {count:?}"
    );
    for (i, n) in ["node1", "node2", "node3"].iter().enumerate() {
        let now = c.kernel_routes(n)?;
        for line in before[i].lines() {
            ensure!(
                now.contains(line),
                "{n}: route {line:?} went away during the restart"
            );
        }
    }
    Ok(())
}

/// Routing without BGP through a real API server (`bgpEnabled: false`):
/// Nodes without podCIDRs, so every block is claimed by IPAM as a
/// BlockAffinity object, and the other agents route those blocks from the
/// watched BlockAffinities and Nodes alone (VXLAN Always): no session,
/// every pod reaches every other.
#[test]
fn three_nodes_without_bgp_through_the_api_server() -> Result<()> {
    let k = Cluster::private("e2enobgp")?;
    k.apply_manifests()?;
    let mut yaml = String::from(
        "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.244.0.0/16, blockSize: 26, vxlanMode: Always}\n",
    );
    for i in 1..=3 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node{i}\n  annotations:\n    \
             starling.dev/ipv4-address: 192.0.2.{}/24\n",
            10 + i
        ));
    }
    let out = k.kubectl_stdin(&["apply", "-f", "-"], &yaml);
    super::cluster::checked(&["apply"], out)?;

    let (c, _dir) = lab_on(&k, "k8snb", 3, |o| o.no_bgp = true)?;
    c.converged(Duration::from_secs(60))?;
    let answered = c.all_pairs_answer()?;
    ensure!(answered == 6, "{answered} of 6 pairs answered");
    let claims = k.kubectl_ok(&[
        "get",
        "blockaffinities",
        "-o",
        "jsonpath={.items[*].spec.cidr}",
    ])?;
    for i in 1..=3 {
        let n = format!("node{i}");
        let st = c.status(&n)?;
        ensure!(st.route_source == "datastore", "{n}: {}", st.route_source);
        ensure!(st.sessions.is_empty(), "{n}: sessions {:?}", st.sessions);
        for b in &st.blocks {
            ensure!(
                claims.contains(&b.to_string()),
                "{n}'s block {b} has no BlockAffinity: {claims}"
            );
        }
        ensure!(
            c.kernel_routes(&n)?.contains("dev vxlan.starling"),
            "{n}: no route through vxlan.starling"
        );
    }
    Ok(())
}
