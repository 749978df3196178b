//! The Kubernetes datastore against the real API server: the model read
//! through watches (objects applied with kubectl, changed and deleted),
//! IPAM block claims from several agents at once, and an API server restart
//! survived without losing the snapshot. Plus node IP autodetection in a
//! namespace of our own (no API server needed).
//!
//! Tests on the shared control plane name every object `h2<test>-…` and
//! look only at their own objects: other tests run in parallel against it.

use crate::cluster::{Cluster, checked, cluster, log};
use anyhow::{Context, Result, bail, ensure};
use ipnet::IpNet;
use starling_agent::autodetect::{self, Family, Method};
use starling_agent::ipam::kube::{KubeBlockClaims, block_name};
use starling_agent::ipam::{Datastore as ClaimDatastore, DatastoreError, Ipam, IpamConfig, Pool};
use starling_agent::model::kube::{KubeDatastore, KubeOptions, client, config};
use starling_agent::model::{Datastore, Snapshot};
use starling_cni_proto::{AddRequest, AttachmentKey};
use starling_tests::{Netns, wait_for};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

fn apply(c: &Cluster, yaml: &str) -> Result<()> {
    let args = ["apply", "-f", "-"];
    checked(&args, c.kubectl_stdin(&args, yaml))?;
    Ok(())
}

/// Deletes what a test created, also when it fails.
struct Cleanup<'a> {
    cluster: &'a Cluster,
    objects: Vec<(String, String)>,
}

impl<'a> Cleanup<'a> {
    fn new(cluster: &'a Cluster) -> Self {
        Cleanup {
            cluster,
            objects: Vec::new(),
        }
    }
    fn add(&mut self, kind: &str, name: &str) {
        self.objects.push((kind.to_string(), name.to_string()));
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for (kind, name) in self.objects.iter().rev() {
            let (kind, ns) = match kind.split_once('/') {
                Some((k, ns)) => (k, vec!["-n", ns]),
                None => (kind.as_str(), vec![]),
            };
            let mut args = vec!["delete", kind, name, "--ignore-not-found", "--wait=false"];
            args.extend(ns);
            let _ = self.cluster.kubectl(&args);
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}

fn start_datastore(rt: &tokio::runtime::Runtime, c: &Cluster) -> Result<KubeDatastore> {
    let client = rt
        .block_on(client(Some(&c.kubeconfig)))
        .with_context(|| format!("kube client from {}", c.kubeconfig.display()))?;
    let _in_runtime = rt.enter();
    let ds = KubeDatastore::start(client, KubeOptions::default());
    rt.block_on(ds.wait_ready(Cluster::SETTLE))
        .map_err(anyhow::Error::msg)?;
    Ok(ds)
}

fn until(ds: &KubeDatastore, what: &str, cond: impl Fn(&Snapshot) -> bool) -> Result<()> {
    wait_for(what, DEADLINE, || Ok(cond(&ds.snapshot())))?;
    Ok(())
}

#[test]
fn kube_datastore_follows_objects_applied_changed_and_deleted() -> Result<()> {
    let c = cluster();
    c.ensure_manifests()?;
    let mut cleanup = Cleanup::new(c);
    for (kind, name) in [
        ("secret/kube-system", "h2a-bgp"),
        ("ippools.starling.dev", "h2a-pool"),
        ("bgppeers.starling.dev", "h2a-tor"),
        ("starlingnodes.starling.dev", "h2a-n1"),
        ("node", "h2a-n1"),
        ("node", "h2a-n2"),
    ] {
        cleanup.add(kind, name);
    }
    let rt = runtime()?;
    let ds = start_datastore(&rt, c)?;
    log(&format!("datastore ready: {:?}", ds.status()));

    apply(
        c,
        r#"
apiVersion: v1
kind: Secret
metadata: {name: h2a-bgp, namespace: kube-system}
stringData: {tor: s3cret-h2a}
---
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: h2a-pool}
spec: {cidr: 10.150.0.0/16, blockSize: 26, ipipMode: CrossSubnet}
---
apiVersion: starling.dev/v1
kind: BGPPeer
metadata: {name: h2a-tor}
spec:
  peerIP: 192.0.2.1
  asNumber: 65000
  password: {secretKeyRef: {name: h2a-bgp, key: tor}}
---
apiVersion: v1
kind: Node
metadata:
  name: h2a-n1
  labels: {rack: r1}
  annotations:
    starling.dev/ipv4-address: 192.0.2.10/24
    starling.dev/as-number: "65001"
spec: {podCIDR: 10.151.1.0/24, podCIDRs: [10.151.1.0/24]}
---
apiVersion: v1
kind: Node
metadata: {name: h2a-n2}
"#,
    )?;
    let patch = r#"{"status":{"addresses":[{"type":"InternalIP","address":"192.0.2.20"}]}}"#;
    c.kubectl_ok(&[
        "patch",
        "node",
        "h2a-n2",
        "--subresource=status",
        "--type=merge",
        "-p",
        patch,
    ])?;

    until(
        &ds,
        "pool, peer with its Secret's password, both nodes",
        |s| {
            let n1 = s.node("h2a-n1");
            let n2 = s.node("h2a-n2");
            s.pools.contains_key("h2a-pool")
            && s.peers.contains_key("h2a-tor")
            && s.passwords.values().any(|p| p == "s3cret-h2a")
            && n1.is_some_and(|n| {
                n.ipv4_address.map(|a| a.to_string()).as_deref() == Some("192.0.2.10/24")
                    && n.as_number == Some(65001)
                    && n.pod_cidrs == ["10.151.1.0/24".parse::<IpNet>().unwrap()]
            })
            && s.labels("h2a-n1").get("rack").map(String::as_str) == Some("r1")
            // No annotation: the InternalIP, as a host route.
            && n2.is_some_and(|n| {
                n.ipv4_address.map(|a| a.to_string()).as_deref() == Some("192.0.2.20/32")
            })
        },
    )?;

    // A StarlingNode wins field by field; a refused object leaves the rest.
    apply(
        c,
        r#"
apiVersion: starling.dev/v1
kind: StarlingNode
metadata: {name: h2a-n1, labels: {rack: r9}}
spec: {ipv4Address: 192.0.2.10/24, asNumber: 65002, routeReflectorClusterID: 224.0.0.1}
"#,
    )?;
    c.kubectl_ok(&[
        "annotate",
        "--overwrite",
        "node",
        "h2a-n2",
        "starling.dev/ipv4-address=198.51.100.20/25",
    ])?;
    c.kubectl_ok(&[
        "patch",
        "ippool.starling.dev",
        "h2a-pool",
        "--type=merge",
        "-p",
        r#"{"spec":{"disabled":true}}"#,
    ])?;
    until(
        &ds,
        "StarlingNode override, annotation change, pool disabled",
        |s| {
            s.node("h2a-n1").is_some_and(|n| {
                n.as_number == Some(65002) && n.route_reflector_cluster_id.is_some()
            }) && s.labels("h2a-n1").get("rack").map(String::as_str) == Some("r9")
                && s.node("h2a-n2")
                    .and_then(|n| n.ipv4_address)
                    .map(|a| a.to_string())
                    .as_deref()
                    == Some("198.51.100.20/25")
                && s.pools.get("h2a-pool").is_some_and(|p| p.spec.disabled)
        },
    )?;

    // Secret rotation reaches the snapshot at the next resync at the
    // latest; a peer change re-reads it at once. Deletions disappear.
    c.kubectl_ok(&["delete", "bgppeer.starling.dev", "h2a-tor"])?;
    c.kubectl_ok(&["delete", "node", "h2a-n2"])?;
    c.kubectl_ok(&["delete", "starlingnode.starling.dev", "h2a-n1"])?;
    until(&ds, "deleted peer, node and StarlingNode gone", |s| {
        !s.peers.contains_key("h2a-tor")
            && !s.passwords.values().any(|p| p == "s3cret-h2a")
            && s.node("h2a-n2").is_none()
            && s.node("h2a-n1").is_some_and(|n| n.as_number == Some(65001))
    })?;
    let status = ds.status();
    ensure!(status.ready && status.published >= 3, "{status:?}");
    Ok(())
}

/// A node's IPAM through the Kubernetes claims, counting lost races.
struct Counting {
    inner: KubeBlockClaims,
    conflicts: Arc<Mutex<usize>>,
}

impl ClaimDatastore for Counting {
    fn affinities(&self) -> Result<Vec<starling_agent::ipam::Affinity>, DatastoreError> {
        self.inner.affinities()
    }
    fn claim(
        &self,
        block: IpNet,
        node: &str,
    ) -> Result<starling_agent::ipam::Affinity, DatastoreError> {
        let r = self.inner.claim(block, node);
        if matches!(r, Err(DatastoreError::Conflict { .. })) {
            *self.conflicts.lock().unwrap() += 1;
        }
        r
    }
    fn release(&self, a: &starling_agent::ipam::Affinity) -> Result<(), DatastoreError> {
        self.inner.release(a)
    }
}

#[test]
fn concurrent_block_claims_never_share_a_block() -> Result<()> {
    let c = cluster();
    c.ensure_manifests()?;
    let rt = runtime()?;
    let kube_config = rt.block_on(config(Some(&c.kubeconfig)))?;
    let nodes: Vec<String> = (0..4).map(|i| format!("h2b-n{i}")).collect();
    let mut cleanup = Cleanup::new(c);

    // 1. Four agents race for one block: exactly one wins, the others get a
    //    conflict naming the winner; only the winner's revision releases it.
    let contested: IpNet = "10.152.255.0/28".parse()?;
    cleanup.add("blockaffinities.starling.dev", &block_name(contested));
    let barrier = Arc::new(Barrier::new(nodes.len()));
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|node| {
                let (barrier, cfg) = (barrier.clone(), kube_config.clone());
                s.spawn(move || -> Result<_, DatastoreError> {
                    let ds = KubeBlockClaims::new(cfg)?;
                    barrier.wait();
                    ds.claim(contested, node)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    ensure!(winners.len() == 1, "winners: {results:?}");
    let winner = winners[0].clone();
    for r in &results {
        if let Err(e) = r {
            ensure!(
                matches!(e, DatastoreError::Conflict { holder, .. } if *holder == winner.node),
                "a loser got {e}"
            );
        }
    }
    let ds = KubeBlockClaims::new(kube_config.clone())?;
    ensure!(
        ds.claim(contested, &winner.node)? == winner,
        "claim is idempotent"
    );
    let stale = starling_agent::ipam::Affinity {
        // Any other resourceVersion: they are opaque, never computed.
        revision: starling_agent::ipam::Revision(format!("{}-stale", winner.revision)),
        ..winner.clone()
    };
    ensure!(matches!(
        ds.release(&stale),
        Err(DatastoreError::Stale { .. })
    ));
    ds.release(&winner)?;
    ensure!(!ds.affinities()?.iter().any(|a| a.block == contested));

    // 2. Four IPAMs allocate concurrently from one pool until each holds
    //    three blocks.
    let pool: IpNet = "10.152.0.0/24".parse()?;
    for b in pool.subnets(28)? {
        cleanup.add("blockaffinities.starling.dev", &block_name(b));
    }
    let conflicts = Arc::new(Mutex::new(0usize));
    let retries = Arc::new(Mutex::new(0usize));
    let barrier = Arc::new(Barrier::new(nodes.len()));
    let held: Vec<Result<Vec<IpNet>>> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|node| {
                let (barrier, cfg) = (barrier.clone(), kube_config.clone());
                let (conflicts, retries) = (conflicts.clone(), retries.clone());
                s.spawn(move || -> Result<Vec<IpNet>> {
                    let store = Counting {
                        inner: KubeBlockClaims::new(cfg)?,
                        conflicts,
                    };
                    let config = IpamConfig {
                        pools: vec![Pool {
                            name: String::new(),
                            cidr: pool,
                            block_size: Some(28),
                            node_selector: String::new(),
                            disabled: false,
                        }],
                        ..Default::default()
                    };
                    let mut ipam =
                        Ipam::new(node, BTreeMap::new(), config, Box::new(store), Vec::new())?;
                    barrier.wait();
                    let mut n = 0;
                    while ipam.blocks().len() < 3 {
                        n += 1;
                        ensure!(n < 200, "{node}: 200 ADDs and only {:?}", ipam.blocks());
                        let req = AddRequest {
                            ips: vec![],
                            key: AttachmentKey {
                                network: "k8s-pod-network".into(),
                                container_id: format!("{node}-c{n}"),
                                ifname: "eth0".into(),
                            },
                            netns: "/proc/1/ns/net".into(),
                            host_veth: format!("stl{n:011x}"),
                            pod: None,
                        };
                        match ipam.add(&req) {
                            Ok(_) => {}
                            // Every candidate block of this round was
                            // taken by a faster node: try the ADD again.
                            Err(starling_agent::ipam::IpamError::Exhausted(_)) => {
                                *retries.lock().unwrap() += 1;
                            }
                            Err(e) => bail!("{node}: {e}"),
                        }
                    }
                    Ok(ipam.blocks().to_vec())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = BTreeSet::new();
    for (node, blocks) in nodes.iter().zip(held) {
        let blocks = blocks?;
        ensure!(blocks.len() == 3, "{node} holds {blocks:?}");
        for b in blocks {
            ensure!(all.insert(b), "block {b} held twice (again by {node})");
        }
    }
    // The API server agrees: one object per block, each with its holder.
    let listed: serde_json::Value = serde_json::from_str(&c.kubectl_ok(&[
        "get",
        "blockaffinities.starling.dev",
        "-o",
        "json",
    ])?)?;
    let mut by_node: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
    for item in listed["items"].as_array().context("items")? {
        let cidr: IpNet = item["spec"]["cidr"].as_str().context("cidr")?.parse()?;
        if pool.contains(&cidr) {
            let node = item["spec"]["node"].as_str().context("node")?.to_string();
            by_node.entry(node).or_default().push(cidr);
        }
    }
    let listed_blocks: Vec<IpNet> = by_node.values().flatten().copied().collect();
    let unique: BTreeSet<IpNet> = listed_blocks.iter().copied().collect();
    ensure!(
        unique.len() == listed_blocks.len(),
        "duplicates in {by_node:?}"
    );
    ensure!(
        unique == all,
        "API server holds {unique:?}, IPAMs hold {all:?}"
    );
    for node in &nodes {
        ensure!(
            by_node.get(node).map(Vec::len) == Some(3),
            "{node}: {by_node:?}"
        );
    }
    log(&format!(
        "block claims: 12 blocks for 4 nodes, {} lost CAS races, {} ADDs retried",
        conflicts.lock().unwrap(),
        retries.lock().unwrap()
    ));
    Ok(())
}

#[test]
fn kube_datastore_survives_an_apiserver_restart() -> Result<()> {
    let c = Cluster::private("h2c")?;
    c.ensure_manifests()?;
    apply(
        &c,
        r#"
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: h2c-before}
spec: {cidr: 10.153.0.0/16}
"#,
    )?;
    let rt = runtime()?;
    let ds = start_datastore(&rt, &c)?;
    until(&ds, "the first pool", |s| {
        s.pools.contains_key("h2c-before")
    })?;

    // Every snapshot published from here on must still hold the pool.
    let seen: Arc<Mutex<Vec<Arc<Snapshot>>>> = Arc::default();
    let mut rx = ds.subscribe();
    let recorder = {
        let seen = seen.clone();
        rt.spawn(async move {
            while rx.changed().await.is_ok() {
                let snap = rx.borrow_and_update().clone();
                seen.lock().unwrap().push(snap);
            }
        })
    };

    c.restart_apiserver()?;
    ensure!(
        ds.snapshot().pools.contains_key("h2c-before"),
        "snapshot lost the pool over the restart"
    );
    apply(
        &c,
        r#"
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: h2c-after}
spec: {cidr: 10.154.0.0/16}
"#,
    )?;
    until(&ds, "the pool applied after the restart", |s| {
        s.pools.contains_key("h2c-after") && s.pools.contains_key("h2c-before")
    })?;
    recorder.abort();
    let seen = seen.lock().unwrap();
    for s in seen.iter() {
        ensure!(
            s.pools.contains_key("h2c-before"),
            "a snapshot without the first pool was published: {s:?}"
        );
    }
    log(&format!(
        "apiserver restart: {} snapshots published, every one whole; status {:?}",
        seen.len(),
        ds.status()
    ));
    Ok(())
}

/// Run `f` on a thread that entered the namespace (getifaddrs and the
/// can-reach socket see the calling thread's namespace).
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| path.clone())?;
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a namespace file we hold open; only this
            // thread moves, and it ends with the scope.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    })
}

#[test]
fn node_ip_autodetection_in_a_namespace() -> Result<()> {
    let ns = Netns::new("h2ad")?;
    for (link, addrs) in [
        ("docker0", vec!["10.17.0.1/16"]),
        ("eth0", vec!["192.0.2.10/24"]),
        ("eth1", vec!["198.51.100.7/25", "2001:db8::7/64"]),
        ("stl0123456789a", vec!["10.18.0.1/32"]),
    ] {
        // This kernel has no dummy module: a veth whose peer (no address,
        // `p-` name) stays in the namespace stands in for a NIC.
        let peer = format!("p-{}", &link[..link.len().min(10)]);
        ns.ip(&["link", "add", link, "type", "veth", "peer", "name", &peer])?;
        ns.ip(&["link", "set", &peer, "up"])?;
        for a in addrs {
            let mut args = vec!["addr", "add", a, "dev", link];
            if a.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args)?;
        }
        ns.ip(&["link", "set", link, "up"])?;
    }
    ns.ip(&[
        "route",
        "add",
        "203.0.113.0/24",
        "via",
        "198.51.100.1",
        "dev",
        "eth1",
    ])?;
    let cases = [
        ("first-found", Family::V4, "192.0.2.10/24", "eth0"),
        ("first-found", Family::V6, "2001:db8::7/64", "eth1"),
        ("interface=eth1", Family::V4, "198.51.100.7/25", "eth1"),
        ("skip-interface=eth0", Family::V4, "198.51.100.7/25", "eth1"),
        (
            "cidr=198.51.100.0/24",
            Family::V4,
            "198.51.100.7/25",
            "eth1",
        ),
        (
            "can-reach=203.0.113.5",
            Family::V4,
            "198.51.100.7/25",
            "eth1",
        ),
        ("can-reach=192.0.2.99", Family::V4, "192.0.2.10/24", "eth0"),
    ];
    let results = in_netns(&ns, || {
        cases
            .iter()
            .map(|(m, fam, _, _)| {
                m.parse::<Method>()
                    .and_then(|m| autodetect::detect(&m, *fam))
            })
            .collect::<Vec<_>>()
    })?;
    for ((method, _, addr, ifname), got) in cases.iter().zip(results) {
        let got = got.with_context(|| method.to_string())?;
        log(&format!("{method}: {}", got.reason));
        ensure!(
            got.address.to_string() == *addr && got.interface == *ifname,
            "{method}: got {got:?}, want {addr} on {ifname}"
        );
    }
    let none = in_netns(&ns, || {
        autodetect::detect(&"interface=wlan.*".parse::<Method>().unwrap(), Family::V4)
    })?;
    let err = none.expect_err("no wlan interface").to_string();
    ensure!(
        err.contains("interface=wlan.*") && err.contains("eth0 192.0.2.10/24"),
        "{err}"
    );
    Ok(())
}
