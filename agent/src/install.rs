//! `starling-agent install-cni`: the DaemonSet's init step. It puts the
//! `starling` plugin binary into the host's CNI bin directory and the
//! network configuration into the host's net.d, both atomically.
//!
//! Atomic matters twice here: the runtime may exec the plugin while we
//! replace it (a half-copied binary would fail pod creation on that node),
//! and it re-reads net.d when files change (a half-written conflist would be
//! skipped or, worse, parsed). So each file is written to a temporary name
//! in the same directory, synced, and renamed over the old one; a crash at
//! any point leaves the old file or the new one, never a mix.
//!
//! Running it again with the same inputs changes nothing, so the init step
//! can run on every pod restart.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;

/// Where the image ships the plugin.
pub const DEFAULT_CNI_BINARY: &str = "/opt/starling/bin/starling";
/// The host's `/opt/cni/bin`, as the DaemonSet mounts it.
pub const DEFAULT_CNI_BIN_DIR: &str = "/host/opt/cni/bin";
/// The host's `/etc/cni/net.d`, as the DaemonSet mounts it. `10-` sorts
/// before most other files there: runtimes use the first one in order.
pub const DEFAULT_CNI_CONF: &str = "/host/etc/cni/net.d/10-starling.conflist";
/// Calico's network name, so tooling that looks for it keeps working.
pub const DEFAULT_NETWORK_NAME: &str = "k8s-pod-network";
/// The conflist's `cniVersion` unless `--cni-version` says otherwise: 1.0.0,
/// because containerd 1.6 (libcni 1.1, still the runtime of many LTS
/// distributions) refuses a 1.1.0 result ("unsupported CNI result version")
/// and every pod sandbox on the node fails. The plugin speaks 1.1.0 too; a
/// runtime that sends GC and STATUS needs `--cni-version 1.1.0`.
pub const DEFAULT_CNI_VERSION: &str = "1.0.0";
/// The name the conflist's `"type": "starling"` makes the runtime exec.
pub const PLUGIN_NAME: &str = "starling";

/// What `install-cni` does; each field is a command-line flag.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct InstallOptions {
    /// The `starling` plugin binary to copy.
    #[arg(long, default_value = DEFAULT_CNI_BINARY)]
    pub cni_binary: PathBuf,
    /// Directory the runtime execs plugins from (the host's /opt/cni/bin).
    #[arg(long, default_value = DEFAULT_CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    /// The conflist to write (in the host's /etc/cni/net.d).
    #[arg(long, default_value = DEFAULT_CNI_CONF)]
    pub cni_conf: PathBuf,
    /// The agent's CNI socket, as the plugin on the host sees it.
    #[arg(long, default_value = starling_cni_proto::DEFAULT_SOCKET)]
    pub socket_path: PathBuf,
    /// Pod MTU written into the conflist; absent: the agent decides.
    #[arg(long)]
    pub mtu: Option<u32>,
    /// The conflist's network name.
    #[arg(long, default_value = DEFAULT_NETWORK_NAME)]
    pub network_name: String,
    /// The conflist's CNI spec version.
    #[arg(long, default_value = DEFAULT_CNI_VERSION)]
    pub cni_version: String,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            cni_binary: DEFAULT_CNI_BINARY.into(),
            cni_bin_dir: DEFAULT_CNI_BIN_DIR.into(),
            cni_conf: DEFAULT_CNI_CONF.into(),
            socket_path: starling_cni_proto::DEFAULT_SOCKET.into(),
            mtu: None,
            network_name: DEFAULT_NETWORK_NAME.into(),
            cni_version: DEFAULT_CNI_VERSION.into(),
        }
    }
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// Already there with the same content and mode: left alone.
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    pub binary: PathBuf,
    pub binary_outcome: Outcome,
    pub conflist: PathBuf,
    pub conflist_outcome: Outcome,
    /// What could not be checked (a chained plugin missing or not
    /// answering VERSION): the install went ahead; the caller logs these.
    pub warnings: Vec<String>,
}

/// The plugins the conflist chains after `starling`.
pub const CHAINED_PLUGINS: [&str; 1] = ["portmap"];

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "the CNI plugin binary {} does not exist (the image ships it at {DEFAULT_CNI_BINARY}; \
         pass --cni-binary to use another)",
        path.display()
    )]
    SourceMissing { path: PathBuf },
    #[error("option --{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error(
        "{plugin} ({}) speaks CNI {supported}, not the conflist's {version}: the runtime \
         would fail every pod (and STATUS) on this node. Install reference plugins that speak \
         {version} (containernetworking-plugins 1.5 or later) or pass --cni-version {newest}",
        path.display()
    )]
    ChainedPluginTooOld {
        plugin: &'static str,
        path: PathBuf,
        version: String,
        supported: String,
        newest: String,
    },
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Install the plugin binary and the conflist. Idempotent.
pub fn install_cni(opts: &InstallOptions) -> Result<InstallReport, InstallError> {
    let conflist = conflist(opts)?;
    let binary = match fs::read(&opts.cni_binary) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(InstallError::SourceMissing {
                path: opts.cni_binary.clone(),
            });
        }
        Err(e) => return Err(io_err(&opts.cni_binary, "read")(e)),
    };
    if binary.is_empty() {
        return Err(InstallError::Invalid {
            field: "cni-binary",
            why: format!("{} is empty", opts.cni_binary.display()),
        });
    }
    let warnings = check_chained_plugins(opts)?;
    let dest = opts.cni_bin_dir.join(PLUGIN_NAME);
    let binary_outcome = write_atomic(&dest, &binary, 0o755)?;
    let conflist_outcome = write_atomic(&opts.cni_conf, conflist.as_bytes(), 0o644)?;
    Ok(InstallReport {
        binary: dest,
        binary_outcome,
        conflist: opts.cni_conf.clone(),
        conflist_outcome,
        warnings,
    })
}

/// The spec wants every plugin of a list to speak the list's version; a
/// runtime sends a 1.1.0 list's STATUS to each, and an older portmap answers
/// "missing containerID", so the node never turns Ready. Ask each chained
/// plugin in the bin directory (VERSION, as a runtime would) before writing
/// a conflist it cannot serve.
fn check_chained_plugins(opts: &InstallOptions) -> Result<Vec<String>, InstallError> {
    let mut warnings = Vec::new();
    for plugin in CHAINED_PLUGINS {
        let path = opts.cni_bin_dir.join(plugin);
        if !path.exists() {
            warnings.push(format!(
                "{} is missing: pods on this node fail until the reference plugins are installed",
                path.display()
            ));
            continue;
        }
        let supported = match plugin_versions(&path) {
            Ok(v) => v,
            Err(why) => {
                warnings.push(format!(
                    "{}: VERSION did not answer ({why}); not checked",
                    path.display()
                ));
                continue;
            }
        };
        if !supported.contains(&opts.cni_version) {
            let newest = starling_cni_proto::CNI_VERSIONS
                .iter()
                .rev()
                .find(|v| supported.iter().any(|s| s == *v))
                .unwrap_or(&"0.3.1");
            return Err(InstallError::ChainedPluginTooOld {
                plugin,
                path,
                version: opts.cni_version.clone(),
                supported: supported.join(", "),
                newest: newest.to_string(),
            });
        }
    }
    Ok(warnings)
}

/// A plugin's `supportedVersions` from its VERSION command.
fn plugin_versions(path: &Path) -> Result<Vec<String>, String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(path)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        // The spec's VERSION input; a plugin that ignores it is fine too.
        let _ = stdin.write_all(br#"{"cniVersion":"0.3.1"}"#);
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("output is not JSON: {e}"))?;
    let list = v["supportedVersions"]
        .as_array()
        .ok_or("no supportedVersions in its output")?;
    Ok(list
        .iter()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect())
}

/// The network configuration list `install_cni` writes.
pub fn conflist(opts: &InstallOptions) -> Result<String, InstallError> {
    let invalid = |field, why: String| Err(InstallError::Invalid { field, why });
    if opts.network_name.is_empty()
        || !opts
            .network_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        // The spec's rule for network names.
        return invalid(
            "network-name",
            format!(
                "`{}` must be non-empty and only [A-Za-z0-9_.-]",
                opts.network_name
            ),
        );
    }
    if !starling_cni_proto::CNI_VERSIONS.contains(&opts.cni_version.as_str()) {
        return invalid(
            "cni-version",
            format!(
                "`{}` is not a version the plugin speaks ({})",
                opts.cni_version,
                starling_cni_proto::CNI_VERSIONS.join(", ")
            ),
        );
    }
    if !opts.socket_path.is_absolute() {
        return invalid(
            "socket-path",
            format!("{} is not an absolute path", opts.socket_path.display()),
        );
    }
    let Some(socket) = opts.socket_path.to_str() else {
        return invalid("socket-path", "is not valid UTF-8".into());
    };
    let mut starling = json!({"type": PLUGIN_NAME, "socketPath": socket});
    if let Some(mtu) = opts.mtu {
        // The plugin's own bounds for `mtu`.
        if !(576..=65535).contains(&mtu) {
            return invalid("mtu", format!("{mtu} is outside 576..=65535"));
        }
        starling["mtu"] = json!(mtu);
    }
    let list = json!({
        "name": opts.network_name,
        "cniVersion": opts.cni_version,
        "plugins": [
            starling,
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    });
    let mut text = serde_json::to_string_pretty(&list).map_err(|e| InstallError::Invalid {
        field: "network-name",
        why: e.to_string(),
    })?;
    text.push('\n');
    Ok(text)
}

/// Replace `path` with `content` and `mode` so that readers see the old
/// file or the new one, never a part; leave it alone when it already is.
fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<Outcome, InstallError> {
    if let Ok(meta) = fs::metadata(path)
        && meta.is_file()
        && meta.permissions().mode() & 0o7777 == mode
        && meta.len() == content.len() as u64
        && fs::read(path).is_ok_and(|old| old == content)
    {
        return Ok(Outcome::Unchanged);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A dot name, so runtimes that scan net.d skip it while it exists.
    let tmp = dir.join(format!(".{name}.starling-tmp"));
    // Left over by a crash in an earlier run: nothing else writes here.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp, "remove stale temporary file")(e)),
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(content).map_err(io_err(&tmp, "write"))?;
        // The umask narrowed the mode given to open.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err(&tmp, "chmod"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // The rename is durable only once the directory is.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))?;
    Ok(Outcome::Written)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p =
                std::env::temp_dir().join(format!("starling-install-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn options(root: &Path) -> InstallOptions {
        let src = root.join("image/starling");
        fs::create_dir_all(src.parent().unwrap()).unwrap();
        fs::write(&src, b"\x7fELF pretend plugin v1").unwrap();
        InstallOptions {
            cni_binary: src,
            cni_bin_dir: root.join("host/opt/cni/bin"),
            cni_conf: root.join("host/etc/cni/net.d/10-starling.conflist"),
            ..InstallOptions::default()
        }
    }

    /// A stand-in for a reference plugin that answers VERSION.
    fn fake_plugin(dir: &Path, name: &str, versions: &[&str]) {
        fs::create_dir_all(dir).unwrap();
        let list: Vec<String> = versions.iter().map(|v| format!("\"{v}\"")).collect();
        let script = format!(
            "#!/bin/sh\ncat >/dev/null\necho '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[{}]}}'\n",
            list.join(",")
        );
        let p = dir.join(name);
        fs::write(&p, script).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn a_chained_plugin_that_cannot_speak_the_version_stops_the_install() {
        let s = Scratch::new("chained");
        let mut opts = options(&s.0);
        fake_plugin(&opts.cni_bin_dir, "portmap", &["0.3.1", "0.4.0", "1.0.0"]);
        opts.cni_version = "1.1.0".into();
        let e = install_cni(&opts).unwrap_err().to_string();
        assert!(
            e.contains("portmap") && e.contains("1.1.0") && e.contains("--cni-version 1.0.0"),
            "{e}"
        );
        assert!(
            !opts.cni_conf.exists(),
            "a conflist the plugins cannot serve"
        );
        // The same plugins serve 1.0.0; a missing plugin is a warning.
        opts.cni_version = "1.0.0".into();
        let r = install_cni(&opts).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        fs::remove_file(opts.cni_bin_dir.join("portmap")).unwrap();
        let r = install_cni(&opts).unwrap();
        assert!(
            r.warnings[0].contains("portmap is missing"),
            "{:?}",
            r.warnings
        );
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn installs_binary_and_conflist_then_changes_nothing() {
        let s = Scratch::new("fresh");
        let mut opts = options(&s.0);
        opts.mtu = Some(1440);
        let r = install_cni(&opts).unwrap();
        assert_eq!(r.binary_outcome, Outcome::Written);
        assert_eq!(r.conflist_outcome, Outcome::Written);
        assert_eq!(r.binary, s.0.join("host/opt/cni/bin/starling"));
        assert_eq!(fs::read(&r.binary).unwrap(), b"\x7fELF pretend plugin v1");
        assert_eq!(mode(&r.binary), 0o755);
        assert_eq!(mode(&r.conflist), 0o644);

        let conf: serde_json::Value =
            serde_json::from_slice(&fs::read(&r.conflist).unwrap()).unwrap();
        assert_eq!(
            conf,
            json!({
                "name": "k8s-pod-network",
                "cniVersion": "1.0.0",
                "plugins": [
                    {"type": "starling", "socketPath": "/run/starling/cni.sock", "mtu": 1440},
                    {"type": "portmap", "capabilities": {"portMappings": true}},
                ],
            })
        );

        let again = install_cni(&opts).unwrap();
        assert_eq!(again.binary_outcome, Outcome::Unchanged);
        assert_eq!(again.conflist_outcome, Outcome::Unchanged);
        // No temporary files left beside either.
        assert_eq!(listing(&opts.cni_bin_dir), ["starling"]);
        assert_eq!(
            listing(opts.cni_conf.parent().unwrap()),
            ["10-starling.conflist"]
        );
    }

    #[test]
    fn a_new_image_or_setting_replaces_only_what_changed() {
        let s = Scratch::new("upgrade");
        let mut opts = options(&s.0);
        install_cni(&opts).unwrap();
        let conf = fs::read_to_string(&opts.cni_conf).unwrap();
        assert!(!conf.contains("mtu"), "no mtu unless given: {conf}");

        fs::write(&opts.cni_binary, b"\x7fELF pretend plugin v2").unwrap();
        // A binary with the wrong mode (someone chmod'ed it) is repaired too.
        let dest = opts.cni_bin_dir.join("starling");
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o600)).unwrap();
        let r = install_cni(&opts).unwrap();
        assert_eq!(r.binary_outcome, Outcome::Written);
        assert_eq!(r.conflist_outcome, Outcome::Unchanged);
        assert_eq!(fs::read(&dest).unwrap(), b"\x7fELF pretend plugin v2");
        assert_eq!(mode(&dest), 0o755);

        opts.socket_path = "/run/other/cni.sock".into();
        let r = install_cni(&opts).unwrap();
        assert_eq!(r.binary_outcome, Outcome::Unchanged);
        assert_eq!(r.conflist_outcome, Outcome::Written);
        assert!(
            fs::read_to_string(&opts.cni_conf)
                .unwrap()
                .contains("/run/other/cni.sock")
        );
    }

    #[test]
    fn a_stale_temporary_file_from_a_crash_is_replaced() {
        let s = Scratch::new("crash");
        let opts = options(&s.0);
        fs::create_dir_all(&opts.cni_bin_dir).unwrap();
        fs::write(
            opts.cni_bin_dir.join(".starling.starling-tmp"),
            b"half a bin",
        )
        .unwrap();
        install_cni(&opts).unwrap();
        assert_eq!(listing(&opts.cni_bin_dir), ["starling"]);
    }

    #[test]
    fn a_missing_source_is_refused_and_nothing_is_written() {
        let s = Scratch::new("missing");
        let mut opts = options(&s.0);
        opts.cni_binary = s.0.join("image/not-there");
        let e = install_cni(&opts).unwrap_err().to_string();
        assert!(
            e.contains("image/not-there") && e.contains("does not exist"),
            "{e}"
        );
        assert!(!opts.cni_bin_dir.exists());
        assert!(!opts.cni_conf.exists());
    }

    #[test]
    fn bad_options_name_the_flag() {
        let s = Scratch::new("bad");
        for (edit, flag) in [
            (
                (|o: &mut InstallOptions| o.mtu = Some(100)) as fn(&mut InstallOptions),
                "--mtu",
            ),
            (|o| o.network_name = "has space".into(), "--network-name"),
            (|o| o.cni_version = "1.1".into(), "--cni-version"),
            (|o| o.cni_version = "2.0.0".into(), "--cni-version"),
            (|o| o.socket_path = "run/cni.sock".into(), "--socket-path"),
        ] {
            let mut opts = options(&s.0);
            edit(&mut opts);
            let e = install_cni(&opts).unwrap_err().to_string();
            assert!(e.contains(flag), "{flag}: {e}");
            assert!(!opts.cni_conf.exists());
        }
    }

    #[test]
    fn the_options_parse_as_flags_with_the_image_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            opts: InstallOptions,
        }
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.opts, InstallOptions::default());
        let cli = Cli::try_parse_from(["x", "--mtu", "1450", "--cni-bin-dir", "/b"]).unwrap();
        assert_eq!(cli.opts.mtu, Some(1450));
        assert_eq!(cli.opts.cni_bin_dir, PathBuf::from("/b"));
        // 1.0.0 by default (containerd 1.6 reads no newer); still overridable.
        assert_eq!(InstallOptions::default().cni_version, "1.0.0");
        let cli = Cli::try_parse_from(["x", "--cni-version", "1.1.0"]).unwrap();
        assert_eq!(cli.opts.cni_version, "1.1.0");
    }

    /// The DaemonSet and ConfigMap in manifests/daemonset.yaml, by kind.
    fn manifest(kind: &str) -> serde_yaml::Value {
        use serde::Deserialize;
        let text = include_str!("../../manifests/daemonset.yaml");
        serde_yaml::Deserializer::from_str(text)
            .map(|d| serde_yaml::Value::deserialize(d).expect("daemonset.yaml is YAML"))
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in manifests/daemonset.yaml"))
    }

    fn strings(v: &serde_yaml::Value) -> Vec<&str> {
        v.as_sequence()
            .map(|s| s.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_daemonset_manifest_runs_install_cni_and_probes_the_agent() {
        let ds = manifest("DaemonSet");
        assert_eq!(ds["metadata"]["name"], "starling-agent");
        assert_eq!(ds["metadata"]["namespace"], "kube-system");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "starling-agent");
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert!(
            pod["tolerations"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
            "tolerates every taint"
        );

        let init = &pod["initContainers"][0];
        let mut argv = strings(&init["command"]);
        argv.extend(strings(&init["args"]));
        assert!(argv.contains(&"install-cni"), "{argv:?}");
        let mounts: Vec<&str> = init["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        // The init step writes where InstallOptions' defaults point.
        assert!(mounts.contains(&DEFAULT_CNI_BIN_DIR), "{mounts:?}");
        assert!(mounts.contains(&"/host/etc/cni/net.d"), "{mounts:?}");

        let agent = &pod["containers"][0];
        let mut argv = strings(&agent["command"]);
        argv.extend(strings(&agent["args"]));
        assert!(
            argv.windows(3)
                .any(|w| w == ["run", "--config", "/etc/starling/agent.yaml"]),
            "{argv:?}"
        );
        assert_eq!(agent["securityContext"]["privileged"], true);
        assert!(
            agent["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "NODE_NAME"
                    && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
            "NODE_NAME from spec.nodeName"
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &agent[probe]["httpGet"];
            assert_eq!(get["path"], path, "{probe}");
            assert_eq!(get["port"], 9099, "{probe}");
            assert_eq!(get["host"], "127.0.0.1", "{probe}");
        }

        let host_paths: Vec<&str> = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v["hostPath"]["path"].as_str())
            .collect();
        for p in [
            "/opt/cni/bin",
            "/etc/cni/net.d",
            "/var/lib/starling",
            "/run/starling",
        ] {
            assert!(host_paths.contains(&p), "hostPath {p} in {host_paths:?}");
        }
        // Nothing in the pod loads modules: creating tunl0 makes the kernel
        // run the host's modprobe itself.
        assert!(!host_paths.contains(&"/lib/modules"), "{host_paths:?}");
        // Without kube-proxy the agent finds the API server from this
        // ConfigMap (optional, as Calico's).
        let from = &agent["envFrom"][0]["configMapRef"];
        assert_eq!(from["name"], "kubernetes-services-endpoint");
        assert_eq!(from["optional"], true);
    }

    #[test]
    fn the_configmap_uses_the_kubernetes_datastore_and_the_probe_port() {
        let cm = manifest("ConfigMap");
        assert_eq!(cm["metadata"]["namespace"], "kube-system");
        let text = cm["data"]["agent.yaml"].as_str().expect("data.agent.yaml");
        let cfg: serde_yaml::Value = serde_yaml::from_str(text).expect("agent.yaml is YAML");
        assert_eq!(cfg["datastore"]["type"], "kubernetes");
        let endpoints: crate::health::EndpointConfig =
            serde_yaml::from_value(cfg["endpoints"].clone()).expect("endpoints section");
        assert_eq!(endpoints.health.port(), 9099);
        assert_eq!(
            cfg["socketPath"].as_str(),
            Some(starling_cni_proto::DEFAULT_SOCKET)
        );
    }
}
