//! System tests of the FIB reconciler (agent/src/fib): each test builds
//! nodes and pods as network namespaces, runs the reconciler inside a node
//! (`fib-node`, the reconciler alone, fed desired routes on stdin), and checks
//! the kernel's tables and real traffic.

use std::io::Write;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use starling_tests::{Daemon, Netns, TempDir, output, require_tool, veth, wait_for};

const FIB_NODE: &str = env!("CARGO_BIN_EXE_fib-node");
const WAIT: Duration = Duration::from_secs(10);

fn blackhole(dst: &str) -> Value {
    json!({"dst": dst, "target": "blackhole"})
}

fn device(dst: &str, ifname: &str) -> Value {
    json!({"dst": dst, "target": {"device": ifname}})
}

fn via(dst: &str, gw: &str, encap: &str) -> Value {
    json!({"dst": dst, "target": {"via": [{"gateway": gw, "encap": encap}]}})
}

fn ecmp(dst: &str, gws: &[&str]) -> Value {
    let hops: Vec<Value> = gws
        .iter()
        .map(|g| json!({"gateway": g, "encap": "None"}))
        .collect();
    json!({"dst": dst, "target": {"via": hops}})
}

/// The reconciler running inside one node namespace.
struct FibNode {
    daemon: Daemon,
    stdin: ChildStdin,
    status: PathBuf,
    log: PathBuf,
    generation: u64,
    _dir: TempDir,
}

impl FibNode {
    fn start(ns: &Netns, args: &[&str]) -> Result<FibNode> {
        let dir = TempDir::new("fib")?;
        let status = dir.join("status.json");
        let log = dir.join("fib-node.log");
        let mut cmd = ns.command(FIB_NODE);
        cmd.args(args).arg("--status").arg(&status);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {FIB_NODE}"))?;
        let stdin = child.stdin.take().context("fib-node stdin")?;
        let daemon = Daemon {
            name: format!("fib-node in {}", ns.name),
            child,
        };
        Ok(FibNode {
            daemon,
            stdin,
            status,
            log,
            generation: 0,
            _dir: dir,
        })
    }

    /// Hand over a desired set and wait until the reconciler has applied it.
    fn set(&mut self, routes: &[Value]) -> Result<Value> {
        writeln!(self.stdin, "{}", Value::Array(routes.to_vec()))?;
        self.stdin.flush()?;
        self.generation += 1;
        let g = self.generation;
        self.wait(&format!("desired set {g} applied"), |s| {
            s["generation"].as_u64() == Some(g)
        })
    }

    fn status(&self) -> Result<Value> {
        let body = std::fs::read(&self.status)
            .with_context(|| format!("reading {}", self.status.display()))?;
        Ok(serde_json::from_slice(&body)?)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn wait(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let mut last = Value::Null;
        let r = wait_for(what, WAIT, || {
            self.daemon.check_alive()?;
            last = self.status()?;
            Ok(pred(&last))
        });
        match r {
            Ok(_) => Ok(last),
            Err(e) => bail!(
                "{e:#}\nlast status: {last:#}\nfib-node log:\n{}",
                self.log_tail()
            ),
        }
    }
}

/// Routes in `ns` as `ip route show <args>` prints them (`-6` first for IPv6).
fn routes(ns: &Netns, args: &[&str]) -> Result<String> {
    let (family, rest) = match args.split_first() {
        Some((&"-6", rest)) => (vec!["-6"], rest),
        _ => (vec![], args),
    };
    let mut a = family;
    a.extend_from_slice(&["route", "show"]);
    a.extend_from_slice(rest);
    ns.ip(&a)
}

fn has_line(text: &str, want: &str) -> bool {
    text.lines().any(|l| l.trim_end() == want)
}

/// A pod: its own namespace on a veth whose host side is `host_if` in `node`,
/// with `addr` (a /32 or /128) and Calico's made-up gateways.
fn pod(node: &Netns, tag: &str, host_if: &str, addrs: &[&str]) -> Result<Netns> {
    let p = Netns::new(tag)?;
    veth(node, host_if, "", &p, "eth0", "")?;
    for a in addrs {
        if a.contains(':') {
            p.ip(&["addr", "add", a, "dev", "eth0", "nodad"])?;
        } else {
            p.ip(&["addr", "add", a, "dev", "eth0"])?;
        }
    }
    if addrs.iter().any(|a| !a.contains(':')) {
        p.ip(&[
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        p.ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
    }
    if addrs.iter().any(|a| a.contains(':')) {
        node.ip(&["addr", "add", "fe80::1/64", "dev", host_if, "nodad"])?;
        p.ip(&[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ])?;
    }
    Ok(p)
}

fn ping_ok(from: &Netns, dst: &str) -> Result<bool> {
    let out = from.exec_output("ping", &["-c", "1", "-W", "1", dst])?;
    Ok(out.status.success())
}

/// Whether this kernel can make ipip devices (the development machine's cannot).
fn kernel_has_ipip() -> Result<bool> {
    let probe = Netns::new("ipipprobe")?;
    Ok(probe
        .ip(&[
            "link",
            "add",
            "stprobe0",
            "type",
            "ipip",
            "local",
            "192.0.2.1",
            "remote",
            "192.0.2.2",
        ])
        .is_ok())
}

/// Two nodes on one /24 (up0: 192.0.2.1 and .2), each with one pod.
struct TwoNodes {
    n1: Netns,
    n2: Netns,
    p1: Netns,
    p2: Netns,
}

fn two_nodes() -> Result<TwoNodes> {
    require_tool("ping", "iputils-ping");
    let n1 = Netns::new("n1")?;
    let n2 = Netns::new("n2")?;
    veth(
        &n1,
        "up0",
        "192.0.2.1/24,2001:db8:1::1/64",
        &n2,
        "up0",
        "192.0.2.2/24,2001:db8:1::2/64",
    )?;
    // proxy_arp only answers for gateways the node can route; a default
    // route makes 169.254.1.1 routable, as on a real host.
    n1.ip(&["route", "add", "default", "via", "192.0.2.2"])?;
    n2.ip(&["route", "add", "default", "via", "192.0.2.1"])?;
    let p1 = pod(
        &n1,
        "p1",
        "cali1",
        &["10.65.1.5/32", "2001:db8:65:1::5/128"],
    )?;
    let p2 = pod(
        &n2,
        "p2",
        "cali2",
        &["10.65.2.5/32", "2001:db8:65:2::5/128"],
    )?;
    Ok(TwoNodes { n1, n2, p1, p2 })
}

fn node_routes(me: u8, other_ip: &str, other: u8, pod_if: &str) -> Vec<Value> {
    vec![
        blackhole(&format!("10.65.{me}.0/26")),
        device(&format!("10.65.{me}.5/32"), pod_if),
        via(&format!("10.65.{other}.0/26"), other_ip, "None"),
    ]
}

#[test]
fn host_gw_routes_carry_pod_traffic_and_off_link_next_hops_are_reported() -> Result<()> {
    let t = two_nodes()?;
    let mut f1 = FibNode::start(&t.n1, &["--uplink", "up0"])?;
    let mut f2 = FibNode::start(&t.n2, &["--uplink", "up0"])?;
    let mut r1 = node_routes(1, "192.0.2.2", 2, "cali1");
    // Not on up0's subnet: host-gw cannot reach it.
    r1.push(via("10.99.0.0/26", "198.51.100.9", "None"));
    let s1 = f1.set(&r1)?;
    f2.set(&node_routes(2, "192.0.2.1", 1, "cali2"))?;

    let table = routes(&t.n1, &["proto", "73"])?;
    for want in [
        "blackhole 10.65.1.0/26",
        "10.65.1.5 dev cali1 scope link",
        "10.65.2.0/26 via 192.0.2.2 dev up0",
    ] {
        assert!(has_line(&table, want), "missing `{want}` in:\n{table}");
    }
    assert!(
        !table.contains("10.99.0.0"),
        "a route with an off-link next hop was installed:\n{table}"
    );
    assert_eq!(s1["installed"], 3, "{s1:#}");
    let unreachable = s1["unreachable"].as_array().context("unreachable")?;
    assert!(
        unreachable.iter().any(|p| p["dst"] == "10.99.0.0/26"
            && p["gateway"] == "198.51.100.9"
            && p["reason"].as_str().unwrap_or("").contains("not on-link")),
        "{s1:#}"
    );
    // The sysctls host-gw pods need, set and reported.
    let sysctls = s1["sysctls"].as_array().context("sysctls")?;
    for key in ["net.ipv4.ip_forward", "net.ipv4.conf.cali1.proxy_arp"] {
        assert!(
            sysctls
                .iter()
                .any(|s| s["key"] == key && s["value"] == "1" && s["error"].is_null()),
            "{key}: {s1:#}"
        );
    }
    assert_eq!(
        t.n1.exec("cat", &["/proc/sys/net/ipv4/conf/cali1/proxy_arp"])?
            .trim(),
        "1"
    );
    assert_eq!(
        t.n1.exec("cat", &["/proc/sys/net/ipv4/ip_forward"])?.trim(),
        "1"
    );

    wait_for("pod 1 to ping pod 2 across the nodes", WAIT, || {
        ping_ok(&t.p1, "10.65.2.5")
    })?;
    wait_for("pod 2 to ping pod 1", WAIT, || ping_ok(&t.p2, "10.65.1.5"))?;
    // The blackhole drops traffic to unused addresses of the block instead of bouncing it.
    let out =
        t.p2.exec_output("ping", &["-c", "1", "-W", "1", "10.65.1.9"])?;
    assert!(
        !out.status.success(),
        "an unused address of a local block answered"
    );
    Ok(())
}

#[test]
fn ipv6_next_hop_routes_pods_and_blackholes() -> Result<()> {
    let t = two_nodes()?;
    let mut f1 = FibNode::start(&t.n1, &["--uplink", "up0"])?;
    let mut f2 = FibNode::start(&t.n2, &["--uplink", "up0"])?;
    let v6 = |me: u8, other: u8, other_ip: &str, pod_if: &str| {
        vec![
            blackhole(&format!("2001:db8:65:{me}::/122")),
            device(&format!("2001:db8:65:{me}::5/128"), pod_if),
            via(&format!("2001:db8:65:{other}::/122"), other_ip, "None"),
        ]
    };
    let s1 = f1.set(&v6(1, 2, "2001:db8:1::2", "cali1"))?;
    f2.set(&v6(2, 1, "2001:db8:1::1", "cali2"))?;
    assert_eq!(s1["installed"], 3, "{s1:#}");
    let table = routes(&t.n1, &["-6", "proto", "73"])?;
    for want in [
        "blackhole 2001:db8:65:1::/122 dev lo metric 1024 pref medium",
        "2001:db8:65:1::5 dev cali1 metric 1024 pref medium",
    ] {
        assert!(has_line(&table, want), "missing `{want}` in:\n{table}");
    }
    assert!(
        table.contains("2001:db8:65:2::/122 via 2001:db8:1::2 dev up0"),
        "{table}"
    );
    let sysctls = s1["sysctls"].as_array().context("sysctls")?;
    assert!(
        sysctls
            .iter()
            .any(|s| s["key"] == "net.ipv6.conf.all.forwarding" && s["value"] == "1"),
        "{s1:#}"
    );
    wait_for("pod 1 to ping pod 2 over IPv6", WAIT, || {
        ping_ok(&t.p1, "2001:db8:65:2::5")
    })?;
    // A second pass over an unchanged table adopts everything and writes nothing.
    let s = f1.set(&v6(1, 2, "2001:db8:1::2", "cali1"))?;
    let ls = &s["last_sync"];
    assert_eq!(
        (
            ls["adopted"].as_u64(),
            ls["added"].as_u64(),
            ls["replaced"].as_u64()
        ),
        (Some(3), Some(0), Some(0)),
        "{s:#}"
    );
    Ok(())
}

/// One node whose uplink `up0` (192.0.2.1/24, 2001:db8:1::1/64) leads to a peer namespace.
fn one_node() -> Result<(Netns, Netns)> {
    let n = Netns::new("node")?;
    let peer = Netns::new("peer")?;
    veth(
        &n,
        "up0",
        "192.0.2.1/24,2001:db8:1::1/64",
        &peer,
        "eth0",
        "192.0.2.2/24,198.51.100.7/24,2001:db8:1::2/64",
    )?;
    Ok((n, peer))
}

#[test]
fn ecmp_routes_are_installed_and_changed_in_place() -> Result<()> {
    let (n, _peer) = one_node()?;
    let mut f = FibNode::start(&n, &["--uplink", "up0"])?;
    f.set(&[
        ecmp("10.80.0.0/24", &["192.0.2.3", "192.0.2.2"]),
        ecmp("2001:db8:80::/64", &["2001:db8:1::2", "2001:db8:1::3"]),
    ])?;
    let v4 = routes(&n, &["10.80.0.0/24"])?;
    assert!(v4.contains("10.80.0.0/24 proto 73"), "{v4}");
    for gw in ["192.0.2.2", "192.0.2.3"] {
        assert!(
            v4.contains(&format!("nexthop via {gw} dev up0 weight 1")),
            "{gw} missing:\n{v4}"
        );
    }
    let v6 = routes(&n, &["-6", "2001:db8:80::/64"])?;
    for gw in ["2001:db8:1::2", "2001:db8:1::3"] {
        assert!(
            v6.contains(&format!("nexthop via {gw} dev up0 weight 1")),
            "{gw} missing:\n{v6}"
        );
    }

    // A third path: the route is replaced, not deleted and re-added.
    let s = f.set(&[
        ecmp("10.80.0.0/24", &["192.0.2.2", "192.0.2.3", "192.0.2.4"]),
        ecmp("2001:db8:80::/64", &["2001:db8:1::2", "2001:db8:1::3"]),
    ])?;
    assert_eq!(
        (
            s["last_sync"]["replaced"].as_u64(),
            s["last_sync"]["removed"].as_u64()
        ),
        (Some(1), Some(0)),
        "{s:#}"
    );
    let v4 = routes(&n, &["10.80.0.0/24"])?;
    assert_eq!(v4.matches("nexthop via").count(), 3, "{v4}");

    // Down to one path: a plain route again.
    f.set(&[via("10.80.0.0/24", "192.0.2.4", "None")])?;
    let v4 = routes(&n, &["10.80.0.0/24"])?;
    assert!(
        has_line(&v4, "10.80.0.0/24 via 192.0.2.4 dev up0 proto 73"),
        "{v4}"
    );
    assert_eq!(
        routes(&n, &["-6", "proto", "73"])?,
        "",
        "the IPv6 ECMP route should be gone"
    );
    Ok(())
}

#[test]
fn foreign_routes_are_never_touched() -> Result<()> {
    let (n, _peer) = one_node()?;
    // Present before we start: Calico's identical route, a static one, ours
    // in another table, a stale one of ours, BIRD's identical IPv6 blackhole.
    n.ip(&[
        "route",
        "add",
        "10.90.1.0/24",
        "via",
        "192.0.2.2",
        "dev",
        "up0",
        "proto",
        "80",
    ])?;
    n.ip(&[
        "route",
        "add",
        "10.90.2.0/24",
        "via",
        "192.0.2.2",
        "dev",
        "up0",
        "proto",
        "static",
    ])?;
    n.ip(&[
        "route",
        "add",
        "10.90.3.0/24",
        "via",
        "192.0.2.2",
        "dev",
        "up0",
        "proto",
        "73",
        "table",
        "100",
    ])?;
    n.ip(&[
        "route",
        "add",
        "10.90.4.0/24",
        "via",
        "192.0.2.2",
        "dev",
        "up0",
        "proto",
        "73",
    ])?;
    n.ip(&[
        "route",
        "add",
        "blackhole",
        "2001:db8:90::/64",
        "proto",
        "12",
    ])?;
    let before_static = routes(&n, &["10.90.2.0/24"])?;
    let before_t100 = routes(&n, &["table", "100"])?;

    let mut f = FibNode::start(&n, &["--uplink", "up0", "--resync-ms", "300"])?;
    let desired = [
        via("10.90.1.0/24", "192.0.2.2", "None"),
        via("10.90.5.0/24", "192.0.2.2", "None"),
        blackhole("2001:db8:90::/64"),
    ];
    let s = f.set(&desired)?;
    let syncs = s["syncs"].as_u64().unwrap_or(0);
    // Let the periodic resync run twice over the foreign routes.
    f.wait("two more resyncs", |s| {
        s["syncs"].as_u64().unwrap_or(0) >= syncs + 2
    })?;
    let s = f.status()?;

    let main = routes(&n, &[])?;
    assert!(
        has_line(&main, "10.90.1.0/24 via 192.0.2.2 dev up0 proto 80"),
        "Calico's route changed:\n{main}"
    );
    assert!(
        !main.contains("10.90.1.0/24 via 192.0.2.2 dev up0 proto 73"),
        "{main}"
    );
    assert_eq!(routes(&n, &["10.90.2.0/24"])?, before_static);
    assert_eq!(
        routes(&n, &["table", "100"])?,
        before_t100,
        "our protocol in another table is not ours"
    );
    assert!(
        !main.contains("10.90.4.0/24"),
        "stale route of ours survived start-up:\n{main}"
    );
    assert!(
        has_line(&main, "10.90.5.0/24 via 192.0.2.2 dev up0 proto 73"),
        "{main}"
    );
    let v6 = routes(&n, &["-6", "2001:db8:90::/64"])?;
    assert!(v6.contains("proto bird"), "BIRD's blackhole changed:\n{v6}");
    assert!(!v6.contains("proto 73"), "{v6}");
    let conflicts = s["conflicts"].as_array().context("conflicts")?;
    assert!(
        conflicts.contains(&json!("10.90.1.0/24"))
            && conflicts.contains(&json!("2001:db8:90::/64")),
        "{s:#}"
    );

    // Once the other protocol's route is gone, ours takes the place.
    n.ip(&["route", "del", "10.90.1.0/24", "proto", "80"])?;
    wait_for("our route in the freed place", WAIT, || {
        Ok(has_line(
            &routes(&n, &["10.90.1.0/24"])?,
            "10.90.1.0/24 via 192.0.2.2 dev up0 proto 73",
        ))
    })?;
    Ok(())
}

#[test]
fn drift_is_repaired_within_a_second() -> Result<()> {
    let (n, _peer) = one_node()?;
    let _p = pod(&n, "pd", "cali9", &["10.91.0.5/32"])?;
    // Default resync (90 s): only the netlink subscription can repair in time.
    let mut f = FibNode::start(&n, &["--uplink", "up0"])?;
    f.set(&[
        blackhole("10.91.0.0/26"),
        device("10.91.0.5/32", "cali9"),
        via("10.91.1.0/24", "192.0.2.2", "None"),
    ])?;
    let all = || routes(&n, &["proto", "73"]);
    let intact = |t: &str| {
        has_line(t, "blackhole 10.91.0.0/26")
            && has_line(t, "10.91.0.5 dev cali9 scope link")
            && has_line(t, "10.91.1.0/24 via 192.0.2.2 dev up0")
    };
    assert!(intact(&all()?), "{}", all()?);
    let repaired = |what: &str| -> Result<()> {
        let took = wait_for(what, Duration::from_secs(1), || Ok(intact(&all()?)))
            .with_context(|| format!("table now:\n{}", all().unwrap_or_default()))?;
        eprintln!("{what}: repaired in {took:?}");
        Ok(())
    };

    n.ip(&["route", "del", "10.91.1.0/24", "proto", "73"])?;
    repaired("deleted next-hop route restored")?;
    n.ip(&[
        "route",
        "replace",
        "10.91.1.0/24",
        "via",
        "198.51.100.7",
        "dev",
        "up0",
        "onlink",
        "proto",
        "73",
    ])?;
    repaired("changed next-hop route restored")?;
    n.ip(&["route", "del", "blackhole", "10.91.0.0/26"])?;
    repaired("deleted blackhole restored")?;
    // A pod device going down takes its route with it (no route event from
    // the kernel); the link event brings it back once the device is up.
    n.ip(&["link", "set", "cali9", "down"])?;
    wait_for("kernel to drop the pod route", WAIT, || {
        Ok(!all()?.contains("10.91.0.5"))
    })?;
    n.ip(&["link", "set", "cali9", "up"])?;
    repaired("pod route restored after link up")?;
    Ok(())
}

#[test]
fn cross_subnet_is_plain_on_our_subnet_and_redecided_when_addresses_change() -> Result<()> {
    let (n, _peer) = one_node()?;
    let ipip = kernel_has_ipip()?;
    let mut f = FibNode::start(&n, &["--uplink", "up0"])?;
    let s = f.set(&[
        via("10.66.2.0/26", "192.0.2.2", "CrossSubnet"),
        via("10.66.3.0/26", "198.51.100.7", "CrossSubnet"),
    ])?;
    let table = routes(&n, &["proto", "73"])?;
    assert!(
        has_line(&table, "10.66.2.0/26 via 192.0.2.2 dev up0"),
        "same subnet must be plain:\n{table}"
    );
    if ipip {
        assert!(
            has_line(&table, "10.66.3.0/26 via 198.51.100.7 dev tunl0 onlink"),
            "{table}"
        );
    } else {
        assert!(!table.contains("10.66.3.0/26"), "{table}");
        assert_eq!(s["ipip"]["state"], "unavailable", "{s:#}");
    }

    // Our uplink joins the other subnet: the route becomes plain.
    n.ip(&["addr", "add", "198.51.100.1/24", "dev", "up0"])?;
    wait_for(
        "CrossSubnet re-decided to plain after an address change",
        WAIT,
        || {
            Ok(has_line(
                &routes(&n, &["proto", "73"])?,
                "10.66.3.0/26 via 198.51.100.7 dev up0",
            ))
        },
    )?;
    // And leaves it again: back to IPIP (or not installable without ipip).
    n.ip(&["addr", "del", "198.51.100.1/24", "dev", "up0"])?;
    wait_for(
        "CrossSubnet re-decided after the address went away",
        WAIT,
        || {
            let t = routes(&n, &["proto", "73"])?;
            Ok(if ipip {
                has_line(&t, "10.66.3.0/26 via 198.51.100.7 dev tunl0 onlink")
            } else {
                !t.contains("10.66.3.0/26")
            })
        },
    )?;
    Ok(())
}

#[test]
fn missing_ipip_module_is_a_clear_error_and_other_modes_keep_working() -> Result<()> {
    let (n, _peer) = one_node()?;
    if kernel_has_ipip()? {
        // This kernel has IPIP; the VM test covers the tunnel itself.
        eprintln!("kernel has ipip: nothing missing to report here");
        return Ok(());
    }
    let mut f = FibNode::start(&n, &["--uplink", "up0"])?;
    let s = f.set(&[
        blackhole("10.67.0.0/26"),
        via("10.67.1.0/26", "192.0.2.2", "None"),
        via("10.67.2.0/26", "198.51.100.7", "Ipip"),
    ])?;
    let err = s["ipip"]["error"].as_str().unwrap_or_default();
    assert_eq!(s["ipip"]["state"], "unavailable", "{s:#}");
    assert!(
        err.contains("kernel module `ipip`") && err.contains("Ipip"),
        "unclear error: {err}"
    );
    let unreachable = s["unreachable"].as_array().context("unreachable")?;
    assert!(
        unreachable
            .iter()
            .any(|p| p["dst"] == "10.67.2.0/26" && p["reason"] == err),
        "{s:#}"
    );
    let table = routes(&n, &["proto", "73"])?;
    assert!(has_line(&table, "blackhole 10.67.0.0/26"), "{table}");
    assert!(
        has_line(&table, "10.67.1.0/26 via 192.0.2.2 dev up0"),
        "{table}"
    );
    assert!(!table.contains("10.67.2.0"), "{table}");
    assert_eq!(s["installed"], 2, "{s:#}");
    Ok(())
}

#[test]
fn restart_adopts_routes_without_disruption() -> Result<()> {
    let t = two_nodes()?;
    let mut f1 = FibNode::start(&t.n1, &["--uplink", "up0"])?;
    let mut f2 = FibNode::start(&t.n2, &["--uplink", "up0"])?;
    let r1 = node_routes(1, "192.0.2.2", 2, "cali1");
    f1.set(&r1)?;
    f2.set(&node_routes(2, "192.0.2.1", 1, "cali2"))?;
    wait_for("pod 1 to ping pod 2", WAIT, || ping_ok(&t.p1, "10.65.2.5"))?;

    // Every route event in node 1 from now on.
    let dir = TempDir::new("fibmon")?;
    let mon_path = dir.join("monitor.txt");
    let mut mon_cmd = Command::new("ip");
    mon_cmd
        .args(["-n", &t.n1.name, "monitor", "route"])
        .stdout(std::fs::File::create(&mon_path)?);
    let _monitor = Daemon::spawn("ip monitor", mon_cmd)?;
    // The monitor is listening once it reports a change we make. It may
    // subscribe after our first change, so keep making one until it shows.
    let marker = ["203.0.113.1/32", "dev", "up0", "proto", "static"];
    wait_for("ip monitor to start", WAIT, || {
        if std::fs::read_to_string(&mon_path)?.contains("203.0.113.1") {
            return Ok(true);
        }
        let _ = t.n1.ip(&[&["route", "del"][..], &marker[..]].concat());
        t.n1.ip(&[&["route", "add"][..], &marker[..]].concat())?;
        Ok(false)
    })?;

    // 4 s of pings every 10 ms, across the restart.
    let mut ping = t.p1.command("ping");
    ping.args(["-c", "400", "-i", "0.01", "-W", "1", "10.65.2.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let ping = ping.spawn()?;
    let t0 = Instant::now();

    f1.daemon.kill();
    let mut f1 = FibNode::start(&t.n1, &["--uplink", "up0"])?;
    let s = f1.set(&r1)?;
    let restarted_in = t0.elapsed();
    t.n1.ip(&[
        "route",
        "add",
        "203.0.113.2/32",
        "dev",
        "up0",
        "proto",
        "static",
    ])?;
    wait_for("ip monitor to see the marker", WAIT, || {
        Ok(std::fs::read_to_string(&mon_path)?.contains("203.0.113.2"))
    })?;

    let ping = ping.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&ping.stdout);
    assert!(
        restarted_in < Duration::from_secs(3),
        "restart took {restarted_in:?}, longer than the ping window"
    );
    assert!(
        ping.status.success()
            && stdout.contains("400 packets transmitted, 400 received, 0% packet loss"),
        "pings lost across the restart:\n{stdout}{}",
        String::from_utf8_lossy(&ping.stderr)
    );

    // Adopted, not re-added: the new reconciler wrote nothing and the kernel
    // announced no change to our routes between the two markers.
    let ls = &s["last_sync"];
    assert_eq!(
        (
            ls["adopted"].as_u64(),
            ls["added"].as_u64(),
            ls["replaced"].as_u64(),
            ls["removed"].as_u64()
        ),
        (Some(3), Some(0), Some(0), Some(0)),
        "{s:#}"
    );
    let mon = std::fs::read_to_string(&mon_path)?;
    // After the last event of the first marker (there may be several).
    let between = mon
        .rsplit("203.0.113.1")
        .next()
        .unwrap_or_default()
        .split("203.0.113.2")
        .next()
        .unwrap_or_default();
    assert!(
        !between.contains("10.65."),
        "our routes changed during the restart:\n{between}"
    );
    Ok(())
}

#[test]
fn fib_node_rejects_bad_input_with_the_prefix_named() -> Result<()> {
    let (n, _peer) = one_node()?;
    let mut f = FibNode::start(&n, &["--uplink", "up0"])?;
    writeln!(
        f.stdin,
        "{}",
        json!([{"dst": "10.68.0.1/24", "target": "blackhole"}])
    )?;
    f.stdin.flush()?;
    let err_file = f.status.with_extension("error");
    wait_for("fib-node to report the bad route", WAIT, || {
        Ok(err_file.exists())
    })?;
    let err = std::fs::read_to_string(&err_file)?;
    assert!(
        err.contains("10.68.0.1/24") && err.contains("host bits"),
        "{err}"
    );
    let out = output("ip", &["-n", &n.name, "route", "show", "proto", "73"])?;
    assert!(
        out.stdout.is_empty(),
        "nothing may be installed from a rejected set"
    );
    Ok(())
}

/// IPIP needs a kernel with the `ipip` module, which the test machine's lacks:
/// boot Debian's kernel under QEMU (tests/vm/ipip-vm.sh, ~10-20 s under TCG)
/// and run tests/vm/fib-guest.sh there: two node namespaces, our reconciler
/// in each installing `block via nodeIP dev tunl0 onlink`, a pod-to-pod ping
/// that must be counted on the receiving node's tunl0.
#[test]
fn ipip_routes_carry_pod_traffic_through_tunl0_in_a_vm() -> Result<()> {
    starling_tests::require_vm_tools(&[])?;

    let vm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vm");
    let work = TempDir::new("ipipvm")?;
    let out = Command::new("bash")
        .arg(vm.join("ipip-vm.sh"))
        .env("W", &work.path)
        .env(
            "EXTRA_BINS",
            format!("{FIB_NODE} {}", vm.join("fib-guest.sh").display()),
        )
        .env("GUEST_CMD", "sh /bin/fib-guest.sh")
        .env("TIMEOUT", "300")
        .stdin(Stdio::null())
        .output()?;
    let console = String::from_utf8_lossy(&out.stdout);
    let tail = || {
        let lines: Vec<&str> = console.lines().collect();
        format!(
            "{}\n{}",
            lines[lines.len().saturating_sub(80)..].join("\n"),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    for check in [
        "reconcilers_applied",
        "route_via_tunl0_onlink",
        "cross_subnet_other_subnet_via_tunl0",
        "cross_subnet_same_subnet_plain",
        "tunl0_up",
        "tunl0_mtu_1480",
        "tunl0_address",
        "ipip_ready_in_status",
        "rp_filter_loose_on_tunl0",
        "pod_ping_across_tunnel",
        "ping_crossed_tunl0",
    ] {
        assert!(
            console.contains(&format!("FIB_VM {check}: ok")),
            "VM check {check} did not pass:\n{}",
            tail()
        );
    }
    assert!(
        console.contains("GUEST_CMD_RC=0") && out.status.success(),
        "VM run failed:\n{}",
        tail()
    );
    Ok(())
}

#[test]
fn uplink_defaults_to_the_device_of_the_default_route() -> Result<()> {
    let (n, _peer) = one_node()?;
    n.ip(&["route", "add", "default", "via", "192.0.2.2", "dev", "up0"])?;
    let mut f = FibNode::start(&n, &[])?;
    let s = f.set(&[via("10.69.0.0/26", "192.0.2.2", "None")])?;
    assert_eq!(s["uplink"], "up0", "{s:#}");
    assert_eq!(s["uplink_mtu"], 1500, "{s:#}");
    let table = routes(&n, &["proto", "73"])?;
    assert!(
        has_line(&table, "10.69.0.0/26 via 192.0.2.2 dev up0"),
        "{table}"
    );
    Ok(())
}

#[path = "fib_parts/vxlan.rs"]
mod vxlan;
