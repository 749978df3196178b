//! Deleted nodes' blocks, released by one agent of the cluster: the holder
//! of the coordination.k8s.io Lease [`LEASE_NAME`] in the agent's namespace.
//! A deleted node cannot release its own claims, and if every agent tried,
//! they would race for the same deletes (harmless with compare-and-swap, but
//! N times the API traffic and N log lines for one event).
//!
//! The election is the usual Lease protocol, written against the API
//! directly: take the Lease when it is absent or its record has not changed
//! for its duration (measured on our own clock, so the nodes' clocks need
//! not agree), renew it every third of the duration, and write only with
//! the resourceVersion read, so of two agents taking it at once one wins and
//! the other gets 409.
//!
//! The holder compares the block claims with the nodes of the model: a node
//! that holds claims and has been absent from the model for [`GRACE`] is
//! gone, and `ipam::cleanup::release_node` releases its claims. Level-based,
//! so a node deleted while no agent ran (or while the holder changed) is
//! still cleaned up. The other agents withdraw its routes themselves: it
//! left their peering plan with the model.
//!
//! The borrowing records (`IPAMBlock`) are read on every pass of the
//! holder (one list request): a node named by a record (owner or mark) is
//! gone like a claimant. Before its claims are released its marks are
//! cleared and the records it owned deleted, except those in which live
//! nodes still hold marks: they, and its claims of their blocks, are kept
//! until those marks are gone (`ipam::cleanup::records`). A pass whose
//! records cannot be read releases nothing (a claim released under a live
//! borrower's mark would let the block be handed out twice).

use crate::ipam::borrow::SharedBlocks;
use crate::ipam::cleanup::records::{self, RecordsReleased};
use crate::ipam::cleanup::release_node_except;
use crate::ipam::kube::KubeBlockClaims;
use crate::ipam::kube_blocks::KubeSharedBlocks;
use crate::model::Snapshot;
use crate::model::crd::IPAMBlock;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Config;
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// The Lease's name, in the namespace of the agent's ServiceAccount.
pub const LEASE_NAME: &str = "starling-node-cleanup";
/// How long a holder that stops renewing keeps the Lease.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long a node holding claims must be absent from the model before its
/// claims are released: a node that just joined may claim a block before
/// the Node reaches every agent's watch.
pub const GRACE: Duration = Duration::from_secs(10);

/// Whether the model is current (every watch streaming): an old snapshot
/// lacks nodes that joined meanwhile, whose claims must not look orphaned.
pub type Connected = Arc<dyn Fn() -> bool + Send + Sync>;

/// What a Lease says: its holder and last renewal.
type LeaseRecord = (Option<String>, Option<String>);

/// One agent's side of the election.
struct Elector {
    api: Api<Lease>,
    namespace: String,
    me: String,
    /// The holder and renew time last read, and when we first saw them.
    observed: Option<(LeaseRecord, Instant)>,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    /// Take or renew the Lease; true while we hold it.
    async fn hold(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let secs = LEASE_DURATION.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.me.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let record = (
            spec.holder_identity.clone(),
            spec.renew_time.as_ref().map(|t| t.0.to_string()),
        );
        let since = match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => Instant::now(),
        };
        self.observed = Some((record, since));
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(LEASE_DURATION, Duration::from_secs);
        let mine = spec.holder_identity.as_deref() == Some(self.me.as_str());
        let free = spec.holder_identity.is_none() || since.elapsed() > duration;
        if !mine && !free {
            return Ok(false);
        }
        if !mine {
            spec.holder_identity = Some(self.me.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(secs);
        // `lease` carries the resourceVersion we read: a write by anyone
        // since makes this a 409, and we are not the holder.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Take part in the election as `me` (the node name) and, while holding the
/// Lease, release the claims of nodes gone from the model. Runs until the
/// agent stops; errors are logged and retried at the next renewal.
pub async fn run(
    config: Config,
    me: String,
    snaps: watch::Receiver<Arc<Snapshot>>,
    connected: Connected,
) {
    let namespace = config.default_namespace.clone();
    let client = match crate::model::kube::client_of(config.clone()) {
        Ok(c) => c,
        Err(e) => {
            warn!(
                "node cleanup: cannot make a Kubernetes client: {e}; deleted nodes' blocks stay claimed"
            );
            return;
        }
    };
    let claims = match KubeBlockClaims::new(config.clone()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            warn!("node cleanup: {e}; deleted nodes' blocks stay claimed");
            return;
        }
    };
    let shared: Arc<dyn SharedBlocks> = match KubeSharedBlocks::new(config) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!("node cleanup: {e}; deleted nodes' blocks stay claimed");
            return;
        }
    };
    let gone = Gone {
        claims,
        shared,
        records: Api::all(client.clone()),
    };
    let mut elector = Elector {
        api: Api::namespaced(client, &namespace),
        namespace: namespace.clone(),
        me,
        observed: None,
    };
    let mut leading = false;
    let mut absent_since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(LEASE_DURATION / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now_leading = match elector.hold().await {
            Ok(l) => l,
            Err(e) => {
                warn!("node cleanup: Lease {namespace}/{LEASE_NAME}: {e}");
                false
            }
        };
        if now_leading != leading {
            if now_leading {
                info!(lease = %format!("{namespace}/{LEASE_NAME}"), "holding the node-cleanup Lease: this agent releases the blocks of deleted nodes");
            } else {
                info!(lease = %format!("{namespace}/{LEASE_NAME}"), "not holding the node-cleanup Lease");
            }
            leading = now_leading;
        }
        if !leading || !connected() {
            absent_since.clear();
            continue;
        }
        let snap = snaps.borrow().clone();
        release_gone(&gone, &snap, &mut absent_since).await;
    }
}

/// What the holder releases through.
struct Gone {
    claims: Arc<KubeBlockClaims>,
    shared: Arc<dyn SharedBlocks>,
    records: Api<IPAMBlock>,
}

/// One pass of the holder: note nodes that hold claims (or are named by a
/// borrowing record) but left the model, release those absent for
/// [`GRACE`]. The claims are read from the watched model (the
/// BlockAffinities are in it); the records are listed; a release reads the
/// node's claims afresh, with their revisions for the compare-and-swap.
async fn release_gone(g: &Gone, snap: &Snapshot, absent_since: &mut BTreeMap<String, Instant>) {
    let known: BTreeSet<String> = snap.nodes.keys().cloned().collect();
    let mut gone = claimants_gone(snap);
    match records::list(&g.records).await {
        Ok(all) => gone.extend(records::nodes_not_in(&all, &known)),
        Err(e) => {
            warn!("node cleanup: {e}; releasing nothing this pass");
            return;
        }
    }
    absent_since.retain(|n, _| gone.contains(n));
    for node in gone {
        let since = *absent_since
            .entry(node.clone())
            .or_insert_with(Instant::now);
        if since.elapsed() < GRACE {
            continue;
        }
        let done = match records::release_node_records(&g.records, g.shared.clone(), &node, &known)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                warn!("node cleanup: clearing the borrowing marks of deleted node {node}: {e}");
                continue;
            }
        };
        let (c, n, keep) = (g.claims.clone(), node.clone(), done.kept.clone());
        match tokio::task::spawn_blocking(move || release_node_except(c.as_ref(), &n, &keep)).await
        {
            Ok(Ok(blocks)) => {
                info!(node = %node, blocks = ?blocks, "released the blocks of deleted node {node} (its BlockAffinities are gone)");
                log_records(&node, &done);
                if done.kept.is_empty() {
                    absent_since.remove(&node);
                }
            }
            Ok(Err(e)) => warn!("node cleanup: releasing the blocks of deleted node {node}: {e}"),
            Err(e) => warn!("node cleanup: releasing the blocks of deleted node {node}: {e}"),
        }
    }
}

fn log_records(node: &str, done: &RecordsReleased) {
    if done.marks > 0 || !done.deleted.is_empty() {
        info!(node = %node, marks = done.marks, records = ?done.deleted, "cleared {} borrowing mark(s) of deleted node {node} and deleted the borrowing records it owned", done.marks);
    }
    if !done.kept.is_empty() {
        info!(node = %node, blocks = ?done.kept, "kept deleted node {node}'s blocks {:?} and their borrowing records: live nodes still hold marks in them (released once those are gone)", done.kept);
    }
}

/// The nodes that hold a BlockAffinity in `snap` but are not among its
/// nodes.
fn claimants_gone(snap: &Snapshot) -> BTreeSet<String> {
    snap.affinities
        .values()
        .map(|a| &a.spec.node)
        .filter(|n| !snap.nodes.contains_key(*n))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::crd::AffinityState;
    use crate::model::{BlockAffinity, BlockAffinitySpec, StarlingNode};

    #[test]
    fn claimants_gone_are_the_affinity_holders_missing_from_the_nodes() {
        let mut snap = Snapshot::default();
        for (name, node, cidr) in [
            ("a", "node1", "10.244.0.0/26"),
            ("b", "node2", "10.244.0.64/26"),
            ("c", "node2", "10.244.0.128/26"),
        ] {
            let spec = BlockAffinitySpec {
                cidr: cidr.parse().unwrap(),
                node: node.into(),
                state: AffinityState::default(),
            };
            snap.affinities
                .insert(name.into(), BlockAffinity::new(name, spec));
        }
        snap.nodes.insert(
            "node1".into(),
            StarlingNode::new("node1", Default::default()),
        );
        snap.nodes.insert(
            "node3".into(),
            StarlingNode::new("node3", Default::default()),
        );
        assert_eq!(claimants_gone(&snap), BTreeSet::from(["node2".to_string()]));
    }
}
