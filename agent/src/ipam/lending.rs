//! Borrowing in the allocator (docs/cni.md, Borrowing): the node's side of
//! the shared block records of [`super::borrow`]. A borrower marks an
//! address of another node's block in the block's record, then stores the
//! allocation, then answers the plugin; a release removes the allocation
//! from the store first and clears the mark after. An owner whose block has
//! a record hands out none of its addresses from the local store alone.
//!
//! API calls never run on the IPAM thread: a borrow is a claim plan
//! ([`Want::Borrow`]) run on the claim thread, the clearing of marks runs
//! on a thread of its own after the commit, and the owner's opening write
//! is started by the server when the record watch reports a request.

use super::borrow::{self, NoLoan, SharedBlocks};
use super::{ClaimPlan, Ipam, IpamError, Pool};
use crate::model::crd::{IPAMBlockSpec, IPAMBlockState};
use ipnet::IpNet;
use starling_cni_proto::{Allocation, AttachmentKey};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long after a claim found every block of the pools held the node
/// borrows without trying to claim again.
const POOLS_FULL_FOR: Duration = Duration::from_secs(10);

/// Borrowing's state in [`Ipam`].
#[derive(Default)]
pub(super) struct Lending {
    /// The records; `None`: this node never borrows (file datastore, or
    /// `strictAffinity`).
    pub shared: Option<Arc<dyn SharedBlocks>>,
    /// Addresses this node holds in other nodes' blocks, and the block.
    pub borrowed: HashMap<IpAddr, IpNet>,
    /// This node's blocks that have a record: served only through it.
    pub lent: BTreeSet<IpNet>,
    /// Marks made for an attachment whose ADD has not taken them yet.
    pub loans: Vec<(AttachmentKey, IpAddr, IpNet)>,
    /// A claim found no free block of the family (`[IPv4, IPv6]`) then.
    pub pools_full: [Option<Instant>; 2],
    /// Marks to clear once the release is committed: block, address,
    /// attachment.
    pub unmark: Vec<(IpNet, IpAddr, String)>,
}

/// The records, and this node's marks the store holds (same address and
/// attachment) in blocks it does not hold: its borrowed addresses.
pub(super) fn held_marks(
    node: &str,
    shared: &dyn SharedBlocks,
    own: &[IpNet],
    existing: &[Allocation],
) -> Result<(Vec<IPAMBlockSpec>, HashMap<IpAddr, IpNet>), IpamError> {
    let records = shared.list()?;
    let held: HashSet<(IpAddr, String)> = existing
        .iter()
        .flat_map(|a| a.ips.iter().map(|ip| (ip.addr(), a.key.to_string())))
        .collect();
    let mut borrowed = HashMap::new();
    for r in records.iter().filter(|r| !own.contains(&r.cidr)) {
        for a in r.allocations.iter().filter(|a| a.node == node) {
            if held.contains(&(a.ip, a.attachment.clone())) {
                borrowed.insert(a.ip, r.cidr);
            }
        }
    }
    Ok((records, borrowed))
}

impl Lending {
    /// Start-up: clear this node's marks its store does not hold (a borrow
    /// or a release cut short by a crash: a leak, never a double), and
    /// serve this node's blocks that have a record through it.
    pub(super) fn start(
        ipam: &Ipam,
        shared: Arc<dyn SharedBlocks>,
        records: &[IPAMBlockSpec],
        borrowed: HashMap<IpAddr, IpNet>,
    ) -> Lending {
        let node = ipam.node.clone();
        let held: HashSet<(IpAddr, String)> = ipam
            .by_key
            .values()
            .flat_map(|a| a.ips.iter().map(|ip| (ip.addr(), a.key.to_string())))
            .collect();
        for r in records {
            let stale: HashSet<(IpAddr, String)> = r
                .allocations
                .iter()
                .filter(|a| a.node == node && !held.contains(&(a.ip, a.attachment.clone())))
                .map(|a| (a.ip, a.attachment.clone()))
                .collect();
            if stale.is_empty() {
                continue;
            }
            let n = stale.len();
            let drop = move |a: &crate::model::crd::BlockAllocation| {
                stale.contains(&(a.ip, a.attachment.clone()))
            };
            match borrow::clear(shared.as_ref(), r.cidr, &node, drop) {
                Ok(cleared) => {
                    tracing::info!(block = %r.cidr, marks = n, cleared, "cleared this node's marks its store does not hold (a borrow or release cut short)")
                }
                Err(e) => {
                    tracing::warn!(block = %r.cidr, error = %e, "cannot clear this node's stale marks; they stay leaked until the next start")
                }
            }
        }
        let lent = records
            .iter()
            .filter(|r| r.owner == node && ipam.blocks.contains(&r.cidr))
            .map(|r| r.cidr)
            .collect();
        Lending {
            shared: Some(shared),
            borrowed,
            lent,
            ..Lending::default()
        }
    }
}

impl Ipam {
    /// A claim found every block of the family's pools held: borrow for a
    /// while instead of claiming again.
    pub fn pools_full(&self, v4: bool) -> bool {
        self.lending.pools_full[usize::from(!v4)].is_some_and(|t| t.elapsed() < POOLS_FULL_FOR)
    }

    /// Remember that a claim of the family found no free block.
    pub fn set_pools_full(&mut self, v4: bool) {
        self.lending.pools_full[usize::from(!v4)] = Some(Instant::now());
    }

    /// Whether this node borrows (a datastore that shares allocations and
    /// `strictAffinity` off).
    pub fn borrows(&self) -> bool {
        self.lending.shared.is_some()
    }

    /// The shared records, for the owner's watch and the clearing thread.
    pub fn shared_blocks(&self) -> Option<Arc<dyn SharedBlocks>> {
        self.lending.shared.clone()
    }

    /// A borrow for `key` landed: `got` is the block and the address (as
    /// a host prefix), the answer of [`ClaimPlan::run`] for a borrow.
    pub fn lend_result(&mut self, key: &AttachmentKey, got: &[IpNet]) {
        if let [block, host] = got {
            self.lending.loans.push((key.clone(), host.addr(), *block));
        }
    }

    pub(super) fn take_loan(&mut self, key: &AttachmentKey, v4: bool) -> Option<IpAddr> {
        let i = self
            .lending
            .loans
            .iter()
            .position(|(k, ip, _)| k == key && ip.is_ipv4() == v4)?;
        let (_, ip, block) = self.lending.loans.remove(i);
        self.lending.borrowed.insert(ip, block);
        self.used.insert(ip, key.clone());
        Some(ip)
    }

    /// An ADD that took a loan failed for its other family: keep the loan
    /// for the retry (the mark is the attachment's).
    pub(super) fn return_loan(&mut self, key: &AttachmentKey, ip: IpAddr) {
        if let Some(block) = self.lending.borrowed.remove(&ip) {
            self.lending.loans.push((key.clone(), ip, block));
        }
    }

    /// Queue the marks of a released allocation (borrowed addresses, and
    /// the owner's addresses in a block with a record) for clearing after
    /// the commit.
    pub(super) fn unmark_after_commit(&mut self, alloc: &Allocation) {
        for ip in alloc.ips.iter().map(IpNet::addr) {
            let block = self
                .lending
                .borrowed
                .remove(&ip)
                .or_else(|| self.lending.lent.iter().find(|b| b.contains(&ip)).copied());
            if let Some(block) = block {
                self.lending.unmark.push((block, ip, alloc.key.to_string()));
            }
        }
    }

    /// The marks to clear now that their releases are committed.
    pub fn take_unmarks(&mut self) -> Vec<(IpNet, IpAddr, String)> {
        std::mem::take(&mut self.lending.unmark)
    }

    /// The owner saw a request for `block`: from now on it hands out none
    /// of the block's addresses from its store alone. Returns what it
    /// holds in the block (address, attachment), for the opening write;
    /// `None` when the block is not this node's.
    pub fn lend(&mut self, block: IpNet) -> Option<Vec<(IpAddr, String)>> {
        if !self.blocks.contains(&block) {
            return None;
        }
        self.lending.lent.insert(block);
        Some(
            self.by_key
                .values()
                .flat_map(|a| a.ips.iter().map(move |ip| (ip.addr(), a.key.to_string())))
                .filter(|(ip, _)| block.contains(ip))
                .collect(),
        )
    }

    /// Blocks this node holds marks in or lends: a borrow tries them
    /// first.
    pub(super) fn preferred_blocks(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self.lending.borrowed.values().copied().collect();
        out.extend(self.lending.lent.iter().copied());
        out.sort();
        out.dedup();
        out
    }

    /// The blocks this node holds that have a record: other nodes' host
    /// routes inside them are accepted (they are borrowed addresses).
    pub fn lent_blocks(&self) -> Vec<IpNet> {
        self.lending.lent.iter().copied().collect()
    }

    /// What the node announces: its blocks, and a host prefix per
    /// borrowed address a pod holds.
    pub fn announced(&self) -> Vec<IpNet> {
        let mut out = self.blocks.clone();
        let mut hosts: Vec<IpNet> = self
            .lending
            .borrowed
            .keys()
            .filter(|ip| self.used.contains_key(ip))
            .map(|ip| IpNet::from(*ip))
            .collect();
        hosts.sort();
        out.extend(hosts);
        out
    }
}

/// One block another node holds, as a borrow candidate.
struct Candidate {
    block: IpNet,
    owner: String,
    /// The record's state, if it has one.
    state: Option<IPAMBlockState>,
    free: u128,
}

/// Where a borrow's time went, logged with it (docs/benchmarks.md).
#[derive(Default)]
struct Timings {
    /// Reading the records and the BlockAffinities for the candidates.
    list: Duration,
    /// Creating the record (`requested`).
    request: Duration,
    /// Waiting for the owner to open it.
    open: Duration,
    /// The compare-and-swap reads and writes (every round).
    mark: Duration,
}

impl ClaimPlan {
    /// Borrow one address for `key` from a block of `pools`: first from a
    /// block this node already holds a mark in (or lends), with no read of
    /// every record; then from a block another node holds (or this node's
    /// own block with a record): the blocks with an open record first,
    /// then by most free addresses, then by address. Returns `[block,
    /// address]`.
    pub(super) fn run_borrow(
        &self,
        pools: &[Pool],
        key: &AttachmentKey,
    ) -> Result<Vec<IpNet>, IpamError> {
        let family = if self.v4 { "IPv4" } else { "IPv6" };
        let Some(shared) = self.shared.as_deref() else {
            return Err(IpamError::Exhausted(format!(
                "no free {family} block for node {} and this node does not borrow",
                self.node
            )));
        };
        let attachment = key.to_string();
        let mut t = Timings::default();
        let in_pools = |b: &IpNet| {
            b.addr().is_ipv4() == self.v4
                && pools
                    .iter()
                    .any(|p| !p.disabled && p.cidr.contains(&b.network()))
        };
        // A block this node holds a mark in keeps its record and its
        // owner's claim (node clean-up keeps both while live nodes hold
        // marks), so it needs no new read of the claims.
        for block in self.prefer.iter().filter(|b| in_pools(b)) {
            let started = Instant::now();
            let (got, conflicts) =
                borrow::borrow(shared, *block, &self.node, &attachment, &self.reserved)?;
            t.mark += started.elapsed();
            if let Ok(ip) = got {
                log_borrow(*block, "-", ip, &attachment, conflicts, &t);
                return Ok(vec![*block, IpNet::from(ip)]);
            }
        }
        let started = Instant::now();
        let candidates = self.candidates(shared, pools)?;
        t.list = started.elapsed();
        for c in candidates {
            if let Some(ip) = self.borrow_from(shared, &c, &attachment, &mut t)? {
                return Ok(vec![c.block, IpNet::from(ip)]);
            }
        }
        Err(IpamError::Exhausted(format!(
            "no free {family} address for node {}: every block of pools [{}] is held and full",
            self.node,
            pools.iter().map(Pool::label).collect::<Vec<_>>().join(", ")
        )))
    }

    /// One candidate: request its record if it has none, wait (watching
    /// it) for the owner to open it, within half the time left, and mark
    /// an address. `None`: the block is full or its record gone.
    fn borrow_from(
        &self,
        shared: &dyn SharedBlocks,
        c: &Candidate,
        attachment: &str,
        t: &mut Timings,
    ) -> Result<Option<IpAddr>, IpamError> {
        let family = if self.v4 { "IPv4" } else { "IPv6" };
        if c.state.is_none() {
            let started = Instant::now();
            shared.request(c.block, &c.owner)?;
            t.request += started.elapsed();
        }
        // The owner opens the record within half the claim timeout,
        // or the pod hears why (the claim timeout answers it anyway).
        let open_by = Instant::now() + self.deadline.saturating_duration_since(Instant::now()) / 2;
        loop {
            let started = Instant::now();
            let (got, conflicts) =
                borrow::borrow(shared, c.block, &self.node, attachment, &self.reserved)?;
            t.mark += started.elapsed();
            match got {
                Ok(ip) => {
                    log_borrow(c.block, &c.owner, ip, attachment, conflicts, t);
                    return Ok(Some(ip));
                }
                Err(NoLoan::Full) | Err(NoLoan::Gone) => return Ok(None),
                Err(NoLoan::NotOpen) if Instant::now() >= open_by => {
                    return Err(IpamError::Exhausted(format!(
                        "borrowing an {family} address from block {} of node {}: the owner did not open its IPAMBlock record {} in time (is its agent running?)",
                        c.block,
                        c.owner,
                        super::kube::block_name(c.block)
                    )));
                }
                Err(NoLoan::NotOpen) => {
                    let started = Instant::now();
                    if let Err(e) = shared.wait_open(c.block, open_by) {
                        tracing::debug!(block = %c.block, error = %e, "watching the record for its opening failed; reading it again shortly");
                        std::thread::sleep(borrow::OPEN_POLL);
                    }
                    t.open += started.elapsed();
                }
            }
        }
    }

    /// Blocks of the enabled `pools` held by any node, except this node's
    /// blocks without a record (full locally), in borrowing order.
    fn candidates(
        &self,
        shared: &dyn SharedBlocks,
        pools: &[Pool],
    ) -> Result<Vec<Candidate>, IpamError> {
        let records = shared.list()?;
        let mut out = Vec::new();
        for a in self.datastore.affinities()? {
            if a.block.addr().is_ipv4() != self.v4
                || !pools
                    .iter()
                    .any(|p| !p.disabled && p.cidr.contains(&a.block.network()))
            {
                continue;
            }
            let record = records.iter().find(|r| r.cidr == a.block);
            if record.is_none() && a.node == self.node {
                continue;
            }
            if record.is_some_and(|r| r.owner != a.node) {
                tracing::warn!(block = %a.block, holder = %a.node, "the block's IPAMBlock record names another owner; not borrowing from it");
                continue;
            }
            let free = match record {
                Some(r) => borrow::free_count(r, &self.reserved),
                None => borrow::free_count(&empty(a.block, &a.node), &self.reserved),
            };
            out.push(Candidate {
                block: a.block,
                owner: a.node,
                state: record.map(|r| r.state),
                free,
            });
        }
        out.retain(|c| c.free > 0);
        out.sort_by(|x, y| {
            let open = |c: &Candidate| c.state != Some(IPAMBlockState::Open);
            (open(x), std::cmp::Reverse(x.free), x.block).cmp(&(
                open(y),
                std::cmp::Reverse(y.free),
                y.block,
            ))
        });
        Ok(out)
    }
}

fn log_borrow(
    block: IpNet,
    owner: &str,
    ip: IpAddr,
    attachment: &str,
    conflicts: u32,
    t: &Timings,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    tracing::info!(
        %block, %owner, %ip, %attachment, conflicts,
        list_ms = ms(t.list), request_ms = ms(t.request), open_ms = ms(t.open), mark_ms = ms(t.mark),
        "borrowed an address"
    );
}

fn empty(block: IpNet, owner: &str) -> IPAMBlockSpec {
    IPAMBlockSpec {
        cidr: block,
        owner: owner.to_string(),
        state: IPAMBlockState::Requested,
        allocations: Vec::new(),
    }
}
