//! The pod MTU. Calico's rule: the smallest MTU among the interfaces that
//! are up and carry the node's addresses, less the encapsulation's
//! overhead; `mtu:` (fixed) or `uplink:` (that device's MTU) in the agent's
//! config override it. It is worked out again for every batch of CNI ADDs,
//! so a changed uplink MTU reaches the next pod; existing pods keep theirs.
//!
//! Over the leaves: it reads interfaces with [`crate::autodetect`].

use crate::autodetect::{self, InterfaceAddress};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

/// The MTU when nothing can be read (no address of the node on an up
/// interface): Ethernet's, less the overhead.
pub const FALLBACK: u32 = 1500;

/// How this node's pod MTU is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MtuRule {
    /// `mtu:` in the config, as it is.
    Fixed(u32),
    /// `uplink:` in the config: that device's MTU, less `overhead`.
    Uplink { device: String, overhead: u32 },
    /// The smallest MTU among the up interfaces carrying `addresses`, less
    /// `overhead`.
    Detect {
        addresses: Vec<IpAddr>,
        overhead: u32,
    },
}

/// The MTU and the sentence saying where it came from (for logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub mtu: u32,
    pub reason: String,
}

impl MtuRule {
    /// The MTU now, read from this thread's network namespace.
    pub fn current(&self) -> Found {
        match self {
            MtuRule::Fixed(m) => Found {
                mtu: *m,
                reason: "mtu in the agent's config".into(),
            },
            MtuRule::Uplink { device, overhead } => match link_mtu(device) {
                Ok(m) => Found {
                    mtu: m.saturating_sub(*overhead),
                    reason: format!("uplink {device} ({m}) less {overhead}"),
                },
                Err(e) => Found {
                    mtu: FALLBACK.saturating_sub(*overhead),
                    reason: format!("uplink {device}: {e}; {FALLBACK} less {overhead}"),
                },
            },
            MtuRule::Detect {
                addresses,
                overhead,
            } => {
                let ifaces = autodetect::interface_addresses().unwrap_or_default();
                match smallest(&ifaces, addresses, |d| link_mtu(d).ok()) {
                    Some((dev, m)) => Found {
                        mtu: m.saturating_sub(*overhead),
                        reason: format!(
                            "smallest MTU of the node's interfaces: {dev} ({m}) less {overhead}"
                        ),
                    },
                    None => Found {
                        mtu: FALLBACK.saturating_sub(*overhead),
                        reason: format!(
                            "no up interface carries the node's addresses {addresses:?}; {FALLBACK} less {overhead}"
                        ),
                    },
                }
            }
        }
    }
}

/// The smallest MTU, and its interface, among the interfaces that are up
/// and carry one of `node`'s addresses. Pure: `mtu_of` reads a device's MTU.
pub fn smallest(
    ifaces: &[InterfaceAddress],
    node: &[IpAddr],
    mtu_of: impl Fn(&str) -> Option<u32>,
) -> Option<(String, u32)> {
    let mut best: Option<(String, u32)> = None;
    for i in ifaces
        .iter()
        .filter(|i| i.up && node.contains(&i.address.addr()))
    {
        if let Some(m) = mtu_of(&i.interface)
            && best.as_ref().is_none_or(|(_, b)| m < *b)
        {
            best = Some((i.interface.clone(), m));
        }
    }
    best
}

/// A device's MTU from sysfs (`ip netns exec` mounts the namespace's own).
pub fn link_mtu(device: &str) -> Result<u32, String> {
    let p = format!("/sys/class/net/{device}/mtu");
    std::fs::read_to_string(&p)
        .map_err(|e| format!("cannot read {p}: {e}"))?
        .trim()
        .parse::<u32>()
        .map_err(|e| format!("{p} is not a number: {e}"))
}

/// The rule shared by the node (which updates it when the model's
/// addresses or pools change) and IPAM (which applies it for every batch
/// of ADDs).
#[derive(Clone, Debug)]
pub struct PodMtu(Arc<RwLock<MtuRule>>);

impl PodMtu {
    pub fn new(rule: MtuRule) -> PodMtu {
        PodMtu(Arc::new(RwLock::new(rule)))
    }

    pub fn rule(&self) -> MtuRule {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn current(&self) -> Found {
        self.rule().current()
    }

    /// New addresses or overhead for a detecting or uplink rule; a fixed
    /// MTU stays.
    pub fn update(&self, addresses: Vec<IpAddr>, new_overhead: u32) {
        let mut r = self.0.write().unwrap_or_else(|e| e.into_inner());
        match &mut *r {
            MtuRule::Fixed(_) => {}
            MtuRule::Uplink { overhead, .. } => *overhead = new_overhead,
            MtuRule::Detect {
                addresses: a,
                overhead,
            } => {
                *a = addresses;
                *overhead = new_overhead;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, addr: &str, up: bool) -> InterfaceAddress {
        InterfaceAddress {
            interface: name.into(),
            index: 1,
            address: addr.parse().unwrap(),
            up,
        }
    }

    #[test]
    fn the_smallest_mtu_of_the_up_interfaces_carrying_the_node_addresses() {
        let ifaces = [
            iface("eth0", "192.0.2.10/24", true),
            iface("eth1", "2001:db8::10/64", true),
            iface("eth2", "198.51.100.1/24", true),
            iface("eth3", "192.0.2.10/24", false),
        ];
        let mtu = |d: &str| match d {
            "eth0" => Some(9000),
            "eth1" => Some(1460),
            "eth2" => Some(1280),
            _ => Some(576),
        };
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        assert_eq!(smallest(&ifaces, &[v4], mtu), Some(("eth0".into(), 9000)));
        assert_eq!(
            smallest(&ifaces, &[v4, v6], mtu),
            Some(("eth1".into(), 1460))
        );
        assert_eq!(smallest(&ifaces, &[], mtu), None);
    }

    #[test]
    fn loopback_is_read_and_overheads_subtract() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let Found { mtu, reason } = MtuRule::Detect {
            addresses: vec![lo],
            overhead: 20,
        }
        .current();
        let lo_mtu = link_mtu("lo").unwrap();
        assert_eq!(mtu, lo_mtu - 20, "{reason}");
        let f = MtuRule::Uplink {
            device: "no-such-dev".into(),
            overhead: 50,
        }
        .current();
        assert_eq!(f.mtu, 1450);
        assert!(f.reason.contains("no-such-dev"), "{}", f.reason);
    }

    #[test]
    fn a_fixed_mtu_ignores_updates() {
        let p = PodMtu::new(MtuRule::Fixed(1400));
        p.update(vec![], 50);
        assert_eq!(p.current().mtu, 1400);
        let p = PodMtu::new(MtuRule::Detect {
            addresses: vec![],
            overhead: 0,
        });
        p.update(vec!["127.0.0.1".parse().unwrap()], 70);
        assert!(matches!(p.rule(), MtuRule::Detect { overhead: 70, .. }));
    }
}
