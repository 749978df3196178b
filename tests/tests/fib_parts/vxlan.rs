//! The VXLAN data path in real namespaces: `vxlan.starling`, its FDB and
//! neighbour entries, routes through it, drift, adoption and removal.

use super::*;

fn vxlan_device(ns: &Netns) -> Result<String> {
    ns.ip(&["-d", "link", "show", "vxlan.starling"])
}

fn fdb(ns: &Netns) -> Result<String> {
    ns.exec("bridge", &["fdb", "show", "dev", "vxlan.starling"])
}

fn neigh(ns: &Netns) -> Result<String> {
    ns.ip(&["neigh", "show", "dev", "vxlan.starling"])
}

/// Packets the device sent (`ip -s link`), to see traffic was encapsulated.
fn tx_packets(ns: &Netns, dev: &str) -> Result<u64> {
    let j: Value = serde_json::from_str(&ns.ip(&["-j", "-s", "link", "show", dev])?)?;
    j[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .with_context(|| format!("no tx packet counter for {dev}: {j}"))
}

fn has_entry(text: &str, want: &str) -> bool {
    text.lines().any(|l| l.contains(want))
}

const FDB2: &str = "02:53:c0:00:02:02 dst 192.0.2.2 self permanent";
const NEIGH2: &str = "192.0.2.2 lladdr 02:53:c0:00:02:02 PERMANENT";

#[test]
fn vxlan_routes_carry_pod_traffic_with_fdb_and_neighbours_reconciled() -> Result<()> {
    require_tool("bridge", "iproute2");
    let t = two_nodes()?;
    let mut f1 = FibNode::start(&t.n1, &["--uplink", "up0"])?;
    let mut f2 = FibNode::start(&t.n2, &["--uplink", "up0"])?;
    let vx = |me: u8, other_ip: &str, other: u8, pod_if: &str| {
        vec![
            blackhole(&format!("10.65.{me}.0/26")),
            device(&format!("10.65.{me}.5/32"), pod_if),
            via(&format!("10.65.{other}.0/26"), other_ip, "Vxlan"),
        ]
    };
    let r1 = vx(1, "192.0.2.2", 2, "cali1");
    let s1 = f1.set(&r1)?;
    f2.set(&vx(2, "192.0.2.1", 1, "cali2"))?;

    // The device as Calico makes it, with our derived MAC and the VXLAN MTU.
    let dev = vxlan_device(&t.n1)?;
    for want in [
        "vxlan id 4096",
        "local 192.0.2.1",
        "dev up0",
        "dstport 4789",
        "nolearning",
        "mtu 1450",
        "link/ether 02:53:c0:00:02:01",
    ] {
        assert!(dev.contains(want), "`{want}` missing from:\n{dev}");
    }
    assert_eq!(s1["vxlan"]["state"], "ready", "{s1:#}");
    assert_eq!(s1["vxlan"]["peers"], 1, "{s1:#}");
    let table = routes(&t.n1, &["proto", "73"])?;
    assert!(
        has_line(
            &table,
            "10.65.2.0/26 via 192.0.2.2 dev vxlan.starling onlink"
        ),
        "{table}"
    );
    assert!(has_entry(&fdb(&t.n1)?, FDB2), "{}", fdb(&t.n1)?);
    assert!(has_entry(&neigh(&t.n1)?, NEIGH2), "{}", neigh(&t.n1)?);

    let before = tx_packets(&t.n1, "vxlan.starling")?;
    wait_for("pod 1 to ping pod 2 over VXLAN", WAIT, || {
        ping_ok(&t.p1, "10.65.2.5")
    })?;
    wait_for("pod 2 to ping pod 1", WAIT, || ping_ok(&t.p2, "10.65.1.5"))?;
    let after = tx_packets(&t.n1, "vxlan.starling")?;
    assert!(
        after > before,
        "vxlan.starling sent nothing ({before} -> {after}): not encapsulated"
    );

    // Drift: the netlink subscription repairs FDB and neighbour entries.
    let intact = || -> Result<bool> {
        Ok(has_entry(&fdb(&t.n1)?, FDB2) && has_entry(&neigh(&t.n1)?, NEIGH2))
    };
    let repaired = |what: &str| -> Result<()> {
        let took = wait_for(what, Duration::from_secs(1), &intact).with_context(|| {
            format!(
                "fdb:\n{}\nneigh:\n{}",
                fdb(&t.n1).unwrap_or_default(),
                neigh(&t.n1).unwrap_or_default()
            )
        })?;
        eprintln!("{what}: repaired in {took:?}");
        Ok(())
    };
    t.n1.exec(
        "bridge",
        &[
            "fdb",
            "del",
            "02:53:c0:00:02:02",
            "dev",
            "vxlan.starling",
            "dst",
            "192.0.2.2",
        ],
    )?;
    repaired("deleted FDB entry restored")?;
    t.n1.ip(&["neigh", "del", "192.0.2.2", "dev", "vxlan.starling"])?;
    repaired("deleted neighbour restored")?;
    t.n1.ip(&[
        "neigh",
        "replace",
        "192.0.2.2",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "vxlan.starling",
        "nud",
        "permanent",
    ])?;
    repaired("changed neighbour restored")?;
    // A stray entry of ours is removed.
    t.n1.exec(
        "bridge",
        &[
            "fdb",
            "append",
            "02:53:c6:33:64:07",
            "dev",
            "vxlan.starling",
            "dst",
            "198.51.100.7",
        ],
    )?;
    wait_for("stray FDB entry removed", Duration::from_secs(1), || {
        Ok(!fdb(&t.n1)?.contains("198.51.100.7"))
    })?;
    wait_for("pod 1 still pings pod 2", WAIT, || {
        ping_ok(&t.p1, "10.65.2.5")
    })?;

    // Restart: the device, the entries and the route are adopted, nothing written.
    let ifindex = f1.status()?["vxlan"]["ifindex"].clone();
    f1.daemon.kill();
    let mut f1 = FibNode::start(&t.n1, &["--uplink", "up0"])?;
    let s = f1.set(&r1)?;
    let ls = &s["last_sync"];
    assert_eq!(
        (
            ls["adopted"].as_u64(),
            ls["added"].as_u64(),
            ls["replaced"].as_u64(),
            ls["neighbours_written"].as_u64(),
            ls["neighbours_removed"].as_u64()
        ),
        (Some(3), Some(0), Some(0), Some(0), Some(0)),
        "{s:#}"
    );
    assert_eq!(s["vxlan"]["ifindex"], ifindex, "device made again: {s:#}");

    // Node 2 leaves: its route, FDB and neighbour entries go; with no VXLAN
    // route left, the device goes too.
    let s = f1.set(&r1[..2])?;
    assert_eq!(s["vxlan"]["state"], "not_needed", "{s:#}");
    assert!(
        t.n1.ip(&["link", "show", "vxlan.starling"]).is_err(),
        "vxlan.starling left behind"
    );
    let table = routes(&t.n1, &["proto", "73"])?;
    assert!(!table.contains("10.65.2.0"), "{table}");
    Ok(())
}

#[test]
fn vxlan_cross_subnet_is_plain_on_our_subnet_and_leaving_peers_are_removed() -> Result<()> {
    require_tool("bridge", "iproute2");
    let (n, _peer) = one_node()?;
    let mut f = FibNode::start(&n, &["--uplink", "up0"])?;
    let s = f.set(&[
        via("10.70.2.0/26", "192.0.2.2", "VxlanCrossSubnet"),
        via("10.70.3.0/26", "198.51.100.7", "VxlanCrossSubnet"),
        via("10.70.4.0/26", "198.51.100.8", "Vxlan"),
    ])?;
    let table = routes(&n, &["proto", "73"])?;
    assert!(
        has_line(&table, "10.70.2.0/26 via 192.0.2.2 dev up0"),
        "same subnet must be plain:\n{table}"
    );
    assert!(
        has_line(
            &table,
            "10.70.3.0/26 via 198.51.100.7 dev vxlan.starling onlink"
        ),
        "{table}"
    );
    assert_eq!(s["vxlan"]["peers"], 2, "{s:#}");
    let (fdb_text, neigh_text) = (fdb(&n)?, neigh(&n)?);
    for ip in ["198.51.100.7", "198.51.100.8"] {
        assert!(
            fdb_text.contains(&format!("dst {ip} self permanent")),
            "{fdb_text}"
        );
        assert!(neigh_text.contains(&format!("{ip} lladdr")), "{neigh_text}");
    }
    // Plain peers get no entries.
    assert!(!fdb_text.contains("192.0.2.2"), "{fdb_text}");

    // One remote node leaves: its entries go, the other's stay.
    f.set(&[
        via("10.70.2.0/26", "192.0.2.2", "VxlanCrossSubnet"),
        via("10.70.3.0/26", "198.51.100.7", "VxlanCrossSubnet"),
    ])?;
    let (fdb_text, neigh_text) = (fdb(&n)?, neigh(&n)?);
    assert!(!fdb_text.contains("198.51.100.8"), "{fdb_text}");
    assert!(!neigh_text.contains("198.51.100.8"), "{neigh_text}");
    assert!(fdb_text.contains("dst 198.51.100.7"), "{fdb_text}");

    // Our uplink joins the other subnet: that route becomes plain, and
    // with no VXLAN route left the device is removed.
    n.ip(&["addr", "add", "198.51.100.1/24", "dev", "up0"])?;
    wait_for("CrossSubnet re-decided to plain", WAIT, || {
        Ok(has_line(
            &routes(&n, &["proto", "73"])?,
            "10.70.3.0/26 via 198.51.100.7 dev up0",
        ))
    })?;
    wait_for("vxlan.starling removed once unused", WAIT, || {
        Ok(n.ip(&["link", "show", "vxlan.starling"]).is_err())
    })?;

    // And back: the address goes, the node is across subnets again, the
    // route is VXLAN again through a device made anew.
    n.ip(&["addr", "del", "198.51.100.1/24", "dev", "up0"])?;
    wait_for("CrossSubnet re-decided to VXLAN", WAIT, || {
        Ok(has_line(
            &routes(&n, &["proto", "73"])?,
            "10.70.3.0/26 via 198.51.100.7 dev vxlan.starling onlink",
        ))
    })?;
    assert!(
        fdb(&n)?.contains("dst 198.51.100.7 self permanent"),
        "{}",
        fdb(&n)?
    );
    Ok(())
}

/// IPv6 pools: a second device, `vxlan6.starling`, over the IPv6 underlay,
/// with its own FDB and neighbour entries, repaired when deleted and
/// removed with the last route that needs it.
#[test]
fn ipv6_vxlan_has_its_own_device_fdb_and_neighbours() -> Result<()> {
    require_tool("bridge", "iproute2");
    let (n, _peer) = one_node()?;
    let mut f = FibNode::start(&n, &["--uplink", "up0"])?;
    let s = f.set(&[via("2001:db8:70::/64", "2001:db8:1::2", "Vxlan")])?;
    assert_eq!(s["vxlan6"]["state"], "ready", "{s:#}");
    assert_eq!(s["vxlan6"]["peers"], 1, "{s:#}");
    assert_eq!(s["vxlan"]["state"], "not_needed", "{s:#}");
    let dev = n.ip(&["-d", "link", "show", "vxlan6.starling"])?;
    for want in [
        "vxlan id 4096",
        "local 2001:db8:1::1",
        "dev up0",
        "dstport 4789",
        "nolearning",
        "mtu 1430",
    ] {
        assert!(dev.contains(want), "`{want}` missing from:\n{dev}");
    }
    // Via the VTEP's link-local address: the kernel refuses an IPv6
    // onlink gateway that is on-link on another device (up0).
    let ll = starling_agent::fib::vtep_link_local("2001:db8:1::2".parse()?);
    let table = routes(&n, &["-6", "proto", "73"])?;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&format!("2001:db8:70::/64 via {ll} dev vxlan6.starling"))),
        "{table}\n{s:#}"
    );
    let mac = starling_agent::fib::vtep_mac_v6("2001:db8:1::2".parse()?)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let fdb6 = || n.exec("bridge", &["fdb", "show", "dev", "vxlan6.starling"]);
    let neigh6 = || n.ip(&["-6", "neigh", "show", "dev", "vxlan6.starling"]);
    let fdb_entry = format!("{mac} dst 2001:db8:1::2 self permanent");
    let neigh_entry = format!("{ll} lladdr {mac} PERMANENT");
    assert!(has_entry(&fdb6()?, &fdb_entry), "{}", fdb6()?);
    assert!(has_entry(&neigh6()?, &neigh_entry), "{}", neigh6()?);

    n.exec(
        "bridge",
        &[
            "fdb",
            "del",
            &mac,
            "dev",
            "vxlan6.starling",
            "dst",
            "2001:db8:1::2",
        ],
    )?;
    n.ip(&[
        "-6",
        "neigh",
        "del",
        &ll.to_string(),
        "dev",
        "vxlan6.starling",
    ])?;
    wait_for("IPv6 FDB and neighbour entries restored", WAIT, || {
        Ok(has_entry(&fdb6()?, &fdb_entry) && has_entry(&neigh6()?, &neigh_entry))
    })?;

    let s = f.set(&[])?;
    assert_eq!(s["vxlan6"]["state"], "not_needed", "{s:#}");
    assert!(
        n.ip(&["link", "show", "vxlan6.starling"]).is_err(),
        "vxlan6.starling left behind"
    );
    Ok(())
}
