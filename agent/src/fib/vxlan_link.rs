//! The VXLAN devices' names and a link dump's view of one: a leaf, so the
//! host view (`host`) and the data path (`vxlan`) both read it without
//! importing each other.

use std::net::IpAddr;

use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};

/// The device's name (Calico's is `vxlan.calico`).
pub const VXLAN_DEVICE: &str = "vxlan.starling";
/// The IPv6 underlay's device (Calico's is `vxlan-v6.calico`; ours must fit
/// the kernel's 15 characters).
pub const VXLAN_DEVICE_V6: &str = "vxlan6.starling";

/// The VXLAN device as a link dump shows it: what we compare to decide
/// whether to adopt it, fix it in place, or make it again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct VxlanLink {
    pub index: u32,
    pub is_vxlan: bool,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
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
                                        InfoVxlan::Local(a) => v.local = Some((*a).into()),
                                        InfoVxlan::Local6(a) => v.local = Some((*a).into()),
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
}
