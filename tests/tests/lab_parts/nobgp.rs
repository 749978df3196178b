//! Routing without BGP (`bgpEnabled: false`, `lab up --no-bgp`): no node
//! opens a BGP port or makes a session, the other nodes' blocks come from
//! the shared claim file and the model, and VXLAN CrossSubnet carries them
//! across the two subnets. Every pod reaches every other; a node joins and
//! leaves; an agent restart loses nothing.

use super::*;
use starling_agent::lab::{LabEncapsulation, Underlay};

/// Nothing of BGP on a node: the status says the routes come from the
/// datastore, there are no sessions, and nothing listens on TCP 179.
fn no_bgp_on(c: &Cluster, node: &str) -> Result<()> {
    let st = c.status(node)?;
    ensure!(
        st.route_source == "datastore",
        "{node}: route source {:?}",
        st.route_source
    );
    ensure!(st.sessions.is_empty(), "{node}: sessions {:?}", st.sessions);
    let ns = c.lab.node(node)?.netns.clone();
    let listening = starling_tests::run(
        "ip",
        &["netns", "exec", &ns, "ss", "-Hltn", "sport", "=", ":179"],
    )?;
    ensure!(
        listening.trim().is_empty(),
        "{node}: something listens on TCP 179: {listening}"
    );
    Ok(())
}

#[test]
fn no_bgp_vxlan_cross_subnet_join_leave_restart() -> Result<()> {
    let mut o = options("nobgp", 3, Topology::Mesh);
    o.encapsulation = LabEncapsulation::VxlanCrossSubnet;
    o.underlay = Underlay::TwoSubnets;
    o.no_bgp = true;
    let mut c = Cluster::up(o)?;
    c.converged(CONVERGE)?;
    for n in ["node1", "node2", "node3"] {
        no_bgp_on(&c, n)?;
    }
    let answered = c.all_pairs_answer()?;
    ensure!(answered == 6, "{answered} of 6 pairs answered");

    // node1 and node3 share 192.0.2.0/24: plain; node2 is across: VXLAN.
    let routes = c.kernel_routes("node1")?;
    let node2_block = c.status("node2")?.blocks[0].to_string();
    ensure!(
        routes.contains(&format!(
            "{node2_block} via 198.51.100.12 dev vxlan.starling"
        )) && routes.contains("via 192.0.2.13 dev eth0"),
        "{routes}"
    );
    let before = c.lab.tx_packets("node1", "vxlan.starling")?;
    let r0 = c.lab.router_counters()?;
    let to = c.pod("node2")?.ips[0];
    let from = c.pod("node1")?.netns.clone();
    starling_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            &from,
            "ping",
            "-q",
            "-c",
            "20",
            "-i",
            "0.02",
            "-W",
            "1",
            &to.to_string(),
        ],
    )?;
    let after = c.lab.tx_packets("node1", "vxlan.starling")?;
    ensure!(
        after >= before + 20,
        "cross-subnet traffic not encapsulated ({before} -> {after})"
    );
    let r1 = c.lab.router_counters()?;
    ensure!(r1.vxlan >= r0.vxlan + 40, "{r0:?} -> {r1:?}");
    ensure!(r1.plain_pod == 0, "{r1:?}");

    // A node joins (on node2's subnet): its claim reaches every node.
    c.lab.add_node(4)?;
    c.lab.add_pod("node4", "pod1")?;
    no_bgp_on(&c, "node4")?;
    c.converged(CONVERGE).context("after node4 joined")?;
    let answered = c.all_pairs_answer()?;
    ensure!(answered == 12, "{answered} of 12 pairs answered with node4");

    // node2 leaves the model: its routes, FDB and neighbour entries go.
    let node2_blocks = c.status("node2")?.blocks.clone();
    c.lab.remove_node("node2")?;
    let took = c.wait_all("node2's blocks and VTEP gone", CONVERGE, |n| {
        let routes = c.kernel_routes(n)?;
        let routes_gone = node2_blocks
            .iter()
            .all(|b| !routes.contains(&format!("{b} ")));
        Ok(routes_gone && !c.vxlan_fdb(n)?.contains("198.51.100.12"))
    })?;
    bench_line(
        "lab-no-bgp-node-left",
        "starling",
        "routes_gone_after_model_change",
        took.as_secs_f64() * 1000.0,
        "ms",
    );
    let answered = c.all_pairs_answer()?;
    ensure!(
        answered == 6,
        "{answered} of 6 pairs answered without node2"
    );

    // Agent restart under a 50 pkt/s ping across the subnets: 0 lost.
    let from = c.pod("node1")?.netns.clone();
    let to = c.pod("node4")?.ips[0];
    wait_reachable(&from, to)?;
    restart_under_ping(&mut c, "node1", &from, to, "lab-no-bgp-agent-restart")?;
    Ok(())
}

/// `--no-bgp` with a top-of-rack router is refused before anything is made.
#[test]
fn no_bgp_with_a_tor_is_refused() -> Result<()> {
    let mut o = options("nobgpt", 2, Topology::Mesh);
    o.no_bgp = true;
    o.tor = Some(starling_agent::lab::Tor::Bird);
    let Err(e) = Cluster::up(o) else {
        anyhow::bail!("--no-bgp with --tor was accepted");
    };
    ensure!(format!("{e:#}").contains("--no-bgp and --tor"), "{e:#}");
    Ok(())
}
