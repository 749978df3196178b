//! Our own model of a path's attributes: what the RIB compares and stores.
//! The wire module converts between this and netgauze's message types, so the
//! rest of the speaker never sees a wire detail (2- versus 4-octet AS paths,
//! MP_REACH versus NEXT_HOP).

use serde::Serialize;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Address families the speaker carries.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(net: &ipnet::IpNet) -> Family {
        match net {
            ipnet::IpNet::V4(_) => Family::Ipv4,
            ipnet::IpNet::V6(_) => Family::Ipv6,
        }
    }

    pub fn of_addr(addr: &IpAddr) -> Family {
        if addr.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4-unicast",
            Family::Ipv6 => "ipv6-unicast",
        })
    }
}

/// ORIGIN (RFC 4271 §5.1.1); the order is the preference order of §9.1.2.2 c.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    #[default]
    Igp,
    Egp,
    Incomplete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentKind {
    Set,
    Sequence,
}

/// One AS_PATH segment, always with 4-octet AS numbers (RFC 6793).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct AsSegment {
    pub kind: SegmentKind,
    pub asns: Vec<u32>,
}

/// An unrecognised optional attribute, kept to pass on (RFC 4271 §5).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct UnknownAttr {
    pub code: u8,
    pub transitive: bool,
    pub partial: bool,
    pub value: Vec<u8>,
}

/// The attributes of one path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize)]
pub struct PathAttrs {
    pub origin: Origin,
    pub as_path: Vec<AsSegment>,
    pub next_hop: Option<IpAddr>,
    pub next_hop_local: Option<Ipv6Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub aggregator: Option<(u32, Ipv4Addr)>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<(u32, u32, u32)>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    pub unknown: Vec<UnknownAttr>,
}

impl PathAttrs {
    /// AS_PATH length for the decision process: a set counts as one (RFC 4271 §9.1.2.2 a).
    pub fn as_path_len(&self) -> usize {
        self.as_path
            .iter()
            .map(|s| match s.kind {
                SegmentKind::Sequence => s.asns.len(),
                SegmentKind::Set => 1,
            })
            .sum()
    }

    /// The AS numbers in path order, flattened (sets included).
    pub fn as_path_flat(&self) -> Vec<u32> {
        self.as_path
            .iter()
            .flat_map(|s| s.asns.iter().copied())
            .collect()
    }

    /// The neighbouring AS, for MED comparison: the first AS of a leading sequence.
    pub fn neighbor_as(&self) -> Option<u32> {
        match self.as_path.first() {
            Some(AsSegment {
                kind: SegmentKind::Sequence,
                asns,
            }) => asns.first().copied(),
            _ => None,
        }
    }

    pub fn contains_as(&self, asn: u32) -> bool {
        self.as_path.iter().any(|s| s.asns.contains(&asn))
    }

    /// How many times `asn` appears in the AS_PATH (allowas-in counts them).
    pub fn count_as(&self, asn: u32) -> usize {
        self.as_path
            .iter()
            .map(|s| s.asns.iter().filter(|a| **a == asn).count())
            .sum()
    }

    /// Prepend `asn` as eBGP export requires (RFC 4271 §5.1.2).
    pub fn prepend(&mut self, asn: u32) {
        match self.as_path.first_mut() {
            Some(seg) if seg.kind == SegmentKind::Sequence && seg.asns.len() < 255 => {
                seg.asns.insert(0, asn)
            }
            _ => self.as_path.insert(
                0,
                AsSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![asn],
                },
            ),
        }
    }
}
