//! IPAM, owned by the agent: the node holds blocks (claimed through a
//! [`Datastore`] with compare-and-swap) and hands out addresses from them to
//! pod attachments, persisting every allocation in a local [`Store`] before
//! the CNI plugin hears about it.
//!
//! [`Ipam`] is the in-memory view and the allocation rules, with no I/O of
//! its own besides block claims; [`server`] owns it on one thread, batches
//! requests into one store commit, and answers the plugin on a Unix socket.

pub mod annotations;
pub mod borrow;
pub mod check;
pub mod choice;
pub mod cleanup;
pub mod datastore;
pub mod kube;
pub mod kube_blocks;
mod lending;
pub mod pool;
pub mod server;
pub mod store;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use starling_cni_proto::{AddRequest, Allocation, AttachmentKey, PodRoute, StatusReply};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use choice::Choice;
pub use datastore::{Affinity, Datastore, DatastoreError, FileDatastore, Revision};
pub use pool::Pool;
pub use store::{Change, Store, StoreError};

/// Calico's default cap on blocks one node may claim.
pub const DEFAULT_MAX_BLOCKS_PER_NODE: usize = 20;

/// GC leaves allocations younger than this alone unless configured
/// otherwise: a GC whose valid list was read just before an ADD must not
/// release the new pod.
pub const DEFAULT_GC_GRACE_PERIOD: Duration = Duration::from_secs(60);

/// How long a block claim may take unless configured otherwise: past it,
/// the pods waiting for the block are answered (CNI code 11, try again) and
/// the claim goes on in the background; if it succeeds, the block is
/// adopted.
pub const DEFAULT_BLOCK_CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a node re-reads the claims after losing block races
/// before it reports the pools exhausted.
const MAX_CLAIM_ROUNDS: usize = 16;

/// The `ipam` section of the agent's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConfig {
    /// Pools nodes claim blocks from, beyond their static podCIDRs.
    #[serde(default)]
    pub pools: Vec<Pool>,
    /// Blocks this node holds statically (Kubernetes `spec.podCIDRs`), one
    /// per family typically. Claimed at start; a conflict is fatal.
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
    /// Never take addresses outside the node's own blocks.
    #[serde(default)]
    pub strict_affinity: bool,
    /// Stop claiming blocks at this many.
    #[serde(default)]
    pub max_blocks_per_node: Option<usize>,
    /// The shared block-claim file (file datastore); defaults to
    /// `<stateDir>/blocks.json`.
    #[serde(default)]
    pub datastore_file: Option<PathBuf>,
    /// GC never releases an allocation younger than this many seconds
    /// (default 60).
    #[serde(default)]
    pub gc_grace_period_seconds: Option<u64>,
    /// How long pods wait for a block claim, in seconds (default 10).
    #[serde(default)]
    pub block_claim_timeout_seconds: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid IPAM configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("datastore: {0}")]
    Datastore(#[from] DatastoreError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No free address in the blocks held: a block must be claimed first
    /// (see [`Ipam::claim_plan`]).
    #[error("a new {} block is needed", if *v4 { "IPv4" } else { "IPv6" })]
    NeedsBlock { v4: bool, want: Want },
    #[error("{0}")]
    ClaimTimeout(String),
    /// A static address asked for is held by another attachment.
    #[error("{0}")]
    AddressInUse(String),
    /// A static address asked for may not be handed out here.
    #[error("{0}")]
    AddressNotAllowed(String),
    /// An annotation steering IPAM is malformed or names a bad pool.
    #[error("{0}")]
    BadAnnotation(String),
    /// The pod's annotations could not be read in time.
    #[error("{0}")]
    AnnotationsUnavailable(String),
}

/// Which block a claim is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// The first free block of these pools, in order.
    Pools(Vec<Pool>),
    /// Exactly this block (a static address in it was asked for).
    Block(IpNet),
    /// One address for the attachment from a block another node holds
    /// (borrowing, docs/cni.md): no block of these pools is free.
    Borrow {
        pools: Vec<Pool>,
        key: AttachmentKey,
    },
}

/// The node's IPAM state: its blocks and who holds which address.
pub struct Ipam {
    node: String,
    labels: BTreeMap<String, String>,
    config: IpamConfig,
    datastore: Arc<dyn Datastore>,
    /// Blocks this node holds, in claim order.
    blocks: Vec<IpNet>,
    by_key: HashMap<AttachmentKey, Allocation>,
    used: HashMap<IpAddr, AttachmentKey>,
    /// Where the next search in each block starts: handing out addresses
    /// round the block (not lowest-free) keeps a just-released address out of
    /// use for as long as possible, so stale conntrack or ARP entries for it
    /// age out first.
    cursors: HashMap<IpNet, u128>,
    /// Reserved CIDRs (IPReservation): never handed out.
    reserved: Vec<IpNet>,
    /// Stored allocations dropped at start (see [`settle_stale`]).
    dropped: Vec<Allocation>,
    /// Borrowing's state (docs/cni.md, Borrowing); empty without a
    /// datastore that shares allocations.
    lending: lending::Lending,
}

/// A node that was deleted and came back with the same name finds its
/// blocks released by the clean-up (docs/operations.md, Deleted nodes)
/// while its store still holds allocations in them. Each such block is
/// claimed again when it is free (the pods keep their addresses); an
/// allocation whose block another node holds now, or that lies in no pool,
/// is dropped, so this node never serves an address from a block it does
/// not hold. Returns the blocks held, the allocations kept and those
/// dropped.
fn settle_stale(
    (node, config, datastore): (&str, &IpamConfig, &dyn Datastore),
    mut blocks: Vec<IpNet>,
    existing: Vec<Allocation>,
    borrowed: &HashMap<IpAddr, IpNet>,
) -> (Vec<IpNet>, Vec<Allocation>, Vec<Allocation>) {
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for alloc in existing {
        let mut ok = true;
        for ip in alloc.ips.iter().map(IpNet::addr) {
            // Borrowed: held through the block's record, not a claim.
            if blocks.iter().any(|b| b.contains(&ip)) || borrowed.contains_key(&ip) {
                continue;
            }
            let block = config
                .pools
                .iter()
                .find(|p| p.cidr.contains(&ip))
                .and_then(|p| p.block_of(ip));
            match block.map(|b| (b, datastore.claim(b, node))) {
                Some((b, Ok(_))) => {
                    tracing::info!(%b, %ip, attachment = %alloc.key, "claimed again the block of a stored allocation (its claim was released while this node was away)");
                    blocks.push(b);
                }
                Some((b, Err(e))) => {
                    tracing::error!(%b, %ip, attachment = %alloc.key, "dropping a stored allocation: its block cannot be claimed again ({e}); restart the pod");
                    ok = false;
                }
                None => {
                    tracing::error!(%ip, attachment = %alloc.key, "dropping a stored allocation outside every block and pool of this node; restart the pod");
                    ok = false;
                }
            }
        }
        if ok {
            kept.push(alloc)
        } else {
            dropped.push(alloc)
        }
    }
    (blocks, kept, dropped)
}

impl Ipam {
    /// Claim the static podCIDRs, adopt the blocks the datastore says this
    /// node holds, and index the allocations the store kept.
    pub fn new(
        node: &str,
        labels: BTreeMap<String, String>,
        config: IpamConfig,
        datastore: Box<dyn Datastore>,
        existing: Vec<Allocation>,
    ) -> Result<Ipam, IpamError> {
        Ipam::new_sharing(node, labels, config, (datastore, None), existing)
    }

    /// [`Ipam::new`] with the shared block records borrowing goes through
    /// (Kubernetes datastore, `strictAffinity` off): this node's marks
    /// the store holds are kept as borrowed addresses, and the marks it
    /// does not hold (a borrow cut short by a crash) are cleared.
    pub fn new_sharing(
        node: &str,
        labels: BTreeMap<String, String>,
        config: IpamConfig,
        (datastore, shared): (Box<dyn Datastore>, Option<Arc<dyn borrow::SharedBlocks>>),
        existing: Vec<Allocation>,
    ) -> Result<Ipam, IpamError> {
        if node.is_empty() {
            return Err(IpamError::Config("nodeName is empty".into()));
        }
        for pool in &config.pools {
            pool.validate()?;
        }
        for cidr in &config.pod_cidrs {
            if *cidr != cidr.trunc() {
                return Err(IpamError::Config(format!(
                    "podCIDR {cidr} has host bits set (did you mean {}?)",
                    cidr.trunc()
                )));
            }
            datastore.claim(*cidr, node).map_err(|e| {
                IpamError::Config(format!("cannot claim podCIDR {cidr} for node {node}: {e}"))
            })?;
        }
        let blocks: Vec<IpNet> = datastore
            .affinities()?
            .into_iter()
            .filter(|a| a.node == node)
            .map(|a| a.block)
            .collect();
        let shared = shared.filter(|_| !config.strict_affinity);
        let (records, borrowed) = match &shared {
            Some(s) => lending::held_marks(node, s.as_ref(), &blocks, &existing)?,
            None => (Vec::new(), HashMap::new()),
        };
        let (blocks, existing, dropped) = settle_stale(
            (node, &config, datastore.as_ref()),
            blocks,
            existing,
            &borrowed,
        );
        let mut ipam = Ipam {
            node: node.to_string(),
            labels,
            config,
            datastore: Arc::from(datastore),
            blocks,
            by_key: HashMap::new(),
            used: HashMap::new(),
            cursors: HashMap::new(),
            reserved: Vec::new(),
            dropped,
            lending: lending::Lending::default(),
        };
        ipam.reset(existing)?;
        if let Some(shared) = shared {
            ipam.lending = lending::Lending::start(&ipam, shared, &records, borrowed);
        }
        Ok(ipam)
    }

    /// The stored allocations [`Ipam::new`] dropped (their block is now
    /// another node's): the caller removes them from the store.
    pub fn take_dropped(&mut self) -> Vec<Allocation> {
        std::mem::take(&mut self.dropped)
    }

    /// Replace the in-memory allocations with `existing` (the store's
    /// content): at start, and after a failed commit.
    pub fn reset(&mut self, existing: Vec<Allocation>) -> Result<(), IpamError> {
        self.by_key.clear();
        self.used.clear();
        // The releases the failed commit carried did not happen.
        self.lending.unmark.clear();
        for alloc in existing {
            for ip in &alloc.ips {
                if let Some(other) = self.used.insert(ip.addr(), alloc.key.clone()) {
                    // The store never commits this; refuse to serve on top of it.
                    return Err(IpamError::Config(format!(
                        "store holds {} for both {other} and {}",
                        ip.addr(),
                        alloc.key
                    )));
                }
            }
            self.by_key.insert(alloc.key.clone(), alloc);
        }
        Ok(())
    }

    /// How long pods wait for a block claim.
    pub fn block_claim_timeout(&self) -> Duration {
        self.config
            .block_claim_timeout_seconds
            .map_or(DEFAULT_BLOCK_CLAIM_TIMEOUT, Duration::from_secs)
    }

    fn gc_grace_period(&self) -> Duration {
        self.config
            .gc_grace_period_seconds
            .map_or(DEFAULT_GC_GRACE_PERIOD, Duration::from_secs)
    }

    /// The stored key of the attachment: `key` itself, or the same
    /// container and interface stored before keys named their network.
    fn stored_key(&self, key: &AttachmentKey) -> Option<AttachmentKey> {
        if self.by_key.contains_key(key) {
            return Some(key.clone());
        }
        let legacy = AttachmentKey {
            network: String::new(),
            ..key.clone()
        };
        self.by_key.contains_key(&legacy).then_some(legacy)
    }

    fn max_blocks(&self) -> usize {
        self.config
            .max_blocks_per_node
            .unwrap_or(DEFAULT_MAX_BLOCKS_PER_NODE)
    }

    /// Pools of the family that select this node, in order.
    fn node_pools(&self, v4: bool) -> Vec<Pool> {
        self.config
            .pools
            .iter()
            .filter(|p| p.cidr.addr().is_ipv4() == v4 && p.selects(&self.labels))
            .cloned()
            .collect()
    }

    /// Address families this node serves: those it holds a block of, may
    /// claim one for, or the pod's annotations name pools of.
    fn families(&self, choice: &Choice) -> Vec<bool> {
        let mut out = Vec::new();
        for v4 in [true, false] {
            let has_block = self.blocks.iter().any(|b| b.addr().is_ipv4() == v4);
            if has_block || choice.pools(v4).is_some() || !self.node_pools(v4).is_empty() {
                out.push(v4);
            }
        }
        out
    }

    /// The pools an annotation names (by name or CIDR), checked: each must
    /// exist, be of the family and be enabled. A pool's node selector does
    /// not apply (as with Calico: a pool only annotations use selects no
    /// node, `!all()`).
    fn resolve(&self, v4: bool, list: &choice::PoolList) -> Result<Vec<Pool>, IpamError> {
        let family = if v4 { "IPv4" } else { "IPv6" };
        let mut out = Vec::new();
        for want in &list.pools {
            let by_cidr = want.parse::<IpNet>().ok();
            let pool = self
                .config
                .pools
                .iter()
                .find(|p| (!p.name.is_empty() && p.name == *want) || Some(p.cidr) == by_cidr)
                .ok_or_else(|| {
                    IpamError::BadAnnotation(format!(
                        "{}: no IP pool named or with CIDR `{want}`",
                        list.from
                    ))
                })?;
            if pool.cidr.addr().is_ipv4() != v4 {
                return Err(IpamError::BadAnnotation(format!(
                    "{}: pool {} is not an {family} pool",
                    list.from,
                    pool.label()
                )));
            }
            if pool.disabled {
                return Err(IpamError::BadAnnotation(format!(
                    "{}: pool {} is disabled",
                    list.from,
                    pool.label()
                )));
            }
            out.push(pool.clone());
        }
        Ok(out)
    }

    /// Allocate one address per family for the attachment, or return the
    /// allocation it already has (a retried ADD after a lost reply),
    /// claiming blocks as needed on this thread.
    pub fn add(&mut self, req: &AddRequest) -> Result<(Allocation, Option<Change>), IpamError> {
        self.add_with(req, &Choice::default())
    }

    /// [`Ipam::add`] with the operator's choice for the pod.
    pub fn add_with(
        &mut self,
        req: &AddRequest,
        choice: &Choice,
    ) -> Result<(Allocation, Option<Change>), IpamError> {
        // Each round claims (or adopts) at least one block of the missing
        // family, or fails; the block limit ends the rounds.
        loop {
            match self.try_add(req, choice) {
                Err(IpamError::NeedsBlock { v4, want }) => {
                    let got = self.claim_plan(v4, want, Instant::now()).run()?;
                    self.adopt(&got);
                }
                other => return other,
            }
        }
    }

    /// [`Ipam::add_with`] from the blocks already held: never waits on the
    /// datastore. [`IpamError::NeedsBlock`] says a block must be claimed
    /// first.
    pub fn try_add(
        &mut self,
        req: &AddRequest,
        choice: &Choice,
    ) -> Result<(Allocation, Option<Change>), IpamError> {
        validate_key(&req.key)?;
        if let Some(stored) = self.stored_key(&req.key)
            && let Some(existing) = self.by_key.get(&stored)
        {
            if existing.host_veth == req.host_veth
                && existing.netns == req.netns
                && existing.pod == req.pod
            {
                return Ok((existing.clone(), None));
            }
            let mut updated = existing.clone();
            updated.host_veth = req.host_veth.clone();
            updated.netns = req.netns.clone();
            updated.pod = req.pod.clone();
            self.by_key.insert(stored, updated.clone());
            return Ok((updated.clone(), Some(Change::Put(updated))));
        }
        let ips = if !choice.ips.is_empty() {
            self.take_static(&req.key, &choice.ips, &choice.ips_from)?
        } else if !req.ips.is_empty() {
            self.take_static(&req.key, &req.ips, "CNI_ARGS IP")?
        } else {
            self.take_from_pools(&req.key, choice)?
        };
        let alloc = Allocation {
            key: req.key.clone(),
            ips,
            host_veth: req.host_veth.clone(),
            netns: req.netns.clone(),
            pod: req.pod.clone(),
            allocated_unix_ms: starling_cni_proto::unix_ms(SystemTime::now()),
        };
        self.by_key.insert(req.key.clone(), alloc.clone());
        Ok((alloc.clone(), Some(Change::Put(alloc))))
    }

    /// One address per family, from the pools the choice names or else
    /// the blocks the node holds and the pools that select it.
    fn take_from_pools(
        &mut self,
        key: &AttachmentKey,
        choice: &Choice,
    ) -> Result<Vec<IpNet>, IpamError> {
        let families = self.families(choice);
        if families.is_empty() {
            return Err(IpamError::Exhausted(format!(
                "node {} holds no block and no enabled pool selects it",
                self.node
            )));
        }
        let mut plan = Vec::new();
        for v4 in families {
            let only = match choice.pools(v4) {
                Some(list) => Some(self.resolve(v4, list)?),
                None => None,
            };
            plan.push((v4, only));
        }
        let mut ips = Vec::new();
        for (v4, only) in plan {
            match self.allocate(v4, key, only) {
                Ok(ip) => ips.push(IpNet::from(ip)),
                Err(e) => {
                    for ip in &ips {
                        self.used.remove(&ip.addr());
                        self.return_loan(key, ip.addr());
                    }
                    return Err(e);
                }
            }
        }
        Ok(ips)
    }

    /// Exactly the static addresses asked for, each checked: not
    /// reserved, not in use, in a block this node holds or in an enabled
    /// pool whose block for it nobody else holds.
    fn take_static(
        &mut self,
        key: &AttachmentKey,
        ips: &[IpAddr],
        from: &str,
    ) -> Result<Vec<IpNet>, IpamError> {
        choice::check_static(ips, from)?;
        for ip in ips {
            self.check_static_ip(*ip, from)?;
        }
        for ip in ips {
            self.used.insert(*ip, key.clone());
        }
        Ok(ips.iter().map(|ip| IpNet::from(*ip)).collect())
    }

    fn check_static_ip(&self, ip: IpAddr, from: &str) -> Result<(), IpamError> {
        if let Some(r) = self.reserved.iter().find(|r| r.contains(&ip)) {
            return Err(IpamError::AddressNotAllowed(format!(
                "{from}: {ip} is reserved (IPReservation {r})"
            )));
        }
        if let Some(holder) = self.used.get(&ip) {
            let pod = self
                .by_key
                .get(holder)
                .and_then(|a| a.pod.as_ref())
                .map(|p| format!(" (pod {p})"))
                .unwrap_or_default();
            return Err(IpamError::AddressInUse(format!(
                "{from}: {ip} is in use by {holder}{pod}"
            )));
        }
        if self.blocks.iter().any(|b| b.contains(&ip)) {
            return Ok(());
        }
        let Some(pool) = self.config.pools.iter().find(|p| p.cidr.contains(&ip)) else {
            return Err(IpamError::AddressNotAllowed(format!(
                "{from}: {ip} is outside every IP pool and every block of node {}",
                self.node
            )));
        };
        if pool.disabled {
            return Err(IpamError::AddressNotAllowed(format!(
                "{from}: {ip} is in pool {}, which is disabled",
                pool.label()
            )));
        }
        if self.blocks.len() >= self.max_blocks() {
            return Err(IpamError::Exhausted(format!(
                "{from}: {ip} needs a new block and node {} holds {} blocks (limit {})",
                self.node,
                self.blocks.len(),
                self.max_blocks()
            )));
        }
        let block = pool.block_of(ip).ok_or_else(|| {
            IpamError::Config(format!("pool {}: no block for {ip}", pool.label()))
        })?;
        Err(IpamError::NeedsBlock {
            v4: ip.is_ipv4(),
            want: Want::Block(block),
        })
    }

    fn allocate(
        &mut self,
        v4: bool,
        key: &AttachmentKey,
        only: Option<Vec<Pool>>,
    ) -> Result<IpAddr, IpamError> {
        if let Some(ip) = self.take_loan(key, v4) {
            return Ok(ip);
        }
        let own: Vec<IpNet> = self
            .blocks
            .iter()
            .copied()
            .filter(|b| b.addr().is_ipv4() == v4)
            // A block with a record hands out addresses only through it.
            .filter(|b| !self.lending.lent.contains(b))
            .filter(|b| {
                only.as_ref()
                    .is_none_or(|ps| ps.iter().any(|p| p.cidr.contains(&b.network())))
            })
            .collect();
        for block in own {
            if let Some(ip) = self.free_in(block) {
                self.used.insert(ip, key.clone());
                return Ok(ip);
            }
        }
        let family = if v4 { "IPv4" } else { "IPv6" };
        let full = self.blocks.len() >= self.max_blocks() || self.pools_full(v4);
        if full && self.lending.shared.is_some() {
            return Err(IpamError::NeedsBlock {
                v4,
                want: Want::Borrow {
                    pools: only.unwrap_or_else(|| self.node_pools(v4)),
                    key: key.clone(),
                },
            });
        }
        if self.blocks.len() >= self.max_blocks() {
            let why = if self.config.strict_affinity {
                "strictAffinity forbids borrowing"
            } else {
                "borrowing from other nodes' blocks needs a datastore that shares allocations (the Kubernetes one); the file datastore keeps them per node"
            };
            return Err(IpamError::Exhausted(format!(
                "node {} holds {} blocks (limit {}), all {family} ones full; {why}",
                self.node,
                self.blocks.len(),
                self.max_blocks()
            )));
        }
        let pools = only.unwrap_or_else(|| self.node_pools(v4));
        Err(IpamError::NeedsBlock {
            v4,
            want: Want::Pools(pools),
        })
    }

    /// What claiming a block of one family needs, to run away from the
    /// thread that serves pods (see [`ClaimPlan::run`]).
    pub fn claim_plan(&self, v4: bool, want: Want, started: Instant) -> ClaimPlan {
        ClaimPlan {
            node: self.node.clone(),
            v4,
            want,
            known: self.blocks.clone(),
            datastore: self.datastore.clone(),
            deadline: started + self.block_claim_timeout(),
            shared: self.lending.shared.clone(),
            reserved: self.reserved.clone(),
            prefer: self.preferred_blocks(),
        }
    }

    /// Take blocks claimed (or found claimed) for this node into use.
    pub fn adopt(&mut self, blocks: &[IpNet]) {
        for b in blocks {
            if !self.blocks.contains(b) {
                self.blocks.push(*b);
            }
        }
    }

    fn free_in(&mut self, block: IpNet) -> Option<IpAddr> {
        let bits = u32::from(block.max_prefix_len() - block.prefix_len());
        let size: u128 = if bits >= 128 {
            u128::MAX
        } else {
            1u128 << bits
        };
        let base = to_u128(block.network());
        let used_here = self.used.len() as u128;
        // Reserved addresses inside the block are skipped like used ones.
        let reserved_here: u128 = self
            .reserved
            .iter()
            .filter(|r| r.contains(&block.network()) || block.contains(&r.network()))
            .map(|r| {
                let rb = u32::from(r.max_prefix_len() - r.prefix_len()).min(bits);
                if rb >= 128 { u128::MAX } else { 1u128 << rb }
            })
            .fold(0u128, u128::saturating_add);
        let probes = size.min(used_here.saturating_add(reserved_here).saturating_add(1));
        let start = self.cursors.get(&block).copied().unwrap_or(0) % size;
        for i in 0..probes {
            let off = start.wrapping_add(i) % size;
            let ip = from_u128(base + off, block.addr().is_ipv4());
            if !self.used.contains_key(&ip) && !self.reserved.iter().any(|r| r.contains(&ip)) {
                self.cursors.insert(block, (off + 1) % size);
                return Some(ip);
            }
        }
        None
    }

    /// Replace the reserved CIDRs (the IPReservations of the model).
    /// Addresses already handed out stay with their pods.
    pub fn set_reserved(&mut self, reserved: Vec<IpNet>) {
        self.reserved = reserved;
    }

    /// Replace the pools and this node's labels (a model change): blocks
    /// already held stay, and no running pod's address moves; the next
    /// ADD and block claim follow the new pools and node selectors.
    pub fn set_pools(&mut self, pools: Vec<Pool>, labels: BTreeMap<String, String>) {
        self.config.pools = pools;
        self.labels = labels;
    }

    /// Release the attachment's addresses; unknown attachments release nothing.
    pub fn del(&mut self, key: &AttachmentKey) -> (Option<Allocation>, Option<Change>) {
        match self.stored_key(key).and_then(|k| self.by_key.remove(&k)) {
            Some(alloc) => {
                for ip in &alloc.ips {
                    self.used.remove(&ip.addr());
                }
                self.unmark_after_commit(&alloc);
                let stored = alloc.key.clone();
                (Some(alloc), Some(Change::Remove(stored)))
            }
            None => (None, None),
        }
    }

    pub fn get(&self, key: &AttachmentKey) -> Option<&Allocation> {
        self.stored_key(key).and_then(|k| self.by_key.get(&k))
    }

    /// Allocations of `network` whose attachment is not in `valid` and that
    /// are older than the grace period at `now`: what GC releases, and the
    /// leak report. Other networks' allocations, and those stored before
    /// keys named their network (which GC cannot attribute), are never in it;
    /// DEL still releases the latter.
    pub fn leaks(
        &self,
        network: &str,
        valid: &[AttachmentKey],
        now: SystemTime,
    ) -> Result<Vec<Allocation>, IpamError> {
        if network.is_empty() {
            return Err(IpamError::Invalid(
                "GC names no network; refusing to release anything".into(),
            ));
        }
        let valid: HashSet<&AttachmentKey> = valid.iter().collect();
        let young_since = starling_cni_proto::unix_ms(now)
            .saturating_sub(self.gc_grace_period().as_millis() as u64);
        let mut out: Vec<Allocation> = self
            .by_key
            .values()
            .filter(|a| {
                a.key.network == network
                    && !valid.contains(&a.key)
                    && a.allocated_unix_ms <= young_since
            })
            .cloned()
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    pub fn gc(
        &mut self,
        network: &str,
        valid: &[AttachmentKey],
        now: SystemTime,
    ) -> Result<(Vec<Allocation>, Vec<Change>), IpamError> {
        let leaks = self.leaks(network, valid, now)?;
        let changes = leaks.iter().filter_map(|a| self.del(&a.key).1).collect();
        Ok((leaks, changes))
    }

    /// The host routes every local pod needs, for the FIB reconciler.
    pub fn pod_routes(&self) -> Vec<PodRoute> {
        let mut out: Vec<PodRoute> = self.by_key.values().flat_map(|a| a.host_routes()).collect();
        out.sort_by_key(|a| a.destination);
        out
    }

    /// The blocks this node holds, to export to BGP peers.
    /// Every allocation, ordered by attachment.
    pub fn allocations(&self) -> Vec<Allocation> {
        let mut out: Vec<Allocation> = self.by_key.values().cloned().collect();
        out.sort_by_key(|a| a.key.to_string());
        out
    }

    pub fn blocks(&self) -> &[IpNet] {
        &self.blocks
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn status(&self) -> StatusReply {
        let families = self.families(&Choice::default());
        StatusReply {
            ready: !families.is_empty(),
            reason: if families.is_empty() {
                format!(
                    "node {} holds no block and no enabled pool selects it",
                    self.node
                )
            } else {
                String::new()
            },
            node: self.node.clone(),
            blocks: self.blocks.clone(),
            allocated: self.by_key.len(),
        }
    }
}

/// A block claim for one family, detached from [`Ipam`] so it can run on a
/// thread of its own while the IPAM thread goes on serving pods from the
/// blocks it holds.
pub struct ClaimPlan {
    node: String,
    pub v4: bool,
    /// Which block: the first free one of pools, or an exact one.
    want: Want,
    /// Blocks the node knew it held when the plan was made.
    known: Vec<IpNet>,
    datastore: Arc<dyn Datastore>,
    /// No new datastore call starts after this.
    deadline: Instant,
    /// The shared block records, for a borrow.
    shared: Option<Arc<dyn borrow::SharedBlocks>>,
    /// Reserved CIDRs, which a borrow skips.
    reserved: Vec<IpNet>,
    /// Blocks a borrow tries first: those the node holds marks in or
    /// lends.
    prefer: Vec<IpNet>,
}

impl ClaimPlan {
    /// Claim the first block, in pool order, that nobody holds. Returns the
    /// blocks to adopt: the new one, and any held by this node that it did
    /// not know of (a claim that timed out on our side but succeeded on the
    /// server, found by the next read instead of being orphaned).
    pub fn run(&self) -> Result<Vec<IpNet>, IpamError> {
        let pools = match &self.want {
            Want::Block(block) => return self.run_block(*block),
            Want::Borrow { pools, key } => return self.run_borrow(pools, key),
            Want::Pools(pools) => pools,
        };
        let family = self.family();
        let mut last_error = None;
        // Each round reads every claim once; a round in which another node
        // won a race for a candidate, or a claim failed without an answer,
        // is repeated with a fresh read, so a lost race never reads as an
        // exhausted pool and a lost answer never orphans a claim.
        for _round in 0..MAX_CLAIM_ROUNDS {
            self.in_time(family, &last_error)?;
            let all = self.datastore.affinities()?;
            let ours = self.unknown_own(&all);
            if ours.iter().any(|b| b.addr().is_ipv4() == self.v4) {
                return Ok(ours);
            }
            let held: Vec<IpNet> = all.into_iter().map(|a| a.block).collect();
            let mut again = false;
            'pools: for pool in pools {
                // Within `held.len() + 1` candidates one is free, unless the
                // pool is smaller than that.
                for block in pool.blocks().take(held.len() + 1) {
                    if held
                        .iter()
                        .any(|h| h.contains(&block.network()) || block.contains(&h.network()))
                    {
                        continue;
                    }
                    self.in_time(family, &last_error)?;
                    match self.datastore.claim(block, &self.node) {
                        Ok(a) => {
                            let mut got = ours;
                            got.push(a.block);
                            return Ok(got);
                        }
                        // Another node won the race for it: try the next one.
                        Err(DatastoreError::Conflict { .. }) => again = true,
                        // No answer, or an error: the claim may have been
                        // made all the same. Read again before anything else.
                        Err(e) => {
                            tracing::warn!(node = %self.node, %block, error = %e, "block claim failed; re-reading the claims");
                            last_error = Some(e);
                            again = true;
                            break 'pools;
                        }
                    }
                }
            }
            if !again {
                break;
            }
        }
        if let Some(e) = last_error {
            return Err(e.into());
        }
        Err(IpamError::Exhausted(format!(
            "no free {family} block for node {} in pools [{}]",
            self.node,
            pools.iter().map(Pool::label).collect::<Vec<_>>().join(", ")
        )))
    }

    /// Claim exactly `block` (a static address lies in it), or adopt it
    /// if this node holds it already. Held by another node: refused, since
    /// this node would not know which of its addresses that node uses.
    fn run_block(&self, block: IpNet) -> Result<Vec<IpNet>, IpamError> {
        let family = self.family();
        let mut last_error = None;
        for _round in 0..MAX_CLAIM_ROUNDS {
            self.in_time(family, &last_error)?;
            let all = self.datastore.affinities()?;
            let ours = self.unknown_own(&all);
            if ours.contains(&block) {
                return Ok(ours);
            }
            if let Some(other) = all
                .iter()
                .find(|a| a.block.contains(&block.network()) || block.contains(&a.block.network()))
            {
                return Err(IpamError::AddressNotAllowed(format!(
                    "the static address lies in block {} held by node {}: only that node may hand it out",
                    other.block, other.node
                )));
            }
            match self.datastore.claim(block, &self.node) {
                Ok(a) => {
                    let mut got = ours;
                    got.push(a.block);
                    return Ok(got);
                }
                // Raced: the next read says by whom.
                Err(DatastoreError::Conflict { .. }) => {}
                Err(e) => {
                    tracing::warn!(node = %self.node, %block, error = %e, "block claim failed; re-reading the claims");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.map_or_else(
            || {
                IpamError::Exhausted(format!(
                    "could not claim block {block} for node {}",
                    self.node
                ))
            },
            IpamError::from,
        ))
    }

    fn family(&self) -> &'static str {
        if self.v4 { "IPv4" } else { "IPv6" }
    }

    /// Blocks this node holds that it did not know of (a claim that timed
    /// out on our side but succeeded on the server).
    fn unknown_own(&self, all: &[Affinity]) -> Vec<IpNet> {
        all.iter()
            .filter(|a| a.node == self.node && !self.known.contains(&a.block))
            .map(|a| a.block)
            .collect()
    }

    fn in_time(&self, family: &str, last: &Option<DatastoreError>) -> Result<(), IpamError> {
        if Instant::now() < self.deadline {
            return Ok(());
        }
        Err(IpamError::ClaimTimeout(format!(
            "claiming an {family} block for node {} did not finish in time{}",
            self.node,
            last.as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        )))
    }
}

fn validate_key(key: &AttachmentKey) -> Result<(), IpamError> {
    // CNI spec, network configuration `name`.
    let network_ok = key
        .network
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && key
            .network
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !network_ok {
        return Err(IpamError::Invalid(format!(
            "network name `{}` is empty or not of the form [a-zA-Z0-9][a-zA-Z0-9_.-]*",
            key.network
        )));
    }
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 255
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    };
    if !ok(&key.container_id) {
        return Err(IpamError::Invalid(format!(
            "container id `{}` is empty or has characters outside [A-Za-z0-9_.-]",
            key.container_id
        )));
    }
    if key.ifname.is_empty()
        || key.ifname.len() > 15
        || key.ifname.contains(['/', ':'])
        || key.ifname.chars().any(char::is_whitespace)
    {
        return Err(IpamError::Invalid(format!(
            "interface name `{}` is not a valid Linux interface name",
            key.ifname
        )));
    }
    Ok(())
}

pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

pub(crate) fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(std::net::Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(std::net::Ipv6Addr::from(v))
    }
}

#[cfg(test)]
mod lending_tests;
#[cfg(test)]
mod returning_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory datastore: a unit-test stand-in for the file one. Its
    /// clones share one set of claims (the borrowing tests give two nodes
    /// the same datastore).
    #[derive(Default, Clone)]
    pub(super) struct MemDatastore(Arc<Mutex<Vec<Affinity>>>);

    impl Datastore for MemDatastore {
        fn affinities(&self) -> Result<Vec<Affinity>, DatastoreError> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn claim(&self, block: IpNet, node: &str) -> Result<Affinity, DatastoreError> {
            let mut v = self.0.lock().unwrap();
            if let Some(h) = v.iter().find(|a| a.block == block) {
                if h.node == node {
                    return Ok(h.clone());
                }
                return Err(DatastoreError::Conflict {
                    block,
                    holder: h.node.clone(),
                });
            }
            let a = Affinity {
                block,
                node: node.into(),
                revision: Revision("1".into()),
            };
            v.push(a.clone());
            Ok(a)
        }
        fn release(&self, a: &Affinity) -> Result<(), DatastoreError> {
            self.0.lock().unwrap().retain(|x| x.block != a.block);
            Ok(())
        }
    }

    fn req(c: &str) -> AddRequest {
        AddRequest {
            key: AttachmentKey {
                network: "pods".into(),
                container_id: c.into(),
                ifname: "eth0".into(),
            },
            netns: "/run/netns/x".into(),
            host_veth: starling_cni_proto::host_veth_name(c, "eth0"),
            pod: None,
            ips: vec![],
        }
    }

    fn pools_ipam() -> Ipam {
        ipam(IpamConfig {
            pools: vec![
                serde_json::from_str(r#"{"name":"default","cidr":"10.1.0.0/24","blockSize":28}"#)
                    .unwrap(),
                serde_json::from_str(
                    r#"{"name":"gold","cidr":"10.2.0.0/24","blockSize":28,"nodeSelector":"tier == 'gold'"}"#,
                )
                .unwrap(),
                serde_json::from_str(
                    r#"{"name":"off","cidr":"10.3.0.0/24","blockSize":28,"disabled":true}"#,
                )
                .unwrap(),
                serde_json::from_str(r#"{"name":"v6","cidr":"fd00::/120","blockSize":124}"#)
                    .unwrap(),
            ],
            ..Default::default()
        })
    }

    fn pools(v4: bool, list: &[&str]) -> Choice {
        let l = choice::PoolList {
            pools: list.iter().map(|s| s.to_string()).collect(),
            from: "pod ns/p annotation starling.dev/ipv4pools".into(),
        };
        if v4 {
            Choice {
                v4_pools: Some(l),
                ..Default::default()
            }
        } else {
            Choice {
                v6_pools: Some(l),
                ..Default::default()
            }
        }
    }

    fn pinned(ips: &[&str]) -> Choice {
        Choice {
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ips_from: "pod ns/p annotation starling.dev/ipAddrs".into(),
            ..Default::default()
        }
    }

    #[test]
    fn annotated_pools_are_used_even_without_node_selection() {
        let mut ipam = pools_ipam();
        // The default: the pools that select the node, both families.
        let (a, _) = ipam.add(&req("c1")).unwrap();
        assert!(a.ips[0].to_string().starts_with("10.1.0."), "{a:?}");
        assert!(a.ips[1].addr().is_ipv6());
        // By name: gold selects no node here, and is used all the same.
        let (b, _) = ipam.add_with(&req("c2"), &pools(true, &["gold"])).unwrap();
        assert!(b.ips[0].to_string().starts_with("10.2.0."), "{b:?}");
        assert!(b.ips[1].addr().is_ipv6(), "IPv6 still from the default");
        // By CIDR.
        let (c, _) = ipam
            .add_with(&req("c3"), &pools(true, &["10.2.0.0/24"]))
            .unwrap();
        assert!(c.ips[0].to_string().starts_with("10.2.0."), "{c:?}");
        // The gold block is not used for a pod without the annotation.
        let (d, _) = ipam.add(&req("c4")).unwrap();
        assert!(d.ips[0].to_string().starts_with("10.1.0."), "{d:?}");
    }

    #[test]
    fn bad_pool_annotations_are_refused_by_name() {
        let mut ipam = pools_ipam();
        for (choice, want) in [
            (
                pools(true, &["nope"]),
                "no IP pool named or with CIDR `nope`",
            ),
            (pools(true, &["off"]), "disabled"),
            (pools(true, &["v6"]), "not an IPv4 pool"),
            (pools(false, &["default"]), "not an IPv6 pool"),
        ] {
            let err = ipam.add_with(&req("c1"), &choice).unwrap_err();
            assert!(matches!(err, IpamError::BadAnnotation(_)), "{err:?}");
            assert!(err.to_string().contains(want), "{err}");
        }
        assert!(ipam.get(&req("c1").key).is_none(), "nothing allocated");
    }

    #[test]
    fn static_addresses_are_checked_and_claim_their_block() {
        let mut ipam = pools_ipam();
        let (a, _) = ipam.add_with(&req("c1"), &pinned(&["10.2.0.77"])).unwrap();
        assert_eq!(a.ips, vec!["10.2.0.77/32".parse::<IpNet>().unwrap()]);
        assert!(ipam.blocks().contains(&"10.2.0.64/28".parse().unwrap()));
        // Taken: refused, naming the holder.
        let err = ipam
            .add_with(&req("c2"), &pinned(&["10.2.0.77"]))
            .unwrap_err();
        assert!(matches!(err, IpamError::AddressInUse(_)), "{err:?}");
        assert!(err.to_string().contains("c1"), "{err}");
        // Outside every pool, or in a disabled one: refused.
        let err = ipam
            .add_with(&req("c2"), &pinned(&["192.0.2.1"]))
            .unwrap_err();
        assert!(matches!(err, IpamError::AddressNotAllowed(_)), "{err:?}");
        assert!(err.to_string().contains("outside every IP pool"), "{err}");
        let err = ipam
            .add_with(&req("c2"), &pinned(&["10.3.0.1"]))
            .unwrap_err();
        assert!(err.to_string().contains("disabled"), "{err}");
        // Two of one family: refused.
        let err = ipam
            .add_with(&req("c2"), &pinned(&["10.1.0.1", "10.1.0.2"]))
            .unwrap_err();
        assert!(matches!(err, IpamError::BadAnnotation(_)), "{err:?}");
        // CNI_ARGS IP= when no annotation pins one.
        let mut r = req("c3");
        r.ips = vec!["10.1.0.9".parse().unwrap()];
        let (c, _) = ipam.add(&r).unwrap();
        assert_eq!(c.ips, vec!["10.1.0.9/32".parse::<IpNet>().unwrap()]);
        // Released, it can be pinned again.
        ipam.del(&req("c1").key);
        assert!(ipam.add_with(&req("c4"), &pinned(&["10.2.0.77"])).is_ok());
    }

    #[test]
    fn a_static_address_in_another_nodes_block_is_refused() {
        let mut ipam = pools_ipam();
        ipam.datastore
            .claim("10.1.0.16/28".parse().unwrap(), "n2")
            .unwrap();
        let err = ipam
            .add_with(&req("c1"), &pinned(&["10.1.0.20"]))
            .unwrap_err();
        assert!(matches!(err, IpamError::AddressNotAllowed(_)), "{err:?}");
        assert!(err.to_string().contains("held by node n2"), "{err}");
        assert!(ipam.get(&req("c1").key).is_none());
    }

    #[test]
    fn reserved_addresses_are_never_handed_out() {
        let mut ipam = ipam(IpamConfig {
            pod_cidrs: vec!["10.0.0.0/29".parse().unwrap()],
            ..Default::default()
        });
        ipam.set_reserved(vec![
            "10.0.0.0/30".parse().unwrap(),
            "10.0.0.5/32".parse().unwrap(),
        ]);
        let mut got = Vec::new();
        for i in 0..3 {
            let (a, _) = ipam.add(&req(&format!("c{i}"))).unwrap();
            got.push(a.ips[0].addr().to_string());
        }
        got.sort();
        assert_eq!(got, ["10.0.0.4", "10.0.0.6", "10.0.0.7"]);
        let err = ipam.add(&req("c9")).unwrap_err();
        assert!(matches!(err, IpamError::Exhausted(_)), "{err:?}");
        let err = ipam
            .add_with(&req("c9"), &pinned(&["10.0.0.2"]))
            .unwrap_err();
        assert!(matches!(err, IpamError::AddressNotAllowed(_)), "{err:?}");
        assert!(err.to_string().contains("reserved"), "{err}");
    }

    #[test]
    fn pool_changes_apply_to_new_pods_and_move_no_running_one() {
        let mut ipam = pools_ipam();
        let (a, _) = ipam.add(&req("c1")).unwrap();
        // The node gets the gold label, and the default pool is disabled.
        let mut pools = ipam.config.pools.clone();
        pools[0].disabled = true;
        let labels: BTreeMap<String, String> = [("tier".to_string(), "gold".to_string())].into();
        ipam.set_pools(pools, labels);
        // The running pod keeps its address; a retried ADD returns it.
        let (again, change) = ipam.add(&req("c1")).unwrap();
        assert_eq!(again.ips, a.ips);
        assert!(change.is_none());
        // The block held in the disabled pool still serves new pods (as
        // Calico: disabling stops new blocks, not allocation from held
        // ones) until it is full; new blocks come from gold.
        for i in 2..40 {
            let (b, _) = ipam.add(&req(&format!("c{i}"))).unwrap();
            let ip = b.ips[0].addr();
            let held: IpNet = "10.1.0.0/28".parse().unwrap();
            let gold: IpNet = "10.2.0.0/24".parse().unwrap();
            assert!(gold.contains(&ip) || held.contains(&ip), "{ip}");
        }
        assert!(
            !ipam
                .blocks()
                .iter()
                .any(|b| b.to_string() == "10.1.0.16/28"),
            "no new block from the disabled pool: {:?}",
            ipam.blocks()
        );
        assert!(
            ipam.blocks()
                .iter()
                .any(|b| b.to_string().starts_with("10.2.0."))
        );
    }

    fn ipam(config: IpamConfig) -> Ipam {
        Ipam::new(
            "n1",
            BTreeMap::new(),
            config,
            Box::<MemDatastore>::default(),
            vec![],
        )
        .unwrap()
    }

    #[test]
    fn dual_stack_from_pod_cidrs_and_idempotent_add() {
        let mut ipam = ipam(IpamConfig {
            pod_cidrs: vec![
                "10.0.0.0/30".parse().unwrap(),
                "fd00::/126".parse().unwrap(),
            ],
            ..Default::default()
        });
        let (a, change) = ipam.add(&req("c1")).unwrap();
        assert!(change.is_some());
        assert_eq!(a.ips.len(), 2);
        assert_eq!(a.ips[0].to_string(), "10.0.0.0/32");
        assert_eq!(a.ips[1].to_string(), "fd00::/128");
        let (again, change) = ipam.add(&req("c1")).unwrap();
        assert_eq!(again, a);
        assert!(change.is_none(), "a retried ADD writes nothing");
    }

    #[test]
    fn exhaustion_is_an_error_naming_the_node_and_nothing_leaks() {
        let mut ipam = ipam(IpamConfig {
            pod_cidrs: vec![
                "10.0.0.0/31".parse().unwrap(),
                "fd00::/127".parse().unwrap(),
            ],
            max_blocks_per_node: Some(2),
            ..Default::default()
        });
        ipam.add(&req("c1")).unwrap();
        ipam.add(&req("c2")).unwrap();
        let err = ipam.add(&req("c3")).unwrap_err().to_string();
        assert!(err.contains("n1") && err.contains("limit 2"), "{err}");
        // Releasing one makes room again, and the freed address is reused.
        let (released, _) = ipam.del(&req("c1").key);
        let freed = released.unwrap().ips;
        let (a, _) = ipam.add(&req("c3")).unwrap();
        assert_eq!(a.ips, freed);
    }

    #[test]
    fn claims_pool_blocks_up_to_the_limit() {
        let mut ipam = ipam(IpamConfig {
            pools: vec![serde_json::from_str(r#"{"cidr":"10.1.0.0/24","blockSize":30}"#).unwrap()],
            max_blocks_per_node: Some(2),
            strict_affinity: true,
            ..Default::default()
        });
        let mut seen = HashSet::new();
        for i in 0..8 {
            let (a, _) = ipam.add(&req(&format!("c{i}"))).unwrap();
            assert!(seen.insert(a.ips[0]), "duplicate {}", a.ips[0]);
        }
        assert_eq!(ipam.blocks().len(), 2);
        let err = ipam.add(&req("c9")).unwrap_err().to_string();
        assert!(err.contains("strictAffinity"), "{err}");
    }

    #[test]
    fn released_addresses_are_not_reused_at_once() {
        let mut ipam = ipam(IpamConfig {
            pod_cidrs: vec!["10.0.0.0/29".parse().unwrap()],
            ..Default::default()
        });
        let (a, _) = ipam.add(&req("c1")).unwrap();
        ipam.del(&a.key);
        let (b, _) = ipam.add(&req("c2")).unwrap();
        assert_ne!(a.ips, b.ips);
    }

    /// A minute and a bit from now: past the default grace period.
    fn later() -> SystemTime {
        SystemTime::now() + DEFAULT_GC_GRACE_PERIOD + Duration::from_secs(1)
    }

    #[test]
    fn gc_releases_what_is_not_valid() {
        let mut ipam = ipam(IpamConfig {
            pod_cidrs: vec!["10.0.0.0/28".parse().unwrap()],
            ..Default::default()
        });
        for c in ["a", "b", "c"] {
            ipam.add(&req(c)).unwrap();
        }
        let valid = vec![req("b").key];
        let report: Vec<String> = ipam
            .leaks("pods", &valid, later())
            .unwrap()
            .iter()
            .map(|a| a.key.container_id.clone())
            .collect();
        assert_eq!(report, ["a", "c"]);
        let (released, changes) = ipam.gc("pods", &valid, later()).unwrap();
        assert_eq!(released.len(), 2);
        assert_eq!(changes.len(), 2);
        assert!(ipam.get(&req("b").key).is_some());
        assert!(ipam.leaks("pods", &valid, later()).unwrap().is_empty());
    }

    #[test]
    fn gc_keeps_young_allocations_other_networks_and_legacy_records() {
        let mut ipam = ipam(IpamConfig {
            pod_cidrs: vec!["10.0.0.0/28".parse().unwrap()],
            ..Default::default()
        });
        ipam.add(&req("a")).unwrap();
        let mut other = req("a");
        other.key.network = "net-b".into();
        other.key.ifname = "net1".into();
        ipam.add(&other).unwrap();
        // Just allocated: inside the grace period.
        let (released, _) = ipam.gc("pods", &[], SystemTime::now()).unwrap();
        assert!(released.is_empty(), "{released:?}");
        // Later, GC of `pods` takes only its own.
        let (released, _) = ipam.gc("pods", &[], later()).unwrap();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].key, req("a").key);
        assert!(ipam.get(&other.key).is_some());
        // No network named: refused, nothing released.
        assert!(matches!(
            ipam.gc("", &[], later()),
            Err(IpamError::Invalid(_))
        ));
        assert!(ipam.get(&other.key).is_some());
        // A record stored before keys named their network is found by DEL
        // of any network, and never collected by GC.
        let legacy = Allocation {
            key: AttachmentKey {
                network: String::new(),
                container_id: "old".into(),
                ifname: "eth0".into(),
            },
            ips: vec!["10.0.0.9/32".parse().unwrap()],
            host_veth: "stlold".into(),
            netns: "/run/netns/old".into(),
            pod: None,
            allocated_unix_ms: 0,
        };
        ipam.reset(vec![legacy.clone()]).unwrap();
        assert!(ipam.gc("pods", &[], later()).unwrap().0.is_empty());
        let (gone, change) = ipam.del(&req("old").key);
        assert_eq!(gone, Some(legacy.clone()));
        assert!(matches!(change, Some(Change::Remove(k)) if k == legacy.key));
    }

    /// A datastore whose first claim is made on the server but whose answer
    /// is lost (a timeout on our side).
    #[derive(Default)]
    struct LostAnswer {
        inner: MemDatastore,
        lost: Mutex<bool>,
    }

    impl Datastore for LostAnswer {
        fn affinities(&self) -> Result<Vec<Affinity>, DatastoreError> {
            self.inner.affinities()
        }
        fn claim(&self, block: IpNet, node: &str) -> Result<Affinity, DatastoreError> {
            let made = self.inner.claim(block, node)?;
            let mut lost = self.lost.lock().unwrap();
            if !*lost {
                *lost = true;
                return Err(DatastoreError::Io {
                    path: "blockaffinities.starling.dev/x".into(),
                    source: std::io::Error::other("no answer within 30s"),
                });
            }
            Ok(made)
        }
        fn release(&self, a: &Affinity) -> Result<(), DatastoreError> {
            self.inner.release(a)
        }
    }

    #[test]
    fn a_claim_that_timed_out_here_but_succeeded_on_the_server_is_adopted() {
        let ds = std::sync::Arc::new(LostAnswer::default());
        struct Shared(std::sync::Arc<LostAnswer>);
        impl Datastore for Shared {
            fn affinities(&self) -> Result<Vec<Affinity>, DatastoreError> {
                self.0.affinities()
            }
            fn claim(&self, block: IpNet, node: &str) -> Result<Affinity, DatastoreError> {
                self.0.claim(block, node)
            }
            fn release(&self, a: &Affinity) -> Result<(), DatastoreError> {
                self.0.release(a)
            }
        }
        let mut ipam = Ipam::new(
            "n1",
            BTreeMap::new(),
            IpamConfig {
                pools: vec![
                    serde_json::from_str(r#"{"cidr":"10.1.0.0/24","blockSize":28}"#).unwrap(),
                ],
                ..Default::default()
            },
            Box::new(Shared(ds.clone())),
            vec![],
        )
        .unwrap();
        let (a, _) = ipam
            .add(&req("c1"))
            .expect("the lost claim is found and used");
        let claims: Vec<IpNet> = ds
            .affinities()
            .unwrap()
            .into_iter()
            .map(|a| a.block)
            .collect();
        assert_eq!(
            claims,
            vec!["10.1.0.0/28".parse::<IpNet>().unwrap()],
            "one claim, none orphaned"
        );
        assert_eq!(ipam.blocks(), claims.as_slice());
        assert!(claims[0].contains(&a.ips[0].addr()));
    }

    #[test]
    fn bad_keys_are_refused() {
        let mut ipam = ipam(IpamConfig {
            pod_cidrs: vec!["10.0.0.0/28".parse().unwrap()],
            ..Default::default()
        });
        let mut r = req("c1");
        r.key.container_id = "a/b".into();
        assert!(matches!(ipam.add(&r), Err(IpamError::Invalid(_))));
    }
}
