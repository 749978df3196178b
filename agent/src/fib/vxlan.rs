//! The VXLAN data path (Calico's, RFC 7348): one `vxlan.starling` device
//! (VNI 4096, UDP 4789, learning off, local = this node's underlay address,
//! dev = the uplink), and per remote VTEP one FDB entry (its MAC -> its node
//! address) and one permanent neighbour entry (its VTEP address -> its MAC).
//! IPv6 pools get a second device, `vxlan6.starling` (Calico's
//! `vxlan-v6.calico`), the same over the node's IPv6 underlay address: a
//! VXLAN device has one local address, so one family of outer headers.
//!
//! **Where the remote VTEPs come from.** A remote node's VTEP address is its
//! underlay address, the next hop the desired route already carries (BGP's
//! NEXT_HOP, or the node address from the datastore), and its MAC is derived
//! from that address by [`vtep_mac`]. So every node computes every entry
//! from the routes alone: nothing is published, there is no window in which
//! a route exists but its VTEP is not yet known, and the file and
//! Kubernetes datastores need nothing new. Calico instead allocates the
//! VTEP address from the node's block and publishes it with the MAC on the
//! Node; Starling's device carries no address of its own (see docs/vxlan.md
//! for what that means for host-originated traffic).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkUnspec, LinkVxlan};
use serde::{Deserialize, Serialize};

use super::host::{HostView, Link};
use super::netlink::RtSocket;
pub(crate) use super::vxlan_link::VxlanLink;
pub use super::vxlan_link::{VXLAN_DEVICE, VXLAN_DEVICE_V6};

/// The device of one underlay family.
pub fn device_name(v6: bool) -> &'static str {
    if v6 { VXLAN_DEVICE_V6 } else { VXLAN_DEVICE }
}
/// Calico's VNI, so captures read the same.
pub const VXLAN_VNI: u32 = 4096;
/// IANA's VXLAN port (RFC 7348 §5), not the kernel's historical 8472.
pub const VXLAN_PORT: u16 = 4789;

/// The MAC of the VTEP whose node address is `node`: a locally administered
/// unicast address (first octet 0x02), 0x53 ('S'), then the four octets of
/// the address. Unique per node address, computable by every node.
pub fn vtep_mac(node: Ipv4Addr) -> [u8; 6] {
    let o = node.octets();
    [0x02, 0x53, o[0], o[1], o[2], o[3]]
}

/// The MAC of an IPv6 VTEP: locally administered unicast, 0x56 ('V'),
/// then four bytes of the FNV-1a hash of the sixteen address bytes: every
/// node computes the same, and two addresses of one cluster collide with
/// a chance of one in 2^32.
pub fn vtep_mac_v6(node: Ipv6Addr) -> [u8; 6] {
    let mut h: u32 = 2166136261;
    for b in node.octets() {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    let o = h.to_be_bytes();
    [0x02, 0x56, o[0], o[1], o[2], o[3]]
}

/// The inner next hop of an IPv6 VTEP: the link-local address (EUI-64) of
/// its MAC. The kernel refuses `via <node address> dev vxlan6.starling
/// onlink` when the node address is on-link on the uplink (an IPv6 onlink
/// gateway must not resolve through another device), so IPv6 routes go
/// `via fe80::… dev vxlan6.starling`; the neighbour entry maps it to the
/// MAC and the FDB entry the MAC to the node address. (Calico avoids the
/// clash by giving VTEPs addresses from the pool.)
pub fn vtep_link_local(node: Ipv6Addr) -> Ipv6Addr {
    let m = vtep_mac_v6(node);
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([m[0] ^ 0x02, m[1]]),
        u16::from_be_bytes([m[2], 0xff]),
        u16::from_be_bytes([0xfe, m[3]]),
        u16::from_be_bytes([m[4], m[5]]),
    )
}

/// The address a peer's neighbour entry (and routes) use: its underlay
/// address over IPv4, [`vtep_link_local`] over IPv6.
pub fn neighbour_address(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(a) => IpAddr::V6(vtep_link_local(a)),
    }
}

/// The MAC of the VTEP at `node`, of either family.
pub fn vtep_mac_of(node: IpAddr) -> [u8; 6] {
    match node {
        IpAddr::V4(a) => vtep_mac(a),
        IpAddr::V6(a) => vtep_mac_v6(a),
    }
}

pub(crate) fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VxlanLink {
    /// Whether the device was made as we make it; if not it is deleted and
    /// made again (the kernel cannot change a VXLAN device's VNI, port or
    /// local address in place).
    fn made_as(&self, local: IpAddr, uplink: u32) -> bool {
        self.is_vxlan
            && self.vni == Some(VXLAN_VNI)
            && self.port == Some(VXLAN_PORT)
            && self.local == Some(local)
            && self.learning == Some(false)
            && self.dev == Some(uplink)
    }
}

/// The state of the VXLAN device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum VxlanStatus {
    /// No route needs VXLAN.
    #[default]
    NotNeeded,
    Ready {
        ifindex: u32,
        mtu: u32,
        /// This node's VTEP: the underlay address the device sends from.
        local: IpAddr,
        mac: String,
        /// Remote VTEPs with an FDB and a neighbour entry.
        peers: usize,
    },
    /// The device cannot be made; routes that need it are not installed.
    Unavailable { error: String },
}

/// This node's VTEP address of one family: the configured one, or the
/// uplink's first address of the family that is not link-local.
pub(crate) fn local_address(
    configured: Option<IpAddr>,
    view: &HostView,
    uplink: &Link,
    v6: bool,
) -> Option<IpAddr> {
    configured.or_else(|| {
        view.addrs_of(uplink.index)
            .iter()
            .map(|n| n.addr())
            .find(|a| match a {
                IpAddr::V4(a) => !v6 && !a.is_link_local(),
                IpAddr::V6(a) => v6 && !a.is_unicast_link_local(),
            })
    })
}

/// Create, adopt or repair the device. Returns its index, or a message
/// naming what is wrong.
pub(crate) async fn ensure_device(
    sock: &mut RtSocket,
    view: &mut HostView,
    uplink: &Link,
    local: IpAddr,
    mtu: u32,
) -> Result<u32, String> {
    let v6 = local.is_ipv6();
    let name = device_name(v6);
    let mac = vtep_mac_of(local);
    if let Some(have) = view.vxlan_of(v6).clone()
        && !have.made_as(local, uplink.index)
    {
        tracing::info!(?have, %local, "{name} differs from what we make: replacing it");
        delete_device(sock, have.index, name).await?;
        *view = reread(sock, name).await?;
    }
    if view.vxlan_of(v6).is_none() {
        let b = LinkVxlan::new(name, VXLAN_VNI)
            .dev(uplink.index)
            .port(VXLAN_PORT)
            .learning(false)
            .mtu(mtu)
            .address(mac.to_vec())
            .up();
        let msg = match local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        }
        .build();
        sock.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .await
            .map_err(|e| {
                format!(
                    "creating {name} (vxlan id {VXLAN_VNI} dstport {VXLAN_PORT} local {local}): {e}; \
                     the kernel needs CONFIG_VXLAN"
                )
            })?;
        *view = reread(sock, name).await?;
    }
    let Some(link) = view.vxlan_of(v6).clone() else {
        return Err(format!(
            "{name} was created but does not show up in the link list"
        ));
    };
    if !link.up || link.mtu != mtu || link.mac.as_deref() != Some(&mac[..]) {
        let msg = LinkUnspec::new_with_index(link.index)
            .up()
            .mtu(mtu)
            .address(mac.to_vec())
            .build();
        sock.request(RouteNetlinkMessage::SetLink(msg), 0)
            .await
            .map_err(|e| {
                format!(
                    "setting {name} up with mtu {mtu} and address {}: {e}",
                    mac_text(&mac)
                )
            })?;
        *view = reread(sock, name).await?;
    }
    Ok(link.index)
}

async fn reread(sock: &mut RtSocket, name: &str) -> Result<HostView, String> {
    HostView::read(sock)
        .await
        .map_err(|e| format!("reading links after changing {name}: {e}"))
}

/// Remove the device `name` (no route needs it any more); its routes, FDB
/// and neighbour entries go with it.
pub(crate) async fn delete_device(
    sock: &mut RtSocket,
    index: u32,
    name: &str,
) -> Result<(), String> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    match sock.request(RouteNetlinkMessage::DelLink(msg), 0).await {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(format!("deleting {name}: {e}")),
    }
}

/// What a pass did to the FDB and neighbour entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PeerWrites {
    pub written: usize,
    pub removed: usize,
}

fn ip_of(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some((*v4).into()),
        NeighbourAddress::Inet6(v6) => Some((*v6).into()),
        // AF_BRIDGE messages carry NDA_DST as bytes.
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice())
                .ok()
                .map(|o| Ipv4Addr::from(o).into()),
            16 => <[u8; 16]>::try_from(b.as_slice())
                .ok()
                .map(|o| Ipv6Addr::from(o).into()),
            _ => None,
        },
        _ => None,
    }
}

/// One FDB or neighbour entry on our device, reduced to what we compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub bridge: bool,
    pub ifindex: u32,
    pub ip: Option<IpAddr>,
    pub mac: Option<Vec<u8>>,
    pub permanent: bool,
}

impl Entry {
    pub fn from_message(m: &NeighbourMessage) -> Option<Entry> {
        let bridge = match m.header.family {
            AddressFamily::Bridge => true,
            AddressFamily::Inet | AddressFamily::Inet6 => false,
            _ => return None,
        };
        let mut e = Entry {
            bridge,
            ifindex: m.header.ifindex,
            ip: None,
            mac: None,
            permanent: m.header.state == NeighbourState::Permanent,
        };
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(d) => e.ip = ip_of(d),
                NeighbourAttribute::LinkLayerAddress(mac) => e.mac = Some(mac.clone()),
                _ => {}
            }
        }
        Some(e)
    }

    /// The peer this entry's address belongs to: the FDB's is the peer's
    /// underlay address, the neighbour's [`neighbour_address`].
    pub fn peer(&self, peers: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        let ip = self.ip?;
        peers
            .iter()
            .find(|p| {
                if self.bridge {
                    **p == ip
                } else {
                    neighbour_address(**p) == ip
                }
            })
            .copied()
    }

    /// Exactly what we write for one of `peers`.
    pub fn is_ours_for(&self, peers: &BTreeSet<IpAddr>) -> bool {
        let Some(peer) = self.peer(peers) else {
            return false;
        };
        self.mac.as_deref() == Some(&vtep_mac_of(peer)[..]) && (self.bridge || self.permanent)
    }
}

fn neighbour(bridge: bool, ifindex: u32, ip: IpAddr, mac: Option<[u8; 6]>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = match (bridge, ip) {
        (true, _) => AddressFamily::Bridge,
        (false, IpAddr::V4(_)) => AddressFamily::Inet,
        (false, IpAddr::V6(_)) => AddressFamily::Inet6,
    };
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    if bridge {
        // NTF_SELF: the entry is the VXLAN device's own FDB, not a bridge's.
        m.header.flags = NeighbourFlags::Own;
    }
    if let Some(mac) = mac {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    m.attributes.push(NeighbourAttribute::Destination(match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }));
    m
}

/// Dump the FDB and the neighbours (of the device's family) of our device.
async fn dump_entries(sock: &mut RtSocket, ifindex: u32, v6: bool) -> std::io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for bridge in [true, false] {
        let mut req = NeighbourMessage::default();
        if bridge {
            // rtnl_fdb_dump: the header's ifindex selects the device.
            req.header.family = AddressFamily::Bridge;
            req.header.ifindex = ifindex;
        } else {
            // Strict neighbour dumps refuse a header ifindex; NDA_IFINDEX filters.
            req.header.family = if v6 {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            };
            req.attributes.push(NeighbourAttribute::IfIndex(ifindex));
        }
        let mut got = Vec::new();
        sock.dump(RouteNetlinkMessage::GetNeighbour(req), |m| match m {
            Some(RouteNetlinkMessage::NewNeighbour(n)) => {
                if let Some(e) = Entry::from_message(&n)
                    && e.ifindex == ifindex
                    && e.bridge == bridge
                {
                    got.push(e);
                }
            }
            Some(_) => {}
            None => got.clear(),
        })
        .await?;
        out.extend(got);
    }
    Ok(out)
}

/// Converge the device's FDB and neighbour entries to one pair per peer:
/// FDB `vtep_mac(peer) dst peer`, neighbour `peer lladdr vtep_mac(peer)
/// permanent`. Entries already right are left alone (a restart writes
/// nothing); with `prune`, FDB entries and permanent neighbours of no peer
/// are removed (the kernel's own, not permanent, neighbours are left).
pub(crate) async fn sync_peers(
    sock: &mut RtSocket,
    ifindex: u32,
    peers: &BTreeSet<IpAddr>,
    prune: bool,
    v6: bool,
) -> Result<PeerWrites, String> {
    let name = device_name(v6);
    let found = dump_entries(sock, ifindex, v6)
        .await
        .map_err(|e| format!("dumping the FDB and neighbours of {name}: {e}"))?;
    let mut msgs = Vec::new();
    let mut writes = PeerWrites::default();
    for bridge in [true, false] {
        for peer in peers {
            let ip = if bridge {
                *peer
            } else {
                neighbour_address(*peer)
            };
            let right = found
                .iter()
                .any(|e| e.bridge == bridge && e.ip == Some(ip) && e.is_ours_for(peers));
            if !right {
                let m = neighbour(bridge, ifindex, ip, Some(vtep_mac_of(*peer)));
                msgs.push((
                    RouteNetlinkMessage::NewNeighbour(m),
                    NLM_F_CREATE | NLM_F_REPLACE,
                ));
                writes.written += 1;
            }
        }
    }
    if prune {
        for e in &found {
            let Some(ip) = e.ip else { continue };
            if e.is_ours_for(peers) || !(e.bridge || e.permanent) {
                continue;
            }
            // A wrong MAC for one of our peers in the FDB is a second
            // destination entry: remove it; the neighbour was replaced above.
            if !e.bridge && e.peer(peers).is_some() {
                continue;
            }
            let mac = e.mac.as_deref().and_then(|m| <[u8; 6]>::try_from(m).ok());
            let m = neighbour(e.bridge, ifindex, ip, if e.bridge { mac } else { None });
            msgs.push((RouteNetlinkMessage::DelNeighbour(m), 0));
            writes.removed += 1;
        }
    }
    if msgs.is_empty() {
        return Ok(writes);
    }
    let nacks = sock
        .batch(msgs, 64 * 1024)
        .await
        .map_err(|e| format!("writing the FDB and neighbours of {name}: {e}"))?;
    let refused: Vec<String> = nacks
        .iter()
        .filter(|n| n.errno != libc::ENOENT)
        .map(|n| super::netlink::errno_text(n.errno))
        .collect();
    if !refused.is_empty() {
        return Err(format!(
            "the kernel refused {} FDB/neighbour entries of {name}: {}",
            refused.len(),
            refused.join("; ")
        ));
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_macs_are_local_unicast_and_unique_per_address() {
        let a = vtep_mac("192.0.2.11".parse().unwrap());
        assert_eq!(mac_text(&a), "02:53:c0:00:02:0b");
        // Locally administered (bit 1), unicast (bit 0 clear).
        assert_eq!(a[0] & 0x03, 0x02);
        assert_ne!(a, vtep_mac("192.0.2.12".parse().unwrap()));
    }

    #[test]
    fn ipv6_vtep_macs_are_local_unicast_and_differ() {
        let a = vtep_mac_v6("2001:db8::11".parse().unwrap());
        assert_eq!(a[..2], [0x02, 0x56]);
        assert_ne!(a, vtep_mac_v6("2001:db8::12".parse().unwrap()));
        assert_eq!(vtep_mac_of("2001:db8::11".parse().unwrap()), a);
    }

    #[test]
    fn ipv6_entries_round_trip() {
        let ip: IpAddr = "2001:db8::12".parse().unwrap();
        let peers = BTreeSet::from([ip]);
        let ll = neighbour_address(ip);
        assert!(matches!(ll, IpAddr::V6(a) if a.is_unicast_link_local()));
        for (bridge, at) in [(false, ll), (true, ip)] {
            let e = Entry::from_message(&neighbour(bridge, 7, at, Some(vtep_mac_of(ip)))).unwrap();
            assert_eq!(e.ip, Some(at));
            assert!(e.is_ours_for(&peers));
        }
        // The neighbour entry on the underlay address is not ours.
        let e = Entry::from_message(&neighbour(false, 7, ip, Some(vtep_mac_of(ip)))).unwrap();
        assert!(!e.is_ours_for(&peers));
        // AF_BRIDGE dumps carry NDA_DST as sixteen bytes.
        assert_eq!(
            ip_of(&NeighbourAddress::Other(
                "2001:db8::12"
                    .parse::<Ipv6Addr>()
                    .unwrap()
                    .octets()
                    .to_vec()
            )),
            Some(ip)
        );
    }

    #[test]
    fn entries_are_ours_only_when_exactly_as_written() {
        let ip: IpAddr = "192.0.2.12".parse().unwrap();
        let peers = BTreeSet::from([ip]);
        let m = neighbour(false, 7, ip, Some(vtep_mac_of(ip)));
        let e = Entry::from_message(&m).unwrap();
        assert!(e.is_ours_for(&peers));
        let wrong = Entry {
            mac: Some(vec![0x02, 0, 0, 0, 0, 1]),
            ..e.clone()
        };
        assert!(!wrong.is_ours_for(&peers));
        assert!(!e.is_ours_for(&BTreeSet::new()));
        let fdb = Entry::from_message(&neighbour(true, 7, ip, Some(vtep_mac_of(ip)))).unwrap();
        assert!(fdb.bridge && fdb.is_ours_for(&peers));
    }
}
