//! Pod wiring, the way Calico does it: a veth pair whose host side carries a
//! fixed MAC and proxy ARP/NDP, a /32 (and /128) on the pod side with a
//! default route through a gateway that exists only as that MAC, and a host
//! route `<podIP> dev <veth> scope link`.
//!
//! All netlink work runs on one current-thread runtime: the pod-side socket
//! is opened inside the pod's namespace (a socket stays in the namespace it
//! was created in), so the thread only visits the pod namespace for that.

use futures_util::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::netns;

/// The pod-side gateway for IPv4: never configured anywhere, answered by
/// proxy ARP on the host side of every pod veth (the address Calico uses).
pub const GATEWAY_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);

/// The pod-side gateway for IPv6: the link-local address the kernel derives
/// (EUI-64) from [`HOST_VETH_MAC`], so the host veth owns it without
/// configuration.
pub const GATEWAY_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// Every host-side veth gets this MAC: pods only ever talk to "the host", so
/// one fixed address keeps their neighbour tables stable across restarts.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    #[error("cannot open network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// CHECK found the pod's networking not as ADD left it.
    #[error("{0}")]
    Drift(String),
}

type Result<T> = std::result::Result<T, WiringError>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> WiringError {
    let what = what.into();
    move |source| WiringError::Netlink { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> WiringError {
    let what = what.into();
    move |source| WiringError::Io { what, source }
}

/// The pod interface as ADD creates it before it knows the addresses.
pub struct Link<'a> {
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub pod_mac: [u8; 6],
    pub host_veth: &'a str,
}

/// What the agent's answer adds to a [`Link`].
#[derive(Debug, Clone)]
pub struct Addressing {
    pub ips: Vec<IpNet>,
    pub mtu: u32,
    pub route_protocol: u8,
}

/// Everything CHECK needs to know about one pod interface.
pub struct Pod<'a> {
    pub link: Link<'a>,
    pub ips: &'a [IpNet],
}

/// Why ADD failed: the wiring itself, or the addressing it waited for.
#[derive(Debug)]
pub enum AddError<E> {
    Wiring(WiringError),
    Addressing(E),
}

impl<E> From<WiringError> for AddError<E> {
    fn from(e: WiringError) -> Self {
        AddError::Wiring(e)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(io("cannot start the netlink runtime"))
}

fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(io("cannot open netlink"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink handle whose socket lives in the namespace at `path`.
fn connect_in(ns: &File) -> Result<Handle> {
    let _inside = netns::enter(ns).map_err(io("cannot enter the pod network namespace"))?;
    connect()
}

fn open_netns(path: &Path) -> Result<File> {
    netns::open(path).map_err(|source| WiringError::Netns {
        path: path.to_path_buf(),
        source,
    })
}

/// Build the pod's interface and routes. The veth pair is created while the
/// agent is still committing the allocation: `addressing` is called (and may
/// block) only once everything that does not depend on the addresses is in
/// place. On any error the host veth (and with it the pod side and the host
/// routes) is removed, so nothing is left half-done.
pub fn add<E>(
    link: &Link,
    addressing: impl FnOnce() -> std::result::Result<Addressing, E>,
) -> std::result::Result<Addressing, AddError<E>> {
    let pod_ns = open_netns(link.netns)?;
    let rt = runtime()?;
    rt.block_on(async {
        let host = connect()?;
        let inner = connect_in(&pod_ns)?;
        let result = add_links(&host, &inner, &pod_ns, link, addressing).await;
        if result.is_err() {
            let _ = del_link(&host, link.host_veth).await;
        }
        result
    })
}

async fn add_links<E>(
    host: &Handle,
    inner: &Handle,
    pod_ns: &File,
    link: &Link<'_>,
    addressing: impl FnOnce() -> std::result::Result<Addressing, E>,
) -> std::result::Result<Addressing, AddError<E>> {
    // A previous ADD for this attachment may have died half-way: the name is
    // derived from the attachment, so whatever holds it is ours to replace.
    del_link(host, link.host_veth).await?;

    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(link.ifname.to_string())
        .address(link.pod_mac.to_vec())
        .setns_by_fd(pod_ns.as_raw_fd())
        .build();
    // Both sides start down: the kernel refuses to open a veth whose peer is
    // not attached yet (ENOTCONN), and the host side's sysctls must be set
    // before it comes up so that DAD is off before it gets its link-local.
    let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(link.host_veth.to_string())
        .address(HOST_VETH_MAC.to_vec())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.link()
        .add(veth)
        .execute()
        .await
        .map_err(nl(format!("cannot create veth {}", link.host_veth)))?;
    let (host_index, pod_index) = futures_util::future::join(
        link_index(host, link.host_veth),
        link_index(inner, link.ifname),
    )
    .await;
    let host_index = host_index?
        .ok_or_else(|| WiringError::Drift(format!("veth {} vanished", link.host_veth)))?;
    let pod_index = pod_index?.ok_or_else(|| {
        WiringError::Drift(format!(
            "{} did not appear in the pod namespace",
            link.ifname
        ))
    })?;
    sysctl(&format!("ipv4/conf/{}/proxy_arp", link.host_veth), "1")?;
    // IPv6 may be disabled on the node; then there is nothing to set.
    if Path::new(&format!("/proc/sys/net/ipv6/conf/{}", link.host_veth)).exists() {
        sysctl(&format!("ipv6/conf/{}/accept_dad", link.host_veth), "0")?;
        sysctl(&format!("ipv6/conf/{}/proxy_ndp", link.host_veth), "1")?;
    }

    let addressing = addressing().map_err(AddError::Addressing)?;
    let (host_side, pod_side) = futures_util::future::join(
        wire_host_side(host, link, host_index, &addressing),
        wire_pod_side(inner, link, pod_index, &addressing),
    )
    .await;
    host_side?;
    pod_side?;
    Ok(addressing)
}

async fn wire_host_side(
    host: &Handle,
    link: &Link<'_>,
    index: u32,
    addressing: &Addressing,
) -> Result<()> {
    host.link()
        .set(
            LinkMessageBuilder::<LinkUnspec>::new()
                .index(index)
                .mtu(addressing.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!(
            "cannot set {} up with MTU {}",
            link.host_veth, addressing.mtu
        )))?;
    for ip in &addressing.ips {
        host.route()
            .add(host_route(*ip, index, addressing.route_protocol))
            .replace()
            .execute()
            .await
            .map_err(nl(format!(
                "cannot add host route {ip} dev {}",
                link.host_veth
            )))?;
    }
    Ok(())
}

fn host_route(ip: IpNet, index: u32, protocol: u8) -> rtnetlink::packet_route::route::RouteMessage {
    match ip.addr() {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::from(protocol))
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .output_interface(index)
            .protocol(RouteProtocol::from(protocol))
            .build(),
    }
}

async fn wire_pod_side(
    inner: &Handle,
    link: &Link<'_>,
    index: u32,
    addressing: &Addressing,
) -> Result<()> {
    inner
        .link()
        .set(
            LinkMessageBuilder::<LinkUnspec>::new()
                .index(index)
                .mtu(addressing.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("cannot set {} up in the pod", link.ifname)))?;
    for ip in &addressing.ips {
        let prefix = if ip.addr().is_ipv4() { 32 } else { 128 };
        let mut req = inner.address().add(index, ip.addr(), prefix).replace();
        if ip.addr().is_ipv6() {
            // The address is ours alone (IPAM says so): waiting for DAD would
            // only delay the pod's first packet.
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(nl(format!("cannot add {ip} to {} in the pod", link.ifname)))?;
    }
    // A permanent neighbour for the gateway: the pod never has to resolve it,
    // so its first packet leaves at once (proxy ARP/NDP stays on for anyone
    // who flushes the table).
    let v4 = addressing.ips.iter().any(|ip| ip.addr().is_ipv4());
    let v6 = addressing.ips.iter().any(|ip| ip.addr().is_ipv6());
    let mut gateways = Vec::new();
    if v4 {
        gateways.push(IpAddr::V4(GATEWAY_V4));
    }
    if v6 {
        gateways.push(IpAddr::V6(GATEWAY_V6));
    }
    for gw in &gateways {
        inner
            .neighbours()
            .add(index, *gw)
            .link_layer_address(&HOST_VETH_MAC)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("cannot add neighbour {gw} in the pod")))?;
    }
    if v4 {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(GATEWAY_V4)
            .output_interface(index)
            .onlink()
            .build();
        inner
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl(format!(
                "cannot add default via {GATEWAY_V4} in the pod"
            )))?;
    }
    if v6 {
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .gateway(GATEWAY_V6)
            .output_interface(index)
            .build();
        inner
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl(format!(
                "cannot add default via {GATEWAY_V6} in the pod"
            )))?;
    }
    Ok(())
}

fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/net/{key}");
    std::fs::write(&path, value).map_err(io(format!("cannot write {value} to {path}")))
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("cannot look up link {name}"))(e)),
    }
}

async fn del_link(handle: &Handle, name: &str) -> Result<bool> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        // Gone in between (its namespace was deleted): what DEL wanted anyway.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(false),
        Err(e) => Err(nl(format!("cannot delete link {name}"))(e)),
    }
}

/// Remove the host side of each named veth (the pod side goes with it, and
/// so do the host routes through it). Missing links are fine: DEL must
/// succeed when repeated, without ADD, and after the netns is gone.
pub fn del(host_veths: &[&str]) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let host = connect()?;
        for name in host_veths {
            del_link(&host, name).await?;
        }
        Ok(())
    })
}

/// Verify what ADD set up is still there, naming the first thing missing.
pub fn check(pod: &Pod) -> Result<()> {
    let pod_ns = open_netns(pod.link.netns)?;
    let rt = runtime()?;
    rt.block_on(async {
        let host = connect()?;
        let inner = connect_in(&pod_ns)?;
        let host_index = link_index(&host, pod.link.host_veth)
            .await?
            .ok_or_else(|| {
                WiringError::Drift(format!("host veth {} is missing", pod.link.host_veth))
            })?;
        let pod_index = link_index(&inner, pod.link.ifname).await?.ok_or_else(|| {
            WiringError::Drift(format!(
                "interface {} is missing in {}",
                pod.link.ifname,
                pod.link.netns.display()
            ))
        })?;
        let addrs = addresses(&inner, pod_index).await?;
        for ip in pod.ips {
            if !addrs.contains(&ip.addr()) {
                return Err(WiringError::Drift(format!(
                    "address {} is missing from {} in {}",
                    ip.addr(),
                    pod.link.ifname,
                    pod.link.netns.display()
                )));
            }
        }
        for ip in pod.ips {
            let v4 = ip.addr().is_ipv4();
            if !has_route(&inner, v4, |dst, oif| {
                dst.prefix_len() == 0 && oif == pod_index
            })
            .await?
            {
                return Err(WiringError::Drift(format!(
                    "default route via {} is missing in {}",
                    if v4 {
                        IpAddr::V4(GATEWAY_V4)
                    } else {
                        IpAddr::V6(GATEWAY_V6)
                    },
                    pod.link.netns.display()
                )));
            }
            if !has_route(&host, v4, |dst, oif| {
                dst == host_prefix(*ip) && oif == host_index
            })
            .await?
            {
                return Err(WiringError::Drift(format!(
                    "host route {} dev {} is missing",
                    ip.addr(),
                    pod.link.host_veth
                )));
            }
        }
        Ok(())
    })
}

fn host_prefix(ip: IpNet) -> IpNet {
    IpNet::from(ip.addr())
}

async fn addresses(handle: &Handle, index: u32) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut dump = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = dump
        .try_next()
        .await
        .map_err(nl("cannot list pod addresses"))?
    {
        for attr in msg.attributes {
            if let AddressAttribute::Address(a) = attr {
                out.push(a);
            }
        }
    }
    Ok(out)
}

async fn has_route(handle: &Handle, v4: bool, wanted: impl Fn(IpNet, u32) -> bool) -> Result<bool> {
    let query = if v4 {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    };
    let routes = handle.route().get(query).execute();
    futures_util::pin_mut!(routes);
    while let Some(route) = routes.next().await {
        let route = route.map_err(nl("cannot list routes"))?;
        let len = route.header.destination_prefix_length;
        let mut dst = if v4 {
            IpNet::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        } else {
            IpNet::from(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
        };
        let mut oif = 0;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                    dst = IpNet::from(IpAddr::V4(*a))
                }
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                    dst = IpNet::from(IpAddr::V6(*a))
                }
                RouteAttribute::Oif(i) => oif = *i,
                _ => {}
            }
        }
        let Ok(dst) = IpNet::new(dst.addr(), len) else {
            continue;
        };
        if wanted(dst, oif) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_v6_is_the_eui64_link_local_of_the_host_mac() {
        let m = HOST_VETH_MAC;
        let eui = [m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]];
        let mut b = [0u8; 16];
        b[0] = 0xfe;
        b[1] = 0x80;
        b[8..].copy_from_slice(&eui);
        assert_eq!(std::net::Ipv6Addr::from(b), GATEWAY_V6);
    }
}
