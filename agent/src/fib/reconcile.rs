//! Desired routes -> kernel routes: resolve, dump, diff, write; and the task
//! that keeps doing it.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::host::{self, HostView, IpipStatus, Link, TUNL0};
use super::netlink::{Event, EventSocket, Nack, RtSocket, errno_text};
use super::route::{self, Found, KernelHop, KernelRoute, Stamp};
use super::vxlan::{self, VXLAN_DEVICE, VxlanStatus};
use super::{FibConfig, FibError, FibStatus, NextHop, Route, RouteProblem, RouteTarget};
use crate::encap::{EncapMode, Encapsulation, IPIP_OVERHEAD};

const RTM_NEWROUTE: u16 = 24;

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub added: usize,
    pub replaced: usize,
    pub removed: usize,
    /// Already right in the kernel: left as they were.
    pub adopted: usize,
    /// Refused by the kernel (conflicts and errors, see the status).
    pub failed: usize,
    /// FDB and neighbour entries of the VXLAN device written (added or
    /// corrected) and removed.
    #[serde(default)]
    pub neighbours_written: usize,
    #[serde(default)]
    pub neighbours_removed: usize,
    /// The pass dumped our routes and diffed the desired set against them
    /// (start-up, periodic resyncs, drift, host changes); otherwise it wrote
    /// only the difference from the set it last wrote.
    #[serde(default)]
    pub dumped: bool,
    /// Dumping our routes and diffing them against the desired set (or,
    /// without a dump, diffing against the last set written).
    pub dump_us: u64,
    /// Writing the difference.
    pub write_us: u64,
    /// The whole pass, links, sysctls and tunnel included.
    pub total_us: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Add,
    Replace,
    Remove,
}

/// The difference between the kernel and the desired set, built while dumping.
#[derive(Default)]
struct Diff {
    /// Desired routes met in the dump, by position.
    seen: Vec<bool>,
    adopted: usize,
    ops: Vec<(Op, IpNet)>,
    msgs: Vec<(RouteNetlinkMessage, u16)>,
    kept: HashMap<IpNet, KernelRoute>,
}

impl Diff {
    fn push(&mut self, op: Op, dst: IpNet, msg: RouteNetlinkMessage, flags: u16) {
        self.ops.push((op, dst));
        self.msgs.push((msg, flags));
    }

    /// One route of ours from the dump.
    fn found(
        &mut self,
        dst: IpNet,
        found: Found,
        want: &HashMap<IpNet, (u32, KernelRoute)>,
        prune: bool,
        stamp: Stamp,
    ) {
        match want.get(&dst) {
            // A second route of ours at the same prefix (another metric) is
            // always surplus.
            Some((i, kr)) if !self.seen[*i as usize] => {
                self.seen[*i as usize] = true;
                if *kr == found.route {
                    self.adopted += 1;
                } else {
                    let msg = route::new_route_message(dst, kr, stamp);
                    self.push(
                        Op::Replace,
                        dst,
                        RouteNetlinkMessage::NewRoute(msg),
                        NLM_F_CREATE | NLM_F_REPLACE,
                    );
                }
            }
            _ if prune => {
                let msg = route::del_route_message(dst, found.priority, stamp);
                self.push(Op::Remove, dst, RouteNetlinkMessage::DelRoute(msg), 0);
            }
            _ => {
                self.kept.insert(dst, found.route);
            }
        }
    }
}

/// The desired set resolved against the host as it was; reused while
/// neither the set nor the links, addresses and tunnel change, so an
/// unchanged resync costs a dump and one lookup per route.
struct Resolved {
    /// The desired set resolved.
    routes: Arc<Vec<Route>>,
    view: HostView,
    uplink: Option<String>,
    ipip: IpipStatus,
    vxlan: Option<u32>,
    vxlan6: Option<u32>,
    /// Destination -> (position, kernel route); the position indexes the
    /// `seen` bitmap of a pass.
    want: HashMap<IpNet, (u32, KernelRoute)>,
    /// Remote VTEPs: the next hops of `want` on the VXLAN device.
    peers: BTreeSet<IpAddr>,
    /// The same on the IPv6 underlay's device.
    peers6: BTreeSet<IpAddr>,
}

impl Resolved {
    /// Resolved against the same links, addresses, uplink and tunnels.
    fn same_host(&self, other: &Resolved) -> bool {
        self.view == other.view
            && self.uplink == other.uplink
            && self.ipip == other.ipip
            && self.vxlan == other.vxlan
            && self.vxlan6 == other.vxlan6
    }
}

/// What [`Fib::resolve`] found before it.
enum Prior {
    /// The last resolution still holds.
    Same,
    /// It was replaced; this is the old one.
    Was(Box<Resolved>),
    /// There was none.
    Nothing,
}

/// A netlink failure of operation `op`.
fn nl(op: &'static str) -> impl FnOnce(std::io::Error) -> FibError {
    move |source| FibError::Netlink { op, source }
}

/// Dump our routes and diff them against `want` as they arrive: one lookup
/// per route of ours in the kernel; desired routes the dump did not show
/// are added. A dump the kernel interrupted (the table changed under it) is
/// taken again, up to five times.
async fn dump_diff(
    sock: &mut RtSocket,
    want: &HashMap<IpNet, (u32, KernelRoute)>,
    stamp: Stamp,
    prune: bool,
) -> Result<Diff, FibError> {
    let mut diff = Diff::default();
    for _attempt in 0..5 {
        diff = Diff {
            seen: vec![false; want.len()],
            ..Diff::default()
        };
        let mut interrupted = false;
        for v6 in [false, true] {
            let req = RouteNetlinkMessage::GetRoute(route::dump_request(v6, stamp));
            sock.dump_raw(req, |m| match m {
                None => interrupted = true,
                Some((RTM_NEWROUTE, body)) => {
                    // The kernel filters with strict checking; check again
                    // in case an older kernel ignored the filter.
                    if let Some(r) = route::parse_raw(body)
                        && r.protocol == stamp.protocol
                        && r.table == stamp.table
                    {
                        diff.found(r.dst, r.found, want, prune, stamp);
                    }
                }
                Some(_) => {}
            })
            .await
            .map_err(nl("dump routes"))?;
        }
        if !interrupted {
            break;
        }
    }
    for (dst, (i, kr)) in want {
        if !diff.seen[*i as usize] {
            diff.push(
                Op::Add,
                *dst,
                RouteNetlinkMessage::NewRoute(route::new_route_message(*dst, kr, stamp)),
                // EXCL: a route of another protocol at the same key is not
                // ours to overwrite; the kernel answers EEXIST instead.
                NLM_F_CREATE | NLM_F_EXCL,
            );
        }
    }
    Ok(diff)
}

/// The difference between the set last written (`old`, less the prefixes
/// the kernel refused then) and the new one, without asking the kernel:
/// for passes while the kernel is trusted to hold what we wrote. Refused
/// prefixes are tried again; with `prune` off, routes of ours that are not
/// desired stay (`kept`), with it on there must be none kept (the caller
/// dumps instead).
fn diff_changes(
    old: &HashMap<IpNet, (u32, KernelRoute)>,
    new: &HashMap<IpNet, (u32, KernelRoute)>,
    failed: &HashSet<IpNet>,
    kept: &HashMap<IpNet, KernelRoute>,
    prune: bool,
    stamp: Stamp,
) -> Diff {
    let mut diff = Diff::default();
    for (dst, (_, kr)) in new {
        let had = old
            .get(dst)
            .filter(|_| !failed.contains(dst))
            .map(|(_, k)| k)
            .or_else(|| kept.get(dst));
        match had {
            Some(k) if k == kr => diff.adopted += 1,
            Some(_) => diff.push(
                Op::Replace,
                *dst,
                RouteNetlinkMessage::NewRoute(route::new_route_message(*dst, kr, stamp)),
                NLM_F_CREATE | NLM_F_REPLACE,
            ),
            None => diff.push(
                Op::Add,
                *dst,
                RouteNetlinkMessage::NewRoute(route::new_route_message(*dst, kr, stamp)),
                NLM_F_CREATE | NLM_F_EXCL,
            ),
        }
    }
    for (dst, (_, kr)) in old {
        if new.contains_key(dst) || failed.contains(dst) {
            continue;
        }
        if prune {
            let msg = route::del_route_message(*dst, None, stamp);
            diff.push(Op::Remove, *dst, RouteNetlinkMessage::DelRoute(msg), 0);
        } else {
            diff.kept.insert(*dst, kr.clone());
        }
    }
    for (dst, kr) in kept {
        if !new.contains_key(dst) {
            diff.kept.insert(*dst, kr.clone());
        }
    }
    diff
}

/// One synchronous reconciler over a netlink socket of the current network namespace.
pub struct Fib {
    config: FibConfig,
    stamp: Stamp,
    sock: RtSocket,
    desired: Arc<Vec<Route>>,
    prune: bool,
    resolved: Option<Resolved>,
    /// Desired prefixes the last pass could not install (conflicts, errors).
    failed: HashSet<IpNet>,
    /// Routes of ours kept although not desired (`prune` off).
    kept: HashMap<IpNet, KernelRoute>,
    /// Retry creating tunl0 on the next pass (start-up and periodic resyncs).
    retry_ipip: bool,
    /// The devices (name, index) whose proxy_arp a pass found or set to 1:
    /// not read again until the periodic resync.
    proxy_arp_set: HashMap<String, u32>,
    /// The kernel holds what the last pass wrote: the next
    /// [`Fib::sync_changes`] may write the difference without a dump.
    trusted: bool,
    /// `prune` of the last pass.
    last_prune: Option<bool>,
    status: FibStatus,
}

impl Fib {
    /// Open a netlink socket in the calling thread's network namespace.
    pub fn open(config: FibConfig) -> Result<Fib, FibError> {
        config.check()?;
        let sock = RtSocket::open().map_err(|source| FibError::Netlink {
            op: "open socket",
            source,
        })?;
        let stamp = Stamp {
            table: config.table,
            protocol: config.protocol.0,
        };
        Ok(Fib {
            config,
            stamp,
            sock,
            desired: Arc::new(Vec::new()),
            prune: true,
            resolved: None,
            failed: HashSet::new(),
            kept: HashMap::new(),
            retry_ipip: true,
            proxy_arp_set: HashMap::new(),
            trusted: false,
            last_prune: None,
            status: FibStatus::default(),
        })
    }

    pub fn status(&self) -> &FibStatus {
        &self.status
    }

    /// Replace the desired set (validated first) for the next [`Fib::sync`].
    /// With `prune` false, routes of ours that are not desired stay (used
    /// while a restarted agent has not yet heard the whole cluster).
    pub fn set_desired(&mut self, routes: Vec<Route>, prune: bool) -> Result<(), FibError> {
        route::validate(&routes)?;
        self.set_desired_valid(Arc::new(routes), prune);
        Ok(())
    }

    fn set_desired_valid(&mut self, routes: Arc<Vec<Route>>, prune: bool) {
        // The last resolution stays until the next pass replaces it: it is
        // what the kernel holds, and what that pass diffs against.
        self.desired = routes;
        self.prune = prune;
    }

    /// Our route at `dst` as we believe the kernel holds it after the last
    /// pass; events that match it are our own writes echoed back.
    fn installed(&self, dst: &IpNet) -> Option<&KernelRoute> {
        if self.failed.contains(dst) {
            return None;
        }
        let want = self
            .resolved
            .as_ref()
            .and_then(|r| r.want.get(dst).map(|(_, kr)| kr));
        want.or_else(|| self.kept.get(dst))
    }

    /// One pass: converge the table to the desired set, dumping our routes
    /// to find what differs.
    pub async fn sync(&mut self) -> Result<SyncReport, FibError> {
        self.pass(true).await
    }

    /// One pass that writes only the difference between the desired set and
    /// the set the last pass wrote, without dumping the table, as long as the
    /// kernel is trusted to hold what we wrote: the last pass succeeded
    /// without errors, nothing since called [`Fib::distrust`], the links,
    /// addresses and tunnels are unchanged and so is `prune`. Otherwise it
    /// is a full [`Fib::sync`].
    pub async fn sync_changes(&mut self) -> Result<SyncReport, FibError> {
        self.pass(false).await
    }

    /// The kernel may no longer hold what we wrote (drift reported, a
    /// periodic resync due): the next pass dumps.
    pub fn distrust(&mut self) {
        self.trusted = false;
    }

    async fn pass(&mut self, full: bool) -> Result<SyncReport, FibError> {
        let t0 = Instant::now();
        // Until this pass ends well, the kernel is not known to match.
        let trusted = std::mem::replace(&mut self.trusted, false);
        let (prior, neighbours, vxlan_error) = self.prepare().await?;
        let resolved = self.resolved.as_ref().expect("resolved by prepare");
        let incremental = !full
            && trusted
            && self.last_prune == Some(self.prune)
            // Stale routes kept until now go only through a dump.
            && (!self.prune || self.kept.is_empty());
        let old = match &prior {
            Prior::Same => Some(&resolved.want),
            Prior::Was(o) if o.same_host(resolved) => Some(&o.want),
            Prior::Was(_) | Prior::Nothing => None,
        }
        .filter(|_| incremental);
        let want = &resolved.want;
        let wanted = want.len();

        let t_dump = Instant::now();
        let diff = match old {
            Some(old) => diff_changes(old, want, &self.failed, &self.kept, self.prune, self.stamp),
            None => dump_diff(&mut self.sock, want, self.stamp, self.prune).await?,
        };
        let mut report = SyncReport {
            dumped: old.is_none(),
            dump_us: t_dump.elapsed().as_micros() as u64,
            adopted: diff.adopted,
            neighbours_written: neighbours.0,
            neighbours_removed: neighbours.1,
            ..SyncReport::default()
        };
        drop(prior);

        let t_write = Instant::now();
        let nacks = if diff.msgs.is_empty() {
            Vec::new()
        } else {
            self.sock
                .batch(diff.msgs, self.config.batch_bytes)
                .await
                .map_err(nl("write routes"))?
        };
        report.write_us = t_write.elapsed().as_micros() as u64;
        self.record_outcome(&diff.ops, &nacks, &mut report);
        self.status.errors.extend(vxlan_error);
        self.kept = diff.kept;
        self.status.installed = wanted - self.failed.len() + self.kept.len();
        // Conflicts are retried by every pass; an error leaves the kernel
        // in a state only a dump tells.
        self.trusted = self.status.errors.is_empty();
        self.last_prune = Some(self.prune);
        report.total_us = t0.elapsed().as_micros() as u64;
        self.status.last_sync = report.clone();
        self.status.syncs += 1;
        if report.added
            + report.replaced
            + report.removed
            + report.failed
            + report.neighbours_written
            + report.neighbours_removed
            > 0
        {
            tracing::info!(?report, "FIB sync");
        }
        Ok(report)
    }

    /// A pass up to the routes: links, uplink, tunnels, sysctls, the
    /// resolution of the desired set and the VXLAN neighbours. Returns the
    /// resolution it replaced, the neighbours written and removed, and
    /// VXLAN errors.
    async fn prepare(&mut self) -> Result<(Prior, (usize, usize), Vec<String>), FibError> {
        let desired = self.desired.clone();
        let mut view = HostView::read(&mut self.sock)
            .await
            .map_err(nl("read links and addresses"))?;
        let uplink = self.find_uplink(&view).await?;
        let uplink_link = uplink.as_deref().and_then(|u| view.link(u)).cloned();
        self.status.uplink = uplink.clone();
        self.status.uplink_mtu = uplink_link.as_ref().map(|l| l.mtu);
        let tunl0 = self
            .ensure_ipip(&desired, &mut view, uplink_link.as_ref())
            .await;
        let vxlan_dev = self
            .ensure_vxlan(&desired, &mut view, uplink_link.as_ref(), false)
            .await;
        let vxlan6_dev = self
            .ensure_vxlan(&desired, &mut view, uplink_link.as_ref(), true)
            .await;
        if self.config.manage_sysctls {
            self.set_sysctls(&desired, &view, tunl0.is_some(), vxlan_dev.is_some());
        }
        let prior = self.resolve(&desired, view, uplink, tunl0, (vxlan_dev, vxlan6_dev));
        let resolved = self.resolved.as_ref().expect("resolved just above");
        // The FDB and neighbours before the routes that use them.
        let mut neighbours = (0, 0);
        let mut vxlan_error = Vec::new();
        for (v6, dev, want_peers) in [
            (false, vxlan_dev, &resolved.peers),
            (true, vxlan6_dev, &resolved.peers6),
        ] {
            let Some(ifindex) = dev else { continue };
            match vxlan::sync_peers(&mut self.sock, ifindex, want_peers, self.prune, v6).await {
                Ok(w) => {
                    neighbours.0 += w.written;
                    neighbours.1 += w.removed;
                    let st = if v6 {
                        &mut self.status.vxlan6
                    } else {
                        &mut self.status.vxlan
                    };
                    if let VxlanStatus::Ready { peers, .. } = st {
                        *peers = want_peers.len();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "VXLAN peers not converged");
                    vxlan_error.push(e);
                }
            }
        }
        Ok((prior, neighbours, vxlan_error))
    }

    /// The device towards other nodes: configured, or that of the default
    /// route. Finding the default route dumps the whole main table: only at
    /// start-up, on periodic resyncs and when the uplink's link or addresses
    /// change (not for every pod's veth).
    async fn find_uplink(&mut self, view: &HostView) -> Result<Option<String>, FibError> {
        Ok(match &self.config.uplink {
            Some(u) => Some(u.clone()),
            None if self.retry_ipip
                || self.status.uplink.is_none()
                || self.resolved.as_ref().is_none_or(|r| {
                    uplink_changed(&r.view, view, self.status.uplink.as_deref())
                }) =>
            {
                host::default_route_device(&mut self.sock, view)
                    .await
                    .map_err(nl("find the default route"))?
            }
            None => self.status.uplink.clone(),
        })
    }

    /// `tunl0` when some desired route needs IPIP: Ipip hops, and
    /// CrossSubnet hops off our subnet. Creating it is retried only on
    /// start-up and periodic resyncs once it failed. Returns its ifindex
    /// when it is ready.
    async fn ensure_ipip(
        &mut self,
        desired: &[Route],
        view: &mut HostView,
        uplink: Option<&Link>,
    ) -> Option<u32> {
        let needs_ipip = desired.iter().any(|r| match &r.target {
            RouteTarget::Via(hops) => hops.iter().any(|h| match h.encap {
                Encapsulation::Ipip(EncapMode::Always) => true,
                Encapsulation::Ipip(EncapMode::CrossSubnet) => {
                    h.gateway.is_ipv4() && !uplink.is_some_and(|l| view.on_link(l.index, h.gateway))
                }
                // Refused by validation before a pass starts.
                Encapsulation::None | Encapsulation::Vxlan(_) => false,
            }),
            _ => false,
        });
        if !needs_ipip {
            self.status.ipip = IpipStatus::NotNeeded;
        } else if self.retry_ipip || !matches!(self.status.ipip, IpipStatus::Unavailable { .. }) {
            let mtu = self.config.ipip_mtu.unwrap_or_else(|| {
                uplink
                    .map(|l| l.mtu)
                    .unwrap_or(1500)
                    .saturating_sub(IPIP_OVERHEAD)
            });
            let before = self.status.ipip.clone();
            self.status.ipip =
                match host::ensure_tunl0(&mut self.sock, view, mtu, self.config.tunnel_address)
                    .await
                {
                    Ok(ifindex) => IpipStatus::Ready { ifindex, mtu },
                    Err(error) => IpipStatus::Unavailable { error },
                };
            if self.status.ipip != before {
                match &self.status.ipip {
                    IpipStatus::Unavailable { error } => {
                        tracing::error!(%error, "IPIP unavailable")
                    }
                    IpipStatus::Ready { ifindex, mtu } => {
                        tracing::info!(ifindex, mtu, "{TUNL0} ready")
                    }
                    IpipStatus::NotNeeded => {}
                }
            }
        }
        self.retry_ipip = false;
        match self.status.ipip {
            IpipStatus::Ready { ifindex, .. } => Some(ifindex),
            _ => None,
        }
    }

    /// `vxlan.starling` when some desired route needs VXLAN: Vxlan hops,
    /// and VxlanCrossSubnet hops off our subnet. Made, adopted or repaired
    /// on every pass (a check of the link list when nothing is wrong); when
    /// no route needs it any more it is removed, but not while stale routes
    /// are kept (`prune` off), as they may still use it. Returns its
    /// ifindex when it is ready.
    async fn ensure_vxlan(
        &mut self,
        desired: &[Route],
        view: &mut HostView,
        uplink: Option<&Link>,
        v6: bool,
    ) -> Option<u32> {
        let name = vxlan::device_name(v6);
        let family = if v6 { "IPv6" } else { "IPv4" };
        let needs_vxlan = desired.iter().any(|r| match &r.target {
            RouteTarget::Via(hops) => hops.iter().any(|h| {
                h.gateway.is_ipv6() == v6
                    && match h.encap {
                        Encapsulation::Vxlan(EncapMode::Always) => true,
                        Encapsulation::Vxlan(EncapMode::CrossSubnet) => {
                            !uplink.is_some_and(|l| view.on_link(l.index, h.gateway))
                        }
                        Encapsulation::None | Encapsulation::Ipip(_) => false,
                    }
            }),
            _ => false,
        });
        if !needs_vxlan {
            if self.prune
                && let Some(dev) = view.vxlan_of(v6).clone()
            {
                match vxlan::delete_device(&mut self.sock, dev.index, name).await {
                    Ok(()) => {
                        tracing::info!("{name} removed: no route needs it");
                        view.links.remove(name);
                        view.addrs.remove(&dev.index);
                        if v6 {
                            view.vxlan6 = None;
                        } else {
                            view.vxlan = None;
                        }
                    }
                    Err(error) => tracing::warn!(%error, "{name} not removed"),
                }
            }
            *self.vxlan_status_mut(v6) = VxlanStatus::NotNeeded;
            return None;
        }
        let configured = if v6 {
            self.config.vxlan_local_v6.map(IpAddr::V6)
        } else {
            self.config.vxlan_local.map(IpAddr::V4)
        };
        let made = match uplink {
            None => Err(format!(
                "VXLAN needs an uplink to send from: configure one, or give the node an IPv4 default route; {name} not made"
            )),
            Some(l) => match vxlan::local_address(configured, view, l, v6) {
                None => Err(format!(
                    "the uplink (ifindex {}) has no {family} address for {name} to send from; add one or configure the VTEP address",
                    l.index
                )),
                Some(local) => {
                    // The device's MTU leaves room for the outer headers.
                    let mtu = l
                        .mtu
                        .saturating_sub(Encapsulation::Vxlan(EncapMode::Always).overhead(v6));
                    vxlan::ensure_device(&mut self.sock, view, l, local, mtu)
                        .await
                        .map(|ifindex| (ifindex, mtu, local))
                }
            },
        };
        let before = self.vxlan_status_mut(v6).clone();
        let now = match made {
            Ok((ifindex, mtu, local)) => VxlanStatus::Ready {
                ifindex,
                mtu,
                local,
                mac: vxlan::mac_text(&vxlan::vtep_mac_of(local)),
                peers: match before {
                    VxlanStatus::Ready { peers, .. } => peers,
                    _ => 0,
                },
            },
            Err(error) => VxlanStatus::Unavailable { error },
        };
        *self.vxlan_status_mut(v6) = now.clone();
        let changed = match (&before, &now) {
            (VxlanStatus::Ready { ifindex: a, .. }, VxlanStatus::Ready { ifindex: b, .. }) => {
                a != b
            }
            (a, b) => a != b,
        };
        if changed {
            match &now {
                VxlanStatus::Unavailable { error } => {
                    tracing::error!(%error, "VXLAN ({family}) unavailable")
                }
                VxlanStatus::Ready {
                    ifindex,
                    mtu,
                    local,
                    mac,
                    ..
                } => tracing::info!(ifindex, mtu, %local, %mac, "{name} ready"),
                VxlanStatus::NotNeeded => {}
            }
        }
        match now {
            VxlanStatus::Ready { ifindex, .. } => Some(ifindex),
            _ => None,
        }
    }

    /// The status of the VXLAN device of one underlay family.
    fn vxlan_status_mut(&mut self, v6: bool) -> &mut VxlanStatus {
        if v6 {
            &mut self.status.vxlan6
        } else {
            &mut self.status.vxlan
        }
    }

    /// Resolve the desired set against the host, unless the last resolution
    /// still holds (same set, links, addresses, uplink and tunnel); returns
    /// the resolution it replaced.
    fn resolve(
        &mut self,
        desired: &Arc<Vec<Route>>,
        view: HostView,
        uplink: Option<String>,
        tunl0: Option<u32>,
        (vxlan_dev, vxlan6_dev): (Option<u32>, Option<u32>),
    ) -> Prior {
        let fresh = self.resolved.as_ref().is_some_and(|r| {
            Arc::ptr_eq(&r.routes, desired)
                && r.view == view
                && r.uplink == uplink
                && r.ipip == self.status.ipip
                && r.vxlan == vxlan_dev
                && r.vxlan6 == vxlan6_dev
        });
        if fresh {
            return Prior::Same;
        }
        let tunnels = Tunnels {
            tunl0,
            ipip: &self.status.ipip,
            vxlan: vxlan_dev,
            vxlan_status: &self.status.vxlan,
            vxlan6: vxlan6_dev,
            vxlan6_status: &self.status.vxlan6,
        };
        let (want, problems) = resolve(desired, &view, uplink.as_deref(), &tunnels);
        let peers = vxlan_dev.map_or_else(BTreeSet::new, |dev| vteps(&want, dev));
        // The IPv6 routes carry the VTEPs' link-local addresses: the peers
        // are the node addresses behind them.
        let peers6 = vxlan6_dev.map_or_else(BTreeSet::new, |dev| {
            let link_locals = vteps(&want, dev);
            desired
                .iter()
                .filter_map(|r| match &r.target {
                    RouteTarget::Via(hops) => Some(hops),
                    _ => None,
                })
                .flatten()
                .map(|h| h.gateway)
                .filter(|g| g.is_ipv6() && link_locals.contains(&vxlan::neighbour_address(*g)))
                .collect()
        });
        report_new_problems(&self.status.unreachable, &problems);
        self.status.unreachable = problems;
        let before = self.resolved.replace(Resolved {
            routes: desired.clone(),
            view,
            uplink,
            ipip: self.status.ipip.clone(),
            vxlan: vxlan_dev,
            vxlan6: vxlan6_dev,
            want,
            peers,
            peers6,
        });
        match before {
            Some(r) => Prior::Was(Box::new(r)),
            None => Prior::Nothing,
        }
    }

    /// Count what the kernel took, and record what it refused: a route of
    /// another protocol in the way (a conflict, left alone) or an error.
    fn record_outcome(&mut self, ops: &[(Op, IpNet)], nacks: &[Nack], report: &mut SyncReport) {
        let mut conflicts = Vec::new();
        let mut errors = Vec::new();
        let mut failed_ops: HashSet<usize> = HashSet::new();
        self.failed.clear();
        for n in nacks {
            let Some(&(op, dst)) = ops.get(n.index) else {
                continue;
            };
            match (op, n.errno) {
                (Op::Remove, libc::ESRCH) => {}
                (Op::Add, libc::EEXIST) => {
                    conflicts.push(dst);
                    self.failed.insert(dst);
                    failed_ops.insert(n.index);
                }
                _ => {
                    errors.push(format!("{op:?} {dst}: {}", errno_text(n.errno)));
                    self.failed.insert(dst);
                    failed_ops.insert(n.index);
                }
            }
        }
        for (i, (op, _)) in ops.iter().enumerate() {
            if failed_ops.contains(&i) {
                continue;
            }
            match op {
                Op::Add => report.added += 1,
                Op::Replace => report.replaced += 1,
                Op::Remove => report.removed += 1,
            }
        }
        report.failed = failed_ops.len();
        conflicts.sort();
        if conflicts != self.status.conflicts && !conflicts.is_empty() {
            tracing::warn!(
                ?conflicts,
                "routes of another protocol hold desired prefixes; left alone"
            );
        }
        for e in &errors {
            tracing::warn!(error = %e, "kernel refused a route");
        }
        self.status.conflicts = conflicts;
        self.status.errors = errors;
    }

    fn set_sysctls(&mut self, desired: &[Route], view: &HostView, ipip: bool, vxlan: bool) {
        let mut reports = vec![host::ensure_sysctl(&["net", "ipv4", "ip_forward"], "1")];
        if desired.iter().any(|r| r.dst.addr().is_ipv6()) {
            reports.push(host::ensure_sysctl(
                &["net", "ipv6", "conf", "all", "forwarding"],
                "1",
            ));
        }
        let mut devs: Vec<&str> = desired
            .iter()
            .filter(|r| r.dst.addr().is_ipv4())
            .filter_map(|r| {
                if let RouteTarget::Device(d) = &r.target {
                    Some(d.as_str())
                } else {
                    None
                }
            })
            .filter(|d| view.link(d).is_some())
            .collect();
        devs.sort_unstable();
        devs.dedup();
        let mut proxy_arp = HashMap::with_capacity(devs.len());
        for d in devs {
            // The pod's default route points at a made-up gateway; the host
            // side answers ARP for it. A device already seen set (the same
            // one: same index) is read again only on the periodic resync.
            let path = ["net", "ipv4", "conf", d, "proxy_arp"];
            let index = view.link(d).map(|l| l.index);
            let report = if index.is_some() && self.proxy_arp_set.get(d) == index.as_ref() {
                host::SysctlReport {
                    key: host::sysctl_key(&path),
                    value: "1".into(),
                    changed: false,
                    error: None,
                }
            } else {
                host::ensure_sysctl(&path, "1")
            };
            if report.error.is_none()
                && let Some(i) = index
            {
                proxy_arp.insert(d.to_string(), i);
            }
            reports.push(report);
        }
        self.proxy_arp_set = proxy_arp;
        if ipip {
            // Decapsulated packets may come back on another path than our
            // route to their source (CrossSubnet); strict rp_filter would drop them.
            reports.push(host::ensure_sysctl(
                &["net", "ipv4", "conf", TUNL0, "rp_filter"],
                "2",
            ));
        }
        if vxlan {
            // The same for the VXLAN device under CrossSubnet.
            reports.push(host::ensure_sysctl(
                &["net", "ipv4", "conf", VXLAN_DEVICE, "rp_filter"],
                "2",
            ));
        }
        for r in &reports {
            if r.changed {
                tracing::info!(key = %r.key, value = %r.value, "sysctl set");
            }
            if let Some(e) = &r.error {
                tracing::warn!(key = %r.key, error = %e, "sysctl not set");
            }
        }
        self.status.sysctls = reports;
    }

    /// Whether a netlink event may mean the kernel no longer matches what we installed.
    fn event_matters(&self, ev: &Event) -> bool {
        let m = match ev {
            Event::Overrun => return true,
            Event::Message(m) => m,
        };
        match m {
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                if route::table_of(r) != self.stamp.table {
                    return false;
                }
                let Some(dst) = route::dst_of(r) else {
                    return false;
                };
                let ours = route::protocol_number(r.header.protocol) == self.stamp.protocol;
                let new = matches!(m, RouteNetlinkMessage::NewRoute(_));
                match (ours, new) {
                    // Our own writes echoed back match what we installed.
                    (true, true) => {
                        let found = route::parse_found(r).map(|(_, f)| f.route);
                        found.as_ref() != self.installed(&dst)
                    }
                    (true, false) => self.installed(&dst).is_some(),
                    // Someone else's route at one of our prefixes may have
                    // replaced ours, or freed the place for it.
                    (false, _) => {
                        self.installed(&dst).is_some() || self.status.conflicts.contains(&dst)
                    }
                }
            }
            RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
                let Some(e) = vxlan::Entry::from_message(n) else {
                    return false;
                };
                let on = |st: &VxlanStatus| matches!(st, VxlanStatus::Ready { ifindex, .. } if *ifindex == e.ifindex);
                let v6 = if on(&self.status.vxlan) {
                    false
                } else if on(&self.status.vxlan6) {
                    true
                } else {
                    return false;
                };
                let Some(peers) = self
                    .resolved
                    .as_ref()
                    .map(|r| if v6 { &r.peers6 } else { &r.peers })
                else {
                    return true;
                };
                if matches!(m, RouteNetlinkMessage::NewNeighbour(_)) {
                    // Our own writes echo back as ours; anything else on a
                    // peer's address, or any entry we would remove, is drift.
                    !e.is_ours_for(peers) && (e.bridge || e.permanent || e.peer(peers).is_some())
                } else {
                    // One of ours gone (our own removals are not ours).
                    e.is_ours_for(peers)
                }
            }
            RouteNetlinkMessage::NewLink(_)
            | RouteNetlinkMessage::DelLink(_)
            | RouteNetlinkMessage::NewAddress(_)
            | RouteNetlinkMessage::DelAddress(_) => true,
            _ => false,
        }
    }

    /// Whether a link or address event that matters may also have taken
    /// routes of ours out of the kernel, so the next pass must dump them
    /// (the kernel flushes a device's IPv4 routes when it goes down or
    /// goes away, without a route notification). A new device, a device
    /// coming up and a new address remove nothing: the next pass reads the
    /// links again and writes the difference without a dump. Anything
    /// else (a device going down, renamed or deleted, an address removed,
    /// an overrun) counts as drift.
    fn event_removes_routes(&self, ev: &Event) -> bool {
        let Event::Message(m) = ev else { return true };
        match m {
            RouteNetlinkMessage::NewLink(l) => {
                let Some(view) = self.resolved.as_ref().map(|r| &r.view) else {
                    return true;
                };
                let name = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n),
                    _ => None,
                });
                let before = view.links.iter().find(|(_, k)| k.index == l.header.index);
                match before {
                    None => false,
                    Some((was, k)) => {
                        name.is_some_and(|n| n != was)
                            || (k.up && !l.header.flags.contains(LinkFlags::Up))
                    }
                }
            }
            RouteNetlinkMessage::NewAddress(_) => false,
            _ => true,
        }
    }
}

/// Whether the uplink `uplink` changed between two views of the host (its
/// link or its addresses): only then may the default route have moved
/// with it. Other links coming and going (a pod's veth) do not count.
fn uplink_changed(old: &HostView, new: &HostView, uplink: Option<&str>) -> bool {
    let Some(u) = uplink else { return true };
    let (a, b) = (old.link(u), new.link(u));
    a != b || a.is_none_or(|l| old.addrs.get(&l.index) != new.addrs.get(&l.index))
}

fn report_new_problems(before: &[RouteProblem], now: &[RouteProblem]) {
    for p in now {
        if !before.contains(p) {
            match p.gateway {
                Some(gw) => {
                    tracing::warn!(dst = %p.dst, gateway = %gw, reason = %p.reason, "next hop left out")
                }
                None => tracing::warn!(dst = %p.dst, reason = %p.reason, "route not installed"),
            }
        }
    }
}

/// The tunnel devices a pass may route through, and why one is missing.
struct Tunnels<'a> {
    tunl0: Option<u32>,
    ipip: &'a IpipStatus,
    vxlan: Option<u32>,
    vxlan_status: &'a VxlanStatus,
    vxlan6: Option<u32>,
    vxlan6_status: &'a VxlanStatus,
}

/// The remote VTEPs: every next hop of `want` on the VXLAN device `dev`.
fn vteps(want: &HashMap<IpNet, (u32, KernelRoute)>, dev: u32) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    let mut add = |h: &KernelHop| {
        if h.oif == dev {
            out.insert(h.gateway);
        }
    };
    for (_, kr) in want.values() {
        match kr {
            KernelRoute::Via(h) => add(h),
            KernelRoute::Ecmp(hops) => hops.iter().for_each(&mut add),
            _ => {}
        }
    }
    out
}

/// (device, is it VXLAN) of the tunnel next hop `h` needs, or `None` for a
/// plain route; `plain`: the hop is on-link on the uplink (CrossSubnet
/// encapsulates only when it is not).
fn tunnel_for(h: &NextHop, plain: bool, tunnels: &Tunnels) -> Option<(Option<u32>, bool)> {
    match (h.encap, plain) {
        (Encapsulation::Ipip(EncapMode::Always), _) => Some((tunnels.tunl0, false)),
        (Encapsulation::Ipip(EncapMode::CrossSubnet), false) if h.gateway.is_ipv4() => {
            Some((tunnels.tunl0, false))
        }
        (Encapsulation::Vxlan(EncapMode::Always), _)
        | (Encapsulation::Vxlan(EncapMode::CrossSubnet), false) => {
            if h.gateway.is_ipv6() {
                Some((tunnels.vxlan6, true))
            } else {
                Some((tunnels.vxlan, true))
            }
        }
        _ => None,
    }
}

/// Turn desired routes into kernel routes given the links and addresses of
/// this node; anything that cannot be installed correctly is reported instead.
fn resolve(
    desired: &[Route],
    view: &HostView,
    uplink: Option<&str>,
    tunnels: &Tunnels,
) -> (HashMap<IpNet, (u32, KernelRoute)>, Vec<RouteProblem>) {
    let mut want = HashMap::with_capacity(desired.len());
    let mut problems = Vec::new();
    let uplink_link = uplink.and_then(|u| view.link(u));
    let ipip_missing = || match tunnels.ipip {
        IpipStatus::Unavailable { error } => error.clone(),
        _ => format!("{TUNL0} is not ready"),
    };
    let vxlan_missing = |v6: bool| match if v6 {
        tunnels.vxlan6_status
    } else {
        tunnels.vxlan_status
    } {
        VxlanStatus::Unavailable { error } => error.clone(),
        _ => format!("{} is not ready", vxlan::device_name(v6)),
    };
    for r in desired {
        let kr = match &r.target {
            RouteTarget::Blackhole => KernelRoute::Blackhole,
            RouteTarget::Device(name) => match view.link(name) {
                Some(l) => KernelRoute::Device { oif: l.index },
                None => {
                    problems.push(RouteProblem {
                        dst: r.dst,
                        gateway: None,
                        reason: format!("device {name} does not exist"),
                    });
                    continue;
                }
            },
            RouteTarget::Via(hops) => {
                let mut hop = |h: &NextHop| -> Option<KernelHop> {
                    let plain = uplink_link.filter(|l| view.on_link(l.index, h.gateway));
                    let tunnel = tunnel_for(h, plain.is_some(), tunnels);
                    let reason = if let Some((dev, is_vxlan)) = tunnel {
                        match dev {
                            // Both tunnels take `via <node> dev <tunnel> onlink`:
                            // for VXLAN the neighbour entry of <node> gives the
                            // inner MAC and the FDB the outer destination.
                            // IPv6 VXLAN goes via the VTEP's link-local
                            // address (see `vxlan::vtep_link_local`).
                            Some(oif) if is_vxlan && h.gateway.is_ipv6() => {
                                return Some(KernelHop {
                                    gateway: vxlan::neighbour_address(h.gateway),
                                    oif,
                                    onlink: false,
                                });
                            }
                            Some(oif) => {
                                return Some(KernelHop {
                                    gateway: h.gateway,
                                    oif,
                                    onlink: true,
                                });
                            }
                            None if is_vxlan => vxlan_missing(h.gateway.is_ipv6()),
                            None => ipip_missing(),
                        }
                    } else if let Some(l) = plain {
                        return Some(KernelHop {
                            gateway: h.gateway,
                            oif: l.index,
                            onlink: false,
                        });
                    } else if uplink_link.is_none() {
                        match uplink {
                            Some(u) => format!("uplink {u} does not exist"),
                            None => {
                                "no uplink configured and no IPv4 default route to find one".into()
                            }
                        }
                    } else {
                        format!(
                            "next hop is not on-link: no address of uplink {} covers it \
                             (host-gw needs the nodes in one L2 subnet; use an encapsulation)",
                            uplink.unwrap_or_default()
                        )
                    };
                    problems.push(RouteProblem {
                        dst: r.dst,
                        gateway: Some(h.gateway),
                        reason,
                    });
                    None
                };
                // One path is the common case: no allocation for it.
                let kr = match hops.as_slice() {
                    [one] => hop(one).map(KernelRoute::Via),
                    many => KernelRoute::via(many.iter().filter_map(&mut hop).collect()),
                };
                match kr {
                    Some(kr) => kr,
                    None => continue,
                }
            }
        };
        let position = want.len() as u32;
        want.insert(r.dst, (position, kr));
    }
    (want, problems)
}

/// A desired set as the task receives it.
#[derive(Clone, Debug, Default)]
struct Desired {
    routes: Arc<Vec<Route>>,
    prune: bool,
    generation: u64,
}

/// The agent's handle on a running [`FibTask`].
#[derive(Clone)]
pub struct Reconciler {
    desired: Arc<watch::Sender<Desired>>,
    status: watch::Receiver<FibStatus>,
}

/// The long-running reconciler; spawn [`FibTask::run`] on a current-thread runtime.
pub struct FibTask {
    config: FibConfig,
    desired: watch::Receiver<Desired>,
    status: watch::Sender<FibStatus>,
}

impl Reconciler {
    pub fn new(config: FibConfig) -> (Reconciler, FibTask) {
        let (dtx, drx) = watch::channel(Desired::default());
        let (stx, srx) = watch::channel(FibStatus::default());
        (
            Reconciler {
                desired: Arc::new(dtx),
                status: srx,
            },
            FibTask {
                config,
                desired: drx,
                status: stx,
            },
        )
    }

    /// Replace the desired set; stale routes of ours are removed. The task
    /// does nothing before the first call, so a restarted agent adopts what
    /// the kernel has instead of flushing it. Returns the set's generation.
    pub fn set_desired(&self, routes: Vec<Route>) -> Result<u64, FibError> {
        self.send(routes, true)
    }

    /// Like [`Reconciler::set_desired`], but routes of ours that are not in
    /// the set are kept (while a restarted agent waits for End-of-RIB).
    pub fn set_desired_keep_stale(&self, routes: Vec<Route>) -> Result<u64, FibError> {
        self.send(routes, false)
    }

    fn send(&self, routes: Vec<Route>, prune: bool) -> Result<u64, FibError> {
        route::validate(&routes)?;
        let mut generation = 0;
        self.desired.send_modify(|d| {
            d.generation += 1;
            generation = d.generation;
            d.routes = Arc::new(routes);
            d.prune = prune;
        });
        Ok(generation)
    }

    pub fn status(&self) -> FibStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every new status.
    pub fn watch_status(&self) -> watch::Receiver<FibStatus> {
        self.status.clone()
    }
}

impl FibTask {
    /// Reconcile until every [`Reconciler`] handle is dropped.
    pub async fn run(mut self) -> Result<(), FibError> {
        // Subscribe before the first dump so no change between them is missed.
        let mut events = EventSocket::open().map_err(|source| FibError::Netlink {
            op: "subscribe",
            source,
        })?;
        let resync = self.config.resync_interval;
        let debounce = self.config.debounce;
        let mut fib = Fib::open(self.config)?;
        // Our own writes are not drift: without this, a bulk install
        // queues a notification per route here and overflows the socket.
        if let Err(e) = events.ignore_routes_from(fib.sock.port()) {
            tracing::warn!(error = %e, "cannot filter our own route notifications; they are read and matched instead");
        }
        // Nothing until the agent says what it wants.
        while self.desired.borrow().generation == 0 {
            if self.desired.changed().await.is_err() {
                return Ok(());
            }
        }
        let mut next_resync = tokio::time::Instant::now() + resync;
        loop {
            let d = self.desired.borrow_and_update().clone();
            fib.set_desired_valid(d.routes.clone(), d.prune);
            match fib.sync_changes().await {
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "FIB sync failed; retrying on the next event or resync");
                    fib.status.errors = vec![e.to_string()];
                }
            }
            fib.status.generation = d.generation;
            self.status.send_replace(fib.status.clone());

            // Wait for a reason to sync again.
            loop {
                let mut dirty = false;
                let mut drift = false;
                tokio::select! {
                    r = self.desired.changed() => {
                        if r.is_err() {
                            return Ok(());
                        }
                        break;
                    }
                    _ = tokio::time::sleep_until(next_resync) => {
                        next_resync = tokio::time::Instant::now() + resync;
                        fib.retry_ipip = true;
                        fib.proxy_arp_set.clear();
                        fib.distrust();
                        break;
                    }
                    r = events.next(|e| {
                        if fib.event_matters(&e) {
                            dirty = true;
                            drift |= fib.event_removes_routes(&e);
                        }
                    }) => {
                        r.map_err(|source| FibError::Netlink { op: "read events", source })?;
                    }
                }
                if dirty {
                    // Let a burst (a link going down takes many routes with
                    // it) settle, then act once.
                    tokio::time::sleep(debounce).await;
                    events
                        .drain(|e| drift |= fib.event_matters(&e) && fib.event_removes_routes(&e))
                        .map_err(|source| FibError::Netlink {
                            op: "read events",
                            source,
                        })?;
                    if drift {
                        fib.distrust();
                    }
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fib::host::Link;
    use std::net::IpAddr;

    fn view() -> HostView {
        let mut v = HostView::default();
        v.links.insert(
            "up0".into(),
            Link {
                index: 2,
                mtu: 1500,
                up: true,
            },
        );
        v.links.insert(
            "veth1".into(),
            Link {
                index: 5,
                mtu: 1500,
                up: true,
            },
        );
        v.addrs.insert(
            2,
            vec![
                "192.0.2.1/24".parse().unwrap(),
                "2001:db8:1::1/64".parse().unwrap(),
            ],
        );
        v
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ipip_only(tunl0: Option<u32>, ipip: &IpipStatus) -> Tunnels<'_> {
        Tunnels {
            tunl0,
            ipip,
            vxlan: None,
            vxlan_status: &VxlanStatus::NotNeeded,
            vxlan6: None,
            vxlan6_status: &VxlanStatus::NotNeeded,
        }
    }

    #[test]
    fn only_the_uplinks_own_changes_send_for_the_default_route_again() {
        let old = view();
        let mut new = view();
        new.links.insert(
            "veth9".into(),
            Link {
                index: 9,
                mtu: 1500,
                up: true,
            },
        );
        new.addrs.insert(9, vec!["fe80::1/64".parse().unwrap()]);
        assert!(!uplink_changed(&old, &new, Some("up0")));
        assert!(uplink_changed(&old, &new, None));
        new.addrs.insert(2, vec!["192.0.2.9/24".parse().unwrap()]);
        assert!(uplink_changed(&old, &new, Some("up0")));
        let mut down = view();
        down.links.get_mut("up0").unwrap().up = false;
        assert!(uplink_changed(&old, &down, Some("up0")));
        let mut gone = view();
        gone.links.remove("up0");
        assert!(uplink_changed(&old, &gone, Some("up0")));
    }

    #[test]
    fn ipv6_vxlan_hops_go_through_the_ipv6_device() {
        let desired = vec![
            Route::via(
                net("fd00:10:244::/122"),
                "2001:db8:1::2".parse().unwrap(),
                Encapsulation::Vxlan(EncapMode::CrossSubnet),
            ),
            Route::via(
                net("fd00:10:244::40/122"),
                "2001:db8:2::2".parse().unwrap(),
                Encapsulation::Vxlan(EncapMode::CrossSubnet),
            ),
            Route::via(
                net("10.4.0.0/26"),
                "198.51.100.3".parse().unwrap(),
                Encapsulation::Vxlan(EncapMode::Always),
            ),
        ];
        let ready = |ifindex: u32, local: &str| VxlanStatus::Ready {
            ifindex,
            mtu: 1430,
            local: local.parse().unwrap(),
            mac: String::new(),
            peers: 0,
        };
        let (v4, v6) = (ready(11, "192.0.2.1"), ready(12, "2001:db8:1::1"));
        let t = Tunnels {
            tunl0: None,
            ipip: &IpipStatus::NotNeeded,
            vxlan: Some(11),
            vxlan_status: &v4,
            vxlan6: Some(12),
            vxlan6_status: &v6,
        };
        let (want, problems) = resolve(&desired, &view(), Some("up0"), &t);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            want[&net("fd00:10:244::/122")].1,
            KernelRoute::Via(KernelHop {
                gateway: "2001:db8:1::2".parse().unwrap(),
                oif: 2,
                onlink: false
            })
        );
        let ll = vxlan::neighbour_address("2001:db8:2::2".parse().unwrap());
        assert_eq!(
            want[&net("fd00:10:244::40/122")].1,
            KernelRoute::Via(KernelHop {
                gateway: ll,
                oif: 12,
                onlink: false
            })
        );
        assert_eq!(vteps(&want, 12), BTreeSet::from([ll]));
        let peers4: Vec<String> = vteps(&want, 11).iter().map(|a| a.to_string()).collect();
        assert_eq!(peers4, ["198.51.100.3"]);
        // No IPv6 device: its hops are reported naming it, the IPv4 ones stay.
        let t = Tunnels {
            vxlan6: None,
            vxlan6_status: &VxlanStatus::NotNeeded,
            ..t
        };
        let (want, problems) = resolve(&desired, &view(), Some("up0"), &t);
        assert!(want.contains_key(&net("10.4.0.0/26")));
        assert!(!want.contains_key(&net("fd00:10:244::40/122")));
        assert!(
            problems
                .iter()
                .any(|p| p.reason.contains("vxlan6.starling is not ready")),
            "{problems:?}"
        );
    }

    #[test]
    fn vxlan_hops_go_onlink_through_the_device_and_name_their_vteps() {
        let desired = vec![
            Route::via(
                net("10.2.0.0/26"),
                "192.0.2.2".parse().unwrap(),
                Encapsulation::Vxlan(EncapMode::CrossSubnet),
            ),
            Route::via(
                net("10.3.0.0/26"),
                "198.51.100.2".parse().unwrap(),
                Encapsulation::Vxlan(EncapMode::CrossSubnet),
            ),
            Route::ecmp(
                net("10.4.0.0/26"),
                vec![
                    hop("192.0.2.3", Encapsulation::Vxlan(EncapMode::Always)),
                    hop("198.51.100.3", Encapsulation::Vxlan(EncapMode::Always)),
                ],
            ),
        ];
        let ready = VxlanStatus::Ready {
            ifindex: 11,
            mtu: 1450,
            local: "192.0.2.1".parse().unwrap(),
            mac: String::new(),
            peers: 0,
        };
        let t = Tunnels {
            tunl0: None,
            ipip: &IpipStatus::NotNeeded,
            vxlan: Some(11),
            vxlan_status: &ready,
            vxlan6: None,
            vxlan6_status: &VxlanStatus::NotNeeded,
        };
        let (want, problems) = resolve(&desired, &view(), Some("up0"), &t);
        assert!(problems.is_empty(), "{problems:?}");
        // CrossSubnet: plain on our subnet, VXLAN across.
        assert_eq!(
            want[&net("10.2.0.0/26")].1,
            KernelRoute::Via(KernelHop {
                gateway: "192.0.2.2".parse().unwrap(),
                oif: 2,
                onlink: false
            })
        );
        assert_eq!(
            want[&net("10.3.0.0/26")].1,
            KernelRoute::Via(KernelHop {
                gateway: "198.51.100.2".parse().unwrap(),
                oif: 11,
                onlink: true
            })
        );
        let peers: Vec<String> = vteps(&want, 11).iter().map(|a| a.to_string()).collect();
        assert_eq!(peers, ["192.0.2.3", "198.51.100.2", "198.51.100.3"]);

        // Without the device the hops are reported with its error, never installed plain.
        let down = VxlanStatus::Unavailable {
            error: "creating vxlan.starling: no".into(),
        };
        let t = Tunnels {
            vxlan: None,
            vxlan_status: &down,
            ..t
        };
        let (want, problems) = resolve(&desired, &view(), Some("up0"), &t);
        assert!(!want.contains_key(&net("10.3.0.0/26")));
        assert!(!want.contains_key(&net("10.4.0.0/26")));
        assert!(
            problems.iter().any(
                |p| p.dst == net("10.3.0.0/26") && p.reason.contains("creating vxlan.starling")
            )
        );
    }

    fn hop(gw: &str, encap: Encapsulation) -> NextHop {
        NextHop {
            gateway: gw.parse().unwrap(),
            encap,
        }
    }

    #[test]
    fn cross_subnet_is_plain_on_our_subnet_and_ipip_elsewhere() {
        let desired = vec![
            Route::via(
                net("10.2.0.0/26"),
                "192.0.2.2".parse().unwrap(),
                Encapsulation::Ipip(EncapMode::CrossSubnet),
            ),
            Route::via(
                net("10.3.0.0/26"),
                "198.51.100.2".parse().unwrap(),
                Encapsulation::Ipip(EncapMode::CrossSubnet),
            ),
        ];
        let ready = IpipStatus::Ready {
            ifindex: 9,
            mtu: 1480,
        };
        let (want, problems) = resolve(&desired, &view(), Some("up0"), &ipip_only(Some(9), &ready));
        assert!(problems.is_empty());
        assert_eq!(
            want[&net("10.2.0.0/26")].1,
            KernelRoute::Via(KernelHop {
                gateway: "192.0.2.2".parse().unwrap(),
                oif: 2,
                onlink: false
            })
        );
        assert_eq!(
            want[&net("10.3.0.0/26")].1,
            KernelRoute::Via(KernelHop {
                gateway: "198.51.100.2".parse().unwrap(),
                oif: 9,
                onlink: true
            })
        );
    }

    #[test]
    fn unusable_hops_are_reported_and_never_installed_broken() {
        let missing = IpipStatus::Unavailable {
            error: "needs the kernel module `ipip`".into(),
        };
        let desired = vec![
            Route::via(
                net("10.4.0.0/26"),
                "198.51.100.2".parse().unwrap(),
                Encapsulation::None,
            ),
            Route::via(
                net("10.5.0.0/26"),
                "198.51.100.3".parse().unwrap(),
                Encapsulation::Ipip(EncapMode::Always),
            ),
            Route::ecmp(
                net("10.6.0.0/26"),
                vec![
                    hop("192.0.2.3", Encapsulation::None),
                    hop("198.51.100.4", Encapsulation::None),
                ],
            ),
            Route::device(net("10.1.0.7/32"), "veth-gone"),
            Route::device(net("10.1.0.8/32"), "veth1"),
            Route::blackhole(net("2001:db8:9::/64")),
        ];
        let (want, problems) = resolve(&desired, &view(), Some("up0"), &ipip_only(None, &missing));
        assert!(!want.contains_key(&net("10.4.0.0/26")));
        assert!(!want.contains_key(&net("10.5.0.0/26")));
        assert!(!want.contains_key(&net("10.1.0.7/32")));
        assert_eq!(
            want[&net("10.6.0.0/26")].1,
            KernelRoute::Via(KernelHop {
                gateway: "192.0.2.3".parse().unwrap(),
                oif: 2,
                onlink: false
            })
        );
        assert_eq!(want[&net("10.1.0.8/32")].1, KernelRoute::Device { oif: 5 });
        assert_eq!(want[&net("2001:db8:9::/64")].1, KernelRoute::Blackhole);
        let reasons: Vec<_> = problems
            .iter()
            .map(|p| (p.dst.to_string(), p.reason.clone()))
            .collect();
        assert_eq!(problems.len(), 4, "{reasons:?}");
        assert!(
            reasons
                .iter()
                .any(|(d, r)| d == "10.5.0.0/26" && r.contains("`ipip`"))
        );
        assert!(
            reasons
                .iter()
                .any(|(d, r)| d == "10.4.0.0/26" && r.contains("not on-link"))
        );
    }

    /// Without a dump, a pass writes exactly the difference from the set
    /// last written: changed routes replaced, new ones added, gone ones
    /// removed (or kept while not pruning), refused ones tried again.
    #[test]
    fn a_pass_without_a_dump_writes_the_difference_from_the_last_set() {
        let via = |gw: &str| {
            KernelRoute::Via(KernelHop {
                gateway: gw.parse().unwrap(),
                oif: 2,
                onlink: false,
            })
        };
        let set = |routes: &[(&str, KernelRoute)]| {
            routes
                .iter()
                .enumerate()
                .map(|(i, (d, kr))| (net(d), (i as u32, kr.clone())))
                .collect::<HashMap<_, _>>()
        };
        let old = set(&[
            ("10.1.0.0/24", via("192.0.2.2")),
            ("10.2.0.0/24", via("192.0.2.2")),
            ("10.3.0.0/24", via("192.0.2.2")),
            ("10.5.0.0/24", via("192.0.2.2")),
        ]);
        let new = set(&[
            ("10.1.0.0/24", via("192.0.2.2")),
            ("10.2.0.0/24", via("192.0.2.3")),
            ("10.4.0.0/24", via("192.0.2.2")),
            ("10.5.0.0/24", via("192.0.2.2")),
        ]);
        let stamp = Stamp {
            table: 254,
            protocol: 73,
        };
        let failed = HashSet::from_iter([net("10.5.0.0/24")]);
        let ops = |prune| {
            let d = diff_changes(&old, &new, &failed, &HashMap::new(), prune, stamp);
            assert_eq!(d.msgs.len(), d.ops.len());
            let mut ops: Vec<(Op, String)> =
                d.ops.iter().map(|(o, n)| (*o, n.to_string())).collect();
            ops.sort_by(|a, b| a.1.cmp(&b.1));
            (
                d.adopted,
                ops,
                d.kept.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
            )
        };
        let s = |x: &str| x.to_string();
        assert_eq!(
            ops(true),
            (
                1,
                vec![
                    (Op::Replace, s("10.2.0.0/24")),
                    (Op::Remove, s("10.3.0.0/24")),
                    (Op::Add, s("10.4.0.0/24")),
                    // Refused last time: tried again.
                    (Op::Add, s("10.5.0.0/24")),
                ],
                vec![]
            )
        );
        let (_, not_pruned, kept) = ops(false);
        assert!(!not_pruned.iter().any(|(o, _)| *o == Op::Remove));
        assert_eq!(kept, [s("10.3.0.0/24")]);
        // A kept route that is desired again and unchanged is left as it is.
        let kept = HashMap::from_iter([(net("10.4.0.0/24"), via("192.0.2.2"))]);
        let d = diff_changes(&old, &new, &HashSet::new(), &kept, true, stamp);
        assert!(!d.ops.iter().any(|(_, n)| *n == net("10.4.0.0/24")));
        assert_eq!(d.adopted, 3);
    }

    #[test]
    fn ecmp_hops_are_sorted_so_kernel_order_does_not_matter() {
        let desired = vec![Route::ecmp(
            net("10.7.0.0/26"),
            vec![
                hop("192.0.2.9", Encapsulation::None),
                hop("192.0.2.3", Encapsulation::None),
            ],
        )];
        let (want, _) = resolve(
            &desired,
            &view(),
            Some("up0"),
            &ipip_only(None, &IpipStatus::NotNeeded),
        );
        let KernelRoute::Ecmp(h) = &want[&net("10.7.0.0/26")].1 else {
            panic!()
        };
        assert_eq!(h[0].gateway, "192.0.2.3".parse::<IpAddr>().unwrap());
    }
}
