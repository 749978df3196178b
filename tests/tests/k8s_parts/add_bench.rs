//! Benchmark, not a test of behaviour (`#[ignore]`d, run by
//! tests/bench/cni-k8s.sh): CNI ADD and DEL latency, p50 and p99, through a
//! real API server, in one run: (1) plain pods (no annotations; the agent
//! still looks up the pod and its namespace, in its watch's copy), (2) pods
//! bound to no node, whose ADD reads both from the API server, (3) pods of
//! a namespace annotated `starling.dev/ipv4pools`, (4) pods annotated
//! themselves, and (5) pods on node2 whose only pool is one block node1
//! holds, so every ADD borrows. Two agents of the lab (Kubernetes datastore), the real
//! `starling` plugin exec'd with the runtime's CNI_ARGS straight into the
//! node's namespace (setns before exec, no `ip netns exec` wrapper). Prints
//! JSON lines {"bench":"cni-k8s","impl":"starling","metric":"add_p99_plain",..}.

use super::cluster::{Cluster, checked};
use super::ipam::blocks_of;
use anyhow::{Context, Result, bail, ensure};
use starling_tests::{Netns, bench_line};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// node1 only takes `main` by default; node2 only `lend`, a single block
/// that node1 claims first (an annotated pod), so node2 borrows. `gold`
/// and `silver` match no node: only annotations reach them.
const MODEL: &str = "\
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: main}
spec: {cidr: 10.244.0.0/16, blockSize: 26, nodeSelector: \"bench == 'owner'\"}
---
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: gold}
spec: {cidr: 10.250.0.0/24, blockSize: 26, nodeSelector: \"tier == 'none'\"}
---
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: silver}
spec: {cidr: 10.251.0.0/24, blockSize: 26, nodeSelector: \"tier == 'none'\"}
---
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: lend}
spec: {cidr: 10.252.0.0/25, blockSize: 25, nodeSelector: \"bench == 'borrower'\"}
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
  labels: {bench: owner}
  annotations: {starling.dev/ipv4-address: 192.0.2.11/24}
---
apiVersion: v1
kind: Node
metadata:
  name: node2
  labels: {bench: borrower}
  annotations: {starling.dev/ipv4-address: 192.0.2.12/24}
---
apiVersion: v1
kind: Namespace
metadata:
  name: steered
  annotations: {starling.dev/ipv4pools: '[\"gold\"]'}
";

/// One pod object bound to `node` as the scheduler would bind it, or to
/// no node when `node` is empty (never run: no kubelet).
fn pod(namespace: &str, name: &str, node: &str, pools: Option<&str>) -> String {
    let a = pools
        .map(|p| format!("  annotations: {{starling.dev/ipv4pools: '[\"{p}\"]'}}\n"))
        .unwrap_or_default();
    let bound = if node.is_empty() {
        String::new()
    } else {
        format!("  nodeName: {node}\n")
    };
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{a}spec:\n{bound}  containers: [{{name: c, image: busybox}}]\n"
    )
}

/// Where the plugin runs: the node's namespace and its agent's socket.
struct Node {
    netns: File,
    socket: std::path::PathBuf,
}

/// One CNI operation of pod `namespace/name` in `pod_ns`: its latency and
/// the plugin's stdout.
fn cni(
    node: &Node,
    op: &str,
    pod_ns: &Netns,
    namespace: &str,
    name: &str,
) -> Result<(Duration, String)> {
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "starling-bench", "type": "starling",
        "socketPath": node.socket,
    });
    let fd = node.netns.as_raw_fd();
    let mut cmd = Command::new(starling_tests::bin("starling"));
    cmd.env("CNI_COMMAND", op)
        .env("CNI_CONTAINERID", format!("{namespace}-{name}"))
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod_ns.name))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only setns (async-signal-safe) between fork and exec, on a
    // descriptor that outlives the child's start.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().context("running the starling plugin")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{op} of {namespace}/{name} failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let ms = sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0;
    (ms * 1000.0).round() / 1000.0
}

fn report(op: &str, case: &str, mut samples: Vec<Duration>) {
    samples.sort();
    for (p, v) in [("p50", 50.0), ("p99", 99.0)] {
        let metric = format!("{op}_{p}_{case}");
        bench_line(
            "cni-k8s",
            "starling",
            &metric,
            percentile(&samples, v),
            "ms",
        );
    }
}

/// One case: every pod added one after another (each address checked to
/// come from `pool`, a cidr prefix such as `10.250.0.`), then deleted.
fn phase(node: &Node, pods: &[Netns], case: &str, namespace: &str, pool: &str) -> Result<()> {
    let prefix = case.split('_').next().unwrap_or(case);
    let mut adds = Vec::with_capacity(pods.len());
    for (i, p) in pods.iter().enumerate() {
        let (took, out) = cni(node, "ADD", p, namespace, &format!("{prefix}-{i}"))?;
        let v: serde_json::Value = serde_json::from_str(&out).context("plugin result")?;
        ensure!(
            v["ips"][0]["address"]
                .as_str()
                .is_some_and(|a| a.starts_with(pool)),
            "{case}: ADD of {namespace}/{prefix}-{i} got no address of {pool}*: {out}"
        );
        adds.push(took);
    }
    let mut dels = Vec::with_capacity(pods.len());
    for (i, p) in pods.iter().enumerate() {
        dels.push(cni(node, "DEL", p, namespace, &format!("{prefix}-{i}"))?.0);
    }
    report("add", case, adds);
    report("del", case, dels);
    Ok(())
}

/// How many pods per case: STARLING_BENCH_PODS, 50 unless set.
fn count() -> Result<usize> {
    match std::env::var("STARLING_BENCH_PODS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("STARLING_BENCH_PODS={v:?} is not a count")),
        Err(_) => Ok(50),
    }
}

fn node(lab: &str, dir: &Path, name: &str) -> Result<Node> {
    let path = format!("/var/run/netns/{lab}-{name}");
    Ok(Node {
        netns: File::open(&path).with_context(|| format!("opening {path}"))?,
        socket: dir.join(name).join("cni.sock"),
    })
}

#[test]
#[ignore = "benchmark: tests/bench/cni-k8s.sh"]
fn add_latency_plain_annotated_and_borrowing() -> Result<()> {
    let n = count()?;
    ensure!(
        (1..=120).contains(&n),
        "STARLING_BENCH_PODS must be 1-120 (the lent block has 128 addresses)"
    );
    let k = Cluster::private("addbench")?;
    k.apply_manifests()?;
    let mut yaml = MODEL.to_string();
    for i in 0..n {
        yaml.push_str(&pod("default", &format!("plain-{i}"), "node1", None));
        yaml.push_str(&pod("steered", &format!("ns-{i}"), "node1", None));
        yaml.push_str(&pod(
            "default",
            &format!("pod-{i}"),
            "node1",
            Some("silver"),
        ));
        yaml.push_str(&pod("default", &format!("borrow-{i}"), "node2", None));
        yaml.push_str(&pod("default", &format!("unbound-{i}"), "", None));
    }
    yaml.push_str(&pod("default", "claim", "node1", Some("lend")));
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], &yaml))?;
    let (c, _dir) = super::e2e::lab_on(&k, "kab", 2, |o| o.pods_per_node = 0)?;
    let r = measure(&k, &c, n);
    r.map_err(|e| e.context(starling_tests::cluster::logs(&c.dir())))
}

fn measure(k: &Cluster, c: &starling_tests::cluster::Cluster, n: usize) -> Result<()> {
    let node1 = node(&c.lab.name, &c.dir(), "node1")?;
    let node2 = node(&c.lab.name, &c.dir(), "node2")?;
    let pods: Vec<Netns> = (0..n)
        .map(|i| Netns::new(&format!("kab{i}")))
        .collect::<Result<_>>()?;
    // Warm: node1 claims its main block and the binaries are in the cache.
    cni(&node1, "ADD", &pods[0], "default", "plain-0")?;
    cni(&node1, "DEL", &pods[0], "default", "plain-0")?;
    phase(&node1, &pods, "plain", "default", "10.244.")?;
    // Pods bound to no node: the agent's copy lacks them, each ADD reads
    // the pod and its namespace from the API server.
    phase(
        &node1,
        &pods,
        "unbound_apiserver_read",
        "default",
        "10.244.",
    )?;
    phase(&node1, &pods, "ns_annotation", "steered", "10.250.")?;
    phase(&node1, &pods, "pod_annotation", "default", "10.251.")?;
    // node1 claims the lent pool's only block; every ADD on node2 borrows.
    let claim = Netns::new("kabclaim")?;
    cni(&node1, "ADD", &claim, "default", "claim")?;
    let lend = blocks_of(k, "node1")?;
    ensure!(
        lend.iter().any(|b| b == "10.252.0.0/25"),
        "node1 holds the lent block: {lend:?}"
    );
    // Where node1's ADDs read their annotations: every bound pod from the
    // agent's watch, every unbound one from the API server.
    let reads = |source: &str| -> Result<u64> {
        let series = format!("starling_ipam_annotation_reads_total{{source=\"{source}\"}} ");
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("{}-node1", c.lab.name)])
            .args(["curl", "-sf", "http://127.0.0.1:9091/metrics"])
            .output()
            .context("reading node1's metrics")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .with_context(|| format!("no {series} in node1's metrics:\n{text}"))?
            .trim()
            .parse()
            .with_context(|| format!("{series} is not a count"))
    };
    let (watch, api) = (reads("watch")?, reads("apiserver")?);
    ensure!(
        watch == 3 * n as u64 + 2 && api == n as u64,
        "node1 read annotations {watch} times from its watch (want {}) and {api} from the API server (want {n})",
        3 * n + 2
    );
    phase(&node2, &pods, "borrow", "default", "10.252.0.")?;
    borrow_steps(&c.dir().join("node2").join("agent.log"))?;
    let node2_blocks = blocks_of(k, "node2")?.len();
    ensure!(node2_blocks == 0, "node2 claimed no block: it borrowed");
    cni(&node1, "DEL", &claim, "default", "claim")?;
    Ok(())
}

/// Where the borrows' time went, from node2's log ("borrowed an address"
/// carries list_ms, request_ms, open_ms, mark_ms): p50 and max of each
/// step, and the first borrow's (the one that requests the record and
/// waits for the owner to open it).
fn borrow_steps(log: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let field = |line: &str, key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        // `key=1.5`, `"key":1.5`, or with colour codes in between.
        let rest = &rest[rest.find(|c: char| c.is_ascii_digit())?..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("borrowed an address"))
        .collect();
    ensure!(
        !lines.is_empty(),
        "no \"borrowed an address\" line in {}",
        log.display()
    );
    for step in ["list", "request", "open", "mark"] {
        let key = format!("{step}_ms");
        let mut v: Vec<Duration> = lines
            .iter()
            .filter_map(|l| field(l, &key))
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .collect();
        ensure!(v.len() == lines.len(), "{key} missing in {}", log.display());
        let first = v[0].as_secs_f64() * 1000.0;
        v.sort();
        let max = v.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        bench_line(
            "cni-k8s",
            "starling",
            &format!("borrow_{step}_p50"),
            percentile(&v, 50.0),
            "ms",
        );
        bench_line(
            "cni-k8s",
            "starling",
            &format!("borrow_{step}_max"),
            r(max),
            "ms",
        );
        bench_line(
            "cni-k8s",
            "starling",
            &format!("borrow_{step}_first"),
            r(first),
            "ms",
        );
    }
    Ok(())
}
