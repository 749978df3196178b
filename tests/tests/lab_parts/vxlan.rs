//! VXLAN in the lab on two subnets joined by a router that knows no pod
//! routes: every pod reaches every other, the encapsulation is proven on the
//! nodes' devices and on the router's forwarding, FDB drift is repaired and
//! an agent restart loses nothing.

use super::*;
use starling_agent::lab::{LabEncapsulation, Underlay};

fn two_subnets(tag: &str, encap: LabEncapsulation) -> Result<Cluster> {
    let mut o = options(tag, 3, Topology::Mesh);
    o.encapsulation = encap;
    o.underlay = Underlay::TwoSubnets;
    let c = Cluster::up(o)?;
    c.converged(CONVERGE)?;
    Ok(c)
}

fn ping_n(c: &Cluster, from: &str, to: &str, n: u32) -> Result<()> {
    let from = c.pod(from)?.netns.clone();
    let to = c.pod(to)?.ips[0].to_string();
    let out = starling_tests::output(
        "ip",
        &[
            "netns",
            "exec",
            &from,
            "ping",
            "-q",
            "-c",
            &n.to_string(),
            "-i",
            "0.02",
            "-W",
            "1",
            &to,
        ],
    )?;
    ensure!(
        out.status.success(),
        "ping {from} -> {to}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// vxlanMode CrossSubnet: node1 and node3 share 192.0.2.0/24, node2 is on
/// 198.51.100.0/24. Same-subnet traffic is plain (vxlan.starling's counter
/// stays flat), cross-subnet traffic is VXLAN (the counter rises and the
/// router forwards UDP 4789, never a plain pod packet).
#[test]
fn vxlan_cross_subnet_on_two_subnets() -> Result<()> {
    let mut c = two_subnets("vxcs", LabEncapsulation::VxlanCrossSubnet)?;
    let answered = c.all_pairs_answer()?;
    ensure!(answered == 6, "{answered} of 6 pairs answered");

    let tx = |c: &Cluster| c.lab.tx_packets("node1", "vxlan.starling");
    let r0 = c.lab.router_counters()?;
    let before = tx(&c)?;
    ping_n(&c, "node1", "node3", 20)?;
    let same = tx(&c)?;
    ensure!(
        same == before,
        "same-subnet traffic went through vxlan.starling ({before} -> {same})"
    );
    ping_n(&c, "node1", "node2", 20)?;
    let cross = tx(&c)?;
    ensure!(
        cross >= same + 20,
        "cross-subnet traffic not encapsulated ({same} -> {cross})"
    );
    let r1 = c.lab.router_counters()?;
    ensure!(
        r1.vxlan >= r0.vxlan + 40,
        "the router forwarded too few VXLAN packets: {r0:?} -> {r1:?}"
    );
    ensure!(
        r1.plain_pod == 0,
        "the router forwarded plain pod packets: {r1:?}"
    );
    let routes = c.kernel_routes("node1")?;
    ensure!(
        routes.contains("dev vxlan.starling") && routes.contains("via 192.0.2.13 dev eth0"),
        "{routes}"
    );

    // FDB drift on a node is repaired by its agent.
    let ns1 = c.lab.node("node1")?.netns.clone();
    let fdb = || {
        starling_tests::run(
            "ip",
            &[
                "netns",
                "exec",
                &ns1,
                "bridge",
                "fdb",
                "show",
                "dev",
                "vxlan.starling",
            ],
        )
    };
    let entry = "02:53:c6:33:64:0c dst 198.51.100.12";
    ensure!(fdb()?.contains(entry), "{}", fdb()?);
    starling_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            &ns1,
            "bridge",
            "fdb",
            "del",
            "02:53:c6:33:64:0c",
            "dev",
            "vxlan.starling",
            "dst",
            "198.51.100.12",
        ],
    )?;
    let took = wait_for("node1's FDB entry for node2 restored", CONVERGE, || {
        Ok(fdb()?.contains(entry))
    })?;
    bench_line(
        "lab-vxlan-fdb-drift",
        "starling",
        "repaired",
        took.as_secs_f64() * 1000.0,
        "ms",
    );
    ping_n(&c, "node1", "node2", 3)?;

    // Agent restart under a 50 pkt/s ping across the subnets: 0 lost.
    let from = c.pod("node1")?.netns.clone();
    let to = c.pod("node2")?.ips[0];
    restart_under_ping(&mut c, "node1", &from, to, "lab-vxlan-agent-restart")?;
    Ok(())
}

/// vxlanMode Always on two subnets: every pair answers and even same-subnet
/// traffic is encapsulated.
#[test]
fn vxlan_always_on_two_subnets() -> Result<()> {
    let c = two_subnets("vxal", LabEncapsulation::Vxlan)?;
    let answered = c.all_pairs_answer()?;
    ensure!(answered == 6, "{answered} of 6 pairs answered");
    let r0 = c.lab.router_counters()?;
    let before = c.lab.tx_packets("node1", "vxlan.starling")?;
    ping_n(&c, "node1", "node3", 20)?;
    let same = c.lab.tx_packets("node1", "vxlan.starling")?;
    ensure!(
        same >= before + 20,
        "same-subnet traffic not encapsulated under Always ({before} -> {same})"
    );
    ping_n(&c, "node1", "node2", 20)?;
    let r1 = c.lab.router_counters()?;
    ensure!(r1.vxlan >= r0.vxlan + 40, "{r0:?} -> {r1:?}");
    ensure!(r1.plain_pod == 0, "{r1:?}");
    Ok(())
}

/// IPv6 pools with vxlanMode Always (`lab up --ipv6 --encapsulation
/// vxlan`): every pod reaches every other over both families; IPv6 pod
/// traffic leaves through `vxlan6.starling` (its counter rises), routed
/// `via <node IPv6> dev vxlan6.starling`.
#[test]
fn vxlan_ipv6_pods_reach_each_other_through_vxlan6() -> Result<()> {
    let mut o = options("vx6", 3, Topology::Mesh);
    o.encapsulation = LabEncapsulation::Vxlan;
    o.ipv6 = true;
    let c = Cluster::up(o)?;
    c.converged(CONVERGE)?;
    let answered = c.all_pairs_answer()?;
    ensure!(
        answered == 12,
        "{answered} of 12 (6 pairs x 2 families) answered"
    );
    let ns1 = c.lab.node("node1")?.netns.clone();
    let routes = starling_tests::run("ip", &["-n", &ns1, "-6", "route", "show", "proto", "73"])?;
    let ll = starling_agent::fib::vtep_link_local("2001:db8::12".parse()?);
    ensure!(
        routes.contains(&format!("via {ll} dev vxlan6.starling")),
        "{routes}"
    );
    let to = c
        .pod("node2")?
        .ips
        .iter()
        .find(|a| a.is_ipv6())
        .copied()
        .context("node2's pod has no IPv6 address")?;
    let from = c.pod("node1")?.netns.clone();
    let before = c.lab.tx_packets("node1", "vxlan6.starling")?;
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
    let after = c.lab.tx_packets("node1", "vxlan6.starling")?;
    ensure!(
        after >= before + 20,
        "IPv6 pod traffic not through vxlan6.starling ({before} -> {after})"
    );

    // Agent restart under an IPv6 ping through vxlan6.starling: the
    // device, routes, FDB and neighbour entries are adopted; 0 lost.
    let mut c = c;
    let ifindex = || -> Result<String> {
        let link =
            starling_tests::run("ip", &["-n", &ns1, "-o", "link", "show", "vxlan6.starling"])?;
        Ok(link.split(':').next().unwrap_or_default().to_string())
    };
    let index_before = ifindex()?;
    restart_under_ping(&mut c, "node1", &from, to, "lab-vxlan6-agent-restart")?;
    ensure!(
        ifindex()? == index_before,
        "vxlan6.starling was made again on restart (ifindex {index_before} -> {})",
        ifindex()?
    );
    Ok(())
}

/// Move `node`'s underlay address to `to` and restart its agent, as an
/// operator does after re-addressing a VM (the agent takes its own address,
/// the VXLAN device's `local`, at start).
fn move_and_restart(c: &mut Cluster, node: &str, to: &str) -> Result<()> {
    c.lab.move_node(node, to.parse()?)?;
    c.lab.kill_agent(node)?;
    c.lab.start_agent(node)?;
    Ok(())
}

/// `node`'s first block's route on `on`, as `ip route` prints it up to the
/// device, e.g. `10.244.1.0/26 via 192.0.2.12 dev eth0`.
fn route_to(c: &Cluster, on: &str, node: &str) -> Result<Option<String>> {
    let block = c.status(node)?.blocks[0].to_string();
    Ok(c.kernel_routes(on)?
        .lines()
        .find(|l| l.starts_with(&format!("{block} ")))
        .map(|l| l.split(" proto ").next().unwrap_or(l).trim().to_string()))
}

/// A node's address changes under vxlanMode CrossSubnet on two subnets and
/// the other nodes re-decide plain or VXLAN: node2 moves from 198.51.100.12
/// to 192.0.2.12 (node1's and node3's subnet), so its routes become plain
/// everywhere and its old VTEP's FDB entries go; then node3 moves from
/// 192.0.2.13 to 198.51.100.13, so its routes become VXLAN. After each move
/// every pod reaches every other, and the counters show which way the
/// traffic went. The moved node's agent is restarted after its move.
#[test]
fn node_address_change_re_decides_cross_subnet() -> Result<()> {
    let mut c = two_subnets("vxmv", LabEncapsulation::VxlanCrossSubnet)?;
    let b2 = c.status("node2")?.blocks[0].to_string();
    ensure!(
        route_to(&c, "node1", "node2")?.as_deref()
            == Some(&format!("{b2} via 198.51.100.12 dev vxlan.starling onlink")[..]),
        "{}",
        c.kernel_routes("node1")?
    );

    // node2 comes onto 192.0.2.0/24: plain from and to everyone.
    move_and_restart(&mut c, "node2", "192.0.2.12/24")?;
    let want = |c: &Cluster, on: &str, to: &str, route: &str| -> Result<bool> {
        Ok(route_to(c, on, to)?.is_some_and(|r| r.ends_with(route)))
    };
    let took = wait_for("every route to and from node2 plain", CONVERGE, || {
        Ok(want(&c, "node1", "node2", "via 192.0.2.12 dev eth0")?
            && want(&c, "node3", "node2", "via 192.0.2.12 dev eth0")?
            && want(&c, "node2", "node1", "via 192.0.2.11 dev eth0")?
            && want(&c, "node2", "node3", "via 192.0.2.13 dev eth0")?
            && !fdb_of(&c, "node1")?.contains("198.51.100.12")
            && !fdb_of(&c, "node3")?.contains("198.51.100.12"))
    })?;
    bench_line(
        "lab-vxlan-node-moved",
        "starling",
        "plain_after_restart",
        took.as_secs_f64() * 1000.0,
        "ms",
    );
    c.converged(CONVERGE)?;
    ensure!(c.all_pairs_answer()? == 6, "not every pair answers");
    let r0 = c.lab.router_counters()?;
    let before = c.lab.tx_packets("node1", "vxlan.starling").unwrap_or(0);
    ping_n(&c, "node1", "node2", 20)?;
    let after = c.lab.tx_packets("node1", "vxlan.starling").unwrap_or(0);
    ensure!(
        after == before,
        "node1 -> node2 went through vxlan.starling after the move ({before} -> {after})"
    );
    ensure!(
        c.lab.router_counters()? == r0,
        "node1 -> node2 crossed the router after the move"
    );

    // node3 goes to 198.51.100.0/24: VXLAN from and to everyone.
    move_and_restart(&mut c, "node3", "198.51.100.13/24")?;
    wait_for("every route to and from node3 VXLAN", CONVERGE, || {
        Ok(want(
            &c,
            "node1",
            "node3",
            "via 198.51.100.13 dev vxlan.starling onlink",
        )? && want(
            &c,
            "node2",
            "node3",
            "via 198.51.100.13 dev vxlan.starling onlink",
        )? && want(
            &c,
            "node3",
            "node1",
            "via 192.0.2.11 dev vxlan.starling onlink",
        )? && want(
            &c,
            "node3",
            "node2",
            "via 192.0.2.12 dev vxlan.starling onlink",
        )?)
    })?;
    c.converged(CONVERGE)?;
    ensure!(c.all_pairs_answer()? == 6, "not every pair answers");
    let r0 = c.lab.router_counters()?;
    let before = c.lab.tx_packets("node1", "vxlan.starling")?;
    ping_n(&c, "node1", "node3", 20)?;
    let after = c.lab.tx_packets("node1", "vxlan.starling")?;
    ensure!(
        after >= before + 20,
        "node1 -> node3 not encapsulated after the move ({before} -> {after})"
    );
    let r1 = c.lab.router_counters()?;
    ensure!(r1.vxlan >= r0.vxlan + 40, "{r0:?} -> {r1:?}");
    ensure!(
        r1.plain_pod == 0,
        "the router forwarded plain pod packets: {r1:?}"
    );
    Ok(())
}

fn fdb_of(c: &Cluster, node: &str) -> Result<String> {
    c.lab.node(node)?;
    // No device (no route needs VXLAN any more): no entries.
    Ok(c.vxlan_fdb(node).unwrap_or_default())
}
