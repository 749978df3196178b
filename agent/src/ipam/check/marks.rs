//! `ipam check` of the borrowing records (`IPAMBlock`, docs/cni.md
//! Borrowing): every mark of every record is judged, like the allocations
//! of [`super`], from what the caller read. A mark names a node and an
//! attachment (`network/containerID/ifname`), not a pod, so only the node
//! it names can tell whether its pod runs: that node's store holds the
//! attachment with its pod. So:
//!
//! - a mark of **this node** is in use when this node holds an allocation
//!   of its attachment whose pod runs, and a **leak** when that pod is gone
//!   or no allocation of this node holds the attachment (the node let the
//!   address go and the mark stayed: the DEL's clearing failed, or the
//!   agent died between its mark and its store);
//! - a mark of a node the model does not have is an **orphan**;
//! - a mark of another existing node is judged by that node's check;
//! - an address marked twice in one record, or allocated by the record's
//!   owner (this node) outside the record while someone else's mark holds
//!   it, is a **duplicate**;
//! - a mark inside an IPReservation is a **reserved** overlap.
//!
//! Every node's check sees the orphans, duplicates within a record and
//! reservation overlaps (they are the cluster's); leaks and owner
//! duplicates are the checking node's.

use super::{Liveness, MarkFinding};
use crate::model::crd::{BlockAllocation, IPAMBlockSpec};
use ipnet::IpNet;
use starling_cni_proto::Allocation;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What the marks were found to be.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Marks {
    /// Marks read (every record's).
    pub marks: usize,
    pub leaks: Vec<MarkFinding>,
    pub orphans: Vec<MarkFinding>,
    pub duplicates: Vec<MarkFinding>,
    pub reserved: Vec<MarkFinding>,
    /// This node's marks whose pod could not be looked up.
    pub unchecked: Vec<MarkFinding>,
}

fn finding(block: IpNet, m: &BlockAllocation, pod: Option<String>, reason: String) -> MarkFinding {
    MarkFinding {
        block,
        address: m.ip,
        node: m.node.clone(),
        attachment: m.attachment.clone(),
        pod,
        reason,
    }
}

/// Whether a mark of `node` (this node) is in use: the liveness of the
/// allocation holding its attachment, if any.
pub fn mark_liveness(
    node: &str,
    m: &BlockAllocation,
    allocations: &[(Allocation, Liveness)],
) -> (Option<String>, Liveness) {
    match allocations
        .iter()
        .find(|(a, _)| a.key.to_string() == m.attachment)
    {
        Some((a, live)) => (a.pod.as_ref().map(ToString::to_string), live.clone()),
        None => (
            None,
            Liveness::Gone(format!(
                "no allocation of node {node} holds attachment {} (its pod is gone, or its DEL left the mark)",
                m.attachment
            )),
        ),
    }
}

/// Judge every record's marks. `node`: the checking node; `allocations`:
/// its allocations with their owners' liveness.
pub fn judge(
    node: &str,
    records: &[IPAMBlockSpec],
    allocations: &[(Allocation, Liveness)],
    nodes: &BTreeSet<String>,
    reserved: &[IpNet],
) -> Marks {
    let mut out = Marks::default();
    for r in records {
        out.marks += r.allocations.len();
        let mut first: BTreeMap<IpAddr, &BlockAllocation> = BTreeMap::new();
        for m in &r.allocations {
            if let Some(earlier) = first.get(&m.ip) {
                let why = format!(
                    "marked twice in the record of block {}: also for node {} attachment {}",
                    r.cidr, earlier.node, earlier.attachment
                );
                out.duplicates.push(finding(r.cidr, m, None, why));
            } else {
                first.insert(m.ip, m);
            }
            if let Some(res) = reserved.iter().find(|n| n.contains(&m.ip)) {
                let why = format!("inside IPReservation CIDR {res}");
                out.reserved.push(finding(r.cidr, m, None, why));
            }
            if !nodes.contains(&m.node) {
                let why = format!("node {} is not in the cluster", m.node);
                out.orphans.push(finding(r.cidr, m, None, why));
            } else if m.node == node {
                match mark_liveness(node, m, allocations) {
                    (_, Liveness::InUse(_)) => {}
                    (pod, Liveness::Gone(why)) => out.leaks.push(finding(r.cidr, m, pod, why)),
                    (pod, Liveness::Unknown(why)) => {
                        out.unchecked.push(finding(r.cidr, m, pod, why));
                    }
                }
            }
        }
        if r.owner == node {
            owner_duplicates(r, allocations, &mut out.duplicates);
        }
    }
    out
}

/// This node owns `r`: an address it allocated in its store whose mark in
/// the record is someone else's (not its own attachment's) is held twice.
fn owner_duplicates(
    r: &IPAMBlockSpec,
    allocations: &[(Allocation, Liveness)],
    out: &mut Vec<MarkFinding>,
) {
    for (a, _) in allocations {
        let key = a.key.to_string();
        for ip in a
            .ips
            .iter()
            .map(IpNet::addr)
            .filter(|ip| r.cidr.contains(ip))
        {
            let marks: Vec<&BlockAllocation> =
                r.allocations.iter().filter(|m| m.ip == ip).collect();
            if marks
                .iter()
                .any(|m| m.node == r.owner && m.attachment == key)
            {
                continue;
            }
            for m in marks {
                let why = format!(
                    "allocated by the block's owner {} outside the record (attachment {key}) and marked for node {}",
                    r.owner, m.node
                );
                let pod = a.pod.as_ref().map(ToString::to_string);
                out.push(finding(r.cidr, m, pod, why));
            }
        }
    }
}

/// Whether `ip`, allocated on `node` for `attachment`, is a borrow: marked
/// for that node and attachment in the record of a block containing it.
pub fn is_borrowed(records: &[IPAMBlockSpec], node: &str, attachment: &str, ip: IpAddr) -> bool {
    records.iter().any(|r| {
        r.cidr.contains(&ip)
            && r.allocations
                .iter()
                .any(|m| m.ip == ip && m.node == node && m.attachment == attachment)
    })
}
