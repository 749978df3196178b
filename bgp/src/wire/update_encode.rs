//! UPDATE, sent (RFC 4271 §4.3): our `PathAttrs` as path attributes, one
//! step per attribute in a fixed order, and announcements and withdrawals
//! packed into as few messages as fit the session's message size (RFC
//! 4271 §4.1, RFC 8654). Toward a 2-octet peer, AS numbers above 65535
//! become AS_TRANS with AS4_PATH and AS4_AGGREGATOR beside (RFC 6793 §4.2.2).
//!
//! ```text
//!  0                   1
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Attr. Flags  |Attr. Type Code|   then the length (1 or 2 octets)
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+   and the value
//! ```

use super::framing::encode;
use super::iana::{AS4_AGGREGATOR, as2};
use crate::attrs::{Family, Origin, PathAttrs, SegmentKind};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::community::{Community, LargeCommunity};
use netgauze_bgp_pkt::nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress};
use netgauze_bgp_pkt::path_attribute::{
    self as pa, As2PathSegment, As4Aggregator, As4Path, As4PathSegment, AsPath, AsPathSegmentType,
    AtomicAggregate, ClusterId, ClusterList, Communities, LargeCommunities, LocalPreference,
    MpReach, MpUnreach, MultiExitDiscriminator, NextHop, Originator, PathAttribute,
    PathAttributeValue, UnknownAttribute,
};
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_parse_utils::WritablePdu;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The Optional, Transitive and Partial flags of an attribute (RFC 4271 §4.3).
#[derive(Clone, Copy)]
struct Flags {
    optional: bool,
    transitive: bool,
    partial: bool,
}

/// ORIGIN, AS_PATH, NEXT_HOP, LOCAL_PREF, ATOMIC_AGGREGATE.
const WELL_KNOWN: Flags = Flags {
    optional: false,
    transitive: true,
    partial: false,
};
/// MULTI_EXIT_DISC, ORIGINATOR_ID, CLUSTER_LIST, MP_REACH_NLRI, MP_UNREACH_NLRI.
const OPTIONAL: Flags = Flags {
    optional: true,
    transitive: false,
    partial: false,
};
/// AGGREGATOR, COMMUNITIES, AS4_PATH, AS4_AGGREGATOR, LARGE_COMMUNITY.
const OPTIONAL_TRANSITIVE: Flags = Flags {
    optional: true,
    transitive: true,
    partial: false,
};
/// An unrecognised optional transitive attribute we pass on (RFC 4271 §5).
const PASSED_ON: Flags = Flags {
    optional: true,
    transitive: true,
    partial: true,
};

fn attr(flags: Flags, value: PathAttributeValue) -> Option<PathAttribute> {
    // Flags we choose always match the attribute's definition, so this only
    // fails on a programming error; drop the attribute rather than panic.
    // Variable-length attributes may exceed 255 octets (a packed MP_REACH_NLRI
    // always can); the Extended Length flag is always legal for them.
    let extended = matches!(
        value,
        PathAttributeValue::MpReach(_)
            | PathAttributeValue::MpUnreach(_)
            | PathAttributeValue::AsPath(_)
            | PathAttributeValue::As4Path(_)
            | PathAttributeValue::Communities(_)
            | PathAttributeValue::LargeCommunities(_)
            | PathAttributeValue::ClusterList(_)
            | PathAttributeValue::UnknownAttribute(_)
    );
    let Flags {
        optional,
        transitive,
        partial,
    } = flags;
    PathAttribute::from(optional, transitive, partial, extended, value).ok()
}

/// The path attributes of an UPDATE we send, in type-code order but for
/// AS4_AGGREGATOR, which follows AGGREGATOR (RFC 4271 §5 leaves the order
/// free); the callers add NEXT_HOP or MP_REACH_NLRI last.
fn encode_attrs(a: &PathAttrs, four_octet: bool, ibgp: bool) -> Vec<PathAttribute> {
    let mut out = Vec::with_capacity(8);
    out.extend(origin(a.origin));
    out.extend(as_path(a, four_octet));
    out.extend(a.med.and_then(med));
    if ibgp {
        out.extend(local_pref(a.local_pref));
    }
    if a.atomic_aggregate {
        out.extend(attr(
            WELL_KNOWN,
            PathAttributeValue::AtomicAggregate(AtomicAggregate),
        ));
    }
    if let Some((asn, id)) = a.aggregator {
        out.extend(aggregator(asn, id, four_octet));
    }
    out.extend(communities(&a.communities));
    if ibgp {
        out.extend(reflection(a));
    }
    if !four_octet {
        out.extend(as4_path(a));
    }
    out.extend(large_communities(&a.large_communities));
    out.extend(passed_on(a));
    out
}

/// ORIGIN (RFC 4271 §5.1.1).
fn origin(o: Origin) -> Option<PathAttribute> {
    let o = match o {
        Origin::Igp => pa::Origin::IGP,
        Origin::Egp => pa::Origin::EGP,
        Origin::Incomplete => pa::Origin::Incomplete,
    };
    attr(WELL_KNOWN, PathAttributeValue::Origin(o))
}

/// AS_PATH (RFC 4271 §5.1.2): 4-octet numbers when the peer speaks them,
/// else 2-octet ones with AS_TRANS for those that do not fit (RFC 6793).
fn as_path(a: &PathAttrs, four_octet: bool) -> Option<PathAttribute> {
    let path = if four_octet {
        AsPath::As4PathSegments(
            a.as_path
                .iter()
                .map(|s| As4PathSegment::new(seg_type(s.kind), s.asns.clone()))
                .collect(),
        )
    } else {
        AsPath::As2PathSegments(
            a.as_path
                .iter()
                .map(|s| {
                    let asns: Vec<u16> = s.asns.iter().map(|x| as2(*x)).collect();
                    As2PathSegment::new(seg_type(s.kind), asns)
                })
                .collect(),
        )
    };
    attr(WELL_KNOWN, PathAttributeValue::AsPath(path))
}

/// MULTI_EXIT_DISC (RFC 4271 §5.1.4).
fn med(m: u32) -> Option<PathAttribute> {
    attr(
        OPTIONAL,
        PathAttributeValue::MultiExitDiscriminator(MultiExitDiscriminator::new(m)),
    )
}

/// LOCAL_PREF (RFC 4271 §5.1.5): to internal peers only, 100 by default.
fn local_pref(lp: Option<u32>) -> Option<PathAttribute> {
    attr(
        WELL_KNOWN,
        PathAttributeValue::LocalPreference(LocalPreference::new(lp.unwrap_or(100))),
    )
}

/// AGGREGATOR (RFC 4271 §5.1.7), and AS4_AGGREGATOR beside a 2-octet one
/// that had to say AS_TRANS (RFC 6793 §4.2.2).
fn aggregator(asn: u32, id: Ipv4Addr, four_octet: bool) -> Vec<PathAttribute> {
    if four_octet {
        let ag = pa::Aggregator::As4Aggregator(As4Aggregator::new(asn, id));
        return attr(OPTIONAL_TRANSITIVE, PathAttributeValue::Aggregator(ag))
            .into_iter()
            .collect();
    }
    let ag = pa::Aggregator::As2Aggregator(pa::As2Aggregator::new(as2(asn), id));
    let mut out: Vec<PathAttribute> = attr(OPTIONAL_TRANSITIVE, PathAttributeValue::Aggregator(ag))
        .into_iter()
        .collect();
    if asn > u16::MAX as u32 {
        let mut v = asn.to_be_bytes().to_vec();
        v.extend_from_slice(&id.octets());
        out.extend(attr(
            OPTIONAL_TRANSITIVE,
            PathAttributeValue::UnknownAttribute(UnknownAttribute::new(AS4_AGGREGATOR, v)),
        ));
    }
    out
}

/// COMMUNITIES (RFC 1997), when there are any.
fn communities(c: &[u32]) -> Option<PathAttribute> {
    if c.is_empty() {
        return None;
    }
    let c: Vec<Community> = c.iter().map(|c| Community::new(*c)).collect();
    attr(
        OPTIONAL_TRANSITIVE,
        PathAttributeValue::Communities(Communities::new(c)),
    )
}

/// ORIGINATOR_ID and CLUSTER_LIST (RFC 4456 §8), to internal peers only.
fn reflection(a: &PathAttrs) -> Vec<PathAttribute> {
    let mut out = Vec::new();
    if let Some(o) = a.originator_id {
        out.extend(attr(
            OPTIONAL,
            PathAttributeValue::Originator(Originator::new(o)),
        ));
    }
    if !a.cluster_list.is_empty() {
        let ids: Vec<ClusterId> = a.cluster_list.iter().map(|c| ClusterId::new(*c)).collect();
        out.extend(attr(
            OPTIONAL,
            PathAttributeValue::ClusterList(ClusterList::new(ids)),
        ));
    }
    out
}

/// AS4_PATH (RFC 6793 §4.2.2), to a 2-octet peer when the path has an AS
/// number that AS_PATH could only give as AS_TRANS.
fn as4_path(a: &PathAttrs) -> Option<PathAttribute> {
    let needs = a
        .as_path
        .iter()
        .any(|s| s.asns.iter().any(|x| *x > u16::MAX as u32));
    if !needs {
        return None;
    }
    let segs: Vec<As4PathSegment> = a
        .as_path
        .iter()
        .map(|s| As4PathSegment::new(seg_type(s.kind), s.asns.clone()))
        .collect();
    attr(
        OPTIONAL_TRANSITIVE,
        PathAttributeValue::As4Path(As4Path::new(segs)),
    )
}

/// LARGE_COMMUNITY (RFC 8092), when there are any.
fn large_communities(c: &[(u32, u32, u32)]) -> Option<PathAttribute> {
    if c.is_empty() {
        return None;
    }
    let c: Vec<LargeCommunity> = c
        .iter()
        .map(|(g, l1, l2)| LargeCommunity::new(*g, *l1, *l2))
        .collect();
    attr(
        OPTIONAL_TRANSITIVE,
        PathAttributeValue::LargeCommunities(LargeCommunities::new(c)),
    )
}

/// RFC 4271 §5: an unrecognised optional transitive attribute is passed on
/// with the Partial bit set.
fn passed_on(a: &PathAttrs) -> Vec<PathAttribute> {
    a.unknown
        .iter()
        .filter(|x| x.transitive)
        .filter_map(|x| {
            attr(
                PASSED_ON,
                PathAttributeValue::UnknownAttribute(UnknownAttribute::new(
                    x.code,
                    x.value.clone(),
                )),
            )
        })
        .collect()
}

fn seg_type(k: SegmentKind) -> AsPathSegmentType {
    match k {
        SegmentKind::Set => AsPathSegmentType::AsSet,
        SegmentKind::Sequence => AsPathSegmentType::AsSequence,
    }
}

/// Encode announcements of `prefixes` (all of `family`) sharing `attrs`,
/// packed into as few UPDATEs as fit in `max_len` octets.
pub fn encode_announce(
    family: Family,
    prefixes: &[IpNet],
    attrs: &PathAttrs,
    four_octet: bool,
    ibgp: bool,
    max_len: usize,
) -> Vec<Vec<u8>> {
    let base = encode_attrs(attrs, four_octet, ibgp);
    match family {
        Family::Ipv4 => announce_ipv4(base, prefixes, attrs.next_hop, max_len),
        Family::Ipv6 => announce_ipv6(base, prefixes, attrs, max_len),
    }
}

/// IPv4: NEXT_HOP and the prefixes in the NLRI field (RFC 4271 §4.3); a
/// prefix takes at most 5 octets.
fn announce_ipv4(
    mut attrs: Vec<PathAttribute>,
    prefixes: &[IpNet],
    next_hop: Option<IpAddr>,
    max_len: usize,
) -> Vec<Vec<u8>> {
    let nh = match next_hop {
        Some(IpAddr::V4(a)) => a,
        _ => Ipv4Addr::UNSPECIFIED,
    };
    attrs.extend(attr(
        WELL_KNOWN,
        PathAttributeValue::NextHop(NextHop::new(nh)),
    ));
    let empty = BgpMessage::Update(BgpUpdateMessage::new(vec![], attrs.clone(), vec![]));
    let room = max_len.saturating_sub(empty.len()).max(5);
    prefixes
        .chunks(room / 5)
        .map(|chunk| {
            let nlri: Vec<Ipv4UnicastAddress> = chunk.iter().filter_map(v4_nlri).collect();
            encode(&BgpMessage::Update(BgpUpdateMessage::new(
                vec![],
                attrs.clone(),
                nlri,
            )))
        })
        .collect()
}

/// IPv6: MP_REACH_NLRI with the global and link-local next hops (RFC 4760
/// §3, RFC 2545 §3); a prefix takes at most 17 octets.
fn announce_ipv6(
    base: Vec<PathAttribute>,
    prefixes: &[IpNet],
    attrs: &PathAttrs,
    max_len: usize,
) -> Vec<Vec<u8>> {
    let nh = match attrs.next_hop {
        Some(IpAddr::V6(a)) => a,
        Some(IpAddr::V4(a)) => a.to_ipv6_mapped(),
        None => Ipv6Addr::UNSPECIFIED,
    };
    let mp = |nlri: Vec<Ipv6UnicastAddress>| {
        let mut pa = base.clone();
        pa.extend(attr(
            OPTIONAL,
            PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
                next_hop_global: nh,
                next_hop_local: attrs.next_hop_local,
                nlri: nlri.into(),
            }),
        ));
        BgpMessage::Update(BgpUpdateMessage::new(vec![], pa, vec![]))
    };
    let room = max_len.saturating_sub(mp(vec![]).len()).max(17);
    prefixes
        .chunks(room / 17)
        .map(|chunk| encode(&mp(chunk.iter().filter_map(v6_nlri).collect())))
        .collect()
}

/// Encode withdrawals of `prefixes` (all of `family`).
pub fn encode_withdraw(family: Family, prefixes: &[IpNet], max_len: usize) -> Vec<Vec<u8>> {
    match family {
        Family::Ipv4 => prefixes
            .chunks((max_len - 23) / 5)
            .map(|chunk| {
                let w: Vec<Ipv4UnicastAddress> = chunk.iter().filter_map(v4_nlri).collect();
                encode(&BgpMessage::Update(BgpUpdateMessage::new(
                    w,
                    vec![],
                    vec![],
                )))
            })
            .collect(),
        Family::Ipv6 => prefixes
            .chunks((max_len - 40) / 17)
            .map(|chunk| {
                let nlri: Vec<Ipv6UnicastAddress> = chunk.iter().filter_map(v6_nlri).collect();
                ipv6_unreach(nlri)
            })
            .collect(),
    }
}

/// An UPDATE with only MP_UNREACH_NLRI for IPv6 (RFC 4760 §4).
fn ipv6_unreach(nlri: Vec<Ipv6UnicastAddress>) -> Vec<u8> {
    let pa: Vec<PathAttribute> = attr(
        OPTIONAL,
        PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast { nlri: nlri.into() }),
    )
    .into_iter()
    .collect();
    encode(&BgpMessage::Update(BgpUpdateMessage::new(
        vec![],
        pa,
        vec![],
    )))
}

/// The End-of-RIB marker of a family (RFC 4724 §2): an empty UPDATE for
/// IPv4, an empty MP_UNREACH_NLRI for the others.
pub fn encode_end_of_rib(family: Family) -> Vec<u8> {
    match family {
        Family::Ipv4 => encode(&BgpMessage::Update(BgpUpdateMessage::new(
            vec![],
            vec![],
            vec![],
        ))),
        Family::Ipv6 => ipv6_unreach(vec![]),
    }
}

fn v4_nlri(p: &IpNet) -> Option<Ipv4UnicastAddress> {
    match p {
        IpNet::V4(n) => Ipv4Unicast::from_net(Ipv4Net::new(n.network(), n.prefix_len()).ok()?)
            .ok()
            .map(Ipv4UnicastAddress::new_no_path_id),
        _ => None,
    }
}

fn v6_nlri(p: &IpNet) -> Option<Ipv6UnicastAddress> {
    match p {
        IpNet::V6(n) => Ipv6Unicast::from_net(Ipv6Net::new(n.network(), n.prefix_len()).ok()?)
            .ok()
            .map(|n| Ipv6UnicastAddress::new(None, n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::{AsSegment, UnknownAttr};
    use crate::wire::framing::{
        MAX_EXTENDED_MESSAGE_LEN, MAX_MESSAGE_LEN, decode, frame, parsing_context,
    };
    use crate::wire::iana::AS_TRANS;
    use crate::wire::notification::MessageHeaderError;
    use crate::wire::update_decode::{Update, decode_update};

    fn attrs() -> PathAttrs {
        PathAttrs {
            origin: Origin::Igp,
            as_path: vec![AsSegment {
                kind: SegmentKind::Sequence,
                asns: vec![4_200_000_001, 65001],
            }],
            next_hop: Some("192.0.2.1".parse().unwrap()),
            med: Some(5),
            communities: vec![0xfde8_0001],
            large_communities: vec![(4_200_000_001, 1, 2)],
            aggregator: Some((4_200_000_001, "192.0.2.9".parse().unwrap())),
            atomic_aggregate: true,
            unknown: vec![UnknownAttr {
                code: 99,
                transitive: true,
                partial: false,
                value: vec![1, 2, 3],
            }],
            ..Default::default()
        }
    }

    fn roundtrip(bytes: &[u8], asn4: bool) -> Update {
        let len = frame(bytes, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(len, bytes.len());
        let mut ctx = parsing_context(asn4);
        let (m, errs) = decode(bytes, &mut ctx).unwrap();
        match m {
            BgpMessage::Update(u) => decode_update(&u, &errs, asn4, true).unwrap(),
            other => panic!("not an update: {other:?}"),
        }
    }

    #[test]
    fn ipv4_update_roundtrips_with_4_octet_as() {
        let p: Vec<IpNet> = vec![
            "10.1.0.0/24".parse().unwrap(),
            "10.2.0.0/26".parse().unwrap(),
        ];
        let msgs = encode_announce(Family::Ipv4, &p, &attrs(), true, false, MAX_MESSAGE_LEN);
        assert_eq!(msgs.len(), 1);
        let u = roundtrip(&msgs[0], true);
        assert_eq!(u.announced, p);
        assert_eq!(u.attrs.as_path, attrs().as_path);
        assert_eq!(u.attrs.aggregator, attrs().aggregator);
        assert_eq!(u.attrs.large_communities, attrs().large_communities);
        // The unknown transitive attribute went out with the Partial bit set.
        assert!(u.attrs.unknown[0].partial);
    }

    #[test]
    fn two_octet_peer_gets_as_trans_and_as4_path() {
        let p: Vec<IpNet> = vec!["10.1.0.0/24".parse().unwrap()];
        let msgs = encode_announce(Family::Ipv4, &p, &attrs(), false, false, MAX_MESSAGE_LEN);
        let mut ctx = parsing_context(false);
        let (m, errs) = decode(&msgs[0], &mut ctx).unwrap();
        let BgpMessage::Update(raw) = m else { panic!() };
        // On the wire the path carries AS_TRANS...
        let wire_path = raw.path_attributes().iter().find_map(|a| match a.value() {
            PathAttributeValue::AsPath(AsPath::As2PathSegments(s)) => {
                Some(s[0].as_numbers().to_vec())
            }
            _ => None,
        });
        assert_eq!(wire_path, Some(vec![AS_TRANS as u16, 65001]));
        // ...and the receiver rebuilds the real path from AS4_PATH.
        let u = decode_update(&raw, &errs, false, true).unwrap();
        assert_eq!(u.attrs.as_path_flat(), vec![4_200_000_001, 65001]);
        assert_eq!(u.attrs.aggregator, attrs().aggregator);
    }

    #[test]
    fn ipv6_update_and_withdraw_roundtrip() {
        let mut a = attrs();
        a.next_hop = Some("2001:db8::1".parse().unwrap());
        a.next_hop_local = Some("fe80::1".parse().unwrap());
        let p: Vec<IpNet> = vec!["2001:db8:100::/48".parse().unwrap()];
        let u = roundtrip(
            &encode_announce(Family::Ipv6, &p, &a, true, false, MAX_MESSAGE_LEN)[0],
            true,
        );
        assert_eq!(u.announced, p);
        assert_eq!(u.attrs.next_hop, a.next_hop);
        assert_eq!(u.attrs.next_hop_local, a.next_hop_local);
        let w = roundtrip(&encode_withdraw(Family::Ipv6, &p, MAX_MESSAGE_LEN)[0], true);
        assert_eq!(w.withdrawn, p);
        let eor = roundtrip(&encode_end_of_rib(Family::Ipv6), true);
        assert_eq!(eor.end_of_rib, Some(Family::Ipv6));
    }

    #[test]
    fn packing_splits_at_the_message_limit() {
        let p: Vec<IpNet> = (0..2000u32)
            .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap()))
            .collect();
        let msgs = encode_announce(Family::Ipv4, &p, &attrs(), true, true, MAX_MESSAGE_LEN);
        assert!(msgs.len() > 1);
        assert!(msgs.iter().all(|m| m.len() <= MAX_MESSAGE_LEN));
        let total: usize = msgs
            .iter()
            .map(|m| roundtrip(m, true).announced.len())
            .sum();
        assert_eq!(total, 2000);
        let p6: Vec<IpNet> = (0..2000u128)
            .map(|i| {
                IpNet::V6(
                    Ipv6Net::new(Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 80)), 48).unwrap(),
                )
            })
            .collect();
        let mut a6 = attrs();
        a6.next_hop = Some("2001:db8::1".parse().unwrap());
        let msgs = encode_announce(Family::Ipv6, &p6, &a6, true, true, MAX_MESSAGE_LEN);
        assert!(msgs.iter().all(|m| m.len() <= MAX_MESSAGE_LEN));
        let total: usize = msgs
            .iter()
            .map(|m| roundtrip(m, true).announced.len())
            .sum();
        assert_eq!(total, 2000);
        let w = encode_withdraw(Family::Ipv6, &p6, MAX_MESSAGE_LEN);
        let total: usize = w.iter().map(|m| roundtrip(m, true).withdrawn.len()).sum();
        assert_eq!(total, 2000);
        let big = encode_announce(
            Family::Ipv4,
            &p,
            &attrs(),
            true,
            true,
            MAX_EXTENDED_MESSAGE_LEN,
        );
        assert_eq!(big.len(), 1);
        // An extended message is refused unless negotiated.
        assert_eq!(
            frame(&big[0], MAX_MESSAGE_LEN).unwrap_err().error,
            MessageHeaderError::BadMessageLength.into()
        );
        assert!(frame(&big[0], MAX_EXTENDED_MESSAGE_LEN).unwrap().is_some());
    }
}
