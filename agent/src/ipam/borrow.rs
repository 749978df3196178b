//! Borrowing: a node whose pools have no free block takes one address from
//! a block another node holds (docs/cni.md, Borrowing). The cross-node
//! record is one `IPAMBlock` object per borrowed-from block, and every
//! change of it is a compare-and-swap ([`SharedBlocks::update`]): the edit
//! is applied to what was read and written only if nobody wrote since; a
//! conflict re-reads and edits again. So every address handed out from a
//! shared block is one successful swap, and two successful swaps on one
//! object are ordered by the API server: the later one saw the earlier
//! one's mark.
//!
//! This module is the record's rules, with the datastore behind a trait;
//! [`super::kube_blocks`] is the API server flavour.

use super::datastore::DatastoreError;
use crate::model::crd::{BlockAllocation, IPAMBlockSpec, IPAMBlockState};
use ipnet::IpNet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How often a borrower reads a `requested` record again while it waits
/// for the owner to open it, when the records cannot be watched.
pub const OPEN_POLL: Duration = Duration::from_millis(100);

/// What an edit of a record decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Write the edited record (compare-and-swap on what was read).
    Write,
    /// Nothing to change.
    Keep,
}

/// One compare-and-swap's outcome: the record as written (or as read,
/// when the edit kept it), and how many conflicts it retried past.
#[derive(Debug, Clone, PartialEq)]
pub struct Updated {
    pub spec: Option<IPAMBlockSpec>,
    pub conflicts: u32,
}

/// An edit: called with the record as read (again after every conflict);
/// `None` when no record exists, which an edit may not create.
pub type EditFn = Box<dyn FnMut(&mut IPAMBlockSpec) -> Edit + Send>;

/// The shared block records of a datastore that has them.
pub trait SharedBlocks: Send + Sync {
    /// Create the record of `block` (owner `owner`, state Requested) if
    /// none exists; return the record as it is.
    fn request(&self, block: IpNet, owner: &str) -> Result<IPAMBlockSpec, DatastoreError>;
    /// Edit the record of `block` by compare-and-swap, retrying conflicts
    /// (a bounded number of times). No record: `spec` is `None`.
    fn update(&self, block: IpNet, edit: EditFn) -> Result<Updated, DatastoreError>;
    /// Every record.
    fn list(&self) -> Result<Vec<IPAMBlockSpec>, DatastoreError>;
    /// Wait until the record of `block` may have left state `requested`
    /// (opened, or deleted), or until `until`; the caller reads it again
    /// either way. By default a pause of [`OPEN_POLL`] (records that cannot
    /// be watched); the API server's flavour watches that one object.
    fn wait_open(&self, block: IpNet, until: Instant) -> Result<(), DatastoreError> {
        let _ = block;
        std::thread::sleep(OPEN_POLL.min(until.saturating_duration_since(Instant::now())));
        Ok(())
    }
    /// A stream of the blocks whose record names `owner` and is in state
    /// `requested`, each sent again whenever its record changes while it
    /// is requested; `None` when the records can only be listed (the
    /// caller then reads them with [`SharedBlocks::list`] now and then).
    fn watch_requests(&self, owner: &str) -> Option<std::sync::mpsc::Receiver<IpNet>> {
        let _ = owner;
        None
    }
}

/// The first address of `block` nobody holds in `spec` and no reservation
/// covers.
pub fn free_address(spec: &IPAMBlockSpec, reserved: &[IpNet]) -> Option<IpAddr> {
    hosts(spec.cidr).find(|ip| {
        !spec.allocations.iter().any(|a| a.ip == *ip) && !reserved.iter().any(|r| r.contains(ip))
    })
}

/// How many addresses of the block nobody holds in `spec` and no
/// reservation covers.
pub fn free_count(spec: &IPAMBlockSpec, reserved: &[IpNet]) -> u128 {
    hosts(spec.cidr)
        .filter(|ip| {
            !spec.allocations.iter().any(|a| a.ip == *ip)
                && !reserved.iter().any(|r| r.contains(ip))
        })
        .count() as u128
}

/// Every address of a block, in order (blocks are small: /26, /122).
fn hosts(block: IpNet) -> impl Iterator<Item = IpAddr> {
    let bits = u32::from(block.max_prefix_len() - block.prefix_len()).min(16);
    let base = super::to_u128(block.network());
    let v4 = block.addr().is_ipv4();
    (0..(1u128 << bits)).map(move |off| super::from_u128(base + off, v4))
}

/// Why a borrow from one record got nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoLoan {
    /// The owner has not opened the record yet.
    NotOpen,
    /// Every address is held or reserved.
    Full,
    /// No record (released meanwhile).
    Gone,
}

/// Mark one free address of `block` for `node`'s `attachment`; the
/// address, or why none.
pub fn borrow(
    shared: &dyn SharedBlocks,
    block: IpNet,
    node: &str,
    attachment: &str,
    reserved: &[IpNet],
) -> Result<(Result<IpAddr, NoLoan>, u32), DatastoreError> {
    let (node, attachment, reserved) =
        (node.to_string(), attachment.to_string(), reserved.to_vec());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Err(NoLoan::Gone)));
    let out = got.clone();
    let updated = shared.update(
        block,
        Box::new(move |spec| {
            let mut got = out.lock().unwrap_or_else(|p| p.into_inner());
            if spec.state != IPAMBlockState::Open {
                *got = Err(NoLoan::NotOpen);
                return Edit::Keep;
            }
            // An earlier round's write may have landed without our seeing
            // the answer: the attachment's mark is then ours already.
            if let Some(a) = spec
                .allocations
                .iter()
                .find(|a| a.node == node && a.attachment == attachment)
            {
                *got = Ok(a.ip);
                return Edit::Keep;
            }
            match free_address(spec, &reserved) {
                Some(ip) => {
                    spec.allocations.push(BlockAllocation {
                        ip,
                        node: node.clone(),
                        attachment: attachment.clone(),
                    });
                    *got = Ok(ip);
                    Edit::Write
                }
                None => {
                    *got = Err(NoLoan::Full);
                    Edit::Keep
                }
            }
        }),
    )?;
    let r = if updated.spec.is_none() {
        Err(NoLoan::Gone)
    } else {
        got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    };
    Ok((r, updated.conflicts))
}

/// Remove the marks of `node` that `drop` selects (by address and
/// attachment); returns how many were removed.
pub fn clear(
    shared: &dyn SharedBlocks,
    block: IpNet,
    node: &str,
    drop: impl Fn(&BlockAllocation) -> bool + Send + 'static,
) -> Result<usize, DatastoreError> {
    let node = node.to_string();
    let removed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = removed.clone();
    shared.update(
        block,
        Box::new(move |spec| {
            let before = spec.allocations.len();
            spec.allocations.retain(|a| !(a.node == node && drop(a)));
            let n = before - spec.allocations.len();
            count.store(n, std::sync::atomic::Ordering::SeqCst);
            if n == 0 { Edit::Keep } else { Edit::Write }
        }),
    )?;
    Ok(removed.load(std::sync::atomic::Ordering::SeqCst))
}

/// The owner's answer to a request: mark its own allocations in the
/// record (`own`: address and attachment) and open it. From the moment the
/// owner decides to open (before this write), it hands out no address of
/// the block except through the record.
pub fn open(
    shared: &dyn SharedBlocks,
    block: IpNet,
    owner: &str,
    own: Vec<(IpAddr, String)>,
) -> Result<IPAMBlockSpec, DatastoreError> {
    let owner = owner.to_string();
    let updated = shared.update(
        block,
        Box::new(move |spec| {
            if spec.owner != owner {
                return Edit::Keep;
            }
            for (ip, attachment) in &own {
                if !spec.allocations.iter().any(|a| a.ip == *ip) {
                    spec.allocations.push(BlockAllocation {
                        ip: *ip,
                        node: owner.clone(),
                        attachment: attachment.clone(),
                    });
                }
            }
            spec.state = IPAMBlockState::Open;
            Edit::Write
        }),
    )?;
    updated.spec.ok_or_else(|| DatastoreError::Corrupt {
        path: format!("ipamblocks.starling.dev/{}", super::kube::block_name(block)).into(),
        reason: "the record was deleted while the owner opened it".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Records in memory with a version per record; `update` is a
    /// compare-and-swap on it, like the API server's replace.
    #[derive(Default)]
    struct Memory(Mutex<HashMap<IpNet, (u64, IPAMBlockSpec)>>);

    impl SharedBlocks for Memory {
        fn request(&self, block: IpNet, owner: &str) -> Result<IPAMBlockSpec, DatastoreError> {
            let mut m = self.0.lock().unwrap();
            let e = m.entry(block).or_insert_with(|| {
                (
                    1,
                    IPAMBlockSpec {
                        cidr: block,
                        owner: owner.into(),
                        state: IPAMBlockState::Requested,
                        allocations: Vec::new(),
                    },
                )
            });
            Ok(e.1.clone())
        }
        fn update(&self, block: IpNet, mut edit: EditFn) -> Result<Updated, DatastoreError> {
            let Some((version, mut spec)) = self.0.lock().unwrap().get(&block).cloned() else {
                return Ok(Updated {
                    spec: None,
                    conflicts: 0,
                });
            };
            if edit(&mut spec) == Edit::Write {
                let mut m = self.0.lock().unwrap();
                let slot = m.get_mut(&block).unwrap();
                assert_eq!(slot.0, version, "single-threaded test: no conflict");
                *slot = (version + 1, spec.clone());
            }
            Ok(Updated {
                spec: Some(spec),
                conflicts: 0,
            })
        }
        fn list(&self) -> Result<Vec<IPAMBlockSpec>, DatastoreError> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .values()
                .map(|v| v.1.clone())
                .collect())
        }
    }

    #[test]
    fn nobody_borrows_before_the_owner_opens_and_reserved_addresses_are_skipped() {
        let m = Memory::default();
        let block: IpNet = "10.0.0.0/30".parse().unwrap();
        m.request(block, "owner").unwrap();
        let (r, _) = borrow(&m, block, "b", "pods/x/eth0", &[]).unwrap();
        assert_eq!(r, Err(NoLoan::NotOpen));
        // Opened by someone who is not the owner: nothing changes.
        let spec = open(&m, block, "impostor", vec![]).unwrap();
        assert_eq!(spec.state, IPAMBlockState::Requested);
        let own = vec![("10.0.0.0".parse().unwrap(), "pods/o/eth0".to_string())];
        assert_eq!(
            open(&m, block, "owner", own).unwrap().state,
            IPAMBlockState::Open
        );
        let reserved = vec!["10.0.0.1/32".parse().unwrap()];
        let (r, _) = borrow(&m, block, "b", "pods/x/eth0", &reserved).unwrap();
        assert_eq!(r, Ok("10.0.0.2".parse().unwrap()));
        // The same attachment again (a retried ADD): the same address.
        let (again, _) = borrow(&m, block, "b", "pods/x/eth0", &reserved).unwrap();
        assert_eq!(again, r);
        let (r, _) = borrow(&m, block, "c", "pods/y/eth0", &reserved).unwrap();
        assert_eq!(r, Ok("10.0.0.3".parse().unwrap()));
        let (r, _) = borrow(&m, block, "c", "pods/z/eth0", &reserved).unwrap();
        assert_eq!(r, Err(NoLoan::Full));
        // Clearing touches only the named node's marks.
        assert_eq!(clear(&m, block, "b", |_| true).unwrap(), 1);
        let left: Vec<_> = m.list().unwrap()[0]
            .allocations
            .iter()
            .map(|a| a.node.clone())
            .collect();
        assert_eq!(left, ["owner", "c"]);
        let gone: IpNet = "10.9.0.0/30".parse().unwrap();
        assert_eq!(
            borrow(&m, gone, "b", "k", &[]).unwrap().0,
            Err(NoLoan::Gone)
        );
    }
}
