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

use crate::ipam::borrow::SharedBlocks;
use crate::ipam::check::{self, CheckReport, Liveness, marks};
use crate::ipam::kube_blocks::KubeSharedBlocks;
use crate::ipam::server::IpamHandle;
use crate::ipam::{Affinity, Datastore};
use crate::model::Snapshot;
use crate::model::crd::{BlockAllocation, IPAMBlockSpec};
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
    /// families: an attachment's addresses go together); none when the
    /// address released was a borrowing mark no allocation held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Allocation>,
    /// The borrowing mark cleared (`IPAMBlock` record of `block`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark: Option<ReleasedMark>,
    /// Released although its owner still looked alive (`--force`).
    pub forced: bool,
    /// What the check of its owner found.
    pub owner: String,
}

/// A borrowing mark `ipam release` cleared.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleasedMark {
    pub block: ipnet::IpNet,
    pub address: IpAddr,
    pub node: String,
    pub attachment: String,
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
    /// Kubernetes: the client configuration for the borrowing records
    /// (`IPAMBlock`), read by the check and cleared by a release.
    pub records: Option<kube::Config>,
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

    /// Every borrowing record (none without Kubernetes).
    async fn records(&self) -> Result<Vec<IPAMBlockSpec>, String> {
        let Some(cfg) = self.records.clone() else {
            return Ok(Vec::new());
        };
        tokio::task::spawn_blocking(move || KubeSharedBlocks::new(cfg)?.list())
            .await
            .map_err(|e| format!("reading the borrowing records (ipamblocks.starling.dev): {e}"))?
            .map_err(|e| format!("reading the borrowing records (ipamblocks.starling.dev): {e}"))
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
        let records = self.records().await?;
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
            records: &records,
        }))
    }

    /// `ipam release --ip ADDR [--force]`.
    pub async fn release(&self, ip: IpAddr, force: bool) -> Result<ReleaseReport, String> {
        let allocations = self.allocations().await?;
        let Some(a) = allocations
            .into_iter()
            .find(|a| a.ips.iter().any(|n| n.addr() == ip))
        else {
            return self.release_mark(ip, force).await;
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
                released: Some(released),
                mark: None,
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

    /// `ipam release` of an address no allocation of this node holds: a
    /// borrowing mark, cleared (compare-and-swap, `borrow::clear`) when it
    /// is this node's and its pod is gone (or `--force`), or its node is not
    /// in the cluster. Another existing node's mark is that node's to
    /// release: clearing it behind that node's back could hand the address
    /// out twice, so not even `--force` does.
    async fn release_mark(&self, ip: IpAddr, force: bool) -> Result<ReleaseReport, String> {
        let records = self.records().await?;
        let found: Vec<(ipnet::IpNet, BlockAllocation)> = records
            .iter()
            .flat_map(|r| r.allocations.iter().map(|m| (r.cidr, m.clone())))
            .filter(|(_, m)| m.ip == ip)
            .collect();
        let [(block, m)] = found.as_slice() else {
            if found.is_empty() {
                return Err(self.not_here(ip).await);
            }
            let holders: Vec<String> = found
                .iter()
                .map(|(_, m)| format!("{} ({})", m.node, m.attachment))
                .collect();
            return Err(format!(
                "{ip} is marked {} times (for {}): a duplicate; nothing released, see `starlingctl ipam check`",
                found.len(),
                holders.join(", ")
            ));
        };
        let snap = self.snaps.borrow().clone();
        let owner = if !snap.nodes.contains_key(&m.node) {
            format!("node {} is not in the cluster", m.node)
        } else if m.node != self.node {
            return Err(format!(
                "{ip} is borrowed from block {block} by node {} (attachment {}): run `starlingctl ipam release` on that node's agent",
                m.node, m.attachment
            ));
        } else {
            self.mark_owner(ip, m, force).await?
        };
        let Some(cfg) = self.records.clone() else {
            return Err(self.not_here(ip).await);
        };
        let (b, n, a) = (*block, m.node.clone(), m.attachment.clone());
        let cleared = tokio::task::spawn_blocking(move || {
            let shared = KubeSharedBlocks::new(cfg)?;
            crate::ipam::borrow::clear(&shared as &dyn SharedBlocks, b, &n, move |x| {
                x.ip == ip && x.attachment == a
            })
        })
        .await
        .map_err(|e| format!("clearing the mark of {ip}: {e}"))?
        .map_err(|e| format!("clearing the mark of {ip}: {e}"))?;
        if cleared == 0 {
            return Err(format!(
                "{ip} (node {}, attachment {}) was released by someone else meanwhile",
                m.node, m.attachment
            ));
        }
        Ok(ReleaseReport {
            node: self.node.clone(),
            released: None,
            mark: Some(ReleasedMark {
                block: *block,
                address: ip,
                node: m.node.clone(),
                attachment: m.attachment.clone(),
            }),
            forced: force,
            owner,
        })
    }

    /// Whether this node's mark `m` of `ip` may be cleared: refused while
    /// the pod of its attachment runs (or cannot be looked up) unless
    /// forced; otherwise what was found.
    async fn mark_owner(
        &self,
        ip: IpAddr,
        m: &BlockAllocation,
        force: bool,
    ) -> Result<String, String> {
        let mut judged = Vec::new();
        for a in self.allocations().await? {
            if a.key.to_string() == m.attachment {
                let live = self.liveness(&a).await;
                judged.push((a, live));
            }
        }
        match marks::mark_liveness(&self.node, m, &judged) {
            (_, Liveness::InUse(why)) if !force => Err(format!(
                "{ip} is in use by {}: {why}; nothing released (--force releases it anyway)",
                m.attachment
            )),
            (_, Liveness::Unknown(why)) if !force => Err(format!(
                "cannot tell whether {ip} ({}) is in use: {why}; nothing released (--force releases it anyway)",
                m.attachment
            )),
            (_, Liveness::InUse(why) | Liveness::Unknown(why) | Liveness::Gone(why)) => Ok(why),
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
