//! Borrowing's cross-node record (`IPAMBlock`, docs/cni.md Borrowing)
//! against the real API server: several borrowers marking addresses of
//! one almost-full block at once hand no address out twice and their
//! counts add up; a write by someone else between an edit's read and its
//! replace (409) is retried on a fresh read and still hands out no address
//! twice; nobody borrows before the owner has opened the record, and a
//! borrower watching the record for its opening hears of it (or of its
//! deadline). The owner's watch of requests reads its labelled records
//! and unlabelled ones (an older agent's), not other owners'.
//!
//! Objects are named `10-153-…` and `10-154-…` (blocks no other test uses);
//! the shared control plane runs other tests in parallel.

use crate::cluster::{Cluster, checked, cluster};
use anyhow::{Result, bail, ensure};
use ipnet::IpNet;
use starling_agent::ipam::borrow::{self, NoLoan, SharedBlocks};
use starling_agent::ipam::kube::block_name;
use starling_agent::ipam::kube_blocks::KubeSharedBlocks;
use starling_agent::model::crd::IPAMBlockState;
use starling_agent::model::kube::config;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier};

/// Deletes the record, also when the test fails.
struct Record<'a>(&'a Cluster, String);

impl Drop for Record<'_> {
    fn drop(&mut self) {
        let _ = self.0.kubectl(&[
            "delete",
            "ipamblocks.starling.dev",
            &self.1,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The owner's addresses: the first `n` of the block.
fn first(block: IpNet, n: u32) -> Vec<(IpAddr, String)> {
    (0..n)
        .map(|i| match block.network() {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) + i).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) + u128::from(i)).into()),
        })
        .map(|ip| (ip, format!("pods/owner-{ip}/eth0")))
        .collect()
}

#[test]
fn borrowers_racing_for_one_block_never_share_an_address() -> Result<()> {
    let c = cluster();
    c.ensure_manifests()?;
    let cfg = rt()?.block_on(config(Some(&c.kubeconfig)))?;
    let block: IpNet = "10.153.0.0/27".parse()?;
    let _record = Record(c, block_name(block));
    let owner = "h2br-owner";
    let shared = KubeSharedBlocks::new(cfg.clone())?;

    // A borrower asks; until the owner opens the record nobody borrows.
    let asked = shared.request(block, owner)?;
    ensure!(
        asked.state == IPAMBlockState::Requested && asked.allocations.is_empty(),
        "{asked:?}"
    );
    let (early, _) = borrow::borrow(&shared, block, "h2br-b0", "pods/early/eth0", &[])?;
    ensure!(
        early == Err(NoLoan::NotOpen),
        "borrowed before the owner opened: {early:?}"
    );

    // Waiting for the opening (a watch of that one record) ends at its
    // deadline while the record stays requested...
    let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
    shared.wait_open(block, until)?;
    ensure!(
        std::time::Instant::now() >= until,
        "wait_open returned before its deadline with the record still requested"
    );
    // ...and, for a waiter with a long deadline, when the owner opens it.
    // The owner marks its 26 addresses and opens the record: 6 are left.
    let own = first(block, 26);
    let far = std::time::Duration::from_secs(60);
    let waiter = {
        let shared = KubeSharedBlocks::new(cfg.clone())?;
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let r = shared.wait_open(block, started + far);
            (r, started.elapsed())
        })
    };
    let opened = borrow::open(&shared, block, owner, own.clone())?;
    let (waited, took) = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("the waiter panicked"))?;
    waited?;
    ensure!(
        took < far,
        "wait_open ran to its deadline ({took:?}) although the owner opened the record"
    );
    ensure!(
        opened.state == IPAMBlockState::Open && opened.allocations.len() == 26,
        "{opened:?}"
    );

    // Five borrowers, each with its own client, take addresses at once
    // until the block is full.
    let borrowers = 5;
    let barrier = Arc::new(Barrier::new(borrowers));
    let conflicts = Arc::new(AtomicU32::new(0));
    let got: Vec<Result<Vec<IpAddr>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..borrowers)
            .map(|b| {
                let (barrier, cfg, conflicts) = (barrier.clone(), cfg.clone(), conflicts.clone());
                s.spawn(move || -> Result<Vec<IpAddr>> {
                    let mine = KubeSharedBlocks::new(cfg)?;
                    let node = format!("h2br-b{b}");
                    barrier.wait();
                    let mut ips = Vec::new();
                    for n in 0.. {
                        let (r, retried) = borrow::borrow(
                            &mine,
                            block,
                            &node,
                            &format!("pods/{node}-{n}/eth0"),
                            &[],
                        )?;
                        conflicts.fetch_add(retried, Ordering::SeqCst);
                        match r {
                            Ok(ip) => ips.push(ip),
                            Err(NoLoan::Full) => return Ok(ips),
                            Err(other) => bail!("{node}: {other:?}"),
                        }
                    }
                    unreachable!()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut borrowed = Vec::new();
    for g in got {
        borrowed.extend(g?);
    }
    let unique: HashSet<IpAddr> = borrowed.iter().copied().collect();
    ensure!(
        unique.len() == borrowed.len(),
        "an address was handed out twice: {borrowed:?}"
    );
    ensure!(
        borrowed.len() == 6,
        "6 addresses were free, {} borrowed: {borrowed:?}",
        borrowed.len()
    );
    ensure!(
        !own.iter().any(|(ip, _)| unique.contains(ip)),
        "a borrower took an owner's address"
    );
    let record = shared
        .list()?
        .into_iter()
        .find(|r| r.cidr == block)
        .ok_or_else(|| anyhow::anyhow!("the record is gone"))?;
    ensure!(
        record.allocations.len() == 32,
        "marks: {:?}",
        record.allocations
    );
    let marks: HashSet<IpAddr> = record.allocations.iter().map(|a| a.ip).collect();
    ensure!(
        marks.len() == 32,
        "a mark appears twice: {:?}",
        record.allocations
    );
    crate::cluster::log(&format!(
        "borrow race: 5 borrowers, 6 addresses, {} conflicts retried",
        conflicts.load(Ordering::SeqCst)
    ));

    // Each borrower clears its own marks (DEL); the owner's stay.
    for b in 0..borrowers {
        borrow::clear(&shared, block, &format!("h2br-b{b}"), |_| true)?;
    }
    let after = shared.list()?.into_iter().find(|r| r.cidr == block);
    ensure!(
        after.as_ref().is_some_and(
            |r| r.allocations.len() == 26 && r.allocations.iter().all(|a| a.node == owner)
        ),
        "{after:?}"
    );
    Ok(())
}

#[test]
fn a_write_between_read_and_replace_is_retried_and_hands_out_nothing_twice() -> Result<()> {
    let c = cluster();
    c.ensure_manifests()?;
    let cfg = rt()?.block_on(config(Some(&c.kubeconfig)))?;
    let block: IpNet = "10.154.0.0/28".parse()?;
    let name = block_name(block);
    let _record = Record(c, name.clone());
    let shared = KubeSharedBlocks::new(cfg)?;
    shared.request(block, "h2bc-owner")?;
    borrow::open(&shared, block, "h2bc-owner", first(block, 14))?;

    // The edit, on its first read, has another writer take the address it
    // is about to mark (kubectl, a client of its own): the replace then
    // carries a stale resourceVersion and gets 409.
    let interfered = Arc::new(AtomicBool::new(false));
    let once = interfered.clone();
    let c2 = c.kubeconfig.clone();
    let kubectl = c.kubectl.clone();
    let name2 = name.clone();
    let updated = shared.update(
        block,
        Box::new(move |spec| {
            let Some(ip) = borrow::free_address(spec, &[]) else {
                return borrow::Edit::Keep;
            };
            if !once.swap(true, Ordering::SeqCst) {
                let patch = serde_json::json!({"spec": {"allocations":
                    spec.allocations.iter().map(|a| serde_json::json!({"ip": a.ip, "node": a.node, "attachment": a.attachment}))
                        .chain([serde_json::json!({"ip": ip, "node": "h2bc-other", "attachment": "pods/other/eth0"})])
                        .collect::<Vec<_>>()}});
                let out = std::process::Command::new(&kubectl)
                    .args(["--kubeconfig"]).arg(&c2)
                    .args(["patch", "ipamblocks.starling.dev", &name2, "--type=merge", "-p", &patch.to_string()])
                    .output();
                assert!(out.as_ref().is_ok_and(|o| o.status.success()), "kubectl patch: {out:?}");
            }
            spec.allocations.push(starling_agent::model::crd::BlockAllocation {
                ip,
                node: "h2bc-me".into(),
                attachment: "pods/me/eth0".into(),
            });
            borrow::Edit::Write
        }),
    )?;
    ensure!(
        interfered.load(Ordering::SeqCst),
        "the interfering write did not happen"
    );
    ensure!(updated.conflicts >= 1, "no 409 was seen: {updated:?}");
    let record = updated.spec.ok_or_else(|| anyhow::anyhow!("no record"))?;
    let ips: Vec<IpAddr> = record.allocations.iter().map(|a| a.ip).collect();
    let unique: HashSet<IpAddr> = ips.iter().copied().collect();
    ensure!(
        unique.len() == ips.len() && ips.len() == 16,
        "{:?}",
        record.allocations
    );
    let other = record.allocations.iter().find(|a| a.node == "h2bc-other");
    let me = record.allocations.iter().find(|a| a.node == "h2bc-me");
    ensure!(
        other.is_some() && me.is_some() && other.map(|a| a.ip) != me.map(|a| a.ip),
        "{:?}",
        record.allocations
    );
    // The block is full now: a further borrow says so, it does not double up.
    let (full, _) = borrow::borrow(&shared, block, "h2bc-late", "pods/late/eth0", &[])?;
    ensure!(full == Err(NoLoan::Full), "{full:?}");
    let _ = checked(
        &["get"],
        c.kubectl(&["get", "ipamblocks.starling.dev", &name]),
    )?;
    Ok(())
}

/// The owner's watch selects by the `starling.dev/owner` label, and still
/// hears of records without it (written by agents from before the label).
#[test]
fn the_owners_watch_hears_labelled_and_unlabelled_requests_only_its_own() -> Result<()> {
    let c = cluster();
    c.ensure_manifests()?;
    let cfg = rt()?.block_on(config(Some(&c.kubeconfig)))?;
    let labelled: IpNet = "10.154.1.0/28".parse()?;
    let unlabelled: IpNet = "10.154.2.0/28".parse()?;
    let others: IpNet = "10.154.3.0/28".parse()?;
    let _records = [labelled, unlabelled, others].map(|b| Record(c, block_name(b)));
    let owner = "h2lbl-owner";
    let shared = KubeSharedBlocks::new(cfg)?;
    shared.request(labelled, owner)?;
    shared.request(others, "h2lbl-someone-else")?;
    let label = c.kubectl_ok(&[
        "get",
        "ipamblocks.starling.dev",
        &block_name(labelled),
        "-o",
        "jsonpath={.metadata.labels.starling\\.dev/owner}",
    ])?;
    ensure!(label.trim() == owner, "the record's owner label: {label:?}");
    // An older agent's request: no label.
    let old = format!(
        "apiVersion: starling.dev/v1\nkind: IPAMBlock\nmetadata: {{name: {}}}\nspec: {{cidr: {unlabelled}, owner: {owner}, state: requested}}\n",
        block_name(unlabelled)
    );
    checked(&["apply"], c.kubectl_stdin(&["apply", "-f", "-"], &old))?;
    let requests = shared
        .watch_requests(owner)
        .ok_or_else(|| anyhow::anyhow!("the API server's records cannot be watched"))?;
    let mut heard = HashSet::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while heard.len() < 2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match requests.recv_timeout(left) {
            Ok(b) => {
                ensure!(b != others, "heard another owner's request {b}");
                heard.insert(b);
            }
            Err(_) => bail!("within 30 s the owner's watch heard only {heard:?}"),
        }
    }
    ensure!(
        heard == HashSet::from([labelled, unlabelled]),
        "heard {heard:?}"
    );
    Ok(())
}
