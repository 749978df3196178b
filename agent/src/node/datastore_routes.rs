//! Routing without BGP (`bgpEnabled: false`, Calico's `calico_backend:
//! vxlan`): the other nodes' blocks come from the datastore instead of BGP.
//! A block held by node N is routed via N's address in the model, the same
//! next hop BGP would have taught, and so is an address N borrowed from
//! another node's block (a mark in an `IPAMBlock` record, as a host
//! prefix); [`super::routes::desired`] then decides plain or encapsulated
//! exactly as for a learned route. Pure, so the rules are unit-tested
//! without a datastore.

use crate::model::Snapshot;
use crate::model::crd::{AffinityState, IPAMBlockSpec};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A claim read from the datastore: a block of the file datastore's
/// shared claim file, or a borrowed address as a host prefix
/// ([`borrowed_hosts`]), and the node that holds it.
pub type Claim = (IpNet, String);

/// The borrowed addresses of the `IPAMBlock` records as host prefixes
/// (`/32`, `/128`) and the borrower, sorted: every mark whose node is not
/// the record's owner. The owner's own marks are left out: the block's
/// route already leads to the owner.
pub fn borrowed_hosts(records: &[IPAMBlockSpec]) -> Vec<Claim> {
    let mut out: Vec<Claim> = records
        .iter()
        .flat_map(|r| {
            r.allocations
                .iter()
                .filter(|a| a.node != r.owner)
                .map(|a| (IpNet::from(a.ip), a.node.clone()))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Where each remote block is, as the `learned` map of
/// [`super::routes::Inputs`]: prefix → the holder's address of the
/// prefix's family. Sources: the model's BlockAffinity objects (with the
/// Kubernetes datastore, every IPAM claim is one; `Pending` ones, not yet
/// used, are skipped), `claims` (the file datastore's claim file, or the
/// borrowed addresses of the Kubernetes datastore's records), and the
/// nodes' static `podCIDRs`. Blocks of `me`, of nodes not in the model (a
/// node that left) and of nodes without an address of the block's family
/// are left out.
pub fn remote_blocks(snap: &Snapshot, claims: &[Claim], me: &str) -> BTreeMap<IpNet, Vec<IpAddr>> {
    let mut held: Vec<(IpNet, &str)> = Vec::new();
    for a in snap.affinities.values() {
        if a.spec.state != AffinityState::Pending {
            held.push((a.spec.cidr, a.spec.node.as_str()));
        }
    }
    for (block, node) in claims {
        held.push((*block, node.as_str()));
    }
    for (name, n) in &snap.nodes {
        for c in &n.spec.pod_cidrs {
            held.push((*c, name.as_str()));
        }
    }
    let mut out: BTreeMap<IpNet, Vec<IpAddr>> = BTreeMap::new();
    for (block, node) in held {
        if node == me {
            continue;
        }
        let Some(spec) = snap.node(node) else {
            continue;
        };
        let address = match block {
            IpNet::V4(_) => spec.ipv4_address.map(|a| IpAddr::V4(a.addr())),
            IpNet::V6(_) => spec.ipv6_address.map(|a| IpAddr::V6(a.addr())),
        };
        let Some(address) = address else { continue };
        let hops = out.entry(block).or_default();
        if !hops.contains(&address) {
            hops.push(address);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn snap(y: &str) -> Snapshot {
        crate::model::file::load_str(Path::new("test.yaml"), y).unwrap()
    }

    const MODEL: &str = "\
apiVersion: starling.dev/v1
kind: StarlingNode
metadata: {name: a}
spec: {ipv4Address: 192.0.2.1/24, ipv6Address: \"2001:db8::1/64\"}
---
apiVersion: starling.dev/v1
kind: StarlingNode
metadata: {name: b}
spec: {ipv4Address: 192.0.2.2/24, podCIDRs: [10.96.2.0/24]}
---
apiVersion: starling.dev/v1
kind: StarlingNode
metadata: {name: c}
spec: {ipv6Address: \"2001:db8::3/64\"}
---
apiVersion: starling.dev/v1
kind: BlockAffinity
metadata: {name: x}
spec: {cidr: 10.244.9.0/26, node: b}
---
apiVersion: starling.dev/v1
kind: BlockAffinity
metadata: {name: y}
spec: {cidr: 10.244.8.0/26, node: b, state: pending}
";

    #[test]
    fn blocks_of_other_nodes_go_via_their_address_of_the_family() {
        let s = snap(MODEL);
        let claims: Vec<Claim> = vec![
            ("10.244.0.0/26".parse().unwrap(), "a".into()),
            ("10.244.1.0/26".parse().unwrap(), "b".into()),
            // c has no IPv4 address: its IPv4 block has no next hop.
            ("10.244.2.0/26".parse().unwrap(), "c".into()),
            ("fd00:10:244::40/122".parse().unwrap(), "c".into()),
            // A node that left the model.
            ("10.244.3.0/26".parse().unwrap(), "gone".into()),
        ];
        let got = remote_blocks(&s, &claims, "a");
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let c: IpAddr = "2001:db8::3".parse().unwrap();
        let want: BTreeMap<IpNet, Vec<IpAddr>> = [
            ("10.244.1.0/26", b),
            ("10.244.9.0/26", b),
            ("10.96.2.0/24", b),
            ("fd00:10:244::40/122", c),
        ]
        .into_iter()
        .map(|(p, h)| (p.parse().unwrap(), vec![h]))
        .collect();
        assert_eq!(got, want);
        // From b's side: a's block via a; its own left out.
        let got = remote_blocks(&s, &claims, "b");
        assert_eq!(
            got.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
            ["10.244.0.0/26", "fd00:10:244::40/122"]
        );
    }

    #[test]
    fn borrowed_addresses_go_via_the_borrower_and_the_owners_marks_not_at_all() {
        use crate::model::crd::{BlockAllocation, IPAMBlockState};
        let mark = |ip: &str, node: &str| BlockAllocation {
            ip: ip.parse().unwrap(),
            node: node.into(),
            attachment: format!("net/{ip}/eth0"),
        };
        let records = vec![IPAMBlockSpec {
            cidr: "10.244.9.0/26".parse().unwrap(),
            owner: "b".into(),
            state: IPAMBlockState::Open,
            allocations: vec![
                mark("10.244.9.1", "b"),
                mark("10.244.9.2", "a"),
                mark("10.244.9.3", "c"),
                mark("10.244.9.4", "gone"),
            ],
        }];
        let hosts = borrowed_hosts(&records);
        assert_eq!(
            hosts,
            [
                ("10.244.9.2/32".parse().unwrap(), "a".to_string()),
                ("10.244.9.3/32".parse().unwrap(), "c".to_string()),
                ("10.244.9.4/32".parse().unwrap(), "gone".to_string()),
            ]
        );
        let s = snap(MODEL);
        // The owner b routes a's borrowed address via a; c has no IPv4
        // address and "gone" is not in the model: no route.
        let got = remote_blocks(&s, &hosts, "b");
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(got.get(&"10.244.9.2/32".parse().unwrap()), Some(&vec![a]));
        assert_eq!(got.len(), 1, "{got:?}");
        // The borrower a itself leaves its own address out (its pod's
        // device route), and routes the block via its owner b.
        let mut claims = hosts.clone();
        claims.push(("10.244.9.0/26".parse().unwrap(), "b".into()));
        let got = remote_blocks(&s, &claims, "a");
        assert!(!got.contains_key(&"10.244.9.2/32".parse().unwrap()));
        assert!(got.contains_key(&"10.244.9.0/26".parse().unwrap()));
    }
}
