//! Real Kubernetes nodes for the `kubelet` system tests: a control plane
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) and nodes
//! each running their own containerd and kubelet, started by
//! `tests/k8s/cluster.sh` (see docs/testing.md, "Real nodes").
//!
//! [`KubeCluster`] takes the cluster down when dropped, also when a test
//! fails; a watchdog shell does it if the test process is killed outright.
//! Nothing here starts Starling: the tests install it as users do, with the
//! image `scripts/image.sh` builds and the manifests.

use crate::bin;
use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The repository root, where `manifests/`, `scripts/` and `tests/k8s/` live.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn cluster_script() -> PathBuf {
    repo_root().join("tests/k8s/cluster.sh")
}

/// What `cluster.sh env` prints: tool paths and the test images.
pub fn cluster_env() -> Result<HashMap<String, String>> {
    let out = Command::new("bash")
        .arg(cluster_script())
        .arg("env")
        .stdin(Stdio::null())
        .output()
        .context("cannot run tests/k8s/cluster.sh env")?;
    ensure!(
        out.status.success(),
        "cluster.sh env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Fail naming every missing binary or image and what provides it.
fn check_prerequisites(env: &HashMap<String, String>) -> Result<()> {
    let build = "bash tests/k8s/control-plane.sh build (scripts/setup.sh --tests runs it)";
    let images = "bash tests/k8s/cluster.sh images (scripts/setup.sh --tests runs it)";
    let needs = [
        ("KUBE_APISERVER", build),
        ("KUBECTL", build),
        ("KUBELET", build),
        ("KUBE_CONTROLLER_MANAGER", build),
        ("KUBE_SCHEDULER", build),
        ("CONTAINERD", build),
        ("CTR", build),
        ("RUNC", "Debian package runc (.ci/packages)"),
        ("PAUSE_TAR", images),
        ("BUSYBOX_TAR", images),
    ];
    let mut missing = Vec::new();
    for (key, from) in needs {
        let path = env.get(key).map(PathBuf::from).unwrap_or_default();
        if !path.is_file() {
            missing.push(format!("{} ({key}): {from}", path.display()));
        }
    }
    for (path, from) in [
        (
            "/usr/lib/cni/loopback",
            "Debian package containernetworking-plugins",
        ),
        ("/usr/bin/nsenter", "Debian package util-linux"),
    ] {
        if !Path::new(path).is_file() {
            missing.push(format!("{path}: {from}"));
        }
    }
    ensure!(
        missing.is_empty(),
        "the kubelet tests need:\n  {}",
        missing.join("\n  ")
    );
    Ok(())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running cluster of real nodes; taken down when dropped.
pub struct KubeCluster {
    /// Certificates, logs, node roots (removed on drop).
    pub dir: PathBuf,
    /// Names the cluster's network namespaces (`TAG-cp`, `TAG-n1`, ...) and cgroups.
    pub tag: String,
    /// Node names, `node1` ...
    pub nodes: Vec<String>,
    pub env: HashMap<String, String>,
    kubectl: PathBuf,
}

impl KubeCluster {
    /// Start a control plane and `nodes` nodes. Nodes are registered, with
    /// podCIDRs, and NotReady (no CNI network yet) when this returns.
    pub fn up(nodes: usize) -> Result<KubeCluster> {
        let env = cluster_env()?;
        check_prerequisites(&env)?;
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("k{}{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("starling-kubelet-{tag}"));
        std::fs::create_dir_all(&dir)?;
        // If this process dies without running Drop (SIGKILL), the watchdog
        // takes the cluster down anyway.
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null && [ -d '{d}' ]; do sleep 1; done; bash '{s}' down '{d}'; rm -rf '{d}'",
            pid = std::process::id(),
            s = cluster_script().display(),
            d = dir.display()
        );
        Command::new("setsid")
            .args(["bash", "-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the cluster watchdog")?;
        let cluster = KubeCluster {
            kubectl: PathBuf::from(&env["KUBECTL"]),
            dir: dir.clone(),
            tag: tag.clone(),
            nodes: (1..=nodes).map(|i| format!("node{i}")).collect(),
            env,
        };
        let out = Command::new("bash")
            .arg(cluster_script())
            .args(["up", dir.to_str().context("dir")?, &nodes.to_string()])
            .env("TAG", &tag)
            .stdin(Stdio::null())
            .output()
            .context("cannot run tests/k8s/cluster.sh up")?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success(),
            "cluster.sh up failed: {said}\n{}",
            cluster.logs()
        );
        crate::log_line(said.trim_end());
        Ok(cluster)
    }

    /// kubectl as the cluster admin (it runs in the control plane's network
    /// namespace, where the API server listens); output whatever the status.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let admin = self.dir.join("cp/admin.kubeconfig");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{}-cp", self.tag)])
            .arg(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&admin)
            .args(["--request-timeout", "30s"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd.spawn().context("cannot run kubectl")?;
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .context("kubectl stdin")?
                .write_all(input.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// kubectl's stdout, or an error with its arguments and stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args, None)?;
        checked(args, &out)
    }

    /// kubectl with `input` on stdin (`apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        let out = self.kubectl(args, Some(input))?;
        checked(args, &out)
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let text = self.kubectl_ok(&a)?;
        serde_json::from_str(&text).with_context(|| format!("kubectl {} -o json", args.join(" ")))
    }

    /// Where a path inside `node` is on the host: the node's /run, /var/lib
    /// and /var/log are directories of its own, /etc and /opt overlays whose
    /// changes land in an upper directory.
    pub fn node_path(&self, node: &str, path: &str) -> Result<PathBuf> {
        let root = self.dir.join("nodes").join(node).join("root");
        for (prefix, dir) in [
            ("/run/", "run"),
            ("/var/lib/", "var-lib"),
            ("/var/log/", "var-log"),
            ("/etc/", "etc.upper"),
            ("/opt/", "opt.upper"),
        ] {
            if let Some(rest) = path.strip_prefix(prefix) {
                return Ok(root.join(dir).join(rest));
            }
        }
        bail!(
            "{path} is the host's own on {node} (only /run, /var/lib, /var/log, /etc, /opt are per node)"
        )
    }

    /// The network namespace of `node`.
    pub fn netns(&self, node: &str) -> Result<String> {
        let i = node
            .strip_prefix("node")
            .with_context(|| format!("no node {node}"))?;
        Ok(format!("{}-n{i}", self.tag))
    }

    /// Power `node` off: its kubelet, containerd and containers killed, its
    /// namespaces removed. The Node object stays (as when a machine dies).
    pub fn stop_node(&self, node: &str) -> Result<()> {
        let out = Command::new("bash")
            .arg(cluster_script())
            .args(["stop-node", self.dir.to_str().context("dir")?, node])
            .stdin(Stdio::null())
            .output()
            .context("cannot run cluster.sh stop-node")?;
        ensure!(
            out.status.success(),
            "cluster.sh stop-node {node} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Load an image archive into every node's containerd.
    pub fn import(&self, archive: &Path) -> Result<()> {
        let out = Command::new("bash")
            .arg(cluster_script())
            .args(["import", self.dir.to_str().context("dir")?])
            .arg(archive)
            .stdin(Stdio::null())
            .output()
            .context("cannot run cluster.sh import")?;
        ensure!(
            out.status.success(),
            "cluster.sh import {} failed: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The last lines of every daemon's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut files = vec![
            self.dir.join("cp/kube-apiserver.log"),
            self.dir.join("cp/kube-controller-manager.log"),
            self.dir.join("cp/kube-scheduler.log"),
        ];
        for n in &self.nodes {
            files.push(self.dir.join("nodes").join(n).join("containerd.log"));
            files.push(self.dir.join("nodes").join(n).join("kubelet.log"));
        }
        let mut s = String::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            s.push_str(&format!(
                "--- {} (last 15 lines)\n{}\n",
                f.display(),
                tail.join("\n")
            ));
        }
        s
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(cluster_script())
            .arg("down")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if std::env::var_os("STARLING_KEEP_CLUSTER_LOGS").is_some() {
            crate::log_line(&format!("cluster logs kept in {}", self.dir.display()));
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// kubectl's stdout, or an error naming the command and its stderr.
pub fn checked(args: &[&str], out: &Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "kubectl {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Starling image built by `scripts/image.sh` from this build's
/// binaries, as an archive in `dir`; returns (archive, staged rootfs).
pub fn starling_image(tag: &str, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let agent = bin("starling-agent");
    let bins = agent.parent().context("binary dir")?;
    let out_file = dir.join("image/starling.tar");
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/image.sh"))
        .args(["build", "--tag", tag, "--out"])
        .arg(&out_file)
        .env("STARLING_BIN_DIR", bins)
        .stdin(Stdio::null())
        .output()
        .context("cannot run scripts/image.sh")?;
    ensure!(
        out.status.success(),
        "scripts/image.sh build failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    crate::log_line(String::from_utf8_lossy(&out.stdout).trim_end());
    Ok((out_file, dir.join("image/rootfs")))
}
