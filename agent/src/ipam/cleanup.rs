//! Releasing what a node that left the cluster still holds. A deleted node
//! cannot release its own blocks, so one agent of the cluster (the holder of
//! the cleanup Lease, `node::cleanup`) does it for it. The same operation
//! serves any tool that must free a node's blocks (an `ipam check` that
//! finds claims of nodes no longer in the model): [`release_node`].
//!
//! The claims are released, and the node's part of the borrowing records
//! cleared ([`records`]). The node's allocations lived in its own store, on
//! the node, and its pods are gone with it. A claim of a block whose record
//! still holds marks of live nodes is kept ([`release_node_except`]): those
//! nodes keep their borrowed addresses, so the block must not be claimed
//! and handed out again.

pub mod records;

use super::datastore::{Affinity, Datastore, DatastoreError};
use ipnet::IpNet;
use std::collections::BTreeSet;

/// How many times a claim that changed under us is re-read before giving up
/// (its holder wrote it again: then it is not gone after all).
const STALE_RETRIES: usize = 3;

/// Release every block `node` claims, each with a compare-and-swap on the
/// revision just read, so a claim that changed meanwhile (re-claimed by a
/// node that came back) is re-read rather than deleted blind. Returns the
/// blocks released; a claim already gone counts as released.
pub fn release_node(ds: &dyn Datastore, node: &str) -> Result<Vec<IpNet>, DatastoreError> {
    release_node_except(ds, node, &[])
}

/// [`release_node`], keeping the claims of the blocks in `keep`.
pub fn release_node_except(
    ds: &dyn Datastore,
    node: &str,
    keep: &[IpNet],
) -> Result<Vec<IpNet>, DatastoreError> {
    let mut released = Vec::new();
    for _ in 0..STALE_RETRIES {
        let held: Vec<Affinity> = ds
            .affinities()?
            .into_iter()
            .filter(|a| a.node == node && !keep.contains(&a.block))
            .collect();
        if held.is_empty() {
            released.sort();
            released.dedup();
            return Ok(released);
        }
        let mut stale = None;
        for a in held {
            match ds.release(&a) {
                Ok(()) => released.push(a.block),
                Err(e @ DatastoreError::Stale { .. }) => stale = Some(e),
                Err(e) => return Err(e),
            }
        }
        if stale.is_none() {
            released.sort();
            released.dedup();
            return Ok(released);
        }
    }
    // Still changing after several rounds: someone is writing the claims.
    let held = ds.affinities()?;
    match held
        .into_iter()
        .find(|a| a.node == node && !keep.contains(&a.block))
    {
        Some(a) => Err(DatastoreError::Stale {
            block: a.block,
            expected: a.revision.clone(),
        }),
        None => Ok(released),
    }
}

/// The nodes that hold claims but are not among `known` (the nodes of the
/// cluster model).
pub fn claimants_not_in<'a>(
    affinities: &'a [Affinity],
    known: &BTreeSet<String>,
) -> BTreeSet<&'a str> {
    affinities
        .iter()
        .map(|a| a.node.as_str())
        .filter(|n| !known.contains(*n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::datastore::FileDatastore;

    struct Scratch(std::path::PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let d =
                std::env::temp_dir().join(format!("starling-cleanup-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Scratch(d)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_gone_node_loses_every_claim_and_nobody_else_loses_any() {
        let s = Scratch::new("gone");
        let ds = FileDatastore::new(s.0.join("blocks.json"));
        for (block, node) in [
            ("10.244.1.0/26", "node1"),
            ("10.244.3.0/26", "node3"),
            ("10.244.3.64/26", "node3"),
            ("fd00::/122", "node3"),
        ] {
            ds.claim(net(block), node).unwrap();
        }
        let all = ds.affinities().unwrap();
        let known: BTreeSet<String> = ["node1".to_string(), "node2".to_string()].into();
        assert_eq!(claimants_not_in(&all, &known), BTreeSet::from(["node3"]));
        let released = release_node(&ds, "node3").unwrap();
        assert_eq!(
            released,
            vec![
                net("10.244.3.0/26"),
                net("10.244.3.64/26"),
                net("fd00::/122")
            ]
        );
        let left: Vec<(IpNet, String)> = ds
            .affinities()
            .unwrap()
            .into_iter()
            .map(|a| (a.block, a.node))
            .collect();
        assert_eq!(left, vec![(net("10.244.1.0/26"), "node1".to_string())]);
        // Again: nothing left to release, not an error.
        assert_eq!(release_node(&ds, "node3").unwrap(), Vec::<IpNet>::new());
    }

    /// A claim whose revision moved between the read and the release is
    /// re-read, never deleted on a stale revision.
    #[test]
    fn a_claim_that_changed_meanwhile_is_read_again() {
        struct Racing {
            inner: FileDatastore,
            raced: std::sync::atomic::AtomicBool,
        }
        impl Datastore for Racing {
            fn affinities(&self) -> Result<Vec<Affinity>, DatastoreError> {
                self.inner.affinities()
            }
            fn claim(&self, block: IpNet, node: &str) -> Result<Affinity, DatastoreError> {
                self.inner.claim(block, node)
            }
            fn release(&self, a: &Affinity) -> Result<(), DatastoreError> {
                if !self.raced.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    // The claim was written between our read and our
                    // release: the revision we hold is stale.
                    return Err(DatastoreError::Stale {
                        block: a.block,
                        expected: a.revision.clone(),
                    });
                }
                self.inner.release(a)
            }
        }
        let s = Scratch::new("race");
        let ds = Racing {
            inner: FileDatastore::new(s.0.join("blocks.json")),
            raced: std::sync::atomic::AtomicBool::new(false),
        };
        ds.claim(net("10.244.3.0/26"), "node3").unwrap();
        let released = release_node(&ds, "node3").unwrap();
        assert_eq!(released, vec![net("10.244.3.0/26")]);
        assert!(ds.affinities().unwrap().is_empty());
    }
}
