//! The event loop: one task owns the running node's state and takes its
//! inputs one at a time — a new model, route changes from the speaker,
//! IPAM's blocks and pod routes, the drain tick, the metrics tick. After
//! each it recomputes the desired FIB ([`super::routes`]) and publishes what
//! the control socket shows ([`Shared`]).

use super::control::{NodeStatus, Shared, lock};
use super::datastore_routes::{self, Claim};
use super::peering::Peering;
use super::routes::{self, RefusedReason};
use crate::autodetect::Detected;
use crate::encap::Encapsulation;
use crate::fib::Reconciler;
use crate::health::Endpoints;
use crate::model::Snapshot;
use crate::model::plan::{self, LocalBgp};
use crate::mtu::PodMtu;
use crate::nat::{self, NatPool, NatReconciler};
use crate::services::{self, Catalog, Ranges};
use anyhow::{Result, bail};
use ipnet::IpNet;
use starling_bgp::{RouteEvent, Speaker};
use starling_cni_proto::{PodRoute, StatusReply};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// How often, at most, route events recompute the desired FIB (each time
/// costs time in the whole set): a route change after a quiet spell is
/// published at once, later ones gathered until this long after.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// What start-up hands the event loop.
pub(super) struct Started {
    pub name: String,
    pub speaker: Speaker,
    pub fib: Reconciler,
    pub nat: NatReconciler,
    /// The pod MTU's rule, shared with IPAM: new addresses and pools go in.
    pub pod_mtu: PodMtu,
    /// The config's `encapsulation`, which overrides the pools' for the MTU.
    pub mtu_encapsulation: Option<Encapsulation>,
    pub local: LocalBgp,
    /// The model with this node's autodetected address filled in.
    pub snap: Arc<Snapshot>,
    pub blocks: Vec<IpNet>,
    pub pods: Vec<PodRoute>,
    /// This node's blocks others borrow from (IPAM's `lent`).
    pub lent: Option<watch::Receiver<Vec<IpNet>>>,
    /// The FIB kept a previous run's routes (graceful restart F bit): stale
    /// routes are pruned only after every peer's End-of-RIB.
    pub forwarding_preserved: bool,
    /// The longest a dropped session drains.
    pub drain: Duration,
    /// `meshWarnNodes`: a larger full mesh is reported.
    pub mesh_warn_nodes: usize,
    /// This node's address found by autodetection, when the model has none.
    pub autodetected: Option<Detected>,
    /// "file PATH" or "kubernetes", for status.
    pub datastore: String,
    /// `bgpEnabled`: off, the other nodes' blocks come from the datastore.
    pub bgp_enabled: bool,
    /// The block claims of the claim file as read at start (BGP off, file
    /// datastore); later versions come through [`Inputs::claims`].
    pub claims: Vec<Claim>,
}

/// The loop's inputs.
pub(super) struct Inputs {
    pub snaps: watch::Receiver<Arc<Snapshot>>,
    pub events: mpsc::UnboundedReceiver<RouteEvent>,
    pub blocks: watch::Receiver<Vec<IpNet>>,
    pub pods: watch::Receiver<Vec<PodRoute>>,
    /// BGP off: the claim file's claims (file datastore), or the borrowed
    /// addresses of the IPAMBlock records (Kubernetes).
    pub claims: Option<watch::Receiver<Vec<Claim>>>,
    /// The Services and their ready nodes (Kubernetes datastore).
    pub services: Option<watch::Receiver<Arc<Catalog>>>,
}

pub(super) struct Node {
    name: String,
    speaker: Speaker,
    fib: Reconciler,
    nat: NatReconciler,
    pod_mtu: PodMtu,
    mtu_encapsulation: Option<Encapsulation>,
    local: LocalBgp,
    snap: Arc<Snapshot>,
    own: Vec<IpAddr>,
    blocks: Vec<IpNet>,
    pods: Vec<PodRoute>,
    lent: Option<watch::Receiver<Vec<IpNet>>>,
    learned: BTreeMap<IpNet, Vec<IpAddr>>,
    synced: bool,
    peering: Peering,
    /// Send the next desired set even if it is the same (End-of-RIB prunes).
    resend: bool,
    shared: Arc<Mutex<Shared>>,
    autodetected: Option<Detected>,
    bgp_enabled: bool,
    claims: Vec<Claim>,
    /// The Services as last watched (empty with the file datastore).
    catalog: Arc<Catalog>,
    /// The Service prefixes this node announces.
    service_prefixes: BTreeSet<IpNet>,
}

impl Node {
    pub(super) fn new(s: Started) -> Node {
        let status = NodeStatus {
            node: s.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            address_source: match &s.autodetected {
                Some(d) => format!("autodetection ({})", d.reason),
                None => format!("the model (node {})", s.name),
            },
            datastore: s.datastore,
            route_source: if s.bgp_enabled { "bgp" } else { "datastore" }.into(),
            forwarding_preserved: s.forwarding_preserved,
            ..NodeStatus::default()
        };
        let mut node = Node {
            own: own_addresses(&s.snap, &s.name)
                .iter()
                .map(|n| n.addr())
                .collect(),
            peering: Peering::new(s.speaker.clone(), s.drain, s.mesh_warn_nodes),
            name: s.name,
            speaker: s.speaker,
            fib: s.fib,
            nat: s.nat,
            pod_mtu: s.pod_mtu,
            mtu_encapsulation: s.mtu_encapsulation,
            local: s.local,
            snap: s.snap,
            blocks: s.blocks,
            pods: s.pods,
            lent: s.lent,
            learned: BTreeMap::new(),
            // Without BGP no End-of-RIB comes: the datastore, complete
            // from the start, is the whole truth at once, so the first
            // desired set (with every remote block) prunes only what is
            // really gone.
            synced: !s.forwarding_preserved || !s.bgp_enabled,
            resend: true,
            shared: Arc::new(Mutex::new(Shared {
                status,
                ..Shared::default()
            })),
            autodetected: s.autodetected,
            bgp_enabled: s.bgp_enabled,
            claims: s.claims,
            catalog: Arc::new(Catalog::default()),
            service_prefixes: BTreeSet::new(),
        };
        node.refresh_remote_blocks();
        node
    }

    /// BGP off: the other nodes' blocks from the datastore, as if learned.
    fn refresh_remote_blocks(&mut self) {
        if !self.bgp_enabled {
            self.learned = datastore_routes::remote_blocks(&self.snap, &self.claims, &self.name);
        }
    }

    /// What the control socket answers from.
    pub(super) fn shared(&self) -> Arc<Mutex<Shared>> {
        self.shared.clone()
    }

    /// Apply the first plan, then take inputs until `until` finishes (its
    /// result is the loop's) or an input stops, which is an error.
    pub(super) async fn run(
        mut self,
        mut inputs: Inputs,
        obs: &Endpoints,
        until: impl Future<Output = Result<()>>,
    ) -> Result<()> {
        if let Some(rx) = inputs.services.as_mut() {
            self.catalog = rx.borrow_and_update().clone();
        }
        self.refresh_services();
        self.apply_plan().await;
        self.publish()?;
        let mut claims = inputs.claims.take();
        let mut catalog = inputs.services.take();
        tokio::pin!(until);
        let mut observe = tokio::time::interval(Duration::from_secs(2));
        let mut speaker_running = true;
        // Route events not yet published, and when they last were.
        let mut pending = false;
        let mut last_publish = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = &mut until => return r,
                _ = observe.tick() => self.observe(obs).await,
                r = inputs.snaps.changed() => {
                    if r.is_err() { bail!("the datastore stopped"); }
                    let s = inputs.snaps.borrow_and_update().clone();
                    self.model_changed(s).await;
                    self.publish()?;
                }
                ev = inputs.events.recv(), if speaker_running => {
                    let Some(ev) = ev else {
                        // Its task ended or panicked. Routes stay as they
                        // are; /healthz fails so the kubelet restarts us
                        // (gracefully, keeping forwarding) rather than the
                        // node running on without BGP.
                        error!("the BGP speaker stopped; /healthz fails from now on");
                        obs.readiness.set_stopped("the BGP speaker stopped");
                        speaker_running = false;
                        continue;
                    };
                    self.route_event(ev);
                    // Take the whole burst before recomputing.
                    while let Ok(ev) = inputs.events.try_recv() {
                        self.route_event(ev);
                    }
                    let now = tokio::time::Instant::now();
                    if now >= last_publish + PUBLISH_EVERY {
                        self.publish()?;
                        last_publish = now;
                        pending = false;
                    } else {
                        pending = true;
                    }
                }
                _ = tokio::time::sleep_until(last_publish + PUBLISH_EVERY), if pending => {
                    self.publish()?;
                    last_publish = tokio::time::Instant::now();
                    pending = false;
                }
                r = inputs.blocks.changed() => {
                    if r.is_err() { bail!("IPAM stopped"); }
                    let b = inputs.blocks.borrow_and_update().clone();
                    self.blocks_changed(b).await?;
                    self.publish()?;
                }
                r = inputs.pods.changed() => {
                    if r.is_err() { bail!("IPAM stopped"); }
                    self.pods = inputs.pods.borrow_and_update().clone();
                    self.publish()?;
                }
                r = changed(&mut claims) => {
                    if r.is_err() { bail!("the block claim reader stopped"); }
                    if let Some(rx) = claims.as_mut() {
                        self.claims = rx.borrow_and_update().clone();
                    }
                    self.refresh_remote_blocks();
                    self.publish()?;
                }
                r = changed(&mut catalog) => {
                    if r.is_err() { bail!("the Service watch stopped"); }
                    if let Some(rx) = catalog.as_mut() {
                        self.catalog = rx.borrow_and_update().clone();
                    }
                    if self.refresh_services() {
                        self.apply_plan().await;
                    }
                    self.publish()?;
                }
                _ = tick.tick(), if self.peering.is_draining() => {
                    self.peering.drain_step().await;
                    self.publish()?;
                }
            }
        }
    }

    /// Sessions, FIB and IPAM into the metrics and the readiness probe.
    async fn observe(&self, obs: &Endpoints) {
        if let Ok(sessions) = self.speaker.sessions().await {
            obs.metrics.observe_sessions(&sessions);
            obs.readiness.observe_sessions(&sessions);
        }
        obs.metrics.observe_fib(&self.fib.status());
        obs.metrics.observe_nat(&self.nat.status());
        obs.metrics.observe_ipam(&self.ipam_status());
        let pools: Vec<ipnet::IpNet> = self.snap.pools.values().map(|p| p.spec.cidr).collect();
        let allocated: Vec<std::net::IpAddr> =
            self.pods.iter().map(|p| p.destination.addr()).collect();
        obs.metrics
            .observe_ipam_usage(&self.name, &pools, &self.blocks, &allocated);
        obs.metrics
            .set_service_prefixes(self.service_prefixes.len());
        let refused = lock(&self.shared).refused.clone();
        obs.metrics.set_routes_refused(
            RefusedReason::ALL
                .iter()
                .map(|r| (r.label(), refused.iter().filter(|x| x.reason == *r).count())),
        );
    }

    fn route_event(&mut self, ev: RouteEvent) {
        match ev {
            // BGP off: the speaker has no peers; the datastore alone routes.
            RouteEvent::Change(_) if !self.bgp_enabled => {}
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
                self.resend = true;
            }
        }
    }

    async fn blocks_changed(&mut self, blocks: Vec<IpNet>) -> Result<()> {
        if !self.bgp_enabled {
            // Nothing to announce: the other nodes read the claim.
            self.blocks = blocks;
            return Ok(());
        }
        for b in blocks.iter().filter(|b| !self.blocks.contains(b)) {
            info!(block = %b, "announcing a new block");
            self.speaker.announce(*b)?;
        }
        for b in self
            .blocks
            .iter()
            .filter(|b| !blocks.contains(b) && !self.service_prefixes.contains(b))
        {
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
            if local.asn != self.local.asn
                || local.listen_port != self.local.listen_port
                || local.listen_addresses != self.local.listen_addresses
            {
                warn!(
                    old_asn = self.local.asn,
                    new_asn = local.asn,
                    "the node's AS number, BGP port or bindMode changed; it takes effect when the agent restarts"
                );
            }
            self.local.cluster_id = local.cluster_id;
        }
        self.own = own_addresses(&snap, &self.name)
            .iter()
            .map(|n| n.addr())
            .collect();
        let overhead = mtu_overhead(&snap, self.mtu_encapsulation);
        self.pod_mtu.update(self.own.clone(), overhead);
        self.snap = snap;
        self.refresh_remote_blocks();
        self.refresh_services();
        self.apply_plan().await;
    }

    /// Bring the announced Service prefixes to what the model and the
    /// Services imply ([`services::advertised`]); true when they changed.
    fn refresh_services(&mut self) -> bool {
        let want: BTreeSet<IpNet> = if self.bgp_enabled {
            services::advertised(
                &Ranges::from_spec(self.snap.bgp()),
                &self.catalog,
                &self.name,
            )
            .into_iter()
            // A block is announced as a block already.
            .filter(|p| !self.blocks.contains(p))
            .collect()
        } else {
            BTreeSet::new()
        };
        if want == self.service_prefixes {
            return false;
        }
        for p in want.difference(&self.service_prefixes) {
            info!(prefix = %p, "advertising a Service prefix");
            if let Err(e) = self.speaker.announce(*p) {
                warn!(prefix = %p, "cannot announce: {e}");
            }
        }
        for p in self.service_prefixes.difference(&want) {
            info!(prefix = %p, "withdrawing a Service prefix");
            if let Err(e) = self.speaker.withdraw(*p) {
                warn!(prefix = %p, "cannot withdraw: {e}");
            }
        }
        self.service_prefixes = want;
        true
    }

    async fn apply_plan(&mut self) {
        if !self.bgp_enabled {
            lock(&self.shared).status.warnings = bgp_off_warnings(&self.snap);
            return;
        }
        // eBGP peers are sent our blocks and our Service prefixes.
        let exported: Vec<IpNet> = self
            .blocks
            .iter()
            .chain(&self.service_prefixes)
            .copied()
            .collect();
        let warnings = self
            .peering
            .apply(&self.snap, &self.name, self.local.asn, &exported)
            .await;
        lock(&self.shared).status.warnings = warnings;
    }

    fn ipam_status(&self) -> StatusReply {
        StatusReply {
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
        let nat_pools: Vec<NatPool> = pools
            .iter()
            .map(|p| NatPool {
                cidr: p.cidr,
                nat_outgoing: p.nat_outgoing,
            })
            .collect();
        // Sent only when it changed; the task applies it within a pass.
        self.nat.set_desired(nat::desired(&nat_pools));
        // Other nodes' Service routes are for routers outside, not for our
        // kernel: the Service's traffic is handled where it arrives.
        let ranges = Ranges::from_spec(self.snap.bgp());
        let filtered: BTreeMap<IpNet, Vec<IpAddr>>;
        let learned = if ranges.is_empty() {
            &self.learned
        } else {
            filtered = self
                .learned
                .iter()
                .filter(|(p, _)| !ranges.covers(p))
                .map(|(p, h)| (*p, h.clone()))
                .collect();
            &filtered
        };
        let lent = self.lent.as_ref().map(|l| l.borrow().clone());
        let routes::Desired {
            routes: desired,
            refused,
        } = routes::desired(&routes::Inputs {
            lent: lent.as_deref().unwrap_or_default(),
            blocks: &self.blocks,
            pods: &self.pods,
            learned,
            pools: &pools,
            own: &self.own,
        });
        let was_refused = lock(&self.shared).refused.clone();
        for r in refused.iter().filter(|r| !was_refused.contains(r)) {
            tracing::warn!(prefix = %r.prefix, reason = r.reason.label(), "learned prefix refused: it would hijack this node");
        }
        let mut sh = lock(&self.shared);
        if self.resend || sh.desired != desired {
            if self.synced {
                self.fib.set_desired(desired.clone())?;
            } else {
                self.fib.set_desired_keep_stale(desired.clone())?;
            }
            self.resend = false;
        }
        sh.desired = desired;
        sh.refused = refused;
        sh.pods = self.pods.clone();
        sh.pools = pools;
        let st = &mut sh.status;
        st.addresses = own_addresses(&self.snap, &self.name);
        st.asn = self.local.asn;
        st.router_id = self.local.router_id;
        st.cluster_id = self.local.cluster_id;
        st.synced = self.synced;
        st.draining = self.peering.draining();
        st.blocks = self.blocks.clone();
        st.services = self.service_prefixes.iter().copied().collect();
        st.pods = self.pods.len();
        Ok(())
    }
}

/// A change of the claim file's claims (or the Services); never, without
/// a receiver.
async fn changed<T>(
    claims: &mut Option<watch::Receiver<T>>,
) -> Result<(), watch::error::RecvError> {
    match claims {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// With BGP off, what of the model goes unused, so it is not silently
/// ignored: BGPPeer objects and the node-to-node mesh.
fn bgp_off_warnings(snap: &Snapshot) -> Vec<String> {
    let mut w = Vec::new();
    if !snap.peers.is_empty() {
        let names: Vec<&str> = snap.peers.keys().map(String::as_str).collect();
        w.push(format!(
            "bgpEnabled is false: BGPPeer {} not used (no BGP sessions)",
            names.join(", ")
        ));
    }
    if snap.bgp_configuration.is_some() {
        w.push(
            "bgpEnabled is false: the BGPConfiguration (AS, mesh, timers) is not used;              routes to other nodes come from the datastore"
                .into(),
        );
    }
    w
}

/// The overhead the pod MTU must leave free: the worst of the enabled
/// pools' encapsulations, each over its own family (VXLAN: 50 for an IPv4
/// pool, 70 for an IPv6 one; Calico takes the smallest MTU of the two).
/// `configured` (the config's `encapsulation`) replaces the pools' own.
pub(super) fn mtu_overhead(snap: &Snapshot, configured: Option<Encapsulation>) -> u32 {
    snap.pools
        .values()
        .filter(|p| !p.spec.disabled)
        .map(|p| {
            configured
                .unwrap_or_else(|| p.spec.encapsulation())
                .overhead(p.spec.cidr.addr().is_ipv6())
        })
        .max()
        .unwrap_or_else(|| configured.map_or(0, |e| e.overhead(false)))
}

/// This node's addresses in the model, as BGP uses them.
pub(super) fn own_addresses(snap: &Snapshot, node: &str) -> Vec<IpNet> {
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

/// The snapshot with this node's autodetected address filled in.
pub(super) fn with_address(
    snap: Arc<Snapshot>,
    node: &str,
    found: Option<&Detected>,
) -> Arc<Snapshot> {
    let Some(IpNet::V4(a)) = found.map(|d| d.address) else {
        return snap;
    };
    if snap.node(node).is_none_or(|n| n.ipv4_address.is_some()) && !snap.guessed.contains(node) {
        return snap;
    }
    let mut s = (*snap).clone();
    if let Some(n) = s.nodes.get_mut(node) {
        n.spec.ipv4_address = Some(a);
    }
    Arc::new(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encap::EncapMode;
    use std::path::Path;

    fn snap(pools: &str) -> Snapshot {
        let mut y = String::new();
        for (i, spec) in pools.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            y.push_str(&format!(
                "---\napiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {{name: p{i}}}\nspec: {spec}\n"
            ));
        }
        crate::model::file::load_str(Path::new("test.yaml"), &y).unwrap()
    }

    #[test]
    fn the_mtu_overhead_is_the_worst_enabled_pool_over_its_own_family() {
        let s = snap(
            "{cidr: 10.244.0.0/16, ipipMode: Always}\n{cidr: \"fd00:10:244::/56\"}\n{cidr: 10.96.0.0/16, ipipMode: Always, disabled: true}",
        );
        assert_eq!(mtu_overhead(&s, None), 20);
        // The config's encapsulation replaces the pools': VXLAN over the
        // IPv6 pool's underlay is the worst, 70.
        let vxlan = Some(Encapsulation::Vxlan(EncapMode::Always));
        assert_eq!(mtu_overhead(&s, vxlan), 70);
        let v4_only = snap("{cidr: 10.244.0.0/16}");
        assert_eq!(mtu_overhead(&v4_only, vxlan), 50);
        assert_eq!(mtu_overhead(&v4_only, None), 0);
        assert_eq!(mtu_overhead(&snap(""), None), 0);
    }

    /// `GET path` from the health server: status and body.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    /// The speaker's task ending (here by its own shutdown; a panic closes
    /// the same channel) fails `/healthz` with the reason, and the event
    /// loop keeps running: the kubelet restarts the agent, forwarding stays.
    #[tokio::test]
    async fn a_stopped_speaker_fails_healthz_and_the_loop_runs_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let obs = Endpoints::new("test");
        tokio::spawn(crate::health::serve(listener, obs.clone()));

        let mut cfg = starling_bgp::SpeakerConfig::new(64512, "192.0.2.1".parse().unwrap());
        cfg.listen = vec!["127.0.0.1:0".parse().unwrap()];
        let (speaker, events) = Speaker::start(cfg).await.unwrap();
        // The tasks behind the handles are not run: this test is about the
        // speaker; their handles take the desired state regardless.
        let (fib, _fib_task) = Reconciler::new(crate::fib::FibConfig::default());
        let (nat, _nat_task) = NatReconciler::new(None);
        let snapshot = Arc::new(snap(""));
        let node = Node::new(Started {
            name: "n1".into(),
            speaker: speaker.clone(),
            fib,
            nat,
            pod_mtu: PodMtu::new(crate::mtu::MtuRule::Fixed(1500)),
            mtu_encapsulation: None,
            local: LocalBgp {
                asn: 64512,
                router_id: Some("192.0.2.1".parse().unwrap()),
                cluster_id: None,
                listen_port: 179,
                restart_time: 120,
                listen_addresses: vec![],
            },
            snap: snapshot.clone(),
            blocks: vec![],
            pods: vec![],
            lent: None,
            forwarding_preserved: false,
            drain: Duration::from_secs(1),
            mesh_warn_nodes: 100,
            autodetected: None,
            datastore: "test".into(),
            bgp_enabled: true,
            claims: vec![],
        });
        let (_snaps_tx, snaps) = watch::channel(snapshot);
        let (_blocks_tx, blocks) = watch::channel(vec![]);
        let (_pods_tx, pods) = watch::channel(vec![]);
        let inputs = Inputs {
            snaps,
            events,
            blocks,
            pods,
            claims: None,
            services: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let loop_obs = obs.clone();
        let run = tokio::spawn(async move {
            node.run(inputs, &loop_obs, async {
                let _ = stopped.await;
                Ok(())
            })
            .await
        });
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));

        speaker.shutdown("test: the speaker stops").await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while obs.readiness.stopped().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            get(addr, "/healthz").await,
            (503, "stopped: the BGP speaker stopped\n".into())
        );
        // The loop serves on (the control socket, IPAM's routes) until the
        // kubelet restarts the agent.
        assert!(!run.is_finished(), "the event loop ended with the speaker");
        stop.send(()).unwrap();
        run.await.unwrap().unwrap();
    }
}
