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
