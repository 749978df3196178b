//! Peering: the speaker's peers brought to the plan the model implies, and
//! make-before-break for the sessions a new plan drops (draining).

use crate::model::Snapshot;
use crate::model::plan;
use ipnet::IpNet;
use starling_bgp::policy::{PolicyRule, Verdict};
use starling_bgp::{PeerConfig, Speaker};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// Connect retry time (seconds) of sessions the plan makes.
const NODE_CONNECT_RETRY: u16 = 2;

/// How long a covered draining session is kept before it is closed.
const DRAIN_HOLD: Duration = Duration::from_secs(1);

/// The peers this node has configured on its speaker, and the sessions
/// being drained.
pub(super) struct Peering {
    speaker: Speaker,
    applied: BTreeMap<IpAddr, PeerConfig>,
    /// Sessions the plan dropped, since when: kept until their routes have
    /// another path (or the drain time passes): make-before-break.
    draining: BTreeMap<IpAddr, Instant>,
    /// The longest a session drains (`drainSeconds`).
    drain: Duration,
    /// `meshWarnNodes`.
    mesh_warn_nodes: usize,
}

impl Peering {
    pub(super) fn new(speaker: Speaker, drain: Duration, mesh_warn_nodes: usize) -> Peering {
        Peering {
            speaker,
            applied: BTreeMap::new(),
            draining: BTreeMap::new(),
            drain,
            mesh_warn_nodes,
        }
    }

    /// Sessions kept until their routes are learned another way.
    pub(super) fn draining(&self) -> Vec<IpAddr> {
        self.draining.keys().copied().collect()
    }

    pub(super) fn is_draining(&self) -> bool {
        !self.draining.is_empty()
    }

    /// Bring the speaker's peers to the plan for `node` in `snap`: new and
    /// changed sessions at once; dropped sessions to nodes still in the
    /// model only once their routes are learned another way (mesh ->
    /// reflectors loses nothing). `blocks` are this node's, which eBGP
    /// peers are sent. Returns what the plan could not do.
    pub(super) async fn apply(
        &mut self,
        snap: &Snapshot,
        node: &str,
        asn: u32,
        blocks: &[IpNet],
    ) -> Vec<String> {
        let mut p = plan::plan_detailed(snap, node);
        p.warnings
            .extend(plan::mesh_advice(snap, self.mesh_warn_nodes));
        for w in &p.warnings {
            warn!("peering plan: {w}");
        }
        let want: BTreeMap<IpAddr, PeerConfig> = p
            .peers
            .into_iter()
            .map(|mut pc| {
                // Peers on the same link: a refused connection (the other
                // agent is starting) is retried within 2 s, not BGP's usual
                // tens of seconds, so a joining node converges quickly.
                if pc.connect_retry.is_none() {
                    pc.connect_retry = Some(NODE_CONNECT_RETRY);
                }
                (pc.address, ebgp_defaults(pc, asn, blocks))
            })
            .collect();
        for (addr, pc) in &want {
            self.draining.remove(addr);
            if self.applied.get(addr) == Some(pc) {
                continue;
            }
            info!(peer = %addr, what = pc.description.as_deref().unwrap_or(""), "configuring peer");
            match self.speaker.add_peer(pc.clone()).await {
                Ok(()) => {
                    self.applied.insert(*addr, pc.clone());
                }
                Err(e) => warn!(peer = %addr, "cannot configure the peer: {e}"),
            }
        }
        let node_addresses = other_node_addresses(snap, node);
        let gone: Vec<IpAddr> = self
            .applied
            .keys()
            .filter(|a| !want.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if node_addresses.contains(&addr) && !want.is_empty() {
                if let std::collections::btree_map::Entry::Vacant(e) = self.draining.entry(addr) {
                    info!(peer = %addr, "session no longer planned; keeping it until its routes are learned another way");
                    e.insert(Instant::now());
                }
            } else {
                self.remove(addr).await;
            }
        }
        p.warnings
    }

    async fn remove(&mut self, addr: IpAddr) {
        info!(peer = %addr, "removing peer");
        if let Err(e) = self.speaker.remove_peer(addr).await {
            warn!(peer = %addr, "cannot remove the peer: {e}");
        }
        self.applied.remove(&addr);
        self.draining.remove(&addr);
    }

    /// Drop draining sessions whose every prefix has a path through a peer
    /// that stays.
    pub(super) async fn drain_step(&mut self) {
        let now = Instant::now();
        let Ok(rib) = self.speaker.routes().await else {
            return;
        };
        let draining: BTreeSet<String> = self.draining.keys().map(|a| a.to_string()).collect();
        let mut by_prefix: BTreeMap<IpNet, (bool, bool)> = BTreeMap::new();
        for e in &rib {
            let entry = by_prefix.entry(e.prefix).or_default();
            if draining.contains(&e.peer) {
                entry.0 = true;
            } else if e.peer != "local" {
                entry.1 = true;
            }
        }
        let mut done = Vec::new();
        for (addr, since) in &self.draining {
            let a = addr.to_string();
            let covered = rib
                .iter()
                .filter(|e| e.peer == a)
                .all(|e| by_prefix.get(&e.prefix).is_some_and(|(_, other)| *other));
            // The far side checks the same from its end; a short hold-down
            // after ours is covered gives it time to learn our prefixes the
            // new way too (a reflector's batching round is milliseconds).
            if covered && now >= *since + DRAIN_HOLD {
                info!(peer = %addr, "its routes are learned another way now; removing the session");
                done.push(*addr);
            } else if !covered && now >= *since + self.drain {
                warn!(peer = %addr, "routes still only through this session after the drain time; removing it anyway");
                done.push(*addr);
            }
        }
        for addr in done {
            self.remove(addr).await;
        }
    }
}

/// The addresses of every node but `node`: a dropped session to one of
/// them drains; any other dropped session is cut at once.
fn other_node_addresses(snap: &Snapshot, node: &str) -> BTreeSet<IpAddr> {
    snap.nodes
        .iter()
        .filter(|(n, _)| *n != node)
        .flat_map(|(_, n)| {
            n.spec
                .ipv4_address
                .map(|a| IpAddr::V4(a.addr()))
                .into_iter()
                .chain(n.spec.ipv6_address.map(|a| IpAddr::V6(a.addr())))
        })
        .collect()
}

/// A peer's default policy, after the rules of its BGPFilters (if any):
/// eBGP peers, which RFC 8212 leaves exchanging nothing, export this
/// node's own blocks and import everything. Only our own blocks:
/// re-advertising the other nodes' blocks would make the router send their
/// traffic through us. iBGP peers keep the speaker's defaults (everything,
/// within the iBGP rules): without filters no rules at all, with filters an
/// accept-everything rule at the end. Calico's order: the first filter rule
/// that matches decides, else the default.
fn ebgp_defaults(mut pc: PeerConfig, local_asn: u32, blocks: &[IpNet]) -> PeerConfig {
    let accept_all = PolicyRule {
        action: Verdict::Accept,
        ..PolicyRule::default()
    };
    if pc.asn == local_asn {
        for rules in [&mut pc.import, &mut pc.export].into_iter().flatten() {
            rules.push(accept_all.clone());
        }
        return pc;
    }
    pc.import.get_or_insert_with(Vec::new).push(accept_all);
    pc.export
        .get_or_insert_with(Vec::new)
        .extend(blocks.iter().map(|b| PolicyRule {
            prefix: Some(*b),
            action: Verdict::Accept,
            ..PolicyRule::default()
        }));
    pc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebgp_peers_export_only_own_blocks() {
        let block: IpNet = "10.244.1.0/26".parse().expect("literal");
        let pc = ebgp_defaults(
            PeerConfig::new("192.0.2.254".parse().expect("literal"), 65000),
            64512,
            &[block],
        );
        let export = pc.export.expect("an export policy");
        assert_eq!(export.len(), 1);
        assert_eq!(export[0].prefix, Some(block));
        assert!(pc.import.is_some());
        // iBGP is left to the speaker's defaults.
        let ibgp = ebgp_defaults(
            PeerConfig::new("192.0.2.12".parse().expect("literal"), 64512),
            64512,
            &[block],
        );
        assert!(ibgp.export.is_none() && ibgp.import.is_none());
    }

    #[test]
    fn filter_rules_come_before_the_defaults() {
        let block: IpNet = "10.244.1.0/26".parse().expect("literal");
        let reject = PolicyRule {
            prefix: Some("198.51.100.0/24".parse().expect("literal")),
            action: Verdict::Reject,
            ..PolicyRule::default()
        };
        let mut pc = PeerConfig::new("192.0.2.254".parse().expect("literal"), 65000);
        pc.import = Some(vec![reject.clone()]);
        pc.export = Some(vec![reject.clone()]);
        let ebgp = ebgp_defaults(pc.clone(), 64512, &[block]);
        let import = ebgp.import.expect("import");
        assert_eq!(import[0], reject);
        assert_eq!(import[1].prefix, None);
        let export = ebgp.export.expect("export");
        assert_eq!(export[0], reject);
        assert_eq!(export[1].prefix, Some(block));
        // iBGP with filters: the filter, then everything.
        pc.asn = 64512;
        let ibgp = ebgp_defaults(pc, 64512, &[block]);
        let export = ibgp.export.expect("export");
        assert_eq!(export.len(), 2);
        assert_eq!(
            (export[1].prefix, export[1].action),
            (None, Verdict::Accept)
        );
    }
}
