//! Shared harness for Starling's system tests: network namespaces that clean
//! up after themselves, child processes that die with the test, waiting for a
//! condition with a deadline, and the workspace's own binaries.
//!
//! Every test that needs a tool the machine lacks fails with a message naming
//! it (`require_tool`); nothing here skips silently.

pub mod capture;
pub mod cluster;
pub mod kube_nodes;
pub mod peers;
pub mod raw_peer;

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// Run a command and return its stdout; fail with its stderr and the command line.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = output(cmd, args)?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}{}",
            cmd,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a command and return its full output, whatever its exit status.
pub fn output(cmd: &str, args: &[&str]) -> Result<Output> {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{cmd}`"))
}

/// Fail with a message naming the missing tool and the package that has it.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new(tool).is_file();
    assert!(
        found,
        "this test needs `{tool}` (Debian package `{package}`); `.ci/run` installs it"
    );
}

/// Fail naming what a test that boots Debian's kernel under QEMU
/// (tests/vm/ipip-vm.sh) needs on this machine: the VM's own tools, the
/// test's `extra` ones (tool, Debian package), and a `/boot/vmlinuz-*-amd64`.
pub fn require_vm_tools(extra: &[(&str, &str)]) -> anyhow::Result<()> {
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("depmod", "kmod"),
        ("cpio", "cpio"),
        ("xz", "xz-utils"),
        ("bc", "bc"),
    ]
    .iter()
    .chain(extra)
    {
        require_tool(tool, package);
    }
    let kernel = std::fs::read_dir("/boot")?.filter_map(|e| e.ok()).any(|e| {
        let n = e.file_name().to_string_lossy().to_string();
        n.starts_with("vmlinuz-") && n.ends_with("-amd64")
    });
    anyhow::ensure!(
        kernel,
        "this test boots Debian's kernel: install the package linux-image-amd64"
    );
    Ok(())
}

/// Wait until `cond` returns `Ok(true)`, polling every 50 ms, or fail after
/// `timeout` naming `what` and the last error seen.
pub fn wait_for<F>(what: &str, timeout: Duration, mut cond: F) -> Result<Duration>
where
    F: FnMut() -> Result<bool>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match cond() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            return Err(match last_err {
                Some(e) => {
                    anyhow!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by the test: created with a unique name, and
/// deleted (with every process still inside it killed) when dropped, also
/// when the test fails.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `tag` is a short human label (`bird`, `n1`); the name adds the test
    /// process id and a counter so parallel tests never collide.
    pub fn new(tag: &str) -> Result<Netns> {
        let n = NS_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("st{}-{}-{}", std::process::id() % 100_000, n, tag);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Run a command inside the namespace and return its stdout.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.name, cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Run a command inside the namespace, returning its output whatever the status.
    pub fn exec_output(&self, cmd: &str, args: &[&str]) -> Result<Output> {
        let mut a = vec!["netns", "exec", &self.name, cmd];
        a.extend_from_slice(args);
        output("ip", &a)
    }

    /// A `Command` that runs inside the namespace.
    pub fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, cmd]);
        c
    }

    /// Write a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(pids) = run("ip", &["netns", "pids", &self.name]) {
            for pid in pids.split_whitespace() {
                let _ = output("kill", &["-9", pid]);
            }
        }
        let _ = output("ip", &["netns", "del", &self.name]);
    }
}

/// Join two namespaces with a veth pair: `a_if` in `a` with `a_addr`, `b_if`
/// in `b` with `b_addr` (addresses in CIDR notation; empty means none).
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
    b_addr: &str,
) -> Result<()> {
    run(
        "ip",
        &[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ],
    )?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        for one in addr.split(',').filter(|s| !s.is_empty()) {
            let mut args = vec!["addr", "add", one, "dev", ifname];
            if one.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args)?;
        }
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A child process that is killed when dropped.
pub struct Daemon {
    pub name: String,
    pub child: Child,
}

impl Daemon {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Daemon> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Daemon {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fail if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited unexpectedly: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scratch directory removed when dropped.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let n = NS_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("starling-{}-{}-{}", tag, std::process::id(), n));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The cargo target directory the running test binary was built into
/// (`<target>/<profile>/deps/<test>`).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

static BUILD: Once = Once::new();
static BUILD_ERR: Mutex<Option<String>> = Mutex::new(None);

/// Path to one of the workspace's binaries (`starling-bgpd`, `starling-agent`,
/// `starlingctl`, `starling`), built in the same profile as the test on first use.
pub fn bin(name: &str) -> PathBuf {
    let dir = target_profile_dir();
    BUILD.call_once(|| {
        let release = dir.file_name().map(|n| n == "release").unwrap_or(false);
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let target_dir = dir.parent().expect("target dir").to_path_buf();
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("--bins")
            .arg("--manifest-path")
            .arg(manifest);
        cmd.arg("--target-dir").arg(target_dir);
        // `cargo test` runs this process with the test crate's CARGO_*
        // variables. Build scripts that watch one of them (ring's watches
        // CARGO_MANIFEST_DIR) would see it change between that cargo and this
        // one, and each run would rebuild ring, rustls, kube and the agent
        // twice (minutes on this machine).
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&k.as_ref())
            {
                cmd.env_remove(&key);
            }
        }
        for p in ["starling-bgpd", "starling-agent", "starling-cni"] {
            cmd.args(["-p", p]);
        }
        if release {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => *BUILD_ERR.lock().unwrap() = Some(format!("cargo build failed: {s}")),
            Err(e) => *BUILD_ERR.lock().unwrap() = Some(format!("cannot run cargo: {e}")),
        }
    });
    if let Some(e) = BUILD_ERR.lock().unwrap().as_ref() {
        panic!("building the workspace binaries: {e}");
    }
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "workspace binary {} was not built",
        p.display()
    );
    p
}

/// Say something in the test log even when libtest captures output (the
/// `print!` macros are captured; a direct write to stderr is not).
pub fn log_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// One benchmark figure as the JSON object the project's benchmarks print.
pub fn bench_json(
    bench: &str,
    imp: &str,
    metric: &str,
    value: f64,
    unit: &str,
) -> serde_json::Value {
    serde_json::json!({"bench": bench, "impl": imp, "metric": metric, "value": value, "unit": unit})
}

/// Print one benchmark figure as the JSON line the project's benchmarks use.
pub fn bench_line(bench: &str, imp: &str, metric: &str, value: f64, unit: &str) {
    println!("{}", bench_json(bench, imp, metric, value, unit));
}
