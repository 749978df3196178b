//! `starlingctl lab`: a cluster of network namespaces on one machine, with
//! a real `starling-agent` per node, pods wired by the real `starling` CNI
//! binary and optionally a real top-of-rack router.
//!
//! Layout (for lab `NAME`): a fabric namespace `NAME-fab` holds the underlay
//! bridge; node `nodeI` is namespace `NAME-nodeI` with `eth0` on the bridge
//! at 192.0.2.(10+I)/24 (and 2001:db8::(10+I)/64 with IPv6); pods are
//! namespaces `NAME-nodeI-podK`; the router is `NAME-tor` at 192.0.2.254;
//! the outside host `NAME-out` ([`outside`]) is the nodes' default gateway
//! at 192.0.2.250 and knows no pod route. With `--underlay two-subnets`,
//! even nodes sit on a second bridge and subnet (198.51.100.0/24) behind the
//! router namespace `NAME-rtr` (`underlay`), and there is no outside host.
//! Everything the lab started is recorded in `DIR/NAME/lab.json`, so `down`
//! can remove it even after a crash.

mod outside;
mod tor_frr;
mod tor_gobgp;
mod underlay;

pub use outside::{LabOutside, OUTSIDE_V4, OUTSIDE_V6};
pub use underlay::{LabRouter, RouterCounters, Underlay};

use crate::node::control::{self, NodeStatus, RoutesReport};
use anyhow::{Context, Result, anyhow, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where labs keep their state unless told otherwise.
pub const DEFAULT_DIR: &str = "/run/starling-lab";
/// The AS of the nodes, and of the top-of-rack router.
pub const NODE_AS: u32 = 64512;
pub const TOR_AS: u32 = 65000;
pub const POOL_V4: &str = "10.244.0.0/16";
pub const POOL_V6: &str = "fd00:10:244::/56";
/// The cluster ID of the reflectors in the `reflectors` topology.
pub const CLUSTER_ID: &str = "224.0.0.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// Every node peers with every other node.
    Mesh,
    /// node1 and node2 reflect routes for the others (mesh off).
    Reflectors,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LabEncapsulation {
    None,
    Ipip,
    CrossSubnet,
    /// VXLAN to every other node (`vxlanMode: Always`).
    Vxlan,
    /// VXLAN to nodes on another subnet, plain on ours (`vxlanMode: CrossSubnet`).
    VxlanCrossSubnet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Tor {
    Bird,
    /// FRR's zebra and bgpd.
    Frr,
    /// GoBGP's gobgpd.
    Gobgp,
}

#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct LabOptions {
    /// Lab name; namespaces are called NAME-node1, NAME-node1-pod1, ...
    #[arg(long, default_value = "lab")]
    pub name: String,
    /// Where the lab keeps its state, logs and sockets.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    #[arg(long, value_enum, default_value_t = Topology::Mesh)]
    pub topology: Topology,
    #[arg(long, value_enum, default_value_t = LabEncapsulation::None)]
    pub encapsulation: LabEncapsulation,
    /// One subnet for all nodes, or two joined by a router.
    #[arg(long, value_enum, default_value_t = Underlay::Flat)]
    #[serde(default)]
    pub underlay: Underlay,
    #[arg(long, default_value_t = 2)]
    pub pods_per_node: usize,
    /// Give nodes and pods IPv6 addresses too.
    #[arg(long)]
    pub ipv6: bool,
    /// Agents with `bgpEnabled: false`: no BGP at all, the other nodes'
    /// blocks come from the datastore (the shared claim file and the model).
    #[arg(long)]
    #[serde(default)]
    pub no_bgp: bool,
    /// Add a top-of-rack router that peers with every node.
    #[arg(long, value_enum)]
    pub tor: Option<Tor>,
    /// TCP-MD5 password of the sessions with the top-of-rack router.
    #[arg(long)]
    pub tor_password: Option<String>,
    /// Prefixes the top-of-rack router announces to every node (static
    /// blackholes in BIRD), e.g. to see the agent refuse hijacks.
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub tor_announce: Vec<IpNet>,
    /// The top-of-rack router puts the nodes' AS in the AS path of what it
    /// announces (to see numAllowedLocalASNumbers at work).
    #[arg(long)]
    #[serde(default)]
    pub tor_prepend_node_as: bool,
    /// The top-of-rack router's sessions use GTSM (`ttl security on`): it
    /// takes only packets sent with TTL 255, as a multihop eBGP speaker sends.
    #[arg(long)]
    #[serde(default)]
    pub tor_gtsm: bool,
    /// The agent binary; default: next to this program.
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// The CNI plugin binary; default: next to this program.
    #[arg(long)]
    pub cni_bin: Option<PathBuf>,
    /// Read the model from a Kubernetes API server instead of the lab's
    /// file (the Nodes, IPPools and BGPConfiguration must be there; each
    /// node's namespace must reach the server at the kubeconfig's address).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The agents' `autodetect` method (e.g. `interface=eth0`): each finds
    /// its own IPv4 address when the model gives none (or, with
    /// `--kubeconfig`, only a Node's InternalIP).
    #[arg(long)]
    #[serde(default)]
    pub autodetect: Option<String>,
}

/// What `up` built, saved as `lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub dir: PathBuf,
    pub options: LabOptions,
    pub fabric: String,
    pub nodes: Vec<LabNode>,
    pub pods: Vec<LabPod>,
    pub tor: Option<LabTor>,
    /// The router between the subnets (`--underlay two-subnets`).
    #[serde(default)]
    pub router: Option<LabRouter>,
    pub agent_bin: PathBuf,
    pub cni_bin: PathBuf,
    /// The node-to-node mesh is on.
    pub mesh: bool,
    /// Nodes that are route reflectors (cluster ID 224.0.0.1).
    pub reflectors: Vec<String>,
    /// The host beyond the cluster (labs saved before it existed have none).
    #[serde(default)]
    pub outside: Option<LabOutside>,
    /// The pools' `natOutgoing`.
    #[serde(default)]
    pub nat_outgoing: bool,
    /// BGPFilters the top-of-rack peer names (`spec.filters`).
    #[serde(default)]
    pub tor_filters: Vec<String>,
    /// More model documents, written after the lab's own (BGPFilters).
    #[serde(default)]
    pub extra_model: String,
    /// More lines of the BGPConfiguration's spec (each indented two spaces).
    #[serde(default)]
    pub bgp_extra: String,
    /// More fields of the top-of-rack BGPPeer's spec (`, key: value` ...).
    #[serde(default)]
    pub tor_extra: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    pub ipv4: IpNet,
    pub ipv6: Option<IpNet>,
    pub dir: PathBuf,
    /// The fabric-side end of the node's uplink.
    pub port: String,
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabPod {
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabTor {
    pub kind: Tor,
    pub netns: String,
    pub ipv4: IpNet,
    pub pid: Option<u32>,
    pub socket: PathBuf,
}

fn sh(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what}: {:?} {:?} failed: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(what: &str, args: &[&str]) -> Result<String> {
    sh(what, Command::new("ip").args(args))
}

fn in_ns(what: &str, ns: &str, args: &[&str]) -> Result<String> {
    sh(
        what,
        Command::new("ip").args(["netns", "exec", ns]).args(args),
    )
}

fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to {} (build the workspace with `cargo build --release`, or pass --{}-bin)",
            name,
            me.display(),
            if name == "starling" { "cni" } else { "agent" }
        );
    }
    Ok(p)
}

fn state_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

impl LabState {
    pub fn load(dir: &Path, name: &str) -> Result<LabState> {
        let p = state_dir(dir, name).join("lab.json");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "no lab {name} here ({} unreadable; run `starlingctl lab up`)",
                p.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a lab state file", p.display()))
    }

    pub fn save(&self) -> Result<()> {
        let p = state_dir(&self.dir, &self.name).join("lab.json");
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
        Ok(())
    }

    fn model_path(&self) -> PathBuf {
        state_dir(&self.dir, &self.name).join("model.yaml")
    }

    pub fn node(&self, name: &str) -> Result<&LabNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("lab {} has no node {name}", self.name))
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut LabNode> {
        let lab = self.name.clone();
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("lab {lab} has no node {name}"))
    }

    /// The model file every agent reads.
    pub fn model(&self) -> String {
        let mut y = String::new();
        let _ = write!(
            y,
            "apiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {{name: default}}\nspec:\n  asNumber: {NODE_AS}\n  nodeToNodeMeshEnabled: {}\n  nodeMeshMaxRestartTime: 120s\n",
            self.mesh
        );
        y.push_str(&self.bgp_extra);
        let (ipip, vxlan) = match self.options.encapsulation {
            LabEncapsulation::None => ("Never", "Never"),
            LabEncapsulation::Ipip => ("Always", "Never"),
            LabEncapsulation::CrossSubnet => ("CrossSubnet", "Never"),
            LabEncapsulation::Vxlan => ("Never", "Always"),
            LabEncapsulation::VxlanCrossSubnet => ("Never", "CrossSubnet"),
        };
        let _ = write!(
            y,
            "---\napiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {{name: pool-v4}}\nspec: {{cidr: {POOL_V4}, blockSize: 26, ipipMode: {ipip}, vxlanMode: {vxlan}, natOutgoing: {}}}\n",
            self.nat_outgoing
        );
        if self.options.ipv6 {
            let _ = write!(
                y,
                "---\napiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {{name: pool-v6}}\nspec: {{cidr: \"{POOL_V6}\", blockSize: 122, vxlanMode: {vxlan}, natOutgoing: {}}}\n",
                self.nat_outgoing
            );
        }
        for n in &self.nodes {
            let _ = write!(
                y,
                "---\napiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata: {{name: {}}}\nspec:\n  ipv4Address: {}\n",
                n.name, n.ipv4
            );
            if let Some(v6) = n.ipv6 {
                let _ = writeln!(y, "  ipv6Address: \"{v6}\"");
            }
            if self.reflectors.contains(&n.name) {
                let _ = writeln!(y, "  routeReflectorClusterID: {CLUSTER_ID}");
            }
        }
        if let Some(t) = &self.tor {
            let password = if self.options.tor_password.is_some() {
                format!(
                    ", password: {{file: {}}}",
                    state_dir(&self.dir, &self.name)
                        .join("tor.password")
                        .display()
                )
            } else {
                String::new()
            };
            let filters = if self.tor_filters.is_empty() {
                String::new()
            } else {
                format!(", filters: [{}]", self.tor_filters.join(", "))
            };
            let _ = write!(
                y,
                "---\napiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {{name: tor}}\nspec: {{peerIP: {}, asNumber: {TOR_AS}{password}{filters}{}}}\n",
                t.ipv4.addr(),
                self.tor_extra
            );
        }
        if !self.extra_model.is_empty() {
            y.push_str("---\n");
            y.push_str(&self.extra_model);
        }
        y
    }

    /// Give the top-of-rack peer these BGPFilters (by name), with
    /// `documents` (the filters, as YAML) added to the model.
    pub fn set_tor_filters(&mut self, filters: &[&str], documents: &str) -> Result<()> {
        self.tor_filters = filters.iter().map(|f| f.to_string()).collect();
        self.extra_model = documents.to_string();
        self.save()?;
        self.write_model()
    }

    /// Add `bgp` to the BGPConfiguration's spec (lines) and `tor` to the
    /// top-of-rack BGPPeer's spec (`, key: value` ...).
    pub fn set_bgp_knobs(&mut self, bgp: &str, tor: &str) -> Result<()> {
        self.bgp_extra = bgp.to_string();
        self.tor_extra = tor.to_string();
        self.save()?;
        self.write_model()
    }

    /// Switch the topology: the mesh, or node1 and node2 as reflectors.
    pub fn set_topology(&mut self, topology: Topology) -> Result<()> {
        self.mesh = topology == Topology::Mesh;
        self.reflectors = match topology {
            Topology::Mesh => vec![],
            Topology::Reflectors => self.nodes.iter().take(2).map(|n| n.name.clone()).collect(),
        };
        self.save()?;
        self.write_model()
    }

    /// Make a node a reflector, or a client again.
    pub fn set_reflector(&mut self, node: &str, reflector: bool) -> Result<()> {
        self.node(node)?;
        self.reflectors.retain(|n| n != node);
        if reflector {
            self.reflectors.push(node.to_string());
        }
        self.save()?;
        self.write_model()
    }

    /// Write the model without `node` (its namespace and agent stay): the
    /// other nodes see it leave.
    pub fn write_model_without(&self, node: &str) -> Result<()> {
        let mut l = self.clone();
        l.nodes.retain(|n| n.name != node);
        l.write_model()
    }

    /// Replace the model file atomically; the agents reload it.
    pub fn write_model(&self) -> Result<()> {
        let p = self.model_path();
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, self.model()).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
    }

    fn agent_config(&self, n: &LabNode) -> String {
        let datastore = match &self.options.kubeconfig {
            Some(k) => format!("{{type: kubernetes, kubeconfig: {}}}", k.display()),
            None => format!(
                "{{type: file, path: {}, pollMs: 100}}",
                self.model_path().display()
            ),
        };
        format!(
            "nodeName: {}\nstateDir: {}\nsocketPath: {}\ncontrolSocket: {}\ndatastore: {datastore}\nipam: {{datastoreFile: {}}}\nbgpEnabled: {}\n",
            n.name,
            n.dir.display(),
            n.dir.join("cni.sock").display(),
            n.dir.join("agent.sock").display(),
            state_dir(&self.dir, &self.name)
                .join("blocks.json")
                .display(),
            !self.options.no_bgp
        ) + &self
            .options
            .autodetect
            .as_ref()
            .map(|m| format!("autodetect: '{m}'\n"))
            .unwrap_or_default()
    }

    /// Start (or restart) a node's agent in its namespace.
    pub fn start_agent(&mut self, node: &str) -> Result<u32> {
        self.start_agent_with_env(node, &[])
    }

    /// [`LabState::start_agent`] with extra environment for the agent (and
    /// the `ip netns exec` that starts it), e.g. a `PATH` without `nft`.
    pub fn start_agent_with_env(&mut self, node: &str, env: &[(&str, &str)]) -> Result<u32> {
        let n = self.node(node)?.clone();
        let cfg = n.dir.join("agent.yaml");
        // A killed agent leaves its socket behind; the new one's appearing
        // is the sign it serves.
        let _ = std::fs::remove_file(n.dir.join("cni.sock"));
        std::fs::write(&cfg, self.agent_config(&n))
            .with_context(|| format!("{node}: writing {}", cfg.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.dir.join("agent.log"))
            .with_context(|| format!("{node}: opening its log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &n.netns])
            .arg(&self.agent_bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("{node}: starting {}", self.agent_bin.display()))?;
        let pid = child.id();
        // The lab outlives this command: the child is not waited for.
        std::mem::forget(child);
        self.node_mut(node)?.pid = Some(pid);
        self.save()?;
        wait_for_socket(&n.dir.join("cni.sock"), Some(pid), Duration::from_secs(30)).with_context(
            || {
                format!(
                    "{node}: agent did not start; the end of {}:\n{}",
                    n.dir.join("agent.log").display(),
                    log_tail(&n.dir.join("agent.log"), 10)
                )
            },
        )?;
        Ok(pid)
    }

    /// SIGKILL a node's agent (routes and pods stay, as after a crash).
    pub fn kill_agent(&mut self, node: &str) -> Result<()> {
        if let Some(pid) = self.node(node)?.pid {
            kill(pid, libc::SIGKILL);
            // A process killed inside a system call (an fsync of the
            // allocation store on a busy disk) exits only when the call
            // returns, and holds the store's lock until then: a new agent
            // started before it is gone fails on that lock.
            wait_gone(pid, Duration::from_secs(30))
                .with_context(|| format!("{node}: killing its agent"))?;
        }
        self.node_mut(node)?.pid = None;
        self.save()
    }

    /// Ask a node's agent for its status.
    pub fn status_of(&self, node: &str) -> Result<NodeStatus> {
        let n = self.node(node)?;
        control::status(&n.dir.join("agent.sock")).map_err(|e| anyhow!("{node}: {e}"))
    }

    pub fn routes_of(&self, node: &str) -> Result<RoutesReport> {
        let n = self.node(node)?;
        control::routes(&n.dir.join("agent.sock")).map_err(|e| anyhow!("{node}: {e}"))
    }

    /// Create one pod on a node through the CNI plugin, as a runtime does.
    pub fn add_pod(&mut self, node: &str, pod: &str) -> Result<LabPod> {
        let n = self.node(node)?.clone();
        let netns = format!("{}-{pod}", n.netns);
        ip(
            &format!("{node}: pod {pod}: creating its namespace"),
            &["netns", "add", &netns],
        )?;
        let conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "starling-lab",
            "type": "starling",
            "socketPath": n.dir.join("cni.sock"),
        });
        let cni_dir = self
            .cni_bin
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &n.netns])
            .arg(&self.cni_bin)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &netns)
            .env("CNI_NETNS", format!("/var/run/netns/{netns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("{node}: pod {pod}: running {}", self.cni_bin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(conf.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{node}: pod {pod}: CNI ADD failed: {} {}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let result: serde_json::Value = serde_json::from_str(&stdout)
            .with_context(|| format!("{node}: pod {pod}: CNI result is not JSON: {stdout}"))?;
        let ips = result["ips"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["address"].as_str())
                    .filter_map(|s| s.parse::<IpNet>().ok())
                    .map(|n| n.addr())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if ips.is_empty() {
            bail!("{node}: pod {pod}: CNI result has no address: {stdout}");
        }
        let p = LabPod {
            name: format!("{node}-{pod}"),
            node: node.to_string(),
            netns,
            ips,
        };
        self.pods.push(p.clone());
        self.save()?;
        Ok(p)
    }

    /// Set a node's uplink (its fabric port) down or up.
    pub fn set_uplink(&self, node: &str, up: bool) -> Result<()> {
        let n = self.node(node)?;
        ip(
            &format!("{node}: uplink {}", if up { "up" } else { "down" }),
            &[
                "-n",
                &self.fabric,
                "link",
                "set",
                &n.port,
                if up { "up" } else { "down" },
            ],
        )?;
        Ok(())
    }

    /// Remove a node: its agent, pods and namespace, and its object from the model.
    pub fn remove_node(&mut self, node: &str) -> Result<()> {
        self.kill_agent(node)?;
        let n = self.node(node)?.clone();
        for p in self.pods.iter().filter(|p| p.node == node) {
            let _ = ip("removing a pod", &["netns", "del", &p.netns]);
        }
        self.pods.retain(|p| p.node != node);
        let _ = ip("removing a node", &["netns", "del", &n.netns]);
        let _ = ip(
            "removing a port",
            &["-n", &self.fabric, "link", "del", &n.port],
        );
        self.nodes.retain(|x| x.name != node);
        self.reflectors.retain(|x| x != node);
        self.save()?;
        self.write_model()
    }

    /// Add node `nodeI`: its namespace on the fabric, its object in the
    /// model (and the router's config), and its agent.
    pub fn add_node(&mut self, i: usize) -> Result<String> {
        let name = format!("node{i}");
        if self.nodes.iter().any(|n| n.name == name) {
            bail!("lab {} already has {name}", self.name);
        }
        self.build_node(i)?;
        self.write_model()?;
        if self.tor.is_some() {
            self.configure_tor()?;
        }
        self.start_agent(&name)?;
        Ok(name)
    }

    /// Node `nodeI`'s namespace on the fabric with its addresses and state
    /// directory, recorded in the lab: what `up` and [`LabState::add_node`]
    /// share (the model and the agent are theirs to do).
    fn build_node(&mut self, i: usize) -> Result<()> {
        let name = format!("node{i}");
        let netns = format!("{}-{name}", self.name);
        let ndir = state_dir(&self.dir, &self.name).join(&name);
        std::fs::create_dir_all(&ndir)?;
        let port = format!("n{i}");
        let (bridge, ipv4) = underlay::node_address(self.options.underlay, i)?;
        let ipv6: Option<IpNet> = self
            .options
            .ipv6
            .then(|| format!("2001:db8::{:x}/64", 0x10 + i).parse())
            .transpose()?;
        plug(&self.fabric, &netns, &port, bridge, &ipv4, ipv6.as_ref())
            .with_context(|| format!("{name}: wiring"))?;
        underlay::route_node(self, &netns, &ipv4).with_context(|| format!("{name}: wiring"))?;
        self.route_via_outside(&netns)
            .with_context(|| format!("{name}: wiring"))?;
        self.nodes.push(LabNode {
            name,
            netns,
            ipv4,
            ipv6,
            dir: ndir,
            port,
            pid: None,
        });
        self.save()
    }

    fn configure_tor(&self) -> Result<()> {
        let Some(t) = &self.tor else { return Ok(()) };
        let dir = state_dir(&self.dir, &self.name);
        if t.kind != Tor::Bird {
            if let Some(p) = &self.options.tor_password {
                std::fs::write(dir.join("tor.password"), p)?;
            }
            // Started with every node; later nodes are added in place.
            return match (t.kind, t.pid) {
                (_, None) => Ok(()),
                (Tor::Gobgp, Some(_)) => tor_gobgp::reconfigure(self, t),
                _ => tor_frr::reconfigure(self),
            };
        }
        let password = match &self.options.tor_password {
            Some(p) => {
                std::fs::write(dir.join("tor.password"), p)?;
                format!("  password \"{}\";\n", p.replace('"', ""))
            }
            None => String::new(),
        };
        let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) = self
            .options
            .tor_announce
            .iter()
            .partition(|p| p.addr().is_ipv4());
        let mut statics = String::new();
        for (family, list) in [("ipv4", &v4), ("ipv6", &v6)] {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(
                statics,
                "protocol static announced_{family} {{\n  {family};"
            );
            for p in list.iter() {
                let _ = writeln!(statics, "  route {p} blackhole;");
            }
            statics.push_str("}\n");
        }
        let export = if v4.is_empty() {
            "none".to_string()
        } else if self.options.tor_prepend_node_as {
            format!(
                "filter {{ if source != RTS_STATIC then reject; bgp_path.prepend({NODE_AS}); accept; }}"
            )
        } else {
            "where source = RTS_STATIC".to_string()
        };
        let gtsm = if self.options.tor_gtsm {
            "  ttl security on;\n"
        } else {
            ""
        };
        let ipv6_channel = if v6.is_empty() {
            String::new()
        } else {
            "  ipv6 { import none; export where source = RTS_STATIC; };\n".to_string()
        };
        let mut c = format!(
            "router id 192.0.2.254;\nprotocol device {{}}\n{statics}template bgp tornode {{\n  local 192.0.2.254 as {TOR_AS};\n{password}{gtsm}  ipv4 {{ import all; export {export}; }};\n{ipv6_channel}}}\n"
        );
        for n in &self.nodes {
            let _ = writeln!(
                c,
                "protocol bgp {} from tornode {{ neighbor {} as {NODE_AS}; }}",
                n.name,
                n.ipv4.addr()
            );
        }
        std::fs::write(dir.join("bird.conf"), c)?;
        if t.pid.is_some() {
            sh(
                "top-of-rack router: reconfiguring BIRD",
                Command::new("birdc")
                    .arg("-s")
                    .arg(&t.socket)
                    .arg("configure"),
            )?;
        }
        Ok(())
    }

    /// Wait until every node has every session Established and a route to
    /// every other node's blocks.
    pub fn wait_converged(&self, deadline: Duration, progress: &mut dyn FnMut(&str)) -> Result<()> {
        let end = Instant::now() + deadline;
        let mut last = String::new();
        loop {
            match self.converged() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let msg = format!("{e:#}");
                    if Instant::now() >= end {
                        bail!("not converged after {} s: {msg}", deadline.as_secs());
                    }
                    if msg != last {
                        progress(&format!("waiting: {msg}"));
                        last = msg;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn converged(&self) -> Result<()> {
        let mut blocks: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
        for n in &self.nodes {
            let st = self.status_of(&n.name)?;
            if let Some(s) = st.sessions.iter().find(|s| s.state != "Established") {
                bail!("{}: session to {} is {}", n.name, s.peer, s.state);
            }
            blocks.insert(n.name.clone(), st.blocks);
        }
        for n in &self.nodes {
            let routes = self.routes_of(&n.name)?;
            for (other, bs) in &blocks {
                if *other == n.name {
                    continue;
                }
                for b in bs {
                    let ok = routes.fib.iter().any(|r| {
                        r.dst == *b && matches!(r.target, crate::fib::RouteTarget::Via(_))
                    });
                    if !ok {
                        bail!("{}: no route yet to {b} of {other}", n.name);
                    }
                }
            }
        }
        Ok(())
    }

    /// Ping every pod from every pod. Returns (from, to, address, answered).
    pub fn check(&self) -> Vec<(String, String, IpAddr, bool)> {
        let mut jobs = Vec::new();
        for a in &self.pods {
            for b in &self.pods {
                if a.name == b.name {
                    continue;
                }
                for addr in &b.ips {
                    jobs.push((a.clone(), b.name.clone(), *addr));
                }
            }
        }
        let results = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for chunk in jobs.chunks(jobs.len().div_ceil(16).max(1)) {
                let results = &results;
                s.spawn(move || {
                    for (a, b, addr) in chunk {
                        let ok = Command::new("ip")
                            .args([
                                "netns", "exec", &a.netns, "ping", "-c", "3", "-i", "0.2", "-W",
                                "1", "-q",
                            ])
                            .arg(addr.to_string())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()
                            .is_ok_and(|s| s.success());
                        results.lock().unwrap_or_else(|e| e.into_inner()).push((
                            a.name.clone(),
                            b.clone(),
                            *addr,
                            ok,
                        ));
                    }
                });
            }
        });
        let mut r = results.into_inner().unwrap_or_else(|e| e.into_inner());
        r.sort();
        r
    }
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this lab started; no memory is touched.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid as i32, 0) == 0 };
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
}

fn wait_gone(pid: u32, within: Duration) -> Result<()> {
    let end = Instant::now() + within;
    while alive(pid) {
        if Instant::now() >= end {
            bail!(
                "pid {pid} still exists {} s after SIGKILL",
                within.as_secs()
            );
        }
        // Reap it if it is our child (tests start agents from this process).
        // SAFETY: waitpid on a specific pid with WNOHANG.
        unsafe {
            libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Build a lab. `progress` is told each step.
pub fn up(opts: LabOptions, progress: &mut dyn FnMut(&str)) -> Result<LabState> {
    check_options(&opts)?;
    let agent_bin = match &opts.agent_bin {
        Some(p) => p.clone(),
        None => sibling("starling-agent")?,
    };
    let cni_bin = match &opts.cni_bin {
        Some(p) => p.clone(),
        None => sibling("starling")?,
    };
    // A crashed earlier lab of the same name goes first.
    down(&opts.dir, &opts.name, &mut |_| {})?;
    let dir = state_dir(&opts.dir, &opts.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut lab = LabState {
        name: opts.name.clone(),
        dir: opts.dir.clone(),
        options: opts.clone(),
        fabric: format!("{}-fab", opts.name),
        nodes: Vec::new(),
        pods: Vec::new(),
        tor: None,
        router: None,
        agent_bin,
        cni_bin,
        mesh: opts.topology == Topology::Mesh,
        reflectors: match opts.topology {
            Topology::Mesh => vec![],
            Topology::Reflectors => vec!["node1".into(), "node2".into()],
        },
        outside: None,
        nat_outgoing: true,
        tor_filters: Vec::new(),
        extra_model: String::new(),
        bgp_extra: String::new(),
        tor_extra: String::new(),
    };
    lab.save()?;
    make_fabric(&lab.fabric, progress)?;
    underlay::make_bridges(&lab.fabric, opts.underlay)?;
    underlay::start_router(&mut lab, progress)?;
    if opts.underlay == Underlay::TwoSubnets {
        progress(
            "outside host: none with --underlay two-subnets (the nodes' gateway is the subnet router)",
        );
    } else {
        progress(&format!(
            "outside host: namespace {}-out at {OUTSIDE_V4}, the nodes' gateway, no pod routes",
            opts.name
        ));
        lab.build_outside()?;
    }
    for i in 1..=opts.nodes {
        progress(&format!(
            "node{i}: namespace {}-node{i}, uplink eth0",
            opts.name
        ));
        lab.build_node(i)?;
    }
    if let Some(kind) = opts.tor {
        lab.start_tor(kind, progress)?;
    }
    lab.write_model()?;
    for i in 0..lab.nodes.len() {
        let name = lab.nodes[i].name.clone();
        progress(&format!("{name}: starting starling-agent"));
        lab.start_agent(&name)?;
    }
    lab.add_pods(opts.pods_per_node, progress)?;
    progress("waiting for BGP sessions and routes");
    lab.wait_converged(Duration::from_secs(90), progress)?;
    progress("converged");
    Ok(lab)
}

/// Refuse what `up` cannot build, before anything is made.
fn check_options(opts: &LabOptions) -> Result<()> {
    if opts.nodes == 0 || opts.nodes > 50 {
        bail!("--nodes must be 1..=50 (got {})", opts.nodes);
    }
    if opts.topology == Topology::Reflectors && opts.nodes < 3 {
        bail!("--topology reflectors needs at least 3 nodes (2 reflectors and a client)");
    }
    if opts.name.is_empty()
        || opts.name.len() > 20
        || !opts
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        bail!(
            "--name must be 1-20 letters, digits or '-' (got {:?})",
            opts.name
        );
    }
    underlay::check(opts)?;
    if opts.no_bgp && opts.tor.is_some() {
        bail!("--no-bgp and --tor cannot be combined: the top-of-rack router peers over BGP");
    }
    if opts.no_bgp && opts.topology == Topology::Reflectors {
        bail!("--no-bgp and --topology reflectors cannot be combined: reflectors are BGP");
    }
    if matches!(
        opts.encapsulation,
        LabEncapsulation::Ipip | LabEncapsulation::CrossSubnet
    ) && !ipip_available()
    {
        bail!(
            "--encapsulation {:?} needs the kernel's ipip module, which this kernel lacks \
             (`ip link add type ipip` fails). Run the lab on a kernel with ipip, or use the \
             QEMU recipe in tests/vm/ipip-vm.sh; --encapsulation none, vxlan and \
             vxlan-cross-subnet work here",
            opts.encapsulation
        );
    }
    if let Some(Tor::Bird) = opts.tor
        && Command::new("bird").arg("--version").output().is_err()
    {
        bail!("--tor bird needs BIRD 2 (Debian package bird2)");
    }
    if let Some(Tor::Frr) = opts.tor
        && !Path::new("/usr/lib/frr/bgpd").exists()
    {
        bail!("--tor frr needs FRR's zebra and bgpd in /usr/lib/frr (Debian package frr)");
    }
    if let Some(Tor::Gobgp) = opts.tor
        && Command::new("gobgpd").arg("--version").output().is_err()
    {
        bail!("--tor gobgp needs gobgpd and gobgp (Debian package gobgpd)");
    }
    Ok(())
}

/// The underlay: a namespace holding the bridge every node plugs into.
fn make_fabric(fabric: &str, progress: &mut dyn FnMut(&str)) -> Result<()> {
    progress(&format!("underlay: namespace {fabric} with bridge br0"));
    ip("underlay", &["netns", "add", fabric])?;
    ip("underlay", &["-n", fabric, "link", "set", "lo", "up"])?;
    ip(
        "underlay",
        &["-n", fabric, "link", "add", "br0", "type", "bridge"],
    )?;
    ip("underlay", &["-n", fabric, "link", "set", "br0", "up"])?;
    Ok(())
}

impl LabState {
    /// The top-of-rack router's BGP table, as its own CLI prints it.
    pub fn tor_routes(&self) -> Result<String> {
        let Some(t) = &self.tor else {
            bail!("lab {} has no top-of-rack router", self.name)
        };
        match t.kind {
            Tor::Bird => sh(
                "top-of-rack router: birdc",
                Command::new("birdc")
                    .arg("-s")
                    .arg(&t.socket)
                    .args(["show", "route"]),
            ),
            Tor::Frr => tor_frr::vtysh(self, &["show bgp ipv4 unicast"]),
            Tor::Gobgp => tor_gobgp::routes(t),
        }
    }

    /// The top-of-rack router on the fabric, started with its config.
    fn start_tor(&mut self, kind: Tor, progress: &mut dyn FnMut(&str)) -> Result<()> {
        let dir = state_dir(&self.dir, &self.name);
        let netns = format!("{}-tor", self.name);
        progress(&format!(
            "top-of-rack router: {kind:?} in {netns}, AS {TOR_AS}"
        ));
        let ipv4: IpNet = "192.0.2.254/24".parse()?;
        plug(&self.fabric, &netns, "tor", "br0", &ipv4, None)
            .context("top-of-rack router: wiring")?;
        let socket = dir.join("tor.ctl");
        self.tor = Some(LabTor {
            kind,
            netns: netns.clone(),
            ipv4,
            pid: None,
            socket: socket.clone(),
        });
        self.configure_tor()?;
        if kind != Tor::Bird {
            let pid = match (kind, &self.tor) {
                (Tor::Gobgp, Some(t)) => Some(tor_gobgp::start(self, t)?),
                _ => tor_frr::start(self, &netns)?,
            };
            if let Some(t) = self.tor.as_mut() {
                t.pid = pid;
            }
            return self.save();
        }
        let conf = dir.join("bird.conf");
        let pidfile = dir.join("tor.pid");
        in_ns(
            "top-of-rack router: starting BIRD",
            &netns,
            &[
                "bird",
                "-c",
                &conf.display().to_string(),
                "-s",
                &socket.display().to_string(),
                "-P",
                &pidfile.display().to_string(),
            ],
        )?;
        let pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(t) = self.tor.as_mut() {
            t.pid = pid;
        }
        self.save()
    }

    /// `per_node` pods on every node, through the CNI plugin.
    fn add_pods(&mut self, per_node: usize, progress: &mut dyn FnMut(&str)) -> Result<()> {
        for i in 0..self.nodes.len() {
            let node = self.nodes[i].name.clone();
            for k in 1..=per_node {
                let pod = format!("pod{k}");
                let p = self.add_pod(&node, &pod)?;
                progress(&format!(
                    "{node}: {pod} has {}",
                    p.ips
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(p: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn wait_for_socket(p: &Path, pid: Option<u32>, within: Duration) -> Result<()> {
    let end = Instant::now() + within;
    while !p.exists() {
        if let Some(pid) = pid
            && !alive(pid)
        {
            bail!("the agent (pid {pid}) exited");
        }
        if Instant::now() >= end {
            bail!(
                "{} did not appear within {} s",
                p.display(),
                within.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A namespace with `eth0` on fabric bridge `bridge`.
fn plug(
    fabric: &str,
    netns: &str,
    port: &str,
    bridge: &str,
    v4: &IpNet,
    v6: Option<&IpNet>,
) -> Result<()> {
    ip("namespace", &["netns", "add", netns])?;
    ip("loopback", &["-n", netns, "link", "set", "lo", "up"])?;
    ip(
        "veth",
        &[
            "-n", fabric, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
            netns,
        ],
    )?;
    ip(
        "bridge port",
        &["-n", fabric, "link", "set", port, "master", bridge, "up"],
    )?;
    ip(
        "address",
        &["-n", netns, "addr", "add", &v4.to_string(), "dev", "eth0"],
    )?;
    if let Some(v6) = v6 {
        ip(
            "address",
            &[
                "-n",
                netns,
                "addr",
                "add",
                &v6.to_string(),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
    }
    ip("uplink", &["-n", netns, "link", "set", "eth0", "up"])?;
    Ok(())
}

/// Whether this kernel can make an ipip device (tried in a scratch namespace).
fn ipip_available() -> bool {
    let ns = format!("starling-ipip-probe-{}", std::process::id());
    if ip("probe", &["netns", "add", &ns]).is_err() {
        return false;
    }
    let ok = ip(
        "probe",
        &[
            "-n",
            &ns,
            "link",
            "add",
            "t0",
            "type",
            "ipip",
            "remote",
            "192.0.2.1",
        ],
    )
    .is_ok();
    let _ = ip("probe", &["netns", "del", &ns]);
    ok
}

/// Remove a lab: its processes, namespaces and state, also what a crashed
/// `up` left behind (found by name prefix).
pub fn down(dir: &Path, name: &str, progress: &mut dyn FnMut(&str)) -> Result<()> {
    if let Ok(lab) = LabState::load(dir, name) {
        for n in &lab.nodes {
            if let Some(pid) = n.pid {
                kill(pid, libc::SIGKILL);
            }
        }
        if let Some(pid) = lab.tor.as_ref().and_then(|t| t.pid) {
            kill(pid, libc::SIGKILL);
        }
    }
    let prefix = format!("{name}-");
    let list = ip("listing namespaces", &["netns", "list"]).unwrap_or_default();
    let mut removed = 0;
    for line in list.lines() {
        let ns = line.split_whitespace().next().unwrap_or_default();
        if !ns.starts_with(&prefix) {
            continue;
        }
        // Whatever still runs in it (an agent of a crashed lab, BIRD).
        if let Ok(pids) = ip("listing processes", &["netns", "pids", ns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                kill(pid, libc::SIGKILL);
            }
        }
        ip(&format!("removing namespace {ns}"), &["netns", "del", ns])?;
        removed += 1;
    }
    // After every process is gone: a dying zebra may still write there.
    if let Ok(lab) = LabState::load(dir, name)
        && lab.tor.as_ref().is_some_and(|t| t.kind == Tor::Frr)
    {
        tor_frr::clean(&lab);
    }
    let sdir = state_dir(dir, name);
    if sdir.exists() {
        std::fs::remove_dir_all(&sdir).with_context(|| format!("removing {}", sdir.display()))?;
    }
    progress(&format!(
        "lab {name}: removed {removed} namespaces and {}",
        sdir.display()
    ));
    Ok(())
}

/// The ping matrix as text.
pub fn matrix(lab: &LabState, results: &[(String, String, IpAddr, bool)]) -> String {
    let names: Vec<&str> = lab.pods.iter().map(|p| p.name.as_str()).collect();
    let w = names.iter().map(|n| n.len()).max().unwrap_or(4).max(8);
    let mut out = format!("{:w$}", "from\\to");
    for n in &names {
        let _ = write!(out, " {n:>w$}");
    }
    out.push('\n');
    for a in &names {
        let _ = write!(out, "{a:w$}");
        for b in &names {
            let cell = if a == b {
                "-".to_string()
            } else {
                let rs: Vec<bool> = results
                    .iter()
                    .filter(|r| r.0 == *a && r.1 == *b)
                    .map(|r| r.3)
                    .collect();
                if rs.iter().all(|x| *x) {
                    "ok".into()
                } else {
                    "FAIL".into()
                }
            };
            let _ = write!(out, " {cell:>w$}");
        }
        out.push('\n');
    }
    out
}
