//! Node IP autodetection, with Calico's methods and spellings
//! (`IP_AUTODETECTION_METHOD`): `first-found`, `interface=REGEX[,REGEX]`,
//! `skip-interface=REGEX[,REGEX]`, `can-reach=DEST`, `cidr=CIDR[,CIDR]`.
//!
//! The result carries the address with its prefix length (CrossSubnet
//! decisions need the node's subnet) and a sentence saying why it was chosen,
//! which the agent shows in its status.
//!
//! Addresses are read with getifaddrs(3): one libc call, no runtime, and it
//! reports the namespace of the calling thread (tests rely on that).

use ipnet::IpNet;
use regex::Regex;
use std::ffi::CStr;
use std::fmt;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::str::FromStr;

/// Interfaces `first-found` (and `skip-interface`) never pick: container
/// bridges and veths, tunnels, loopback, kube-proxy's dummy, and our own pod
/// veths (`stl…`, see `starling_cni_proto::host_veth_name`).
pub const DEFAULT_SKIP: &[&str] = &[
    "^docker.*",
    "^cbr.*",
    "^dummy.*",
    "^virbr.*",
    "^lxcbr.*",
    "^veth.*",
    "^lo$",
    "^cali.*",
    "^tunl.*",
    "^flannel.*",
    "^kube-ipvs.*",
    "^cni.*",
    "^nodelocaldns.*",
    "^stl[0-9a-f]{11}$",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn matches(self, ip: IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// How to pick the node's address.
#[derive(Debug, Clone)]
pub enum Method {
    /// The first valid address on the first interface not in [`DEFAULT_SKIP`].
    FirstFound,
    /// The first valid address on the first interface matching any regex.
    Interface(Vec<Regex>),
    /// As first-found, also skipping interfaces matching any regex.
    SkipInterface(Vec<Regex>),
    /// The local address the kernel would use to reach this destination.
    CanReach(String),
    /// The first valid address inside any of these prefixes.
    Cidr(Vec<IpNet>),
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |r: &[Regex]| r.iter().map(Regex::as_str).collect::<Vec<_>>().join(",");
        match self {
            Method::FirstFound => write!(f, "first-found"),
            Method::Interface(r) => write!(f, "interface={}", join(r)),
            Method::SkipInterface(r) => write!(f, "skip-interface={}", join(r)),
            Method::CanReach(d) => write!(f, "can-reach={d}"),
            Method::Cidr(c) => write!(
                f,
                "cidr={}",
                c.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// Why detection failed; every message names the method and what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DetectError {
    #[error(
        "autodetection method `{0}` is not known: use first-found, interface=REGEX, skip-interface=REGEX, can-reach=DEST or cidr=CIDR"
    )]
    UnknownMethod(String),
    #[error("autodetection method `{method}`: {reason}")]
    BadArgument { method: String, reason: String },
    #[error("cannot list interface addresses: {0}")]
    Interfaces(String),
    #[error("autodetection `{method}` found no {family} address: {detail}")]
    NotFound {
        method: String,
        family: Family,
        detail: String,
    },
}

fn bad(method: &str, reason: impl Into<String>) -> DetectError {
    DetectError::BadArgument {
        method: method.to_string(),
        reason: reason.into(),
    }
}

fn regexes(method: &str, list: &str) -> Result<Vec<Regex>, DetectError> {
    let parts: Vec<&str> = list.split(',').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad(method, "an empty interface regex"));
    }
    parts
        .into_iter()
        .map(|p| Regex::new(p).map_err(|e| bad(method, format!("`{p}` is not a regex: {e}"))))
        .collect()
}

impl FromStr for Method {
    type Err = DetectError;
    fn from_str(s: &str) -> Result<Method, DetectError> {
        let s = s.trim();
        let (name, arg) = match s.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (s, None),
        };
        let need = |arg: Option<&str>, example: &str| match arg {
            Some(a) if !a.is_empty() => Ok(a.to_string()),
            _ => Err(bad(s, format!("needs an argument, e.g. {name}={example}"))),
        };
        match name {
            "first-found" if arg.is_none() => Ok(Method::FirstFound),
            "first-found" => Err(bad(s, "first-found takes no argument")),
            "interface" => Ok(Method::Interface(regexes(s, &need(arg, "eth.*")?)?)),
            "skip-interface" => Ok(Method::SkipInterface(regexes(s, &need(arg, "eth1")?)?)),
            "can-reach" => {
                let dest = need(arg, "192.0.2.1")?;
                if dest.contains(char::is_whitespace) {
                    return Err(bad(s, format!("`{dest}` is not an address or host name")));
                }
                Ok(Method::CanReach(dest))
            }
            "cidr" => {
                let list = need(arg, "192.0.2.0/24")?;
                let cidrs = list
                    .split(',')
                    .map(|c| {
                        c.trim().parse::<IpNet>().map_err(|_| {
                            bad(
                                s,
                                format!("`{}` is not a prefix such as 192.0.2.0/24", c.trim()),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Method::Cidr(cidrs))
            }
            _ => Err(DetectError::UnknownMethod(s.to_string())),
        }
    }
}

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    pub index: u32,
    pub address: IpNet,
    /// The interface is administratively up (IFF_UP).
    pub up: bool,
}

/// The chosen address and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// With the interface's prefix length, e.g. 192.0.2.10/24.
    pub address: IpNet,
    pub interface: String,
    /// E.g. "first-found: eth0 192.0.2.10/24".
    pub reason: String,
}

/// Every address of every interface of this thread's network namespace, in
/// interface index order.
pub fn interface_addresses() -> Result<Vec<InterfaceAddress>, DetectError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(DetectError::Interfaces(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: as above; if_nametoindex only reads the string.
        let index = unsafe { libc::if_nametoindex(ifa.ifa_name) };
        let (Some(ip), Some(mask)) = (sockaddr_ip(ifa.ifa_addr), sockaddr_ip(ifa.ifa_netmask))
        else {
            continue;
        };
        let prefix = match mask {
            IpAddr::V4(m) => u32::from(m).leading_ones(),
            IpAddr::V6(m) => u128::from(m).leading_ones(),
        };
        let Ok(address) = IpNet::new(ip, prefix as u8) else {
            continue;
        };
        out.push(InterfaceAddress {
            interface: name.to_string_lossy().into_owned(),
            index,
            address,
            up: ifa.ifa_flags & libc::IFF_UP as u32 != 0,
        });
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort_by_key(|a| a.index);
    Ok(out)
}

fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: getifaddrs gives sockaddrs of the size their family implies.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::from(sin6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

/// Addresses a node may be reached at: not loopback, link-local,
/// multicast or unspecified.
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_unspecified())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unspecified()
                || v6.is_unicast_link_local())
        }
    }
}

/// Pick the node's address of `family` from this thread's namespace.
pub fn detect(method: &Method, family: Family) -> Result<Detected, DetectError> {
    let addrs = interface_addresses()?;
    if let Method::CanReach(dest) = method {
        return can_reach(dest, family, &addrs);
    }
    select(method, family, &addrs)
}

/// The choice over a given address list (pure; unit-tested).
pub fn select(
    method: &Method,
    family: Family,
    addrs: &[InterfaceAddress],
) -> Result<Detected, DetectError> {
    let default_skip: Vec<Regex> = DEFAULT_SKIP
        .iter()
        .map(|r| Regex::new(r).expect("DEFAULT_SKIP holds valid regexes"))
        .collect();
    let candidates = addrs
        .iter()
        .filter(|a| family.matches(a.address.addr()) && usable(a.address.addr()));
    let hit = |a: &&InterfaceAddress| -> bool {
        let skipped = |list: &[Regex]| list.iter().any(|r| r.is_match(&a.interface));
        match method {
            Method::FirstFound => !skipped(&default_skip),
            Method::SkipInterface(r) => !skipped(&default_skip) && !skipped(r),
            Method::Interface(r) => skipped(r),
            Method::Cidr(c) => c.iter().any(|c| c.contains(&a.address.addr())),
            Method::CanReach(_) => false,
        }
    };
    let found = candidates.clone().find(hit);
    match found {
        Some(a) => Ok(Detected {
            address: a.address,
            interface: a.interface.clone(),
            reason: format!("{method}: {} {}", a.interface, a.address),
        }),
        None => {
            let seen: Vec<String> = candidates
                .map(|a| format!("{} {}", a.interface, a.address))
                .collect();
            Err(DetectError::NotFound {
                method: method.to_string(),
                family,
                detail: if seen.is_empty() {
                    "no interface has a usable address of that family".into()
                } else {
                    format!("none of [{}] qualifies", seen.join(", "))
                },
            })
        }
    }
}

fn can_reach(
    dest: &str,
    family: Family,
    addrs: &[InterfaceAddress],
) -> Result<Detected, DetectError> {
    let method = format!("can-reach={dest}");
    let not_found = |detail: String| DetectError::NotFound {
        method: method.clone(),
        family,
        detail,
    };
    // The port is irrelevant: connecting a UDP socket only asks the kernel
    // for a route and a source address; no packet leaves.
    let target: SocketAddr = match dest.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, 80),
        Err(_) => {
            use std::net::ToSocketAddrs;
            let host = dest.trim_start_matches('[').trim_end_matches(']');
            (host, 80)
                .to_socket_addrs()
                .map_err(|e| bad(&method, format!("cannot resolve `{dest}`: {e}")))?
                .find(|sa| family.matches(sa.ip()))
                .ok_or_else(|| bad(&method, format!("`{dest}` has no {family} address")))?
        }
    };
    if !family.matches(target.ip()) {
        return Err(bad(&method, format!("`{dest}` is not an {family} address")));
    }
    let bind: SocketAddr = match family {
        Family::V4 => "0.0.0.0:0".parse().expect("literal"),
        Family::V6 => "[::]:0".parse().expect("literal"),
    };
    let sock =
        UdpSocket::bind(bind).map_err(|e| not_found(format!("cannot open a socket: {e}")))?;
    sock.connect(target)
        .map_err(|e| not_found(format!("no route to {dest}: {e}")))?;
    let local = sock
        .local_addr()
        .map_err(|e| not_found(format!("no local address: {e}")))?
        .ip();
    let a = addrs
        .iter()
        .find(|a| a.address.addr() == local)
        .ok_or_else(|| {
            not_found(format!(
                "the kernel picked {local}, which no interface holds"
            ))
        })?;
    Ok(Detected {
        address: a.address,
        interface: a.interface.clone(),
        reason: format!("can-reach {dest} via {} ({})", a.interface, a.address),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(interface: &str, index: u32, address: &str) -> InterfaceAddress {
        InterfaceAddress {
            interface: interface.into(),
            index,
            address: address.parse().unwrap(),
            up: true,
        }
    }

    fn host() -> Vec<InterfaceAddress> {
        vec![
            addr("lo", 1, "127.0.0.1/8"),
            addr("docker0", 2, "172.17.0.1/16"),
            addr("eth0", 3, "fe80::1/64"),
            addr("eth0", 3, "192.0.2.10/24"),
            addr("eth1", 4, "198.51.100.7/25"),
            addr("eth1", 4, "2001:db8::7/64"),
            addr("stl0123456789a", 5, "169.254.1.1/32"),
            addr("veth12", 6, "203.0.113.9/24"),
        ]
    }

    fn pick(method: &str, family: Family) -> Result<Detected, DetectError> {
        select(&method.parse().unwrap(), family, &host())
    }

    #[test]
    fn parses_calico_spellings() {
        assert!(matches!("first-found".parse(), Ok(Method::FirstFound)));
        assert!(matches!("interface=eth.*,ens3".parse(), Ok(Method::Interface(r)) if r.len() == 2));
        assert!(matches!(
            "skip-interface=eth0".parse(),
            Ok(Method::SkipInterface(_))
        ));
        assert!(
            matches!("can-reach=192.0.2.1".parse(), Ok(Method::CanReach(d)) if d == "192.0.2.1")
        );
        assert!(
            matches!("cidr=192.0.2.0/24, 10.0.0.0/8".parse(), Ok(Method::Cidr(c)) if c.len() == 2)
        );
        assert_eq!(
            "cidr=10.0.0.0/8".parse::<Method>().unwrap().to_string(),
            "cidr=10.0.0.0/8"
        );
    }

    #[test]
    fn bad_methods_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Method>().unwrap_err().to_string();
        assert!(
            err("firstfound").contains("not known"),
            "{}",
            err("firstfound")
        );
        assert!(err("interface=").contains("needs an argument, e.g. interface=eth.*"));
        assert!(err("interface=eth(").contains("`eth(` is not a regex"));
        assert!(err("interface=eth0,").contains("empty interface regex"));
        assert!(err("cidr=10.0.0/8").contains("`10.0.0/8` is not a prefix"));
        assert!(err("can-reach").contains("needs an argument"));
        assert!(err("first-found=eth0").contains("takes no argument"));
    }

    #[test]
    fn first_found_skips_container_and_loopback_interfaces() {
        let d = pick("first-found", Family::V4).unwrap();
        assert_eq!(d.address.to_string(), "192.0.2.10/24");
        assert_eq!(d.reason, "first-found: eth0 192.0.2.10/24");
        // eth0's only IPv6 address is link-local.
        let d = pick("first-found", Family::V6).unwrap();
        assert_eq!(d.address.to_string(), "2001:db8::7/64");
    }

    #[test]
    fn interface_skip_and_cidr_pick_as_told() {
        assert_eq!(
            pick("interface=eth1", Family::V4).unwrap().interface,
            "eth1"
        );
        assert_eq!(
            pick("interface=veth.*", Family::V4)
                .unwrap()
                .address
                .to_string(),
            "203.0.113.9/24"
        );
        assert_eq!(
            pick("skip-interface=eth0", Family::V4).unwrap().interface,
            "eth1"
        );
        let d = pick("cidr=198.51.100.0/24", Family::V4).unwrap();
        assert_eq!(d.reason, "cidr=198.51.100.0/24: eth1 198.51.100.7/25");
        let e = pick("interface=wlan0", Family::V4).unwrap_err().to_string();
        assert!(
            e.contains("interface=wlan0") && e.contains("eth0 192.0.2.10/24"),
            "{e}"
        );
        let e = pick("skip-interface=eth.*", Family::V4).unwrap_err();
        assert!(matches!(e, DetectError::NotFound { .. }));
    }

    #[test]
    fn loopback_is_readable_here() {
        // Every namespace has lo; it is listed even though never chosen.
        let all = interface_addresses().unwrap();
        assert!(all.iter().any(|a| a.interface == "lo"));
    }
}
