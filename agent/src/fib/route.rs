//! The routes the agent asks for ([`Route`]) and the concrete kernel routes
//! they resolve to ([`KernelRoute`]), with the translation to and from
//! rtnetlink messages.

use foldhash::{HashSet, HashSetExt};
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteNextHop,
    RouteNextHopFlags, RouteProtocol as NlProtocol, RouteScope, RouteType,
};
use rtnetlink::{RouteMessageBuilder, RouteNextHopBuilder};
use serde::{Deserialize, Serialize};

use super::FibError;
use crate::encap::{EncapMode, Encapsulation};

/// One path of a route towards another node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NextHop {
    /// The other node's address.
    pub gateway: IpAddr,
    #[serde(default)]
    pub encap: Encapsulation,
}

/// Where a route sends its packets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteTarget {
    /// Drop: a local block, so that traffic to its unused addresses does not loop.
    Blackhole,
    /// A pod address on its host-side device (`dev <veth> scope link`).
    Device(String),
    /// Another node's block; more than one hop makes an ECMP route.
    Via(Vec<NextHop>),
}

/// One desired route. The reconciler owns the whole `dst` in its table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    pub target: RouteTarget,
}

impl Route {
    pub fn blackhole(dst: IpNet) -> Route {
        Route {
            dst,
            target: RouteTarget::Blackhole,
        }
    }

    pub fn device(dst: IpNet, ifname: impl Into<String>) -> Route {
        Route {
            dst,
            target: RouteTarget::Device(ifname.into()),
        }
    }

    pub fn via(dst: IpNet, gateway: IpAddr, encap: Encapsulation) -> Route {
        Route {
            dst,
            target: RouteTarget::Via(vec![NextHop { gateway, encap }]),
        }
    }

    pub fn ecmp(dst: IpNet, hops: Vec<NextHop>) -> Route {
        Route {
            dst,
            target: RouteTarget::Via(hops),
        }
    }
}

/// Check a desired set before it is accepted: every problem names the prefix.
pub(crate) fn validate(routes: &[Route]) -> Result<(), FibError> {
    let mut seen = HashSet::with_capacity(routes.len());
    for r in routes {
        let bad = |why: String| FibError::InvalidRoute { dst: r.dst, why };
        if r.dst.trunc() != r.dst {
            return Err(bad(format!(
                "host bits set; did you mean {}?",
                r.dst.trunc()
            )));
        }
        if !seen.insert(r.dst) {
            return Err(bad("appears twice in the desired set".into()));
        }
        match &r.target {
            RouteTarget::Blackhole => {}
            RouteTarget::Device(name) => {
                if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                    return Err(bad(format!(
                        "device name {name:?} is not a valid interface name"
                    )));
                }
            }
            RouteTarget::Via(hops) => {
                if hops.is_empty() {
                    return Err(bad("a next-hop route needs at least one next hop".into()));
                }
                for h in hops {
                    if h.gateway.is_ipv4() != r.dst.addr().is_ipv4() {
                        return Err(bad(format!(
                            "next hop {} is of the other address family",
                            h.gateway
                        )));
                    }
                    if h.gateway.is_ipv6() && h.encap == Encapsulation::Ipip(EncapMode::Always) {
                        return Err(bad(format!(
                            "next hop {}: IPIP is IPv4 only; use Encapsulation::None for IPv6",
                            h.gateway
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// One path of a resolved route, as the kernel stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct KernelHop {
    pub gateway: IpAddr,
    pub oif: u32,
    pub onlink: bool,
}

/// The shape of a route in our table, reduced to what we set, so that a
/// kernel dump and a resolved desired route compare equal when nothing has to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KernelRoute {
    Blackhole,
    /// Directly on a device, scope link.
    Device {
        oif: u32,
    },
    Via(KernelHop),
    /// Two or more paths, sorted and deduplicated (see [`KernelRoute::via`]).
    Ecmp(Vec<KernelHop>),
    /// A route of ours that we would never have written (changed by hand):
    /// it never compares equal, so it gets replaced or removed.
    Foreign,
}

impl KernelRoute {
    /// The one canonical shape for a set of paths, so that equal sets compare equal.
    pub fn via(mut hops: Vec<KernelHop>) -> Option<KernelRoute> {
        hops.sort();
        hops.dedup();
        match hops.len() {
            0 => None,
            1 => Some(KernelRoute::Via(hops[0])),
            _ => Some(KernelRoute::Ecmp(hops)),
        }
    }
}

/// A route of ours found in the kernel, with what is needed to delete it exactly.
#[derive(Clone, Debug)]
pub(crate) struct Found {
    pub route: KernelRoute,
    pub priority: Option<u32>,
}

/// Settings every message we write carries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stamp {
    pub table: u32,
    pub protocol: u8,
}

fn set_table(msg: &mut RouteMessage, table: u32) {
    // The header's byte cannot hold tables above 255: RT_TABLE_UNSPEC there
    // plus RTA_TABLE is how iproute2 says it too.
    msg.header.table = if table > 255 { 0 } else { table as u8 };
    msg.attributes
        .retain(|a| !matches!(a, RouteAttribute::Table(_)));
    msg.attributes.push(RouteAttribute::Table(table));
}

/// The RTM_NEWROUTE body for a resolved route.
pub(crate) fn new_route_message(dst: IpNet, route: &KernelRoute, stamp: Stamp) -> RouteMessage {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .expect("destination and builder are of the same family")
        .protocol(NlProtocol::from(stamp.protocol));
    b = match route {
        KernelRoute::Blackhole => b.kind(RouteType::BlackHole).scope(RouteScope::Universe),
        KernelRoute::Device { oif } => b.output_interface(*oif).scope(RouteScope::Link),
        KernelRoute::Via(h) => {
            let b = b
                .gateway(h.gateway)
                .expect("gateway family checked when the route was accepted")
                .output_interface(h.oif);
            if h.onlink { b.onlink() } else { b }
        }
        KernelRoute::Ecmp(hops) => {
            let nhs = hops
                .iter()
                .map(|h| {
                    let fam = if h.gateway.is_ipv4() {
                        RouteNextHopBuilder::new_ipv4()
                    } else {
                        RouteNextHopBuilder::new_ipv6()
                    };
                    let nh = fam
                        .interface(h.oif)
                        .via(h.gateway)
                        .expect("gateway family checked when the route was accepted");
                    if h.onlink {
                        nh.onlink().build()
                    } else {
                        nh.build()
                    }
                })
                .collect();
            b.multipath(nhs)
        }
        KernelRoute::Foreign => unreachable!("a Foreign route is never desired"),
    };
    let mut msg = b.build();
    set_table(&mut msg, stamp.table);
    msg
}

/// The RTM_DELROUTE body that removes exactly our route at `dst` and nothing
/// else: the protocol is part of the match, so an identical route of another
/// protocol is left alone.
pub(crate) fn del_route_message(dst: IpNet, priority: Option<u32>, stamp: Stamp) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header = RouteHeader {
        address_family: if dst.addr().is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        },
        destination_prefix_length: dst.prefix_len(),
        protocol: NlProtocol::from(stamp.protocol),
        // Any scope, any type: our protocol and the prefix identify the route.
        scope: RouteScope::NoWhere,
        kind: RouteType::Unspec,
        ..RouteHeader::default()
    };
    msg.attributes
        .push(RouteAttribute::Destination(dst.addr().into()));
    if let Some(p) = priority {
        msg.attributes.push(RouteAttribute::Priority(p));
    }
    set_table(&mut msg, stamp.table);
    msg
}

/// The RTM_GETROUTE dump request for our routes of one family; with
/// NETLINK_GET_STRICT_CHK the kernel filters by table and protocol itself.
pub(crate) fn dump_request(v6: bool, stamp: Stamp) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.protocol = NlProtocol::from(stamp.protocol);
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::Unspec;
    set_table(&mut msg, stamp.table);
    msg
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

pub(crate) fn protocol_number(p: NlProtocol) -> u8 {
    u8::from(p)
}

/// The table a route message belongs to (RTA_TABLE wins over the header byte).
pub(crate) fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| {
            if let RouteAttribute::Table(t) = a {
                Some(*t)
            } else {
                None
            }
        })
        .unwrap_or(msg.header.table as u32)
}

/// The destination prefix of a route message, or None for shapes we never
/// write (multicast, source-specific, MPLS).
pub(crate) fn dst_of(msg: &RouteMessage) -> Option<IpNet> {
    let len = msg.header.destination_prefix_length;
    let addr = msg.attributes.iter().find_map(|a| {
        if let RouteAttribute::Destination(d) = a {
            ip_of(d)
        } else {
            None
        }
    });
    let addr = match (addr, msg.header.address_family) {
        (Some(a), _) => a,
        (None, AddressFamily::Inet) => IpAddr::V4(0.into()),
        (None, AddressFamily::Inet6) => IpAddr::V6(0.into()),
        _ => return None,
    };
    IpNet::new(addr, len).ok()
}

/// Reduce a route of ours from a dump or an event to the shape we compare.
pub(crate) fn parse_found(msg: &RouteMessage) -> Option<(IpNet, Found)> {
    let dst = dst_of(msg)?;
    let v6 = dst.addr().is_ipv6();
    let mut gateway = None;
    let mut oif = None;
    let mut multipath: Option<&Vec<RouteNextHop>> = None;
    let mut priority = None;
    let mut odd = msg.header.tos != 0 || msg.header.source_prefix_length != 0;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::MultiPath(m) => multipath = Some(m),
            RouteAttribute::Priority(p) => priority = Some(*p),
            RouteAttribute::Via(_) | RouteAttribute::Encap(_) | RouteAttribute::NhId(_) => {
                odd = true
            }
            _ => {}
        }
    }
    let route = if odd {
        KernelRoute::Foreign
    } else {
        match msg.header.kind {
            RouteType::BlackHole => KernelRoute::Blackhole,
            RouteType::Unicast => match (gateway, oif, multipath) {
                (None, Some(oif), None) if v6 || msg.header.scope == RouteScope::Link => {
                    KernelRoute::Device { oif }
                }
                (Some(gw), Some(oif), None) if v6 || msg.header.scope == RouteScope::Universe => {
                    let onlink = msg.header.flags.contains(RouteFlags::Onlink);
                    KernelRoute::Via(KernelHop {
                        gateway: gw,
                        oif,
                        onlink,
                    })
                }
                (None, None, Some(nhs)) => parse_multipath(nhs),
                _ => KernelRoute::Foreign,
            },
            _ => KernelRoute::Foreign,
        }
    };
    Some((dst, Found { route, priority }))
}

fn parse_multipath(nhs: &[RouteNextHop]) -> KernelRoute {
    let mut hops = Vec::with_capacity(nhs.len());
    for nh in nhs {
        let gw = nh.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(g) => ip_of(g),
            _ => None,
        });
        let Some(gateway) = gw else {
            return KernelRoute::Foreign;
        };
        if nh.hops != 0 {
            return KernelRoute::Foreign;
        }
        hops.push(KernelHop {
            gateway,
            oif: nh.interface_index,
            onlink: nh.flags.contains(RouteNextHopFlags::Onlink),
        });
    }
    KernelRoute::via(hops).unwrap_or(KernelRoute::Foreign)
}

/// A route message as it sits in a dump, reduced without building the full
/// `RouteMessage` (an unchanged resync of 100k routes is mostly this).
pub(crate) struct RawRoute {
    pub table: u32,
    pub protocol: u8,
    pub dst: IpNet,
    pub found: Found,
}

const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_VIA: u16 = 18;
const RTA_ENCAP: u16 = 22;
const RTA_NH_ID: u16 = 30;
const RTN_UNICAST: u8 = 1;
const RTN_BLACKHOLE: u8 = 6;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTNH_F_ONLINK: u8 = 4;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Iterate the rtattrs of `buf` as (type without flag bits, payload).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let h = buf.get(at..at + 4)?;
        let len = u16::from_ne_bytes([h[0], h[1]]) as usize;
        let kind = u16::from_ne_bytes([h[2], h[3]]) & 0x3fff;
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let payload = &buf[at + 4..at + len];
        at += (len + 3) & !3;
        Some((kind, payload))
    })
}

fn ip_from(family: u8, b: &[u8]) -> Option<IpAddr> {
    match (family, b.len()) {
        (AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        (AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

fn u32_from(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

/// Parse the body of an RTM_NEWROUTE (after the netlink header). Returns
/// None for messages that are not IP routes or are malformed.
pub(crate) fn parse_raw(body: &[u8]) -> Option<RawRoute> {
    let h = body.get(..12)?;
    let (family, dst_len, src_len, tos, table8, protocol, scope, kind) =
        (h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]);
    let flags = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let v6 = family == AF_INET6;
    let mut table = table8 as u32;
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    let mut multipath = None;
    let mut priority = None;
    let mut odd = tos != 0 || src_len != 0;
    for (t, p) in attrs(&body[12..]) {
        match t {
            RTA_DST => dst = ip_from(family, p),
            RTA_GATEWAY => gateway = ip_from(family, p),
            RTA_OIF => oif = u32_from(p),
            RTA_PRIORITY => priority = u32_from(p),
            RTA_TABLE => table = u32_from(p)?,
            RTA_MULTIPATH => multipath = Some(p),
            RTA_SRC | RTA_VIA | RTA_ENCAP | RTA_NH_ID => odd = true,
            _ => {}
        }
    }
    let addr = dst.unwrap_or(if v6 {
        IpAddr::V6(0.into())
    } else {
        IpAddr::V4(0.into())
    });
    let dst = IpNet::new(addr, dst_len).ok()?;
    let route = if odd {
        KernelRoute::Foreign
    } else {
        match kind {
            RTN_BLACKHOLE => KernelRoute::Blackhole,
            RTN_UNICAST => match (gateway, oif, multipath) {
                (None, Some(oif), None) if v6 || scope == RT_SCOPE_LINK => {
                    KernelRoute::Device { oif }
                }
                (Some(gateway), Some(oif), None) if v6 || scope == RT_SCOPE_UNIVERSE => {
                    let onlink = flags & RTNH_F_ONLINK as u32 != 0;
                    KernelRoute::Via(KernelHop {
                        gateway,
                        oif,
                        onlink,
                    })
                }
                (None, None, Some(mp)) => parse_raw_multipath(family, mp),
                _ => KernelRoute::Foreign,
            },
            _ => KernelRoute::Foreign,
        }
    };
    Some(RawRoute {
        table,
        protocol,
        dst,
        found: Found { route, priority },
    })
}

fn parse_raw_multipath(family: u8, mut buf: &[u8]) -> KernelRoute {
    // struct rtnexthop { u16 len; u8 flags; u8 hops; i32 ifindex; } + rtattrs
    let mut hops = Vec::with_capacity(2);
    while buf.len() >= 8 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        if len < 8 || len > buf.len() {
            return KernelRoute::Foreign;
        }
        let (flags, weight) = (buf[2], buf[3]);
        let oif = u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let gw = attrs(&buf[8..len]).find_map(|(t, p)| {
            if t == RTA_GATEWAY {
                ip_from(family, p)
            } else {
                None
            }
        });
        let Some(gateway) = gw else {
            return KernelRoute::Foreign;
        };
        if weight != 0 {
            return KernelRoute::Foreign;
        }
        hops.push(KernelHop {
            gateway,
            oif,
            onlink: flags & RTNH_F_ONLINK != 0,
        });
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    KernelRoute::via(hops).unwrap_or(KernelRoute::Foreign)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::RouteNetlinkMessage;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn roundtrip(dst: IpNet, r: &KernelRoute) -> (IpNet, Found) {
        let msg = new_route_message(
            dst,
            r,
            Stamp {
                table: 254,
                protocol: 73,
            },
        );
        let mut nl = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(msg)),
        );
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        let back = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf)
            .unwrap()
            .payload
        {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) => m,
            other => panic!("{other:?}"),
        };
        let raw = parse_raw(&buf[16..]).unwrap();
        assert_eq!((raw.table, raw.protocol, raw.dst), (254, 73, dst));
        assert_eq!(raw.found.route, *r, "raw parse of {dst}");
        assert_eq!(protocol_number(back.header.protocol), 73);
        assert_eq!(table_of(&back), 254);
        parse_found(&back).unwrap()
    }

    #[test]
    fn messages_we_write_parse_back_to_the_same_shape() {
        let gw: IpAddr = "192.0.2.2".parse().unwrap();
        let cases = [
            (net("10.1.0.0/26"), KernelRoute::Blackhole),
            (net("10.1.0.5/32"), KernelRoute::Device { oif: 7 }),
            (
                net("10.2.0.0/26"),
                KernelRoute::Via(KernelHop {
                    gateway: gw,
                    oif: 3,
                    onlink: true,
                }),
            ),
            (
                net("10.3.0.0/26"),
                KernelRoute::Ecmp(vec![
                    KernelHop {
                        gateway: gw,
                        oif: 3,
                        onlink: false,
                    },
                    KernelHop {
                        gateway: "192.0.2.3".parse().unwrap(),
                        oif: 3,
                        onlink: false,
                    },
                ]),
            ),
            (
                net("2001:db8::/64"),
                KernelRoute::Via(KernelHop {
                    gateway: "2001:db8:1::2".parse().unwrap(),
                    oif: 3,
                    onlink: false,
                }),
            ),
        ];
        for (dst, r) in cases {
            let (d, f) = roundtrip(dst, &r);
            assert_eq!(d, dst);
            assert_eq!(f.route, r, "{dst}");
        }
    }

    #[test]
    fn table_above_255_goes_in_the_attribute() {
        let msg = new_route_message(
            net("10.0.0.0/8"),
            &KernelRoute::Blackhole,
            Stamp {
                table: 1000,
                protocol: 73,
            },
        );
        assert_eq!(msg.header.table, 0);
        assert_eq!(table_of(&msg), 1000);
    }

    #[test]
    fn validation_names_the_prefix() {
        let gw6: IpAddr = "2001:db8::1".parse().unwrap();
        let gw4: IpAddr = "192.0.2.1".parse().unwrap();
        let bad = [
            vec![Route::blackhole(net("10.0.0.1/24"))],
            vec![
                Route::blackhole(net("10.0.0.0/24")),
                Route::blackhole(net("10.0.0.0/24")),
            ],
            vec![Route::via(net("10.0.0.0/24"), gw6, Encapsulation::None)],
            vec![Route::via(
                net("2001:db8:5::/64"),
                gw6,
                Encapsulation::Ipip(EncapMode::Always),
            )],
            vec![Route::ecmp(net("10.0.0.0/24"), vec![])],
            vec![Route::device(net("10.0.0.0/24"), "")],
        ];
        for set in bad {
            let err = validate(&set).unwrap_err().to_string();
            assert!(err.contains(&set[0].dst.to_string()), "{err}");
        }
        validate(&[
            Route::blackhole(net("10.0.0.0/24")),
            Route::via(
                net("10.0.1.0/24"),
                gw4,
                Encapsulation::Ipip(EncapMode::CrossSubnet),
            ),
            Route::device(net("10.0.0.5/32"), "cali123"),
            Route::via(
                net("10.0.2.0/24"),
                gw4,
                Encapsulation::Vxlan(EncapMode::CrossSubnet),
            ),
            // VXLAN is either family (vxlan6.starling for IPv6).
            Route::via(
                net("2001:db8:6::/64"),
                gw6,
                Encapsulation::Vxlan(EncapMode::Always),
            ),
        ])
        .unwrap();
    }
}
