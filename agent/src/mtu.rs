//! The pod MTU. Calico's rule: the smallest MTU among the interfaces that
//! are up and carry the node's addresses, less the encapsulation's
//! overhead; `mtu:` (fixed) or `uplink:` (that device's MTU) in the agent's
//! config override it. It is worked out again for every batch of CNI ADDs,
//! so a changed uplink MTU reaches the next pod; existing pods keep theirs.
//!
//! Which interfaces carry the node's addresses is found by listing every
//! address of the node (getifaddrs: on a node with a hundred pods, a dump
//! of a few hundred links and addresses under the kernel's RTNL lock, which
//! the plugin's own link changes wait for). A batch of ADDs reuses the
//! interfaces found within [`REDETECT`] and reads only their state and MTU
//! (two small sysfs files each); it lists again when the rule changed,
//! when one of them is gone or down, or once [`REDETECT`] passed.
//!
//! Over the leaves: it reads interfaces with [`crate::autodetect`].

use crate::autodetect::{self, InterfaceAddress};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How long the interfaces found carrying the node's addresses are reused
/// before every address is listed again (an address moved to another
/// interface is seen within this time; a changed MTU by the next batch).
pub const REDETECT: Duration = Duration::from_secs(10);

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
            } => detected(addresses, *overhead, &carrying(addresses)).0,
        }
    }
}

/// The names of the up interfaces carrying one of `node`'s addresses, read
/// from this thread's network namespace.
fn carrying(node: &[IpAddr]) -> Vec<String> {
    carriers(&autodetect::interface_addresses().unwrap_or_default(), node)
}

/// The names of the interfaces of `ifaces` that are up and carry one of
/// `node`'s addresses, sorted, once each. Pure.
pub fn carriers(ifaces: &[InterfaceAddress], node: &[IpAddr]) -> Vec<String> {
    let mut names: Vec<String> = ifaces
        .iter()
        .filter(|i| i.up && node.contains(&i.address.addr()))
        .map(|i| i.interface.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The MTU of a detecting rule given the interfaces carrying the node's
/// addresses, and whether every one of them could be read.
fn detected(addresses: &[IpAddr], overhead: u32, devices: &[String]) -> (Found, bool) {
    let mut best: Option<(&str, u32)> = None;
    let mut all_read = true;
    for d in devices {
        match link_mtu(d) {
            Ok(m) if best.is_none_or(|(_, b)| m < b) => best = Some((d, m)),
            Ok(_) => {}
            Err(_) => all_read = false,
        }
    }
    let found = match best {
        Some((dev, m)) => Found {
            mtu: m.saturating_sub(overhead),
            reason: format!("smallest MTU of the node's interfaces: {dev} ({m}) less {overhead}"),
        },
        None => Found {
            mtu: FALLBACK.saturating_sub(overhead),
            reason: format!(
                "no up interface carries the node's addresses {addresses:?}; {FALLBACK} less {overhead}"
            ),
        },
    };
    (found, all_read)
}

/// Whether `device` is up, from sysfs (`flags`, IFF_UP).
fn link_up(device: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{device}/flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|f| f & libc::IFF_UP as u32 != 0)
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
pub struct PodMtu(Arc<RwLock<MtuRule>>, Arc<Mutex<Option<Carrying>>>);

/// The interfaces a detecting rule found carrying the node's addresses,
/// and when.
#[derive(Debug)]
struct Carrying {
    devices: Vec<String>,
    at: Instant,
}

impl PodMtu {
    pub fn new(rule: MtuRule) -> PodMtu {
        PodMtu(Arc::new(RwLock::new(rule)), Arc::default())
    }

    pub fn rule(&self) -> MtuRule {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The MTU now. A detecting rule reuses the interfaces it found within
    /// [`REDETECT`] while they are all there and up (module docs).
    pub fn current(&self) -> Found {
        let MtuRule::Detect {
            addresses,
            overhead,
        } = self.rule()
        else {
            return self.rule().current();
        };
        let mut cache = self.1.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref()
            && c.at.elapsed() < REDETECT
            && !c.devices.is_empty()
            && c.devices.iter().all(|d| link_up(d))
        {
            let (found, all_read) = detected(&addresses, overhead, &c.devices);
            if all_read {
                return found;
            }
        }
        let devices = carrying(&addresses);
        let (found, _) = detected(&addresses, overhead, &devices);
        *cache = Some(Carrying {
            devices,
            at: Instant::now(),
        });
        found
    }

    /// New addresses or overhead for a detecting or uplink rule; a fixed
    /// MTU stays.
    pub fn update(&self, addresses: Vec<IpAddr>, new_overhead: u32) {
        *self.1.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
    fn the_up_interfaces_carrying_the_node_addresses() {
        let ifaces = [
            iface("eth0", "192.0.2.10/24", true),
            iface("eth1", "2001:db8::10/64", true),
            iface("eth2", "198.51.100.1/24", true),
            iface("eth3", "192.0.2.10/24", false),
            iface("eth0", "192.0.2.10/24", true),
        ];
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        assert_eq!(carriers(&ifaces, &[v4]), ["eth0"]);
        assert_eq!(carriers(&ifaces, &[v4, v6]), ["eth0", "eth1"]);
        assert!(carriers(&ifaces, &[]).is_empty());
    }

    #[test]
    fn the_smallest_mtu_of_the_carriers_and_a_missing_one_is_noticed() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo_mtu = link_mtu("lo").unwrap();
        let (f, all) = detected(&[lo], 0, &["lo".into()]);
        assert_eq!((f.mtu, all), (lo_mtu, true), "{}", f.reason);
        let (f, all) = detected(&[lo], 0, &["lo".into(), "no-such-dev".into()]);
        assert_eq!((f.mtu, all), (lo_mtu, false), "{}", f.reason);
        let (f, _) = detected(&[lo], 50, &[]);
        assert_eq!(f.mtu, FALLBACK - 50);
    }

    #[test]
    fn a_batch_reuses_the_interfaces_found_and_an_update_forgets_them() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let p = PodMtu::new(MtuRule::Detect {
            addresses: vec![lo],
            overhead: 20,
        });
        let first = p.current();
        assert_eq!(first.mtu, link_mtu("lo").unwrap() - 20);
        let found = |p: &PodMtu| p.1.lock().unwrap().as_ref().map(|c| c.devices.clone());
        assert_eq!(found(&p), Some(vec!["lo".to_string()]));
        assert_eq!(p.current(), first);
        p.update(vec![lo], 30);
        assert_eq!(found(&p), None);
        assert_eq!(p.current().mtu, first.mtu - 10);
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
