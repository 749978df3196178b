//! How pod traffic to another node's block travels: the agent's one
//! encapsulation type. A pool names it (`ipipMode`, `vxlanMode`: the
//! model's `IPPoolSpec::encapsulation`), the FIB installs next hops by it,
//! and the pod MTU leaves room for its [`overhead`](Encapsulation::overhead).
//!
//! A leaf: it imports nothing of the crate, so the model, the FIB and the
//! node can all use it without depending on each other.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Bytes an IPIP header adds (RFC 2003: one IPv4 header).
pub const IPIP_OVERHEAD: u32 = 20;

/// Bytes VXLAN adds over IPv4 (RFC 7348: outer IPv4 20 + UDP 8 + VXLAN 8 +
/// inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Bytes VXLAN adds over IPv6: the outer header is IPv6's 40, not 20.
pub const VXLAN_V6_OVERHEAD: u32 = 70;

/// The encapsulation of traffic towards another node (Calico's pool modes:
/// `ipipMode`/`vxlanMode` Always or CrossSubnet; Never for both is `None`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Encapsulation {
    /// host-gw: `block via nodeIP dev uplink`; the node must be on-link.
    #[default]
    None,
    /// IP-in-IP (IPv4 only): `block via nodeIP dev tunl0 onlink`.
    Ipip(EncapMode),
    /// VXLAN. The model accepts only `vxlanMode: Never` and the FIB refuses
    /// VXLAN next hops: it is here for the MTU and for what comes next.
    Vxlan(EncapMode),
}

/// Which traffic an encapsulating pool encapsulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EncapMode {
    /// Everything to other nodes.
    Always,
    /// Only traffic to nodes outside the subnet of this node's uplink
    /// address; on-link nodes are reached plain.
    CrossSubnet,
}

impl Encapsulation {
    /// Bytes the encapsulation adds to a packet of a pool of the family
    /// (`v6`: an IPv6 pool, carried over the IPv6 underlay as Calico's
    /// VXLAN does): what the pod MTU must leave free. CrossSubnet
    /// encapsulates some traffic, so it is sized for the worst case.
    pub fn overhead(self, v6: bool) -> u32 {
        match self {
            Encapsulation::None => 0,
            Encapsulation::Ipip(_) => IPIP_OVERHEAD,
            Encapsulation::Vxlan(_) if v6 => VXLAN_V6_OVERHEAD,
            Encapsulation::Vxlan(_) => VXLAN_OVERHEAD,
        }
    }

    /// The name in configs and JSON: `None`, `Ipip`, `CrossSubnet` (IPIP
    /// across subnets, Calico's original meaning), `Vxlan`,
    /// `VxlanCrossSubnet`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encapsulation::None => "None",
            Encapsulation::Ipip(EncapMode::Always) => "Ipip",
            Encapsulation::Ipip(EncapMode::CrossSubnet) => "CrossSubnet",
            Encapsulation::Vxlan(EncapMode::Always) => "Vxlan",
            Encapsulation::Vxlan(EncapMode::CrossSubnet) => "VxlanCrossSubnet",
        }
    }
}

const NAMES: [Encapsulation; 5] = [
    Encapsulation::None,
    Encapsulation::Ipip(EncapMode::Always),
    Encapsulation::Ipip(EncapMode::CrossSubnet),
    Encapsulation::Vxlan(EncapMode::Always),
    Encapsulation::Vxlan(EncapMode::CrossSubnet),
];

impl fmt::Display for Encapsulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Encapsulation {
    type Err = String;

    fn from_str(s: &str) -> Result<Encapsulation, String> {
        NAMES.into_iter().find(|e| e.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = NAMES.iter().map(|e| e.as_str()).collect();
            format!(
                "unknown encapsulation {s:?}; expected one of {}",
                names.join(", ")
            )
        })
    }
}

impl Serialize for Encapsulation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Encapsulation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Encapsulation, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_keep_their_old_spelling() {
        for e in NAMES {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Encapsulation>(&json).unwrap(), e);
        }
        // The FIB's JSON and the agent config wrote these before the types merged.
        assert_eq!(
            serde_json::from_str::<Encapsulation>("\"CrossSubnet\"").unwrap(),
            Encapsulation::Ipip(EncapMode::CrossSubnet)
        );
        assert_eq!(
            serde_json::from_str::<Encapsulation>("\"Vxlan\"").unwrap(),
            Encapsulation::Vxlan(EncapMode::Always)
        );
        let err = "Geneve".parse::<Encapsulation>().unwrap_err();
        assert!(
            err.contains("Geneve") && err.contains("CrossSubnet"),
            "{err}"
        );
    }

    #[test]
    fn overhead_is_the_worst_case_of_the_mode() {
        assert_eq!(Encapsulation::None.overhead(false), 0);
        assert_eq!(
            Encapsulation::Ipip(EncapMode::CrossSubnet).overhead(false),
            20
        );
        assert_eq!(Encapsulation::Vxlan(EncapMode::Always).overhead(false), 50);
        assert_eq!(
            Encapsulation::Vxlan(EncapMode::CrossSubnet).overhead(true),
            70
        );
    }
}
