//! Outgoing NAT (Calico's `natOutgoing`): traffic from a pool with
//! `natOutgoing: true` to a destination outside every pool leaves with the
//! node's address (masquerade), IPv4 and IPv6. Traffic between pools, also
//! to a disabled pool's CIDR, keeps the pod's address.
//!
//! Programmed through nftables with the `nftables` crate (the `nft`
//! binary's JSON interface; docs/architecture.md says why), in one table of
//! our own, `inet starling`, and nowhere else:
//!
//! ```text
//! table inet starling {
//!   set pools-v4 { type ipv4_addr; flags interval; elements = { every pool } }
//!   set masq-v4  { type ipv4_addr; flags interval; elements = { natOutgoing pools } }
//!   set pools-v6, masq-v6 likewise
//!   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr @masq-v4 ip daddr != @pools-v4 masquerade
//!     ip6 saddr @masq-v6 ip6 daddr != @pools-v6 masquerade
//!   }
//! }
//! ```
//!
//! Like the FIB reconciler: the desired table is a pure function of the
//! pools ([`desired`]); the task ([`task`]) reads only our table, compares
//! it with the desired one and replaces it in one atomic `nft` transaction
//! when they differ (drift repaired), adopts a table that is already right
//! (no flush on restart: established flows keep their conntrack NAT
//! either way), and deletes it when no pool wants NAT.

mod table;
mod task;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub use table::{Observed, TABLE};
pub use task::{NatReconciler, NatTask};

/// What the table must hold: the CIDRs of every pool and of those with
/// `natOutgoing`, per family, aggregated (nftables refuses overlapping
/// interval elements). No masquerading pool: no table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatRules {
    pub masq_v4: Vec<Ipv4Net>,
    pub pools_v4: Vec<Ipv4Net>,
    pub masq_v6: Vec<Ipv6Net>,
    pub pools_v6: Vec<Ipv6Net>,
}

impl NatRules {
    /// Whether the table should exist at all.
    pub fn wanted(&self) -> bool {
        !self.masq_v4.is_empty() || !self.masq_v6.is_empty()
    }
}

/// One pool as NAT sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatPool {
    pub cidr: IpNet,
    pub nat_outgoing: bool,
}

/// The desired rules from the pools: every pool counts as "inside",
/// disabled ones too (Calico: no NAT towards any pool), and every pool with
/// `natOutgoing` masquerades, disabled ones too (their existing pods keep
/// reaching the world).
pub fn desired(pools: &[NatPool]) -> NatRules {
    let mut r = NatRules::default();
    for p in pools {
        match p.cidr {
            IpNet::V4(n) => {
                r.pools_v4.push(n);
                if p.nat_outgoing {
                    r.masq_v4.push(n);
                }
            }
            IpNet::V6(n) => {
                r.pools_v6.push(n);
                if p.nat_outgoing {
                    r.masq_v6.push(n);
                }
            }
        }
    }
    r.masq_v4 = Ipv4Net::aggregate(&r.masq_v4);
    r.pools_v4 = Ipv4Net::aggregate(&r.pools_v4);
    r.masq_v6 = Ipv6Net::aggregate(&r.masq_v6);
    r.pools_v6 = Ipv6Net::aggregate(&r.pools_v6);
    r
}

/// The NAT reconciler's state, for `starlingctl status` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatStatus {
    /// Generation of the desired rules the last pass applied (0: none yet).
    pub generation: u64,
    /// Our table is in the kernel (natOutgoing is in force).
    pub table_present: bool,
    /// The last pass failed: `nft` missing, refused, unreadable output.
    pub error: Option<String>,
    /// Passes that found the kernel different and rewrote our table
    /// (including the first, when the table was missing).
    pub writes: u64,
    /// Passes that found our table already right.
    pub adopted: u64,
    /// How long the last write took (read, compare, `nft -f`), microseconds.
    pub last_write_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// `nft` could not run or refused: named, with what it said.
    #[error("nftables ({what}): {why}")]
    Nft { what: &'static str, why: String },
    #[error("nftables: our table {TABLE} is unreadable: {0}")]
    Parse(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, nat: bool) -> NatPool {
        NatPool {
            cidr: cidr.parse().unwrap(),
            nat_outgoing: nat,
        }
    }

    #[test]
    fn only_natoutgoing_pools_masquerade_and_every_pool_is_inside() {
        let r = desired(&[
            pool("10.244.0.0/16", true),
            pool("10.96.0.0/16", false),
            pool("fd00:10:244::/56", true),
            pool("fd00:99::/64", false),
        ]);
        assert!(r.wanted());
        assert_eq!(r.masq_v4, vec!["10.244.0.0/16".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(
            r.pools_v4,
            vec![
                "10.96.0.0/16".parse::<Ipv4Net>().unwrap(),
                "10.244.0.0/16".parse().unwrap()
            ]
        );
        assert_eq!(
            r.masq_v6,
            vec!["fd00:10:244::/56".parse::<Ipv6Net>().unwrap()]
        );
        assert_eq!(r.pools_v6.len(), 2);
    }

    #[test]
    fn no_natoutgoing_pool_means_no_table() {
        let r = desired(&[pool("10.244.0.0/16", false)]);
        assert!(!r.wanted());
        assert!(!desired(&[]).wanted());
    }

    #[test]
    fn overlapping_pools_are_aggregated_for_the_interval_sets() {
        let r = desired(&[
            pool("10.244.0.0/16", true),
            pool("10.244.1.0/24", true),
            pool("10.245.0.0/16", true),
        ]);
        assert_eq!(r.masq_v4, vec!["10.244.0.0/15".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(r.pools_v4, r.masq_v4);
    }
}
