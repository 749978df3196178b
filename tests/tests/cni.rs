//! The `starling` CNI plugin, exec'd the way a container runtime does it
//! (CNI_* environment, config on stdin, result on stdout), against a real
//! `starling-agent` process. A network namespace plays the node: the agent
//! and the plugin run inside it, so every host-side link and route lands
//! there. More namespaces play the pods.

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use starling_cni_proto::{self as proto, AttachmentKey, Reply, Request};
use starling_tests::{Daemon, Netns, TempDir, bin, require_tool, wait_for};
use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

/// The node's own address, on its loopback: what "pod to host" pings.
const NODE_ADDR: &str = "192.0.2.1";

struct Node {
    ns: Netns,
    dir: TempDir,
    config: PathBuf,
    socket: PathBuf,
    agent: Option<Daemon>,
}

struct Pod {
    ns: Netns,
    id: String,
}

impl Pod {
    fn new(tag: &str) -> Result<Pod> {
        let ns = Netns::new(tag)?;
        let id = format!("{}-{}", ns.name, "c0ffee");
        Ok(Pod { ns, id })
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.ns.name)
    }

    /// The attachment in the network `Node::conf` names.
    fn key(&self) -> AttachmentKey {
        AttachmentKey {
            network: NETWORK.into(),
            container_id: self.id.clone(),
            ifname: "eth0".into(),
        }
    }

    /// Addresses on the pod's eth0 with global scope, read from the kernel.
    fn addresses(&self) -> Result<Vec<String>> {
        let out = self
            .ns
            .ip(&["-j", "addr", "show", "dev", "eth0", "scope", "global"])?;
        let v: Value = serde_json::from_str(&out).context("ip -j addr")?;
        Ok(v[0]["addr_info"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["local"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// What one plugin run printed and returned.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("plugin stdout is not JSON: {:?}", self.stdout))
    }

    fn ok(self) -> Result<Outcome> {
        ensure!(
            self.code == Some(0),
            "plugin failed ({:?}): stdout {} stderr {}",
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    /// The spec error code of a failed run; also proves it did not panic.
    fn error_code(&self) -> Result<u64> {
        ensure!(
            !self.stderr.contains("panicked"),
            "plugin panicked: {}",
            self.stderr
        );
        ensure!(self.code == Some(1), "expected exit 1, got {:?}", self.code);
        self.json()?["code"]
            .as_u64()
            .with_context(|| format!("no error code in {}", self.stdout))
    }
}

/// The network name of `Node::conf`.
const NETWORK: &str = "k8s-pod-network";

/// The default IPAM section: static podCIDRs, dual-stack.
const POD_CIDRS: &str = "ipam:\n  podCIDRs: [\"10.244.1.0/24\", \"fd00:10:244:1::/64\"]\n";

fn agent_config(node: &str, state: &str, socket: &str, ipam: &str) -> String {
    format!("nodeName: {node}\nstateDir: {state}\nsocketPath: {socket}\nmtu: 1450\n{ipam}")
}

impl Node {
    fn new(tag: &str) -> Result<Node> {
        Node::with_ipam(tag, POD_CIDRS)
    }

    fn with_ipam(tag: &str, ipam: &str) -> Result<Node> {
        require_tool("ping", "iputils-ping");
        let ns = Netns::new(tag)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        ns.ip(&["addr", "add", &format!("{NODE_ADDR}/32"), "dev", "lo"])?;
        let dir = TempDir::new("cni")?;
        let socket = dir.join("run/cni.sock");
        let config = dir.join("agent.yaml");
        std::fs::write(
            &config,
            agent_config(
                &ns.name,
                &dir.join("state").display().to_string(),
                &socket.display().to_string(),
                ipam,
            ),
        )?;
        let mut node = Node {
            ns,
            dir,
            config,
            socket,
            agent: None,
        };
        node.start_agent()?;
        Ok(node)
    }

    fn start_agent(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let mut cmd = self
            .ns
            .command(bin("starling-agent").to_str().context("path")?);
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log);
        let mut agent = Daemon::spawn("starling-agent", cmd)?;
        let socket = self.socket.clone();
        wait_for(
            "the agent to answer STATUS",
            Duration::from_secs(20),
            || {
                agent.check_alive()?;
                Ok(matches!(
                    proto::call(&socket, Request::Status, Duration::from_secs(2)),
                    Ok(Reply::Status(s)) if s.ready
                ))
            },
        )
        .with_context(|| self.agent_log())?;
        self.agent = Some(agent);
        Ok(())
    }

    /// SIGKILL the agent (the `ip netns exec` child has exec'd into it).
    fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    fn agent_log(&self) -> String {
        format!(
            "agent log:\n{}",
            std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
        )
    }

    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": NETWORK,
            "type": "starling",
            "socketPath": self.socket,
        })
    }

    /// Start the plugin as a runtime would, inside the node namespace.
    fn spawn_plugin(&self, plugin: &str, env: &[(&str, &str)], stdin: &str) -> Result<Child> {
        let mut cmd = self.ns.command(plugin);
        cmd.env_remove("CNI_COMMAND")
            .env("CNI_PATH", "/usr/lib/cni")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {plugin}"))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(stdin.as_bytes())?;
        Ok(child)
    }

    fn run_plugin(&self, plugin: &str, env: &[(&str, &str)], stdin: &str) -> Result<Outcome> {
        finish(self.spawn_plugin(plugin, env, stdin)?)
    }

    fn starling(&self, command: &str, pod: &Pod, conf: &Value) -> Result<Outcome> {
        let path = pod.path();
        self.run_plugin(
            bin("starling").to_str().context("path")?,
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", &pod.id),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", "eth0"),
            ],
            &conf.to_string(),
        )
    }

    fn spawn_add(&self, pod: &Pod) -> Result<Child> {
        let path = pod.path();
        self.spawn_plugin(
            bin("starling").to_str().context("path")?,
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &pod.id),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", "eth0"),
            ],
            &self.conf("1.1.0").to_string(),
        )
    }

    fn call(&self, request: Request) -> Result<Reply> {
        proto::call(&self.socket, request, Duration::from_secs(10))
            .with_context(|| self.agent_log())
    }

    fn allocated(&self) -> Result<usize> {
        match self.call(Request::Status)? {
            Reply::Status(s) => Ok(s.allocated),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    fn leaks(&self, valid: Vec<AttachmentKey>) -> Result<Vec<proto::Allocation>> {
        match self.call(Request::Gc {
            network: NETWORK.into(),
            valid,
            dry_run: true,
        })? {
            Reply::Collected { allocations } => Ok(allocations),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    /// Links in the node namespace besides loopback.
    fn links(&self) -> Result<Vec<String>> {
        let v: Value = serde_json::from_str(&self.ns.ip(&["-j", "link", "show"])?)?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| *n != "lo")
            .map(String::from)
            .collect())
    }

    fn routes(&self) -> Result<String> {
        Ok(format!(
            "{}{}",
            self.ns.ip(&["route", "show"])?,
            self.ns.ip(&["-6", "route", "show", "proto", "73"])?
        ))
    }
}

fn finish(child: Child) -> Result<Outcome> {
    let out = child.wait_with_output()?;
    Ok(Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The pod's addresses from an ADD result, without prefix lengths.
fn result_ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next())
        .map(String::from)
        .collect()
}

fn ping(from: &Netns, to: &str) -> Result<()> {
    let args: Vec<&str> = if to.contains(':') {
        vec!["-6", "-c1", "-W1", to]
    } else {
        vec!["-c1", "-W1", to]
    };
    wait_for(
        &format!("ping {to} from {}", from.name),
        Duration::from_secs(10),
        || Ok(from.exec_output("ping", &args)?.status.success()),
    )
    .map(|_| ())
}

#[test]
fn add_ping_host_and_pod_then_del_cleans_everything() -> Result<()> {
    let node = Node::new("node")?;
    let a = Pod::new("pa")?;
    let b = Pod::new("pb")?;
    let conf = node.conf("1.1.0");
    let ra = node.starling("ADD", &a, &conf)?.ok()?.json()?;
    let rb = node.starling("ADD", &b, &conf)?.ok()?.json()?;
    let (ips_a, ips_b) = (result_ips(&ra), result_ips(&rb));
    assert_eq!(ips_a.len(), 2, "one IPv4 and one IPv6 address: {ra}");
    assert!(ips_a[0].starts_with("10.244.1.") && ips_a[1].starts_with("fd00:10:244:1:"));
    assert_eq!(
        a.addresses()?,
        ips_a,
        "the kernel holds what the result says"
    );

    // The wiring Calico users expect.
    let routes = a.ns.ip(&["route", "show"])?;
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0") && routes.contains("onlink"),
        "{routes}"
    );
    let routes6 = a.ns.ip(&["-6", "route", "show", "default"])?;
    assert!(
        routes6.contains("via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{routes6}"
    );
    let veth = starling_cni_proto::host_veth_name(&a.id, "eth0");
    let link = node.ns.ip(&["link", "show", &veth])?;
    assert!(
        link.contains("ee:ee:ee:ee:ee:ee") && link.contains("mtu 1450"),
        "{link}"
    );
    let proxy_arp = node.ns.exec(
        "cat",
        &[&format!("/proc/sys/net/ipv4/conf/{veth}/proxy_arp")],
    )?;
    assert_eq!(proxy_arp.trim(), "1");
    let host_routes = node.routes()?;
    assert!(
        host_routes.contains(&format!("{} dev {veth} proto 73 scope link", ips_a[0])),
        "{host_routes}"
    );

    ping(&a.ns, NODE_ADDR)?;
    ping(&a.ns, &ips_b[0])?;
    ping(&a.ns, &ips_b[1])?;
    ping(&b.ns, &ips_a[0])?;

    for pod in [&a, &b] {
        node.starling("DEL", pod, &conf)?.ok()?;
    }
    assert!(node.links()?.is_empty(), "links left: {:?}", node.links()?);
    let left = node.routes()?;
    assert!(
        !left.contains("10.244.1.") && !left.contains("fd00:10:244"),
        "{left}"
    );
    assert!(
        a.ns.ip(&["link", "show", "eth0"]).is_err(),
        "pod eth0 is gone"
    );
    assert_eq!(node.allocated()?, 0, "addresses released");
    Ok(())
}

#[test]
fn del_is_idempotent_without_add_and_after_the_netns_is_gone() -> Result<()> {
    let node = Node::new("node")?;
    let conf = node.conf("1.1.0");
    let never = Pod::new("never")?;
    node.starling("DEL", &never, &conf)?.ok()?;

    let pod = Pod::new("twice")?;
    node.starling("ADD", &pod, &conf)?.ok()?;
    node.starling("DEL", &pod, &conf)?.ok()?;
    node.starling("DEL", &pod, &conf)?.ok()?;

    let gone = Pod::new("gone")?;
    node.starling("ADD", &gone, &conf)?.ok()?;
    let key = gone.key();
    let path = gone.path();
    let id = gone.id.clone();
    drop(gone); // deletes the namespace
    let out = node.run_plugin(
        bin("starling").to_str().context("path")?,
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", &id),
            ("CNI_NETNS", &path),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf.to_string(),
    )?;
    out.ok()?;
    assert!(matches!(
        node.call(Request::Check { key })?,
        Reply::Found { allocation: None }
    ));
    assert!(node.links()?.is_empty(), "{:?}", node.links()?);
    Ok(())
}

#[test]
fn check_notices_a_removed_address() -> Result<()> {
    let node = Node::new("node")?;
    let conf = node.conf("1.1.0");
    let pod = Pod::new("chk")?;
    let result = node.starling("ADD", &pod, &conf)?.ok()?.json()?;
    let mut check = conf.clone();
    check["prevResult"] = result.clone();
    node.starling("CHECK", &pod, &check)?.ok()?;
    let v4 = &result_ips(&result)[0];
    pod.ns
        .ip(&["addr", "del", &format!("{v4}/32"), "dev", "eth0"])?;
    let out = node.starling("CHECK", &pod, &check)?;
    assert_eq!(out.error_code()?, 102);
    assert!(
        out.stdout.contains(v4.as_str()),
        "names the address: {}",
        out.stdout
    );
    node.starling("DEL", &pod, &conf)?.ok()?;
    Ok(())
}

#[test]
fn gc_releases_what_is_not_valid_and_the_leak_report_lists_it() -> Result<()> {
    // No grace period: these pods are collected as soon as they are not valid.
    let node = Node::with_ipam("node", &format!("{POD_CIDRS}  gcGracePeriodSeconds: 0\n"))?;
    let conf = node.conf("1.1.0");
    let pods: Vec<Pod> = (0..3)
        .map(|i| Pod::new(&format!("gc{i}")))
        .collect::<Result<_>>()?;
    for p in &pods {
        node.starling("ADD", p, &conf)?.ok()?;
    }
    let valid = vec![pods[0].key()];
    let report = node.leaks(valid.clone())?;
    let mut leaked: Vec<String> = report.iter().map(|a| a.key.container_id.clone()).collect();
    leaked.sort();
    let mut expected = vec![pods[1].id.clone(), pods[2].id.clone()];
    expected.sort();
    assert_eq!(leaked, expected);

    // Spec 1.1 GC: everything not listed goes, host veths included.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": pods[0].id, "ifname": "eth0"}]);
    node.run_plugin(
        bin("starling").to_str().context("path")?,
        &[("CNI_COMMAND", "GC")],
        &gc.to_string(),
    )?
    .ok()?;
    assert_eq!(node.allocated()?, 1);
    assert!(node.leaks(valid)?.is_empty());
    assert_eq!(
        node.links()?,
        vec![starling_cni_proto::host_veth_name(&pods[0].id, "eth0")]
    );

    // The older key name still works.
    let mut old = conf.clone();
    old["cni.dev/attachments"] = json!([]);
    node.run_plugin(
        bin("starling").to_str().context("path")?,
        &[("CNI_COMMAND", "GC")],
        &old.to_string(),
    )?
    .ok()?;
    assert_eq!(node.allocated()?, 0);
    assert!(node.links()?.is_empty());
    Ok(())
}

/// Run the plugin for one pod with an explicit interface name and network
/// configuration (Multus gives a pod a second interface from another
/// conflist).
fn plugin_for(
    node: &Node,
    command: &str,
    pod: &Pod,
    ifname: &str,
    conf: &Value,
) -> Result<Outcome> {
    let path = pod.path();
    node.run_plugin(
        bin("starling").to_str().context("path")?,
        &[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", &pod.id),
            ("CNI_NETNS", &path),
            ("CNI_IFNAME", ifname),
        ],
        &conf.to_string(),
    )
}

fn gc_with(node: &Node, conf: &Value) -> Result<Outcome> {
    node.run_plugin(
        bin("starling").to_str().context("path")?,
        &[("CNI_COMMAND", "GC")],
        &conf.to_string(),
    )
}

#[test]
fn gc_without_the_valid_attachments_list_is_refused_and_releases_nothing() -> Result<()> {
    let node = Node::with_ipam("node", &format!("{POD_CIDRS}  gcGracePeriodSeconds: 0\n"))?;
    let conf = node.conf("1.1.0");
    let pods: Vec<Pod> = (0..2)
        .map(|i| Pod::new(&format!("gcr{i}")))
        .collect::<Result<_>>()?;
    for p in &pods {
        node.starling("ADD", p, &conf)?.ok()?;
    }
    // No cni.dev/valid-attachments (nor the older cni.dev/attachments): a
    // runtime bug or an old runtime, never "no pod is valid".
    let out = gc_with(&node, &conf)?;
    assert_eq!(
        out.error_code()?,
        7,
        "refused as invalid configuration: {}",
        out.stdout
    );
    let msg = out.json()?.to_string();
    assert!(
        msg.contains("cni.dev/valid-attachments"),
        "the error names the field: {msg}"
    );
    assert_eq!(node.allocated()?, 2, "nothing released");
    assert_eq!(
        node.links()?.len(),
        2,
        "no host veth removed: {:?}",
        node.links()?
    );
    // libcni's empty list: both spellings present, each `null` (a Go nil
    // slice). That is a list, and an empty one: everything goes.
    let mut libcni_empty = conf.clone();
    libcni_empty["cni.dev/valid-attachments"] = Value::Null;
    libcni_empty["cni.dev/attachments"] = Value::Null;
    gc_with(&node, &libcni_empty)?.ok()?;
    assert_eq!(node.allocated()?, 0);
    assert!(node.links()?.is_empty());
    Ok(())
}

#[test]
fn gc_for_one_network_never_touches_another_networks_attachments() -> Result<()> {
    let node = Node::with_ipam("node", &format!("{POD_CIDRS}  gcGracePeriodSeconds: 0\n"))?;
    // Two conflists of type starling, as Multus uses them: the pod network
    // and a second one, each with its own name.
    let mut net_a = node.conf("1.1.0");
    net_a["name"] = json!("net-a");
    let mut net_b = node.conf("1.1.0");
    net_b["name"] = json!("net-b");
    let (p1, p2, p3) = (Pod::new("mn1")?, Pod::new("mn2")?, Pod::new("mn3")?);
    plugin_for(&node, "ADD", &p1, "eth0", &net_a)?.ok()?;
    plugin_for(&node, "ADD", &p1, "net1", &net_b)?.ok()?;
    plugin_for(&node, "ADD", &p2, "eth0", &net_b)?.ok()?;
    plugin_for(&node, "ADD", &p3, "eth0", &net_a)?.ok()?;
    assert_eq!(node.allocated()?, 4);

    // GC of net-a lists only net-a's attachments: p3 is gone from net-a.
    let mut gc = net_a.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": p1.id, "ifname": "eth0"}]);
    gc_with(&node, &gc)?.ok()?;
    assert_eq!(node.allocated()?, 3, "only net-a's stale attachment went");
    let mut links = node.links()?;
    links.sort();
    let mut want = vec![
        starling_cni_proto::host_veth_name(&p1.id, "eth0"),
        starling_cni_proto::host_veth_name(&p1.id, "net1"),
        starling_cni_proto::host_veth_name(&p2.id, "eth0"),
    ];
    want.sort();
    assert_eq!(links, want, "net-b's veths untouched");

    // GC of net-b with an empty list collects net-b's two and nothing of net-a.
    let mut gc = net_b.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    gc_with(&node, &gc)?.ok()?;
    assert_eq!(node.allocated()?, 1);
    assert_eq!(
        node.links()?,
        vec![starling_cni_proto::host_veth_name(&p1.id, "eth0")]
    );

    // DEL names its network too: net-b's DEL of p1/eth0 releases nothing.
    plugin_for(&node, "DEL", &p1, "eth0", &net_b)?.ok()?;
    assert_eq!(
        node.allocated()?,
        1,
        "another network's DEL kept net-a's allocation"
    );
    plugin_for(&node, "DEL", &p1, "eth0", &net_a)?.ok()?;
    assert_eq!(node.allocated()?, 0);
    Ok(())
}

#[test]
fn gc_never_collects_an_allocation_younger_than_the_grace_period() -> Result<()> {
    // Default grace period (60 s): GC racing an ADD keeps the new pod.
    let node = Node::new("node")?;
    let conf = node.conf("1.1.0");
    let pod = Pod::new("young")?;
    node.starling("ADD", &pod, &conf)?.ok()?;
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    gc_with(&node, &gc)?.ok()?;
    assert_eq!(
        node.allocated()?,
        1,
        "the just-added pod kept its addresses"
    );
    assert_eq!(
        node.links()?,
        vec![starling_cni_proto::host_veth_name(&pod.id, "eth0")],
        "and its veth"
    );
    Ok(())
}

#[test]
fn agent_down_status_is_50_and_add_is_11_with_nothing_created() -> Result<()> {
    let mut node = Node::new("node")?;
    let conf = node.conf("1.1.0");
    node.run_plugin(
        bin("starling").to_str().context("path")?,
        &[("CNI_COMMAND", "STATUS")],
        &conf.to_string(),
    )?
    .ok()?;
    node.kill_agent();
    let status = node.run_plugin(
        bin("starling").to_str().context("path")?,
        &[("CNI_COMMAND", "STATUS")],
        &conf.to_string(),
    )?;
    assert_eq!(status.error_code()?, 50);
    let socket = node.socket.display().to_string();
    assert!(
        status.stdout.contains(&socket),
        "the error names the socket: {}",
        status.stdout
    );
    let pod = Pod::new("down")?;
    let add = node.starling("ADD", &pod, &conf)?;
    assert_eq!(add.error_code()?, 11);
    assert!(
        add.stdout.contains(&socket),
        "the error names the socket: {}",
        add.stdout
    );
    assert!(
        node.links()?.is_empty(),
        "nothing half-done: {:?}",
        node.links()?
    );
    assert!(pod.ns.ip(&["link", "show", "eth0"]).is_err());
    // DEL while the agent is down: try again later, too.
    assert_eq!(node.starling("DEL", &pod, &conf)?.error_code()?, 11);
    Ok(())
}

#[test]
fn every_accepted_cni_version_gets_its_own_result_layout() -> Result<()> {
    let node = Node::new("node")?;
    let version = node.run_plugin(
        bin("starling").to_str().context("path")?,
        &[("CNI_COMMAND", "VERSION")],
        &json!({"cniVersion": "1.1.0"}).to_string(),
    )?;
    let supported = version.ok()?.json()?["supportedVersions"].clone();
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            supported.as_array().into_iter().flatten().any(|s| s == v),
            "{v} in {supported}"
        );
        let pod = Pod::new("ver")?;
        let conf = node.conf(v);
        let result = node.starling("ADD", &pod, &conf)?.ok()?.json()?;
        assert_eq!(result["cniVersion"], v, "{result}");
        let legacy = v.starts_with("0.");
        assert_eq!(
            result["ips"][0].get("version").is_some(),
            legacy,
            "ips[].version only before 1.0.0: {result}"
        );
        if v != "0.3.0" && v != "0.3.1" {
            let mut check = conf.clone();
            check["prevResult"] = result.clone();
            node.starling("CHECK", &pod, &check)?.ok()?;
        }
        node.starling("DEL", &pod, &conf)?.ok()?;
    }
    assert_eq!(node.allocated()?, 0);
    Ok(())
}

/// What the case is, its environment, its stdin, the code it must get.
type BadCase<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u64);

#[test]
fn bad_input_gets_a_spec_error_code_never_a_panic() -> Result<()> {
    let node = Node::new("node")?;
    let pod = Pod::new("bad")?;
    let plugin = bin("starling");
    let plugin = plugin.to_str().context("path")?;
    let path = pod.path();
    let add_env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", pod.id.as_str()),
        ("CNI_NETNS", path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let good = node.conf("1.1.0");
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c.to_string()
    };
    let cases: Vec<BadCase> = vec![
        ("not JSON", add_env.to_vec(), "this is not json".into(), 6),
        (
            "truncated JSON",
            add_env.to_vec(),
            "{\"cniVersion\":".into(),
            6,
        ),
        (
            "cniVersion of the wrong type",
            add_env.to_vec(),
            with("cniVersion", json!(5)),
            6,
        ),
        (
            "unknown cniVersion",
            add_env.to_vec(),
            with("cniVersion", json!("9.9.9")),
            1,
        ),
        (
            "mtu of the wrong type",
            add_env.to_vec(),
            with("mtu", json!("big")),
            7,
        ),
        (
            "socketPath of the wrong type",
            add_env.to_vec(),
            with("socketPath", json!(7)),
            7,
        ),
        (
            "missing CNI_NETNS",
            add_env
                .iter()
                .copied()
                .filter(|(k, _)| *k != "CNI_NETNS")
                .collect(),
            good.to_string(),
            4,
        ),
        (
            "missing CNI_CONTAINERID",
            add_env
                .iter()
                .copied()
                .filter(|(k, _)| *k != "CNI_CONTAINERID")
                .collect(),
            good.to_string(),
            4,
        ),
        (
            "unknown CNI_COMMAND",
            vec![("CNI_COMMAND", "FROB")],
            good.to_string(),
            4,
        ),
        (
            "cni.dev/attachments of the wrong type",
            vec![("CNI_COMMAND", "GC")],
            with("cni.dev/attachments", json!("nope")),
            6,
        ),
    ];
    for (what, env, stdin, want) in cases {
        let out = node.run_plugin(plugin, &env, &stdin)?;
        let code = out
            .error_code()
            .with_context(|| format!("case `{what}`: {} {}", out.stdout, out.stderr))?;
        assert_eq!(code, want, "case `{what}`: {}", out.stdout);
    }
    assert!(node.links()?.is_empty());
    assert_eq!(node.allocated()?, 0);
    Ok(())
}

fn check_distinct(pods: &[Pod], results: &[Value]) -> Result<()> {
    let mut seen = HashSet::new();
    for (pod, result) in pods.iter().zip(results) {
        let ips = result_ips(result);
        ensure!(ips.len() == 2, "{}: {result}", pod.id);
        ensure!(
            pod.addresses()? == ips,
            "{}: kernel has {:?}, result says {ips:?}",
            pod.id,
            pod.addresses()?
        );
        for ip in ips {
            ensure!(seen.insert(ip.clone()), "{ip} handed out twice");
        }
    }
    Ok(())
}

#[test]
fn two_hundred_concurrent_adds_get_distinct_addresses() -> Result<()> {
    let node = Node::new("node")?;
    let pods: Vec<Pod> = (0..200)
        .map(|i| Pod::new(&format!("c{i}")))
        .collect::<Result<_>>()?;
    let children: Vec<Child> = pods
        .iter()
        .map(|p| node.spawn_add(p))
        .collect::<Result<_>>()?;
    let mut results = Vec::new();
    for child in children {
        results.push(finish(child)?.ok()?.json()?);
    }
    check_distinct(&pods, &results)?;
    assert_eq!(node.allocated()?, 200);
    assert!(node.leaks(pods.iter().map(Pod::key).collect())?.is_empty());
    Ok(())
}

#[test]
fn kill_9_during_an_add_storm_loses_nothing_and_duplicates_nothing() -> Result<()> {
    let mut node = Node::new("node")?;
    let pods: Vec<Pod> = (0..200)
        .map(|i| Pod::new(&format!("k{i}")))
        .collect::<Result<_>>()?;
    // The first half of the storm is under way when the agent dies; the
    // second half arrives while it is dead.
    let mut children: Vec<Child> = pods[..100]
        .iter()
        .map(|p| node.spawn_add(p))
        .collect::<Result<_>>()?;
    wait_for(
        "the agent to commit 40 allocations",
        Duration::from_secs(60),
        || Ok(node.allocated()? >= 40),
    )?;
    node.kill_agent();
    for p in &pods[100..] {
        children.push(node.spawn_add(p)?);
    }
    let mut results: Vec<Option<Value>> = Vec::new();
    let mut retried = 0;
    for child in children {
        let out = finish(child)?;
        if out.code == Some(0) {
            results.push(Some(out.json()?));
        } else {
            assert_eq!(
                out.error_code()?,
                11,
                "only 'try again later': {}",
                out.stdout
            );
            results.push(None);
            retried += 1;
        }
    }
    assert!(
        retried >= 100,
        "every ADD sent to the dead agent failed with 11"
    );
    node.start_agent()?;
    // Finish the storm as a runtime would: retry what failed.
    for (pod, result) in pods.iter().zip(results.iter_mut()) {
        if result.is_none() {
            *result = Some(finish(node.spawn_add(pod)?)?.ok()?.json()?);
        }
    }
    let results: Vec<Value> = results.into_iter().flatten().collect();
    check_distinct(&pods, &results)?;
    let valid: Vec<AttachmentKey> = pods.iter().map(Pod::key).collect();
    assert!(node.leaks(valid.clone())?.is_empty(), "no leak");
    let mut gc = node.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!(
        pods.iter()
            .map(|p| json!({"containerID": p.id, "ifname": "eth0"}))
            .collect::<Vec<_>>()
    );
    node.run_plugin(
        bin("starling").to_str().context("path")?,
        &[("CNI_COMMAND", "GC")],
        &gc.to_string(),
    )?
    .ok()?;
    assert_eq!(
        node.allocated()?,
        200,
        "GC kept every live pod and found nothing else"
    );
    Ok(())
}

/// Run a conflist the way libcni does: each plugin gets the list's name and
/// version, its runtimeConfig, and the previous plugin's result.
fn chain(
    node: &Node,
    command: &str,
    pod: &Pod,
    plugins: &[Value],
    runtime_config: &Value,
    prev: Option<Value>,
) -> Result<Option<Value>> {
    let path = pod.path();
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", pod.id.as_str()),
        ("CNI_NETNS", path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let order: Vec<&Value> = if command == "DEL" {
        plugins.iter().rev().collect()
    } else {
        plugins.iter().collect()
    };
    let mut prev = prev;
    for plugin in order {
        let mut conf = plugin.clone();
        conf["cniVersion"] = json!("1.0.0");
        conf["name"] = json!("k8s-pod-network");
        conf["runtimeConfig"] = runtime_config.clone();
        if let Some(p) = &prev {
            conf["prevResult"] = p.clone();
        }
        let ty = conf["type"].as_str().context("type")?.to_string();
        let exe = if ty == "starling" {
            bin("starling")
        } else {
            PathBuf::from("/usr/lib/cni").join(&ty)
        };
        let out = node
            .run_plugin(exe.to_str().context("path")?, &env, &conf.to_string())?
            .ok()
            .with_context(|| format!("{command} in `{ty}`"))?;
        if command == "ADD" {
            prev = Some(out.json()?);
        }
    }
    Ok(prev)
}

#[test]
fn chains_with_the_reference_portmap_and_bandwidth_plugins() -> Result<()> {
    require_tool("iptables", "iptables");
    require_tool("tc", "iproute2");
    for p in ["portmap", "bandwidth"] {
        require_tool(&format!("/usr/lib/cni/{p}"), "containernetworking-plugins");
    }
    let node = Node::new("node")?;
    let pod = Pod::new("chain")?;
    let plugins = vec![
        json!({"type": "starling", "socketPath": node.socket}),
        json!({"type": "portmap", "capabilities": {"portMappings": true}}),
        json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
    ];
    let runtime_config = json!({
        "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 10_000_000, "ingressBurst": 100_000,
                      "egressRate": 10_000_000, "egressBurst": 100_000},
    });
    let result =
        chain(&node, "ADD", &pod, &plugins, &runtime_config, None)?.context("chain result")?;
    let ips = result_ips(&result);
    assert_eq!(ips.len(), 2, "our addresses survive the chain: {result}");

    let nat = node.ns.exec("iptables", &["-t", "nat", "-S"])?;
    assert!(
        nat.contains("--dport 18080") && nat.contains(&format!("{}:80", ips[0])),
        "portmap DNAT for the pod: {nat}"
    );
    let veth = starling_cni_proto::host_veth_name(&pod.id, "eth0");
    let qdisc = node.ns.ip(&["-j", "link", "show"])?;
    let tc = node.ns.exec("tc", &["qdisc", "show", "dev", &veth])?;
    assert!(
        tc.contains("tbf"),
        "bandwidth shapes our host veth: {tc} ({qdisc})"
    );
    ping(&pod.ns, NODE_ADDR)?;

    let mut check_conf = plugins.clone();
    check_conf.truncate(1);
    chain(
        &node,
        "CHECK",
        &pod,
        &check_conf,
        &runtime_config,
        Some(result.clone()),
    )?;
    chain(&node, "DEL", &pod, &plugins, &runtime_config, Some(result))?;
    let nat = node.ns.exec("iptables", &["-t", "nat", "-S"])?;
    assert!(
        !nat.contains("--dport 18080"),
        "portmap rules removed: {nat}"
    );
    assert!(node.links()?.is_empty(), "{:?}", node.links()?);
    assert_eq!(node.allocated()?, 0);
    Ok(())
}

#[test]
fn pools_hand_out_blocks_through_the_datastore_up_to_the_limit() -> Result<()> {
    let node = Node::with_ipam(
        "pool",
        "ipam:\n  pools: [{cidr: \"10.250.0.0/28\", blockSize: 30}]\n  maxBlocksPerNode: 2\n  strictAffinity: true\n",
    )?;
    let conf = node.conf("1.1.0");
    let pods: Vec<Pod> = (0..9)
        .map(|i| Pod::new(&format!("pl{i}")))
        .collect::<Result<_>>()?;
    let mut results = Vec::new();
    for p in &pods[..8] {
        results.push(node.starling("ADD", p, &conf)?.ok()?.json()?);
    }
    let ips: HashSet<String> = results.iter().flat_map(result_ips).collect();
    assert_eq!(ips.len(), 8, "two /30 blocks, all eight addresses: {ips:?}");
    assert!(ips.iter().all(|ip| ip.starts_with("10.250.0.")));
    let claims: Value = serde_json::from_str(&std::fs::read_to_string(
        node.dir.join("state/blocks.json"),
    )?)?;
    let mut blocks: Vec<&str> = claims["affinities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["node"] == node.ns.name.as_str())
        .filter_map(|a| a["block"].as_str())
        .collect();
    blocks.sort();
    assert_eq!(blocks, ["10.250.0.0/30", "10.250.0.4/30"]);
    let out = node.starling("ADD", &pods[8], &conf)?;
    assert_eq!(out.error_code()?, 100, "exhausted: {}", out.stdout);
    assert!(out.stdout.contains("strictAffinity"), "{}", out.stdout);
    assert!(pods[8].ns.ip(&["link", "show", "eth0"]).is_err());
    Ok(())
}

/// The CNI socket's own guards (agent/src/ipam/server.rs over the socket
/// `starling_bgp::jsonl::bind` makes), exercised on the socket a running
/// agent serves: a non-root plugin is stopped by the socket's modes and,
/// with the modes loosened, by the peer-credential check; a frame longer
/// than the protocol's bound gets an error naming the limit; a client that
/// sends nothing is hung up on; and through all of it the agent keeps
/// serving root. The plugin's error names the socket in each refusal.
#[test]
fn the_cni_socket_refuses_non_root_peers_oversized_frames_and_idle_clients() -> Result<()> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    require_tool("setpriv", "util-linux");
    let node = Node::new("sock")?;
    let conf = node.conf("1.1.0");
    let plugin = bin("starling");
    let plugin = plugin.to_str().context("path")?;
    let socket = node.socket.display().to_string();
    // STATUS as uid/gid 65534 (nobody), from inside the node namespace.
    let nobody = |node: &Node| -> Result<Outcome> {
        let mut cmd = node.ns.command("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", plugin])
            .env_remove("CNI_COMMAND")
            .env("CNI_COMMAND", "STATUS")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("cannot run setpriv")?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(conf.to_string().as_bytes())?;
        finish(child)
    };

    // 1. The socket's own modes (directory 0700, socket 0600).
    let out = nobody(&node)?;
    let code = out.error_code()?;
    let err = out.json()?;
    println!("non-root, modes as made: code {code}: {err}");
    assert_eq!(code, 50, "STATUS without an agent to talk to: {err}");
    assert!(
        err.to_string().contains(&socket) && err.to_string().contains("denied"),
        "the error names the socket and the refusal: {err}"
    );

    // 2. Modes loosened (as a careless operator might): the agent's
    // SO_PEERCRED check still refuses, and the plugin says where.
    for dir in [node.dir.path.clone(), node.dir.join("run")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::set_permissions(&node.socket, std::fs::Permissions::from_mode(0o666))?;
    let out = nobody(&node)?;
    let code = out.error_code()?;
    let err = out.json()?;
    println!("non-root, modes loosened: code {code}: {err}");
    assert_eq!(code, 50, "{err}");
    assert!(
        err.to_string()
            .contains("only root may use this socket (peer uid 65534)"),
        "the agent's refusal: {err}"
    );
    assert!(
        err.to_string().contains(&socket),
        "the error names the socket: {err}"
    );

    // 3. A frame header announcing more than the protocol's bound: an
    // error reply naming the limit, before any body is read.
    let mut s = UnixStream::connect(&node.socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&(proto::MAX_FRAME + 1).to_be_bytes())?;
    match proto::read_frame::<proto::Response>(&mut s)? {
        proto::Response::Err(e) => {
            println!("oversized frame: {e}");
            assert!(
                e.message.contains("exceeds") && e.message.contains(&proto::MAX_FRAME.to_string()),
                "{e}"
            );
        }
        other => bail!("an oversized frame was answered {other:?}"),
    }

    // 4. A client that sends nothing is disconnected (the agent's 5 s
    // read timeout), well within this deadline.
    let mut idle = UnixStream::connect(&node.socket)?;
    idle.set_read_timeout(Some(Duration::from_secs(30)))?;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    // A signal meant for another test's child can interrupt the read
    // (EINTR): read again until the 30 s deadline.
    let n = loop {
        match idle.read(&mut buf) {
            Err(e)
                if e.kind() == std::io::ErrorKind::Interrupted
                    && started.elapsed() < Duration::from_secs(30) =>
            {
                continue;
            }
            r => break r.context("the agent keeps an idle client for over 30 s")?,
        }
    };
    assert_eq!(n, 0, "an idle client gets no reply, only a close");
    println!(
        "idle client closed after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // 5. Root is still served.
    node.run_plugin(plugin, &[("CNI_COMMAND", "STATUS")], &conf.to_string())?
        .ok()?;
    Ok(())
}
