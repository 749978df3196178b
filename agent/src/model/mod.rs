//! The cluster model: the kinds operators write ([`crd`]), their checks
//! ([`validate`], [`selector`]), where they are read from ([`Datastore`]:
//! [`file`](mod@file) or [`kube`]), and what the BGP speaker should do
//! about them ([`plan`](mod@plan)).
//!
//! A leaf of the agent's domain: of the crate it imports only the
//! vocabulary module `encap` (a pool's encapsulation). IPAM and the node
//! take what they need from it (`ipam::Pool::from(&IPPoolSpec)`, block
//! claims from BlockAffinity objects), never the other way round.

pub mod calico;
pub mod crd;
pub mod file;
pub mod kube;
pub mod plan;
pub mod selector;
pub mod validate;

pub use crd::{
    BGPConfiguration, BGPConfigurationSpec, BGPPeer, BGPPeerSpec, BlockAffinity, BlockAffinitySpec,
    IPPool, IPPoolSpec, IPReservation, IPReservationSpec, Password, StarlingNode, StarlingNodeSpec,
};
pub use file::{FileDatastore, LoadError, Loaded, Problem};
pub use plan::plan;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use tokio::sync::watch;

/// Everything the agent knows about the cluster at one moment. Objects are
/// keyed by name; all of them passed validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The `default` BGPConfiguration, if one was written.
    pub bgp_configuration: Option<BGPConfiguration>,
    pub pools: BTreeMap<String, IPPool>,
    pub peers: BTreeMap<String, BGPPeer>,
    /// BGPFilters by name (Calico's or ours, from either datastore); peers
    /// name them in `spec.filters`.
    pub filters: BTreeMap<String, calico::BGPFilterSpec>,
    pub nodes: BTreeMap<String, StarlingNode>,
    pub affinities: BTreeMap<String, BlockAffinity>,
    /// IPReservations: addresses IPAM never hands out.
    pub reservations: BTreeMap<String, IPReservation>,
    /// Passwords resolved by the datastore (files now, Secrets later), so
    /// that planning reads nothing.
    pub passwords: BTreeMap<Password, String>,
    /// Files the passwords came from; a change to one is a change of the
    /// model.
    pub password_files: BTreeSet<PathBuf>,
    /// Nodes whose addresses are only the datastore's guess (a Kubernetes
    /// Node's InternalIPs as host routes): the node's own agent autodetects
    /// over it when configured to.
    pub guessed: BTreeSet<String>,
}

static DEFAULT_BGP: LazyLock<BGPConfigurationSpec> = LazyLock::new(BGPConfigurationSpec::default);
static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl Snapshot {
    /// The BGP settings in force: the `default` object's, or the defaults.
    pub fn bgp(&self) -> &BGPConfigurationSpec {
        self.bgp_configuration
            .as_ref()
            .map(|c| &c.spec)
            .unwrap_or(&DEFAULT_BGP)
    }

    pub fn node(&self, name: &str) -> Option<&StarlingNodeSpec> {
        self.nodes.get(name).map(|n| &n.spec)
    }

    /// Every reserved CIDR (IPReservations), sorted.
    pub fn reserved_cidrs(&self) -> Vec<ipnet::IpNet> {
        let mut out: Vec<ipnet::IpNet> = self
            .reservations
            .values()
            .flat_map(|r| r.spec.reserved_cidrs.iter().copied())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// A node's labels (empty for an unknown node).
    pub fn labels(&self, node: &str) -> &BTreeMap<String, String> {
        self.nodes
            .get(node)
            .and_then(|n| n.metadata.labels.as_ref())
            .unwrap_or(&NO_LABELS)
    }
}

/// Where the model comes from. The file datastore implements it now; the
/// Kubernetes datastore (watching the CRDs and Nodes) will too.
pub trait Datastore: Send + Sync {
    /// The latest good snapshot.
    fn snapshot(&self) -> Arc<Snapshot>;
    /// Changes whenever a new snapshot replaces the previous one.
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>>;
}
