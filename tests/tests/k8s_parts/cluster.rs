//! One real control plane (etcd + kube-apiserver on loopback, started by
//! `tests/k8s/control-plane.sh up`) shared by every test in the `k8s` target.
//!
//! It starts on first use and stops when the test process exits, also when
//! tests fail: an `atexit` hook runs `control-plane.sh down`, and a watchdog
//! shell does the same if the test process is killed outright.

// Shared by every part of the k8s target; not each part uses every item.
#![allow(dead_code)]

use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The running control plane and the tools built for it (used by path, never from PATH).
pub struct Cluster {
    /// Certificates, logs, etcd data and pid files of this run.
    pub dir: PathBuf,
    /// Admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub cnitool: PathBuf,
    /// `https://127.0.0.1:<port>`
    pub server: String,
    /// CA that signed the serving certificate.
    pub ca: PathBuf,
    /// The server's `gitVersion`, e.g. `v1.33.13`.
    pub version: String,
    manifests: OnceLock<Result<(), String>>,
    /// Stopped on drop (a `private` one); the shared one stops at exit.
    owned: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owned {
            down(&self.dir);
        }
    }
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The shared control plane, started on first call. Panics with the reason
/// (missing binary and the command that builds it, or the start-up log) if it
/// cannot run: a k8s test never passes without a real apiserver.
pub fn cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(|| Cluster::start().map_err(|e| format!("{e:#}"))) {
        Ok(c) => c,
        Err(e) => panic!("no Kubernetes control plane: {e}"),
    }
}

/// Repository root (the workspace), where `manifests/` and `tests/k8s/` live.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn script() -> PathBuf {
    repo_root().join("tests/k8s/control-plane.sh")
}

/// A tool `control-plane.sh build` made (`KUBECTL`, `CNITOOL`, `KUBE_APISERVER`,
/// `ETCD`), or an error naming the missing file and the command that builds it.
pub fn tool(key: &str) -> Result<PathBuf> {
    let p = tool_paths()?
        .remove(key)
        .with_context(|| format!("control-plane.sh env printed no {key}"))?;
    ensure!(
        p.is_file(),
        "{} is missing (`{key}`); build it with `bash tests/k8s/control-plane.sh build` (.ci/run does)",
        p.display()
    );
    Ok(p)
}

/// Say something in the test log even when libtest captures output (the
/// `print!` macros are captured; a direct write to stderr is not).
pub fn log(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `control-plane.sh env`: where `build` puts each tool.
fn tool_paths() -> Result<HashMap<String, PathBuf>> {
    let out = Command::new("bash")
        .arg(script())
        .arg("env")
        .stdin(Stdio::null())
        .output()
        .context("cannot run tests/k8s/control-plane.sh env")?;
    ensure!(
        out.status.success(),
        "control-plane.sh env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
        .collect())
}

static DOWN_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn stop_at_exit() {
    if let Some(dir) = DOWN_DIR.get() {
        down(dir);
    }
}

fn down(dir: &Path) {
    let _ = Command::new("bash")
        .arg(script())
        .arg("down")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(dir);
}

impl Cluster {
    /// The API server's port, from its URL.
    pub fn port(&self) -> Result<u16> {
        self.server
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .with_context(|| format!("no port in {}", self.server))
    }

    fn start() -> Result<Cluster> {
        let dir = std::env::temp_dir().join(format!("starling-k8s-{}", std::process::id()));
        DOWN_DIR
            .set(dir.clone())
            .ok()
            .context("control plane started twice")?;
        // Statics are never dropped: stop the shared one when the process exits.
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(stop_at_exit) };
        Cluster::start_in(dir, false)
    }

    /// A control plane of its own (for a test that restarts or breaks it),
    /// stopped when dropped. Costs a few seconds and ~300 MiB while it runs.
    pub fn private(tag: &str) -> Result<Cluster> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("starling-k8s-{}-{tag}-{n}", std::process::id()));
        Cluster::start_in(dir, true)
    }

    fn start_in(dir: PathBuf, owned: bool) -> Result<Cluster> {
        let kubectl = tool("KUBECTL")?;
        let cnitool = tool("CNITOOL")?;
        tool("KUBE_APISERVER")?;
        tool("ETCD")?;
        std::fs::create_dir_all(&dir)?;
        // If the test process dies without running atexit or Drop
        // (SIGKILL), the watchdog notices and stops the control plane anyway.
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null && [ -d '{d}' ]; do sleep 1; done; bash '{s}' down '{d}'; rm -rf '{d}'",
            pid = std::process::id(),
            s = script().display(),
            d = dir.display()
        );
        Command::new("setsid")
            .args(["bash", "-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the control-plane watchdog")?;

        let up = Command::new("bash")
            .arg(script())
            .arg("up")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .context("cannot run control-plane.sh up")?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        if !up.status.success() {
            down(&dir);
            bail!("control-plane.sh up {} failed: {said}", dir.display());
        }
        log(said.trim_end());
        let server = std::fs::read_to_string(dir.join("server"))?
            .trim()
            .to_string();
        let mut c = Cluster {
            kubeconfig: dir.join("admin.kubeconfig"),
            ca: dir.join("ca.crt"),
            dir,
            kubectl,
            cnitool,
            server,
            version: String::new(),
            manifests: OnceLock::new(),
            owned,
        };
        let v: serde_json::Value = serde_json::from_str(&c.kubectl_ok(&["version", "-o", "json"])?)
            .context("kubectl version -o json")?;
        c.version = v["serverVersion"]["gitVersion"]
            .as_str()
            .context("no serverVersion.gitVersion")?
            .to_string();
        log(&format!("kube-apiserver gitVersion: {}", c.version));
        Ok(c)
    }

    /// Built kubectl with the admin kubeconfig; output whatever the status.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig, args, None)
    }

    /// Built kubectl with `kubeconfig`, feeding `stdin` if given.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--request-timeout", "30s"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut run = || -> std::io::Result<Output> {
            let mut child = cmd.spawn()?;
            if let Some(input) = stdin {
                child
                    .stdin
                    .take()
                    .expect("stdin is piped")
                    .write_all(input.as_bytes())?;
            }
            child.wait_with_output()
        };
        run().unwrap_or_else(|e| panic!("cannot run {}: {e}", self.kubectl.display()))
    }

    /// Admin kubectl; stdout, or an error with kubectl's stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        checked(args, self.kubectl(args))
    }

    /// Admin kubectl with `yaml` on stdin (`kubectl apply -f -` and friends).
    pub fn kubectl_stdin(&self, args: &[&str], yaml: &str) -> Output {
        self.kubectl_as(&self.kubeconfig, args, Some(yaml))
    }

    /// A fresh token for a ServiceAccount, signed by the apiserver.
    pub fn token_for(&self, namespace: &str, service_account: &str) -> Result<String> {
        Ok(self
            .kubectl_ok(&[
                "create",
                "token",
                service_account,
                "-n",
                namespace,
                "--duration",
                "1h",
            ])?
            .trim()
            .to_string())
    }

    /// Write a kubeconfig that authenticates with `token` (and nothing else) to `path`.
    pub fn kubeconfig_with_token(&self, token: &str, path: &Path) -> Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: starling-test\n  cluster:\n    \
                 server: {}\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    \
                 token: {token}\ncontexts:\n- name: sa\n  context:\n    cluster: starling-test\n    \
                 user: sa\n    namespace: kube-system\ncurrent-context: sa\n",
                self.server,
                self.ca.display()
            ),
        )
        .with_context(|| format!("writing {}", path.display()))
    }

    /// Apply manifests/crds.yaml and manifests/rbac.yaml once per test
    /// process and wait until every CRD is Established.
    pub fn ensure_manifests(&self) -> Result<()> {
        self.manifests
            .get_or_init(|| self.apply_manifests().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(anyhow::Error::msg)
    }

    /// Server-side apply of our manifests, then wait for Established.
    pub fn apply_manifests(&self) -> Result<()> {
        for file in ["manifests/crds.yaml", "manifests/rbac.yaml"] {
            let path = repo_root().join(file);
            self.kubectl_ok(&[
                "apply",
                "--server-side",
                "--field-manager",
                "starling-tests",
                "-f",
                path.to_str().context("path")?,
            ])
            .with_context(|| format!("applying {file}"))?;
        }
        let crds = repo_root().join("manifests/crds.yaml");
        self.kubectl_ok(&[
            "wait",
            "--for",
            "condition=Established",
            "--timeout",
            "60s",
            "-f",
            crds.to_str().context("path")?,
        ])
        .context("waiting for the CRDs to become Established")?;
        Ok(())
    }

    /// Stop kube-apiserver and start it again on the same URL and
    /// certificates (etcd keeps running, so every object survives); returns
    /// once it is ready again. On the shared cluster this interrupts every
    /// test running in parallel: use it on a `Cluster::private` one.
    pub fn restart_apiserver(&self) -> Result<()> {
        let out = Command::new("bash")
            .arg(script())
            .arg("restart-apiserver")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .context("cannot run control-plane.sh restart-apiserver")?;
        ensure!(
            out.status.success(),
            "control-plane.sh restart-apiserver failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// How long to wait for the apiserver to settle a change.
    pub const SETTLE: Duration = Duration::from_secs(30);
}

/// Stdout of a kubectl run, or an error with its args and stderr.
pub fn checked(args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
