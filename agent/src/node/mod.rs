//! The running agent on one node: the model (a [`Datastore`]) drives the
//! peering plan of the BGP speaker; IPAM's blocks become BGP exports and
//! blackholes; learned routes and pod routes become the FIB reconciler's
//! desired set. See docs/architecture.md for the flow and the restart story.

pub mod control;
pub mod routes;

use crate::encap::Encapsulation;
use crate::fib::{FibConfig, Reconciler, Route, RouteProtocol};
use crate::ipam::server::{self as ipam_server, IpamHandle, PodDefaults};
use crate::ipam::{self, Ipam, IpamConfig, Store};
use crate::model::file::DEFAULT_POLL;
use crate::model::plan::{self, LocalBgp};
use crate::model::{Datastore, FileDatastore, Snapshot};
use anyhow::{Context, Result, bail};
use control::{BlockUsage, IpamReport, NodeStatus, PoolUsage, Reply, Request, RoutesReport};
use ipnet::IpNet;
use serde::Deserialize;
use starling_bgp::policy::{PolicyRule, Verdict};
use starling_bgp::{PeerConfig, RouteEvent, Speaker, SpeakerConfig};
use starling_cni_proto::PodRoute;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// Where the cluster model comes from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum DatastoreConfig {
    /// A YAML stream of IPPool, BGPConfiguration, BGPPeer and StarlingNode
    /// objects, reloaded when it changes.
    File {
        path: PathBuf,
        #[serde(default, rename = "pollMs")]
        poll_ms: Option<u64>,
    },
    /// The CRDs and Nodes of a Kubernetes cluster; block claims are
    /// BlockAffinity objects.
    Kubernetes {
        /// A kubeconfig; without one, the in-cluster ServiceAccount.
        #[serde(default)]
        kubeconfig: Option<PathBuf>,
    },
}

/// `starling-agent run --config FILE`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name in the model; `$NODE_NAME` when absent.
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
    pub state_dir: PathBuf,
    /// The CNI plugin's socket.
    #[serde(default = "default_socket")]
    pub socket_path: PathBuf,
    /// `starlingctl`'s socket.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// The cluster model. Without one the agent serves IPAM only (no BGP, no
    /// FIB), from the `ipam` section.
    #[serde(default)]
    pub datastore: Option<DatastoreConfig>,
    /// Pod MTU; when absent, the uplink's MTU minus the encapsulation overhead.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The device towards other nodes; default: that of the IPv4 default route.
    #[serde(default)]
    pub uplink: Option<String>,
    /// Overrides the encapsulation the pools imply, for the MTU.
    #[serde(default)]
    pub encapsulation: Option<Encapsulation>,
    #[serde(default)]
    pub route_protocol: Option<u8>,
    /// Kernel table for routes to other nodes and pods (default: main).
    #[serde(default)]
    pub route_table: Option<u32>,
    /// Largest ECMP set per prefix.
    #[serde(default = "default_max_paths")]
    pub max_paths: usize,
    /// How long a session the new plan drops is kept while its routes are
    /// not yet learned another way (make-before-break), in seconds.
    #[serde(default = "default_drain")]
    pub drain_seconds: u64,
    #[serde(default)]
    pub ipam: IpamConfig,
    /// How to find this node's IPv4 address when the model gives none:
    /// `first-found`, `interface=REGEX`, `skip-interface=REGEX`,
    /// `can-reach=ADDR`, `cidr=CIDR[,CIDR]` (Calico's methods).
    #[serde(default)]
    pub autodetect: Option<String>,
    /// Health probes and Prometheus metrics. With a datastore they are
    /// served at 127.0.0.1:9099 (probes) and 0.0.0.0:9091 (metrics) unless
    /// set; an IPAM-only agent serves them only when set.
    #[serde(default)]
    pub endpoints: Option<crate::health::EndpointConfig>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(starling_cni_proto::DEFAULT_SOCKET)
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(control::DEFAULT_CONTROL_SOCKET)
}

fn default_max_paths() -> usize {
    8
}

fn default_drain() -> u64 {
    30
}

/// Connect retry time (seconds) of sessions the plan makes.
const NODE_CONNECT_RETRY: u16 = 2;

/// How long a covered draining session is kept before it is closed.
const DRAIN_HOLD: Duration = Duration::from_secs(1);

/// The route protocol number pod host routes carry by default: the FIB
/// reconciler's own.
const DEFAULT_ROUTE_PROTOCOL: u8 = RouteProtocol::STARLING.0;

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: AgentConfig =
            serde_yaml::from_str(&text).with_context(|| format!("config {}", path.display()))?;
        if cfg.node_name.is_empty() {
            cfg.node_name = std::env::var("NODE_NAME").unwrap_or_default();
        }
        if cfg.node_name.is_empty() {
            bail!(
                "config {}: nodeName is missing and $NODE_NAME is not set",
                path.display()
            );
        }
        if cfg.max_paths == 0 {
            bail!("config {}: maxPaths must be at least 1", path.display());
        }
        Ok(cfg)
    }

    fn pod_mtu(&self, pools_encap: Encapsulation) -> Result<u32> {
        if let Some(mtu) = self.mtu {
            if !(576..=65535).contains(&mtu) {
                bail!("mtu {mtu} is outside 576..=65535");
            }
            return Ok(mtu);
        }
        let uplink_mtu = match &self.uplink {
            Some(dev) => {
                let p = format!("/sys/class/net/{dev}/mtu");
                std::fs::read_to_string(&p)
                    .with_context(|| format!("uplink {dev}: cannot read {p}"))?
                    .trim()
                    .parse::<u32>()
                    .with_context(|| format!("uplink {dev}: {p} is not a number"))?
            }
            None => 1500,
        };
        let encap = self.encapsulation.unwrap_or(pools_encap);
        Ok(uplink_mtu.saturating_sub(encap.overhead()))
    }
}

/// The encapsulation the enabled pools need at worst, for the pod MTU.
fn pools_encapsulation(snap: &Snapshot) -> Encapsulation {
    snap.pools
        .values()
        .filter(|p| !p.spec.disabled)
        .map(|p| p.spec.encapsulation())
        .max_by_key(|e| e.overhead())
        .unwrap_or_default()
}

/// Run the agent until SIGTERM or ^C.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create stateDir {}", cfg.state_dir.display()))?;
    match cfg.datastore.clone() {
        None => run_ipam_only(cfg).await,
        Some(DatastoreConfig::File { path, poll_ms }) => {
            let poll = poll_ms.map(Duration::from_millis).unwrap_or(DEFAULT_POLL);
            let ds = FileDatastore::open(&path, poll)
                .map_err(|e| anyhow::anyhow!("model file {}: {e}", path.display()))?;
            let name = format!("file {}", path.display());
            let ds = Arc::new(ds);
            let errors: Arc<dyn Fn() -> Option<String> + Send + Sync> = {
                let ds = ds.clone();
                Arc::new(move || ds.last_error().map(|e| e.to_string()))
            };
            let claims = claims_file(&cfg);
            run_node(cfg, ds, name, errors, claims).await
        }
        Some(DatastoreConfig::Kubernetes { kubeconfig }) => {
            let kcfg = crate::model::kube::config(kubeconfig.as_deref())
                .await
                .context("Kubernetes client configuration")?;
            let client = kube::Client::try_from(kcfg.clone()).context("Kubernetes client")?;
            let ds = Arc::new(crate::model::kube::KubeDatastore::start(
                client,
                crate::model::kube::KubeOptions::default(),
            ));
            // The model is only complete after the first list of every kind.
            while let Err(e) = ds.wait_ready(Duration::from_secs(30)).await {
                warn!("waiting for the Kubernetes API: {e}");
            }
            let claims: Box<dyn ipam::Datastore> = Box::new(
                crate::ipam::kube::KubeBlockClaims::new(kcfg)
                    .context("IPAM block claims over the Kubernetes API")?,
            );
            let errors: Arc<dyn Fn() -> Option<String> + Send + Sync> = {
                let ds = ds.clone();
                Arc::new(move || ds.status().last_error)
            };
            run_node(cfg, ds, "kubernetes".into(), errors, claims).await
        }
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

fn open_ipam(
    cfg: &AgentConfig,
    labels: BTreeMap<String, String>,
    ipam_cfg: IpamConfig,
    defaults: PodDefaults,
    claims: Box<dyn ipam::Datastore>,
) -> Result<IpamHandle> {
    let store = Store::open(&ipam_server::default_store_path(&cfg.state_dir))?;
    let existing = store.load()?;
    let ipam = Ipam::new(&cfg.node_name, labels, ipam_cfg, claims, existing)?;
    info!(
        node = %cfg.node_name,
        blocks = ?ipam.blocks(),
        mtu = defaults.mtu,
        socket = %cfg.socket_path.display(),
        "IPAM ready"
    );
    Ok(IpamHandle::spawn(ipam, store, defaults))
}

async fn serve_cni(cfg: &AgentConfig, handle: IpamHandle) -> Result<()> {
    let listener = starling_bgp::jsonl::bind(&cfg.socket_path)
        .with_context(|| format!("cannot listen on {}", cfg.socket_path.display()))?;
    ipam_server::serve(listener, handle)
        .await
        .context("serving the CNI socket")
}

async fn run_ipam_only(cfg: AgentConfig) -> Result<()> {
    info!("no datastore configured: serving IPAM only (no BGP, no FIB)");
    let defaults = PodDefaults {
        mtu: cfg.pod_mtu(Encapsulation::None)?,
        route_protocol: cfg.route_protocol.unwrap_or(DEFAULT_ROUTE_PROTOCOL),
    };
    let handle = open_ipam(
        &cfg,
        cfg.node_labels.clone(),
        cfg.ipam.clone(),
        defaults,
        claims_file(&cfg),
    )?;
    let obs = Observability::new();
    obs.readiness.set_datastore_synced(true);
    obs.readiness.set_fib_synced(true);
    obs.readiness.set_ipam_serving(true);
    let handle = handle.with_metrics(obs.metrics.clone());
    let endpoints = obs.serve(cfg.endpoints.clone());
    tokio::select! {
        r = serve_cni(&cfg, handle) => r?,
        r = endpoints => r?,
        r = stopped() => r?,
    }
    let _ = std::fs::remove_file(&cfg.socket_path);
    Ok(())
}

async fn stopped() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping; routes stay in the kernel and peers keep ours (graceful restart)"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: stopping"),
    }
    Ok(())
}

/// Metrics and readiness, shared by the loops that set them.
#[derive(Clone)]
struct Observability {
    metrics: crate::metrics::Metrics,
    readiness: crate::health::Readiness,
}

impl Observability {
    fn new() -> Observability {
        Observability {
            metrics: crate::metrics::Metrics::new(env!("CARGO_PKG_VERSION")),
            readiness: crate::health::Readiness::new(),
        }
    }

    /// Serve the endpoints if configured; otherwise never finish.
    async fn serve(&self, cfg: Option<crate::health::EndpointConfig>) -> Result<()> {
        match cfg {
            Some(c) => crate::health::run(
                &c,
                crate::health::Endpoints {
                    metrics: self.metrics.clone(),
                    readiness: self.readiness.clone(),
                },
            )
            .await
            .context("health and metrics endpoints"),
            None => std::future::pending().await,
        }
    }
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

/// Default policy for eBGP peers, which RFC 8212 leaves exchanging nothing:
/// export this node's own blocks, import everything. Only our own blocks:
/// re-advertising the other nodes' blocks would make the router send their
/// traffic through us.
fn ebgp_defaults(mut pc: PeerConfig, local_asn: u32, blocks: &[IpNet]) -> PeerConfig {
    if pc.asn == local_asn {
        return pc;
    }
    if pc.import.is_none() {
        pc.import = Some(vec![PolicyRule {
            prefix: None,
            ge: None,
            le: None,
            community: None,
            action: Verdict::Accept,
            set: None,
        }]);
    }
    if pc.export.is_none() {
        pc.export = Some(
            blocks
                .iter()
                .map(|b| PolicyRule {
                    prefix: Some(*b),
                    ge: None,
                    le: None,
                    community: None,
                    action: Verdict::Accept,
                    set: None,
                })
                .collect(),
        );
    }
    pc
}

/// What the control socket reads; the main loop writes it.
#[derive(Default)]
struct Shared {
    status: NodeStatus,
    desired: Vec<Route>,
    pods: Vec<PodRoute>,
    pools: Vec<crate::model::crd::IPPoolSpec>,
}

struct Node {
    name: String,
    speaker: Speaker,
    fib: Reconciler,
    local: LocalBgp,
    snap: Arc<Snapshot>,
    own: Vec<IpAddr>,
    blocks: Vec<IpNet>,
    pods: Vec<PodRoute>,
    learned: BTreeMap<IpNet, Vec<IpAddr>>,
    synced: bool,
    applied: BTreeMap<IpAddr, PeerConfig>,
    /// Sessions the plan dropped, since when: kept until their routes have
    /// another path (or the drain time passes): make-before-break.
    draining: BTreeMap<IpAddr, Instant>,
    drain: Duration,
    last_desired: Option<Vec<Route>>,
    shared: Arc<Mutex<Shared>>,
    /// This node's address found by `autodetect`, when the model has none.
    autodetected: Option<crate::autodetect::Detected>,
}

fn own_addresses(snap: &Snapshot, node: &str) -> Vec<IpNet> {
    snap.node(node)
        .map(|n| {
            n.ipv4_address
                .map(IpNet::V4)
                .into_iter()
                .chain(n.ipv6_address.map(IpNet::V6))
                .collect()
        })
        .unwrap_or_default()
}

async fn run_node(
    cfg: AgentConfig,
    ds: Arc<dyn Datastore>,
    datastore_name: String,
    datastore_error: Arc<dyn Fn() -> Option<String> + Send + Sync>,
    claims: Box<dyn ipam::Datastore>,
) -> Result<()> {
    let name = cfg.node_name.clone();
    let mut snaps = ds.subscribe();
    // A node that is not in the model yet waits for it: its agent may start
    // before the operator adds it.
    let snap = loop {
        let s = snaps.borrow_and_update().clone();
        if s.node(&name).is_some() {
            break s;
        }
        warn!(node = %name, "this node is not in the model yet (no StarlingNode named {name}); waiting");
        if snaps.changed().await.is_err() {
            bail!("the datastore stopped before node {name} appeared");
        }
    };
    let autodetected = autodetect(&cfg, &snap)?;
    let snap = with_address(snap, &name, autodetected.as_ref());
    let Some(local) = plan::local(&snap, &name) else {
        bail!("node {name} vanished from the model");
    };

    // IPAM: pools and static blocks come from the model unless the agent's
    // own config names them.
    let mut ipam_cfg = cfg.ipam.clone();
    if ipam_cfg.pools.is_empty() {
        ipam_cfg.pools = snap
            .pools
            .values()
            .map(|p| ipam::Pool::from(&p.spec))
            .collect();
    }
    if let Some(n) = snap.node(&name) {
        for c in &n.pod_cidrs {
            if !ipam_cfg.pod_cidrs.contains(c) {
                ipam_cfg.pod_cidrs.push(*c);
            }
        }
    }
    let mut labels = snap.labels(&name).clone();
    labels.extend(cfg.node_labels.clone());
    let defaults = PodDefaults {
        mtu: cfg.pod_mtu(pools_encapsulation(&snap))?,
        route_protocol: cfg.route_protocol.unwrap_or(DEFAULT_ROUTE_PROTOCOL),
    };
    let obs = Observability::new();
    obs.readiness.set_datastore_synced(true);
    obs.metrics.set_datastore_ready(true);
    let ipam =
        open_ipam(&cfg, labels, ipam_cfg, defaults, claims)?.with_metrics(obs.metrics.clone());
    let mut blocks_rx = ipam.blocks();
    let mut pods_rx = ipam.pod_routes();
    let blocks = blocks_rx.borrow_and_update().clone();
    let pods = pods_rx.borrow_and_update().clone();

    // The FIB first, with only what this node holds and keeping every other
    // route of ours: after a restart the kernel still forwards with the
    // routes the previous run installed.
    let fib_cfg = FibConfig {
        table: cfg.route_table.unwrap_or(crate::fib::MAIN_TABLE),
        protocol: RouteProtocol(defaults.route_protocol),
        uplink: cfg.uplink.clone(),
        ..FibConfig::default()
    };
    let (fib, task) = Reconciler::new(fib_cfg);
    // Netlink waits for each reply: a current-thread runtime of its own.
    crate::runtime::spawn_with_runtime("fib", move || async move {
        if let Err(e) = task.run().await {
            tracing::error!("FIB reconciler stopped: {e}");
        }
    })
    .context("starting the FIB thread")?;
    let local_routes = routes::desired(&routes::Inputs {
        blocks: &blocks,
        pods: &pods,
        learned: &BTreeMap::new(),
        pools: &[],
        own: &[],
    });
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
    obs.readiness.set_fib_synced(true);
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

    let router_id = local
        .router_id
        .unwrap_or_else(|| router_id_from_name(&name));
    let mut scfg = SpeakerConfig::new(local.asn, router_id);
    scfg.listen = vec![
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, local.listen_port)),
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, local.listen_port)),
    ];
    scfg.graceful_restart = Some(local.restart_time.max(1));
    scfg.forwarding_preserved = preserved;
    scfg.cluster_id = local.cluster_id;
    scfg.max_paths = cfg.max_paths;
    let (speaker, mut events) = Speaker::start(scfg)
        .await
        .context("starting the BGP speaker")?;
    for b in &blocks {
        speaker.announce(*b)?;
    }

    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut node = Node {
        name: name.clone(),
        speaker: speaker.clone(),
        fib: fib.clone(),
        local,
        own: own_addresses(&snap, &name)
            .iter()
            .map(|n| n.addr())
            .collect(),
        snap: snap.clone(),
        blocks,
        pods,
        learned: BTreeMap::new(),
        synced: !preserved,
        applied: BTreeMap::new(),
        draining: BTreeMap::new(),
        drain: Duration::from_secs(cfg.drain_seconds),
        last_desired: None,
        shared: shared.clone(),
        autodetected: autodetected.clone(),
    };
    {
        let mut sh = lock(&shared);
        sh.status = NodeStatus {
            node: name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            address_source: match &autodetected {
                Some(d) => format!("autodetection ({})", d.reason),
                None => format!("the model (node {name})"),
            },
            datastore: datastore_name,
            forwarding_preserved: preserved,
            ..NodeStatus::default()
        };
    }
    node.apply_plan().await;
    node.publish()?;

    let control = serve_control(
        cfg.control_socket.clone(),
        ControlState {
            shared: shared.clone(),
            speaker: speaker.clone(),
            fib: fib.clone(),
            datastore_error,
        },
    );
    let cni = serve_cni(&cfg, ipam);
    obs.readiness.set_ipam_serving(true);
    let endpoints = obs.serve(Some(cfg.endpoints.clone().unwrap_or_default()));
    tokio::pin!(control);
    tokio::pin!(cni);
    tokio::pin!(endpoints);
    let mut observe = tokio::time::interval(Duration::from_secs(2));
    let stop = stopped();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(node = %name, asn = local.asn, %router_id, "agent running");
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            r = &mut control => return r.context("control socket"),
            r = &mut cni => return r,
            r = &mut endpoints => return r,
            _ = observe.tick() => {
                if let Ok(sessions) = speaker.sessions().await {
                    obs.metrics.observe_sessions(&sessions);
                    obs.readiness.observe_sessions(&sessions);
                }
                obs.metrics.observe_fib(&fib.status());
                obs.metrics.observe_ipam(&node.ipam_status());
            }
            r = snaps.changed() => {
                if r.is_err() { bail!("the datastore stopped"); }
                let s = snaps.borrow_and_update().clone();
                node.model_changed(s).await;
                node.publish()?;
            }
            ev = events.recv() => {
                let Some(ev) = ev else { bail!("the BGP speaker stopped") };
                node.route_event(ev);
                // Take the whole burst before recomputing.
                while let Ok(ev) = events.try_recv() {
                    node.route_event(ev);
                }
                node.publish()?;
            }
            r = blocks_rx.changed() => {
                if r.is_err() { bail!("IPAM stopped"); }
                let b = blocks_rx.borrow_and_update().clone();
                node.blocks_changed(b).await?;
                node.publish()?;
            }
            r = pods_rx.changed() => {
                if r.is_err() { bail!("IPAM stopped"); }
                node.pods = pods_rx.borrow_and_update().clone();
                node.publish()?;
            }
            _ = tick.tick(), if !node.draining.is_empty() => {
                node.drain_step().await;
                node.publish()?;
            }
        }
    }
    let _ = std::fs::remove_file(&cfg.socket_path);
    let _ = std::fs::remove_file(&cfg.control_socket);
    Ok(())
}

/// This node's IPv4 address by autodetection, when configured and the
/// model gives none.
fn autodetect(cfg: &AgentConfig, snap: &Snapshot) -> Result<Option<crate::autodetect::Detected>> {
    let Some(method) = &cfg.autodetect else {
        return Ok(None);
    };
    if snap
        .node(&cfg.node_name)
        .is_some_and(|n| n.ipv4_address.is_some())
    {
        return Ok(None);
    }
    let m: crate::autodetect::Method = method
        .parse()
        .map_err(|e| anyhow::anyhow!("config autodetect {method:?}: {e}"))?;
    let d = crate::autodetect::detect(&m, crate::autodetect::Family::V4)
        .map_err(|e| anyhow::anyhow!("autodetecting this node's address ({method}): {e}"))?;
    info!(address = %d.address, reason = %d.reason, "node address autodetected");
    Ok(Some(d))
}

/// The snapshot with this node's autodetected address filled in.
fn with_address(
    snap: Arc<Snapshot>,
    node: &str,
    found: Option<&crate::autodetect::Detected>,
) -> Arc<Snapshot> {
    let Some(IpNet::V4(a)) = found.map(|d| d.address) else {
        return snap;
    };
    if snap.node(node).is_none_or(|n| n.ipv4_address.is_some()) {
        return snap;
    }
    let mut s = (*snap).clone();
    if let Some(n) = s.nodes.get_mut(node) {
        n.spec.ipv4_address = Some(a);
    }
    Arc::new(s)
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Node {
    fn route_event(&mut self, ev: RouteEvent) {
        match ev {
            RouteEvent::Change(c) => {
                let hops: Vec<IpAddr> = c.paths.iter().filter_map(|p| p.next_hop).collect();
                if hops.is_empty() {
                    self.learned.remove(&c.prefix);
                } else {
                    self.learned.insert(c.prefix, hops);
                }
            }
            RouteEvent::Synced => {
                if !self.synced {
                    info!(
                        "every peer sent End-of-RIB: removing routes not refreshed since the restart"
                    );
                }
                self.synced = true;
                // Force a send: the same set now prunes.
                self.last_desired = None;
            }
        }
    }

    async fn blocks_changed(&mut self, blocks: Vec<IpNet>) -> Result<()> {
        for b in blocks.iter().filter(|b| !self.blocks.contains(b)) {
            info!(block = %b, "announcing a new block");
            self.speaker.announce(*b)?;
        }
        for b in self.blocks.iter().filter(|b| !blocks.contains(b)) {
            info!(block = %b, "withdrawing a released block");
            self.speaker.withdraw(*b)?;
        }
        self.blocks = blocks;
        // eBGP export rules name the blocks.
        self.apply_plan().await;
        Ok(())
    }

    async fn model_changed(&mut self, snap: Arc<Snapshot>) {
        let snap = with_address(snap, &self.name, self.autodetected.as_ref());
        if snap.node(&self.name).is_none() {
            // Deleting the node's object is not a reason to stop forwarding:
            // keep the last plan until the operator removes the agent.
            warn!(node = %self.name, "this node is no longer in the model; keeping the current sessions");
            return;
        }
        if let Some(local) = plan::local(&snap, &self.name) {
            if local.cluster_id != self.local.cluster_id
                && let Some(id) = local.cluster_id
            {
                info!(cluster_id = %id, "this node is now a route reflector");
                if let Err(e) = self.speaker.set_cluster_id(id) {
                    warn!("cannot set the cluster ID: {e}");
                }
            }
            if local.asn != self.local.asn || local.listen_port != self.local.listen_port {
                warn!(
                    old_asn = self.local.asn,
                    new_asn = local.asn,
                    "the node's AS number or BGP port changed; it takes effect when the agent restarts"
                );
            }
            self.local.cluster_id = local.cluster_id;
        }
        self.own = own_addresses(&snap, &self.name)
            .iter()
            .map(|n| n.addr())
            .collect();
        self.snap = snap;
        self.apply_plan().await;
    }

    /// Bring the speaker's peers to the plan: new and changed sessions at
    /// once; dropped sessions to nodes still in the model only once their
    /// routes are learned another way (mesh → reflectors loses nothing).
    async fn apply_plan(&mut self) {
        let p = plan::plan_detailed(&self.snap, &self.name);
        for w in &p.warnings {
            warn!("peering plan: {w}");
        }
        let asn = self.local.asn;
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
                (pc.address, ebgp_defaults(pc, asn, &self.blocks))
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
        let node_addresses: BTreeSet<IpAddr> = self
            .snap
            .nodes
            .iter()
            .filter(|(n, _)| **n != self.name)
            .flat_map(|(_, n)| {
                n.spec
                    .ipv4_address
                    .map(|a| IpAddr::V4(a.addr()))
                    .into_iter()
                    .chain(n.spec.ipv6_address.map(|a| IpAddr::V6(a.addr())))
            })
            .collect();
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
                self.remove_peer(addr).await;
            }
        }
        let mut sh = lock(&self.shared);
        sh.status.warnings = p.warnings;
    }

    async fn remove_peer(&mut self, addr: IpAddr) {
        info!(peer = %addr, "removing peer");
        if let Err(e) = self.speaker.remove_peer(addr).await {
            warn!(peer = %addr, "cannot remove the peer: {e}");
        }
        self.applied.remove(&addr);
        self.draining.remove(&addr);
    }

    /// Drop draining sessions whose every prefix has a path through a peer
    /// that stays.
    async fn drain_step(&mut self) {
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
            self.remove_peer(addr).await;
        }
    }

    fn ipam_status(&self) -> starling_cni_proto::StatusReply {
        starling_cni_proto::StatusReply {
            ready: !self.blocks.is_empty(),
            reason: String::new(),
            node: self.name.clone(),
            blocks: self.blocks.clone(),
            // One host route per address: the gauges count addresses.
            allocated: self.pods.len(),
        }
    }

    /// Recompute the desired FIB and refresh what the control socket shows.
    fn publish(&mut self) -> Result<()> {
        let pools: Vec<_> = self.snap.pools.values().map(|p| p.spec.clone()).collect();
        let desired = routes::desired(&routes::Inputs {
            blocks: &self.blocks,
            pods: &self.pods,
            learned: &self.learned,
            pools: &pools,
            own: &self.own,
        });
        if self.last_desired.as_ref() != Some(&desired) {
            if self.synced {
                self.fib.set_desired(desired.clone())?;
            } else {
                self.fib.set_desired_keep_stale(desired.clone())?;
            }
            self.last_desired = Some(desired.clone());
        }
        let mut sh = lock(&self.shared);
        sh.desired = desired;
        sh.pods = self.pods.clone();
        sh.pools = pools;
        let st = &mut sh.status;
        st.addresses = own_addresses(&self.snap, &self.name);
        st.asn = self.local.asn;
        st.router_id = self.local.router_id;
        st.cluster_id = self.local.cluster_id;
        st.synced = self.synced;
        st.draining = self.draining.keys().copied().collect();
        st.blocks = self.blocks.clone();
        st.pods = self.pods.len();
        Ok(())
    }
}

/// What the control socket answers from: the main loop's published state
/// and live queries to the speaker and the FIB.
#[derive(Clone)]
struct ControlState {
    shared: Arc<Mutex<Shared>>,
    speaker: Speaker,
    fib: Reconciler,
    datastore_error: Arc<dyn Fn() -> Option<String> + Send + Sync>,
}

async fn serve_control(path: PathBuf, state: ControlState) -> Result<()> {
    let listener = starling_bgp::jsonl::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    starling_bgp::jsonl::serve(listener, move |req| {
        let state = state.clone();
        async move { state.answer(req).await }
    })
    .await?;
    Ok(())
}

impl ControlState {
    async fn answer(&self, req: Request) -> Reply {
        match req {
            Request::Status => match self.speaker.sessions().await {
                Ok(sessions) => {
                    let mut st = lock(&self.shared).status.clone();
                    st.sessions = sessions;
                    st.fib = self.fib.status();
                    st.datastore_error = (self.datastore_error)();
                    Reply::Status(st)
                }
                Err(e) => Reply::Error(e.to_string()),
            },
            Request::Routes => match self.speaker.routes().await {
                Ok(bgp) => Reply::Routes(RoutesReport {
                    bgp,
                    fib: lock(&self.shared).desired.clone(),
                }),
                Err(e) => Reply::Error(e.to_string()),
            },
            Request::Ipam => Reply::Ipam(ipam_report(&lock(&self.shared))),
            Request::Summary => match self.speaker.summary().await {
                Ok(s) => Reply::Summary(s),
                Err(e) => Reply::Error(e.to_string()),
            },
        }
    }
}

fn ipam_report(sh: &Shared) -> IpamReport {
    let in_block = |b: &IpNet| {
        sh.pods
            .iter()
            .filter(|p| b.contains(&p.destination))
            .count()
    };
    let blocks: Vec<BlockUsage> = sh
        .status
        .blocks
        .iter()
        .map(|b| BlockUsage {
            cidr: *b,
            addresses: control::size(b),
            in_use: in_block(b),
        })
        .collect();
    let pools = sh
        .pools
        .iter()
        .map(|p| {
            let mine: Vec<&BlockUsage> =
                blocks.iter().filter(|b| p.cidr.contains(&b.cidr)).collect();
            PoolUsage {
                cidr: p.cidr,
                block_size: p.block_size(),
                blocks: mine.len(),
                addresses: mine.iter().map(|b| b.addresses).sum(),
                in_use: mine.iter().map(|b| b.in_use).sum(),
            }
        })
        .collect();
    IpamReport {
        node: sh.status.node.clone(),
        pools,
        blocks,
        pods: sh.pods.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DaemonSet's ConfigMap is a config this agent accepts.
    #[test]
    fn daemonset_config_loads() {
        let manifests = include_str!("../../../manifests/daemonset.yaml");
        let cm = serde_yaml::Deserializer::from_str(manifests)
            .filter_map(|d| serde_yaml::Value::deserialize(d).ok())
            .find(|v| v["kind"] == "ConfigMap")
            .expect("a ConfigMap in manifests/daemonset.yaml");
        let text = cm["data"]["agent.yaml"].as_str().expect("data.agent.yaml");
        let cfg: AgentConfig = serde_yaml::from_str(text).expect("agent.yaml is a valid config");
        assert_eq!(
            cfg.datastore,
            Some(DatastoreConfig::Kubernetes { kubeconfig: None })
        );
        assert!(cfg.endpoints.is_some());
    }

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
}
