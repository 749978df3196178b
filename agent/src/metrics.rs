//! The agent's Prometheus metrics.
//!
//! One [`Metrics`] value is shared by every part of the agent (it is an
//! `Arc` inside, so clones are cheap and all see the same series). The parts
//! report what they already publish — the speaker's session table, the FIB
//! reconciler's [`FibStatus`], IPAM's [`StatusReply`] — and the health server
//! renders the lot in the OpenMetrics text format on `/metrics`.
//!
//! See docs/install.md for the list of series and what each means.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use starling_bgp::SessionStatus;
use starling_cni_proto::{Request, StatusReply};

use crate::fib::FibStatus;
use crate::nat::NatStatus;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The RFC 4271 states, so every one has a series (at 0 when no session is
/// in it) and a dashboard can sum them without gaps.
pub const SESSION_STATES: [&str; 6] = [
    "Idle",
    "Connect",
    "Active",
    "OpenSent",
    "OpenConfirm",
    "Established",
];

/// Upper bounds of the CNI latency buckets, in seconds: 0.5 ms to 5 s. An
/// ADD is a group commit (one fsync) away from its reply, so most land in
/// the low milliseconds; the top buckets catch a stalled store.
pub const CNI_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// One pool's utilisation on this node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    node: String,
    pool: String,
    state: &'static str,
}

/// One block's utilisation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlockLabel {
    block: String,
    node: String,
    pool: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CmdLabel {
    cmd: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

type HistogramFamily = Family<CmdLabel, Histogram, fn() -> Histogram>;

fn cni_histogram() -> Histogram {
    Histogram::new(CNI_BUCKETS)
}

/// The IPAM series: addresses by state, blocks, per pool, per block.
type IpamFamilies = (
    Family<StateLabel, Gauge>,
    Gauge,
    Family<PoolLabel, Gauge>,
    Family<BlockLabel, Gauge>,
);

/// The IPAM series, registered.
fn ipam_families(registry: &mut Registry) -> IpamFamilies {
    let ipam_addresses = Family::<StateLabel, Gauge>::default();
    registry.register(
        "ipam_addresses",
        "Pod addresses in this node's blocks, allocated or free",
        ipam_addresses.clone(),
    );
    let ipam_blocks = Gauge::default();
    registry.register(
        "ipam_blocks",
        "IPAM blocks this node holds",
        ipam_blocks.clone(),
    );
    let ipam_pool_addresses = Family::<PoolLabel, Gauge>::default();
    registry.register(
        "ipam_pool_addresses",
        "Per IP pool: addresses in this node's blocks of the pool (capacity) and those allocated",
        ipam_pool_addresses.clone(),
    );
    let ipam_block_addresses = Family::<BlockLabel, Gauge>::default();
    registry.register(
        "ipam_block_addresses",
        "Per block this node holds: its addresses (capacity) and those allocated",
        ipam_block_addresses.clone(),
    );
    (
        ipam_addresses,
        ipam_blocks,
        ipam_pool_addresses,
        ipam_block_addresses,
    )
}

struct Series {
    registry: Registry,
    bgp_sessions: Family<StateLabel, Gauge>,
    bgp_prefixes: Family<DirectionLabel, Gauge>,
    bgp_routes_refused: Family<ReasonLabel, Gauge>,
    fib_operations: Family<OpLabel, Counter>,
    fib_errors: Counter,
    fib_routes: Gauge,
    /// The `syncs` of the last [`FibStatus`] counted, so a status seen twice
    /// is not counted twice.
    fib_seen_syncs: Mutex<Option<u64>>,
    ipam_addresses: Family<StateLabel, Gauge>,
    ipam_blocks: Gauge,
    ipam_pool_addresses: Family<PoolLabel, Gauge>,
    ipam_block_addresses: Family<BlockLabel, Gauge>,
    /// The pool and block series last set, so a released block's go.
    ipam_usage_seen: Mutex<(Vec<PoolLabel>, Vec<BlockLabel>)>,
    cni_duration: HistogramFamily,
    annotation_reads: Family<SourceLabel, Counter>,
    datastore_ready: Gauge,
    nat_ready: Gauge,
    service_prefixes: Gauge,
}

/// The agent's metrics; clone it into every task that reports.
#[derive(Clone)]
pub struct Metrics {
    series: Arc<Series>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(env!("CARGO_PKG_VERSION"))
    }
}

impl Metrics {
    /// All series registered, at zero; `version` becomes
    /// `starling_agent_info{version}`.
    pub fn new(version: &str) -> Metrics {
        let mut registry = Registry::with_prefix("starling");
        let bgp_sessions = Family::<StateLabel, Gauge>::default();
        registry.register(
            "bgp_sessions",
            "BGP sessions by RFC 4271 state",
            bgp_sessions.clone(),
        );
        let bgp_prefixes = Family::<DirectionLabel, Gauge>::default();
        registry.register(
            "bgp_prefixes",
            "Prefixes received from and sent to all BGP peers",
            bgp_prefixes.clone(),
        );
        let bgp_routes_refused = Family::<ReasonLabel, Gauge>::default();
        registry.register(
            "bgp_routes_refused",
            "Learned prefixes kept out of the kernel because they would hijack this node, by reason",
            bgp_routes_refused.clone(),
        );
        let fib_operations = Family::<OpLabel, Counter>::default();
        registry.register(
            "fib_operations",
            "Routes the FIB reconciler wrote to the kernel, by operation",
            fib_operations.clone(),
        );
        let fib_errors = Counter::default();
        registry.register(
            "fib_errors",
            "Route writes the kernel refused, plus reconciler passes that failed whole",
            fib_errors.clone(),
        );
        let fib_routes = Gauge::default();
        registry.register(
            "fib_routes",
            "Routes of Starling's protocol in the kernel after the last pass",
            fib_routes.clone(),
        );
        let (ipam_addresses, ipam_blocks, ipam_pool_addresses, ipam_block_addresses) =
            ipam_families(&mut registry);
        let (cni_duration, annotation_reads) = cni_families(&mut registry);
        let datastore_ready = Gauge::default();
        registry.register(
            "datastore_ready",
            "1 once the cluster model has been read in full, 0 before or after losing it",
            datastore_ready.clone(),
        );
        let nat_ready = gauge(
            &mut registry,
            "nat_ready",
            "1 when the natOutgoing rules (nftables table inet starling) are as the pools want, 0 when the last pass failed (nft missing or refused)",
        );
        let service_prefixes = gauge(
            &mut registry,
            "service_prefixes_advertised",
            "Service prefixes this node advertises (configured CIDRs and host routes of externalTrafficPolicy: Local Services)",
        );
        registry.register(
            "agent",
            "The running agent's version",
            Info::new(VersionLabel {
                version: version.to_string(),
            }),
        );
        let m = Metrics {
            series: Arc::new(Series {
                registry,
                bgp_sessions,
                bgp_prefixes,
                bgp_routes_refused,
                fib_operations,
                fib_errors,
                fib_routes,
                fib_seen_syncs: Mutex::new(None),
                ipam_addresses,
                ipam_blocks,
                ipam_pool_addresses,
                ipam_block_addresses,
                ipam_usage_seen: Mutex::new((Vec::new(), Vec::new())),
                cni_duration,
                annotation_reads,
                datastore_ready,
                nat_ready,
                service_prefixes,
            }),
        };
        // Every fixed label value exists from the start: a series that
        // appears only after its first event breaks rate() and alerts.
        m.set_session_states(std::iter::empty::<&str>());
        m.set_prefixes(0, 0);
        for op in ["add", "replace", "delete"] {
            m.series
                .fib_operations
                .get_or_create(&OpLabel { op })
                .inc_by(0);
        }
        for source in ["watch", "apiserver"] {
            m.series
                .annotation_reads
                .get_or_create(&SourceLabel { source })
                .inc_by(0);
        }
        for state in ["allocated", "free"] {
            m.series
                .ipam_addresses
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(0);
        }
        m
    }

    /// Set `starling_bgp_sessions{state}` from the states of all sessions,
    /// one entry per session. States outside RFC 4271's get their own series.
    pub fn set_session_states<'a>(&self, states: impl IntoIterator<Item = &'a str>) {
        let mut counts: Vec<(String, i64)> =
            SESSION_STATES.iter().map(|s| (s.to_string(), 0)).collect();
        for st in states {
            match counts.iter_mut().find(|(s, _)| s == st) {
                Some((_, n)) => *n += 1,
                None => counts.push((st.to_string(), 1)),
            }
        }
        let family = &self.series.bgp_sessions;
        // A state no session is in any more (only possible for a non-RFC
        // one) is dropped rather than left at its last value.
        family.clear();
        for (state, n) in counts {
            family.get_or_create(&StateLabel { state }).set(n);
        }
    }

    /// Set `starling_bgp_prefixes{direction}`, summed over all peers.
    pub fn set_prefixes(&self, received: usize, sent: usize) {
        let family = &self.series.bgp_prefixes;
        family
            .get_or_create(&DirectionLabel {
                direction: "received",
            })
            .set(clamp(received as u128));
        family
            .get_or_create(&DirectionLabel { direction: "sent" })
            .set(clamp(sent as u128));
    }

    /// Set `starling_bgp_routes_refused{reason}`: (reason label, count) for
    /// every reason, zeros included.
    pub fn set_routes_refused(&self, counts: impl IntoIterator<Item = (&'static str, usize)>) {
        for (reason, n) in counts {
            self.series
                .bgp_routes_refused
                .get_or_create(&ReasonLabel { reason })
                .set(clamp(n as u128));
        }
    }

    /// Both BGP gauges from the speaker's session table.
    pub fn observe_sessions(&self, sessions: &[SessionStatus]) {
        self.set_session_states(sessions.iter().map(|s| s.state.as_str()));
        self.set_prefixes(
            sessions.iter().map(|s| s.prefixes_received).sum(),
            sessions.iter().map(|s| s.prefixes_sent).sum(),
        );
    }

    /// Count one FIB reconciler status, as `Reconciler::watch_status()`
    /// publishes it: call this once per published status.
    ///
    /// A status whose `syncs` moved on adds its `last_sync` to the operation
    /// and error counters. The reconciler publishes after every attempt, so a
    /// status whose `syncs` did not move but that carries errors is a pass
    /// that failed whole (netlink down); it counts as one error. Passes the
    /// watch channel coalesced between two calls are not seen: the counters
    /// are a lower bound, exact when the caller keeps up.
    pub fn observe_fib(&self, status: &FibStatus) {
        let s = &self.series;
        s.fib_routes.set(clamp(status.installed as u128));
        let mut seen = s
            .fib_seen_syncs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let new_pass = match *seen {
            None => status.syncs > 0,
            // Fewer passes than before: the reconciler restarted.
            Some(prev) => status.syncs != prev,
        };
        if new_pass {
            let r = &status.last_sync;
            self.fib_ops(r.added as u64, r.replaced as u64, r.removed as u64);
            s.fib_errors.inc_by(r.failed as u64);
        } else if seen.is_some() && !status.errors.is_empty() {
            s.fib_errors.inc();
        }
        *seen = Some(status.syncs);
    }

    /// Add to `starling_fib_operations_total` directly.
    pub fn fib_ops(&self, added: u64, replaced: u64, deleted: u64) {
        let f = &self.series.fib_operations;
        f.get_or_create(&OpLabel { op: "add" }).inc_by(added);
        f.get_or_create(&OpLabel { op: "replace" }).inc_by(replaced);
        f.get_or_create(&OpLabel { op: "delete" }).inc_by(deleted);
    }

    /// Add to `starling_fib_errors_total` directly.
    pub fn fib_errors(&self, n: u64) {
        self.series.fib_errors.inc_by(n);
    }

    /// Set the IPAM gauges from `Ipam::status()` (or a `Request::Status`
    /// reply). Free is the blocks' size less the allocations: Starling
    /// hands out every address of a block.
    pub fn observe_ipam(&self, status: &StatusReply) {
        let capacity = status
            .blocks
            .iter()
            .map(|b| {
                let host_bits = u32::from(b.max_prefix_len() - b.prefix_len());
                1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
            })
            .fold(0u128, u128::saturating_add);
        let allocated = status.allocated as u128;
        let s = &self.series;
        s.ipam_addresses
            .get_or_create(&StateLabel {
                state: "allocated".into(),
            })
            .set(clamp(allocated));
        s.ipam_addresses
            .get_or_create(&StateLabel {
                state: "free".into(),
            })
            .set(clamp(capacity.saturating_sub(allocated)));
        s.ipam_blocks.set(clamp(status.blocks.len() as u128));
    }

    /// Set the per-pool and per-block utilisation of `node`: its blocks
    /// (each counted in the first of `pools` containing it, `none` for a
    /// block outside every pool) and the addresses allocated. Series of
    /// blocks no longer held are removed.
    pub fn observe_ipam_usage(
        &self,
        node: &str,
        pools: &[ipnet::IpNet],
        blocks: &[ipnet::IpNet],
        allocated: &[std::net::IpAddr],
    ) {
        let pool_of = |b: &ipnet::IpNet| {
            pools
                .iter()
                .find(|p| p.contains(b))
                .map_or("none".to_string(), ToString::to_string)
        };
        let mut per_pool: std::collections::BTreeMap<String, (u128, u128)> = pools
            .iter()
            .map(|p| (p.to_string(), (0u128, 0u128)))
            .collect();
        let mut block_series = Vec::new();
        for b in blocks {
            let host_bits = u32::from(b.max_prefix_len() - b.prefix_len());
            let capacity = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
            let used = allocated.iter().filter(|a| b.contains(*a)).count() as u128;
            let pool = pool_of(b);
            let e = per_pool.entry(pool.clone()).or_default();
            e.0 = e.0.saturating_add(capacity);
            e.1 += used;
            for (state, v) in [("capacity", capacity), ("allocated", used)] {
                block_series.push((
                    BlockLabel {
                        block: b.to_string(),
                        node: node.to_string(),
                        pool: pool.clone(),
                        state,
                    },
                    v,
                ));
            }
        }
        let mut pool_series = Vec::new();
        for (pool, (capacity, used)) in per_pool {
            for (state, v) in [("capacity", capacity), ("allocated", used)] {
                let label = PoolLabel {
                    node: node.to_string(),
                    pool: pool.clone(),
                    state,
                };
                pool_series.push((label, v));
            }
        }
        let s = &self.series;
        let mut seen = s.ipam_usage_seen.lock().unwrap_or_else(|e| e.into_inner());
        for (l, v) in &pool_series {
            s.ipam_pool_addresses.get_or_create(l).set(clamp(*v));
        }
        for (l, v) in &block_series {
            s.ipam_block_addresses.get_or_create(l).set(clamp(*v));
        }
        let pools_now: Vec<PoolLabel> = pool_series.into_iter().map(|(l, _)| l).collect();
        let blocks_now: Vec<BlockLabel> = block_series.into_iter().map(|(l, _)| l).collect();
        for old in seen.0.iter().filter(|l| !pools_now.contains(l)) {
            s.ipam_pool_addresses.remove(old);
        }
        for old in seen.1.iter().filter(|l| !blocks_now.contains(l)) {
            s.ipam_block_addresses.remove(old);
        }
        *seen = (pools_now, blocks_now);
    }

    /// Record how long the agent took to answer one plugin request.
    pub fn observe_cni(&self, cmd: CniCommand, took: Duration) {
        self.series
            .cni_duration
            .get_or_create(&CmdLabel { cmd: cmd.label() })
            .observe(took.as_secs_f64());
    }

    /// Count one ADD's annotation read, answered from `source` (`watch` or
    /// `apiserver`).
    pub fn annotation_read(&self, source: &'static str) {
        self.series
            .annotation_reads
            .get_or_create(&SourceLabel { source })
            .inc();
    }

    /// `starling_datastore_ready`: the model has been read in full.
    pub fn set_datastore_ready(&self, ready: bool) {
        self.series.datastore_ready.set(i64::from(ready));
    }

    /// `starling_nat_ready` from the NAT reconciler's status: 1 once a
    /// pass succeeded and none has failed since.
    pub fn observe_nat(&self, status: &NatStatus) {
        let ok = status.error.is_none() && status.generation > 0;
        self.series.nat_ready.set(i64::from(ok));
    }

    /// `starling_service_prefixes_advertised`.
    pub fn set_service_prefixes(&self, n: usize) {
        self.series.service_prefixes.set(clamp(n as u128));
    }

    /// The OpenMetrics text exposition of every series.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug
        // in a label value, and an empty scrape is the honest answer then.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.series.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
            out.clear();
        }
        out
    }
}

/// The plugin request kinds, as the `cmd` label names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Gc,
    Status,
    /// `starlingctl ipam check`/`release` listing the allocations.
    List,
    /// A request that could not be read (bad frame, wrong peer).
    Invalid,
}

impl CniCommand {
    pub fn of(request: &Request) -> CniCommand {
        match request {
            Request::Add(_) => CniCommand::Add,
            Request::Del { .. } => CniCommand::Del,
            Request::Check { .. } => CniCommand::Check,
            Request::Gc { .. } => CniCommand::Gc,
            Request::Status => CniCommand::Status,
            Request::List => CniCommand::List,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            CniCommand::Add => "add",
            CniCommand::Del => "del",
            CniCommand::Check => "check",
            CniCommand::Gc => "gc",
            CniCommand::Status => "status",
            CniCommand::List => "list",
            CniCommand::Invalid => "invalid",
        }
    }
}

/// The CNI series: request durations by command, annotation reads by
/// source.
fn cni_families(registry: &mut Registry) -> (HistogramFamily, Family<SourceLabel, Counter>) {
    let cni_duration = HistogramFamily::new_with_constructor(cni_histogram);
    registry.register_with_unit(
        "cni_request_duration",
        "Time the agent took to answer a CNI plugin request, by command",
        prometheus_client::registry::Unit::Seconds,
        cni_duration.clone(),
    );
    let annotation_reads = Family::<SourceLabel, Counter>::default();
    registry.register(
        "ipam_annotation_reads",
        "IPAM annotations read for a pod ADD, by source: watch (the agent's copy of its node's pods and the namespaces) or apiserver (a GET, when the copy lacks the pod)",
        annotation_reads.clone(),
    );
    (cni_duration, annotation_reads)
}

/// A plain gauge, registered.
fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    registry.register(name, help, g.clone());
    g
}

fn clamp(n: u128) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fib::SyncReport;

    /// The value of the sample line `series` (name and labels, exactly as
    /// exposed), or None when it is absent.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
            rest.parse().ok()
        })
    }

    #[test]
    fn every_series_is_exposed_from_the_start() {
        let text = Metrics::new("9.9.9").encode();
        for (series, want) in [
            (r#"starling_bgp_sessions{state="Established"}"#, 0.0),
            (r#"starling_bgp_sessions{state="Idle"}"#, 0.0),
            (r#"starling_bgp_prefixes{direction="received"}"#, 0.0),
            (r#"starling_bgp_prefixes{direction="sent"}"#, 0.0),
            (r#"starling_fib_operations_total{op="add"}"#, 0.0),
            (r#"starling_fib_operations_total{op="replace"}"#, 0.0),
            (r#"starling_fib_operations_total{op="delete"}"#, 0.0),
            ("starling_fib_errors_total", 0.0),
            (r#"starling_ipam_addresses{state="allocated"}"#, 0.0),
            (r#"starling_ipam_addresses{state="free"}"#, 0.0),
            ("starling_ipam_blocks", 0.0),
            ("starling_datastore_ready", 0.0),
            (r#"starling_agent_info{version="9.9.9"}"#, 1.0),
        ] {
            assert_eq!(sample(&text, series), Some(want), "{series} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn sessions_are_counted_by_state_and_prefixes_summed() {
        let m = Metrics::new("0");
        let session = |state: &str, rx: usize, tx: usize| SessionStatus {
            peer: "192.0.2.1".parse().unwrap(),
            asn: 64512,
            kind: "node-to-node mesh".into(),
            state: state.into(),
            since: 0,
            prefixes_received: rx,
            prefixes_sent: tx,
            last_error: None,
            description: None,
        };
        m.observe_sessions(&[
            session("Established", 10, 2),
            session("Established", 5, 2),
            session("Active", 0, 0),
        ]);
        let text = m.encode();
        let get = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
        assert_eq!(get(r#"starling_bgp_sessions{state="Established"}"#), 2.0);
        assert_eq!(get(r#"starling_bgp_sessions{state="Active"}"#), 1.0);
        assert_eq!(get(r#"starling_bgp_sessions{state="Connect"}"#), 0.0);
        assert_eq!(get(r#"starling_bgp_prefixes{direction="received"}"#), 15.0);
        assert_eq!(get(r#"starling_bgp_prefixes{direction="sent"}"#), 4.0);

        // The next table replaces the last one rather than adding to it.
        m.observe_sessions(&[session("Idle", 0, 0)]);
        let text = m.encode();
        assert_eq!(
            sample(&text, r#"starling_bgp_sessions{state="Established"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"starling_bgp_sessions{state="Idle"}"#),
            Some(1.0)
        );
    }

    #[test]
    fn fib_passes_are_counted_once_each() {
        let m = Metrics::new("0");
        let mut st = FibStatus {
            syncs: 1,
            installed: 7,
            last_sync: SyncReport {
                added: 7,
                replaced: 1,
                removed: 2,
                failed: 1,
                ..SyncReport::default()
            },
            ..FibStatus::default()
        };
        m.observe_fib(&st);
        // The same status seen again (a second watcher wake-up) adds nothing.
        m.observe_fib(&st);
        st.syncs = 2;
        st.last_sync = SyncReport {
            added: 3,
            ..SyncReport::default()
        };
        m.observe_fib(&st);
        // A pass that failed whole: syncs does not move, errors say why.
        st.errors = vec!["netlink dump routes: EIO".into()];
        m.observe_fib(&st);
        let text = m.encode();
        let get = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
        assert_eq!(get(r#"starling_fib_operations_total{op="add"}"#), 10.0);
        assert_eq!(get(r#"starling_fib_operations_total{op="replace"}"#), 1.0);
        assert_eq!(get(r#"starling_fib_operations_total{op="delete"}"#), 2.0);
        assert_eq!(get("starling_fib_errors_total"), 2.0);
        assert_eq!(get("starling_fib_routes"), 7.0);
    }

    #[test]
    fn ipam_usage_per_pool_and_block_and_released_blocks_go() {
        let m = Metrics::new("9.9.9");
        let pools: Vec<ipnet::IpNet> = vec![
            "10.1.0.0/16".parse().unwrap(),
            "10.2.0.0/24".parse().unwrap(),
        ];
        let blocks: Vec<ipnet::IpNet> = vec![
            "10.1.0.0/26".parse().unwrap(),
            "10.1.0.64/26".parse().unwrap(),
            "192.0.2.0/30".parse().unwrap(),
        ];
        let ips: Vec<std::net::IpAddr> = ["10.1.0.1", "10.1.0.2", "10.1.0.70", "192.0.2.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        m.observe_ipam_usage("n1", &pools, &blocks, &ips);
        let text = m.encode();
        for (series, want) in [
            (
                r#"starling_ipam_block_addresses{block="10.1.0.0/26",node="n1",pool="10.1.0.0/16",state="allocated"}"#,
                2.0,
            ),
            (
                r#"starling_ipam_block_addresses{block="10.1.0.0/26",node="n1",pool="10.1.0.0/16",state="capacity"}"#,
                64.0,
            ),
            (
                r#"starling_ipam_block_addresses{block="192.0.2.0/30",node="n1",pool="none",state="allocated"}"#,
                1.0,
            ),
            (
                r#"starling_ipam_pool_addresses{node="n1",pool="10.1.0.0/16",state="allocated"}"#,
                3.0,
            ),
            (
                r#"starling_ipam_pool_addresses{node="n1",pool="10.1.0.0/16",state="capacity"}"#,
                128.0,
            ),
            (
                r#"starling_ipam_pool_addresses{node="n1",pool="10.2.0.0/24",state="capacity"}"#,
                0.0,
            ),
        ] {
            assert_eq!(sample(&text, series), Some(want), "{series}\n{text}");
        }
        // The second block released: its series go, the pool's shrink.
        m.observe_ipam_usage("n1", &pools, &blocks[..1], &ips[..2]);
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                r#"starling_ipam_block_addresses{block="10.1.0.64/26",node="n1",pool="10.1.0.0/16",state="capacity"}"#
            ),
            None,
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"starling_ipam_pool_addresses{node="n1",pool="10.1.0.0/16",state="capacity"}"#
            ),
            Some(64.0)
        );
    }

    #[test]
    fn ipam_usage_counts_free_addresses_in_held_blocks() {
        let m = Metrics::new("0");
        m.observe_ipam(&StatusReply {
            ready: true,
            reason: String::new(),
            node: "n1".into(),
            blocks: vec![
                "10.9.0.0/26".parse().unwrap(),
                "10.9.0.64/26".parse().unwrap(),
                "fd00::/122".parse().unwrap(),
            ],
            allocated: 70,
        });
        let text = m.encode();
        assert_eq!(
            sample(&text, r#"starling_ipam_addresses{state="allocated"}"#),
            Some(70.0)
        );
        assert_eq!(
            sample(&text, r#"starling_ipam_addresses{state="free"}"#),
            Some(122.0)
        );
        assert_eq!(sample(&text, "starling_ipam_blocks"), Some(3.0));
    }

    #[test]
    fn cni_latency_lands_in_its_bucket() {
        let m = Metrics::new("0");
        m.observe_cni(CniCommand::Add, Duration::from_micros(1500));
        m.observe_cni(CniCommand::Del, Duration::from_secs(10));
        m.set_datastore_ready(true);
        let text = m.encode();
        let get = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
        assert_eq!(
            get(r#"starling_cni_request_duration_seconds_bucket{le="0.001",cmd="add"}"#),
            0.0
        );
        assert_eq!(
            get(r#"starling_cni_request_duration_seconds_bucket{le="0.0025",cmd="add"}"#),
            1.0
        );
        assert_eq!(
            get(r#"starling_cni_request_duration_seconds_bucket{le="5.0",cmd="del"}"#),
            0.0
        );
        assert_eq!(
            get(r#"starling_cni_request_duration_seconds_bucket{le="+Inf",cmd="del"}"#),
            1.0
        );
        assert_eq!(
            get(r#"starling_cni_request_duration_seconds_count{cmd="add"}"#),
            1.0
        );
        assert_eq!(get("starling_datastore_ready"), 1.0);
    }
}
