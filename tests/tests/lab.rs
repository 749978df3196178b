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
    // Pods to the outside host, through their node's masquerade.
    ensure!(
        text.contains("node3-pod2 -> outside 203.0.113.1: ok"),
        "{text}"
    );
    ensure!(
        text.contains("6 of 6 pods reach the outside host"),
        "{text}"
    );
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

/// SIGKILL and restart `node`'s agent under a 50 pkt/s ping from `from` to
/// `to`; once it synced with forwarding preserved and the lab converged,
/// report the count as `scenario`. Target: 0 lost.
fn restart_under_ping(
    c: &mut Cluster,
    node: &str,
    from: &str,
    to: std::net::IpAddr,
    scenario: &str,
) -> Result<()> {
    let ping = Pinger::start(from, to)?;
    c.lab.kill_agent(node)?;
    c.lab.start_agent(node)?;
    wait_for(
        &format!("{node} synced after its restart"),
        CONVERGE,
        || {
            let st = c.status(node)?;
            Ok(st.synced && st.forwarding_preserved)
        },
    )?;
    c.converged(CONVERGE)?;
    let count = ping.stop()?;
    report(scenario, count);
    ensure!(count.lost() == 0, "{count:?}");
    Ok(())
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

/// A TCP echo server in a namespace that writes each client's address to a
/// file: how the outside host (or a pod) shows which source it saw.
/// Killed when dropped.
struct EchoServer {
    child: std::process::Child,
    log: std::path::PathBuf,
}

const ECHO_SERVER: &str = r#"
import socketserver, sys
log = open(sys.argv[2], 'a', buffering=1)
class H(socketserver.StreamRequestHandler):
    def handle(self):
        log.write(self.client_address[0].removeprefix('::ffff:') + '\n')
        for line in self.rfile:
            self.wfile.write(line)
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
S(('0.0.0.0', int(sys.argv[1])), H).serve_forever()
"#;

/// One exchange: connect, send a line, print the echo. Exit 1 on failure.
const ECHO_ONCE: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
s.sendall(b'hello\n')
print(s.makefile().readline().strip())
"#;

/// A long connection: one line every 50 ms for N lines, each echoed within
/// 2 s, or exit 1 naming the line that stalled.
const ECHO_LONG: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
f = s.makefile()
n = int(sys.argv[3])
for i in range(n):
    s.sendall(b'%d\n' % i)
    got = f.readline().strip()
    if got != str(i):
        print('line %d: got %r' % (i, got), flush=True)
        sys.exit(1)
    print(i, flush=True)
    time.sleep(0.05)
print('done', n, flush=True)
"#;

impl EchoServer {
    fn start(netns: &str, port: u16, dir: &std::path::Path) -> Result<EchoServer> {
        let log = dir.join(format!("echo-{netns}-{port}.log"));
        std::fs::write(&log, "")?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "python3", "-c", ECHO_SERVER])
            .arg(port.to_string())
            .arg(&log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            // A client gone mid-line is no news (BrokenPipeError).
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the echo server (python3)")?;
        let probe = ["netns", "exec", netns, "ss", "-ltn"];
        wait_for("the echo server listening", Duration::from_secs(10), || {
            Ok(starling_tests::run("ip", &probe)?.contains(&format!(":{port}")))
        })?;
        Ok(EchoServer { child, log })
    }

    /// The client addresses seen so far, in order.
    fn peers(&self) -> Result<Vec<String>> {
        Ok(std::fs::read_to_string(&self.log)?
            .lines()
            .map(String::from)
            .collect())
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One TCP exchange from a pod; the echo, or why not.
fn tcp_once(netns: &str, to: std::net::IpAddr, port: u16, timeout_s: f64) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "python3", "-c", ECHO_ONCE])
        .args([to.to_string(), port.to_string(), timeout_s.to_string()])
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "TCP from {netns} to {to}:{port} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `nft list table inet starling` in a node, or None when it is absent.
fn our_table(netns: &str) -> Option<String> {
    starling_tests::run(
        "ip",
        &[
            "netns", "exec", netns, "nft", "list", "table", "inet", "starling",
        ],
    )
    .ok()
}

/// What another tool owns in a node: a table of its own and an
/// iptables-nft rule, listed for a byte-for-byte comparison.
fn foreign_rules(netns: &str) -> Result<String> {
    let table = starling_tests::run(
        "ip",
        &[
            "netns", "exec", netns, "nft", "list", "table", "ip", "foreign",
        ],
    )?;
    let ipt = starling_tests::run(
        "ip",
        &["netns", "exec", netns, "iptables-nft", "-S", "FORWARD"],
    )?;
    let nat = starling_tests::run(
        "ip",
        &["netns", "exec", netns, "iptables-nft", "-t", "nat", "-S"],
    )?;
    Ok(format!("{table}\n{ipt}\n{nat}"))
}

/// natOutgoing end to end: every pod reaches the outside host (which knows
/// no pod route) by ping and TCP, and the outside sees the node's address;
/// pod to pod keeps the pod's address; turning natOutgoing off and on
/// applies within 1 s; our rule deleted by hand comes back; another tool's
/// nftables table and iptables-nft rules stay byte-for-byte; an agent
/// SIGKILLed and restarted keeps an established connection flowing and
/// adopts the table without rewriting it.
#[test]
fn nat_outgoing_to_the_outside_host() -> Result<()> {
    let mut c = Cluster::up(options("nat", 3, Topology::Mesh))?;
    c.converged(CONVERGE)?;
    let outside = c
        .lab
        .outside
        .clone()
        .context("the lab has no outside host")?;
    let out_v4 = outside.addresses[0];
    let n1 = c.lab.node("node1")?.netns.clone();
    // Another tool's rules, before anything of ours changes.
    let ns = |args: &[&str]| -> Result<String> {
        let mut a = vec!["netns", "exec", n1.as_str()];
        a.extend_from_slice(args);
        starling_tests::run("ip", &a)
    };
    ns(&["nft", "add", "table", "ip", "foreign"])?;
    ns(&[
        "nft",
        "add",
        "chain",
        "ip",
        "foreign",
        "out",
        "{ type filter hook output priority 10; policy accept; }",
    ])?;
    ns(&[
        "nft",
        "add",
        "rule",
        "ip",
        "foreign",
        "out",
        "ip",
        "daddr",
        "198.51.100.7",
        "accept",
    ])?;
    ns(&[
        "iptables-nft",
        "-A",
        "FORWARD",
        "-s",
        "198.51.100.7",
        "-j",
        "ACCEPT",
    ])?;
    ns(&[
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-d",
        "198.51.100.8",
        "-j",
        "RETURN",
    ])?;
    let foreign_before = foreign_rules(&n1)?;

    // Ping and TCP from every node's pod; the outside sees the node.
    let results = c.lab.check_outside();
    ensure!(
        results.len() == 3 && results.iter().all(|r| r.2),
        "{results:?}"
    );
    let server = EchoServer::start(&outside.netns, 8080, &c.dir())?;
    for node in ["node1", "node2", "node3"] {
        let pod = c.pod(node)?.netns.clone();
        ensure!(tcp_once(&pod, out_v4, 8080, 3.0)? == "hello");
        let seen = server.peers()?;
        let want = c.lab.node(node)?.ipv4.addr().to_string();
        ensure!(
            seen.last() == Some(&want),
            "the outside saw {seen:?}; {node} is {want}"
        );
    }
    // Pod to pod across nodes: no NAT.
    let pod2 = c.pod("node2")?.clone();
    let pod_server = EchoServer::start(&pod2.netns, 8081, &c.dir())?;
    let pod1 = c.pod("node1")?.clone();
    ensure!(tcp_once(&pod1.netns, pod2.ips[0], 8081, 3.0)? == "hello");
    let seen = pod_server.peers()?;
    ensure!(
        seen == vec![pod1.ips[0].to_string()],
        "node2's pod saw {seen:?}, not node1's pod {}",
        pod1.ips[0]
    );

    // Off, then on: every node's table follows within 1 s.
    let nodes: Vec<String> = c.lab.nodes.iter().map(|n| n.netns.clone()).collect();
    for on in [false, true] {
        c.lab.set_nat_outgoing(on)?;
        let took = wait_for(
            &format!(
                "natOutgoing {} on every node",
                if on { "on" } else { "off" }
            ),
            Duration::from_secs(1),
            || Ok(nodes.iter().all(|n| our_table(n).is_some() == on)),
        )?;
        bench_line(
            "lab-nat-outgoing",
            "starling",
            if on { "turned_on" } else { "turned_off" },
            took.as_secs_f64() * 1000.0,
            "ms",
        );
        let r = tcp_once(&pod1.netns, out_v4, 8080, 1.0);
        ensure!(
            r.is_ok() == on,
            "natOutgoing {on}: TCP to the outside: {r:?}"
        );
    }

    // Drift: our rules flushed by hand come back.
    let table_before = our_table(&n1).context("our table")?;
    ns(&["nft", "flush", "chain", "inet", "starling", "postrouting"])?;
    let took = wait_for("our flushed rules restored", Duration::from_secs(5), || {
        Ok(our_table(&n1).as_deref() == Some(table_before.as_str()))
    })?;
    bench_line(
        "lab-nat-drift",
        "starling",
        "restored",
        took.as_secs_f64() * 1000.0,
        "ms",
    );
    ns(&["nft", "delete", "table", "inet", "starling"])?;
    wait_for("our deleted table restored", Duration::from_secs(5), || {
        Ok(our_table(&n1).as_deref() == Some(table_before.as_str()))
    })?;

    // An established connection through the NAT survives SIGKILL + start.
    let mut long = Command::new("ip")
        .args(["netns", "exec", &pod1.netns, "python3", "-c", ECHO_LONG])
        .args([out_v4.to_string(), "8080".into(), "200".into()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the long connection")?;
    let stdout = long.stdout.take().context("its stdout")?;
    let echoed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let echoed = echoed.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                echoed.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        })
    };
    let lines = || echoed.lock().unwrap_or_else(|e| e.into_inner()).len();
    wait_for(
        "the long connection flowing",
        Duration::from_secs(10),
        || Ok(lines() >= 10),
    )?;
    let writes_before = c.status("node1")?.nat.writes;
    c.lab.kill_agent("node1")?;
    c.lab.start_agent("node1")?;
    wait_for("node1's NAT pass after the restart", CONVERGE, || {
        let st = c.status("node1")?.nat;
        Ok(st.generation > 0 && st.error.is_none())
    })?;
    let st = c.status("node1")?.nat;
    ensure!(
        st.writes == 0 && st.adopted >= 1 && st.table_present,
        "the restarted agent rewrote the table instead of adopting it: {st:?} (before: {writes_before} writes)"
    );
    let at_restart = lines();
    ensure!(
        at_restart < 200,
        "the connection ended before the agent was back: nothing was proven"
    );
    let status = long.wait()?;
    let _ = reader.join();
    let text = echoed.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ensure!(
        status.success() && text.last().map(String::as_str) == Some("done 200"),
        "the established connection broke across the restart ({at_restart} lines before it): {:?}",
        text.last()
    );
    ensure!(our_table(&n1).as_deref() == Some(table_before.as_str()));
    // Another tool's rules: untouched by all of the above.
    ensure!(
        foreign_rules(&n1)? == foreign_before,
        "another tool's rules changed:\nbefore:\n{foreign_before}\nafter:\n{}",
        foreign_rules(&n1)?
    );
    c.all_pairs_answer()?;
    Ok(())
}

/// The pod MTU follows the uplink: 9000 and then 1460 on node1's eth0
/// reach the next pod (no encapsulation: no overhead), and the pod made
/// at 9000 keeps it.
#[test]
fn pod_mtu_follows_the_uplink() -> Result<()> {
    let mut c = Cluster::up(options("mtu", 1, Topology::Mesh))?;
    let ns1 = c.lab.node("node1")?.netns.clone();
    let mtu_of = |netns: &str| -> Result<u32> {
        Ok(starling_tests::run(
            "ip",
            &["netns", "exec", netns, "cat", "/sys/class/net/eth0/mtu"],
        )?
        .trim()
        .parse()?)
    };
    ensure!(mtu_of(&c.pod("node1")?.netns.clone())? == 1500);
    let mut made = Vec::new();
    for mtu in [9000u32, 1460] {
        starling_tests::run(
            "ip",
            &["-n", &ns1, "link", "set", "eth0", "mtu", &mtu.to_string()],
        )?;
        let p = c.lab.add_pod("node1", &format!("mtu{mtu}"))?;
        let got = mtu_of(&p.netns)?;
        ensure!(got == mtu, "a pod made with a {mtu} uplink got MTU {got}");
        made.push((p.netns, mtu));
    }
    for (netns, mtu) in made {
        ensure!(mtu_of(&netns)? == mtu, "{netns} no longer has {mtu}");
    }
    Ok(())
}

/// natOutgoing over IPv6: with `--ipv6` every pod reaches the outside
/// host's IPv6 address (which knows no pod route) through its node's
/// masquerade, as well as its IPv4 one.
#[test]
fn nat_outgoing_ipv6() -> Result<()> {
    let mut o = options("nat6", 2, Topology::Mesh);
    o.ipv6 = true;
    let c = Cluster::up(o)?;
    c.converged(CONVERGE)?;
    let results = c.lab.check_outside();
    ensure!(
        results.iter().filter(|r| r.1.is_ipv6()).count() == 2,
        "no IPv6 outside check: {results:?}"
    );
    ensure!(results.iter().all(|r| r.2), "{results:?}");
    Ok(())
}

/// Without `nft` the agent runs on and says so: its status names the
/// missing program and the package, `starling_nat_ready` is 0, and IPAM
/// still serves pods. Started again with `nft`, the table is adopted.
#[test]
fn nat_without_nft_is_reported_not_fatal() -> Result<()> {
    let mut c = Cluster::up(options("nonft", 1, Topology::Mesh))?;
    let ns1 = c.lab.node("node1")?.netns.clone();
    // A PATH with `ip` (the lab starts the agent with `ip netns exec`) and no `nft`.
    let path = c.dir().join("path-without-nft");
    std::fs::create_dir_all(&path)?;
    let ip = starling_tests::run("sh", &["-c", "command -v ip"])?;
    std::os::unix::fs::symlink(ip.trim(), path.join("ip"))?;
    let path_s = path.to_str().context("path")?.to_string();
    c.lab.kill_agent("node1")?;
    c.lab.start_agent_with_env("node1", &[("PATH", &path_s)])?;
    wait_for("the missing nft in node1's status", CONVERGE, || {
        let e = c.status("node1")?.nat.error.unwrap_or_default();
        Ok(e.contains("cannot run nft") && e.contains("nftables"))
    })?;
    let metrics = || -> Result<String> {
        let url = "http://127.0.0.1:9091/metrics";
        starling_tests::run("ip", &["netns", "exec", &ns1, "curl", "-s", url])
    };
    wait_for("starling_nat_ready 0", CONVERGE, || {
        Ok(metrics()?.contains("starling_nat_ready 0"))
    })?;
    println!(
        "node1 without nft: {}",
        c.status("node1")?.nat.error.unwrap_or_default()
    );
    let pod = c.lab.add_pod("node1", "without-nft")?;
    ensure!(!pod.ips.is_empty());
    c.lab.kill_agent("node1")?;
    c.lab.start_agent("node1")?;
    wait_for("natOutgoing applied with nft back", CONVERGE, || {
        let st = c.status("node1")?.nat;
        Ok(st.generation > 0 && st.error.is_none() && st.table_present)
    })?;
    wait_for("starling_nat_ready 1", CONVERGE, || {
        Ok(metrics()?.contains("starling_nat_ready 1"))
    })?;
    Ok(())
}
#[path = "lab_parts/vxlan.rs"]
mod vxlan;

#[path = "lab_parts/tor.rs"]
mod tor;

#[path = "lab_parts/nobgp.rs"]
mod nobgp;

/// `starlingctl ipam check` and `ipam release` with the file datastore, as
/// an operator uses them after a container runtime lost a pod without a CNI
/// DEL: the pod's network namespace is gone, check reports its address as a
/// leak (exit 1), release refuses an address whose namespace exists and
/// frees the leaked one, after which check is clean (exit 0) and the
/// address's host route leaves the kernel.
#[test]
fn ipam_check_and_release_with_the_file_datastore() -> Result<()> {
    let mut o = options("ipc", 2, Topology::Mesh);
    o.pods_per_node = 2;
    let c = Cluster::up(o)?;
    c.converged(CONVERGE)?;
    let sock = c.lab.node("node1")?.dir.join("agent.sock");
    let sock = sock.to_str().context("socket path")?.to_string();
    let ctl = |args: &[&str]| -> Result<(bool, String, String)> {
        let out = Command::new(bin("starlingctl"))
            .arg("ipam")
            .args(args)
            .args(["--socket", &sock])
            .output()
            .context("running starlingctl ipam")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let check = || -> Result<(bool, serde_json::Value)> {
        let (ok, out, err) = ctl(&["check", "-o", "json"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("check -o json: {out}{err}"))?;
        Ok((ok, v))
    };
    let (ok, v) = check()?;
    ensure!(ok, "a fresh lab must check clean: {v:#}");
    ensure!(v["addresses"] == 2, "node1 has two pods: {v:#}");

    let pods: Vec<&starling_agent::lab::LabPod> =
        c.lab.pods.iter().filter(|p| p.node == "node1").collect();
    ensure!(pods.len() == 2, "two pods on node1: {pods:?}");
    let (lost, alive) = (pods[0], pods[1]);
    let lost_ip = lost.ips[0].to_string();
    let alive_ip = alive.ips[0].to_string();
    // The runtime loses the pod: its namespace goes, no CNI DEL.
    starling_tests::run("ip", &["netns", "del", &lost.netns])?;

    let (ok, v) = check()?;
    ensure!(!ok, "check must exit non-zero with a leak: {v:#}");
    let leaks = v["leaks"].as_array().context("leaks")?;
    ensure!(
        leaks.len() == 1 && leaks[0]["address"] == lost_ip.as_str(),
        "the lost pod's address {lost_ip} is the one leak: {v:#}"
    );
    ensure!(
        leaks[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("is gone")),
        "the leak says why: {v:#}"
    );

    let (ok, out, err) = ctl(&["release", "--ip", &alive_ip])?;
    ensure!(
        !ok,
        "releasing a live pod's address must be refused: {out}{err}"
    );
    ensure!(
        err.contains("exists"),
        "the refusal names what still uses it: {err}"
    );

    let (ok, out, err) = ctl(&["release", "--ip", &lost_ip])?;
    ensure!(ok, "releasing the leaked address failed: {out}{err}");
    ensure!(out.contains(&lost_ip), "release names the address: {out}");
    let (ok, v) = check()?;
    ensure!(ok, "check is clean after the release: {v:#}");
    ensure!(v["addresses"] == 1, "one address left on node1: {v:#}");
    c.wait_all("the released address's route gone", CONVERGE, |n| {
        Ok(n != "node1"
            || !c
                .kernel_routes(n)?
                .lines()
                .any(|l| l.starts_with(&format!("{lost_ip} "))))
    })?;
    // The live pod is untouched and still reachable from node2's pod.
    wait_reachable(&c.pod("node2")?.netns, alive.ips[0])?;
    Ok(())
}

#[path = "lab_parts/vm.rs"]
mod vm;
