//! Start-up: from the configuration to a running node, one phase per
//! function — open the model, wait for this node in it, IPAM, the first FIB
//! pass, the speaker — then the event loop ([`super::events`]) until
//! SIGTERM. Without a datastore the agent serves IPAM only.

use super::config::{AgentConfig, DatastoreConfig};
use super::control::{self, LastError};
use super::datastore_routes::Claim;
use super::events::{Inputs, Node, Started, mtu_overhead, own_addresses, with_address};
use super::routes;
use crate::autodetect::{self, Detected};
use crate::fib::{FibConfig, Reconciler};
use crate::health::{EndpointConfig, Endpoints, Readiness};
use crate::ipam::server::{self as ipam_server, IpamHandle, PodDefaults};
use crate::ipam::{self, Ipam, IpamConfig, Store};
use crate::model::file::DEFAULT_POLL;
use crate::model::plan::{self, LocalBgp};
use crate::model::{Datastore, FileDatastore, Snapshot};
use crate::mtu::{MtuRule, PodMtu};
use crate::nat::NatReconciler;
use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use starling_bgp::{RouteEvent, Speaker, SpeakerConfig};
use starling_cni_proto::PodRoute;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// The health and metrics server, running from the agent's first moment.
type Served = JoinHandle<Result<()>>;

/// Run the agent until SIGTERM or ^C.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create stateDir {}", cfg.state_dir.display()))?;
    // The probes answer before anything waits: an agent waiting for an
    // unreachable API server is alive (only not ready), and the kubelet
    // must not kill it into CrashLoopBackOff.
    let obs = Endpoints::new(env!("CARGO_PKG_VERSION"));
    let endpoints = match cfg.datastore {
        None => cfg.endpoints.clone(),
        Some(_) => Some(cfg.endpoints.clone().unwrap_or_default()),
    };
    let mut served = tokio::spawn(serve_endpoints(obs.clone(), endpoints));
    match cfg.datastore.clone() {
        None => run_ipam_only(cfg, obs, served).await,
        Some(ds) => {
            let model = phase(open_model(&cfg, ds), &mut served).await?;
            run_node(cfg, model, obs, served).await
        }
    }
}

/// A start-up phase, cut short if the endpoints fail (a busy port).
async fn phase<T>(f: impl Future<Output = Result<T>>, served: &mut Served) -> Result<T> {
    tokio::select! {
        r = f => r,
        r = served => Err(endpoints_ended(r)),
    }
}

fn endpoints_ended(r: Result<Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match r {
        Ok(Ok(())) => anyhow::anyhow!("the health and metrics endpoints stopped"),
        Ok(Err(e)) => e,
        Err(e) => anyhow::anyhow!("the health and metrics endpoints failed: {e}"),
    }
}

/// The cluster model and what comes with its kind of datastore.
struct Model {
    datastore: Arc<dyn Datastore>,
    /// "file PATH" or "kubernetes", for status.
    name: String,
    last_error: LastError,
    /// Where IPAM claims blocks.
    claims: Box<dyn ipam::Datastore>,
    /// A second client of the claims, for `ipam check` and `release`.
    claim_client: Box<dyn ipam::Datastore>,
    /// Kubernetes: the IPAMBlock records borrowing goes through.
    shared: Option<Arc<dyn ipam::borrow::SharedBlocks>>,
    /// Kubernetes: the client configuration for the node-cleanup election,
    /// and whether the model is current.
    cleanup: Option<(kube::Config, super::cleanup::Connected)>,
    /// File datastore: the claim file, read again every `poll` by a node
    /// with BGP off (with Kubernetes the claims are BlockAffinity objects,
    /// already in the model).
    claim_reader: Option<(Box<dyn ipam::Datastore>, Duration)>,
    /// Kubernetes: the client that watches the IPAMBlock records for the
    /// borrowed addresses a node with BGP off routes.
    records: Option<kube::Client>,
    /// Kubernetes: the client IPAM reads pod and namespace annotations with.
    annotations: Option<kube::Client>,
    /// Kubernetes: the Services and EndpointSlices, for Service
    /// advertisement.
    services: Option<watch::Receiver<Arc<crate::services::Catalog>>>,
}

/// Phase 1: open the datastore; a Kubernetes one only once every kind has
/// been listed, since the model is incomplete before.
async fn open_model(cfg: &AgentConfig, ds: DatastoreConfig) -> Result<Model> {
    match ds {
        DatastoreConfig::File { path, poll_ms } => {
            let poll = poll_ms.map(Duration::from_millis).unwrap_or(DEFAULT_POLL);
            let ds = FileDatastore::open(&path, poll)
                .map_err(|e| anyhow::anyhow!("model file {}: {e}", path.display()))?;
            let ds = Arc::new(ds);
            let errors = ds.clone();
            Ok(Model {
                datastore: ds,
                name: format!("file {}", path.display()),
                last_error: Arc::new(move || errors.last_error().map(|e| e.to_string())),
                claims: claims_file(cfg),
                shared: None,
                claim_client: claims_file(cfg),
                cleanup: None,
                claim_reader: Some((claims_file(cfg), poll)),
                records: None,
                annotations: None,
                services: None,
            })
        }
        DatastoreConfig::Kubernetes { kubeconfig } => {
            let kcfg = crate::model::kube::config(kubeconfig.as_deref())
                .await
                .context("Kubernetes client configuration")?;
            let client =
                crate::model::kube::client_of(kcfg.clone()).context("Kubernetes client")?;
            let services = crate::services::watch::start(client.clone());
            let ds = Arc::new(crate::model::kube::KubeDatastore::start(
                client.clone(),
                crate::model::kube::KubeOptions {
                    own_node: Some(cfg.node_name.clone()),
                    ..Default::default()
                },
            ));
            // The watches retry on their own; this logs each wait with the
            // latest error, backing off from 1 s to 30 s.
            let mut wait = Duration::from_secs(1);
            let mut attempt = 1u32;
            while let Err(e) = ds.wait_ready(wait).await {
                warn!(attempt, "waiting for the Kubernetes API: {e}");
                attempt += 1;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            info!(attempts = attempt, "the Kubernetes datastore is synced");
            // The Services listed before the speaker starts, so a restart
            // does not withdraw a Local Service's host routes for a moment.
            let mut services = services;
            let listed = services.wait_for(|c| c.synced);
            if tokio::time::timeout(Duration::from_secs(10), listed)
                .await
                .is_err()
            {
                warn!(
                    "the Services are not listed after 10 s; their host routes follow when they are"
                );
            }
            let claims = crate::ipam::kube::KubeBlockClaims::new(kcfg.clone())
                .context("IPAM block claims over the Kubernetes API")?;
            let claim_client = crate::ipam::kube::KubeBlockClaims::new(kcfg.clone())
                .context("IPAM block claims over the Kubernetes API")?;
            let errors = ds.clone();
            let current = ds.clone();
            Ok(Model {
                datastore: ds,
                name: "kubernetes".into(),
                last_error: Arc::new(move || errors.status().last_error),
                claims: Box::new(claims),
                claim_client: Box::new(claim_client),
                shared: Some(Arc::new(
                    crate::ipam::kube_blocks::KubeSharedBlocks::new(kcfg.clone())
                        .context("IPAM block records over the Kubernetes API")?,
                )),
                cleanup: Some((kcfg, Arc::new(move || current.status().connected))),
                claim_reader: None,
                records: Some(client.clone()),
                annotations: Some(client),
                services: Some(services),
            })
        }
    }
}

/// The VXLAN device sends from the node's address: the next hop the other
/// nodes install for its blocks, from which they derive its VTEP.
fn vteps(snap: &Snapshot, name: &str) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
    let node = snap.node(name);
    (
        node.and_then(|n| n.ipv4_address).map(|a| a.addr()),
        node.and_then(|n| n.ipv6_address).map(|a| a.addr()),
    )
}

/// The running node: the start-up phases in order, then the event loop.
async fn run_node(
    cfg: AgentConfig,
    model: Model,
    obs: Endpoints,
    mut served: Served,
) -> Result<()> {
    let name = cfg.node_name.clone();
    let mut snaps = model.datastore.subscribe();
    let snap = phase(wait_for_node(&mut snaps, &name), &mut served).await?;
    let autodetected = autodetect_address(&cfg, &snap)?;
    let snap = with_address(snap, &name, autodetected.as_ref());
    publish_address(&model, &name, autodetected.as_ref());
    let Some(local) = plan::local(&snap, &name) else {
        bail!("node {name} vanished from the model");
    };
    obs.readiness.set_datastore_synced(true);
    obs.metrics.set_datastore_ready(true);

    let (ipam, pod_mtu) = start_ipam(&cfg, &snap, (model.claims, model.shared))?;
    let ipam_ops = super::ipam_ops::IpamOps {
        node: name.clone(),
        datastore: model.name.clone(),
        ipam: ipam.clone(),
        claims: Arc::from(model.claim_client),
        pods: model.annotations.clone(),
        snaps: snaps.clone(),
        records: model.cleanup.as_ref().map(|(k, _)| k.clone()),
    };
    let ipam = follow_model(&cfg, ipam, model.annotations, snaps.clone());
    let ipam = ipam.with_metrics(obs.metrics.clone());
    let (mut blocks_rx, mut pods_rx) = (ipam.blocks(), ipam.pod_routes());
    let ipam_lent = ipam.lent();
    let blocks = blocks_rx.borrow_and_update().clone();
    let pods = pods_rx.borrow_and_update().clone();

    let (fib, preserved) = phase(
        first_fib_pass(&cfg, vteps(&snap, &name), &blocks, &pods, &obs.readiness),
        &mut served,
    )
    .await?;
    obs.readiness.set_fib_synced(true);
    let nat = start_nat(&obs.readiness)?;
    let (claims, claims_rx) = claims_without_bgp(&cfg, model.claim_reader, model.records).await?;

    let router_id = local
        .router_id
        .unwrap_or_else(|| router_id_from_name(&name));
    let (speaker, events) = start_speaker(&cfg, &local, router_id, preserved, &blocks).await?;
    obs.readiness.set_speaker_running(true);

    let node = Node::new(Started {
        name: name.clone(),
        speaker: speaker.clone(),
        fib: fib.clone(),
        nat: nat.clone(),
        pod_mtu,
        mtu_encapsulation: cfg.encapsulation,
        local: local.clone(),
        snap,
        blocks,
        pods,
        lent: Some(ipam_lent),
        forwarding_preserved: preserved,
        drain: Duration::from_secs(cfg.drain_seconds),
        mesh_warn_nodes: cfg.mesh_warn_nodes,
        autodetected,
        datastore: model.name,
        bgp_enabled: cfg.bgp_enabled,
        claims,
    });
    let control = control::Server {
        shared: node.shared(),
        speaker,
        fib,
        nat,
        datastore_error: model.last_error,
        ipam: ipam_ops,
    }
    .serve(cfg.control_socket.clone());
    let cni = serve_cni(&cfg, ipam);
    if let Some((kcfg, connected)) = model.cleanup {
        // Every agent stands; the Lease's holder releases deleted nodes' blocks.
        tokio::spawn(super::cleanup::run(
            kcfg,
            name.clone(),
            snaps.clone(),
            connected,
        ));
    }
    obs.readiness.set_ipam_serving(true);
    // The loop runs until a signal (a clean stop) or a server fails.
    let until = async {
        tokio::select! {
            r = stopped() => r,
            r = control => r.context("control socket"),
            r = cni => r,
            r = served => Err(endpoints_ended(r)),
        }
    };
    info!(node = %name, asn = local.asn, %router_id, "agent running");
    let inputs = Inputs {
        snaps,
        events,
        blocks: blocks_rx,
        pods: pods_rx,
        claims: claims_rx,
        services: model.services,
    };
    node.run(inputs, &obs, until).await?;
    let _ = std::fs::remove_file(&cfg.socket_path);
    let _ = std::fs::remove_file(&cfg.control_socket);
    Ok(())
}

/// Without BGP the other nodes' blocks come from the datastore's claims:
/// the first read and a watch of them (the file datastore's claim file;
/// with Kubernetes the BlockAffinities are in the model, and the claims
/// are the borrowed addresses of the IPAMBlock records). With BGP, none.
#[allow(clippy::type_complexity)]
async fn claims_without_bgp(
    cfg: &AgentConfig,
    reader: Option<(Box<dyn ipam::Datastore>, Duration)>,
    records: Option<kube::Client>,
) -> Result<(Vec<Claim>, Option<watch::Receiver<Vec<Claim>>>)> {
    if cfg.bgp_enabled {
        return Ok((Vec::new(), None));
    }
    info!("bgpEnabled is false: no BGP; the other nodes' blocks come from the datastore");
    if let Some(client) = records {
        let mut rx = watch_borrowed(client);
        // The first desired set prunes what it lacks: wait for the first
        // LIST (bounded), so a restart does not drop borrowed addresses'
        // routes for a moment.
        let listed = tokio::time::timeout(RECORDS_FIRST_LIST, rx.changed()).await;
        if !matches!(listed, Ok(Ok(()))) {
            warn!(
                "the IPAMBlock records are not listed after {RECORDS_FIRST_LIST:?}; borrowed addresses' routes follow when they are"
            );
        }
        let first = rx.borrow_and_update().clone();
        return Ok((first, Some(rx)));
    }
    let Some((reader, poll)) = reader else {
        return Ok((Vec::new(), None));
    };
    let first = read_claims(&*reader)?;
    let rx = watch_claims(reader, poll, first.clone());
    Ok((first, Some(rx)))
}

/// How long start-up waits for the first LIST of the IPAMBlock records.
const RECORDS_FIRST_LIST: Duration = Duration::from_secs(10);

/// BGP off with Kubernetes: the borrowed addresses of the IPAMBlock
/// records as host claims ([`super::datastore_routes::borrowed_hosts`]),
/// watched; a change goes to the event loop.
fn watch_borrowed(client: kube::Client) -> watch::Receiver<Vec<Claim>> {
    let (tx, rx) = watch::channel(Vec::new());
    let mut listed = false;
    tokio::spawn(ipam::kube_blocks::watch_records(client, move |records| {
        let hosts = super::datastore_routes::borrowed_hosts(&records);
        tx.send_if_modified(|c| {
            // The first LIST is always sent, so start-up hears it.
            let changed = !listed || *c != hosts;
            *c = hosts;
            changed
        });
        listed = true;
        !tx.is_closed()
    }));
    rx
}

/// Phase 2: the first snapshot that has this node. Its agent may start
/// before the operator adds it, so it waits.
async fn wait_for_node(
    snaps: &mut watch::Receiver<Arc<Snapshot>>,
    name: &str,
) -> Result<Arc<Snapshot>> {
    loop {
        let s = snaps.borrow_and_update().clone();
        if s.node(name).is_some() {
            return Ok(s);
        }
        warn!(node = %name, "this node is not in the model yet (no StarlingNode named {name}); waiting");
        if snaps.changed().await.is_err() {
            bail!("the datastore stopped before node {name} appeared");
        }
    }
}

/// Kubernetes: the autodetected address goes into this node's Node
/// annotation, where the other agents read its subnet (a task that keeps it
/// there for the agent's life).
fn publish_address(model: &Model, name: &str, found: Option<&Detected>) {
    if let (Some(client), Some(IpNet::V4(a))) = (&model.annotations, found.map(|d| d.address)) {
        tokio::spawn(crate::model::kube::publish_address(
            client.clone(),
            name.to_string(),
            a,
        ));
    }
}

/// This node's IPv4 address by autodetection, when configured and the
/// model gives none (or only a guess: a Kubernetes Node's InternalIP).
fn autodetect_address(cfg: &AgentConfig, snap: &Snapshot) -> Result<Option<Detected>> {
    let Some(method) = &cfg.autodetect else {
        return Ok(None);
    };
    if snap
        .node(&cfg.node_name)
        .is_some_and(|n| n.ipv4_address.is_some())
        && !snap.guessed.contains(&cfg.node_name)
    {
        return Ok(None);
    }
    let m: autodetect::Method = method
        .parse()
        .map_err(|e| anyhow::anyhow!("config autodetect {method:?}: {e}"))?;
    let d = autodetect::detect(&m, autodetect::Family::V4)
        .map_err(|e| anyhow::anyhow!("autodetecting this node's address ({method}): {e}"))?;
    info!(address = %d.address, reason = %d.reason, "node address autodetected");
    Ok(Some(d))
}

/// The parts of the agent's config [`ipam_model`] reads.
#[derive(Clone)]
struct IpamInputs {
    node_name: String,
    ipam: IpamConfig,
    node_labels: BTreeMap<String, String>,
}

impl IpamInputs {
    fn of(cfg: &AgentConfig) -> IpamInputs {
        IpamInputs {
            node_name: cfg.node_name.clone(),
            ipam: cfg.ipam.clone(),
            node_labels: cfg.node_labels.clone(),
        }
    }
}

type IpamModel = (Vec<ipam::Pool>, BTreeMap<String, String>, Vec<IpNet>);

/// What IPAM takes from the model: the pools (the agent's own config's
/// when it names some), this node's labels (the model's and the config's),
/// and the reserved CIDRs.
fn ipam_model(cfg: &IpamInputs, snap: &Snapshot) -> IpamModel {
    let pools = if cfg.ipam.pools.is_empty() {
        snap.pools
            .iter()
            .map(|(name, p)| ipam::Pool::named(name, &p.spec))
            .collect()
    } else {
        cfg.ipam.pools.clone()
    };
    let mut labels = snap.labels(&cfg.node_name).clone();
    labels.extend(cfg.node_labels.clone());
    (pools, labels, snap.reserved_cidrs())
}

/// IPAM follows the model: pools, node selectors (this node's labels)
/// and reservations are handed to the IPAM thread on every change; with
/// Kubernetes, each ADD reads its pod's annotations.
fn follow_model(
    cfg: &AgentConfig,
    ipam: IpamHandle,
    annotations: Option<kube::Client>,
    mut snaps: watch::Receiver<Arc<Snapshot>>,
) -> IpamHandle {
    let ipam = match annotations {
        Some(client) => ipam.with_annotations(ipam::annotations::AnnotationReader::watching(
            client,
            &cfg.node_name,
        )),
        None => ipam,
    };
    let handle = ipam.clone();
    let cfg = IpamInputs::of(cfg);
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let now = ipam_model(&cfg, &snaps.borrow_and_update());
            if last.as_ref() != Some(&now) {
                let (pools, labels, reserved) = now.clone();
                handle.set_model(pools, labels, reserved).await;
                last = Some(now);
            }
            if snaps.changed().await.is_err() {
                return;
            }
        }
    });
    ipam
}

/// Phase 3: IPAM. Pools and static blocks come from the model unless the
/// agent's own config names them; labels from the model and the config.
fn start_ipam(cfg: &AgentConfig, snap: &Snapshot, claims: Claims) -> Result<(IpamHandle, PodMtu)> {
    let name = &cfg.node_name;
    let (pools, labels, reserved) = ipam_model(&IpamInputs::of(cfg), snap);
    let mut ipam_cfg = cfg.ipam.clone();
    ipam_cfg.pools = pools;
    if let Some(n) = snap.node(name) {
        for c in &n.pod_cidrs {
            if !ipam_cfg.pod_cidrs.contains(c) {
                ipam_cfg.pod_cidrs.push(*c);
            }
        }
    }
    let addresses = own_addresses(snap, name).iter().map(|a| a.addr()).collect();
    let rule = cfg.mtu_rule(mtu_overhead(snap, cfg.encapsulation), addresses)?;
    let defaults = pod_defaults(cfg, rule);
    let mtu = defaults.mtu.clone();
    let handle = open_ipam(cfg, labels, ipam_cfg, defaults, claims, reserved)?;
    Ok((handle, mtu))
}

/// Where IPAM claims blocks, and the records it borrows through.
type Claims = (
    Box<dyn ipam::Datastore>,
    Option<Arc<dyn ipam::borrow::SharedBlocks>>,
);

fn pod_defaults(cfg: &AgentConfig, rule: MtuRule) -> PodDefaults {
    PodDefaults {
        mtu: PodMtu::new(rule),
        route_protocol: cfg.route_protocol().0,
    }
}

/// The block-claim file shared by the agents of a file-datastore cluster.
fn claims_file(cfg: &AgentConfig) -> Box<dyn ipam::Datastore> {
    Box::new(ipam::FileDatastore::new(
        cfg.ipam
            .datastore_file
            .clone()
            .unwrap_or_else(|| cfg.state_dir.join("blocks.json")),
    ))
}

/// Open the allocation store and start IPAM's owner thread.
fn open_ipam(
    cfg: &AgentConfig,
    labels: BTreeMap<String, String>,
    ipam_cfg: IpamConfig,
    defaults: PodDefaults,
    claims: Claims,
    reserved: Vec<IpNet>,
) -> Result<IpamHandle> {
    let store = Store::open(&ipam_server::default_store_path(&cfg.state_dir))?;
    let existing = store.load()?;
    let mut ipam = Ipam::new_sharing(&cfg.node_name, labels, ipam_cfg, claims, existing)?;
    let dropped: Vec<ipam::Change> = ipam
        .take_dropped()
        .into_iter()
        .map(|a| ipam::Change::Remove(a.key))
        .collect();
    if !dropped.is_empty() {
        store.commit(&dropped)?;
    }
    ipam.set_reserved(reserved);
    info!(
        node = %cfg.node_name,
        blocks = ?ipam.blocks(),
        mtu = %defaults.mtu.current().mtu,
        socket = %cfg.socket_path.display(),
        "IPAM ready"
    );
    Ok(IpamHandle::spawn(ipam, store, defaults))
}

/// Phase 4: the FIB first, with only what this node holds and keeping every
/// other route of ours: after a restart the kernel still forwards with the
/// routes the previous run installed. Returns the reconciler and whether
/// it found more of our routes than the local ones (forwarding preserved).
async fn first_fib_pass(
    cfg: &AgentConfig,
    (vtep, vtep6): (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>),
    blocks: &[IpNet],
    pods: &[PodRoute],
    readiness: &Readiness,
) -> Result<(Reconciler, bool)> {
    let fib_cfg = FibConfig {
        table: cfg.route_table.unwrap_or(crate::fib::MAIN_TABLE),
        protocol: cfg.route_protocol(),
        uplink: cfg.uplink.clone(),
        vxlan_local: vtep,
        vxlan_local_v6: vtep6,
        ..FibConfig::default()
    };
    let (fib, task) = Reconciler::new(fib_cfg);
    // Netlink waits for each reply: a current-thread runtime of its own.
    // Its end (error or panic) fails /healthz: without it no route changes.
    let thread = crate::runtime::spawn_with_runtime("fib", move || async move {
        task.run().await.map_err(|e| e.to_string())
    })
    .context("starting the FIB thread")?;
    readiness
        .supervise("the FIB reconciler", thread)
        .context("starting the FIB thread's watcher")?;
    let local_routes = routes::desired(&routes::Inputs {
        lent: &[],
        blocks,
        pods,
        learned: &BTreeMap::new(),
        pools: &[],
        own: &[],
    })
    .routes;
    let mut fib_status = fib.watch_status();
    let generation = fib.set_desired_keep_stale(local_routes.clone())?;
    let first = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if fib_status.borrow_and_update().generation >= generation {
                return Ok(fib_status.borrow().clone());
            }
            fib_status.changed().await?;
        }
    })
    .await
    .context("the FIB reconciler did not finish its first pass within 30 s")?
    .map_err(|_: watch::error::RecvError| anyhow::anyhow!("the FIB reconciler stopped"))?;
    // Routes of ours beyond the local ones: a previous run's learned routes,
    // still forwarding. Peers are told (GR F bit) and this node defers its
    // decisions until they have all sent End-of-RIB.
    let preserved = first.installed > local_routes.len();
    info!(
        installed = first.installed,
        local = local_routes.len(),
        preserved,
        "FIB first pass done"
    );
    Ok((fib, preserved))
}

/// The NAT reconciler on a thread of its own (it runs `nft`). It does
/// nothing until the event loop's first desired rules, so a restarted
/// agent leaves the previous run's table in place until it knows the pools.
/// A failure of `nft` is its status and metric, never the agent's end; the
/// thread's end (a panic) fails /healthz, as the FIB's does.
fn start_nat(readiness: &Readiness) -> Result<NatReconciler> {
    let (nat, task) = NatReconciler::new(None);
    let thread = crate::runtime::spawn_with_runtime("nat", move || async move {
        task.run().await;
        Ok(())
    })
    .context("starting the NAT thread")?;
    readiness
        .supervise("the NAT reconciler", thread)
        .context("starting the NAT thread's watcher")?;
    Ok(nat)
}

/// Phase 5: the BGP speaker, announcing this node's blocks.
async fn start_speaker(
    cfg: &AgentConfig,
    local: &LocalBgp,
    router_id: Ipv4Addr,
    forwarding_preserved: bool,
    blocks: &[IpNet],
) -> Result<(Speaker, mpsc::UnboundedReceiver<RouteEvent>)> {
    let mut scfg = SpeakerConfig::new(local.asn, router_id);
    // BGP off: the speaker stays without listeners and without peers (the
    // event loop gives it none), so the node opens no BGP port.
    // bindMode: NodeIP gives the node's addresses; otherwise every address.
    scfg.listen = if cfg.bgp_enabled && !local.listen_addresses.is_empty() {
        local
            .listen_addresses
            .iter()
            .map(|a| SocketAddr::new(*a, local.listen_port))
            .collect()
    } else if cfg.bgp_enabled {
        vec![
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, local.listen_port)),
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, local.listen_port)),
        ]
    } else {
        Vec::new()
    };
    scfg.graceful_restart = Some(local.restart_time.max(1));
    scfg.forwarding_preserved = forwarding_preserved;
    scfg.cluster_id = local.cluster_id;
    scfg.max_paths = cfg.max_paths;
    let (speaker, events) = Speaker::start(scfg)
        .await
        .context("starting the BGP speaker")?;
    for b in blocks {
        speaker.announce(*b)?;
    }
    Ok((speaker, events))
}

/// The claim file's claims, sorted, for a node with BGP off.
fn read_claims(reader: &dyn ipam::Datastore) -> Result<Vec<Claim>> {
    let mut claims: Vec<Claim> = reader
        .affinities()
        .context(
            "reading the block claims (bgpEnabled is false: they route the other nodes' blocks)",
        )?
        .into_iter()
        .map(|a| (a.block, a.node))
        .collect();
    claims.sort();
    Ok(claims)
}

/// Re-read the claim file every `poll`; a change goes to the event loop.
/// A read that fails keeps the last claims (logged once per error).
fn watch_claims(
    reader: Box<dyn ipam::Datastore>,
    poll: Duration,
    first: Vec<Claim>,
) -> watch::Receiver<Vec<Claim>> {
    let (tx, rx) = watch::channel(first);
    let reader: Arc<dyn ipam::Datastore> = Arc::from(reader);
    tokio::spawn(async move {
        let mut last_error = String::new();
        let mut every = tokio::time::interval(poll);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let r = reader.clone();
            match tokio::task::spawn_blocking(move || read_claims(&*r)).await {
                Ok(Ok(claims)) => {
                    last_error.clear();
                    tx.send_if_modified(|c| {
                        let changed = *c != claims;
                        *c = claims;
                        changed
                    });
                }
                Ok(Err(e)) => {
                    let e = format!("{e:#}");
                    if e != last_error {
                        warn!("{e}; keeping the claims last read");
                        last_error = e;
                    }
                }
                Err(e) => warn!("reading the block claims: {e}"),
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// A router ID for a node without an IPv4 address: stable, from its name.
fn router_id_from_name(name: &str) -> Ipv4Addr {
    let mut h: u32 = 2166136261;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    // Class E space, so it never equals a real address.
    Ipv4Addr::from(0xf000_0000 | (h & 0x0fff_ffff))
}

/// IPAM only: the CNI socket (and the endpoints when configured).
async fn run_ipam_only(cfg: AgentConfig, obs: Endpoints, mut served: Served) -> Result<()> {
    info!("no datastore configured: serving IPAM only (no BGP, no FIB)");
    let overhead = cfg.encapsulation.map_or(0, |e| e.overhead(false));
    let defaults = pod_defaults(&cfg, cfg.mtu_rule(overhead, Vec::new())?);
    let handle = open_ipam(
        &cfg,
        cfg.node_labels.clone(),
        cfg.ipam.clone(),
        defaults,
        (claims_file(&cfg), None),
        Vec::new(),
    )?;
    obs.readiness.set_datastore_synced(true);
    obs.readiness.set_fib_synced(true);
    obs.readiness.set_speaker_running(true);
    obs.readiness.set_ipam_serving(true);
    let handle = handle.with_metrics(obs.metrics.clone());
    tokio::select! {
        r = serve_cni(&cfg, handle) => r?,
        r = &mut served => return Err(endpoints_ended(r)),
        r = stopped() => r?,
    }
    let _ = std::fs::remove_file(&cfg.socket_path);
    Ok(())
}

async fn serve_cni(cfg: &AgentConfig, handle: IpamHandle) -> Result<()> {
    let listener = starling_bgp::jsonl::bind(&cfg.socket_path)
        .with_context(|| format!("cannot listen on {}", cfg.socket_path.display()))?;
    ipam_server::serve(listener, handle)
        .await
        .context("serving the CNI socket")
}

/// Serve the health and metrics endpoints if configured; otherwise never
/// finish.
async fn serve_endpoints(obs: Endpoints, cfg: Option<EndpointConfig>) -> Result<()> {
    match cfg {
        Some(c) => crate::health::run(&c, obs)
            .await
            .context("health and metrics endpoints"),
        None => std::future::pending().await,
    }
}

async fn stopped() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping; routes stay in the kernel and peers keep ours (graceful restart)"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: stopping"),
    }
    Ok(())
}
