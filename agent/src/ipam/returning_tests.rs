//! A node that was deleted and came back with the same name, with the real
//! file datastore: what [`Ipam::new`] does with the allocations its store
//! kept (docs/operations.md, Deleted nodes).

use super::datastore::{Datastore, FileDatastore};
use super::{Ipam, IpamConfig};
use ipnet::IpNet;
use starling_cni_proto::{Allocation, AttachmentKey};
use std::collections::BTreeMap;

fn alloc(container: &str, ip: &str) -> Allocation {
    Allocation {
        key: AttachmentKey {
            network: "pods".into(),
            container_id: container.into(),
            ifname: "eth0".into(),
        },
        ips: vec![ip.parse().unwrap()],
        host_veth: starling_cni_proto::host_veth_name(container, "eth0"),
        netns: format!("/run/netns/{container}"),
        pod: None,
        allocated_unix_ms: 0,
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Its blocks were released while it was away. One is still free: claimed
/// again, its pod keeps the address. Another node took the other meanwhile:
/// that allocation is dropped (handed to the caller to remove from the
/// store), so this node never serves an address of a block it does not
/// hold. An allocation outside every pool is dropped too.
#[test]
fn a_returning_node_reclaims_free_blocks_and_drops_allocations_in_taken_ones() {
    let dir = std::env::temp_dir().join(format!("starling-returning-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    struct Scratch(std::path::PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _scratch = Scratch(dir.clone());
    let path = dir.join("blocks.json");
    let ds = FileDatastore::new(&path);
    // While n1 was away: the clean-up released both of its blocks, and n2
    // claimed 10.1.0.16/28.
    ds.claim(net("10.1.0.16/28"), "n2").unwrap();
    let config = IpamConfig {
        pools: vec![serde_json::from_str(r#"{"cidr":"10.1.0.0/24","blockSize":28}"#).unwrap()],
        ..Default::default()
    };
    let stored = vec![
        alloc("free", "10.1.0.3/32"),
        alloc("taken", "10.1.0.18/32"),
        alloc("nopool", "10.9.0.1/32"),
    ];
    let mut ipam = Ipam::new(
        "n1",
        BTreeMap::new(),
        config,
        Box::new(FileDatastore::new(&path)),
        stored,
    )
    .unwrap();

    assert_eq!(
        ipam.blocks(),
        &[net("10.1.0.0/28")],
        "only the free block is n1's again"
    );
    let kept: Vec<String> = ipam
        .allocations()
        .iter()
        .map(|a| a.key.container_id.clone())
        .collect();
    assert_eq!(kept, vec!["free".to_string()]);
    let mut dropped: Vec<String> = ipam
        .take_dropped()
        .iter()
        .map(|a| a.key.container_id.clone())
        .collect();
    dropped.sort();
    assert_eq!(dropped, vec!["nopool".to_string(), "taken".to_string()]);
    assert!(ipam.take_dropped().is_empty(), "handed over once");

    // The claims as every node sees them: n1 holds the free block again, n2
    // keeps the one it took.
    let mut claims: Vec<(IpNet, String)> = FileDatastore::new(&path)
        .affinities()
        .unwrap()
        .into_iter()
        .map(|a| (a.block, a.node))
        .collect();
    claims.sort();
    assert_eq!(
        claims,
        vec![
            (net("10.1.0.0/28"), "n1".to_string()),
            (net("10.1.0.16/28"), "n2".to_string())
        ]
    );
}
