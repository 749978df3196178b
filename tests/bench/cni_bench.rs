//! CNI ADD/DEL latency: `starling` (with its agent) against the reference
//! `bridge` + `host-local` chain, under the same load in the same run.
//!
//! The bench enters a fresh "node" namespace with setns before it starts any
//! thread or process, so the plugins it execs (and the agent) inherit it: the
//! latency measured is the plugin's alone, with no `ip netns exec` wrapper.
//! Each pod is a namespace of its own, created before timing starts.
//!
//! Prints one JSON line per figure (see tests/bench/cni.sh).

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use serde_json::json;
use starling_tests::{Daemon, Netns, TempDir, bench_line, wait_for};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The `starling` plugin binary.
    #[arg(long)]
    plugin: PathBuf,
    /// The `starling-agent` binary.
    #[arg(long)]
    agent: PathBuf,
    /// Where the reference plugins live.
    #[arg(long, default_value = "/usr/lib/cni")]
    ref_dir: PathBuf,
    /// Pods added (then deleted) one after another.
    #[arg(long, default_value_t = 500)]
    sequential: usize,
    /// Pods added (then deleted) all at once.
    #[arg(long, default_value_t = 100)]
    concurrent: usize,
    /// Also measure an agent whose state directory is under this tmpfs
    /// directory (impl `starling-tmpfs`): no fsync on the ADD path.
    #[arg(long)]
    tmpfs: Option<PathBuf>,
}

/// One plugin under test: how to invoke it for a pod.
struct Contender {
    name: &'static str,
    exe: PathBuf,
    conf: String,
    cni_path: PathBuf,
}

impl Contender {
    /// Run one operation for `pod`, returning its wall-clock latency.
    fn run(&self, command: &str, pod: &Netns) -> Result<Duration> {
        let start = Instant::now();
        let mut child = Command::new(&self.exe)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("bench-{}", pod.name))
            .env("CNI_NETNS", format!("/var/run/netns/{}", pod.name))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", self.exe.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(self.conf.as_bytes())?;
        let out = child.wait_with_output()?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!(
                "{} {command} for {} failed: {}{}",
                self.name,
                pod.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(took)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

fn report(c: &Contender, op: &str, load: &str, mut samples: Vec<Duration>) {
    samples.sort();
    for (p, v) in [("p50", 50.0), ("p99", 99.0)] {
        bench_line(
            "cni",
            c.name,
            &format!("{op}_{p}_{load}"),
            (percentile(&samples, v) * 1000.0).round() / 1000.0,
            "ms",
        );
    }
}

fn sequential(c: &Contender, pods: &[Netns]) -> Result<()> {
    let mut adds = Vec::with_capacity(pods.len());
    for pod in pods {
        adds.push(c.run("ADD", pod)?);
    }
    let mut dels = Vec::with_capacity(pods.len());
    for pod in pods {
        dels.push(c.run("DEL", pod)?);
    }
    let load = format!("sequential{}", pods.len());
    report(c, "add", &load, adds);
    report(c, "del", &load, dels);
    Ok(())
}

fn concurrent(c: &Contender, pods: &[Netns]) -> Result<()> {
    let run_all = |command: &str| -> Result<Vec<Duration>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = pods
                .iter()
                .map(|p| s.spawn(move || c.run(command, p)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
                })
                .collect()
        })
    };
    let adds = run_all("ADD")?;
    let dels = run_all("DEL")?;
    let load = format!("concurrent{}", pods.len());
    report(c, "add", &load, adds);
    report(c, "del", &load, dels);
    Ok(())
}

fn setns(f: &File) -> Result<()> {
    // SAFETY: setns on a descriptor we own. Called while no other thread
    // exists, so every thread and child created afterwards starts in the
    // namespace entered.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    for (what, p) in [
        ("--plugin", &args.plugin),
        ("--agent", &args.agent),
        ("bridge", &args.ref_dir.join("bridge")),
        ("host-local", &args.ref_dir.join("host-local")),
    ] {
        ensure!(p.is_file(), "{what}: {} not found", p.display());
    }
    let node = Netns::new("bench")?;
    let dir = TempDir::new("cni-bench")?;
    // Pods are created from the host namespace (that is where `ip` runs),
    // before this process moves into the node.
    let total = args.sequential.max(args.concurrent);
    let pods: Vec<Netns> = (0..total)
        .map(|i| Netns::new(&format!("b{i}")))
        .collect::<Result<_>>()?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    let home = File::open("/proc/self/ns/net")?;
    setns(&File::open(format!("/var/run/netns/{}", node.name))?)?;
    let result = measure(&args, &dir, &pods);
    // Back home before the namespaces go: deleting one kills the processes
    // inside it, and this one would be among them.
    setns(&home)?;
    drop(pods);
    drop(node);
    result
}

/// Start an agent keeping its state in `state`, answering on `socket`.
fn start_agent(
    args: &Args,
    dir: &TempDir,
    state: &std::path::Path,
    socket: &std::path::Path,
    cidr: &str,
) -> Result<Daemon> {
    let config = dir.join(&format!("agent-{cidr}.yaml").replace('/', "_"));
    std::fs::write(
        &config,
        format!(
            "nodeName: bench\nstateDir: {}\nsocketPath: {}\nmtu: 1500\nipam:\n  podCIDRs: [\"{cidr}\"]\n",
            state.display(),
            socket.display()
        ),
    )?;
    let mut cmd = Command::new(&args.agent);
    cmd.args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut agent = Daemon::spawn("starling-agent", cmd)?;
    wait_for("the agent's socket", Duration::from_secs(20), || {
        agent.check_alive()?;
        Ok(starling_cni_proto::call(
            socket,
            starling_cni_proto::Request::Status,
            Duration::from_secs(1),
        )
        .is_ok())
    })?;
    Ok(agent)
}

fn ours(name: &'static str, args: &Args, socket: &std::path::Path) -> Contender {
    Contender {
        name,
        exe: args.plugin.clone(),
        conf: json!({"cniVersion": "1.0.0", "name": "bench", "type": "starling",
                     "socketPath": socket})
        .to_string(),
        cni_path: args.ref_dir.clone(),
    }
}

fn measure(args: &Args, dir: &TempDir, pods: &[Netns]) -> Result<()> {
    let socket = dir.join("cni.sock");
    let mut agent = start_agent(args, dir, &dir.join("state"), &socket, "10.77.0.0/20")?;
    let mut contenders = vec![ours("starling", args, &socket)];
    let tmpfs_state = args
        .tmpfs
        .as_ref()
        .map(|d| d.join(format!("starling-cni-bench-{}", std::process::id())));
    let mut tmpfs_agent = None;
    if let Some(state) = &tmpfs_state {
        let socket = dir.join("cni-tmpfs.sock");
        tmpfs_agent = Some(start_agent(args, dir, state, &socket, "10.79.0.0/20")?);
        contenders.push(ours("starling-tmpfs", args, &socket));
    }
    let reference = Contender {
        name: "bridge-host-local",
        exe: args.ref_dir.join("bridge"),
        conf: json!({
            "cniVersion": "1.0.0", "name": "bench", "type": "bridge",
            "bridge": "cni0", "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.78.0.0/20"}]],
                     "dataDir": dir.join("host-local")},
        })
        .to_string(),
        cni_path: args.ref_dir.clone(),
    };
    contenders.push(reference);
    // Warm the page cache for every binary so none pays a cold start.
    for c in &contenders {
        c.run("ADD", &pods[0])?;
        c.run("DEL", &pods[0])?;
    }
    for c in &contenders {
        sequential(c, &pods[..args.sequential])?;
        concurrent(c, &pods[..args.concurrent])?;
    }
    agent.kill();
    if let Some(mut a) = tmpfs_agent {
        a.kill();
    }
    if let Some(state) = tmpfs_state {
        let _ = std::fs::remove_dir_all(state);
    }
    Ok(())
}
