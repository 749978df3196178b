//! UPDATE, received (RFC 4271 §4.3): `receive_update` screens the raw bytes
//! (`update_screen`, where RFC 7606's per-attribute rules live), lets
//! netgauze parse the clean message, and turns it into our `Update`, one
//! step per attribute. What netgauze still refuses in a screened message
//! (attributes the screen does not know) goes through `unparsed_rule`.
//!
//! ```text
//! +-----------------------------------------------------+
//! |   Withdrawn Routes Length (2 octets)                |
//! +-----------------------------------------------------+
//! |   Withdrawn Routes (variable)                       |
//! +-----------------------------------------------------+
//! |   Total Path Attribute Length (2 octets)            |
//! +-----------------------------------------------------+
//! |   Path Attributes (variable)                        |
//! +-----------------------------------------------------+
//! |   Network Layer Reachability Information (variable) |
//! +-----------------------------------------------------+
//! ```

use super::framing::decode;
use super::iana::{AS_TRANS, AS4_AGGREGATOR, family_of};
use super::notification::{Notify, UpdateMessageError};
use super::update_screen::{Screen, screen_update};
use crate::attrs::{AsSegment, Family, Origin, PathAttrs, SegmentKind, UnknownAttr};
use ipnet::IpNet;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::path_attribute::{
    self as pa, AsPath, AsPathSegmentType, MpReach, MpUnreach, PathAttribute, PathAttributeValue,
    UnknownAttribute,
};
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_bgp_pkt::wire::deserializer::path_attribute::PathAttributeParsingError;
use netgauze_bgp_pkt::wire::deserializer::{BgpParsingContext, BgpParsingIgnoredErrors};
use std::net::{IpAddr, Ipv4Addr};

/// A decoded UPDATE in our model, after RFC 7606 handling.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Update {
    pub withdrawn: Vec<IpNet>,
    pub announced: Vec<IpNet>,
    pub attrs: PathAttrs,
    pub end_of_rib: Option<Family>,
    /// Errors handled without a reset (treat-as-withdraw, attribute discard), for the log.
    pub problems: Vec<String>,
}

/// What RFC 7606 §2 lets a receiver do about a malformed UPDATE.
#[derive(Debug)]
enum ErrorHandling {
    /// Drop the attribute, keep the rest.
    AttributeDiscard,
    /// Handle the announced prefixes as withdrawn.
    TreatAsWithdraw,
    /// Close the session with this NOTIFICATION.
    SessionReset(Notify),
}

/// One framed UPDATE off the wire (header included) into our model: RFC
/// 7606 on the raw bytes first, then netgauze's parser on what passed.
pub fn receive_update(
    msg: &[u8],
    ctx: &mut BgpParsingContext,
    screen: &Screen,
) -> Result<Update, Notify> {
    let screened = screen_update(msg, screen)?;
    let (parsed, ignored) = decode(&screened.message, ctx)?;
    let BgpMessage::Update(u) = parsed else {
        return Err(Notify::new(
            UpdateMessageError::MalformedAttributeList,
            vec![],
            "a screened UPDATE did not parse as an UPDATE",
        ));
    };
    let mut update = decode_update(&u, &ignored, screen.four_octet, screen.ebgp)?;
    update.end_of_rib = screened.end_of_rib;
    if screened.treat_as_withdraw {
        let announced = std::mem::take(&mut update.announced);
        update.withdrawn.extend(announced);
    }
    let mut problems = screened.problems;
    problems.append(&mut update.problems);
    update.problems = problems;
    Ok(update)
}

/// Turn a parsed UPDATE into our model. `four_octet` is whether the session
/// negotiated 4-octet AS numbers; without it, AS4_PATH and AS4_AGGREGATOR are
/// merged as RFC 6793 §4.2.3 says. `ebgp`: the peer is external.
pub fn decode_update(
    msg: &BgpUpdateMessage,
    ignored: &BgpParsingIgnoredErrors,
    four_octet: bool,
    ebgp: bool,
) -> Result<Update, Notify> {
    let mut d = Decoder::new(msg, ebgp);
    for err in ignored.path_attr_errors() {
        d.unparsed(err)?;
    }
    d.ipv4_nlri(msg);
    for attr in msg.path_attributes() {
        d.attribute(attr)?;
    }
    if !four_octet {
        d.merge_as4();
    }
    d.mandatory_present();
    Ok(d.finish())
}

/// RFC 7606 §7: the approach for an attribute netgauze could not parse,
/// attribute by attribute.
fn unparsed_rule(err: &PathAttributeParsingError) -> ErrorHandling {
    use ErrorHandling::*;
    use PathAttributeParsingError as E;
    match err {
        // §7.1-§7.5: ORIGIN, AS_PATH, NEXT_HOP, MULTI_EXIT_DISC, LOCAL_PREF.
        E::OriginError(_)
        | E::AsPathError(_)
        | E::NextHopError(_)
        | E::MultiExitDiscriminatorError(_)
        | E::LocalPreferenceError(_) => TreatAsWithdraw,
        // §7.6 ATOMIC_AGGREGATE, §7.7 AGGREGATOR.
        E::AtomicAggregateError(_) | E::AggregatorError(_) => AttributeDiscard,
        // §7.8 COMMUNITIES, §7.14 extended communities, RFC 8092 §6 large ones.
        E::CommunitiesError(_)
        | E::ExtendedCommunitiesError(_)
        | E::ExtendedCommunitiesErrorIpv6(_)
        | E::LargeCommunitiesError(_) => TreatAsWithdraw,
        // §7.9 ORIGINATOR_ID, §7.10 CLUSTER_LIST.
        E::OriginatorError(_) | E::ClusterListError(_) => TreatAsWithdraw,
        // §7.11 MP_REACH_NLRI, §7.12 MP_UNREACH_NLRI: the prefixes cannot be
        // told, so we cannot withdraw them; we do not do AFI/SAFI disable.
        E::MpReachErrorError(_) | E::MpUnreachErrorError(_) => SessionReset(Notify::new(
            UpdateMessageError::OptionalAttributeError,
            vec![],
            format!("malformed multiprotocol attribute: {err}"),
        )),
        // Attributes we do not act on, and unknown ones: nothing to withdraw for.
        E::OnlyToCustomerError(_)
        | E::AigpError(_)
        | E::BgpLsError(_)
        | E::SegmentIdentifierParsingError(_)
        | E::UnknownAttributeError(_) => AttributeDiscard,
        // §3: flags and lengths that do not fit, and anything else.
        E::Parse(_) | E::InvalidPathAttribute { .. } => TreatAsWithdraw,
    }
}

/// One UPDATE being decoded.
struct Decoder {
    u: Update,
    ebgp: bool,
    treat_as_withdraw: bool,
    /// Prefixes in the UPDATE's own NLRI field, which need NEXT_HOP.
    nlri_field: usize,
    as4_path: Option<Vec<AsSegment>>,
    as4_aggregator: Option<(u32, Ipv4Addr)>,
    has_origin: bool,
    has_as_path: bool,
    has_next_hop: bool,
}

impl Decoder {
    fn new(msg: &BgpUpdateMessage, ebgp: bool) -> Decoder {
        Decoder {
            u: Update {
                end_of_rib: msg.end_of_rib().and_then(family_of),
                ..Default::default()
            },
            ebgp,
            treat_as_withdraw: false,
            nlri_field: msg.nlri().len(),
            as4_path: None,
            as4_aggregator: None,
            has_origin: false,
            has_as_path: false,
            has_next_hop: false,
        }
    }

    /// Carry out an RFC 7606 approach; `problem` goes to the log.
    fn handle(&mut self, action: ErrorHandling, problem: String) -> Result<(), Notify> {
        match action {
            ErrorHandling::AttributeDiscard => self.u.problems.push(problem),
            ErrorHandling::TreatAsWithdraw => {
                self.treat_as_withdraw = true;
                self.u.problems.push(problem);
            }
            ErrorHandling::SessionReset(n) => return Err(n),
        }
        Ok(())
    }

    /// Something we ignore that is not an error of the peer's, for the log.
    fn note(&mut self, problem: String) {
        self.u.problems.push(problem);
    }

    /// An attribute netgauze could not parse (it left it out of the message).
    fn unparsed(&mut self, err: &PathAttributeParsingError) -> Result<(), Notify> {
        let action = unparsed_rule(err);
        let problem = match action {
            ErrorHandling::AttributeDiscard => format!("attribute discarded (RFC 7606): {err}"),
            ErrorHandling::TreatAsWithdraw => format!("treat-as-withdraw (RFC 7606): {err}"),
            ErrorHandling::SessionReset(_) => String::new(),
        };
        self.handle(action, problem)
    }

    /// The IPv4 prefixes of the UPDATE's own fields (RFC 4271 §4.3).
    fn ipv4_nlri(&mut self, msg: &BgpUpdateMessage) {
        for w in msg.withdraw_routes() {
            self.u.withdrawn.push(IpNet::V4(w.network().address()));
        }
        for n in msg.nlri() {
            self.u.announced.push(IpNet::V4(n.network().address()));
        }
    }

    /// One attribute's own step (repeats never get here: the screen drops
    /// them, RFC 7606 §3 g).
    fn attribute(&mut self, attr: &PathAttribute) -> Result<(), Notify> {
        match attr.value() {
            PathAttributeValue::Origin(o) => self.origin(o),
            PathAttributeValue::AsPath(p) => self.as_path(p),
            PathAttributeValue::As4Path(p) => self.as4_path(p),
            PathAttributeValue::NextHop(nh) => self.next_hop(nh),
            PathAttributeValue::MultiExitDiscriminator(m) => self.u.attrs.med = Some(m.metric()),
            PathAttributeValue::LocalPreference(l) => self.local_pref(l),
            PathAttributeValue::AtomicAggregate(_) => self.u.attrs.atomic_aggregate = true,
            PathAttributeValue::Aggregator(ag) => self.aggregator(ag),
            PathAttributeValue::Communities(c) => self.communities(c),
            PathAttributeValue::LargeCommunities(c) => self.large_communities(c),
            PathAttributeValue::Originator(o) => self.u.attrs.originator_id = Some(o.id()),
            PathAttributeValue::ClusterList(c) => self.cluster_list(c),
            PathAttributeValue::MpReach(r) => self.mp_reach(r),
            PathAttributeValue::MpUnreach(r) => self.mp_unreach(r),
            PathAttributeValue::UnknownAttribute(x) => return self.unknown(attr, x),
            _ => {}
        }
        Ok(())
    }

    /// ORIGIN (RFC 4271 §5.1.1).
    fn origin(&mut self, o: &pa::Origin) {
        self.has_origin = true;
        self.u.attrs.origin = match o {
            pa::Origin::IGP => Origin::Igp,
            pa::Origin::EGP => Origin::Egp,
            pa::Origin::Incomplete => Origin::Incomplete,
        }
    }

    /// AS_PATH (RFC 4271 §5.1.2), in 2- or 4-octet form; ours is always 4.
    fn as_path(&mut self, p: &AsPath) {
        self.has_as_path = true;
        self.u.attrs.as_path = match p {
            AsPath::As2PathSegments(segs) => segs
                .iter()
                .map(|s| AsSegment {
                    kind: seg_kind(s.segment_type()),
                    asns: s.as_numbers().iter().map(|x| *x as u32).collect(),
                })
                .collect(),
            AsPath::As4PathSegments(segs) => segs
                .iter()
                .map(|s| AsSegment {
                    kind: seg_kind(s.segment_type()),
                    asns: s.as_numbers().to_vec(),
                })
                .collect(),
        }
    }

    /// AS4_PATH (RFC 6793 §3), kept for `merge_as4`.
    fn as4_path(&mut self, p: &pa::As4Path) {
        self.as4_path = Some(
            p.segments()
                .iter()
                .map(|s| AsSegment {
                    kind: seg_kind(s.segment_type()),
                    asns: s.as_numbers().to_vec(),
                })
                .collect(),
        )
    }

    /// NEXT_HOP (RFC 4271 §5.1.3); an MP_REACH_NLRI's next hop comes first.
    fn next_hop(&mut self, nh: &pa::NextHop) {
        self.has_next_hop = true;
        self.u
            .attrs
            .next_hop
            .get_or_insert(IpAddr::V4(nh.next_hop()));
    }

    /// LOCAL_PREF (RFC 4271 §5.1.5): from an external peer it is ignored.
    fn local_pref(&mut self, l: &pa::LocalPreference) {
        if !self.ebgp {
            self.u.attrs.local_pref = Some(l.metric());
        }
    }

    /// AGGREGATOR (RFC 4271 §5.1.7), in 2- or 4-octet form.
    fn aggregator(&mut self, ag: &pa::Aggregator) {
        self.u.attrs.aggregator = Some(match ag {
            pa::Aggregator::As2Aggregator(x) => (*x.asn() as u32, x.origin()),
            pa::Aggregator::As4Aggregator(x) => (*x.asn(), x.origin()),
        })
    }

    /// COMMUNITIES (RFC 1997).
    fn communities(&mut self, c: &pa::Communities) {
        self.u.attrs.communities = c.communities().iter().map(|c| c.value()).collect()
    }

    /// LARGE_COMMUNITY (RFC 8092).
    fn large_communities(&mut self, c: &pa::LargeCommunities) {
        self.u.attrs.large_communities = c
            .communities()
            .iter()
            .map(|c| (c.global_admin(), c.local_data1(), c.local_data2()))
            .collect()
    }

    /// CLUSTER_LIST (RFC 4456 §8).
    fn cluster_list(&mut self, c: &pa::ClusterList) {
        self.u.attrs.cluster_list = c.cluster_list().iter().map(|c| c.id()).collect()
    }

    /// MP_REACH_NLRI (RFC 4760 §3) of the families we carry: its next hop
    /// (IPv6: global and link-local, RFC 2545 §3) and prefixes.
    fn mp_reach(&mut self, r: &MpReach) {
        let a = &mut self.u.attrs;
        match r {
            MpReach::Ipv4Unicast { next_hop, nlri, .. } => {
                a.next_hop = Some(*next_hop);
                self.u
                    .announced
                    .extend(nlri.iter().map(|n| IpNet::V4(n.network().address())));
            }
            MpReach::Ipv6Unicast {
                next_hop_global,
                next_hop_local,
                nlri,
            } => {
                a.next_hop = Some(IpAddr::V6(*next_hop_global));
                a.next_hop_local = *next_hop_local;
                self.u
                    .announced
                    .extend(nlri.iter().map(|n| IpNet::V6(n.network().address())));
            }
            other => self.note(format!(
                "ignored MP_REACH_NLRI for a family we did not negotiate: {:?}",
                other.address_type()
            )),
        }
    }

    /// MP_UNREACH_NLRI (RFC 4760 §4) of the families we carry.
    fn mp_unreach(&mut self, r: &MpUnreach) {
        match r {
            MpUnreach::Ipv4Unicast { nlri } => self
                .u
                .withdrawn
                .extend(nlri.iter().map(|n| IpNet::V4(n.network().address()))),
            MpUnreach::Ipv6Unicast { nlri } => self
                .u
                .withdrawn
                .extend(nlri.iter().map(|n| IpNet::V6(n.network().address()))),
            _ => self.note("ignored MP_UNREACH_NLRI for a family we did not negotiate".into()),
        }
    }

    /// An attribute netgauze does not model: AS4_AGGREGATOR (RFC 6793 §3),
    /// or one we do not know (RFC 4271 §5, §6.3).
    fn unknown(&mut self, attr: &PathAttribute, x: &UnknownAttribute) -> Result<(), Notify> {
        if x.code() == AS4_AGGREGATOR && x.value().len() == 8 {
            let v = x.value();
            self.as4_aggregator = Some((
                u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
                Ipv4Addr::new(v[4], v[5], v[6], v[7]),
            ));
            return Ok(());
        }
        if !attr.optional() {
            // RFC 4271 §6.3: an unrecognised well-known attribute.
            let n = Notify::new(
                UpdateMessageError::UnrecognizedWellKnownAttribute,
                vec![],
                format!("unrecognised well-known attribute {}", x.code()),
            );
            return self.handle(ErrorHandling::SessionReset(n), String::new());
        }
        // Optional non-transitive attributes we do not know are dropped;
        // transitive ones travel on.
        if attr.transitive() {
            self.u.attrs.unknown.push(UnknownAttr {
                code: x.code(),
                transitive: true,
                partial: attr.partial(),
                value: x.value().to_vec(),
            });
        }
        Ok(())
    }

    /// RFC 6793 §4.2.3: a 2-octet peer's real path is AS_PATH's head with
    /// AS4_PATH as its tail, and AS4_AGGREGATOR stands in for an AGGREGATOR
    /// that carries AS_TRANS.
    fn merge_as4(&mut self) {
        let a = &mut self.u.attrs;
        if let Some(p4) = self.as4_path.take() {
            match merge_as4_path(&a.as_path, p4) {
                Some(merged) => a.as_path = merged,
                None => self.note("AS4_PATH longer than AS_PATH ignored (RFC 6793 §4.2.3)".into()),
            }
        }
        let a = &mut self.u.attrs;
        if let (Some((AS_TRANS, _)), Some(ag4)) = (a.aggregator, self.as4_aggregator) {
            a.aggregator = Some(ag4);
        }
    }

    /// RFC 7606 §3 d: an UPDATE that announces prefixes without ORIGIN,
    /// AS_PATH or (for the NLRI field's) NEXT_HOP is treat-as-withdraw.
    fn mandatory_present(&mut self) {
        if self.u.announced.is_empty() {
            return;
        }
        let mut missing = Vec::new();
        if !self.has_origin {
            missing.push("ORIGIN");
        }
        if !self.has_as_path {
            missing.push("AS_PATH");
        }
        // RFC 4760 §3: NEXT_HOP is needed only for the NLRI field's prefixes.
        if !self.has_next_hop && self.nlri_field > 0 {
            missing.push("NEXT_HOP");
        }
        if !missing.is_empty() {
            let problem = format!(
                "treat-as-withdraw (RFC 7606): missing {}",
                missing.join(", ")
            );
            // Never a reset: only the session-reset approach returns an error.
            let _ = self.handle(ErrorHandling::TreatAsWithdraw, problem);
        }
    }

    fn finish(mut self) -> Update {
        if self.treat_as_withdraw {
            let announced = std::mem::take(&mut self.u.announced);
            self.u.withdrawn.extend(announced);
        }
        self.u
    }
}

/// AS_PATH with AS4_PATH merged in (RFC 6793 §4.2.3), or `None` when
/// AS4_PATH is the longer one and must be ignored. Lengths count a set as
/// one, as the decision process does.
fn merge_as4_path(as_path: &[AsSegment], as4_path: Vec<AsSegment>) -> Option<Vec<AsSegment>> {
    let len = |p: &[AsSegment]| -> usize {
        p.iter()
            .map(|s| match s.kind {
                SegmentKind::Set => 1,
                SegmentKind::Sequence => s.asns.len(),
            })
            .sum()
    };
    let (len2, len4) = (len(as_path), len(&as4_path));
    if len4 > len2 {
        return None;
    }
    let keep = len2 - len4;
    let mut merged: Vec<AsSegment> = Vec::new();
    let mut taken = 0;
    for seg in as_path {
        if taken >= keep {
            break;
        }
        match seg.kind {
            SegmentKind::Sequence => {
                let n = (keep - taken).min(seg.asns.len());
                merged.push(AsSegment {
                    kind: seg.kind,
                    asns: seg.asns[..n].to_vec(),
                });
                taken += n;
            }
            SegmentKind::Set => {
                merged.push(seg.clone());
                taken += 1;
            }
        }
    }
    merged.extend(as4_path);
    Some(merged)
}

fn seg_kind(t: AsPathSegmentType) -> SegmentKind {
    match t {
        AsPathSegmentType::AsSet => SegmentKind::Set,
        AsPathSegmentType::AsSequence => SegmentKind::Sequence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::framing::{MAX_MESSAGE_LEN, decode, frame, parsing_context};
    use netgauze_bgp_pkt::BgpMessage;

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
    fn missing_mandatory_attribute_is_treat_as_withdraw() {
        // UPDATE with NLRI 10.0.0.0/8 but only ORIGIN.
        let mut m = vec![0xff; 16];
        let body = [0u8, 0, 0, 4, 0x40, 1, 1, 0, 8, 10];
        m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        m.push(2);
        m.extend_from_slice(&body);
        let u = roundtrip(&m, true);
        assert!(u.announced.is_empty());
        assert_eq!(u.withdrawn, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert!(u.problems[0].contains("AS_PATH"));
    }

    #[test]
    fn malformed_origin_is_treat_as_withdraw_not_a_reset() {
        let mut m = vec![0xff; 16];
        // ORIGIN value 7 (invalid), AS_PATH empty, NEXT_HOP 192.0.2.1, NLRI 10/8
        let body = [
            0u8, 0, 0, 14, 0x40, 1, 1, 7, 0x40, 2, 0, 0x40, 3, 4, 192, 0, 2, 1, 8, 10,
        ];
        m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        m.push(2);
        m.extend_from_slice(&body);
        let u = roundtrip(&m, true);
        assert!(u.announced.is_empty(), "{u:?}");
        assert_eq!(u.withdrawn.len(), 1);
    }
}
