//! The cluster model's kinds, API group `starling.dev`, version `v1`. These
//! types are the source of truth: the CRDs in `manifests/crds.yaml` are
//! generated from them (`starlingctl crds`), and the file datastore parses
//! the same types. Field names are Calico's wherever the concept is the same,
//! so `projectcalico.org/v3` YAML carries over.
//!
//! Every CEL rule here has a twin in [`super::validate`], which the file
//! loader runs; keep the two in step.

use crate::encap::{EncapMode, Encapsulation};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub const GROUP: &str = "starling.dev";
pub const VERSION: &str = "v1";
/// Calico's API version, accepted for the kinds it shares with us.
pub const CALICO_API_VERSION: &str = "projectcalico.org/v3";
/// The default private AS of a Calico cluster.
pub const DEFAULT_AS_NUMBER: u32 = 64512;

/// A pool that nodes claim address blocks from.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "starling.dev",
    version = "v1",
    kind = "IPPool",
    plural = "ippools",
    derive = "PartialEq",
    doc = "A pool of pod addresses; nodes claim blocks of blockSize from it."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("!isCIDR(self.cidr) || cidr(self.cidr) == cidr(self.cidr).masked()")
        .message("cidr has host bits set: write the network address, e.g. 10.244.0.0/16"),
    validation = Rule::new("!has(self.blockSize) || !isCIDR(self.cidr) || (cidr(self.cidr).ip().family() == 4 ? (self.blockSize >= 20 && self.blockSize <= 32) : (self.blockSize >= 116 && self.blockSize <= 128))")
        .message("blockSize must be 20-32 for an IPv4 pool and 116-128 for an IPv6 pool"),
    validation = Rule::new("!has(self.blockSize) || !isCIDR(self.cidr) || self.blockSize >= cidr(self.cidr).prefixLength()")
        .message("blockSize must not be shorter than the pool's own prefix length"),
    validation = Rule::new("!isCIDR(self.cidr) || cidr(self.cidr).ip().family() == 4 || self.ipipMode == 'Never'")
        .message("ipipMode applies to IPv4 pools only: use Never for an IPv6 pool"),
    validation = Rule::new("self.ipipMode == 'Never' || self.vxlanMode == 'Never'")
        .message("ipipMode and vxlanMode cannot both be enabled: set one of them to Never"),
)]
pub struct IPPoolSpec {
    /// The pool's prefix, e.g. 10.244.0.0/16.
    #[schemars(with = "String", length(max = 43))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a prefix such as 10.244.0.0/16 or fd00:10:244::/56"))]
    pub cidr: IpNet,
    /// Prefix length of the blocks nodes claim; 26 for IPv4, 122 for IPv6
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 20, max = 128))]
    pub block_size: Option<u8>,
    /// IP-in-IP encapsulation of pod traffic between nodes.
    #[serde(default)]
    pub ipip_mode: IpipMode,
    /// VXLAN encapsulation of pod traffic between nodes (IPv4 and IPv6
    /// pools; not together with ipipMode).
    #[serde(default)]
    pub vxlan_mode: VxlanMode,
    /// Masquerade traffic from pods to destinations outside every pool.
    #[serde(default)]
    pub nat_outgoing: bool,
    /// A disabled pool hands out no new blocks; existing ones stay.
    #[serde(default)]
    pub disabled: bool,
    /// Which nodes may claim blocks: `all()`, or `key == 'value'`,
    /// `key != 'value'`, `has(key)` joined with `&&`. Empty: all nodes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    pub node_selector: String,
}

impl IPPoolSpec {
    pub fn block_size(&self) -> u8 {
        self.block_size
            .unwrap_or(if self.cidr.addr().is_ipv4() { 26 } else { 122 })
    }

    /// How traffic to this pool's blocks on other nodes travels: the one
    /// place `ipipMode` and `vxlanMode` become an [`Encapsulation`]. A pool
    /// with both enabled is refused by the checks (`validate::ip_pool`);
    /// should one get here, VXLAN wins, as it is the mode that needs no
    /// kernel module.
    pub fn encapsulation(&self) -> Encapsulation {
        match (self.vxlan_mode, self.ipip_mode) {
            (VxlanMode::Always, _) => Encapsulation::Vxlan(EncapMode::Always),
            (VxlanMode::CrossSubnet, _) => Encapsulation::Vxlan(EncapMode::CrossSubnet),
            (VxlanMode::Never, IpipMode::Always) => Encapsulation::Ipip(EncapMode::Always),
            (VxlanMode::Never, IpipMode::CrossSubnet) => {
                Encapsulation::Ipip(EncapMode::CrossSubnet)
            }
            (VxlanMode::Never, IpipMode::Never) => Encapsulation::None,
        }
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpipMode {
    /// Encapsulate all traffic to other nodes.
    Always,
    /// Encapsulate only traffic to nodes outside this node's subnet (the
    /// prefix length of `ipv4Address`).
    CrossSubnet,
    #[default]
    Never,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VxlanMode {
    /// Encapsulate all traffic to other nodes in VXLAN (UDP 4789, VNI 4096).
    Always,
    /// Encapsulate in VXLAN only traffic to nodes outside this node's
    /// uplink subnet.
    CrossSubnet,
    #[default]
    Never,
}

/// Cluster-wide BGP settings; the one object is named `default`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "starling.dev",
    version = "v1",
    kind = "BGPConfiguration",
    plural = "bgpconfigurations",
    derive = "PartialEq",
    doc = "Cluster-wide BGP settings. A singleton: its name must be `default`.",
    validation = Rule::new("self.metadata.name == 'default'")
        .message("BGPConfiguration is a singleton: name it `default`")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPConfigurationSpec {
    /// Every node peers with every other node (iBGP full mesh). Turn it off
    /// to use route reflectors (nodes with a routeReflectorClusterID).
    #[serde(default = "default_true")]
    pub node_to_node_mesh_enabled: bool,
    /// The AS of nodes that do not set their own.
    #[serde(default = "default_as_number")]
    #[schemars(range(min = 1))]
    pub as_number: u32,
    /// The port BGP listens on.
    #[serde(default = "default_listen_port")]
    #[schemars(range(min = 1))]
    pub listen_port: u16,
    /// Service cluster IP ranges to advertise: each from every node, and
    /// the cluster IPs of `externalTrafficPolicy: Local` Services inside
    /// them from the nodes with a ready endpoint.
    #[serde(
        default,
        rename = "serviceClusterIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 16))]
    pub service_cluster_ips: Vec<ServiceClusterIPBlock>,
    /// Service external IP ranges to advertise (`spec.externalIPs`).
    #[serde(
        default,
        rename = "serviceExternalIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 16))]
    pub service_external_ips: Vec<ServiceClusterIPBlock>,
    /// Service load-balancer IP ranges to advertise
    /// (`status.loadBalancer.ingress[].ip`).
    #[serde(
        default,
        rename = "serviceLoadBalancerIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 16))]
    pub service_load_balancer_ips: Vec<ServiceClusterIPBlock>,
    /// Named BGP communities (standard `aa:nn` or large `aa:nn:mm`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub communities: Vec<Community>,
    /// Communities added to the routes this node sends that are the cidr
    /// or inside it: names from `communities` or literal values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 500))]
    pub prefix_advertisements: Vec<PrefixAdvertisement>,
    /// NodeIP: listen for BGP on the node's addresses only; None (default):
    /// on every address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_mode: Option<BindMode>,
    /// Disabled: advertise each load-balancer IP (/32, /128) from every
    /// node instead of the serviceLoadBalancerIPs CIDRs; Enabled (default):
    /// the CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_load_balancer_aggregation: Option<Aggregation>,
    /// TCP-MD5 password of the node-to-node sessions (mesh and reflectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_password: Option<Password>,
    /// Graceful restart: how long a node keeps another node's routes while
    /// that node restarts.
    #[serde(default = "default_restart_time")]
    pub node_mesh_max_restart_time: GoDuration,
    /// Accepted so Calico YAML loads; the agent's log level is set by its
    /// own configuration, not here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub log_severity_screen: Option<String>,
}

impl Default for BGPConfigurationSpec {
    fn default() -> Self {
        BGPConfigurationSpec {
            node_to_node_mesh_enabled: true,
            as_number: DEFAULT_AS_NUMBER,
            listen_port: 179,
            service_cluster_ips: Vec::new(),
            service_external_ips: Vec::new(),
            service_load_balancer_ips: Vec::new(),
            communities: Vec::new(),
            prefix_advertisements: Vec::new(),
            bind_mode: None,
            service_load_balancer_aggregation: None,
            node_mesh_password: None,
            node_mesh_max_restart_time: default_restart_time(),
            log_severity_screen: None,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_as_number() -> u32 {
    DEFAULT_AS_NUMBER
}
fn default_listen_port() -> u16 {
    179
}
fn default_restart_time() -> GoDuration {
    GoDuration(Duration::from_secs(120))
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceClusterIPBlock {
    #[schemars(with = "String", length(max = 43))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a prefix such as 10.96.0.0/12"))]
    pub cidr: IpNet,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Community {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `aa:nn` (standard) or `aa:nn:mm` (large).
    #[schemars(length(max = 32), regex(pattern = r"^[0-9]+:[0-9]+(:[0-9]+)?$"))]
    pub value: String,
}

/// Communities for the routes inside `cidr`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrefixAdvertisement {
    #[schemars(with = "String", length(max = 43))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a prefix such as 10.244.0.0/16"))]
    pub cidr: IpNet,
    /// Names from `communities`, or values `aa:nn` / `aa:nn:mm`.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub communities: Vec<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindMode {
    None,
    #[serde(rename = "NodeIP")]
    NodeIp,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregation {
    Enabled,
    Disabled,
}

/// Where a TCP-MD5 password comes from: a Kubernetes Secret (resolved by the
/// Kubernetes datastore) or a file on the node (its first line).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.secretKeyRef) != has(self.file)")
    .message("password: set exactly one of secretKeyRef and file"))]
pub struct Password {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
    /// An absolute path on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", length(max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("password file must be an absolute path"))]
    pub file: Option<PathBuf>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret, in the agent's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A BGP session to a router outside the cluster (peerIP), or to the nodes
/// a selector picks (peerSelector), from every node, one node, or the
/// nodes nodeSelector picks.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "starling.dev",
    version = "v1",
    kind = "BGPPeer",
    plural = "bgppeers",
    derive = "PartialEq",
    doc = "A BGP peer of every node, of one node (node) or of the nodes nodeSelector picks."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("has(self.peerIP) != has(self.peerSelector)")
        .message("set exactly one of peerIP (a router outside the cluster) and peerSelector (the nodes to peer with)"),
    validation = Rule::new("!(has(self.node) && has(self.nodeSelector))")
        .message("set at most one of node and nodeSelector (neither: every node has this peer)"),
    validation = Rule::new("!has(self.peerIP) || has(self.asNumber)")
        .message("asNumber is required with peerIP"),
    validation = Rule::new("!has(self.peerSelector) || !has(self.asNumber)")
        .message("with peerSelector the AS comes from each selected node: remove asNumber"),
    validation = Rule::new("!(has(self.keepOriginalNextHop) && self.keepOriginalNextHop && has(self.nextHopMode))")
        .message("keepOriginalNextHop is the old spelling of nextHopMode: Keep; set only one"),
)]
pub struct BGPPeerSpec {
    /// The one node that has this peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node: Option<String>,
    /// The nodes that have this peer (selector syntax as IPPool's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub node_selector: Option<String>,
    /// `ip` or `ip:port` (`[ip6]:port`).
    #[serde(default, rename = "peerIP", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", length(max = 47))]
    #[x_kube(validation = Rule::new("isIP(self) || (self.lastIndexOf(':') > 0 && isIP(self.substring(0, self.lastIndexOf(':')).replace('[', '').replace(']', '')) && self.substring(self.lastIndexOf(':') + 1).matches('^[0-9]{1,5}$'))")
        .message("peerIP must be an address, address:port or [IPv6 address]:port"))]
    pub peer_ip: Option<PeerAddress>,
    /// Peer with the nodes this selects, at their node addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub peer_selector: Option<String>,
    /// The peer's AS (required with peerIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub as_number: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Password>,
    /// UseNodeIP: connect from the node's address; None: let the kernel pick.
    #[serde(default)]
    pub source_address: SourceAddress,
    /// Graceful restart: how long this peer's routes are kept while it
    /// restarts (caps what it advertises).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restart_time: Option<GoDuration>,
    /// Keepalive interval; the hold time is three times it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<GoDuration>,
    /// GTSM (RFC 5082): the peer is at most this many hops away; 0: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_security: Option<u8>,
    /// Deprecated spelling of nextHopMode: Keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_original_next_hop: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_mode: Option<NextHopMode>,
    /// Accept routes from this peer whose AS path holds this node's AS up
    /// to this many times (BIRD's `allow local as`).
    #[serde(
        default,
        rename = "numAllowedLocalASNumbers",
        skip_serializing_if = "Option::is_none"
    )]
    pub num_allowed_local_as_numbers: Option<u8>,
    /// The most prefixes this peer may send. Peers at `peerIP` (routers
    /// outside the cluster) get 10000 with Close unless set here; peers
    /// between nodes have no limit unless set here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prefixes: Option<MaxPrefixes>,
    /// Names of Calico BGPFilters applied to this peer's routes, in order:
    /// the first rule that matches, in the first filter that has one,
    /// decides; a route no rule matches gets the peer's default policy.
    /// The filters are read from the file datastore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub filters: Vec<String>,
}

/// Default for peers at `peerIP` (routers outside the cluster).
pub const DEFAULT_EXTERNAL_MAX_PREFIXES: MaxPrefixes = MaxPrefixes {
    limit: 10_000,
    action: MaxPrefixAction::Close,
};

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaxPrefixes {
    #[schemars(range(min = 1))]
    pub limit: u32,
    #[serde(default)]
    pub action: MaxPrefixAction,
}

/// What happens when a peer sends more than `limit` prefixes.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MaxPrefixAction {
    /// Log a warning once and keep the session (and its routes).
    Warn,
    /// Close the session with a Cease NOTIFICATION, Maximum Number of
    /// Prefixes Reached (RFC 4486), withdrawing its routes; it is retried
    /// after 30 s.
    #[default]
    Close,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceAddress {
    #[default]
    UseNodeIP,
    None,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHopMode {
    /// Self towards eBGP peers, unchanged towards iBGP peers.
    Auto,
    /// Always this node.
    #[serde(rename = "Self")]
    SelfAddress,
    /// Never changed.
    Keep,
}

/// A node's BGP identity. The file datastore reads it from StarlingNode
/// documents; the Kubernetes datastore will also derive it from Node
/// annotations and `spec.podCIDRs`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "starling.dev",
    version = "v1",
    kind = "StarlingNode",
    plural = "starlingnodes",
    derive = "PartialEq",
    doc = "A node's BGP addresses, AS and route reflector role."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.ipv4Address) || has(self.ipv6Address)")
    .message("a node needs ipv4Address or ipv6Address (or both)"))]
pub struct StarlingNodeSpec {
    /// The node's IPv4 address with its subnet's prefix length, e.g.
    /// 192.0.2.10/24; the prefix drives ipipMode CrossSubnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", length(max = 18))]
    #[x_kube(validation = Rule::new("isCIDR(self) && cidr(self).ip().family() == 4")
        .message("ipv4Address must be an IPv4 address with prefix length, e.g. 192.0.2.10/24"))]
    pub ipv4_address: Option<Ipv4Net>,
    /// The node's IPv6 address with its subnet's prefix length, e.g.
    /// 2001:db8::10/64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", length(max = 43))]
    #[x_kube(validation = Rule::new("isCIDR(self) && cidr(self).ip().family() == 6")
        .message("ipv6Address must be an IPv6 address with prefix length, e.g. 2001:db8::10/64"))]
    pub ipv6_address: Option<Ipv6Net>,
    /// This node's AS; default: BGPConfiguration's asNumber.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub as_number: Option<u32>,
    /// Makes the node a route reflector with this cluster ID (an IPv4
    /// address, e.g. 224.0.0.1, shared by redundant reflectors).
    #[serde(
        default,
        rename = "routeReflectorClusterID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", length(max = 15))]
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4")
        .message("routeReflectorClusterID must be an IPv4 address such as 224.0.0.1"))]
    pub route_reflector_cluster_id: Option<Ipv4Addr>,
    /// Blocks the node holds statically (Kubernetes `spec.podCIDRs`).
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>", length(max = 2), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) && cidr(c) == cidr(c).masked())").message("podCIDRs must be prefixes without host bits, such as 10.244.1.0/24"))]
    pub pod_cidrs: Vec<IpNet>,
}

/// A node's claim on an address block (Calico's BlockAffinity).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "starling.dev",
    version = "v1",
    kind = "BlockAffinity",
    plural = "blockaffinities",
    derive = "PartialEq",
    doc = "A node's claim on an address block."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!isCIDR(self.cidr) || cidr(self.cidr) == cidr(self.cidr).masked()")
    .message("cidr has host bits set: write the block's network address"))]
pub struct BlockAffinitySpec {
    #[schemars(with = "String", length(max = 43))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a prefix such as 10.244.3.0/26"))]
    pub cidr: IpNet,
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
    #[serde(default)]
    pub state: AffinityState,
}

/// The shared allocation record of one block that another node borrows
/// from (docs/cni.md, Borrowing). Internal to IPAM: agents create and
/// update it, operators only read it. Every write is a replace carrying the
/// resourceVersion read, so each address handed out from the block is one
/// successful compare-and-swap on this object.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "starling.dev",
    version = "v1",
    kind = "IPAMBlock",
    plural = "ipamblocks",
    derive = "PartialEq",
    doc = "Who holds which address of a block another node borrows from (written by agents)."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!isCIDR(self.cidr) || cidr(self.cidr) == cidr(self.cidr).masked()")
    .message("cidr has host bits set: write the block's network address"))]
pub struct IPAMBlockSpec {
    #[schemars(with = "String", length(max = 43))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a prefix such as 10.244.3.0/26"))]
    pub cidr: IpNet,
    /// The node holding the block (its BlockAffinity).
    #[schemars(length(min = 1, max = 253))]
    pub owner: String,
    #[serde(default)]
    pub state: IPAMBlockState,
    /// Every address of the block handed out while this record exists,
    /// and to whom.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub allocations: Vec<BlockAllocation>,
}

/// Whether the owner allocates through the record yet.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum IPAMBlockState {
    /// A borrower asked; the owner has not marked its own allocations yet,
    /// so nobody may borrow.
    #[default]
    Requested,
    /// The owner's allocations are marked and every further hand-out of
    /// the block, the owner's included, is a write of this record.
    Open,
}

/// One address of an [`IPAMBlockSpec`] and who holds it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlockAllocation {
    #[schemars(with = "String", length(max = 39))]
    pub ip: IpAddr,
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
    /// The attachment (`network/containerID/ifname`).
    #[schemars(length(max = 600))]
    pub attachment: String,
}

/// Addresses IPAM never hands out (Calico's IPReservation).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "starling.dev",
    version = "v1",
    kind = "IPReservation",
    plural = "ipreservations",
    derive = "PartialEq",
    doc = "Addresses IPAM never hands out, not even as static addresses."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IPReservationSpec {
    /// Prefixes or single addresses (`10.244.0.5`, `10.244.1.0/28`).
    #[serde(rename = "reservedCIDRs", deserialize_with = "cidrs_or_addresses")]
    #[schemars(with = "Vec<String>", length(max = 64), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) || isIP(c))").message("reservedCIDRs holds prefixes or addresses such as 10.244.1.0/28 or 10.244.0.5"))]
    pub reserved_cidrs: Vec<IpNet>,
}

/// Prefixes, or single addresses taken as host prefixes (as Calico reads
/// reservedCIDRs); host bits are dropped.
fn cidrs_or_addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "reservedCIDRs: `{s}` is neither a prefix nor an address"
                    ))
                })
        })
        .collect()
}

/// Route filters that BGPPeers name in `filters` (Calico's BGPFilter, the
/// same fields): each list is tried in order, the first rule that matches
/// decides; a route no rule matches goes on to the peer's own policy.
#[derive(
    CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq,
)]
#[kube(
    group = "starling.dev",
    version = "v1",
    kind = "BGPFilter",
    plural = "bgpfilters",
    derive = "PartialEq",
    doc = "Import and export rules for the BGP peers that name this filter in spec.filters."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPFilterSpec {
    /// Rules for IPv4 routes sent to the peer.
    #[serde(default, rename = "exportV4", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub export_v4: Vec<FilterRule>,
    /// Rules for IPv4 routes received from the peer.
    #[serde(default, rename = "importV4", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub import_v4: Vec<FilterRule>,
    /// Rules for IPv6 routes sent to the peer.
    #[serde(default, rename = "exportV6", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub export_v6: Vec<FilterRule>,
    /// Rules for IPv6 routes received from the peer.
    #[serde(default, rename = "importV6", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub import_v6: Vec<FilterRule>,
}

/// One rule of a BGPFilter: what it matches and what it does.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterRule {
    /// The prefix a route is compared with (with matchOperator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", length(max = 43))]
    pub cidr: Option<IpNet>,
    /// With In or NotIn: the lengths of the routes inside cidr that match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_length: Option<PrefixLength>,
    /// RemotePeers: only routes learned from BGP peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<FilterSource>,
    /// Calico matches the route's interface; Starling leaves such a rule
    /// out with a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub interface: Option<String>,
    /// How the route's prefix compares with cidr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_operator: Option<MatchOperator>,
    pub action: FilterAction,
}

#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrefixLength {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 128))]
    pub min: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 128))]
    pub max: Option<u8>,
}

#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterSource {
    RemotePeers,
}

#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchOperator {
    Equal,
    NotEqual,
    In,
    NotIn,
}

#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterAction {
    Accept,
    Reject,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AffinityState {
    /// Being claimed: the block is not used yet.
    Pending,
    #[default]
    Confirmed,
    /// Being released: no new addresses come from it.
    PendingDeletion,
}

/// A Go duration as Kubernetes writes it (`120s`, `1m30s`, `500ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    /// Whole seconds, saturating at what a 16-bit BGP timer holds.
    pub fn secs_u16(&self) -> u16 {
        u16::try_from(self.0.as_secs()).unwrap_or(u16::MAX)
    }
}

impl FromStr for GoDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a duration: write e.g. 120s, 2m or 1m30s");
        if s == "0" {
            return Ok(GoDuration(Duration::ZERO));
        }
        let mut rest = s;
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .ok_or_else(bad)?;
            let (num, tail) = rest.split_at(digits);
            let n: f64 = num.parse().map_err(|_| bad())?;
            let unit_len = tail
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let scale = match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 0.001,
                _ => return Err(bad()),
            };
            total += Duration::try_from_secs_f64(n * scale).map_err(|_| bad())?;
            rest = tail;
        }
        if s.is_empty() {
            return Err(bad());
        }
        Ok(GoDuration(total))
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.subsec_millis() == 0 {
            write!(f, "{}s", self.0.as_secs())
        } else {
            write!(f, "{}ms", self.0.as_millis())
        }
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for GoDuration {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 32,
            "pattern": r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$",
            "description": "A duration such as 120s, 2m or 1m30s."
        })
    }
}

/// A peer's address with an optional port: `ip`, `ip:port`, `[ip6]:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerAddress {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl FromStr for PeerAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(PeerAddress { ip, port: None });
        }
        match s.parse::<SocketAddr>() {
            Ok(sa) => Ok(PeerAddress {
                ip: sa.ip(),
                port: Some(sa.port()),
            }),
            Err(_) => Err(format!(
                "`{s}` is not a peer address: write 192.0.2.1, 192.0.2.1:179 or [2001:db8::1]:179"
            )),
        }
    }
}

impl fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            None => write!(f, "{}", self.ip),
            Some(p) => write!(f, "{}", SocketAddr::new(self.ip, p)),
        }
    }
}

impl Serialize for PeerAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PeerAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Every CRD of the model, in a stable order.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![
        IPPool::crd(),
        BGPConfiguration::crd(),
        BGPPeer::crd(),
        StarlingNode::crd(),
        BlockAffinity::crd(),
        IPAMBlock::crd(),
        IPReservation::crd(),
        BGPFilter::crd(),
    ]
}

/// The CRDs as one YAML stream, as `manifests/crds.yaml` holds them.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::from(
        "# Generated by `starlingctl crds` from agent/src/model/crd.rs; do not edit.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! The CRDs' CEL rules, evaluated client-side (kube's `cel` feature),
    //! against the Rust checks the file loader runs: they must agree.
    use super::*;
    use crate::model::validate;
    use kube::core::cel::{
        CompiledSchema, ScopeContext, Validator, WarningKind, analyze_rule, compile_schema,
    };
    use serde_json::{Value, json};

    fn cel<K: CustomResourceExt>(object: Value) -> Result<(), String> {
        Validator::new()
            .validate(&schema::<K>(), &object, None)
            .map_err(|e| format!("{e:?}"))
    }

    fn schema<K: CustomResourceExt>() -> Value {
        let crd = K::crd();
        serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .unwrap(),
        )
        .unwrap()
    }

    /// Every rule compiles, uses only what a CRD rule may, and stays within
    /// the API server's cost budget (which needs bounded strings and lists).
    fn check_rules(kind: &str, node: &CompiledSchema, count: &mut usize) {
        for v in &node.validations {
            let compiled = v.as_ref().unwrap_or_else(|e| panic!("{kind}: {e:?}"));
            let rule = &compiled.rule.rule;
            let mut warnings = analyze_rule(rule, node, ScopeContext::CrdValidation);
            // The analysis takes a macro's bound variable (`all(c, ...)`)
            // for an unknown one.
            warnings.retain(|w| {
                w.kind != WarningKind::WrongScope
                    || !w
                        .message
                        .split('\'')
                        .nth(1)
                        .is_some_and(|var| rule.contains(&format!("({var},")))
            });
            assert!(warnings.is_empty(), "{kind}: {warnings:?}");
            *count += 1;
        }
        for child in node.properties.values().chain(node.items.as_deref()) {
            check_rules(kind, child, count);
        }
    }

    #[test]
    fn rules_compile_within_budget() {
        let mut count = 0;
        for (kind, s) in [
            ("IPPool", schema::<IPPool>()),
            ("BGPConfiguration", schema::<BGPConfiguration>()),
            ("BGPPeer", schema::<BGPPeer>()),
            ("StarlingNode", schema::<StarlingNode>()),
            ("BlockAffinity", schema::<BlockAffinity>()),
            ("IPAMBlock", schema::<IPAMBlock>()),
        ] {
            check_rules(kind, &compile_schema(&s), &mut count);
        }
        assert!(count >= 20, "only {count} rules found");
    }

    fn object(kind: &str, name: &str, spec: Value) -> Value {
        json!({"apiVersion": "starling.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec})
    }

    #[test]
    fn pools_agree() {
        let cases = [
            json!({"cidr": "10.244.0.0/16"}),
            json!({"cidr": "10.244.0.0/16", "blockSize": 26}),
            json!({"cidr": "10.244.0.0/16", "blockSize": 19}),
            json!({"cidr": "10.244.0.0/16", "blockSize": 33}),
            json!({"cidr": "10.244.0.0/24", "blockSize": 22}),
            json!({"cidr": "10.244.1.0/16"}),
            json!({"cidr": "fd00:10:244::/56", "blockSize": 122}),
            json!({"cidr": "fd00:10:244::/56", "blockSize": 64}),
            json!({"cidr": "fd00:10:244::/56", "ipipMode": "Always"}),
            json!({"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet", "natOutgoing": true}),
        ];
        for spec in cases {
            let rust: IPPoolSpec = serde_json::from_value(spec.clone()).unwrap();
            let rust = validate::ip_pool(&rust);
            let cel = cel::<IPPool>(object("IPPool", "p", spec.clone()));
            assert_eq!(
                rust.is_empty(),
                cel.is_ok(),
                "{spec}: rust {rust:?}, cel {cel:?}"
            );
        }
        assert!(cel::<IPPool>(object("IPPool", "p", json!({"cidr": "10.244.0.0"}))).is_err());
    }

    #[test]
    fn bgp_configuration_agrees() {
        for name in ["default", "main"] {
            let rust = validate::bgp_configuration(name, &BGPConfigurationSpec::default());
            let cel = cel::<BGPConfiguration>(object("BGPConfiguration", name, json!({})));
            assert_eq!(rust.is_empty(), cel.is_ok(), "{name}: {cel:?}");
        }
        let both =
            json!({"nodeMeshPassword": {"file": "/k", "secretKeyRef": {"name": "s", "key": "k"}}});
        assert!(cel::<BGPConfiguration>(object("BGPConfiguration", "default", both)).is_err());
        let relative = json!({"nodeMeshPassword": {"file": "k"}});
        assert!(cel::<BGPConfiguration>(object("BGPConfiguration", "default", relative)).is_err());
    }

    #[test]
    fn peers_agree() {
        let cases = [
            json!({"peerIP": "192.0.2.1", "asNumber": 65000}),
            json!({"peerIP": "192.0.2.1:1179", "asNumber": 65000, "node": "a"}),
            json!({"peerIP": "[2001:db8::1]:1179", "asNumber": 65000}),
            json!({"peerIP": "2001:db8::1", "asNumber": 65000, "nodeSelector": "all()"}),
            json!({"peerIP": "192.0.2.1"}),
            json!({"peerSelector": "rr == 'true'"}),
            json!({"peerSelector": "rr == 'true'", "asNumber": 65000}),
            json!({"peerIP": "192.0.2.1", "peerSelector": "all()", "asNumber": 65000}),
            json!({"asNumber": 65000}),
            json!({"peerIP": "192.0.2.1", "asNumber": 65000, "node": "a", "nodeSelector": "all()"}),
            json!({"peerIP": "192.0.2.1", "asNumber": 65000, "keepOriginalNextHop": true, "nextHopMode": "Keep"}),
            json!({"peerIP": "192.0.2.1", "asNumber": 65000, "keepOriginalNextHop": false, "nextHopMode": "Self"}),
            json!({"peerIP": "192.0.2.1", "asNumber": 65000, "password": {"file": "/etc/k"}}),
            json!({"peerIP": "192.0.2.1", "asNumber": 65000, "password": {}}),
        ];
        for spec in cases {
            let rust: BGPPeerSpec = serde_json::from_value(spec.clone()).unwrap();
            let rust = validate::bgp_peer(&rust);
            let cel = cel::<BGPPeer>(object("BGPPeer", "p", spec.clone()));
            assert_eq!(
                rust.is_empty(),
                cel.is_ok(),
                "{spec}: rust {rust:?}, cel {cel:?}"
            );
        }
        for bad in ["router", "192.0.2.1:", "192.0.2.1:port", "[2001:db8::1]"] {
            let spec = json!({"peerIP": bad, "asNumber": 65000});
            assert!(bad.parse::<PeerAddress>().is_err(), "{bad}");
            assert!(
                cel::<BGPPeer>(object("BGPPeer", "p", spec)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn nodes_and_affinities_agree() {
        let cases = [
            json!({"ipv4Address": "192.0.2.10/24"}),
            json!({"ipv6Address": "2001:db8::10/64", "routeReflectorClusterID": "224.0.0.1"}),
            json!({"ipv4Address": "192.0.2.10/24", "podCIDRs": ["10.244.1.0/24"]}),
            json!({"ipv4Address": "192.0.2.10/24", "podCIDRs": ["10.244.1.1/24"]}),
            json!({"asNumber": 65000}),
        ];
        for spec in cases {
            let rust: StarlingNodeSpec = serde_json::from_value(spec.clone()).unwrap();
            let rust = validate::starling_node(&rust);
            let cel = cel::<StarlingNode>(object("StarlingNode", "n", spec.clone()));
            assert_eq!(
                rust.is_empty(),
                cel.is_ok(),
                "{spec}: rust {rust:?}, cel {cel:?}"
            );
        }
        assert!(
            cel::<StarlingNode>(object(
                "StarlingNode",
                "n",
                json!({"ipv4Address": "2001:db8::1/64"})
            ))
            .is_err()
        );
        for (cidr, ok) in [("10.244.3.0/26", true), ("10.244.3.1/26", false)] {
            let spec = json!({"cidr": cidr, "node": "a"});
            let rust: BlockAffinitySpec = serde_json::from_value(spec.clone()).unwrap();
            assert_eq!(validate::block_affinity(&rust).is_empty(), ok);
            assert_eq!(
                cel::<BlockAffinity>(object("BlockAffinity", "b", spec)).is_ok(),
                ok
            );
        }
    }
}
