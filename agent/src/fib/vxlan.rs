//! The VXLAN data path (Calico's, RFC 7348): one `vxlan.starling` device
//! (VNI 4096, UDP 4789, learning off, local = this node's underlay address,
//! dev = the uplink), and per remote VTEP one FDB entry (its MAC -> its node
//! address) and one permanent neighbour entry (its VTEP address -> its MAC).
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
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkUnspec, LinkVxlan};
use serde::{Deserialize, Serialize};

use super::host::{HostView, Link};
use super::netlink::RtSocket;

/// The device's name (Calico's is `vxlan.calico`).
pub const VXLAN_DEVICE: &str = "vxlan.starling";
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

pub(crate) fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The VXLAN device as a link dump shows it: what we compare to decide
/// whether to adopt it, fix it in place, or make it again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct VxlanLink {
    pub index: u32,
    pub is_vxlan: bool,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<Ipv4Addr>,
    pub learning: Option<bool>,
    /// The underlay device (IFLA_VXLAN_LINK).
    pub dev: Option<u32>,
    pub mac: Option<Vec<u8>>,
    pub mtu: u32,
    pub up: bool,
}

impl VxlanLink {
    /// Read our device out of a link message (any link named [`VXLAN_DEVICE`]).
    pub fn from_message(l: &LinkMessage) -> VxlanLink {
        let mut v = VxlanLink {
            index: l.header.index,
            up: l.header.flags.contains(LinkFlags::Up),
            ..VxlanLink::default()
        };
        for a in &l.attributes {
            match a {
                LinkAttribute::Mtu(m) => v.mtu = *m,
                LinkAttribute::Address(mac) => v.mac = Some(mac.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(InfoKind::Vxlan) => v.is_vxlan = true,
                            LinkInfo::Data(InfoData::Vxlan(data)) => {
                                for d in data {
                                    match d {
                                        InfoVxlan::Id(id) => v.vni = Some(*id),
                                        InfoVxlan::Port(p) => v.port = Some(*p),
                                        InfoVxlan::Local(a) => v.local = Some(*a),
                                        InfoVxlan::Learning(b) => v.learning = Some(*b),
                                        InfoVxlan::Link(i) => v.dev = Some(*i),
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        v
    }

    /// Whether the device was made as we make it; if not it is deleted and
    /// made again (the kernel cannot change a VXLAN device's VNI, port or
    /// local address in place).
    fn made_as(&self, local: Ipv4Addr, uplink: u32) -> bool {
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
        local: Ipv4Addr,
        mac: String,
        /// Remote VTEPs with an FDB and a neighbour entry.
        peers: usize,
    },
    /// The device cannot be made; routes that need it are not installed.
    Unavailable { error: String },
}

/// This node's VTEP address: the configured one, or the uplink's first
/// IPv4 address that is not link-local.
pub(crate) fn local_address(
    configured: Option<Ipv4Addr>,
    view: &HostView,
    uplink: &Link,
) -> Option<Ipv4Addr> {
    configured.or_else(|| {
        view.addrs_of(uplink.index)
            .iter()
            .find_map(|n| match n.addr() {
                IpAddr::V4(a) if !a.is_link_local() => Some(a),
                _ => None,
            })
    })
}

/// Create, adopt or repair the device. Returns its index, or a message
/// naming what is wrong.
pub(crate) async fn ensure_device(
    sock: &mut RtSocket,
    view: &mut HostView,
    uplink: &Link,
    local: Ipv4Addr,
    mtu: u32,
) -> Result<u32, String> {
    let mac = vtep_mac(local);
    if let Some(have) = view.vxlan.clone()
        && !have.made_as(local, uplink.index)
    {
        tracing::info!(?have, %local, "{VXLAN_DEVICE} differs from what we make: replacing it");
        delete_device(sock, have.index).await?;
        *view = reread(sock).await?;
    }
    if view.vxlan.is_none() {
        let msg = LinkVxlan::new(VXLAN_DEVICE, VXLAN_VNI)
            .dev(uplink.index)
            .port(VXLAN_PORT)
            .local(local)
            .learning(false)
            .mtu(mtu)
            .address(mac.to_vec())
            .up()
            .build();
        sock.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .await
            .map_err(|e| {
                format!(
                    "creating {VXLAN_DEVICE} (vxlan id {VXLAN_VNI} dstport {VXLAN_PORT} local {local}): {e}; \
                     the kernel needs CONFIG_VXLAN"
                )
            })?;
        *view = reread(sock).await?;
    }
    let Some(link) = view.vxlan.clone() else {
        return Err(format!(
            "{VXLAN_DEVICE} was created but does not show up in the link list"
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
                    "setting {VXLAN_DEVICE} up with mtu {mtu} and address {}: {e}",
                    mac_text(&mac)
                )
            })?;
        *view = reread(sock).await?;
    }
    Ok(link.index)
}

async fn reread(sock: &mut RtSocket) -> Result<HostView, String> {
    HostView::read(sock)
        .await
        .map_err(|e| format!("reading links after changing {VXLAN_DEVICE}: {e}"))
}

/// Remove the device (no route needs it any more); its routes, FDB and
/// neighbour entries go with it.
pub(crate) async fn delete_device(sock: &mut RtSocket, index: u32) -> Result<(), String> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    match sock.request(RouteNetlinkMessage::DelLink(msg), 0).await {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(format!("deleting {VXLAN_DEVICE}: {e}")),
    }
}

/// What a pass did to the FDB and neighbour entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PeerWrites {
    pub written: usize,
    pub removed: usize,
}

fn ipv4_of(a: &NeighbourAddress) -> Option<Ipv4Addr> {
    match a {
        NeighbourAddress::Inet(v4) => Some(*v4),
        // AF_BRIDGE messages carry NDA_DST as bytes.
        NeighbourAddress::Other(b) => <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from),
        NeighbourAddress::Inet6(_) => None,
        _ => None,
    }
}

/// One FDB or neighbour entry on our device, reduced to what we compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub bridge: bool,
    pub ifindex: u32,
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<Vec<u8>>,
    pub permanent: bool,
}

impl Entry {
    pub fn from_message(m: &NeighbourMessage) -> Option<Entry> {
        let bridge = match m.header.family {
            AddressFamily::Bridge => true,
            AddressFamily::Inet => false,
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
                NeighbourAttribute::Destination(d) => e.ip = ipv4_of(d),
                NeighbourAttribute::LinkLayerAddress(mac) => e.mac = Some(mac.clone()),
                _ => {}
            }
        }
        Some(e)
    }

    /// Exactly what we write for `peer`.
    pub fn is_ours_for(&self, peers: &BTreeSet<Ipv4Addr>) -> bool {
        let Some(ip) = self.ip else { return false };
        peers.contains(&ip)
            && self.mac.as_deref() == Some(&vtep_mac(ip)[..])
            && (self.bridge || self.permanent)
    }
}

fn neighbour(bridge: bool, ifindex: u32, ip: Ipv4Addr, mac: Option<[u8; 6]>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = if bridge {
        AddressFamily::Bridge
    } else {
        AddressFamily::Inet
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
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    m
}

/// Dump the FDB and the IPv4 neighbours of our device.
async fn dump_entries(sock: &mut RtSocket, ifindex: u32) -> std::io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for bridge in [true, false] {
        let mut req = NeighbourMessage::default();
        if bridge {
            // rtnl_fdb_dump: the header's ifindex selects the device.
            req.header.family = AddressFamily::Bridge;
            req.header.ifindex = ifindex;
        } else {
            // Strict neighbour dumps refuse a header ifindex; NDA_IFINDEX filters.
            req.header.family = AddressFamily::Inet;
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
    peers: &BTreeSet<Ipv4Addr>,
    prune: bool,
) -> Result<PeerWrites, String> {
    let found = dump_entries(sock, ifindex)
        .await
        .map_err(|e| format!("dumping the FDB and neighbours of {VXLAN_DEVICE}: {e}"))?;
    let mut msgs = Vec::new();
    let mut writes = PeerWrites::default();
    for bridge in [true, false] {
        for ip in peers {
            let right = found
                .iter()
                .any(|e| e.bridge == bridge && e.ip == Some(*ip) && e.is_ours_for(peers));
            if !right {
                let m = neighbour(bridge, ifindex, *ip, Some(vtep_mac(*ip)));
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
            if !e.bridge && peers.contains(&ip) {
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
        .map_err(|e| format!("writing the FDB and neighbours of {VXLAN_DEVICE}: {e}"))?;
    let refused: Vec<String> = nacks
        .iter()
        .filter(|n| n.errno != libc::ENOENT)
        .map(|n| super::netlink::errno_text(n.errno))
        .collect();
    if !refused.is_empty() {
        return Err(format!(
            "the kernel refused {} FDB/neighbour entries of {VXLAN_DEVICE}: {}",
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
    fn entries_are_ours_only_when_exactly_as_written() {
        let ip: Ipv4Addr = "192.0.2.12".parse().unwrap();
        let peers = BTreeSet::from([ip]);
        let m = neighbour(false, 7, ip, Some(vtep_mac(ip)));
        let e = Entry::from_message(&m).unwrap();
        assert!(e.is_ours_for(&peers));
        let wrong = Entry {
            mac: Some(vec![0x02, 0, 0, 0, 0, 1]),
            ..e.clone()
        };
        assert!(!wrong.is_ours_for(&peers));
        assert!(!e.is_ours_for(&BTreeSet::new()));
        let fdb = Entry::from_message(&neighbour(true, 7, ip, Some(vtep_mac(ip)))).unwrap();
        assert!(fdb.bridge && fdb.is_ours_for(&peers));
    }
}
