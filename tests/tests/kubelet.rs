//! Starling installed the way users install it, on real nodes: the image
//! `scripts/image.sh` builds, the manifests applied as docs/install.md says,
//! the DaemonSet rolled out by real kubelets, and pods the scheduler placed
//! getting their addresses through kubelet -> containerd -> `starling`.
//! The cluster is `tests/k8s/cluster.sh` (docs/testing.md, "Real nodes").
//!
//! Figures (JSON lines on stderr): DaemonSet rollout time; pod created ->
//! Running as the kubelet reports it.

use anyhow::{Context, Result, bail, ensure};
use ipnet::IpNet;
use serde_json::Value;
use starling_tests::kube_nodes::{KubeCluster, starling_image};
use starling_tests::{Daemon, TempDir, bench_json, bin, log_line, run, wait_for};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const NODES: usize = 3;
/// The image reference the test gives the DaemonSet (imported, never pulled).
const IMAGE: &str = "localhost/starling:kubelet-test";
/// kube-controller-manager's --cluster-cidr in cluster.sh: the pool covers it.
const POOL: &str = "10.244.0.0/16";
/// Where cluster.sh's API server listens, on the nodes' underlay.
const API_HOST: &str = "192.0.2.1";
const API_PORT: &str = "6443";
const NS: &str = "kubelet-e2e";
/// Deployment replicas: two per node with the spread constraint.
const PER_NODE: usize = 2;

fn figure(metric: &str, value: f64, unit: &str) {
    log_line(&bench_json("kubelet", "starling", metric, value, unit).to_string());
}

#[test]
fn the_daemonset_installs_starling_and_kubelet_pods_get_addresses_that_reach_each_other()
-> Result<()> {
    let work = TempDir::new("kubelet")?;
    let (archive, rootfs) = starling_image(IMAGE, &work.path)?;
    let c = KubeCluster::up(NODES)?;
    c.import(&archive)?;
    if let Err(e) = steps(&c, &work.path, &rootfs) {
        bail!("{e:#}\n\n{}\n{}", state(&c), c.logs());
    }
    Ok(())
}

fn steps(c: &KubeCluster, work: &Path, rootfs: &Path) -> Result<()> {
    install(c, work, rootfs)?;
    let pods = pods_get_addresses(c)?;
    pods_reach_each_other(c, &pods)?;
    kubelet_adds_find_their_pods_in_the_agents_watch(c, &pods)?;
    the_runtime_calls_status(c)?;
    // Lost packets or a route flap fail the test, but only at the end: the
    // later steps still run and report.
    let flaps = a_rolling_update_loses_no_packet(c, &pods)?;
    deleted_pods_release_their_addresses(c)?;
    a_deleted_node_is_cleaned_up_by_one_agent(c)?;
    ensure!(
        flaps.is_empty(),
        "step 4, the rolling update:\n{}",
        flaps.join("\n")
    );
    Ok(())
}

/// Step 1: apply as docs/install.md says; the DaemonSet rolls out, install-cni
/// puts the plugin and conflist on every node, and only then do nodes turn Ready.
fn install(c: &KubeCluster, work: &Path, rootfs: &Path) -> Result<()> {
    for node in &c.nodes {
        let (status, message) = ready_condition(c, node)?;
        ensure!(
            status == "False",
            "{node} is Ready={status} before any CNI network is installed: {message}"
        );
        log_line(&format!("{node} before install: NotReady ({message})"));
    }
    // docs/install.md: the manifests for the image, from one generator.
    let manifests = work.join("manifests");
    run(
        bin("starlingctl").to_str().context("path")?,
        &[
            "manifests",
            "--image",
            IMAGE,
            // docs/install.md: containerd 2.x reads CNI 1.1.0 and then
            // calls the plugin's STATUS.
            "--cni-version",
            "1.1.0",
            "--out",
            manifests.to_str().context("path")?,
        ],
    )?;
    let daemonset = manifests.join("daemonset.yaml");
    let start = Instant::now();
    // docs/install.md, "Apply", in its order.
    for file in [manifests.join("crds.yaml"), manifests.join("rbac.yaml")] {
        c.kubectl_ok(&["apply", "-f", file.to_str().context("path")?])?;
    }
    // The API server's address as the agent must use it: no kube-proxy runs,
    // so the `kubernetes` Service's ClusterIP leads nowhere.
    c.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: kubernetes-services-endpoint, namespace: kube-system}}\n\
             data: {{KUBERNETES_SERVICE_HOST: \"{API_HOST}\", KUBERNETES_SERVICE_PORT: \"{API_PORT}\"}}\n"
        ),
    )?;
    c.kubectl_ok(&["apply", "-f", daemonset.to_str().context("path")?])?;
    c.kubectl_ok(&[
        "wait",
        "--for",
        "condition=Established",
        "--timeout",
        "60s",
        "-f",
        manifests.join("crds.yaml").to_str().context("path")?,
    ])?;
    c.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {{name: pods}}\nspec: {{cidr: {POOL}}}\n"
        ),
    )?;

    wait_for(
        "the starling-agent DaemonSet to be Ready on every node",
        Duration::from_secs(240),
        || {
            let ds = c.get_json(&["daemonset", "starling-agent", "-n", "kube-system"])?;
            let s = &ds["status"];
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            Ok(n("desiredNumberScheduled") == NODES as u64
                && n("numberReady") == NODES as u64
                && n("updatedNumberScheduled") == NODES as u64)
        },
    )?;
    let rollout = start.elapsed();
    figure("daemonset_rollout", rollout.as_secs_f64(), "s");
    // The kubelet probes what docs/operations.md says: liveness /healthz
    // (answers from the agent's first second), readiness /readyz (after the
    // first sync); no agent restarted on the way (below).
    let ds = c.get_json(&["daemonset", "starling-agent", "-n", "kube-system"])?;
    let agent = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "starling-agent")
        .context("no starling-agent container in the DaemonSet")?;
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        ensure!(
            agent[probe]["httpGet"]["path"] == path,
            "the DaemonSet's {probe} is {}, expected GET {path}",
            agent[probe]
        );
    }

    let agents = agent_pods(c)?;
    for node in &c.nodes {
        let pod = agents
            .get(node)
            .with_context(|| format!("no starling-agent pod on {node}"))?;
        let p = c.get_json(&["pod", pod, "-n", "kube-system"])?;
        let restarts: u64 = p["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["restartCount"].as_u64().unwrap_or(0))
            .sum();
        ensure!(
            restarts == 0,
            "{pod} on {node} restarted {restarts} times during the rollout"
        );
    }

    // install-cni's work, in each node's own directories.
    let plugin = std::fs::read(rootfs.join("opt/starling/bin/starling"))?;
    let mut conflist_written = HashMap::new();
    for node in &c.nodes {
        let bin = c.node_path(node, "/opt/cni/bin/starling")?;
        let installed = std::fs::read(&bin)
            .with_context(|| format!("{node}: install-cni left no {}", bin.display()))?;
        ensure!(
            installed == plugin,
            "{node}: /opt/cni/bin/starling is not the image's plugin"
        );
        let conf = c.node_path(node, "/etc/cni/net.d/10-starling.conflist")?;
        let text = std::fs::read_to_string(&conf)
            .with_context(|| format!("{node}: install-cni left no {}", conf.display()))?;
        let list: Value = serde_json::from_str(&text)
            .with_context(|| format!("{node}: {} is not JSON", conf.display()))?;
        ensure!(
            list["plugins"][0]["type"] == "starling",
            "{node}: the conflist's first plugin is not starling: {text}"
        );
        ensure!(
            list["cniVersion"] == "1.1.0",
            "{node}: the conflist is not the 1.1.0 the manifests asked for: {text}"
        );
        conflist_written.insert(node.clone(), std::fs::metadata(&conf)?.modified()?);
    }

    // Nodes turn Ready, and not before their conflist was there.
    wait_for("every node Ready", Duration::from_secs(60), || {
        Ok(c.nodes
            .iter()
            .map(|n| ready_condition(c, n))
            .collect::<Result<Vec<_>>>()?
            .iter()
            .all(|(s, _)| s == "True"))
    })?;
    for node in &c.nodes {
        let since = ready_since(c, node)?;
        let written = conflist_written[node];
        // The API's times have whole seconds: compare at that precision.
        let secs = |t: SystemTime| -> Result<u64> {
            Ok(t.duration_since(SystemTime::UNIX_EPOCH)?.as_secs())
        };
        ensure!(
            secs(since)? >= secs(written)?,
            "{node} turned Ready ({since:?}) before its conflist was written ({written:?})"
        );
    }
    log_line(&format!(
        "rollout: {NODES} agents Ready in {:.1}s; plugin and conflist on every node; nodes Ready after",
        rollout.as_secs_f64()
    ));
    Ok(())
}

/// The node's Ready condition: (status, message).
fn ready_condition(c: &KubeCluster, node: &str) -> Result<(String, String)> {
    let n = c.get_json(&["node", node])?;
    let cond = ready(&n).with_context(|| format!("{node} has no Ready condition"))?;
    Ok((
        cond["status"].as_str().unwrap_or("").to_string(),
        cond["message"].as_str().unwrap_or("").to_string(),
    ))
}

fn ready(node: &Value) -> Option<&Value> {
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
}

/// When the node's Ready condition last changed.
fn ready_since(c: &KubeCluster, node: &str) -> Result<SystemTime> {
    let n = c.get_json(&["node", node])?;
    let t = ready(&n)
        .and_then(|c| c["lastTransitionTime"].as_str())
        .with_context(|| format!("{node}: no Ready lastTransitionTime"))?;
    rfc3339(t)
}

/// `2026-12-02T15:04:05Z` (what the API writes) as a SystemTime.
fn rfc3339(t: &str) -> Result<SystemTime> {
    let bad = || format!("`{t}` is not an RFC 3339 UTC time");
    let (date, time) = t
        .strip_suffix('Z')
        .and_then(|t| t.split_once('T'))
        .with_context(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(bad)?;
    let h: Vec<i64> = time
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(bad)?;
    ensure!(d.len() == 3 && h.len() == 3, "{}", bad());
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h[0] * 3600 + h[1] * 60 + h[2];
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs)?))
}

/// The starling-agent pod on each node.
fn agent_pods(c: &KubeCluster) -> Result<BTreeMap<String, String>> {
    let list = c.get_json(&[
        "pods",
        "-n",
        "kube-system",
        "-l",
        "app.kubernetes.io/name=starling-agent",
    ])?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["spec"]["nodeName"].as_str()?.to_string(),
                p["metadata"]["name"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// A pod of the test: where it runs and its address.
#[derive(Debug, Clone)]
struct Pod {
    name: String,
    node: String,
    ip: IpAddr,
}

fn test_pods(c: &KubeCluster) -> Result<Vec<Pod>> {
    let list = c.get_json(&["pods", "-n", NS])?;
    let mut pods = Vec::new();
    for p in list["items"].as_array().into_iter().flatten() {
        let name = p["metadata"]["name"].as_str().unwrap_or("").to_string();
        if p["status"]["phase"] != "Running" {
            bail!("{name} is {}", p["status"]["phase"]);
        }
        let ip = p["status"]["podIP"]
            .as_str()
            .with_context(|| format!("{name} is Running without a podIP"))?;
        pods.push(Pod {
            node: p["spec"]["nodeName"].as_str().unwrap_or("").to_string(),
            ip: ip.parse().with_context(|| format!("{name}: podIP {ip}"))?,
            name,
        });
    }
    Ok(pods)
}

/// `starlingctl ipam show -o json`, run in the node's agent pod.
fn ipam_show(c: &KubeCluster, agent: &str) -> Result<Value> {
    let out = c.kubectl_ok(&[
        "exec",
        "-n",
        "kube-system",
        agent,
        "-c",
        "starling-agent",
        "--",
        "starlingctl",
        "ipam",
        "show",
        "-o",
        "json",
    ])?;
    serde_json::from_str(&out).with_context(|| format!("starlingctl ipam show in {agent}: {out}"))
}

/// The pod addresses IPAM has handed out on a node.
fn allocated(report: &Value) -> BTreeSet<IpAddr> {
    owners(report).into_keys().collect()
}

/// Each address IPAM has handed out on a node, with the pod it recorded
/// (`namespace/name` from CNI_ARGS; `-` when none was recorded).
fn owners(report: &Value) -> BTreeMap<IpAddr, String> {
    report["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let ip = p["destination"].as_str()?.parse::<IpNet>().ok()?.addr();
            let pod = match (p["pod"]["namespace"].as_str(), p["pod"]["name"].as_str()) {
                (Some(ns), Some(name)) => format!("{ns}/{name}"),
                _ => "-".to_string(),
            };
            Some((ip, pod))
        })
        .collect()
}

/// Records when each pod of a namespace is first reported Running, from a
/// `kubectl get -w` stream (the kubelet's status updates as the API sees them).
struct RunningWatch {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    _kubectl: Daemon,
}

impl RunningWatch {
    fn start(c: &KubeCluster) -> Result<RunningWatch> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{}-cp", c.tag)])
            .arg(&c.env["KUBECTL"])
            .arg("--kubeconfig")
            .arg(c.dir.join("cp/admin.kubeconfig"))
            .args([
                "get",
                "pods",
                "-n",
                NS,
                "--watch",
                "-o",
                "jsonpath={.metadata.name} {.status.phase}{\"\\n\"}",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut kubectl = Daemon::spawn("kubectl get pods --watch", cmd)?;
        let stdout = kubectl.child.stdout.take().context("watch stdout")?;
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((name, "Running")) = line.trim().split_once(' ') {
                    s.lock()
                        .expect("watch map")
                        .entry(name.to_string())
                        .or_insert_with(Instant::now);
                }
            }
        });
        Ok(RunningWatch {
            seen,
            _kubectl: kubectl,
        })
    }

    fn running_at(&self) -> HashMap<String, Instant> {
        self.seen.lock().expect("watch map").clone()
    }
}

/// Step 2: a Deployment spread over the nodes and a pod pinned to each node;
/// every pod gets an address from the pool through kubelet -> containerd ->
/// starling, and the node's IPAM shows exactly the pods kubectl shows there.
fn pods_get_addresses(c: &KubeCluster) -> Result<Vec<Pod>> {
    let busybox = &c.env["BUSYBOX_IMAGE"];
    c.kubectl_ok(&["create", "namespace", NS])?;
    // The controller-manager creates the namespace's `default`
    // ServiceAccount; pods are refused until it exists.
    wait_for(
        "the default ServiceAccount",
        Duration::from_secs(30),
        || {
            Ok(
                c.kubectl(&["get", "serviceaccount", "default", "-n", NS], None)?
                    .status
                    .success(),
            )
        },
    )?;
    let watch = RunningWatch::start(c)?;
    let pod_spec = format!(
        "terminationGracePeriodSeconds: 1\n    containers:\n    - name: busybox\n      image: {busybox}\n      \
         imagePullPolicy: Never\n      command: [sleep, \"3600\"]"
    );
    let mut yaml = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: spread, namespace: {NS}}}\nspec:\n  \
         replicas: {}\n  selector: {{matchLabels: {{app: spread}}}}\n  template:\n    metadata: {{labels: {{app: spread}}}}\n    \
         spec:\n      topologySpreadConstraints:\n      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, \
         whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: spread}}}}}}\n      {}\n",
        PER_NODE * NODES,
        pod_spec.replace("\n    ", "\n      ")
    );
    for node in &c.nodes {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pinned-{node}, namespace: {NS}, labels: {{pinned: \"true\"}}}}\n\
             spec:\n    nodeSelector: {{kubernetes.io/hostname: {node}}}\n    {pod_spec}\n"
        ));
    }
    let created = Instant::now();
    c.kubectl_stdin(&["apply", "-f", "-"], &yaml)?;
    let total = NODES * (PER_NODE + 1);
    wait_for(
        &format!("{total} test pods Running with an address"),
        Duration::from_secs(180),
        || Ok(test_pods(c)?.len() == total),
    )?;
    let pods = test_pods(c)?;
    let at = watch.running_at();
    let mut pinned: Vec<f64> = c
        .nodes
        .iter()
        .filter_map(|n| at.get(&format!("pinned-{n}")))
        .map(|t| t.duration_since(created).as_secs_f64())
        .collect();
    ensure!(
        pinned.len() == NODES,
        "the watch saw {} of {NODES} pinned pods Running: {at:?}",
        pinned.len()
    );
    pinned.sort_by(f64::total_cmp);
    figure("pod_created_to_running_p50", pinned[NODES / 2], "s");
    figure("pod_created_to_running_max", pinned[NODES - 1], "s");
    let all = at
        .values()
        .map(|t| t.duration_since(created).as_secs_f64())
        .fold(0.0, f64::max);
    figure("all_test_pods_running", all, "s");

    let pool: IpNet = POOL.parse()?;
    let mut per_node: BTreeMap<&str, BTreeSet<IpAddr>> = BTreeMap::new();
    for p in &pods {
        ensure!(
            pool.contains(&p.ip),
            "{} got {} outside the pool {pool}",
            p.name,
            p.ip
        );
        ensure!(
            per_node.entry(&p.node).or_default().insert(p.ip),
            "{} duplicates address {}",
            p.name,
            p.ip
        );
    }
    let all_ips: BTreeSet<IpAddr> = pods.iter().map(|p| p.ip).collect();
    ensure!(
        all_ips.len() == pods.len(),
        "two pods share an address: {pods:?}"
    );
    for node in &c.nodes {
        let n = per_node.get(node.as_str()).map_or(0, BTreeSet::len);
        ensure!(
            n == PER_NODE + 1,
            "{node} runs {n} test pods, expected {} (spread + pinned): {pods:?}",
            PER_NODE + 1
        );
    }
    // IPAM on each node holds exactly the pods kubectl shows there, by
    // namespace/name and address (the plugin passes CNI_ARGS' pod on), in
    // blocks the node holds.
    let agents = agent_pods(c)?;
    for node in &c.nodes {
        let report = ipam_show(c, &agents[node])?;
        let held = owners(&report);
        let shown: BTreeMap<IpAddr, String> = pods
            .iter()
            .filter(|p| &p.node == node)
            .map(|p| (p.ip, format!("{NS}/{}", p.name)))
            .collect();
        ensure!(
            held == shown,
            "{node}: starlingctl ipam show has {held:?}, kubectl get pods -o wide shows {shown:?}"
        );
        let blocks: Vec<IpNet> = report["blocks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["cidr"].as_str()?.parse().ok())
            .collect();
        for ip in shown.keys() {
            ensure!(
                blocks.iter().any(|b| b.contains(ip)),
                "{node}: {ip} is in none of the node's blocks {blocks:?}"
            );
        }
    }
    log_line(&format!(
        "{total} pods Running with addresses; pinned pods created -> Running in {:.1}-{:.1}s",
        pinned[0],
        pinned[NODES - 1]
    ));
    Ok(pods)
}

/// Every pod pings every other pod (kubectl exec in each source pod).
fn pods_reach_each_other(c: &KubeCluster, pods: &[Pod]) -> Result<()> {
    for from in pods {
        let targets: Vec<String> = pods
            .iter()
            .filter(|p| p.name != from.name)
            .map(|p| p.ip.to_string())
            .collect();
        let script = format!(
            "for ip in {}; do ping -c 1 -W 2 $ip >/dev/null 2>&1 || echo \"no answer from $ip\"; done",
            targets.join(" ")
        );
        // Routes arrive by BGP after the agents turned Ready: retry until the
        // deadline, then report what is still unanswered.
        let mut last = String::new();
        wait_for(
            &format!("{} ({}) to reach every other pod", from.name, from.node),
            Duration::from_secs(60),
            || {
                last = c.kubectl_ok(&["exec", "-n", NS, &from.name, "--", "sh", "-c", &script])?;
                Ok(last.trim().is_empty())
            },
        )
        .with_context(|| format!("{}: {last}", from.name))?;
    }
    log_line(&format!(
        "ping: each of {} pods reaches the {} others",
        pods.len(),
        pods.len() - 1
    ));
    Ok(())
}

/// `kubectl exec` in a test pod.
fn in_pod(c: &KubeCluster, pod: &str, script: &str) -> Result<String> {
    c.kubectl_ok(&["exec", "-n", NS, pod, "--", "sh", "-c", script])
}

/// Step 4: a rolling update of the DaemonSet (a change of its pod
/// template) while a pod pings a pod on another node at 50 packets/s: none
/// lost, and no node's kernel route of Starling's is deleted on the way
/// (the restarted agents adopt what the old ones left; `ip monitor route`
/// in every node's namespace would show a delete-and-re-add as `Deleted`).
/// Returns the packets lost and route deletions seen (the test fails on
/// them after the later steps ran).
fn a_rolling_update_loses_no_packet(c: &KubeCluster, pods: &[Pod]) -> Result<Vec<String>> {
    let pinned = |n: &str| {
        pods.iter()
            .find(|p| p.name == format!("pinned-{n}"))
            .with_context(|| format!("no pinned pod on {n}"))
    };
    let (from, to) = (pinned(&c.nodes[0])?, pinned(&c.nodes[1])?);
    let mut monitors = Vec::new();
    for node in &c.nodes {
        let file = c.dir.join(format!("route-monitor-{node}.log"));
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &c.netns(node)?, "-timestamp", "monitor", "route"])
            .stdout(Stdio::from(std::fs::File::create(&file)?))
            .stderr(Stdio::null());
        monitors.push((node.clone(), file, Daemon::spawn("ip monitor route", cmd)?));
    }
    let before = agent_pods(c)?;
    // busybox ping prints its statistics on SIGINT.
    let pid = in_pod(
        c,
        &from.name,
        &format!(
            "ping -i 0.02 {} </dev/null >/rollout.ping 2>&1 & echo $!",
            to.ip
        ),
    )?;
    let pid = pid.trim().to_string();
    // Its output goes to a file, block-buffered until it exits: check the
    // process instead.
    ensure!(
        in_pod(c, &from.name, &format!("kill -0 {pid} && echo running"))?.contains("running"),
        "the ping in {} did not start",
        from.name
    );
    let start = Instant::now();
    c.kubectl_ok(&[
        "-n",
        "kube-system",
        "set",
        "env",
        "daemonset/starling-agent",
        "-c",
        "starling-agent",
        "STARLING_ROLLOUT_TEST=1",
    ])?;
    wait_for(
        "the DaemonSet rolled out to every node",
        Duration::from_secs(300),
        || {
            let ds = c.get_json(&["daemonset", "starling-agent", "-n", "kube-system"])?;
            let s = &ds["status"];
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            let now = agent_pods(c)?;
            Ok(s["observedGeneration"] == ds["metadata"]["generation"]
                && n("updatedNumberScheduled") == NODES as u64
                && n("numberReady") == NODES as u64
                && n("numberAvailable") == NODES as u64
                && now.len() == NODES
                && now.iter().all(|(node, pod)| before.get(node) != Some(pod)))
        },
    )?;
    let rollout = start.elapsed();
    for (node, pod) in agent_pods(c)? {
        let p = c.get_json(&["pod", &pod, "-n", "kube-system"])?;
        let restarts: u64 = p["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["restartCount"].as_u64().unwrap_or(0))
            .sum();
        ensure!(
            restarts == 0,
            "{pod} on {node} restarted {restarts} times during the rolling update"
        );
    }
    // A little more traffic after the last agent turned Ready.
    std::thread::sleep(Duration::from_secs(2));
    in_pod(c, &from.name, &format!("kill -INT {pid}"))?;
    let mut stats = String::new();
    wait_for("the ping's statistics", Duration::from_secs(10), || {
        stats = in_pod(c, &from.name, "cat /rollout.ping")?;
        Ok(stats.contains("packets received"))
    })?;
    for (_, _, mut d) in monitors {
        d.kill();
    }
    let counts: Vec<u64> = stats
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .context("no statistics line")?
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    ensure!(
        counts.len() >= 2,
        "cannot read the ping statistics: {stats}"
    );
    let sent = counts[0];
    // Lost: a sequence number without a reply, except the last one sent,
    // whose reply may still have been on its way when SIGINT came.
    let answered: BTreeSet<u64> = stats
        .lines()
        .filter_map(|l| {
            l.split("seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let lost = (0..sent.saturating_sub(1))
        .filter(|seq| !answered.contains(seq))
        .count() as u64;
    figure("rolling_update", rollout.as_secs_f64(), "s");
    figure("rolling_update_packets_sent", sent as f64, "packets");
    figure("rolling_update_packets_lost", lost as f64, "packets");
    ensure!(
        sent as f64 >= rollout.as_secs_f64() * 50.0 * 0.8,
        "only {sent} pings sent in {:.1}s: the ping did not run through the rollout: {stats}",
        rollout.as_secs_f64()
    );
    let mut deleted = Vec::new();
    for node in &c.nodes {
        let file = c.dir.join(format!("route-monitor-{node}.log"));
        let text = std::fs::read_to_string(&file)?;
        deleted.extend(
            text.lines()
                .filter(|l| l.contains("Deleted") && l.contains("proto 73"))
                .map(|l| format!("{node}: {}", l.trim())),
        );
    }
    figure(
        "rolling_update_routes_deleted",
        deleted.len() as f64,
        "routes",
    );
    // Loss and flaps fail the test at its end (after steps 3 and 5).
    let mut flaps = Vec::new();
    if lost > 0 {
        let summary: Vec<&str> = stats
            .lines()
            .filter(|l| !l.contains("seq=") || l.contains("DUP"))
            .collect();
        flaps.push(format!(
            "{lost} of {sent} pings {} -> {} lost: {}",
            from.name,
            to.name,
            summary.join("\n")
        ));
    }
    flaps.extend(deleted.iter().map(|d| format!("route deleted on {d}")));
    log_line(&format!(
        "rolling update: {NODES} agents replaced in {:.1}s; {sent} pings {} -> {}, {lost} lost; {} route(s) of ours deleted{}",
        rollout.as_secs_f64(),
        from.node,
        to.node,
        flaps.len(),
        if flaps.is_empty() {
            String::new()
        } else {
            format!(": {flaps:?}")
        }
    ));
    Ok(flaps)
}

/// Step 3: pods deleted -> the kubelet tears down their sandboxes, containerd
/// calls DEL, and every address is released.
/// Step 3, STATUS: the kubelet asks the runtime for its status every few
/// seconds and containerd 2.x answers NetworkReady from the plugin's STATUS
/// (CNI 1.1), which the plugin asks the agent over the CNI socket. Those
/// calls are the only STATUS requests the agent's socket gets, so its
/// `cmd="status"` count rising on every node is containerd calling it.
/// (No containerd calls CHECK; the `k8s` target drives it through libcni.)
fn the_runtime_calls_status(c: &KubeCluster) -> Result<()> {
    let before: Vec<f64> = c
        .nodes
        .iter()
        .map(|n| status_calls(c, n))
        .collect::<Result<_>>()?;
    for (node, was) in c.nodes.iter().zip(before) {
        let mut now = was;
        wait_for(
            &format!("{node}: containerd calling the plugin's STATUS"),
            Duration::from_secs(30),
            || {
                now = status_calls(c, node)?;
                Ok(now > was)
            },
        )?;
        log_line(&format!(
            "{node}: STATUS calls from containerd {was} -> {now}"
        ));
    }
    Ok(())
}

/// The ADDs of the kubelet's pods read their IPAM annotations from the
/// agent's watch of its node's pods, not from the API server: a kubelet
/// starts a pod only after its own watch delivered it, and the agent's
/// watch hears the same event long before the sandbox is made.
fn kubelet_adds_find_their_pods_in_the_agents_watch(c: &KubeCluster, pods: &[Pod]) -> Result<()> {
    let (mut watch, mut api) = (0.0, 0.0);
    for node in &c.nodes {
        watch += metric(
            c,
            node,
            r#"starling_ipam_annotation_reads_total{source="watch"}"#,
        )?;
        api += metric(
            c,
            node,
            r#"starling_ipam_annotation_reads_total{source="apiserver"}"#,
        )?;
    }
    log_line(&format!(
        "annotation reads of {} pods: {watch} from the agents' watches, {api} from the API server",
        pods.len()
    ));
    ensure!(
        watch >= pods.len() as f64 && api == 0.0,
        "the kubelet's ADDs read their annotations {watch} times from the agents' watches (want at least {}) and {api} times from the API server (want 0)",
        pods.len()
    );
    Ok(())
}

/// `starling_cni_request_duration_seconds_count{cmd="status"}` from the
/// agent's metrics listener on `node` (hostNetwork, port 9091).
fn status_calls(c: &KubeCluster, node: &str) -> Result<f64> {
    metric(
        c,
        node,
        r#"starling_cni_request_duration_seconds_count{cmd="status"}"#,
    )
}

/// One series `key` of the agent's metrics on `node` (0 when absent).
fn metric(c: &KubeCluster, node: &str, key: &str) -> Result<f64> {
    let text = starling_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            &c.netns(node)?,
            "python3",
            "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9091/metrics', timeout=5).read().decode())",
        ],
    )?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().parse::<f64>())
        .transpose()
        .with_context(|| format!("{node}: {key} is not a number"))?
        .unwrap_or(0.0))
}

fn deleted_pods_release_their_addresses(c: &KubeCluster) -> Result<()> {
    c.kubectl_ok(&["delete", "deployment", "spread", "-n", NS, "--wait=false"])?;
    c.kubectl_ok(&[
        "delete",
        "pods",
        "-l",
        "pinned=true",
        "-n",
        NS,
        "--wait=false",
    ])?;
    wait_for("every test pod gone", Duration::from_secs(120), || {
        Ok(c.get_json(&["pods", "-n", NS])?["items"]
            .as_array()
            .is_some_and(|a| a.is_empty()))
    })?;
    let agents = agent_pods(c)?;
    for node in &c.nodes {
        let mut held = BTreeSet::new();
        wait_for(
            &format!("{node}: every address released"),
            Duration::from_secs(60),
            || {
                held = allocated(&ipam_show(c, &agents[node])?);
                Ok(held.is_empty())
            },
        )
        .with_context(|| format!("{node} still holds {held:?}"))?;
        // The host side of each pod's veth is gone with it.
        let links = starling_tests::run("ip", &["-n", &c.netns(node)?, "-o", "link", "show"])?;
        let left: Vec<&str> = links
            .lines()
            // The node's own uplink is a veth too (to the underlay bridge).
            .filter(|l| l.contains("link-netns") && !l.contains(" eth0@"))
            .collect();
        ensure!(left.is_empty(), "{node}: pod interfaces left: {left:?}");
    }
    log_line("delete: every address released, no pod interface left");
    Ok(())
}

/// The blocks `node` claims, from the BlockAffinity objects.
fn affinities_of(c: &KubeCluster, node: &str) -> Result<BTreeSet<IpNet>> {
    let list = c.get_json(&["blockaffinities"])?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["spec"]["node"] == node)
        .filter_map(|a| a["spec"]["cidr"].as_str()?.parse().ok())
        .collect())
}

/// Starling's kernel route to `block` on `node`, if any.
fn route_to(c: &KubeCluster, node: &str, block: &IpNet) -> Result<String> {
    starling_tests::run(
        "ip",
        &[
            "-n",
            &c.netns(node)?,
            "route",
            "show",
            "exact",
            &block.to_string(),
            "proto",
            "73",
        ],
    )
    .map(|s| s.trim().to_string())
}

/// Step 5: a node drained, powered off and deleted from the API. One agent,
/// the holder of the `starling-node-cleanup` Lease, releases its blocks
/// (their BlockAffinities go); the other nodes drop their routes to them.
fn a_deleted_node_is_cleaned_up_by_one_agent(c: &KubeCluster) -> Result<()> {
    let gone = c.nodes.last().context("no nodes")?.clone();
    let others: Vec<String> = c.nodes.iter().filter(|n| **n != gone).cloned().collect();
    let blocks = affinities_of(c, &gone)?;
    ensure!(
        !blocks.is_empty(),
        "{gone} claims no block before it is deleted"
    );
    for node in &others {
        for b in &blocks {
            wait_for(
                &format!("{node}: a route to {gone}'s block {b}"),
                Duration::from_secs(60),
                || Ok(!route_to(c, node, b)?.is_empty()),
            )?;
        }
    }
    c.kubectl_ok(&[
        "drain",
        &gone,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--force",
        "--timeout",
        "60s",
    ])?;
    c.stop_node(&gone)?;
    let deleted = Instant::now();
    c.kubectl_ok(&["delete", "node", &gone])?;
    wait_for(
        &format!("{gone}'s BlockAffinities removed"),
        Duration::from_secs(120),
        || Ok(affinities_of(c, &gone)?.is_empty()),
    )?;
    figure(
        "deleted_node_blocks_released",
        deleted.elapsed().as_secs_f64(),
        "s",
    );
    for node in &others {
        for b in &blocks {
            let mut last = String::new();
            wait_for(
                &format!("{node}: the route to {gone}'s block {b} withdrawn"),
                Duration::from_secs(120),
                || {
                    last = route_to(c, node, b)?;
                    Ok(last.is_empty())
                },
            )
            .with_context(|| format!("still: {last}"))?;
        }
    }
    // Exactly one agent did it: the Lease's holder.
    let lease = c.get_json(&["lease", "starling-node-cleanup", "-n", "kube-system"])?;
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .context("the node-cleanup Lease has no holder")?
        .to_string();
    let agents = agent_pods(c)?;
    let said = format!("released the blocks of deleted node {gone}");
    let mut cleaners = Vec::new();
    for node in &others {
        let pod = agents
            .get(node)
            .with_context(|| format!("no starling-agent pod on {node}"))?;
        let logs = c.kubectl_ok(&["logs", "-n", "kube-system", pod, "-c", "starling-agent"])?;
        if logs.contains(&said) {
            cleaners.push(node.clone());
        }
    }
    ensure!(
        cleaners == [holder.clone()],
        "expected only the Lease holder {holder} to release {gone}'s blocks; logged by {cleaners:?}"
    );
    log_line(&format!(
        "node delete: {gone}'s blocks {blocks:?} released by {holder} (the Lease holder) in {:.1}s, routes gone from {others:?}",
        deleted.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// What the cluster looks like, for a failure message.
fn state(c: &KubeCluster) -> String {
    let mut s = String::new();
    for args in [
        &["get", "nodes", "-o", "wide"][..],
        &["get", "pods", "-A", "-o", "wide"][..],
        &["get", "events", "-A", "--sort-by", ".lastTimestamp"][..],
    ] {
        match c.kubectl(args, None) {
            Ok(out) => s.push_str(&format!(
                "$ kubectl {}\n{}{}\n",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => s.push_str(&format!("kubectl {}: {e:#}\n", args.join(" "))),
        }
    }
    if let Ok(agents) = agent_pods(c) {
        for (node, pod) in agents {
            for ctr in ["install-cni", "starling-agent"] {
                if let Ok(out) = c.kubectl(
                    &["logs", "-n", "kube-system", &pod, "-c", ctr, "--tail", "30"],
                    None,
                ) {
                    s.push_str(&format!(
                        "--- {ctr} on {node} ({pod})\n{}{}\n",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        }
    }
    s
}
