//! The agent's configuration file (`starling-agent run --config FILE`) and
//! what follows from it alone: the pod MTU and the route protocol.

use super::control::DEFAULT_CONTROL_SOCKET;
use crate::encap::Encapsulation;
use crate::fib::RouteProtocol;
use crate::health::EndpointConfig;
use crate::ipam::IpamConfig;
use crate::model::plan;
use crate::mtu::MtuRule;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Where the cluster model comes from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum DatastoreConfig {
    /// A YAML stream of IPPool, BGPConfiguration, BGPPeer and StarlingNode
    /// objects, reloaded when it changes.
    File {
        path: PathBuf,
        #[serde(default, rename = "pollMs")]
        poll_ms: Option<u64>,
    },
    /// The CRDs and Nodes of a Kubernetes cluster; block claims are
    /// BlockAffinity objects.
    Kubernetes {
        /// A kubeconfig; without one, the in-cluster ServiceAccount.
        #[serde(default)]
        kubeconfig: Option<PathBuf>,
    },
}

/// `starling-agent run --config FILE`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name in the model; `$NODE_NAME` when absent.
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
    pub state_dir: PathBuf,
    /// The CNI plugin's socket.
    #[serde(default = "default_socket")]
    pub socket_path: PathBuf,
    /// `starlingctl`'s socket.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// The cluster model. Without one the agent serves IPAM only (no BGP, no
    /// FIB), from the `ipam` section.
    #[serde(default)]
    pub datastore: Option<DatastoreConfig>,
    /// Pod MTU, as it is. When absent: the `uplink`'s MTU, or without one
    /// the smallest MTU of the up interfaces carrying the node's addresses
    /// (Calico's rule), less the encapsulation's overhead.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The device towards other nodes; default: that of the IPv4 default
    /// route. When set, the pod MTU follows this device's MTU.
    #[serde(default)]
    pub uplink: Option<String>,
    /// Overrides the encapsulation the pools imply, for the MTU.
    #[serde(default)]
    pub encapsulation: Option<Encapsulation>,
    #[serde(default)]
    pub route_protocol: Option<u8>,
    /// Kernel table for routes to other nodes and pods (default: main).
    #[serde(default)]
    pub route_table: Option<u32>,
    /// Largest ECMP set per prefix.
    #[serde(default = "default_max_paths")]
    pub max_paths: usize,
    /// How long a session the new plan drops is kept while its routes are
    /// not yet learned another way (make-before-break), in seconds.
    #[serde(default = "default_drain")]
    pub drain_seconds: u64,
    /// A node-to-node mesh of more nodes than this is reported (log and
    /// `starlingctl status`) with the advice to use route reflectors: each
    /// node holds a session to every other. 0 turns the advice off.
    #[serde(default = "default_mesh_warn_nodes")]
    pub mesh_warn_nodes: usize,
    #[serde(default)]
    pub ipam: IpamConfig,
    /// How to find this node's IPv4 address when the model gives none:
    /// `first-found`, `interface=REGEX`, `skip-interface=REGEX`,
    /// `can-reach=ADDR`, `cidr=CIDR[,CIDR]` (Calico's methods).
    #[serde(default)]
    pub autodetect: Option<String>,
    /// Health probes and Prometheus metrics. With a datastore they are
    /// served at 127.0.0.1:9099 (probes) and 0.0.0.0:9091 (metrics) unless
    /// set; an IPAM-only agent serves them only when set.
    #[serde(default)]
    pub endpoints: Option<EndpointConfig>,
    /// BGP on (the default): the other nodes' blocks are learned over BGP
    /// and this node's announced. Off (Calico's `calico_backend: vxlan`):
    /// no BGP port, no sessions; the other nodes' blocks come from the
    /// datastore (block claims and `podCIDRs`), each via its node's address
    /// in the model, plain or encapsulated as its pool says.
    #[serde(default = "default_bgp_enabled")]
    pub bgp_enabled: bool,
}

fn default_bgp_enabled() -> bool {
    true
}

fn default_socket() -> PathBuf {
    PathBuf::from(starling_cni_proto::DEFAULT_SOCKET)
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

fn default_max_paths() -> usize {
    8
}

fn default_drain() -> u64 {
    30
}

fn default_mesh_warn_nodes() -> usize {
    plan::DEFAULT_MESH_WARN_NODES
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: AgentConfig =
            serde_yaml::from_str(&text).with_context(|| format!("config {}", path.display()))?;
        if cfg.node_name.is_empty() {
            cfg.node_name = std::env::var("NODE_NAME").unwrap_or_default();
        }
        if cfg.node_name.is_empty() {
            bail!(
                "config {}: nodeName is missing and $NODE_NAME is not set",
                path.display()
            );
        }
        if cfg.max_paths == 0 {
            bail!("config {}: maxPaths must be at least 1", path.display());
        }
        Ok(cfg)
    }

    /// The `rtm_protocol` of the node's routes, pod host routes included:
    /// the FIB reconciler's own unless configured.
    pub fn route_protocol(&self) -> RouteProtocol {
        self.route_protocol
            .map_or(RouteProtocol::STARLING, RouteProtocol)
    }

    /// How the pod MTU is found: `mtu` as it is; else `uplink`'s MTU less
    /// `overhead` (the encapsulation's: configured, or what the pools
    /// need); else Calico's rule over the node's `addresses`
    /// ([`crate::mtu`]).
    pub fn mtu_rule(&self, overhead: u32, addresses: Vec<IpAddr>) -> Result<MtuRule> {
        if let Some(mtu) = self.mtu {
            if !(576..=65535).contains(&mtu) {
                bail!("mtu {mtu} is outside 576..=65535");
            }
            return Ok(MtuRule::Fixed(mtu));
        }
        Ok(match &self.uplink {
            Some(device) => MtuRule::Uplink {
                device: device.clone(),
                overhead,
            },
            None => MtuRule::Detect {
                addresses,
                overhead,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DaemonSet's ConfigMap is a config this agent accepts.
    #[test]
    fn daemonset_config_loads() {
        let manifests = include_str!("../../../manifests/daemonset.yaml");
        let cm = serde_yaml::Deserializer::from_str(manifests)
            .filter_map(|d| serde_yaml::Value::deserialize(d).ok())
            .find(|v| v["kind"] == "ConfigMap")
            .expect("a ConfigMap in manifests/daemonset.yaml");
        let text = cm["data"]["agent.yaml"].as_str().expect("data.agent.yaml");
        let cfg: AgentConfig = serde_yaml::from_str(text).expect("agent.yaml is a valid config");
        assert_eq!(
            cfg.datastore,
            Some(DatastoreConfig::Kubernetes { kubeconfig: None })
        );
        assert!(cfg.endpoints.is_some());
    }
}
