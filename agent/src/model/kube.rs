//! The Kubernetes datastore: the model's CRDs, the core Nodes and the
//! Secrets BGPPeers name, watched through the API server and joined into a
//! [`Snapshot`].
//!
//! - Eight watches (IPPool, BGPConfiguration, BGPPeer, BGPFilter,
//!   StarlingNode, BlockAffinity, IPReservation, Node), each a kube-runtime `watcher` with its default
//!   exponential backoff. A watch that breaks resumes from its last
//!   resourceVersion, or lists again (410 Gone); a new list replaces that
//!   kind's objects only once it is complete, so a disconnected or
//!   re-listing datastore keeps serving the last good snapshot.
//! - Objects are watched untyped and parsed one by one as they arrive, so
//!   one object our types refuse (a CRD installed without its schema, an
//!   older agent) costs only that object: it is logged, naming kind, name
//!   and field, and the rest are used. Only the parsed form is kept
//!   ([`Parsed`]; of a core Node only what the model reads, [`CoreNode`]),
//!   never the JSON. The checks are the file datastore's
//!   ([`super::validate`]), run at each build.
//! - Nothing is published before every kind was listed once ([`is_ready`]);
//!   after that a change publishes a new snapshot at most ~100 ms later
//!   (bursts coalesce), and only when it differs from the previous one.
//!
//! The node spec of a node is joined from its core Node and the StarlingNode
//! of the same name; see [`node_spec`] and docs/model.md.
//!
//! [`is_ready`]: KubeDatastore::is_ready

use super::calico;
use super::crd::*;
use super::validate::{self, Finding};
use super::{Datastore, Snapshot};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::ObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

/// Node annotations carrying the node's BGP spec (Calico's are
/// `projectcalico.org/IPv4Address` and friends; ours are in our group).
pub const ANNOTATION_IPV4: &str = "starling.dev/ipv4-address";
pub const ANNOTATION_IPV6: &str = "starling.dev/ipv6-address";
pub const ANNOTATION_AS: &str = "starling.dev/as-number";
pub const ANNOTATION_RR_CLUSTER_ID: &str = "starling.dev/route-reflector-cluster-id";
/// The address (with prefix length) the node's agent autodetected, written
/// by that agent; the operator's `starling.dev/ipv4-address` and a
/// StarlingNode win over it.
pub const ANNOTATION_DETECTED_IPV4: &str = "starling.dev/detected-ipv4-address";
/// Calico's node addresses (written by calico-node), read after ours so a
/// cluster moving from Calico keeps its nodes' subnets.
pub const CALICO_ANNOTATION_IPV4: &str = "projectcalico.org/IPv4Address";
pub const CALICO_ANNOTATION_IPV6: &str = "projectcalico.org/IPv6Address";

/// Linux keeps TCP-MD5 keys of at most this many bytes.
const MD5_KEY_MAX: usize = 80;

/// Settings of the Kubernetes datastore.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Where the Secrets that BGP passwords name live (the agent's own
    /// namespace).
    pub secret_namespace: String,
    /// How long a burst of changes may gather before a snapshot is built.
    pub debounce: Duration,
    /// How often referenced Secrets are read again (they are not watched:
    /// the agent may only `get` them).
    pub resync: Duration,
    /// This agent's node: its published addresses (ours or Calico's) are
    /// not read, so that it autodetects its own again rather than trust a
    /// stale one.
    pub own_node: Option<String>,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            secret_namespace: "kube-system".into(),
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(60),
            own_node: None,
        }
    }
}

/// What the agent's status and readiness probe show of the datastore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeStatus {
    /// Every kind was listed once and the first snapshot was built (and
    /// published, unless it equals the empty initial one).
    pub ready: bool,
    /// Every watch is currently streaming (false after a watch error until
    /// that watch delivers again).
    pub connected: bool,
    /// The latest watch or Secret error, if any.
    pub last_error: Option<String>,
    /// Snapshots published so far.
    pub published: u64,
}

/// The Kubernetes flavour of [`Datastore`]. Its tasks run on the runtime
/// [`KubeDatastore::start`] was called on and stop when it is dropped.
pub struct KubeDatastore {
    rx: watch::Receiver<Arc<Snapshot>>,
    status: Arc<Mutex<KubeStatus>>,
    ready: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeDatastore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Datastore for KubeDatastore {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }
}

/// A kube client from a kubeconfig file, or (`None`) from the in-cluster
/// ServiceAccount (falling back to `$KUBECONFIG` / `~/.kube/config`).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, kube::Error> {
    client_of(config(kubeconfig).await?)
}

/// A kube client for `config` whose connections set TCP_NODELAY.
///
/// `Client::try_from` leaves Nagle's algorithm on, so a request written
/// in two pieces (headers, then the body) holds the second until the API
/// server's kernel ACKs the first, which it delays by up to 40 ms on
/// Linux: measured in `cni-k8s.sh` as about 45-50 ms on each of the first
/// borrow's steps (the list, the wait for the opening, the mark) and 4-9
/// ms with TCP_NODELAY (docs/benchmarks.md). Go's clients set TCP_NODELAY
/// on every connection. The stack is otherwise kube's: TLS from the
/// config, its connect, read and write timeouts, the base URI, its retry
/// of 429, 503 and 504 answers, authentication and extra headers (no
/// gzip: Starling does not build kube with it), without kube's
/// debug-level span per HTTP request; a config with a proxy gets kube's
/// stack unchanged. kube (5.0) has no hook for the TCP connector, hence
/// this copy of its layering: recheck it when kube is upgraded.
pub fn client_of(config: kube::Config) -> Result<Client, kube::Error> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use kube::client::ConfigExt;
    if config.proxy_url.is_some() {
        // kube's own stack answers a proxy exactly as before (this build
        // has no proxy support, so it names the missing feature).
        return Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(http)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http_client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build::<_, kube::client::Body>(connector);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.default_retry.then(|| {
            tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry())
        }))
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        .service(http_client);
    Ok(Client::new(service, config.default_namespace))
}

/// The client configuration [`client`] uses; the IPAM claim datastore
/// (`ipam::kube`) takes one to build its own client.
pub async fn config(kubeconfig: Option<&std::path::Path>) -> Result<kube::Config, kube::Error> {
    let bad = |e: String| kube::Error::Service(e.into());
    match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| bad(format!("kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| bad(format!("kubeconfig {}: {e}", path.display())))
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| bad(format!("no in-cluster configuration or kubeconfig: {e}"))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    IPPool,
    BGPConfiguration,
    BGPPeer,
    StarlingNode,
    BlockAffinity,
    IPReservation,
    BGPFilter,
    Node,
}

const KINDS: [Kind; 8] = [
    Kind::IPPool,
    Kind::BGPConfiguration,
    Kind::BGPPeer,
    Kind::StarlingNode,
    Kind::BlockAffinity,
    Kind::IPReservation,
    Kind::BGPFilter,
    Kind::Node,
];

impl Kind {
    fn resource(self) -> ApiResource {
        match self {
            Kind::IPPool => ApiResource::erase::<IPPool>(&()),
            Kind::BGPConfiguration => ApiResource::erase::<BGPConfiguration>(&()),
            Kind::BGPPeer => ApiResource::erase::<BGPPeer>(&()),
            Kind::StarlingNode => ApiResource::erase::<StarlingNode>(&()),
            Kind::BlockAffinity => ApiResource::erase::<BlockAffinity>(&()),
            Kind::IPReservation => ApiResource::erase::<IPReservation>(&()),
            Kind::BGPFilter => ApiResource::erase::<BGPFilter>(&()),
            Kind::Node => ApiResource::erase::<Node>(&()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::IPPool => "IPPool",
            Kind::BGPConfiguration => "BGPConfiguration",
            Kind::BGPPeer => "BGPPeer",
            Kind::StarlingNode => "StarlingNode",
            Kind::BlockAffinity => "BlockAffinity",
            Kind::IPReservation => "IPReservation",
            Kind::BGPFilter => "BGPFilter",
            Kind::Node => "Node",
        }
    }
}

/// The parts of a core Node the model reads ([`node_spec`]); everything
/// else of the Node (its status, images, conditions) is dropped on arrival.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CoreNode {
    labels: BTreeMap<String, String>,
    /// Only the annotations [`node_spec`] reads.
    annotations: BTreeMap<String, String>,
    /// `spec.podCIDRs`, or else `spec.podCIDR`.
    pod_cidrs: Vec<String>,
    /// The InternalIP entries of `status.addresses`, in order.
    internal_ips: Vec<String>,
}

/// The annotations of a Node that [`node_spec`] reads.
const NODE_ANNOTATIONS: [&str; 7] = [
    ANNOTATION_IPV4,
    ANNOTATION_IPV6,
    ANNOTATION_AS,
    ANNOTATION_RR_CLUSTER_ID,
    ANNOTATION_DETECTED_IPV4,
    CALICO_ANNOTATION_IPV4,
    CALICO_ANNOTATION_IPV6,
];

impl From<&Node> for CoreNode {
    fn from(node: &Node) -> CoreNode {
        let annotations = node.metadata.annotations.iter().flatten();
        let pod_cidrs = match node.spec.as_ref().map(|s| (&s.pod_cidrs, &s.pod_cidr)) {
            Some((Some(list), _)) if !list.is_empty() => list.clone(),
            Some((_, Some(one))) => vec![one.clone()],
            _ => Vec::new(),
        };
        let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        CoreNode {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            annotations: annotations
                .filter(|(k, _)| NODE_ANNOTATIONS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            pod_cidrs,
            internal_ips: addresses
                .iter()
                .flat_map(|a| a.iter())
                .filter(|a| a.type_ == "InternalIP")
                .map(|a| a.address.clone())
                .collect(),
        }
    }
}

/// A watched object in the form the snapshot is built from, parsed once,
/// as it arrives (no JSON is kept). Its checks ([`super::validate`]) run
/// at each build, since some depend on the other objects.
#[derive(Debug, Clone, PartialEq)]
enum Parsed {
    Pool(IPPool),
    BgpConfiguration(BGPConfiguration),
    Peer(BGPPeer),
    StarlingNode(ObjectMeta, StarlingNodeSpec),
    Affinity(BlockAffinity),
    Reservation(IPReservation),
    Filter(BGPFilterSpec),
    Node(CoreNode),
    /// An object our types refuse; the message names kind, name and field.
    Refused(String),
}

impl Parsed {
    fn new(kind: Kind, o: &DynamicObject) -> Parsed {
        fn typed<S: DeserializeOwned>(
            kind: Kind,
            o: &DynamicObject,
            f: impl FnOnce(ObjectMeta, S) -> Parsed,
        ) -> Parsed {
            match spec::<S>(kind, o) {
                Ok(s) => f(meta(o), s),
                Err(e) => Parsed::Refused(e),
            }
        }
        match kind {
            Kind::IPPool => typed(kind, o, |metadata, spec| {
                Parsed::Pool(IPPool { metadata, spec })
            }),
            Kind::BGPConfiguration => typed(kind, o, |metadata, spec| {
                Parsed::BgpConfiguration(BGPConfiguration { metadata, spec })
            }),
            Kind::BGPPeer => typed(kind, o, |metadata, spec| {
                Parsed::Peer(BGPPeer { metadata, spec })
            }),
            Kind::StarlingNode => typed(kind, o, Parsed::StarlingNode),
            Kind::BlockAffinity => typed(kind, o, |metadata, spec| {
                Parsed::Affinity(BlockAffinity { metadata, spec })
            }),
            Kind::IPReservation => typed(kind, o, |metadata, spec| {
                Parsed::Reservation(IPReservation { metadata, spec })
            }),
            Kind::BGPFilter => typed(kind, o, |_, spec| Parsed::Filter(spec)),
            Kind::Node => match serde_json::to_value(o).and_then(serde_json::from_value::<Node>) {
                Ok(n) => Parsed::Node(CoreNode::from(&n)),
                Err(e) => Parsed::Refused(format!("Node/{}: {e}", name_of(o))),
            },
        }
    }
}

/// A watch event, its object parsed.
enum Change {
    Init,
    InitApply(String, Parsed),
    InitDone,
    Apply(String, Parsed),
    Delete(String),
}

impl Change {
    fn new(kind: Kind, event: watcher::Event<DynamicObject>) -> Change {
        match event {
            watcher::Event::Init => Change::Init,
            watcher::Event::InitApply(mut o) => {
                prune(kind, &mut o);
                Change::InitApply(name_of(&o), Parsed::new(kind, &o))
            }
            watcher::Event::InitDone => Change::InitDone,
            watcher::Event::Apply(mut o) => {
                prune(kind, &mut o);
                Change::Apply(name_of(&o), Parsed::new(kind, &o))
            }
            watcher::Event::Delete(o) => Change::Delete(name_of(&o)),
        }
    }
}

/// One kind's objects as the watch reported them, parsed.
#[derive(Default)]
struct Cache {
    objects: BTreeMap<String, Parsed>,
    /// A list in progress; it replaces `objects` when complete.
    relist: Option<BTreeMap<String, Parsed>>,
    listed: bool,
}

impl Cache {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Init => self.relist = Some(BTreeMap::new()),
            Change::InitApply(name, o) => {
                self.relist.get_or_insert_default().insert(name, o);
            }
            Change::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                self.listed = true;
            }
            Change::Apply(name, o) => {
                self.objects.insert(name, o);
            }
            Change::Delete(name) => {
                self.objects.remove(&name);
            }
        }
    }
}

type Update = (Kind, Result<Change, String>);

impl KubeDatastore {
    /// Start watching; returns at once (call inside a tokio runtime). The
    /// snapshot stays empty until [`is_ready`](Self::is_ready).
    pub fn start(client: Client, options: KubeOptions) -> KubeDatastore {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let (ready_tx, ready) = watch::channel(false);
        let status = Arc::new(Mutex::new(KubeStatus::default()));
        let (utx, urx) = mpsc::channel::<Update>(256);
        let mut tasks: Vec<JoinHandle<()>> = KINDS
            .iter()
            .map(|&kind| tokio::spawn(watch_kind(client.clone(), kind, utx.clone())))
            .collect();
        let joiner = Joiner {
            client,
            options,
            caches: KINDS.iter().map(|&k| (k, Cache::default())).collect(),
            secrets: HashMap::new(),
            warned: HashSet::new(),
            failing: BTreeSet::new(),
            status: status.clone(),
            tx,
            ready_tx,
        };
        tasks.push(tokio::spawn(joiner.run(urx)));
        KubeDatastore {
            rx,
            status,
            ready,
            tasks,
        }
    }

    /// Every kind was listed and the first snapshot built.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Wait until [`is_ready`](Self::is_ready), or `timeout`; the error
    /// carries the latest failure.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let mut ready = self.ready.clone();
        match tokio::time::timeout(timeout, ready.wait_for(|r| *r)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(format!(
                "the Kubernetes datastore is not ready after {timeout:?}: {}",
                self.status()
                    .last_error
                    .unwrap_or_else(|| "no error seen (still listing)".into())
            )),
        }
    }

    pub fn status(&self) -> KubeStatus {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

async fn watch_kind(client: Client, kind: Kind, tx: mpsc::Sender<Update>) {
    let api = Api::<DynamicObject>::all_with(client, &kind.resource());
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let item = item
            .map(|event| Change::new(kind, event))
            .map_err(|e| format!("watching {}: {e}", kind.name()));
        if tx.send((kind, item)).await.is_err() {
            return;
        }
    }
}

/// Drop what the model never reads before an object is kept: the managed
/// fields and the last-applied annotation of every object, the status of
/// Starling's kinds, and of a core Node everything but its addresses and pod
/// CIDRs (a kubelet's Node carries its images, conditions and capacity: kilobytes
/// each, times every node of the cluster in every agent).
fn prune(kind: Kind, o: &mut DynamicObject) {
    o.metadata.managed_fields = None;
    if let Some(a) = o.metadata.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    let Some(data) = o.data.as_object_mut() else {
        return;
    };
    if kind != Kind::Node {
        data.remove("status");
        return;
    }
    let keep = |v: Option<&serde_json::Value>, fields: &[&str]| {
        let mut out = serde_json::Map::new();
        if let Some(v) = v.and_then(|v| v.as_object()) {
            for f in fields {
                if let Some(x) = v.get(*f) {
                    out.insert((*f).to_string(), x.clone());
                }
            }
        }
        serde_json::Value::Object(out)
    };
    let spec = keep(data.get("spec"), &["podCIDR", "podCIDRs"]);
    let status = keep(data.get("status"), &["addresses"]);
    data.clear();
    data.insert("spec".into(), spec);
    data.insert("status".into(), status);
}

/// A Secret as last read; `None`: it does not exist (or has no data).
type SecretData = Option<BTreeMap<String, Vec<u8>>>;

/// Owns the caches and builds the snapshots.
struct Joiner {
    client: Client,
    options: KubeOptions,
    caches: HashMap<Kind, Cache>,
    secrets: HashMap<String, SecretData>,
    /// Warnings already logged, so a refused object is reported once per
    /// change rather than at every rebuild.
    warned: HashSet<String>,
    /// Kinds whose watch failed and has not delivered since.
    failing: BTreeSet<Kind>,
    status: Arc<Mutex<KubeStatus>>,
    tx: watch::Sender<Arc<Snapshot>>,
    ready_tx: watch::Sender<bool>,
}

impl Joiner {
    async fn run(mut self, mut updates: mpsc::Receiver<Update>) {
        let mut due: Option<Instant> = None;
        let mut resync = tokio::time::interval(self.options.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            tokio::select! {
                update = updates.recv() => {
                    let Some((kind, update)) = update else { return };
                    self.update(kind, update);
                    if due.is_none() {
                        due = Some(Instant::now() + self.options.debounce);
                    }
                }
                _ = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now)).await }, if due.is_some() => {
                    due = None;
                    self.rebuild().await;
                }
                _ = resync.tick() => {
                    self.refresh_secrets(None).await;
                    self.rebuild().await;
                }
            }
        }
    }

    fn set_status(&self, f: impl FnOnce(&mut KubeStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    fn update(&mut self, kind: Kind, update: Result<Change, String>) {
        match update {
            Ok(event) => {
                if self.failing.remove(&kind) {
                    info!(kind = kind.name(), "watch resumed");
                }
                let connected = self.failing.is_empty();
                self.set_status(|s| s.connected = connected);
                if let Some(cache) = self.caches.get_mut(&kind) {
                    cache.apply(event);
                }
            }
            Err(e) => {
                if self.failing.insert(kind) {
                    warn!("{e}; retrying with backoff, keeping the last snapshot");
                }
                self.set_status(|s| {
                    s.connected = false;
                    s.last_error = Some(e);
                });
            }
        }
    }

    fn objects(&self, kind: Kind) -> impl Iterator<Item = (&String, &Parsed)> {
        self.caches
            .get(&kind)
            .into_iter()
            .flat_map(|c| c.objects.iter())
    }

    async fn rebuild(&mut self) {
        if !self.caches.values().all(|c| c.listed) {
            return;
        }
        let mut warnings = Vec::new();
        let own = self.options.own_node.as_deref();
        let (mut snap, wanted) = build(|kind| self.objects(kind).collect(), own, &mut warnings);
        let missing: Vec<String> = wanted
            .iter()
            .filter(|n| !self.secrets.contains_key(*n))
            .cloned()
            .collect();
        if !missing.is_empty() {
            self.refresh_secrets(Some(missing)).await;
        }
        self.secrets.retain(|n, _| wanted.contains(n));
        resolve_passwords(&mut snap, &self.secrets, &self.options, &mut warnings);
        let now: HashSet<String> = warnings.into_iter().collect();
        for w in now.difference(&self.warned) {
            match w.strip_prefix(ACCEPTED) {
                Some(w) => warn!("model: {w}"),
                None => warn!("refused: {w}"),
            }
        }
        self.warned = now;
        let snap = Arc::new(snap);
        let changed = self.tx.send_if_modified(|cur| {
            if **cur == *snap {
                false
            } else {
                *cur = snap.clone();
                true
            }
        });
        let first = !*self.ready_tx.borrow();
        if changed || first {
            self.set_status(|s| {
                s.published += u64::from(changed);
                s.ready = true;
            });
            if first {
                info!(
                    pools = snap.pools.len(),
                    peers = snap.peers.len(),
                    nodes = snap.nodes.len(),
                    "Kubernetes datastore ready"
                );
                self.ready_tx.send_replace(true);
            }
        }
    }

    /// Read Secrets again: `names`, or every one held.
    async fn refresh_secrets(&mut self, names: Option<Vec<String>>) {
        let names = names.unwrap_or_else(|| self.secrets.keys().cloned().collect());
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.options.secret_namespace);
        for name in names {
            match tokio::time::timeout(Duration::from_secs(10), api.get_opt(&name)).await {
                Ok(Ok(secret)) => {
                    let data = secret.and_then(|s| s.data).map(|d| {
                        d.into_iter()
                            .map(|(k, v)| (k, v.0))
                            .collect::<BTreeMap<_, _>>()
                    });
                    self.secrets.insert(name, data);
                }
                // Keep what was read before: a network error says nothing
                // about the Secret.
                Ok(Err(e)) => self.set_status(|s| {
                    s.last_error = Some(format!(
                        "reading Secret {}/{name}: {e}",
                        self.options.secret_namespace
                    ))
                }),
                Err(_) => self.set_status(|s| {
                    s.last_error = Some(format!(
                        "reading Secret {}/{name}: timed out",
                        self.options.secret_namespace
                    ))
                }),
            }
        }
    }
}

fn meta(o: &DynamicObject) -> ObjectMeta {
    let annotations = o.metadata.annotations.clone().map(|mut a| {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
        a
    });
    ObjectMeta {
        name: o.metadata.name.clone(),
        labels: o.metadata.labels.clone().filter(|l| !l.is_empty()),
        annotations: annotations.filter(|a| !a.is_empty()),
        ..Default::default()
    }
}

fn spec<S: DeserializeOwned>(kind: Kind, o: &DynamicObject) -> Result<S, String> {
    let name = o.metadata.name.as_deref().unwrap_or("");
    let value = o.data.get("spec").cloned().unwrap_or(serde_json::json!({}));
    serde_json::from_value(value).map_err(|e| format!("{}/{name}: spec: {e}", kind.name()))
}

/// Marks a line of `warnings` about an object that was loaded, with a field
/// Starling does not act on (`validate::unsupported_*`).
const ACCEPTED: &str = "accepted: ";

fn accepted(kind: &str, name: &str, findings: &[Finding], out: &mut Vec<String>) {
    for f in findings {
        out.push(format!(
            "{ACCEPTED}{kind}/{name}: {}: {}",
            f.field, f.message
        ));
    }
}

fn refuse(kind: &str, name: &str, findings: &[Finding], out: &mut Vec<String>) {
    for f in findings {
        out.push(format!("{kind}/{name}: {}: {}", f.field, f.message));
    }
}

/// The snapshot of the watched objects (passwords not yet resolved), and
/// the Secrets it references. Refused objects add a line to `warnings`.
fn build<'a>(
    objects: impl Fn(Kind) -> Vec<(&'a String, &'a Parsed)>,
    own: Option<&str>,
    warnings: &mut Vec<String>,
) -> (Snapshot, BTreeSet<String>) {
    let mut snap = Snapshot::default();
    add_pools(&mut snap, objects(Kind::IPPool), warnings);
    add_bgp_configuration(&mut snap, objects(Kind::BGPConfiguration), warnings);
    add_peers(&mut snap, objects(Kind::BGPPeer), warnings);
    add_affinities(&mut snap, objects(Kind::BlockAffinity), warnings);
    add_reservations(&mut snap, objects(Kind::IPReservation), warnings);
    add_filters(&mut snap, objects(Kind::BGPFilter), warnings);
    add_nodes(
        &mut snap,
        objects(Kind::StarlingNode),
        objects(Kind::Node),
        own,
        warnings,
    );
    let secrets = snap
        .bgp_configuration
        .iter()
        .map(|c| &c.spec.node_mesh_password)
        .chain(snap.peers.values().map(|p| &p.spec.password))
        .filter_map(|p| p.as_ref().and_then(|p| p.secret_key_ref.as_ref()))
        .map(|r| r.name.clone())
        .collect();
    (snap, secrets)
}

fn name_of(o: &DynamicObject) -> String {
    o.metadata.name.clone().unwrap_or_default()
}

/// The objects of one kind that parsed, as `T`; the refused ones' errors go
/// to `warnings`.
fn parsed<'a, T: 'a>(
    objects: Vec<(&'a String, &'a Parsed)>,
    f: impl Fn(&'a Parsed) -> Option<T>,
    warnings: &mut Vec<String>,
) -> Vec<T> {
    let mut out = Vec::with_capacity(objects.len());
    for (_, o) in objects {
        match o {
            Parsed::Refused(e) => warnings.push(e.clone()),
            o => out.extend(f(o)),
        }
    }
    out
}

fn object_name(m: &ObjectMeta) -> String {
    m.name.clone().unwrap_or_default()
}

/// Valid pools that overlap no pool taken before them.
fn add_pools(snap: &mut Snapshot, objects: Vec<(&String, &Parsed)>, warnings: &mut Vec<String>) {
    let pools = parsed(
        objects,
        |o| match o {
            Parsed::Pool(p) => Some(p),
            _ => None,
        },
        warnings,
    );
    for o in pools {
        let (name, s) = (object_name(&o.metadata), &o.spec);
        let f = validate::ip_pool(s);
        if !f.is_empty() {
            refuse("IPPool", &name, &f, warnings);
        } else if let Some((other, _)) = snap.pools.iter().find(|(_, p)| {
            p.spec.cidr.contains(&s.cidr.addr()) || s.cidr.contains(&p.spec.cidr.addr())
        }) {
            warnings.push(format!(
                "IPPool/{name}: spec.cidr: {} overlaps IPPool `{other}`",
                s.cidr
            ));
        } else {
            snap.pools.insert(name, o.clone());
        }
    }
}

fn add_bgp_configuration(
    snap: &mut Snapshot,
    objects: Vec<(&String, &Parsed)>,
    warnings: &mut Vec<String>,
) {
    let configurations = parsed(
        objects,
        |o| match o {
            Parsed::BgpConfiguration(c) => Some(c),
            _ => None,
        },
        warnings,
    );
    for o in configurations {
        let name = object_name(&o.metadata);
        let f = validate::bgp_configuration(&name, &o.spec);
        if f.is_empty() {
            let u = validate::unsupported_bgp_configuration(&o.spec);
            accepted("BGPConfiguration", &name, &u, warnings);
            snap.bgp_configuration = Some(o.clone());
        } else {
            refuse("BGPConfiguration", &name, &f, warnings);
        }
    }
}

fn add_peers(snap: &mut Snapshot, objects: Vec<(&String, &Parsed)>, warnings: &mut Vec<String>) {
    let peers = parsed(
        objects,
        |o| match o {
            Parsed::Peer(p) => Some(p),
            _ => None,
        },
        warnings,
    );
    for o in peers {
        let name = object_name(&o.metadata);
        let f = validate::bgp_peer(&o.spec);
        if f.is_empty() {
            accepted(
                "BGPPeer",
                &name,
                &validate::unsupported_bgp_peer(&o.spec),
                warnings,
            );
            snap.peers.insert(name, o.clone());
        } else {
            refuse("BGPPeer", &name, &f, warnings);
        }
    }
}

fn add_affinities(
    snap: &mut Snapshot,
    objects: Vec<(&String, &Parsed)>,
    warnings: &mut Vec<String>,
) {
    let affinities = parsed(
        objects,
        |o| match o {
            Parsed::Affinity(a) => Some(a),
            _ => None,
        },
        warnings,
    );
    for o in affinities {
        let name = object_name(&o.metadata);
        let f = validate::block_affinity(&o.spec);
        if f.is_empty() {
            snap.affinities.insert(name, o.clone());
        } else {
            refuse("BlockAffinity", &name, &f, warnings);
        }
    }
}

fn add_reservations(
    snap: &mut Snapshot,
    objects: Vec<(&String, &Parsed)>,
    warnings: &mut Vec<String>,
) {
    let reservations = parsed(
        objects,
        |o| match o {
            Parsed::Reservation(r) => Some(r),
            _ => None,
        },
        warnings,
    );
    for o in reservations {
        snap.reservations
            .insert(object_name(&o.metadata), o.clone());
    }
}

/// BGPFilters Calico's validation accepts; what Starling does differently
/// (rules with `interface`) is warned about. A peer naming a refused or
/// missing filter gets no session (the planner says so).
fn add_filters(snap: &mut Snapshot, objects: Vec<(&String, &Parsed)>, warnings: &mut Vec<String>) {
    for (name, o) in objects {
        let s = match o {
            Parsed::Filter(s) => s,
            Parsed::Refused(e) => {
                warnings.push(e.clone());
                continue;
            }
            _ => continue,
        };
        let f = calico::bgp_filter(s);
        if f.is_empty() {
            accepted("BGPFilter", name, &calico::bgp_filter_warnings(s), warnings);
            snap.filters.insert(name.clone(), s.clone());
        } else {
            refuse("BGPFilter", name, &f, warnings);
        }
    }
}

/// Nodes: the core Node, overridden field by field by a StarlingNode of the
/// same name ([`node_spec`]).
fn add_nodes(
    snap: &mut Snapshot,
    starling_nodes: Vec<(&String, &Parsed)>,
    core_nodes: Vec<(&String, &Parsed)>,
    own: Option<&str>,
    warnings: &mut Vec<String>,
) {
    let starling: BTreeMap<String, (&ObjectMeta, &StarlingNodeSpec)> = parsed(
        starling_nodes,
        |o| match o {
            Parsed::StarlingNode(m, s) => Some((object_name(m), (m, s))),
            _ => None,
        },
        warnings,
    )
    .into_iter()
    .collect();
    let mut core: BTreeMap<&String, &CoreNode> = BTreeMap::new();
    for (name, o) in core_nodes {
        match o {
            Parsed::Node(n) => {
                core.insert(name, n);
            }
            Parsed::Refused(e) => warnings.push(e.clone()),
            _ => {}
        }
    }
    let names: BTreeSet<&String> = starling.keys().chain(core.keys().copied()).collect();
    for name in names {
        let published = own != Some(name.as_str());
        let (metadata, spec, guessed) = node_spec(
            core.get(name).copied(),
            starling.get(name).copied(),
            published,
            warnings,
            name,
        );
        let f = validate::starling_node(&spec);
        if f.is_empty() {
            if guessed {
                snap.guessed.insert(name.clone());
            }
            snap.nodes
                .insert(name.clone(), StarlingNode { metadata, spec });
        } else {
            let kind = if core.contains_key(name) {
                "Node"
            } else {
                "StarlingNode"
            };
            refuse(kind, name, &f, warnings);
        }
    }
}

/// One node's spec and labels, from its core Node and its StarlingNode:
///
/// 1. From the Node: `starling.dev/ipv4-address` (with prefix length),
///    `starling.dev/ipv6-address`, `starling.dev/as-number`,
///    `starling.dev/route-reflector-cluster-id` annotations; its labels;
///    `spec.podCIDRs` (or `spec.podCIDR`).
/// 2. Every field the StarlingNode sets wins over the Node's (podCIDRs when
///    non-empty); its labels win key by key.
/// 3. With `published` (every node but the agent's own), a family still
///    without an address takes the one the node's agent published,
///    `starling.dev/detected-ipv4-address`, or else Calico's
///    `projectcalico.org/IPv4Address` / `IPv6Address`, with their prefix
///    lengths.
/// 4. A node with no address from any of these falls back to the Node's
///    `status.addresses` InternalIPs (first per family), as host routes
///    (/32, /128), since the Node does not say the subnet; the third value
///    says so (the node's own agent may autodetect over such a guess).
pub fn node_spec(
    core: Option<&CoreNode>,
    starling: Option<(&ObjectMeta, &StarlingNodeSpec)>,
    published: bool,
    warnings: &mut Vec<String>,
    name: &str,
) -> (ObjectMeta, StarlingNodeSpec, bool) {
    let mut spec = StarlingNodeSpec {
        ipv4_address: None,
        ipv6_address: None,
        as_number: None,
        route_reflector_cluster_id: None,
        pod_cidrs: Vec::new(),
    };
    let mut labels = BTreeMap::new();
    if let Some(node) = core {
        labels = node.labels.clone();
        from_annotations(node, name, &mut spec, warnings);
        spec.pod_cidrs = pod_cidrs(node, name, warnings);
    }
    if let Some((meta, s)) = starling {
        spec.ipv4_address = s.ipv4_address.or(spec.ipv4_address);
        spec.ipv6_address = s.ipv6_address.or(spec.ipv6_address);
        spec.as_number = s.as_number.or(spec.as_number);
        spec.route_reflector_cluster_id = s
            .route_reflector_cluster_id
            .or(spec.route_reflector_cluster_id);
        if !s.pod_cidrs.is_empty() {
            spec.pod_cidrs = s.pod_cidrs.clone();
        }
        labels.extend(meta.labels.clone().unwrap_or_default());
    }
    if let Some(node) = core.filter(|_| published) {
        from_published(node, name, &mut spec, warnings);
    }
    let guessed = spec.ipv4_address.is_none() && spec.ipv6_address.is_none();
    if guessed {
        from_internal_ips(core, &mut spec);
    }
    let metadata = ObjectMeta {
        name: Some(name.to_string()),
        labels: (!labels.is_empty()).then_some(labels),
        ..Default::default()
    };
    (metadata, spec, guessed)
}

/// The `starling.dev/*` annotations of a Node; a bad value is reported and
/// ignored.
fn from_annotations(
    node: &CoreNode,
    name: &str,
    spec: &mut StarlingNodeSpec,
    warnings: &mut Vec<String>,
) {
    let ann = &node.annotations;
    let mut bad = |key: &str, why: String| {
        warnings.push(format!(
            "Node/{name}: metadata.annotations[{key}]: {why}; the annotation is ignored"
        ))
    };
    if let Some(v) = ann.get(ANNOTATION_IPV4) {
        match v.trim().parse::<IpNet>() {
            Ok(IpNet::V4(n)) => spec.ipv4_address = Some(n),
            _ => bad(
                ANNOTATION_IPV4,
                format!("`{v}` is not an IPv4 address with prefix length, e.g. 192.0.2.10/24"),
            ),
        }
    }
    if let Some(v) = ann.get(ANNOTATION_IPV6) {
        match v.trim().parse::<IpNet>() {
            Ok(IpNet::V6(n)) => spec.ipv6_address = Some(n),
            _ => bad(
                ANNOTATION_IPV6,
                format!("`{v}` is not an IPv6 address with prefix length, e.g. 2001:db8::10/64"),
            ),
        }
    }
    if let Some(v) = ann.get(ANNOTATION_AS) {
        match v.trim().parse::<u32>() {
            Ok(n) if n > 0 => spec.as_number = Some(n),
            _ => bad(
                ANNOTATION_AS,
                format!("`{v}` is not an AS number (1-4294967295)"),
            ),
        }
    }
    if let Some(v) = ann.get(ANNOTATION_RR_CLUSTER_ID) {
        match v.trim().parse::<Ipv4Addr>() {
            Ok(a) => spec.route_reflector_cluster_id = Some(a),
            _ => bad(
                ANNOTATION_RR_CLUSTER_ID,
                format!("`{v}` is not an IPv4 address such as 224.0.0.1"),
            ),
        }
    }
}

/// The addresses agents publish (ours, then Calico's) for the families
/// still without one; a bad value is reported and the next key tried.
fn from_published(
    node: &CoreNode,
    name: &str,
    spec: &mut StarlingNodeSpec,
    warnings: &mut Vec<String>,
) {
    let ann = &node.annotations;
    let mut read = |key: &str| -> Option<IpNet> {
        let v = ann.get(key)?;
        match v.trim().parse::<IpNet>() {
            Ok(n) => Some(n),
            Err(_) => {
                warnings.push(format!(
                    "Node/{name}: metadata.annotations[{key}]: `{v}` is not an address with prefix length, e.g. 192.0.2.10/24; the annotation is ignored"
                ));
                None
            }
        }
    };
    if spec.ipv4_address.is_none() {
        spec.ipv4_address = [ANNOTATION_DETECTED_IPV4, CALICO_ANNOTATION_IPV4]
            .into_iter()
            .find_map(|k| match read(k) {
                Some(IpNet::V4(n)) => Some(n),
                _ => None,
            });
    }
    if spec.ipv6_address.is_none() {
        spec.ipv6_address = match read(CALICO_ANNOTATION_IPV6) {
            Some(IpNet::V6(n)) => Some(n),
            _ => None,
        };
    }
}

/// Keep this node's autodetected address in its Node's
/// `starling.dev/detected-ipv4-address` annotation (merge patch), where the
/// other agents read it: written at start, and again whenever the Node
/// shows another value (edited, removed, or the Node created anew). Runs
/// until aborted; errors are logged and retried at the next event.
pub async fn publish_address(client: Client, node: String, address: ipnet::Ipv4Net) {
    use kube::api::{Patch, PatchParams};
    let api: Api<Node> = Api::all(client);
    let want = address.to_string();
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let stream = watcher(api.clone(), config)
        .default_backoff()
        .applied_objects();
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let n = match item {
            Ok(n) => n,
            Err(e) => {
                warn!(node = %node, "watching this Node to publish its address: {e}");
                continue;
            }
        };
        let annotations = n.metadata.annotations.unwrap_or_default();
        if annotations.get(ANNOTATION_DETECTED_IPV4) == Some(&want) {
            continue;
        }
        let patch =
            serde_json::json!({"metadata": {"annotations": {ANNOTATION_DETECTED_IPV4: want}}});
        match api
            .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(node = %node, address = %want, "published this node's address ({ANNOTATION_DETECTED_IPV4})")
            }
            Err(e) => {
                warn!(node = %node, "publishing this node's address {want} ({ANNOTATION_DETECTED_IPV4}): {e}; retried at the Node's next change")
            }
        }
    }
}

/// A Node's `spec.podCIDRs` (or `spec.podCIDR`); a bad prefix is reported
/// and left out.
fn pod_cidrs(node: &CoreNode, name: &str, warnings: &mut Vec<String>) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, c) in node.pod_cidrs.iter().enumerate() {
        match c.parse::<IpNet>() {
            Ok(n) => out.push(n),
            Err(_) => warnings.push(format!(
                "Node/{name}: spec.podCIDRs[{i}]: `{c}` is not a prefix; ignored"
            )),
        }
    }
    out
}

/// The first InternalIP per family of the Node's `status.addresses`, as a
/// host route.
fn from_internal_ips(core: Option<&CoreNode>, spec: &mut StarlingNodeSpec) {
    for a in core.iter().flat_map(|n| &n.internal_ips) {
        match a.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) if spec.ipv4_address.is_none() => {
                spec.ipv4_address = Some(ip.into());
            }
            Ok(IpAddr::V6(ip)) if spec.ipv6_address.is_none() => {
                spec.ipv6_address = Some(ip.into());
            }
            _ => {}
        }
    }
}

/// Fill `snap.passwords` from the Secrets read; a missing one is reported
/// and its sessions are left out by the planner.
fn resolve_passwords(
    snap: &mut Snapshot,
    secrets: &HashMap<String, SecretData>,
    options: &KubeOptions,
    warnings: &mut Vec<String>,
) {
    let mut refs: Vec<(String, Password)> = Vec::new();
    if let Some(c) = &snap.bgp_configuration
        && let Some(p) = &c.spec.node_mesh_password
    {
        refs.push((
            "BGPConfiguration/default: spec.nodeMeshPassword".into(),
            p.clone(),
        ));
    }
    for (name, peer) in &snap.peers {
        if let Some(p) = &peer.spec.password {
            refs.push((format!("BGPPeer/{name}: spec.password"), p.clone()));
        }
    }
    let ns = &options.secret_namespace;
    for (what, p) in refs {
        if let Some(file) = &p.file {
            warnings.push(format!(
                "{what}.file: password files ({}) are read by the file datastore only; use secretKeyRef",
                file.display()
            ));
            continue;
        }
        let Some(r) = &p.secret_key_ref else { continue };
        let value = match secrets.get(&r.name) {
            None => continue, // not read yet (API error): the status says why
            Some(None) => {
                warnings.push(format!(
                    "{what}.secretKeyRef: Secret {ns}/{} does not exist",
                    r.name
                ));
                continue;
            }
            Some(Some(data)) => data.get(&r.key),
        };
        match value.map(|v| String::from_utf8(v.clone())) {
            None => warnings.push(format!(
                "{what}.secretKeyRef: Secret {ns}/{} has no key `{}`",
                r.name, r.key
            )),
            Some(Err(_)) => warnings.push(format!(
                "{what}.secretKeyRef: Secret {ns}/{} key `{}` is not UTF-8",
                r.name, r.key
            )),
            Some(Ok(v)) if v.is_empty() || v.len() > MD5_KEY_MAX => warnings.push(format!(
                "{what}.secretKeyRef: Secret {ns}/{} key `{}` holds {} bytes; TCP-MD5 keys are 1-{MD5_KEY_MAX}",
                r.name,
                r.key,
                v.len()
            )),
            Some(Ok(v)) => {
                snap.passwords.insert(p.clone(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The NODELAY client builds from a plain config; a config with a
    /// proxy gets kube's own answer (this build has no proxy support, so
    /// an error naming the missing feature), not a client that ignores it.
    #[tokio::test]
    async fn client_of_builds_and_refuses_a_proxy_as_kube_does() {
        let config = || kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        assert!(client_of(config()).is_ok());
        let mut proxied = config();
        proxied.proxy_url = Some("http://127.0.0.1:3128".parse().unwrap());
        let err = client_of(proxied).err().expect("a proxy is refused");
        assert!(err.to_string().contains("http-proxy"), "{err}");
    }

    fn dynamic(kind: Kind, value: serde_json::Value) -> DynamicObject {
        let mut v = value;
        let ar = kind.resource();
        v["apiVersion"] = json!(ar.api_version);
        v["kind"] = json!(ar.kind);
        serde_json::from_value(v).unwrap()
    }

    fn objects(list: &[(Kind, serde_json::Value)]) -> Vec<(Kind, String, Parsed)> {
        list.iter()
            .map(|(kind, v)| {
                let o = dynamic(*kind, v.clone());
                (*kind, name_of(&o), Parsed::new(*kind, &o))
            })
            .collect()
    }

    fn of_kind<'a>(
        all: &'a [(Kind, String, Parsed)],
    ) -> impl Fn(Kind) -> Vec<(&'a String, &'a Parsed)> {
        move |k| {
            all.iter()
                .filter(|(kind, _, _)| *kind == k)
                .map(|(_, name, o)| (name, o))
                .collect()
        }
    }

    #[test]
    fn refused_objects_are_named_and_the_rest_kept() {
        let list = [
            (
                Kind::IPPool,
                json!({"metadata": {"name": "good"}, "spec": {"cidr": "10.244.0.0/16"}}),
            ),
            (
                Kind::IPPool,
                json!({"metadata": {"name": "hostbits"}, "spec": {"cidr": "10.245.1.0/16"}}),
            ),
            (
                Kind::IPPool,
                json!({"metadata": {"name": "unknown"}, "spec": {"cidr": "10.246.0.0/16", "color": "red"}}),
            ),
            (
                Kind::BGPConfiguration,
                json!({"metadata": {"name": "main"}, "spec": {}}),
            ),
        ];
        let mut w = Vec::new();
        let (snap, _) = build(of_kind(&objects(&list)), None, &mut w);
        assert_eq!(snap.pools.keys().collect::<Vec<_>>(), ["good"]);
        assert!(snap.bgp_configuration.is_none());
        let all = w.join("\n");
        assert!(
            all.contains("IPPool/hostbits: spec.cidr: 10.245.1.0/16 has host bits"),
            "{all}"
        );
        assert!(
            all.contains("IPPool/unknown: spec: unknown field `color`"),
            "{all}"
        );
        assert!(
            all.contains("BGPConfiguration/main: metadata.name"),
            "{all}"
        );
    }

    #[test]
    fn fields_not_acted_on_are_loaded_with_a_warning() {
        let list = [
            (
                Kind::BGPConfiguration,
                json!({"metadata": {"name": "default"}, "spec": {"logSeverityScreen": "Info"}}),
            ),
            (
                Kind::BGPPeer,
                json!({"metadata": {"name": "tor"}, "spec": {"peerIP": "192.0.2.1", "asNumber": 65000}}),
            ),
        ];
        let mut w = Vec::new();
        let (snap, _) = build(of_kind(&objects(&list)), None, &mut w);
        assert!(snap.bgp_configuration.is_some() && snap.peers.contains_key("tor"));
        assert_eq!(
            w.iter().filter(|l| l.starts_with(ACCEPTED)).count(),
            1,
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|l| l.contains("BGPConfiguration/default: spec.logSeverityScreen")),
            "{w:?}"
        );
    }

    #[test]
    fn node_spec_joins_annotations_starling_node_and_addresses() {
        let node = |ann: serde_json::Value| -> CoreNode {
            let n: Node = serde_json::from_value(json!({
                "metadata": {"name": "n1", "labels": {"zone": "a", "rr": "false"}, "annotations": ann},
                "spec": {"podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
                "status": {"addresses": [
                    {"type": "Hostname", "address": "n1"},
                    {"type": "InternalIP", "address": "192.0.2.11"}
                ]}
            }))
            .unwrap();
            CoreNode::from(&n)
        };
        let mut w = Vec::new();
        let annotated = node(json!({
            ANNOTATION_IPV4: "192.0.2.10/24",
            ANNOTATION_AS: "65001",
            ANNOTATION_RR_CLUSTER_ID: "nope"
        }));
        let (meta, spec, _) = node_spec(Some(&annotated), None, true, &mut w, "n1");
        assert_eq!(spec.ipv4_address.unwrap().to_string(), "192.0.2.10/24");
        assert_eq!(spec.as_number, Some(65001));
        assert_eq!(spec.pod_cidrs.len(), 2);
        assert_eq!(meta.labels.as_ref().unwrap()["zone"], "a");
        assert!(w[0].contains("route-reflector-cluster-id") && w[0].contains("`nope`"));

        // A StarlingNode wins field by field; labels key by key.
        let sn = (
            ObjectMeta {
                labels: Some([("rr".to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            StarlingNodeSpec {
                ipv4_address: None,
                ipv6_address: Some("2001:db8::10/64".parse().unwrap()),
                as_number: Some(65002),
                route_reflector_cluster_id: Some("224.0.0.1".parse().unwrap()),
                pod_cidrs: vec![],
            },
        );
        let (meta, spec, _) = node_spec(Some(&annotated), Some((&sn.0, &sn.1)), true, &mut w, "n1");
        assert_eq!(spec.ipv4_address.unwrap().to_string(), "192.0.2.10/24");
        assert_eq!(spec.as_number, Some(65002));
        assert!(spec.route_reflector_cluster_id.is_some() && spec.ipv6_address.is_some());
        assert_eq!(spec.pod_cidrs.len(), 2);
        let labels = meta.labels.unwrap();
        assert_eq!(
            (labels["rr"].as_str(), labels["zone"].as_str()),
            ("true", "a")
        );

        // Neither: the InternalIP, as a host route.
        let (_, spec, guessed) = node_spec(Some(&node(json!({}))), None, true, &mut w, "n1");
        assert_eq!(spec.ipv4_address.unwrap().to_string(), "192.0.2.11/32");
        assert!(guessed);

        // Published addresses: the agent's before Calico's, never over the
        // operator's, and not for the reader's own node.
        let published = node(json!({
            ANNOTATION_DETECTED_IPV4: "192.0.2.12/25",
            CALICO_ANNOTATION_IPV4: "192.0.2.13/24",
            CALICO_ANNOTATION_IPV6: "2001:db8::12/64"
        }));
        let (_, spec, _) = node_spec(Some(&published), None, true, &mut w, "n1");
        assert_eq!(spec.ipv4_address.unwrap().to_string(), "192.0.2.12/25");
        assert_eq!(spec.ipv6_address.unwrap().to_string(), "2001:db8::12/64");
        let calico = node(json!({CALICO_ANNOTATION_IPV4: "192.0.2.13/24"}));
        let (_, spec, _) = node_spec(Some(&calico), None, true, &mut w, "n1");
        assert_eq!(spec.ipv4_address.unwrap().to_string(), "192.0.2.13/24");
        let (_, spec, _) = node_spec(Some(&published), None, false, &mut w, "n1");
        assert_eq!(spec.ipv4_address.unwrap().to_string(), "192.0.2.11/32");
        assert!(spec.ipv6_address.is_none());
        let both = node(
            json!({ANNOTATION_IPV4: "192.0.2.10/24", ANNOTATION_DETECTED_IPV4: "192.0.2.12/25"}),
        );
        let (_, spec, _) = node_spec(Some(&both), None, true, &mut w, "n1");
        assert_eq!(spec.ipv4_address.unwrap().to_string(), "192.0.2.10/24");
        let bad = node(
            json!({ANNOTATION_DETECTED_IPV4: "nope", CALICO_ANNOTATION_IPV4: "192.0.2.13/24"}),
        );
        let (_, spec, _) = node_spec(Some(&bad), None, true, &mut w, "n1");
        assert_eq!(spec.ipv4_address.unwrap().to_string(), "192.0.2.13/24");
        assert!(
            w.iter()
                .any(|l| l.contains(ANNOTATION_DETECTED_IPV4) && l.contains("`nope`"))
        );
    }

    #[test]
    fn a_node_is_kept_as_the_parts_the_model_reads() {
        let o = dynamic(
            Kind::Node,
            json!({
                "metadata": {"name": "n1", "labels": {"zone": "a"},
                    "managedFields": [{"manager": "kubelet"}],
                    "annotations": {ANNOTATION_IPV4: "192.0.2.10/24", "node.alpha.kubernetes.io/ttl": "0"}},
                "spec": {"podCIDR": "10.244.1.0/24", "providerID": "kind://n1"},
                "status": {"addresses": [
                    {"type": "Hostname", "address": "n1"},
                    {"type": "InternalIP", "address": "192.0.2.11"}
                ], "images": [{"names": ["pause"], "sizeBytes": 1}]}
            }),
        );
        let Change::Apply(name, Parsed::Node(n)) =
            Change::new(Kind::Node, watcher::Event::Apply(o))
        else {
            panic!("not a parsed Node");
        };
        assert_eq!(name, "n1");
        assert_eq!(
            n,
            CoreNode {
                labels: [("zone".to_string(), "a".to_string())].into(),
                annotations: [(ANNOTATION_IPV4.to_string(), "192.0.2.10/24".to_string())].into(),
                pod_cidrs: vec!["10.244.1.0/24".into()],
                internal_ips: vec!["192.0.2.11".into()],
            }
        );
        // One our types refuse is kept as its error, naming the object.
        let bad = dynamic(
            Kind::BlockAffinity,
            json!({"metadata": {"name": "b"}, "spec": {"node": "n1", "cidr": "nope"}}),
        );
        match Parsed::new(Kind::BlockAffinity, &bad) {
            Parsed::Refused(e) => assert!(e.starts_with("BlockAffinity/b: spec: "), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn secrets_resolve_into_passwords() {
        let list = [
            (
                Kind::BGPPeer,
                json!({"metadata": {"name": "tor"}, "spec": {"peerIP": "192.0.2.1", "asNumber": 65000,
                    "password": {"secretKeyRef": {"name": "bgp", "key": "tor"}}}}),
            ),
            (
                Kind::BGPPeer,
                json!({"metadata": {"name": "tor2"}, "spec": {"peerIP": "192.0.2.2", "asNumber": 65000,
                    "password": {"secretKeyRef": {"name": "bgp", "key": "absent"}}}}),
            ),
        ];
        let mut w = Vec::new();
        let (mut snap, wanted) = build(of_kind(&objects(&list)), None, &mut w);
        assert_eq!(wanted.into_iter().collect::<Vec<_>>(), ["bgp"]);
        let secrets: HashMap<String, SecretData> = [(
            "bgp".to_string(),
            Some([("tor".to_string(), b"s3cret".to_vec())].into()),
        )]
        .into();
        resolve_passwords(&mut snap, &secrets, &KubeOptions::default(), &mut w);
        assert_eq!(snap.passwords.len(), 1);
        assert_eq!(snap.passwords.values().next().unwrap(), "s3cret");
        assert!(
            w.iter()
                .any(|l| l.contains("BGPPeer/tor2") && l.contains("no key `absent`")),
            "{w:?}"
        );
    }
}
