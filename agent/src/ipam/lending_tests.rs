//! Borrowing through the allocator, with the datastore and the records in
//! memory (unit tests; the API server flavour is tested in tests/k8s).

use super::borrow::{Edit, EditFn, SharedBlocks, Updated};
use super::*;
use crate::model::crd::{IPAMBlockSpec, IPAMBlockState};
use std::sync::Mutex;

/// Claims and records in memory; an update holds the lock through its
/// edit, so every write is serialised as the API server's swaps are.
#[derive(Default)]
struct Mem {
    claims: super::tests::MemDatastore,
    records: Mutex<Vec<IPAMBlockSpec>>,
}

impl SharedBlocks for Mem {
    fn request(&self, block: IpNet, owner: &str) -> Result<IPAMBlockSpec, DatastoreError> {
        let mut r = self.records.lock().unwrap();
        if let Some(x) = r.iter().find(|x| x.cidr == block) {
            return Ok(x.clone());
        }
        let x = IPAMBlockSpec {
            cidr: block,
            owner: owner.into(),
            state: IPAMBlockState::Requested,
            allocations: vec![],
        };
        r.push(x.clone());
        Ok(x)
    }
    fn update(&self, block: IpNet, mut edit: EditFn) -> Result<Updated, DatastoreError> {
        let mut r = self.records.lock().unwrap();
        let Some(x) = r.iter_mut().find(|x| x.cidr == block) else {
            return Ok(Updated {
                spec: None,
                conflicts: 0,
            });
        };
        let mut edited = x.clone();
        if edit(&mut edited) == Edit::Write {
            *x = edited.clone();
        }
        Ok(Updated {
            spec: Some(edited),
            conflicts: 0,
        })
    }
    fn list(&self) -> Result<Vec<IPAMBlockSpec>, DatastoreError> {
        Ok(self.records.lock().unwrap().clone())
    }
}

fn node(name: &str, mem: &Arc<Mem>, existing: Vec<Allocation>) -> Ipam {
    let config = IpamConfig {
        pools: vec![serde_json::from_str(r#"{"cidr":"10.9.0.0/30","blockSize":30}"#).unwrap()],
        ..Default::default()
    };
    let shared: Arc<dyn SharedBlocks> = mem.clone();
    Ipam::new_sharing(
        name,
        BTreeMap::new(),
        config,
        (Box::new(mem.claims.clone()), Some(shared)),
        existing,
    )
    .unwrap()
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

/// Apply an ADD the way the IPAM thread does: claims and borrows run as
/// plans, their results taken in.
fn add(ipam: &mut Ipam, r: &AddRequest) -> Result<Allocation, IpamError> {
    for _ in 0..4 {
        match ipam.try_add(r, &Choice::default()) {
            Err(IpamError::NeedsBlock { v4, want }) => {
                let got = ipam.claim_plan(v4, want.clone(), Instant::now()).run();
                match (&want, got) {
                    (Want::Borrow { key, .. }, Ok(g)) => ipam.lend_result(key, &g),
                    (_, Ok(b)) => ipam.adopt(&b),
                    (Want::Pools(_), Err(IpamError::Exhausted(_))) => ipam.set_pools_full(v4),
                    (_, Err(e)) => return Err(e),
                }
            }
            other => return other.map(|(a, _)| a),
        }
    }
    panic!("no answer after 4 rounds")
}

#[test]
fn a_full_node_borrows_through_the_owners_record_and_a_restart_clears_stale_marks() {
    let mem = Arc::new(Mem::default());
    let mut owner = node("owner", &mem, vec![]);
    let first = add(&mut owner, &req("o1")).unwrap();
    assert_eq!(first.ips[0].addr().to_string(), "10.9.0.0");
    let mut b = node("b", &mem, vec![]);
    // The borrow waits for the owner to open the record: the owner's
    // side, as the record watch drives it, runs meanwhile.
    let opener = {
        let mem = mem.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while mem.records.lock().unwrap().is_empty() {
                assert!(Instant::now() < deadline, "no request came");
                std::thread::yield_now();
            }
            let block: IpNet = "10.9.0.0/30".parse().unwrap();
            let own = owner.lend(block).expect("the owner holds the block");
            borrow::open(mem.as_ref(), block, "owner", own).unwrap();
            owner
        })
    };
    let got = add(&mut b, &req("b1")).unwrap();
    let mut owner = opener.join().unwrap();
    assert_eq!(got.ips[0].addr().to_string(), "10.9.0.1");
    assert!(b.announced().contains(&"10.9.0.1/32".parse().unwrap()));
    let marks = |mem: &Mem| -> Vec<(String, String)> {
        mem.list().unwrap()[0]
            .allocations
            .iter()
            .map(|a| (a.ip.to_string(), a.node.clone()))
            .collect()
    };
    assert_eq!(
        marks(&mem),
        [
            ("10.9.0.0".into(), "owner".into()),
            ("10.9.0.1".into(), "b".into())
        ]
    );
    // The owner's own next pod goes through the record too.
    let o2 = add(&mut owner, &req("o2")).unwrap();
    assert_eq!(o2.ips[0].addr().to_string(), "10.9.0.2");
    // DEL: out of the store first, the mark after the commit.
    let (released, _) = b.del(&req("b1").key);
    assert!(released.is_some());
    let unmarks = b.take_unmarks();
    assert_eq!(unmarks.len(), 1);
    let (block, ip, attachment) = unmarks[0].clone();
    borrow::clear(mem.as_ref(), block, "b", move |a| {
        a.ip == ip && a.attachment == attachment
    })
    .unwrap();
    assert!(!marks(&mem).iter().any(|(_, n)| n == "b"));
    // A borrow whose mark landed but whose store write did not (a crash):
    // the next start clears the mark, and the address is free again.
    let got = add(&mut b, &req("b2")).unwrap();
    assert!(marks(&mem).iter().any(|(_, n)| n == "b"));
    drop(b);
    let b = node("b", &mem, vec![]);
    assert!(!marks(&mem).iter().any(|(_, n)| n == "b"));
    assert!(!b.announced().contains(&got.ips[0]));
    // A start whose store holds the borrowed allocation keeps it.
    drop(b);
    let mut b = node("b", &mem, vec![]);
    let kept = add(&mut b, &req("b3")).unwrap();
    drop(b);
    let b = node("b", &mem, vec![kept.clone()]);
    assert!(
        marks(&mem)
            .iter()
            .any(|(ip, n)| n == "b" && *ip == kept.ips[0].addr().to_string())
    );
    assert!(b.announced().contains(&kept.ips[0]));
}
