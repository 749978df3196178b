//! RFC 7606 rule by rule, on byte vectors through `receive_update`, the path
//! every UPDATE a session reads takes. docs/bgp.md's table names these tests.
//! Each builds a valid UPDATE announcing 10.0.0.0/8 and breaks one thing.

use super::notification::{ErrorCode, UpdateMessageError};
use super::update_decode::{Update, receive_update};
use super::update_screen::Screen;
use super::{Notify, parsing_context};
use ipnet::IpNet;

const WELL_KNOWN: u8 = 0x40;
const OPT_TRANS: u8 = 0xc0;
const OPT: u8 = 0x80;

fn attr(flags: u8, code: u8, value: &[u8]) -> Vec<u8> {
    let mut a = vec![flags, code, value.len() as u8];
    a.extend_from_slice(value);
    a
}

fn origin() -> Vec<u8> {
    attr(WELL_KNOWN, 1, &[0])
}

/// AS_SEQUENCE [65001] in 4-octet form.
fn as_path() -> Vec<u8> {
    attr(WELL_KNOWN, 2, &[2, 1, 0, 0, 0xfd, 0xe9])
}

fn next_hop() -> Vec<u8> {
    attr(WELL_KNOWN, 3, &[192, 0, 2, 1])
}

/// 10.0.0.0/8
const NLRI: &[u8] = &[8, 10];

fn message(withdrawn: &[u8], attrs: &[Vec<u8>], nlri: &[u8]) -> Vec<u8> {
    let a: Vec<u8> = attrs.concat();
    let mut m = vec![0xff; 16];
    let len = 19 + 2 + withdrawn.len() + 2 + a.len() + nlri.len();
    m.extend_from_slice(&(len as u16).to_be_bytes());
    m.push(2);
    m.extend_from_slice(&(withdrawn.len() as u16).to_be_bytes());
    m.extend_from_slice(withdrawn);
    m.extend_from_slice(&(a.len() as u16).to_be_bytes());
    m.extend_from_slice(&a);
    m.extend_from_slice(nlri);
    m
}

/// The three mandatory attributes, then `extra`, announcing 10/8.
fn with(extra: &[Vec<u8>]) -> Vec<u8> {
    let mut attrs = vec![origin(), as_path(), next_hop()];
    attrs.extend_from_slice(extra);
    message(&[], &attrs, NLRI)
}

const IBGP: Screen = Screen {
    four_octet: true,
    ebgp: false,
    local_addr: None,
};
const EBGP: Screen = Screen {
    four_octet: true,
    ebgp: true,
    local_addr: None,
};

fn receive(m: &[u8], s: &Screen) -> Result<Update, Notify> {
    receive_update(m, &mut parsing_context(s.four_octet), s)
}

fn net(s: &str) -> IpNet {
    s.parse().expect("literal prefix")
}

#[track_caller]
fn kept(m: &[u8], s: &Screen) -> Update {
    let u = receive(m, s).unwrap_or_else(|n| panic!("session reset: {n}"));
    assert_eq!(u.announced, vec![net("10.0.0.0/8")], "{u:?}");
    assert!(u.withdrawn.is_empty(), "{u:?}");
    u
}

#[track_caller]
fn withdrawn(m: &[u8], s: &Screen) -> Update {
    let u = receive(m, s).unwrap_or_else(|n| panic!("session reset: {n}"));
    assert!(u.announced.is_empty(), "{u:?}");
    assert_eq!(u.withdrawn, vec![net("10.0.0.0/8")], "{u:?}");
    assert!(
        u.problems.iter().any(|p| p.contains("treat-as-withdraw")),
        "{u:?}"
    );
    u
}

/// Kept, with the attribute gone and the discard logged.
#[track_caller]
fn discarded(m: &[u8], s: &Screen) -> Update {
    let u = kept(m, s);
    assert!(u.problems.iter().any(|p| p.contains("discard")), "{u:?}");
    u
}

#[track_caller]
fn reset(m: &[u8], s: &Screen, sub: UpdateMessageError) {
    match receive(m, s) {
        Err(n) => assert_eq!(n.error, ErrorCode::UpdateMessage(sub), "{n}"),
        Ok(u) => panic!("expected a session reset with 3/{}, got {u:?}", sub as u8),
    }
}

#[test]
fn valid_update_is_kept() {
    let u = kept(&with(&[]), &IBGP);
    assert!(u.problems.is_empty(), "{u:?}");
}

// ---- §7.1 ORIGIN

#[test]
fn origin_wrong_length_is_treat_as_withdraw() {
    let m = message(
        &[],
        &[attr(WELL_KNOWN, 1, &[0, 0]), as_path(), next_hop()],
        NLRI,
    );
    withdrawn(&m, &IBGP);
}

#[test]
fn origin_undefined_value_is_treat_as_withdraw() {
    let m = message(
        &[],
        &[attr(WELL_KNOWN, 1, &[3]), as_path(), next_hop()],
        NLRI,
    );
    withdrawn(&m, &IBGP);
}

#[test]
fn origin_flags_conflict_is_treat_as_withdraw() {
    let m = message(
        &[],
        &[attr(OPT_TRANS, 1, &[0]), as_path(), next_hop()],
        NLRI,
    );
    withdrawn(&m, &IBGP);
}

// ---- §7.2 AS_PATH

#[test]
fn as_path_unknown_segment_type_is_treat_as_withdraw() {
    let p = attr(WELL_KNOWN, 2, &[5, 1, 0, 0, 0xfd, 0xe9]);
    withdrawn(&message(&[], &[origin(), p, next_hop()], NLRI), &IBGP);
}

#[test]
fn as_path_empty_segment_is_treat_as_withdraw() {
    let p = attr(WELL_KNOWN, 2, &[2, 0]);
    withdrawn(&message(&[], &[origin(), p, next_hop()], NLRI), &IBGP);
}

#[test]
fn as_path_segment_overrun_is_treat_as_withdraw() {
    let p = attr(WELL_KNOWN, 2, &[2, 2, 0, 0, 0xfd, 0xe9]);
    withdrawn(&message(&[], &[origin(), p, next_hop()], NLRI), &IBGP);
}

#[test]
fn as_path_lone_octet_is_treat_as_withdraw() {
    let p = attr(WELL_KNOWN, 2, &[2, 1, 0, 0, 0xfd, 0xe9, 2]);
    withdrawn(&message(&[], &[origin(), p, next_hop()], NLRI), &IBGP);
}

#[test]
fn as_path_flags_conflict_is_treat_as_withdraw() {
    let p = attr(OPT, 2, &[2, 1, 0, 0, 0xfd, 0xe9]);
    withdrawn(&message(&[], &[origin(), p, next_hop()], NLRI), &IBGP);
}

// ---- §7.3 NEXT_HOP

#[test]
fn next_hop_wrong_length_is_treat_as_withdraw() {
    let nh = attr(WELL_KNOWN, 3, &[192, 0, 2, 1, 0]);
    withdrawn(&message(&[], &[origin(), as_path(), nh], NLRI), &IBGP);
}

#[test]
fn next_hop_multicast_is_treat_as_withdraw() {
    let nh = attr(WELL_KNOWN, 3, &[224, 0, 0, 1]);
    withdrawn(&message(&[], &[origin(), as_path(), nh], NLRI), &IBGP);
}

#[test]
fn next_hop_own_address_is_treat_as_withdraw() {
    let s = Screen {
        local_addr: Some("192.0.2.1".parse().expect("literal")),
        ..IBGP
    };
    withdrawn(&with(&[]), &s);
}

#[test]
fn next_hop_malformed_without_nlri_field_is_discarded() {
    // An MP_REACH_NLRI UPDATE (2001:db8::/32) with a broken NEXT_HOP: RFC
    // 4760 §3 says to ignore NEXT_HOP there.
    let mut mp = vec![0, 2, 1, 16];
    mp.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    mp.extend_from_slice(&[0, 32, 0x20, 0x01, 0x0d, 0xb8]);
    let m = message(
        &[],
        &[
            attr(OPT, 14, &mp),
            origin(),
            as_path(),
            attr(WELL_KNOWN, 3, &[1, 2]),
        ],
        &[],
    );
    let u = receive(&m, &IBGP).unwrap();
    assert_eq!(u.announced, vec![net("2001:db8::/32")], "{u:?}");
}

// ---- §7.4 MULTI_EXIT_DISC

#[test]
fn med_wrong_length_is_treat_as_withdraw() {
    withdrawn(&with(&[attr(OPT, 4, &[0, 0, 1])]), &IBGP);
}

#[test]
fn med_flags_conflict_is_treat_as_withdraw() {
    withdrawn(&with(&[attr(WELL_KNOWN, 4, &[0, 0, 0, 1])]), &IBGP);
}

// ---- §7.5 LOCAL_PREF

#[test]
fn local_pref_wrong_length_from_internal_is_treat_as_withdraw() {
    withdrawn(&with(&[attr(WELL_KNOWN, 5, &[0, 0, 1])]), &IBGP);
}

#[test]
fn local_pref_from_external_is_discarded_even_malformed() {
    let u = discarded(&with(&[attr(WELL_KNOWN, 5, &[0, 0, 1])]), &EBGP);
    assert_eq!(u.attrs.local_pref, None);
    let u = discarded(&with(&[attr(WELL_KNOWN, 5, &[0, 0, 0, 7])]), &EBGP);
    assert_eq!(u.attrs.local_pref, None);
}

// ---- §7.6 ATOMIC_AGGREGATE

#[test]
fn atomic_aggregate_wrong_length_is_discarded() {
    let u = discarded(&with(&[attr(WELL_KNOWN, 6, &[1])]), &IBGP);
    assert!(!u.attrs.atomic_aggregate);
}

#[test]
fn atomic_aggregate_flags_conflict_is_discarded() {
    discarded(&with(&[attr(OPT_TRANS, 6, &[])]), &IBGP);
}

// ---- §7.7 AGGREGATOR

#[test]
fn aggregator_wrong_length_is_discarded() {
    // 6 octets on a 4-octet session, 8 on a 2-octet one.
    let u = discarded(
        &with(&[attr(OPT_TRANS, 7, &[0xfd, 0xe9, 192, 0, 2, 9])]),
        &IBGP,
    );
    assert_eq!(u.attrs.aggregator, None);
    let two = Screen {
        four_octet: false,
        ..IBGP
    };
    let m = message(
        &[],
        &[
            origin(),
            attr(WELL_KNOWN, 2, &[2, 1, 0xfd, 0xe9]),
            next_hop(),
            attr(OPT_TRANS, 7, &[0, 0, 0xfd, 0xe9, 192, 0, 2, 9]),
        ],
        NLRI,
    );
    discarded(&m, &two);
}

#[test]
fn aggregator_flags_conflict_is_discarded() {
    discarded(
        &with(&[attr(WELL_KNOWN, 7, &[0, 0, 0xfd, 0xe9, 192, 0, 2, 9])]),
        &IBGP,
    );
}

// ---- §7.8 COMMUNITIES

#[test]
fn communities_wrong_length_is_treat_as_withdraw() {
    withdrawn(&with(&[attr(OPT_TRANS, 8, &[0, 1, 0, 2, 9])]), &IBGP);
    withdrawn(&with(&[attr(OPT_TRANS, 8, &[])]), &IBGP);
}

#[test]
fn communities_flags_conflict_is_treat_as_withdraw() {
    withdrawn(&with(&[attr(OPT, 8, &[0, 1, 0, 2])]), &IBGP);
}

// ---- §7.9 ORIGINATOR_ID, §7.10 CLUSTER_LIST

#[test]
fn originator_id_wrong_length_from_internal_is_treat_as_withdraw() {
    withdrawn(&with(&[attr(OPT, 9, &[192, 0, 2])]), &IBGP);
}

#[test]
fn cluster_list_wrong_length_from_internal_is_treat_as_withdraw() {
    withdrawn(&with(&[attr(OPT, 10, &[192, 0, 2, 1, 5])]), &IBGP);
    withdrawn(&with(&[attr(OPT, 10, &[])]), &IBGP);
}

#[test]
fn reflection_attributes_from_external_are_discarded() {
    let u = discarded(&with(&[attr(OPT, 9, &[192, 0, 2, 7])]), &EBGP);
    assert_eq!(u.attrs.originator_id, None);
    let u = discarded(&with(&[attr(OPT, 10, &[192, 0, 2, 7, 1])]), &EBGP);
    assert!(u.attrs.cluster_list.is_empty());
}

#[test]
fn reflection_attribute_flags_conflict_is_treat_as_withdraw() {
    withdrawn(&with(&[attr(OPT_TRANS, 9, &[192, 0, 2, 7])]), &IBGP);
}

// ---- §7.11 MP_REACH_NLRI, §7.12 MP_UNREACH_NLRI

fn mp_reach_v6(nh_len: u8, nlri: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 2, 1, nh_len];
    let nh = "2001:db8::1"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    v.extend_from_slice(&nh.repeat(2)[..nh_len as usize]);
    v.push(0);
    v.extend_from_slice(nlri);
    v
}

fn v6_update(mp: Vec<u8>) -> Vec<u8> {
    message(&[], &[attr(OPT, 14, &mp), origin(), as_path()], &[])
}

#[test]
fn mp_reach_next_hop_length_mismatch_is_session_reset() {
    let m = v6_update(mp_reach_v6(12, &[32, 0x20, 0x01, 0x0d, 0xb8]));
    reset(&m, &IBGP, UpdateMessageError::OptionalAttributeError);
}

#[test]
fn mp_reach_too_short_is_session_reset() {
    reset(
        &v6_update(vec![0, 2, 1]),
        &IBGP,
        UpdateMessageError::OptionalAttributeError,
    );
    reset(
        &v6_update(vec![0, 2, 1, 16, 0]),
        &IBGP,
        UpdateMessageError::OptionalAttributeError,
    );
}

#[test]
fn mp_reach_unparseable_nlri_is_session_reset() {
    let m = v6_update(mp_reach_v6(16, &[129, 0x20]));
    reset(&m, &IBGP, UpdateMessageError::InvalidNetworkField);
    let m = v6_update(mp_reach_v6(16, &[64, 0x20, 0x01]));
    reset(&m, &IBGP, UpdateMessageError::InvalidNetworkField);
}

#[test]
fn mp_reach_invalid_next_hop_is_treat_as_withdraw() {
    let mut mp = vec![0, 2, 1, 16];
    mp.extend_from_slice(&[0xff, 2].repeat(8));
    mp.extend_from_slice(&[0, 32, 0x20, 0x01, 0x0d, 0xb8]);
    let u = receive(&v6_update(mp), &IBGP).unwrap();
    assert!(u.announced.is_empty(), "{u:?}");
    assert_eq!(u.withdrawn, vec![net("2001:db8::/32")], "{u:?}");
}

#[test]
fn mp_reach_flags_conflict_is_treat_as_withdraw() {
    let m = message(
        &[],
        &[
            attr(
                OPT_TRANS,
                14,
                &mp_reach_v6(16, &[32, 0x20, 0x01, 0x0d, 0xb8]),
            ),
            origin(),
            as_path(),
        ],
        &[],
    );
    let u = receive(&m, &IBGP).unwrap();
    assert!(u.announced.is_empty(), "{u:?}");
    assert_eq!(u.withdrawn, vec![net("2001:db8::/32")], "{u:?}");
}

#[test]
fn mp_reach_of_a_family_we_do_not_carry_is_ignored() {
    // AFI 1 SAFI 128 (VPNv4) with a 12-octet next hop and an opaque NLRI.
    let mut mp = vec![0, 1, 128, 12];
    mp.extend_from_slice(&[0; 12]);
    mp.extend_from_slice(&[0, 200, 1, 2, 3]);
    let u = kept(
        &message(
            &[],
            &[attr(OPT, 14, &mp), origin(), as_path(), next_hop()],
            NLRI,
        ),
        &IBGP,
    );
    assert!(u.problems.iter().any(|p| p.contains("ignored")), "{u:?}");
}

#[test]
fn mp_unreach_too_short_is_session_reset() {
    let m = message(&[], &[attr(OPT, 15, &[0, 2])], &[]);
    reset(&m, &IBGP, UpdateMessageError::OptionalAttributeError);
}

#[test]
fn mp_unreach_unparseable_nlri_is_session_reset() {
    let m = message(&[], &[attr(OPT, 15, &[0, 1, 1, 33, 10, 0, 0, 0, 0])], &[]);
    reset(&m, &IBGP, UpdateMessageError::InvalidNetworkField);
}

#[test]
fn mp_unreach_empty_is_end_of_rib() {
    let m = message(&[], &[attr(OPT, 15, &[0, 2, 1])], &[]);
    let u = receive(&m, &IBGP).unwrap();
    assert_eq!(u.end_of_rib, Some(crate::attrs::Family::Ipv6));
}

// ---- §3 g repeats

#[test]
fn repeated_mp_attribute_is_session_reset() {
    let un = attr(OPT, 15, &[0, 1, 1, 8, 10]);
    let m = message(&[], &[un.clone(), un], &[]);
    reset(&m, &IBGP, UpdateMessageError::MalformedAttributeList);
}

#[test]
fn repeated_attribute_keeps_the_first() {
    let u = kept(
        &with(&[
            attr(OPT_TRANS, 8, &[0, 1, 0, 2]),
            attr(OPT_TRANS, 8, &[0, 3, 0, 4]),
        ]),
        &IBGP,
    );
    assert_eq!(u.attrs.communities, vec![0x0001_0002]);
}

// ---- RFC 6793 §6 AS4_PATH, AS4_AGGREGATOR

fn two_octet() -> Screen {
    Screen {
        four_octet: false,
        ..IBGP
    }
}

fn two_octet_update(extra: Vec<u8>) -> Vec<u8> {
    message(
        &[],
        &[
            origin(),
            attr(WELL_KNOWN, 2, &[2, 1, 0x5b, 0xa0]),
            next_hop(),
            extra,
        ],
        NLRI,
    )
}

#[test]
fn as4_path_malformed_is_discarded() {
    let u = discarded(
        &two_octet_update(attr(OPT_TRANS, 17, &[2, 2, 0, 1, 0, 0])),
        &two_octet(),
    );
    assert_eq!(u.attrs.as_path_flat(), vec![23456]);
}

#[test]
fn as4_aggregator_wrong_length_is_discarded() {
    discarded(
        &two_octet_update(attr(OPT_TRANS, 18, &[0, 1, 0, 0, 192, 0, 2])),
        &two_octet(),
    );
}

#[test]
fn as4_attributes_from_a_four_octet_speaker_are_discarded() {
    let u = discarded(&with(&[attr(OPT_TRANS, 17, &[2, 1, 0, 1, 0, 0])]), &IBGP);
    assert_eq!(u.attrs.as_path_flat(), vec![65001]);
    let u = discarded(
        &with(&[attr(OPT_TRANS, 18, &[0, 1, 0, 0, 192, 0, 2, 1])]),
        &IBGP,
    );
    assert!(u.attrs.unknown.is_empty(), "{u:?}");
}

// ---- §7.14 extended communities, RFC 8092 §6 large communities

#[test]
fn extended_communities_wrong_length_is_treat_as_withdraw() {
    withdrawn(&with(&[attr(OPT_TRANS, 16, &[0; 7])]), &IBGP);
    withdrawn(&with(&[attr(OPT_TRANS, 25, &[0; 21])]), &IBGP);
}

#[test]
fn large_communities_wrong_length_is_treat_as_withdraw() {
    withdrawn(&with(&[attr(OPT_TRANS, 32, &[0; 13])]), &IBGP);
    withdrawn(&with(&[attr(OPT_TRANS, 32, &[])]), &IBGP);
}

/// The flags errors and NEXT_HOP values the table lists that the tests
/// above do not send one by one: each gets its attribute's own rule (§3 c).
#[test]
fn every_remaining_flags_conflict_and_next_hop_value_gets_its_rule() {
    let nh = |flags: u8, v: [u8; 4]| message(&[], &[origin(), as_path(), attr(flags, 3, &v)], NLRI);
    for (what, m) in [
        ("NEXT_HOP optional", nh(OPT_TRANS, [192, 0, 2, 1])),
        ("NEXT_HOP 0.0.0.0", nh(WELL_KNOWN, [0, 0, 0, 0])),
        ("NEXT_HOP class E", nh(WELL_KNOWN, [240, 0, 0, 1])),
        (
            "LOCAL_PREF optional",
            with(&[attr(OPT, 5, &[0, 0, 0, 100])]),
        ),
        (
            "ORIGINATOR_ID transitive",
            with(&[attr(OPT_TRANS, 9, &[192, 0, 2, 7])]),
        ),
        (
            "CLUSTER_LIST transitive",
            with(&[attr(OPT_TRANS, 10, &[192, 0, 2, 7])]),
        ),
        (
            "CLUSTER_LIST well-known",
            with(&[attr(WELL_KNOWN, 10, &[192, 0, 2, 7])]),
        ),
        (
            "EXTENDED_COMMUNITIES well-known",
            with(&[attr(WELL_KNOWN, 16, &[0; 8])]),
        ),
        (
            "IPv6 EXTENDED_COMMUNITIES well-known",
            with(&[attr(WELL_KNOWN, 25, &[0; 20])]),
        ),
        (
            "LARGE_COMMUNITY well-known",
            with(&[attr(WELL_KNOWN, 32, &[0; 12])]),
        ),
    ] {
        let u = receive(&m, &IBGP).unwrap_or_else(|n| panic!("{what}: session reset: {n}"));
        assert!(
            u.announced.is_empty() && u.withdrawn == vec![net("10.0.0.0/8")],
            "{what}: {u:?}"
        );
        assert!(
            u.problems.iter().any(|p| p.contains("treat-as-withdraw")),
            "{what}: {u:?}"
        );
    }
    // AS4_PATH and AS4_AGGREGATOR with well-known flags on a 2-octet
    // session: discarded (RFC 6793 §6), the routes kept with AS_PATH.
    for (what, a) in [
        (
            "AS4_PATH well-known",
            attr(WELL_KNOWN, 17, &[2, 1, 0, 1, 0, 0]),
        ),
        (
            "AS4_AGGREGATOR well-known",
            attr(WELL_KNOWN, 18, &[0, 1, 0, 0, 192, 0, 2, 1]),
        ),
    ] {
        let u = receive(&two_octet_update(a), &two_octet())
            .unwrap_or_else(|n| panic!("{what}: session reset: {n}"));
        assert_eq!(u.announced, vec![net("10.0.0.0/8")], "{what}: {u:?}");
        assert!(
            u.problems.iter().any(|p| p.contains("discard")),
            "{what}: {u:?}"
        );
        assert_eq!(u.attrs.as_path_flat(), vec![23456], "{what}: {u:?}");
    }
}

// ---- §4 lengths

#[test]
fn attribute_overrunning_the_attribute_list_is_treat_as_withdraw() {
    // MED claims 9 octets; the list ends after 4.
    let mut m = with(&[]);
    let med = [OPT, 4, 9, 0, 0, 0, 1];
    let at = m.len() - NLRI.len();
    m.splice(at..at, med);
    let total = u16::from_be_bytes([m[21], m[22]]) + med.len() as u16;
    m[21..23].copy_from_slice(&total.to_be_bytes());
    let len = m.len() as u16;
    m[16..18].copy_from_slice(&len.to_be_bytes());
    withdrawn(&m, &IBGP);
}

#[test]
fn attribute_header_cut_short_is_treat_as_withdraw() {
    let mut m = with(&[]);
    let at = m.len() - NLRI.len();
    m.splice(at..at, [OPT, 4]);
    let total = u16::from_be_bytes([m[21], m[22]]) + 2;
    m[21..23].copy_from_slice(&total.to_be_bytes());
    let len = m.len() as u16;
    m[16..18].copy_from_slice(&len.to_be_bytes());
    withdrawn(&m, &IBGP);
}

#[test]
fn lengths_that_overrun_the_message_are_session_reset() {
    let mut m = with(&[]);
    m[19..21].copy_from_slice(&200u16.to_be_bytes());
    reset(&m, &IBGP, UpdateMessageError::MalformedAttributeList);
    let mut m = with(&[]);
    m[21..23].copy_from_slice(&200u16.to_be_bytes());
    reset(&m, &IBGP, UpdateMessageError::MalformedAttributeList);
}

// ---- §5.3 prefix fields

#[test]
fn unparseable_nlri_is_session_reset() {
    let attrs = [origin(), as_path(), next_hop()];
    reset(
        &message(&[], &attrs, &[33, 10, 0, 0, 0, 0]),
        &IBGP,
        UpdateMessageError::InvalidNetworkField,
    );
    reset(
        &message(&[], &attrs, &[24, 10, 0]),
        &IBGP,
        UpdateMessageError::InvalidNetworkField,
    );
    reset(
        &message(&[40, 10], &[], &[]),
        &IBGP,
        UpdateMessageError::InvalidNetworkField,
    );
}

// ---- §3 d missing mandatory attributes

#[test]
fn missing_mandatory_attribute_is_treat_as_withdraw() {
    withdrawn(&message(&[], &[origin(), next_hop()], NLRI), &IBGP);
    withdrawn(&message(&[], &[origin(), as_path()], NLRI), &IBGP);
}

// ---- RFC 4271 §6.3: an unrecognised well-known attribute

#[test]
fn unrecognised_well_known_attribute_is_session_reset() {
    reset(
        &with(&[attr(WELL_KNOWN, 200, &[1])]),
        &IBGP,
        UpdateMessageError::UnrecognizedWellKnownAttribute,
    );
}

#[test]
fn unknown_optional_transitive_travels_on() {
    let u = kept(&with(&[attr(OPT_TRANS, 200, &[1, 2])]), &IBGP);
    assert_eq!(u.attrs.unknown.len(), 1);
}

// ---- Non-unicast prefixes (RFC 4271 §6.3): logged and ignored

#[test]
fn multicast_and_class_e_prefixes_are_ignored_not_a_reset() {
    // NLRI: 224.1.0.0/16, 10/8, 240.0.0.0/4; withdrawn: 239.0.0.0/8, 192.0.2.0/24.
    let m = message(
        &[8, 239, 24, 192, 0, 2],
        &[origin(), as_path(), next_hop()],
        &[16, 224, 1, 8, 10, 4, 240],
    );
    let u = kept_with_withdrawn(&m);
    assert_eq!(u.withdrawn, vec![net("192.0.2.0/24")]);
    assert_eq!(
        u.problems
            .iter()
            .filter(|p| p.contains("not a unicast prefix"))
            .count(),
        3,
        "{u:?}"
    );
}

fn kept_with_withdrawn(m: &[u8]) -> Update {
    let u = receive(m, &IBGP).unwrap_or_else(|n| panic!("session reset: {n}"));
    assert_eq!(u.announced, vec![net("10.0.0.0/8")], "{u:?}");
    u
}

#[test]
fn ipv6_multicast_prefixes_are_ignored_not_a_reset() {
    let m = v6_update(mp_reach_v6(
        16,
        &[16, 0xff, 0x02, 32, 0x20, 0x01, 0x0d, 0xb8],
    ));
    let u = receive(&m, &IBGP).unwrap_or_else(|n| panic!("session reset: {n}"));
    assert_eq!(u.announced, vec![net("2001:db8::/32")], "{u:?}");
    let m = message(&[], &[attr(OPT, 15, &[0, 2, 1, 8, 0xff])], &[]);
    let u = receive(&m, &IBGP).unwrap_or_else(|n| panic!("session reset: {n}"));
    assert!(u.withdrawn.is_empty(), "{u:?}");
}

#[test]
fn withdrawing_only_multicast_is_not_an_end_of_rib() {
    let u = receive(&message(&[8, 224], &[], &[]), &IBGP).unwrap();
    assert_eq!(u.end_of_rib, None, "{u:?}");
    let u = receive(&message(&[], &[], &[]), &IBGP).unwrap();
    assert_eq!(u.end_of_rib, Some(crate::attrs::Family::Ipv4));
}
