//! `starlingctl ipam check`: what is wrong with the addresses and blocks,
//! worked out from what the caller read (this node's allocations, whether
//! each one's pod or container still exists, every block claim, the nodes
//! of the model, the reservations). No I/O here: the agent gathers the
//! inputs (`node::ipam_ops`), this module judges them.
//!
//! What each finding means:
//! - a **leak**: an allocation of this node whose pod is gone (Kubernetes:
//!   the pod is not in the API server, or runs on another node; file
//!   datastore or no pod named: its network namespace is gone);
//! - an **orphan**: a block claimed for a node the model does not have
//!   (the elected agent releases those after a grace period);
//! - a **duplicate**: two claims of overlapping blocks, or an address of
//!   this node inside a block another node holds (both nodes may hand it
//!   out);
//! - a **stray**: an address of this node in no block it holds (its block
//!   was released behind its back: another node may claim it);
//! - a **reserved** overlap: an allocation inside an IPReservation.
//!
//! The borrowing records (`IPAMBlock`) are judged mark by mark in
//! [`marks`]; an allocation of this node marked for it in the record of
//! another node's block is a borrow, not a duplicate.

pub mod marks;

use super::Affinity;
use crate::model::crd::IPAMBlockSpec;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use starling_cni_proto::Allocation;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Whether an allocation's owner still exists, as the caller found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// In use, and by what ("pod default/web exists in the API server").
    InUse(String),
    /// Gone, and why ("pod default/web is not in the API server").
    Gone(String),
    /// Could not be found out (the API server did not answer).
    Unknown(String),
}

/// One finding about an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressFinding {
    pub address: IpAddr,
    /// The attachment (`network/container/ifname`).
    pub attachment: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub reason: String,
}

/// A block claimed for a node the model does not have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Orphan {
    pub block: IpNet,
    pub node: String,
}

/// Two claims of overlapping blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockOverlap {
    pub blocks: Vec<IpNet>,
    pub nodes: Vec<String>,
}

/// One finding about a mark of a borrowing record (`IPAMBlock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarkFinding {
    /// The block whose record holds the mark.
    pub block: IpNet,
    pub address: IpAddr,
    /// The node the mark is for.
    pub node: String,
    /// The attachment (`network/container/ifname`) the mark is for.
    pub attachment: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub reason: String,
}

/// What `ipam check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    /// The node whose allocations were checked.
    pub node: String,
    /// "kubernetes" or "file ...".
    pub datastore: String,
    /// Allocations (addresses) of this node checked.
    pub addresses: usize,
    /// Block claims checked (every node's).
    pub blocks: usize,
    pub leaks: Vec<AddressFinding>,
    pub orphans: Vec<Orphan>,
    /// Addresses of this node inside another node's block.
    pub duplicates: Vec<AddressFinding>,
    /// Claims of overlapping blocks.
    pub overlapping_blocks: Vec<BlockOverlap>,
    pub strays: Vec<AddressFinding>,
    pub reserved: Vec<AddressFinding>,
    /// Allocations whose owner could not be checked (not counted as
    /// problems, listed so the operator knows the check is partial).
    pub unchecked: Vec<AddressFinding>,
    /// Borrowing records (`IPAMBlock`) read, and the marks in them.
    #[serde(default)]
    pub records: usize,
    #[serde(default)]
    pub marks: usize,
    /// Marks of this node whose pod is gone.
    #[serde(default)]
    pub borrowed_leaks: Vec<MarkFinding>,
    /// Marks of nodes not in the cluster.
    #[serde(default)]
    pub borrowed_orphans: Vec<MarkFinding>,
    /// Addresses marked twice, or marked and allocated by the block's owner
    /// outside the record.
    #[serde(default)]
    pub borrowed_duplicates: Vec<MarkFinding>,
    /// Marks inside an IPReservation.
    #[serde(default)]
    pub borrowed_reserved: Vec<MarkFinding>,
    /// Marks of this node whose pod could not be looked up (not problems).
    #[serde(default)]
    pub borrowed_unchecked: Vec<MarkFinding>,
}

impl CheckReport {
    /// How many problems were found (`unchecked` is not one).
    pub fn problems(&self) -> usize {
        self.leaks.len()
            + self.orphans.len()
            + self.duplicates.len()
            + self.overlapping_blocks.len()
            + self.strays.len()
            + self.reserved.len()
            + self.borrowed_leaks.len()
            + self.borrowed_orphans.len()
            + self.borrowed_duplicates.len()
            + self.borrowed_reserved.len()
    }
}

/// What the check reads.
pub struct Inputs<'a> {
    pub node: &'a str,
    pub datastore: &'a str,
    /// This node's allocations, each with whether its owner exists.
    pub allocations: &'a [(Allocation, Liveness)],
    /// Every block claim of the cluster.
    pub affinities: &'a [Affinity],
    /// The nodes of the model.
    pub nodes: &'a BTreeSet<String>,
    pub reserved: &'a [IpNet],
    /// Every borrowing record (`IPAMBlock`) of the cluster.
    pub records: &'a [IPAMBlockSpec],
}

fn finding(a: &Allocation, ip: IpAddr, reason: String) -> AddressFinding {
    AddressFinding {
        address: ip,
        attachment: a.key.to_string(),
        pod: a.pod.as_ref().map(ToString::to_string),
        reason,
    }
}

/// Judge the inputs.
pub fn check(inp: &Inputs) -> CheckReport {
    let mut r = CheckReport {
        node: inp.node.to_string(),
        datastore: inp.datastore.to_string(),
        blocks: inp.affinities.len(),
        ..Default::default()
    };
    for (a, live) in inp.allocations {
        for ip in a.ips.iter().map(IpNet::addr) {
            r.addresses += 1;
            match live {
                Liveness::InUse(_) => {}
                Liveness::Gone(why) => r.leaks.push(finding(a, ip, why.clone())),
                Liveness::Unknown(why) => r.unchecked.push(finding(a, ip, why.clone())),
            }
            let holders: Vec<&Affinity> = inp
                .affinities
                .iter()
                .filter(|b| b.block.contains(&ip))
                .collect();
            let borrowed = || marks::is_borrowed(inp.records, inp.node, &a.key.to_string(), ip);
            if let Some(other) = holders.iter().find(|b| b.node != inp.node)
                && !borrowed()
            {
                let why = format!(
                    "inside block {} held by node {}: both nodes may hand it out",
                    other.block, other.node
                );
                r.duplicates.push(finding(a, ip, why));
            } else if holders.is_empty() && !borrowed() {
                let why = "in no block this node holds (its claim is gone): another node may claim the block and hand the address out again".to_string();
                r.strays.push(finding(a, ip, why));
            }
            if let Some(res) = inp.reserved.iter().find(|n| n.contains(&ip)) {
                r.reserved
                    .push(finding(a, ip, format!("inside IPReservation CIDR {res}")));
            }
        }
    }
    for b in inp.affinities {
        if !inp.nodes.contains(&b.node) {
            r.orphans.push(Orphan {
                block: b.block,
                node: b.node.clone(),
            });
        }
    }
    r.overlapping_blocks = overlaps(inp.affinities);
    let m = marks::judge(
        inp.node,
        inp.records,
        inp.allocations,
        inp.nodes,
        inp.reserved,
    );
    r.records = inp.records.len();
    r.marks = m.marks;
    r.borrowed_leaks = m.leaks;
    r.borrowed_orphans = m.orphans;
    r.borrowed_duplicates = m.duplicates;
    r.borrowed_reserved = m.reserved;
    r.borrowed_unchecked = m.unchecked;
    r
}

/// Pairs of claims whose blocks overlap: sorted by start, each block is
/// compared with the one reaching furthest so far (n log n).
fn overlaps(affinities: &[Affinity]) -> Vec<BlockOverlap> {
    let mut out = Vec::new();
    for v4 in [true, false] {
        let mut family: Vec<&Affinity> = affinities
            .iter()
            .filter(|a| a.block.addr().is_ipv4() == v4)
            .collect();
        family.sort_by_key(|a| (a.block.network(), a.block.prefix_len()));
        let mut widest: Option<&Affinity> = None;
        for a in family {
            if let Some(w) = widest {
                if w.block.contains(&a.block.network()) {
                    out.push(BlockOverlap {
                        blocks: vec![w.block, a.block],
                        nodes: vec![w.node.clone(), a.node.clone()],
                    });
                }
                if a.block.broadcast() <= w.block.broadcast() {
                    continue;
                }
            }
            widest = Some(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Revision;
    use starling_cni_proto::{AttachmentKey, PodRef};

    fn aff(block: &str, node: &str) -> Affinity {
        Affinity {
            block: block.parse().unwrap(),
            node: node.into(),
            revision: Revision("1".into()),
        }
    }

    fn alloc(c: &str, ip: &str) -> Allocation {
        Allocation {
            key: AttachmentKey {
                network: "pods".into(),
                container_id: c.into(),
                ifname: "eth0".into(),
            },
            ips: vec![format!("{ip}/32").parse().unwrap()],
            host_veth: format!("stl{c}"),
            netns: format!("/run/netns/{c}"),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: c.into(),
            }),
            allocated_unix_ms: 0,
        }
    }

    #[test]
    fn every_kind_of_problem_is_found_and_nothing_else() {
        let allocations = vec![
            (
                alloc("ok", "10.0.0.1"),
                Liveness::InUse("pod exists".into()),
            ),
            (
                alloc("gone", "10.0.0.2"),
                Liveness::Gone("pod not found".into()),
            ),
            (
                alloc("dup", "10.0.1.5"),
                Liveness::InUse("pod exists".into()),
            ),
            (
                alloc("stray", "10.0.9.1"),
                Liveness::InUse("pod exists".into()),
            ),
            (
                alloc("res", "10.0.0.40"),
                Liveness::InUse("pod exists".into()),
            ),
            (
                alloc("unk", "10.0.0.3"),
                Liveness::Unknown("timeout".into()),
            ),
        ];
        let affinities = vec![
            aff("10.0.0.0/26", "n1"),
            aff("10.0.1.0/26", "n2"),
            aff("10.0.2.0/26", "ghost"),
            aff("10.0.3.0/24", "n2"),
            aff("10.0.3.64/26", "n1"),
            aff("fd00::/122", "n1"),
        ];
        let nodes: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
        let reserved: Vec<IpNet> = vec!["10.0.0.40/32".parse().unwrap()];
        let r = check(&Inputs {
            node: "n1",
            datastore: "kubernetes",
            allocations: &allocations,
            affinities: &affinities,
            nodes: &nodes,
            reserved: &reserved,
            records: &[],
        });
        let addrs = |v: &[AddressFinding]| -> Vec<String> {
            v.iter().map(|f| f.address.to_string()).collect()
        };
        assert_eq!(addrs(&r.leaks), ["10.0.0.2"]);
        assert_eq!(addrs(&r.duplicates), ["10.0.1.5"]);
        assert!(r.duplicates[0].reason.contains("node n2"), "{r:?}");
        assert_eq!(addrs(&r.strays), ["10.0.9.1"]);
        assert_eq!(addrs(&r.reserved), ["10.0.0.40"]);
        assert_eq!(addrs(&r.unchecked), ["10.0.0.3"]);
        assert_eq!(
            r.orphans,
            vec![Orphan {
                block: "10.0.2.0/26".parse().unwrap(),
                node: "ghost".into()
            }]
        );
        assert_eq!(r.overlapping_blocks.len(), 1, "{r:?}");
        assert_eq!(r.overlapping_blocks[0].nodes, ["n2", "n1"]);
        assert_eq!(r.addresses, 6);
        assert_eq!(r.blocks, 6);
        assert_eq!(r.problems(), 6);
    }

    #[test]
    fn a_clean_cluster_has_no_problems() {
        let allocations = vec![(alloc("ok", "10.0.0.1"), Liveness::InUse("x".into()))];
        let affinities = vec![aff("10.0.0.0/26", "n1"), aff("10.0.0.64/26", "n2")];
        let nodes: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
        let r = check(&Inputs {
            node: "n1",
            datastore: "file",
            allocations: &allocations,
            affinities: &affinities,
            nodes: &nodes,
            reserved: &[],
            records: &[],
        });
        assert_eq!(r.problems(), 0, "{r:?}");
    }

    #[test]
    fn nested_and_chained_overlaps_are_all_reported() {
        let affinities = vec![
            aff("10.0.0.0/24", "a"),
            aff("10.0.0.0/26", "b"),
            aff("10.0.0.128/26", "c"),
            aff("10.0.1.0/26", "d"),
        ];
        let o = overlaps(&affinities);
        let pairs: Vec<Vec<String>> = o.iter().map(|x| x.nodes.clone()).collect();
        assert_eq!(pairs, vec![vec!["a", "b"], vec!["a", "c"]]);
    }

    fn mark(ip: &str, node: &str, attachment: &str) -> crate::model::crd::BlockAllocation {
        crate::model::crd::BlockAllocation {
            ip: ip.parse().unwrap(),
            node: node.into(),
            attachment: attachment.into(),
        }
    }

    #[test]
    fn borrowing_marks_are_judged_by_kind() {
        use crate::model::crd::IPAMBlockState;
        // n1 borrows 10.0.1.5 (pod runs) and 10.0.1.6 (pod gone) from n2's
        // block, and holds a mark with no allocation; ghost's mark is an
        // orphan; .9 is marked twice; .40 is reserved; n1's own block has
        // a record in which n2 marked an address n1 allocated outside it.
        let allocations = vec![
            (
                alloc("ok", "10.0.0.1"),
                Liveness::InUse("pod exists".into()),
            ),
            (
                alloc("b1", "10.0.1.5"),
                Liveness::InUse("pod exists".into()),
            ),
            (
                alloc("b2", "10.0.1.6"),
                Liveness::Gone("pod not found".into()),
            ),
        ];
        let affinities = vec![aff("10.0.0.0/26", "n1"), aff("10.0.1.0/26", "n2")];
        let records = vec![
            IPAMBlockSpec {
                cidr: "10.0.1.0/26".parse().unwrap(),
                owner: "n2".into(),
                state: IPAMBlockState::Open,
                allocations: vec![
                    mark("10.0.1.5", "n1", "pods/b1/eth0"),
                    mark("10.0.1.6", "n1", "pods/b2/eth0"),
                    mark("10.0.1.7", "n1", "pods/lost/eth0"),
                    mark("10.0.1.8", "ghost", "pods/g/eth0"),
                    mark("10.0.1.9", "n2", "pods/x/eth0"),
                    mark("10.0.1.9", "n3", "pods/y/eth0"),
                    mark("10.0.1.40", "n2", "pods/r/eth0"),
                ],
            },
            IPAMBlockSpec {
                cidr: "10.0.0.0/26".parse().unwrap(),
                owner: "n1".into(),
                state: IPAMBlockState::Open,
                allocations: vec![mark("10.0.0.1", "n2", "pods/z/eth0")],
            },
        ];
        let nodes: BTreeSet<String> = ["n1", "n2", "n3"].map(String::from).into();
        let reserved: Vec<IpNet> = vec!["10.0.1.40/32".parse().unwrap()];
        let r = check(&Inputs {
            node: "n1",
            datastore: "kubernetes",
            allocations: &allocations,
            affinities: &affinities,
            nodes: &nodes,
            reserved: &reserved,
            records: &records,
        });
        let addrs = |v: &[MarkFinding]| -> Vec<String> {
            v.iter().map(|f| f.address.to_string()).collect()
        };
        let addrs_of = |v: &[AddressFinding]| -> Vec<String> {
            v.iter().map(|f| f.address.to_string()).collect()
        };
        // Borrowed addresses are not duplicates of the owner's block.
        assert!(r.duplicates.is_empty(), "{r:#?}");
        assert_eq!(addrs(&r.borrowed_leaks), ["10.0.1.6", "10.0.1.7"]);
        assert_eq!(r.borrowed_leaks[0].pod.as_deref(), Some("default/b2"));
        assert_eq!(r.borrowed_leaks[0].block.to_string(), "10.0.1.0/26");
        assert_eq!(addrs(&r.borrowed_orphans), ["10.0.1.8"]);
        assert_eq!(addrs(&r.borrowed_duplicates), ["10.0.1.9", "10.0.0.1"]);
        assert!(
            r.borrowed_duplicates[1]
                .reason
                .contains("outside the record")
        );
        assert_eq!(addrs(&r.borrowed_reserved), ["10.0.1.40"]);
        assert_eq!((r.records, r.marks), (2, 8));
        // b2's own allocation is a plain leak as well.
        assert_eq!(addrs_of(&r.leaks), ["10.0.1.6"]);
        assert_eq!(r.problems(), 7);
    }
}
