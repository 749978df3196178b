//! `starlingctl ipam check` and `ipam release`, answered by the agent over
//! its control socket: it holds what they need (this node's allocations,
//! a client of the block claims, the model's nodes and reservations and,
//! with Kubernetes, an API client to ask whether a pod exists).
//!
//! Allocations live in each node's own store, so the address findings
//! (leaks, duplicates, strays, reservations) are this node's; the block
//! findings (orphans, overlapping claims) are the cluster's, read from the
//! claims every node shares. A cluster-wide address check is the check run
//! on every node (`kubectl exec` into each agent, as docs/operations.md
//! shows).

use crate::ipam::check::{self, CheckReport, Liveness};
use crate::ipam::server::IpamHandle;
use crate::ipam::{Affinity, Datastore};
use crate::model::Snapshot;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use starling_cni_proto::{Allocation, Envelope, Reply, Request, Response};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long one question to the IPAM thread or the API server may take.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// What `ipam release` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseReport {
    pub node: String,
    /// The attachment released, with every address it held (both
    /// families: an attachment's addresses go together).
    pub released: Allocation,
    /// Released although its owner still looked alive (`--force`).
    pub forced: bool,
    /// What the check of its owner found.
    pub owner: String,
}

/// What the agent answers `ipam check` and `ipam release` from.
#[derive(Clone)]
pub struct IpamOps {
    pub node: String,
    pub datastore: String,
    pub ipam: IpamHandle,
    pub claims: Arc<dyn Datastore>,
    /// Kubernetes: pods are looked up in the API server.
    pub pods: Option<kube::Client>,
    pub snaps: watch::Receiver<Arc<Snapshot>>,
}

impl IpamOps {
    async fn allocations(&self) -> Result<Vec<Allocation>, String> {
        let env = Envelope::new(Request::List, OP_TIMEOUT);
        match self.ipam.request(env).await {
            Response::Ok(Reply::Listed { allocations }) => Ok(allocations),
            Response::Ok(other) => Err(format!("IPAM answered {other:?} to a listing")),
            Response::Err(e) => Err(format!("IPAM: {}", e.message)),
        }
    }

    async fn affinities(&self) -> Result<Vec<Affinity>, String> {
        let claims = self.claims.clone();
        tokio::task::spawn_blocking(move || claims.affinities())
            .await
            .map_err(|e| format!("reading the block claims: {e}"))?
            .map_err(|e| format!("reading the block claims: {e}"))
    }

    /// Whether the allocation's pod (Kubernetes) or container (its network
    /// namespace) still exists on this node.
    async fn liveness(&self, a: &Allocation) -> Liveness {
        let (Some(client), Some(pod)) = (&self.pods, &a.pod) else {
            return netns_liveness(&a.netns);
        };
        let api: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &pod.namespace);
        match tokio::time::timeout(OP_TIMEOUT, api.get_opt(&pod.name)).await {
            Err(_) => Liveness::Unknown(format!(
                "the API server did not answer for pod {pod} within {OP_TIMEOUT:?}"
            )),
            Ok(Err(e)) => Liveness::Unknown(format!("reading pod {pod}: {e}")),
            Ok(Ok(None)) => Liveness::Gone(format!("pod {pod} does not exist in the API server")),
            Ok(Ok(Some(p))) => match p.spec.and_then(|s| s.node_name) {
                Some(n) if n != self.node => {
                    Liveness::Gone(format!("pod {pod} runs on node {n}, not on {}", self.node))
                }
                _ => Liveness::InUse(format!("pod {pod} exists in the API server")),
            },
        }
    }

    /// `ipam check`.
    pub async fn check(&self) -> Result<CheckReport, String> {
        let allocations = self.allocations().await?;
        let affinities = self.affinities().await?;
        let mut judged = Vec::with_capacity(allocations.len());
        for a in allocations {
            let live = self.liveness(&a).await;
            judged.push((a, live));
        }
        let snap = self.snaps.borrow().clone();
        let nodes: BTreeSet<String> = snap.nodes.keys().cloned().collect();
        let reserved = snap.reserved_cidrs();
        Ok(check::check(&check::Inputs {
            node: &self.node,
            datastore: &self.datastore,
            allocations: &judged,
            affinities: &affinities,
            nodes: &nodes,
            reserved: &reserved,
        }))
    }

    /// `ipam release --ip ADDR [--force]`.
    pub async fn release(&self, ip: IpAddr, force: bool) -> Result<ReleaseReport, String> {
        let allocations = self.allocations().await?;
        let Some(a) = allocations
            .into_iter()
            .find(|a| a.ips.iter().any(|n| n.addr() == ip))
        else {
            return Err(self.not_here(ip).await);
        };
        let owner = match self.liveness(&a).await {
            Liveness::InUse(why) if !force => {
                return Err(format!(
                    "{ip} is in use by {}: {why}; nothing released (--force releases it anyway)",
                    a.key
                ));
            }
            Liveness::Unknown(why) if !force => {
                return Err(format!(
                    "cannot tell whether {ip} ({}) is in use: {why}; nothing released (--force releases it anyway)",
                    a.key
                ));
            }
            Liveness::InUse(why) | Liveness::Unknown(why) | Liveness::Gone(why) => why,
        };
        let env = Envelope::new(Request::Del { key: a.key.clone() }, OP_TIMEOUT);
        match self.ipam.request(env).await {
            Response::Ok(Reply::Released {
                allocation: Some(released),
            }) => Ok(ReleaseReport {
                node: self.node.clone(),
                released,
                forced: force,
                owner,
            }),
            Response::Ok(_) => Err(format!(
                "{ip} ({}) was released by someone else meanwhile",
                a.key
            )),
            Response::Err(e) => Err(format!("releasing {ip}: {}", e.message)),
        }
    }

    /// Why `ip` cannot be released here: not allocated on this node, and
    /// whose block it is in.
    async fn not_here(&self, ip: IpAddr) -> String {
        let holder = self.affinities().await.ok().and_then(|all| {
            all.into_iter()
                .find(|a| a.block.contains(&ip) && a.node != self.node)
        });
        match holder {
            Some(h) => format!(
                "{ip} is not allocated on node {}; its block {} is held by node {}: run `starlingctl ipam release` on that node's agent",
                self.node, h.block, h.node
            ),
            None => format!("{ip} is not allocated on node {}", self.node),
        }
    }
}

/// A container's liveness from its network namespace path.
fn netns_liveness(netns: &str) -> Liveness {
    if netns.is_empty() {
        return Liveness::Unknown("no network namespace was recorded for it".into());
    }
    if Path::new(netns).exists() {
        Liveness::InUse(format!("its network namespace {netns} exists"))
    } else {
        Liveness::Gone(format!("its network namespace {netns} is gone"))
    }
}
