//! The kernel FIB reconciler: it turns a desired set of routes into the
//! kernel's routing table and keeps them there.
//!
//! It knows nothing of BGP or IPAM; the agent hands it [`Route`]s (blackholes
//! for local blocks, pod addresses on their devices, other nodes' blocks via
//! their node address with an [`Encapsulation`](crate::encap::Encapsulation),
//! ECMP sets) and it converges
//! one table to them. It owns exactly the routes of that table that carry
//! its [`RouteProtocol`] and never touches any other route, not even an
//! identical one of another protocol.
//!
//! - [`Fib`] is one synchronous pass: read links, dump our routes, diff,
//!   write the difference in batches. Benchmarks and tests drive it directly.
//! - [`Reconciler`] + [`FibTask`] are the long-running form: the task adopts
//!   what is already right at start-up, repairs drift reported by netlink
//!   events within a second, and resyncs fully every `resync_interval`.
//!
//! Run the task on a current-thread tokio runtime: the netlink sockets are
//! waited on from one thread, which keeps each batch a single wakeup.
//!
//! See docs/fib.md for the operator's view.

mod host;
mod netlink;
mod reconcile;
mod route;
mod vxlan;
mod vxlan_link;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use host::{IpipStatus, SysctlReport, TUNL0};
pub use reconcile::{Fib, FibTask, Reconciler, SyncReport};
pub use route::{NextHop, Route, RouteTarget};
pub use vxlan::{
    VXLAN_DEVICE, VXLAN_DEVICE_V6, VXLAN_PORT, VXLAN_VNI, VxlanStatus, neighbour_address,
    vtep_link_local, vtep_mac, vtep_mac_of, vtep_mac_v6,
};

/// The `rtm_protocol` value that marks a route as ours.
///
/// The default, 73, is unassigned in iproute2's `rt_protos` and collides with
/// none of Calico/Felix (80), BIRD (12), kube-router (17), zebra/FRR (11,
/// 186-196), babel (42), openr (99) or keepalived (18).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RouteProtocol(pub u8);

impl RouteProtocol {
    pub const STARLING: RouteProtocol = RouteProtocol(73);
}

impl Default for RouteProtocol {
    fn default() -> Self {
        RouteProtocol::STARLING
    }
}

/// The main routing table (`RT_TABLE_MAIN`).
pub const MAIN_TABLE: u32 = 254;

/// How the reconciler runs on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FibConfig {
    /// Kernel table to converge; main (254) unless configured.
    pub table: u32,
    /// Routes carrying this protocol in `table` are ours, and only those.
    pub protocol: RouteProtocol,
    /// Full resync period (Calico's is 90 s too); events repair drift in between.
    pub resync_interval: Duration,
    /// The device towards other nodes. None: the device of the IPv4 default route.
    pub uplink: Option<String>,
    /// MTU of `tunl0`; None: the uplink's MTU minus 20.
    pub ipip_mtu: Option<u32>,
    /// An address for `tunl0` (Calico gives it one from the pool), as a /32.
    pub tunnel_address: Option<Ipv4Addr>,
    /// This node's VTEP: the underlay address `vxlan.starling` sends from,
    /// which other nodes use as this node's next hop. None: the uplink's
    /// first IPv4 address.
    pub vxlan_local: Option<Ipv4Addr>,
    /// The same for `vxlan6.starling` over IPv6. None: the uplink's first
    /// IPv6 address that is not link-local.
    pub vxlan_local_v6: Option<std::net::Ipv6Addr>,
    /// Bytes of route messages per netlink write.
    pub batch_bytes: usize,
    /// How long to gather netlink events before acting on them.
    pub debounce: Duration,
    /// Set ip_forward, proxy_arp and rp_filter as the modes need them.
    pub manage_sysctls: bool,
}

impl Default for FibConfig {
    fn default() -> Self {
        FibConfig {
            table: MAIN_TABLE,
            protocol: RouteProtocol::default(),
            resync_interval: Duration::from_secs(90),
            uplink: None,
            ipip_mtu: None,
            tunnel_address: None,
            vxlan_local: None,
            vxlan_local_v6: None,
            batch_bytes: 256 * 1024,
            debounce: Duration::from_millis(20),
            manage_sysctls: true,
        }
    }
}

impl FibConfig {
    fn check(&self) -> Result<(), FibError> {
        let bad = |field: &'static str, why: String| Err(FibError::Config { field, why });
        if matches!(self.table, 0 | 253 | 255) {
            return bad(
                "table",
                format!(
                    "{} is reserved (unspec, default or local); use main (254) or your own",
                    self.table
                ),
            );
        }
        if self.protocol.0 <= 4 {
            return bad(
                "protocol",
                format!(
                    "{} is reserved for the kernel, boot and static routes; the default is 73",
                    self.protocol.0
                ),
            );
        }
        if self.resync_interval.is_zero() {
            return bad("resync_interval", "must be more than zero".into());
        }
        if let Some(m) = self.ipip_mtu
            && !(68..=65515).contains(&m)
        {
            return bad("ipip_mtu", format!("{m} is outside 68..=65515"));
        }
        if self.batch_bytes < 4096 {
            return bad(
                "batch_bytes",
                format!("{} is below one page; use at least 4096", self.batch_bytes),
            );
        }
        Ok(())
    }
}

/// A route that is desired but not (fully) installed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteProblem {
    pub dst: IpNet,
    /// The next hop left out, when the problem is one path of the route.
    pub gateway: Option<IpAddr>,
    pub reason: String,
}

/// What the reconciler can tell the agent (and `starlingctl`) about the FIB.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FibStatus {
    /// Generation of the desired set the last pass applied (0: none yet).
    pub generation: u64,
    /// Routes of ours in the kernel after the last pass.
    pub installed: usize,
    pub uplink: Option<String>,
    pub uplink_mtu: Option<u32>,
    pub ipip: IpipStatus,
    #[serde(default)]
    pub vxlan: VxlanStatus,
    /// `vxlan6.starling`, for IPv6 pools with a vxlanMode.
    #[serde(default)]
    pub vxlan6: VxlanStatus,
    /// Next hops not on-link, missing devices, IPIP unavailable.
    pub unreachable: Vec<RouteProblem>,
    /// Desired prefixes where a route of another protocol sits; left alone.
    pub conflicts: Vec<IpNet>,
    /// Kernel refusals, by prefix.
    pub errors: Vec<String>,
    pub sysctls: Vec<SysctlReport>,
    pub last_sync: SyncReport,
    /// Passes run since start.
    pub syncs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FibError {
    #[error("route {dst}: {why}")]
    InvalidRoute { dst: IpNet, why: String },
    #[error("FIB config field `{field}`: {why}")]
    Config { field: &'static str, why: String },
    #[error("netlink {op}: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}
