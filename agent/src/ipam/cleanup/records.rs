//! A deleted node's part of the borrowing records (`IPAMBlock`,
//! docs/cni.md Borrowing), cleared by the node clean-up
//! (`node::cleanup`) before its claims are released:
//!
//! 1. its marks in every record are cleared, each record by
//!    compare-and-swap ([`borrow::clear`]), so a mark written meanwhile by
//!    anyone else survives;
//! 2. a record whose owner it was is deleted once no node of the cluster
//!    holds a mark in it, with the record's resourceVersion as
//!    precondition: a mark written between the read and the delete makes
//!    the delete fail (409), and the record is read again;
//! 3. a record that still holds marks of live nodes is **kept**, and so
//!    is the deleted owner's claim (BlockAffinity) of that block: those
//!    nodes keep their borrowed addresses, and the block cannot be claimed
//!    and handed out again by another node while their marks remain. Once
//!    their pods are gone (each DEL clears its mark) a later pass deletes
//!    the record and releases the block.

use crate::ipam::borrow::{self, SharedBlocks};
use crate::ipam::kube::block_name;
use crate::model::crd::IPAMBlock;
use ipnet::IpNet;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use std::collections::BTreeSet;
use std::sync::Arc;

/// How many times a record that changed under a delete is read again.
const STALE_RETRIES: usize = 3;

/// What clearing a deleted node's part of the records did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecordsReleased {
    /// Marks of the node cleared.
    pub marks: usize,
    /// Records of blocks it owned, deleted.
    pub deleted: Vec<IpNet>,
    /// Records of blocks it owned, kept (with its claim) because live
    /// nodes hold marks in them.
    pub kept: Vec<IpNet>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what} (ipamblocks.starling.dev): {e}")
}

/// Every record.
pub async fn list(api: &Api<IPAMBlock>) -> Result<Vec<IPAMBlock>, String> {
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|e| failed("listing the borrowing records", e))
}

/// The nodes a record names (owner and marks) that are not in `known`.
pub fn nodes_not_in(records: &[IPAMBlock], known: &BTreeSet<String>) -> BTreeSet<String> {
    records
        .iter()
        .flat_map(|r| {
            std::iter::once(r.spec.owner.clone())
                .chain(r.spec.allocations.iter().map(|m| m.node.clone()))
        })
        .filter(|n| !known.contains(n))
        .collect()
}

/// Clear `node`'s marks and delete the records it owned that no node of
/// `live` (the cluster's nodes) holds a mark in.
pub async fn release_node_records(
    api: &Api<IPAMBlock>,
    shared: Arc<dyn SharedBlocks>,
    node: &str,
    live: &BTreeSet<String>,
) -> Result<RecordsReleased, String> {
    let mut out = RecordsReleased::default();
    for r in list(api).await? {
        let block = r.spec.cidr;
        if r.spec.allocations.iter().any(|m| m.node == node) {
            let (s, n) = (shared.clone(), node.to_string());
            out.marks +=
                tokio::task::spawn_blocking(move || borrow::clear(s.as_ref(), block, &n, |_| true))
                    .await
                    .map_err(|e| failed("clearing marks", e))?
                    .map_err(|e| failed(&format!("clearing node {node}'s marks in {block}"), e))?;
        }
        if r.spec.owner == node {
            if delete_unused(api, block, node, live).await? {
                out.deleted.push(block);
            } else {
                out.kept.push(block);
            }
        }
    }
    Ok(out)
}

/// Delete the record of `block` (owned by `node`) unless a live node other
/// than `node` holds a mark in it; true when it is gone.
async fn delete_unused(
    api: &Api<IPAMBlock>,
    block: IpNet,
    node: &str,
    live: &BTreeSet<String>,
) -> Result<bool, String> {
    let name = block_name(block);
    for _ in 0..STALE_RETRIES {
        let Some(r) = api
            .get_opt(&name)
            .await
            .map_err(|e| failed(&format!("reading {name}"), e))?
        else {
            return Ok(true);
        };
        let held = r
            .spec
            .allocations
            .iter()
            .any(|m| m.node != node && live.contains(&m.node));
        if held || r.spec.owner != node {
            return Ok(false);
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: r.metadata.resource_version.clone(),
                uid: r.metadata.uid.clone(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(failed(&format!("deleting {name}"), e)),
        }
    }
    Err(format!(
        "the borrowing record {name} changed {STALE_RETRIES} times while it was being deleted; trying again at the next pass"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::crd::{BlockAllocation, IPAMBlockSpec, IPAMBlockState};

    #[test]
    fn nodes_named_by_records_but_gone_are_owners_and_markers() {
        let rec = |owner: &str, marks: &[&str]| {
            IPAMBlock::new(
                "x",
                IPAMBlockSpec {
                    cidr: "10.0.0.0/26".parse().unwrap(),
                    owner: owner.into(),
                    state: IPAMBlockState::Open,
                    allocations: marks
                        .iter()
                        .map(|n| BlockAllocation {
                            ip: "10.0.0.1".parse().unwrap(),
                            node: (*n).into(),
                            attachment: "pods/c/eth0".into(),
                        })
                        .collect(),
                },
            )
        };
        let records = vec![rec("a", &["b", "gone1"]), rec("gone2", &["a"])];
        let known: BTreeSet<String> = ["a", "b"].map(String::from).into();
        assert_eq!(
            nodes_not_in(&records, &known),
            BTreeSet::from(["gone1".to_string(), "gone2".to_string()])
        );
    }
}
