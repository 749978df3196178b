//! Multi-node clusters for the `agent` and `lab` targets: the lab's own
//! library (`starling_agent::lab`) builds them, with a name unique to the
//! test, and [`Cluster`] removes everything when dropped, also on failure.

use crate::{bin, wait_for};
use anyhow::{Context, Result, anyhow, bail};
use starling_agent::lab::{self, LabOptions, LabState, Topology};
use starling_agent::node::control::{self, NodeStatus};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running lab, torn down on drop.
pub struct Cluster {
    pub lab: LabState,
}

/// Options for a test cluster: `tag` names it (a few letters).
pub fn options(tag: &str, nodes: usize, topology: Topology) -> LabOptions {
    let mut o = options_with_bins(tag, nodes, topology);
    o.agent_bin = Some(bin("starling-agent"));
    o.cni_bin = Some(bin("starling"));
    o
}

/// Like [`options`], with the binaries found next to this program (the lab's
/// default), for benchmarks built as binaries beside them.
pub fn options_with_bins(tag: &str, nodes: usize, topology: Topology) -> LabOptions {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    LabOptions {
        name: format!("{tag}{}{n}", std::process::id() % 10000),
        dir: std::env::temp_dir().join("starling-test-labs"),
        nodes,
        topology,
        encapsulation: lab::LabEncapsulation::None,
        underlay: lab::Underlay::Flat,
        pods_per_node: 1,
        ipv6: false,
        no_bgp: false,
        tor: None,
        tor_password: None,
        tor_announce: Vec::new(),
        tor_prepend_node_as: false,
        tor_gtsm: false,
        agent_bin: None,
        cni_bin: None,
        kubeconfig: None,
        autodetect: None,
    }
}

impl Cluster {
    pub fn up(opts: LabOptions) -> Result<Cluster> {
        let (dir, name) = (opts.dir.clone(), opts.name.clone());
        match lab::up(opts, &mut |m| eprintln!("lab {name}: {m}")) {
            Ok(lab) => Ok(Cluster { lab }),
            Err(e) => {
                let logs = logs(&dir.join(&name));
                let _ = lab::down(&dir, &name, &mut |_| {});
                Err(e.context(logs))
            }
        }
    }

    pub fn status(&self, node: &str) -> Result<NodeStatus> {
        self.lab.status_of(node)
    }

    /// Addresses of every session of `node` that is Established.
    pub fn established(&self, node: &str) -> Result<Vec<IpAddr>> {
        Ok(self
            .status(node)?
            .sessions
            .iter()
            .filter(|s| s.state == "Established")
            .map(|s| s.peer)
            .collect())
    }

    pub fn converged(&self, within: Duration) -> Result<()> {
        self.lab
            .wait_converged(within, &mut |_| {})
            .map_err(|e| anyhow!("{e:#}\n{}", logs(&self.dir())))
    }

    pub fn dir(&self) -> PathBuf {
        self.lab.dir.join(&self.lab.name)
    }

    /// Every pod answers every other pod, or the failures and the agents' logs.
    pub fn all_pairs_answer(&self) -> Result<usize> {
        let results = self.lab.check();
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.3)
            .map(|r| format!("{} -> {} ({})", r.0, r.1, r.2))
            .collect();
        if !failed.is_empty() {
            bail!(
                "{} of {} pairs do not answer: {}\n{}",
                failed.len(),
                results.len(),
                failed.join(", "),
                lab::matrix(&self.lab, &results)
            );
        }
        Ok(results.len())
    }

    /// The kernel routes of ours on a node (`ip route show proto 73`).
    pub fn kernel_routes(&self, node: &str) -> Result<String> {
        let ns = &self.lab.node(node)?.netns;
        crate::run("ip", &["-n", ns, "route", "show", "proto", "73"])
    }

    /// The forwarding entries of a node's `vxlan.starling` device (`bridge
    /// fdb show dev vxlan.starling`); an error when the device is absent.
    pub fn vxlan_fdb(&self, node: &str) -> Result<String> {
        let ns = &self.lab.node(node)?.netns;
        crate::run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "bridge",
                "fdb",
                "show",
                "dev",
                "vxlan.starling",
            ],
        )
    }

    /// Wait until `cond` holds on every node, naming the first that fails.
    pub fn wait_all(
        &self,
        what: &str,
        within: Duration,
        cond: impl Fn(&str) -> Result<bool>,
    ) -> Result<Duration> {
        let nodes: Vec<String> = self.lab.nodes.iter().map(|n| n.name.clone()).collect();
        wait_for(what, within, || {
            for n in &nodes {
                if !cond(n)? {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// The first pod of a node.
    pub fn pod(&self, node: &str) -> Result<&lab::LabPod> {
        self.lab
            .pods
            .iter()
            .find(|p| p.node == node)
            .ok_or_else(|| anyhow!("no pod on {node}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", logs(&self.dir()));
        }
        let _ = lab::down(&self.lab.dir, &self.lab.name, &mut |_| {});
    }
}

/// The end of every node's agent log, for failure messages.
pub fn logs(dir: &std::path::Path) -> String {
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let log = e.path().join("agent.log");
            if log.exists() {
                out.push_str(&format!(
                    "--- {} (last 15 lines)\n{}\n",
                    log.display(),
                    lab::log_tail(&log, 15)
                ));
            }
        }
    }
    out
}

/// A continuous ping from a namespace, every 20 ms; [`Pinger::stop`] counts
/// what was lost.
pub struct Pinger {
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<()>>,
    seen: Arc<Mutex<Seen>>,
    what: String,
}

/// What the pinger's output showed so far.
#[derive(Default)]
struct Seen {
    replies: BTreeSet<u64>,
    /// "no answer yet" reports (ping -O): requests that went unanswered
    /// for a whole interval.
    unanswered: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct PingCount {
    pub sent: u64,
    pub received: u64,
}

impl PingCount {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

impl Pinger {
    pub fn start(netns: &str, to: IpAddr) -> Result<Pinger> {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", netns, "ping", "-O", "-i", "0.02", "-W", "1",
            ])
            .arg(to.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ping")?;
        let out = child.stdout.take().context("ping's stdout")?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                    let seq = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("icmp_seq="))
                        .and_then(|n| n.parse::<u64>().ok());
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    match seq {
                        Some(_) if line.contains("no answer yet") => s.unanswered += 1,
                        Some(n) if line.contains("bytes from") => {
                            s.replies.insert(n);
                        }
                        _ => {}
                    }
                }
            })
        };
        Ok(Pinger {
            child: Some(child),
            reader: Some(reader),
            seen,
            what: format!("ping {to} from {netns}"),
        })
    }

    fn last_reply(&self) -> u64 {
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        s.replies.last().copied().unwrap_or(0)
    }

    /// Requests that went unanswered so far (an outage is visible).
    pub fn unanswered(&self) -> u64 {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unanswered
    }

    /// Stop and count. Stopping first waits for two more replies, so no
    /// request is still in flight when counting ends: every request up to
    /// the last reply either got its answer or was lost. When no reply comes
    /// within 2 s the path is broken and every unanswered request counts.
    pub fn stop(mut self) -> Result<PingCount> {
        let mark = self.last_reply();
        let settled = wait_for(
            &format!("{}: replies after the scenario", self.what),
            Duration::from_secs(2),
            || Ok(self.last_reply() >= mark + 2),
        )
        .is_ok();
        let mut child = self.child.take().context("pinger already stopped")?;
        let _ = child.kill();
        let _ = child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let last = s.replies.last().copied().unwrap_or(0);
        let received = s.replies.len() as u64;
        if settled {
            Ok(PingCount {
                sent: last,
                received,
            })
        } else {
            bail!(
                "{}: no reply in the 2 s after the scenario ({} replies, last icmp_seq {last})",
                self.what,
                received
            )
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Wait until a pinger's target answers at all (the path exists) before the
/// scenario starts.
pub fn wait_reachable(netns: &str, to: IpAddr) -> Result<Duration> {
    wait_for(
        &format!("{to} answers from {netns}"),
        Duration::from_secs(20),
        || {
            Ok(Command::new("ip")
                .args(["netns", "exec", netns, "ping", "-c", "1", "-W", "1"])
                .arg(to.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success())
        },
    )
}

/// The peer types of a node's sessions (PEER TYPE as `starlingctl status`
/// derives it), by peer address.
pub fn session_types(c: &Cluster, node: &str) -> Result<Vec<(String, String)>> {
    Ok(control::with_plan_types(&c.status(node)?.sessions)
        .into_iter()
        .map(|s| (s.peer.to_string(), s.kind))
        .collect())
}

/// Four nodes in a mesh switch to two reflectors while node3's pod pings
/// node4's at 50 packets/s; returns the ping count (the scenario of both the
/// `agent` and `lab` targets).
pub fn mesh_to_reflectors(tag: &str) -> Result<PingCount> {
    let mut c = Cluster::up(options(tag, 4, Topology::Mesh))?;
    c.converged(Duration::from_secs(60))?;
    let from = c.pod("node3")?.netns.clone();
    let to = c.pod("node4")?.ips[0];
    wait_reachable(&from, to)?;
    let ping = Pinger::start(&from, to)?;
    c.lab.set_topology(Topology::Reflectors)?;
    c.wait_all(
        "clients peer with the reflectors only",
        Duration::from_secs(60),
        |n| {
            let types = session_types(&c, n)?;
            Ok(match n {
                "node3" | "node4" => {
                    types.len() == 2 && types.iter().all(|(_, k)| k == "route reflector")
                }
                _ => types.len() == 3,
            })
        },
    )?;
    c.converged(Duration::from_secs(60))?;
    let count = ping.stop()?;
    if count.sent < 20 {
        bail!("too few pings to judge: {count:?}");
    }
    c.all_pairs_answer()?;
    Ok(count)
}
