//! What the routes depend on besides themselves: links and their addresses
//! (uplink MTU, on-link checks, CrossSubnet decisions), the `tunl0` IPIP
//! device, and the sysctls each mode needs.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkExtentMask, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{AddressMessageBuilder, LinkIpIp, LinkUnspec};
use serde::{Deserialize, Serialize};

use super::netlink::RtSocket;
use super::route::dst_of;
use super::vxlan_link::{VXLAN_DEVICE, VXLAN_DEVICE_V6, VxlanLink};

/// The name the kernel gives the fallback IPIP device when `ipip` loads.
pub const TUNL0: &str = "tunl0";

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub mtu: u32,
    pub up: bool,
}

/// Links and addresses of this network namespace, read in one go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct HostView {
    pub links: HashMap<String, Link>,
    pub addrs: HashMap<u32, Vec<IpNet>>,
    /// The VXLAN device, when there is one, with its settings.
    pub vxlan: Option<VxlanLink>,
    /// The IPv6 underlay's VXLAN device.
    pub vxlan6: Option<VxlanLink>,
}

impl HostView {
    pub async fn read(sock: &mut RtSocket) -> std::io::Result<HostView> {
        let mut view = HostView::default();
        let mut links = Vec::new();
        // Without the counters: the kernel gathers every device's
        // statistics for each link dumped otherwise (a hundred veths' worth
        // on a full node), and nothing here reads them.
        let mut request = LinkMessage::default();
        request
            .attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        sock.dump(RouteNetlinkMessage::GetLink(request), |m| match m {
            Some(RouteNetlinkMessage::NewLink(l)) => links.push(l),
            Some(_) => {}
            None => links.clear(),
        })
        .await?;
        for l in links {
            for a in &l.attributes {
                match a {
                    LinkAttribute::IfName(n) if n == VXLAN_DEVICE => {
                        view.vxlan = Some(VxlanLink::from_message(&l));
                    }
                    LinkAttribute::IfName(n) if n == VXLAN_DEVICE_V6 => {
                        view.vxlan6 = Some(VxlanLink::from_message(&l));
                    }
                    _ => {}
                }
            }
            let mut name = None;
            let mut mtu = 0;
            for a in l.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n),
                    LinkAttribute::Mtu(m) => mtu = m,
                    _ => {}
                }
            }
            if let Some(name) = name {
                let up = l.header.flags.contains(LinkFlags::Up);
                view.links.insert(
                    name,
                    Link {
                        index: l.header.index,
                        mtu,
                        up,
                    },
                );
            }
        }
        let mut addrs = Vec::new();
        sock.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            |m| match m {
                Some(RouteNetlinkMessage::NewAddress(a)) => addrs.push(a),
                Some(_) => {}
                None => addrs.clear(),
            },
        )
        .await?;
        for a in addrs {
            // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on
            // point-to-point links, so prefer LOCAL when there is one.
            let mut local = None;
            let mut address = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address)
                && let Ok(net) = IpNet::new(ip, a.header.prefix_len)
            {
                view.addrs.entry(a.header.index).or_default().push(net);
            }
        }
        Ok(view)
    }

    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links.get(name)
    }

    pub fn addrs_of(&self, index: u32) -> &[IpNet] {
        self.addrs.get(&index).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether `gw` is directly reachable on link `index`: inside the subnet
    /// of one of its addresses, or an IPv6 link-local address.
    /// The VXLAN device of one underlay family.
    pub fn vxlan_of(&self, v6: bool) -> &Option<VxlanLink> {
        if v6 { &self.vxlan6 } else { &self.vxlan }
    }

    pub fn on_link(&self, index: u32, gw: IpAddr) -> bool {
        if let IpAddr::V6(v6) = gw
            && v6.is_unicast_link_local()
        {
            return true;
        }
        self.addrs_of(index)
            .iter()
            .any(|n| n.prefix_len() < n.max_prefix_len() && n.contains(&gw))
    }
}

/// The device of the IPv4 default route in the main table, for when no uplink is configured.
pub(crate) async fn default_route_device(
    sock: &mut RtSocket,
    view: &HostView,
) -> std::io::Result<Option<String>> {
    let mut req = RouteMessage::default();
    req.header.address_family = netlink_packet_route::AddressFamily::Inet;
    req.header.table = 254;
    let mut oif = None;
    sock.dump(RouteNetlinkMessage::GetRoute(req), |m| {
        if let Some(RouteNetlinkMessage::NewRoute(r)) = m
            && oif.is_none()
            && dst_of(&r).is_some_and(|d| d.prefix_len() == 0)
        {
            oif = r.attributes.iter().find_map(|a| {
                if let RouteAttribute::Oif(i) = a {
                    Some(*i)
                } else {
                    None
                }
            });
        }
    })
    .await?;
    Ok(oif.and_then(|i| {
        view.links
            .iter()
            .find(|(_, l)| l.index == i)
            .map(|(n, _)| n.clone())
    }))
}

/// The state of the IPIP device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum IpipStatus {
    /// No route needs IPIP.
    #[default]
    NotNeeded,
    Ready {
        ifindex: u32,
        mtu: u32,
    },
    /// The kernel cannot do IPIP; routes that need it are not installed.
    Unavailable {
        error: String,
    },
}

/// Create or adopt `tunl0`, bring it up, give it `mtu` and `address`.
/// Returns the device's index, or a message that names what is missing.
pub(crate) async fn ensure_tunl0(
    sock: &mut RtSocket,
    view: &mut HostView,
    mtu: u32,
    address: Option<Ipv4Addr>,
) -> Result<u32, String> {
    if view.link(TUNL0).is_none() {
        // Creating an ipip link makes the kernel load the module, which
        // creates the fallback tunl0 first; EEXIST then means "it is there".
        let msg = LinkIpIp::new(TUNL0).build();
        match sock
            .request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .await
        {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(format!(
                    "encapsulation Ipip (also CrossSubnet towards other subnets) needs the kernel module `ipip` \
                     (CONFIG_NET_IPIP), and this kernel cannot create an ipip device: {e}; \
                     load it with `modprobe ipip` or use Encapsulation::None"
                ));
            }
        }
        *view = HostView::read(sock)
            .await
            .map_err(|e| format!("reading links after creating {TUNL0}: {e}"))?;
    }
    let Some(link) = view.link(TUNL0).cloned() else {
        return Err(format!(
            "{TUNL0} was created but does not show up in the link list"
        ));
    };
    if !link.up || link.mtu != mtu {
        let msg = LinkUnspec::new_with_index(link.index).up().mtu(mtu).build();
        sock.request(RouteNetlinkMessage::SetLink(msg), 0)
            .await
            .map_err(|e| format!("setting {TUNL0} up with mtu {mtu}: {e}"))?;
        if let Some(l) = view.links.get_mut(TUNL0) {
            l.up = true;
            l.mtu = mtu;
        }
    }
    if let Some(addr) = address {
        let have = view
            .addrs_of(link.index)
            .iter()
            .any(|n| n.addr() == IpAddr::V4(addr));
        if !have {
            let msg = AddressMessageBuilder::<Ipv4Addr>::new()
                .index(link.index)
                .address(addr, 32)
                .build();
            match sock
                .request(
                    RouteNetlinkMessage::NewAddress(msg),
                    NLM_F_CREATE | NLM_F_EXCL,
                )
                .await
            {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(format!("adding tunnel address {addr}/32 to {TUNL0}: {e}")),
            }
            if let Ok(n) = IpNet::new(IpAddr::V4(addr), 32) {
                view.addrs.entry(link.index).or_default().push(n);
            }
        }
    }
    Ok(link.index)
}

/// One sysctl the reconciler wants, and what it found and did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysctlReport {
    /// Dotted name as `sysctl` prints it (`net.ipv4.conf.tunl0.rp_filter`).
    pub key: String,
    pub value: String,
    /// True when this pass wrote it (it had another value before).
    pub changed: bool,
    pub error: Option<String>,
}

/// Set `/proc/sys/<path>` to `value` unless it already has it.
/// The key sysctl(8) shows for `path` (interface names may hold dots;
/// sysctl(8) writes those as '/').
pub(crate) fn sysctl_key(path: &[&str]) -> String {
    path.iter()
        .map(|p| p.replace('.', "/"))
        .collect::<Vec<_>>()
        .join(".")
}

pub(crate) fn ensure_sysctl(path: &[&str], value: &str) -> SysctlReport {
    let key = sysctl_key(path);
    let file: std::path::PathBuf = std::iter::once("/proc/sys")
        .chain(path.iter().copied())
        .collect();
    let mut report = SysctlReport {
        key,
        value: value.to_string(),
        changed: false,
        error: None,
    };
    match std::fs::read_to_string(&file) {
        Ok(cur) if cur.trim() == value => {}
        Ok(_) => match std::fs::write(&file, value) {
            Ok(()) => report.changed = true,
            Err(e) => report.error = Some(format!("writing {}: {e}", file.display())),
        },
        Err(e) => report.error = Some(format!("reading {}: {e}", file.display())),
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_link_needs_a_covering_subnet_not_just_a_host_address() {
        let mut v = HostView::default();
        v.addrs.insert(
            3,
            vec![
                "192.0.2.1/24".parse().unwrap(),
                "10.9.9.9/32".parse().unwrap(),
            ],
        );
        assert!(v.on_link(3, "192.0.2.77".parse().unwrap()));
        assert!(!v.on_link(3, "198.51.100.2".parse().unwrap()));
        assert!(!v.on_link(3, "10.9.9.9".parse().unwrap()));
        assert!(v.on_link(3, "fe80::1".parse().unwrap()));
        assert!(!v.on_link(4, "192.0.2.77".parse().unwrap()));
    }

    #[test]
    fn sysctl_errors_name_the_file() {
        let r = ensure_sysctl(&["net", "ipv4", "conf", "no-such-dev.0", "proxy_arp"], "1");
        assert_eq!(r.key, "net.ipv4.conf.no-such-dev/0.proxy_arp");
        assert!(
            r.error
                .unwrap()
                .contains("/proc/sys/net/ipv4/conf/no-such-dev.0/proxy_arp")
        );
    }
}
