//! UPDATE, received, before the parser: RFC 7606 on the raw bytes.
//!
//! netgauze parses an UPDATE as one unit, and an error anywhere in it (an
//! attribute one octet too long, a multicast prefix) fails the whole message,
//! which would leave its error, not RFC 7606, deciding whether the session is
//! reset. So every UPDATE first goes through `screen_update`: it walks the
//! withdrawn routes, each path attribute and the NLRI by their own length
//! fields, checks each attribute the speaker knows against the rule RFC 7606
//! §7 (and the RFC it points to) gives it, and rebuilds the message without
//! the attributes it discards, the repeats it drops and the prefixes it
//! ignores. netgauze then only ever sees clean bytes; what was wrong is
//! carried beside them as `Screened` (treat-as-withdraw, problems for the
//! log, the End-of-RIB marker the original message was).
//!
//! Each rule is one match arm in `attribute_rule`, and docs/bgp.md lists
//! every rule with the test that proves it (`rfc7606_tests.rs`).

use super::iana::AS4_AGGREGATOR;
use super::notification::{Notify, UpdateMessageError};
use crate::attrs::Family;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Path attribute type codes (IANA "BGP Path Attributes") the screen knows.
pub(super) mod code {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MULTI_EXIT_DISC: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const COMMUNITIES: u8 = 8;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH_NLRI: u8 = 14;
    pub const MP_UNREACH_NLRI: u8 = 15;
    pub const EXTENDED_COMMUNITIES: u8 = 16;
    pub const AS4_PATH: u8 = 17;
    pub const AS4_AGGREGATOR: u8 = super::AS4_AGGREGATOR;
    pub const IPV6_EXTENDED_COMMUNITIES: u8 = 25;
    pub const LARGE_COMMUNITY: u8 = 32;
}

/// Attribute flag bits (RFC 4271 §4.3).
const OPTIONAL: u8 = 0x80;
const TRANSITIVE: u8 = 0x40;
const PARTIAL: u8 = 0x20;
const EXTENDED_LENGTH: u8 = 0x10;

/// What the screen needs to know of the session.
#[derive(Clone, Copy, Debug)]
pub struct Screen {
    /// Both sides advertised 4-octet AS numbers (RFC 6793).
    pub four_octet: bool,
    /// The peer is external: LOCAL_PREF, ORIGINATOR_ID and CLUSTER_LIST
    /// from it are discarded (RFC 7606 §7.5, §7.9, §7.10).
    pub ebgp: bool,
    /// Our address on the session: a next hop equal to it is invalid (RFC
    /// 4271 §6.3, RFC 7606 §7.3).
    pub local_addr: Option<IpAddr>,
}

/// An UPDATE after the screen: clean bytes for the parser and what was wrong.
#[derive(Clone, Debug, Default)]
pub struct Screened {
    /// The rebuilt message, header included; never longer than the original.
    pub message: Vec<u8>,
    /// RFC 7606 §2 treat-as-withdraw: every prefix the message announces is
    /// to be handled as withdrawn.
    pub treat_as_withdraw: bool,
    /// What was discarded, ignored or withdrawn and why, for the log.
    pub problems: Vec<String>,
    /// The original message was an End-of-RIB marker (RFC 4724 §2); judged
    /// before anything was stripped, so a message that only withdrew ignored
    /// prefixes is not mistaken for one.
    pub end_of_rib: Option<Family>,
    /// Prefixes in the UPDATE's own NLRI field (after filtering); only they
    /// need the NEXT_HOP attribute (RFC 4760 §3).
    pub nlri_field: usize,
}

/// What RFC 7606 §2 lets a receiver do about one attribute's error (the
/// third, session reset, is an `Err`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Approach {
    /// Nothing wrong: keep the attribute.
    Keep,
    /// Drop the attribute, keep the rest (§2 "attribute discard").
    Discard(String),
    /// Drop the attribute and handle the announced prefixes as withdrawn.
    Withdraw(String),
}

/// Screen one framed UPDATE (header included). `Err` is the NOTIFICATION of
/// the few errors RFC 7606 leaves to session reset: the message's own
/// lengths do not add up (§4; RFC 4271 §6.3), a prefix field cannot be parsed
/// (§5.3), MP_REACH_NLRI or MP_UNREACH_NLRI is repeated (§3 g) or its NLRI
/// cannot be located (§7.11, §7.12).
pub fn screen_update(msg: &[u8], s: &Screen) -> Result<Screened, Notify> {
    let body = msg.get(19..).unwrap_or_default();
    let reset = |error: UpdateMessageError, why: String| Err(Notify::new(error, vec![], why));
    let Some(wlen) = be16(body, 0) else {
        return reset(
            UpdateMessageError::MalformedAttributeList,
            "UPDATE too short".into(),
        );
    };
    let Some(alen) = be16(body, 2 + wlen) else {
        return reset(
            UpdateMessageError::MalformedAttributeList,
            format!("Withdrawn Routes Length {wlen} overruns the message (RFC 4271 §6.3)"),
        );
    };
    let attrs_at = 4 + wlen;
    if attrs_at + alen > body.len() {
        return reset(
            UpdateMessageError::MalformedAttributeList,
            format!("Total Path Attribute Length {alen} overruns the message (RFC 4271 §6.3)"),
        );
    }
    let mut out = Screened::default();
    let withdrawn = prefixes(
        &body[2..2 + wlen],
        Family::Ipv4,
        "Withdrawn Routes",
        &mut out,
    )?;
    let nlri = prefixes(&body[attrs_at + alen..], Family::Ipv4, "NLRI", &mut out)?;
    out.nlri_field = nlri.count;
    let mut walk = Walk {
        s,
        out: &mut out,
        attrs: Vec::with_capacity(alen),
        seen: [false; 256],
        withdraw: false,
        has_nlri_field: nlri.count > 0,
        count: 0,
        unreach_only: None,
    };
    walk.attributes(&body[attrs_at..attrs_at + alen])?;
    let Walk {
        attrs,
        withdraw,
        count,
        unreach_only,
        ..
    } = walk;
    out.treat_as_withdraw = withdraw;
    // RFC 4724 §2: an UPDATE with nothing in it is the IPv4 End-of-RIB; one
    // whose only attribute is an empty MP_UNREACH_NLRI is that family's.
    if wlen == 0 && nlri.bytes.is_empty() {
        out.end_of_rib = match (count, unreach_only) {
            (0, _) => Some(Family::Ipv4),
            (1, Some(f)) => Some(f),
            _ => None,
        };
    }
    let mut m = Vec::with_capacity(msg.len());
    m.extend_from_slice(&msg[..16]);
    m.extend_from_slice(&[0, 0, 2]);
    m.extend_from_slice(&(withdrawn.bytes.len() as u16).to_be_bytes());
    m.extend_from_slice(&withdrawn.bytes);
    m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&attrs);
    m.extend_from_slice(&nlri.bytes);
    let len = (m.len() as u16).to_be_bytes();
    m[16..18].copy_from_slice(&len);
    out.message = m;
    Ok(out)
}

/// The walk over one message's path attributes.
struct Walk<'a> {
    s: &'a Screen,
    out: &'a mut Screened,
    /// The attributes that pass, re-encoded.
    attrs: Vec<u8>,
    seen: [bool; 256],
    withdraw: bool,
    has_nlri_field: bool,
    /// Attributes in the original message, for the End-of-RIB test.
    count: usize,
    /// The family of an MP_UNREACH_NLRI with no prefixes.
    unreach_only: Option<Family>,
}

impl Walk<'_> {
    fn attributes(&mut self, mut rest: &[u8]) -> Result<(), Notify> {
        while !rest.is_empty() {
            // RFC 7606 §4: an attribute header or value that runs past the
            // Total Path Attribute Length is treat-as-withdraw, and that
            // length (not the attribute's) locates the NLRI.
            let ext = rest[0] & EXTENDED_LENGTH != 0;
            let hdr = if ext { 4 } else { 3 };
            let len = match (rest.len() >= hdr, ext) {
                (false, _) => None,
                (true, true) => be16(rest, 2),
                (true, false) => Some(rest[2] as usize),
            };
            let Some(len) = len.filter(|l| hdr + l <= rest.len()) else {
                self.withdraw(format!(
                    "path attribute {} overruns the Total Path Attribute Length (RFC 7606 §4)",
                    rest.get(1).copied().unwrap_or(0)
                ));
                return Ok(());
            };
            let (flags, code) = (rest[0], rest[1]);
            let value = &rest[hdr..hdr + len];
            rest = &rest[hdr + len..];
            self.count += 1;
            if std::mem::replace(&mut self.seen[code as usize], true) {
                // RFC 7606 §3 g.
                if matches!(code, code::MP_REACH_NLRI | code::MP_UNREACH_NLRI) {
                    return Err(Notify::new(
                        UpdateMessageError::MalformedAttributeList,
                        vec![],
                        format!("attribute {code} appears twice (RFC 7606 §3 g)"),
                    ));
                }
                self.out.problems.push(format!(
                    "repeated attribute {code} discarded, the first kept (RFC 7606 §3 g)"
                ));
                continue;
            }
            // The MP attributes go on with their own flags (optional,
            // non-transitive) whatever the peer set: a conflict is already
            // treat-as-withdraw, and their prefixes must still be read.
            let (flags, kept) = match code {
                code::MP_REACH_NLRI => (OPTIONAL, self.mp_reach(flags, value)?),
                code::MP_UNREACH_NLRI => (OPTIONAL, self.mp_unreach(flags, value)?),
                _ => (
                    flags,
                    match self.attribute_rule(flags, code, value) {
                        Approach::Keep => Some(value.to_vec()),
                        Approach::Discard(why) => {
                            self.out.problems.push(format!(
                                "attribute {code} discarded (RFC 7606 attribute discard): {why}"
                            ));
                            None
                        }
                        Approach::Withdraw(why) => {
                            self.withdraw(format!("attribute {code}: {why}"));
                            None
                        }
                    },
                ),
            };
            if let Some(v) = kept {
                self.push(flags, code, &v);
            }
        }
        Ok(())
    }

    fn withdraw(&mut self, why: String) {
        self.withdraw = true;
        self.out
            .problems
            .push(format!("treat-as-withdraw (RFC 7606): {why}"));
    }

    /// Re-encode an attribute that passed: the unused low flag bits cleared
    /// (RFC 4271 §4.3: ignored when received), Partial only where it may be
    /// set, the Extended Length bit only where the value needs it.
    fn push(&mut self, flags: u8, code: u8, value: &[u8]) {
        let mut f = flags & (OPTIONAL | TRANSITIVE | PARTIAL);
        if f & (OPTIONAL | TRANSITIVE) != OPTIONAL | TRANSITIVE {
            f &= !PARTIAL;
        }
        if value.len() > 255 {
            self.attrs.extend_from_slice(&[f | EXTENDED_LENGTH, code]);
            self.attrs
                .extend_from_slice(&(value.len() as u16).to_be_bytes());
        } else {
            self.attrs.extend_from_slice(&[f, code, value.len() as u8]);
        }
        self.attrs.extend_from_slice(value);
    }

    /// RFC 7606 §7 (and the RFCs it points to), one arm per attribute the
    /// speaker knows; §3 c sends a flags conflict to the attribute's own
    /// malformed rule. Unknown attributes pass as they are (RFC 4271 §5:
    /// the decoder forwards optional transitive ones and refuses unknown
    /// well-known ones).
    fn attribute_rule(&self, flags: u8, code: u8, v: &[u8]) -> Approach {
        use Approach::*;
        let len = v.len();
        let flags_ok = |optional: bool, transitive: bool| {
            (flags & OPTIONAL != 0) == optional && (flags & TRANSITIVE != 0) == transitive
        };
        let well_known = flags_ok(false, true);
        let optional_transitive = flags_ok(true, true);
        let optional_non_transitive = flags_ok(true, false);
        let withdraw_unless = |ok: bool, why: &dyn Fn() -> String| {
            if ok { Keep } else { Withdraw(why()) }
        };
        let flags_why = || format!("flags {flags:#04x} conflict with the attribute's (§3 c)");
        let as_size = if self.s.four_octet { 4 } else { 2 };
        match code {
            // §7.1: length 1 and a defined value (RFC 4271 §5.1.1).
            code::ORIGIN if !well_known => Withdraw(flags_why()),
            code::ORIGIN => withdraw_unless(len == 1 && v[0] <= 2, &|| {
                format!("ORIGIN of length {len} or undefined value (§7.1)")
            }),
            // §7.2: segments of a known type, none empty, none overrunning.
            code::AS_PATH if !well_known => Withdraw(flags_why()),
            code::AS_PATH => match as_path_error(v, as_size) {
                None => Keep,
                Some(e) => Withdraw(format!("malformed AS_PATH: {e} (§7.2)")),
            },
            // §7.3: length 4 and a valid host address that is not ours
            // (RFC 4271 §6.3). RFC 4760 §3: without prefixes in the NLRI
            // field the attribute is ignored, so its errors only discard it.
            code::NEXT_HOP => match self.next_hop_attr_error(well_known, v) {
                None => Keep,
                Some(e) if !self.has_nlri_field => {
                    Discard(format!("{e}, and no NLRI field prefixes (RFC 4760 §3)"))
                }
                Some(e) => Withdraw(e),
            },
            // §7.4.
            code::MULTI_EXIT_DISC if !optional_non_transitive => Withdraw(flags_why()),
            code::MULTI_EXIT_DISC => withdraw_unless(len == 4, &|| {
                format!("MULTI_EXIT_DISC of length {len} (§7.4)")
            }),
            // §7.5: from an external peer discarded whatever it holds.
            code::LOCAL_PREF if self.s.ebgp => {
                Discard("LOCAL_PREF from an external peer (§7.5)".into())
            }
            code::LOCAL_PREF if !well_known => Withdraw(flags_why()),
            code::LOCAL_PREF => {
                withdraw_unless(len == 4, &|| format!("LOCAL_PREF of length {len} (§7.5)"))
            }
            // §7.6.
            code::ATOMIC_AGGREGATE if !well_known || len != 0 => Discard(format!(
                "ATOMIC_AGGREGATE with flags {flags:#04x} and length {len} (§7.6, §3 c)"
            )),
            // §7.7: 6 octets on a 2-octet session, 8 on a 4-octet one.
            code::AGGREGATOR if !optional_transitive || len != as_size + 4 => Discard(format!(
                "AGGREGATOR with flags {flags:#04x} and length {len} (§7.7, §3 c)"
            )),
            // §7.8: a non-zero multiple of 4.
            code::COMMUNITIES if !optional_transitive => Withdraw(flags_why()),
            code::COMMUNITIES => withdraw_unless(len > 0 && len.is_multiple_of(4), &|| {
                format!("COMMUNITIES of length {len} (§7.8)")
            }),
            // §7.9, §7.10 (RFC 4456 §8): iBGP-only attributes.
            code::ORIGINATOR_ID | code::CLUSTER_LIST if self.s.ebgp => Discard(format!(
                "route reflection attribute {code} from an external peer (§7.9, §7.10)"
            )),
            code::ORIGINATOR_ID | code::CLUSTER_LIST if !optional_non_transitive => {
                Withdraw(flags_why())
            }
            code::ORIGINATOR_ID => withdraw_unless(len == 4, &|| {
                format!("ORIGINATOR_ID of length {len} (§7.9)")
            }),
            code::CLUSTER_LIST => withdraw_unless(len > 0 && len.is_multiple_of(4), &|| {
                format!("CLUSTER_LIST of length {len} (§7.10)")
            }),
            // §7.14: RFC 4360 (8 octets each) and RFC 5701 (20 octets each).
            code::EXTENDED_COMMUNITIES | code::IPV6_EXTENDED_COMMUNITIES
                if !optional_transitive =>
            {
                Withdraw(flags_why())
            }
            code::EXTENDED_COMMUNITIES => {
                withdraw_unless(len > 0 && len.is_multiple_of(8), &|| {
                    format!("EXTENDED_COMMUNITIES of length {len} (§7.14)")
                })
            }
            code::IPV6_EXTENDED_COMMUNITIES => {
                withdraw_unless(len > 0 && len.is_multiple_of(20), &|| {
                    format!("IPv6 EXTENDED_COMMUNITIES of length {len} (§7.14)")
                })
            }
            // RFC 8092 §6: a non-zero multiple of 12.
            code::LARGE_COMMUNITY if !optional_transitive => Withdraw(flags_why()),
            code::LARGE_COMMUNITY => withdraw_unless(len > 0 && len.is_multiple_of(12), &|| {
                format!("LARGE_COMMUNITY of length {len} (RFC 8092 §6)")
            }),
            // RFC 6793 §3: a NEW speaker discards both from a NEW speaker;
            // §6: a malformed one is discarded.
            code::AS4_PATH | code::AS4_AGGREGATOR if self.s.four_octet => Discard(format!(
                "attribute {code} from a 4-octet AS speaker (RFC 6793 §3)"
            )),
            code::AS4_PATH | code::AS4_AGGREGATOR if !optional_transitive => Discard(format!(
                "flags {flags:#04x} conflict with the attribute's (RFC 6793 §6, §3 c)"
            )),
            code::AS4_PATH => match as_path_error(v, 4) {
                None => Keep,
                Some(e) => Discard(format!("malformed AS4_PATH: {e} (RFC 6793 §6)")),
            },
            code::AS4_AGGREGATOR if len != 8 => {
                Discard(format!("AS4_AGGREGATOR of length {len} (RFC 6793 §6)"))
            }
            _ => Keep,
        }
    }

    /// What is wrong with a NEXT_HOP attribute (RFC 7606 §7.3, §3 c).
    fn next_hop_attr_error(&self, well_known: bool, v: &[u8]) -> Option<String> {
        if !well_known {
            return Some("NEXT_HOP flags conflict with the attribute's (§3 c)".into());
        }
        let [a, b, c, d] = *v else {
            return Some(format!("NEXT_HOP of length {} (§7.3)", v.len()));
        };
        let nh = IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        self.next_hop_error(nh)
            .map(|e| format!("NEXT_HOP {nh}: {e} (§7.3)"))
    }

    /// RFC 4271 §6.3 and RFC 7606 §7.3: a next hop must be a host address
    /// (not unspecified, multicast or class E) and not the receiver's own.
    fn next_hop_error(&self, nh: IpAddr) -> Option<&'static str> {
        if Some(nh) == self.s.local_addr {
            return Some("our own address");
        }
        match nh {
            IpAddr::V4(a) if a.is_unspecified() || a.octets()[0] >= 224 => {
                Some("not a host address")
            }
            IpAddr::V6(a) if a.is_unspecified() || a.is_multicast() => Some("not a host address"),
            _ => None,
        }
    }

    /// MP_REACH_NLRI (RFC 4760 §3, RFC 7606 §7.11). `None`: drop it.
    fn mp_reach(&mut self, flags: u8, v: &[u8]) -> Result<Option<Vec<u8>>, Notify> {
        let reset = |why: String| {
            Err(Notify::new(
                UpdateMessageError::OptionalAttributeError,
                vec![],
                format!("MP_REACH_NLRI: {why} (RFC 7606 §7.11)"),
            ))
        };
        // AFI (2), SAFI (1), next hop length (1), next hop, reserved (1).
        let Some(&nh_len) = v.get(3) else {
            return reset(format!(
                "length {} leaves no room for the next hop",
                v.len()
            ));
        };
        let nh_len = nh_len as usize;
        if v.len() < 5 + nh_len {
            return reset(format!("next hop length {nh_len} overruns the attribute"));
        }
        let Some(family) = family_at(v) else {
            self.out.problems.push(format!(
                "MP_REACH_NLRI for AFI {} SAFI {} ignored: a family we do not carry",
                u16::from_be_bytes([v[0], v[1]]),
                v[2]
            ));
            return Ok(None);
        };
        // §7.11: a next hop length other than the family's means the NLRI
        // cannot be located: session reset.
        let expected: &[usize] = match family {
            Family::Ipv4 => &[4],
            Family::Ipv6 => &[16, 32],
        };
        if !expected.contains(&nh_len) {
            return reset(format!("next hop length {nh_len} for {family}"));
        }
        let nh = &v[4..4 + nh_len];
        let nlri = prefixes(&v[5 + nh_len..], family, "MP_REACH_NLRI", self.out)?;
        let global = match family {
            Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3])),
            Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&nh[..16]).unwrap_or_default(),
            )),
        };
        if flags & (OPTIONAL | TRANSITIVE) != OPTIONAL {
            self.withdraw(format!(
                "MP_REACH_NLRI flags {flags:#04x} conflict with the attribute's (§3 c)"
            ));
        } else if let Some(e) = self.next_hop_error(global) {
            // §7.11: a next hop that is invalid but locatable.
            self.withdraw(format!("MP_REACH_NLRI next hop {global}: {e} (§7.11)"));
        }
        let mut out = v[..5 + nh_len].to_vec();
        out.extend_from_slice(&nlri.bytes);
        Ok(Some(out))
    }

    /// MP_UNREACH_NLRI (RFC 4760 §4, RFC 7606 §7.12). `None`: drop it.
    fn mp_unreach(&mut self, flags: u8, v: &[u8]) -> Result<Option<Vec<u8>>, Notify> {
        if v.len() < 3 {
            return Err(Notify::new(
                UpdateMessageError::OptionalAttributeError,
                vec![],
                format!(
                    "MP_UNREACH_NLRI of length {} has no AFI/SAFI (RFC 7606 §7.12)",
                    v.len()
                ),
            ));
        }
        let Some(family) = family_at(v) else {
            self.out.problems.push(format!(
                "MP_UNREACH_NLRI for AFI {} SAFI {} ignored: a family we do not carry",
                u16::from_be_bytes([v[0], v[1]]),
                v[2]
            ));
            return Ok(None);
        };
        let nlri = prefixes(&v[3..], family, "MP_UNREACH_NLRI", self.out)?;
        if v.len() == 3 {
            self.unreach_only = Some(family);
        }
        if flags & (OPTIONAL | TRANSITIVE) != OPTIONAL {
            // §3 c; withdrawals stay withdrawals.
            self.withdraw(format!(
                "MP_UNREACH_NLRI flags {flags:#04x} conflict with the attribute's (§3 c)"
            ));
        }
        let mut out = v[..3].to_vec();
        out.extend_from_slice(&nlri.bytes);
        Ok(Some(out))
    }
}

/// Our family of the AFI/SAFI at the start of an MP attribute.
fn family_at(v: &[u8]) -> Option<Family> {
    // AFI 1 IPv4, 2 IPv6; SAFI 1 unicast (RFC 4760 §3, IANA).
    match (u16::from_be_bytes([v[0], v[1]]), v[2]) {
        (1, 1) => Some(Family::Ipv4),
        (2, 1) => Some(Family::Ipv6),
        _ => None,
    }
}

/// Why an AS_PATH (or AS4_PATH) value is malformed (RFC 7606 §7.2): a
/// segment type other than AS_SET or AS_SEQUENCE (we take no part in
/// confederations), an empty segment, or one that overruns the attribute.
fn as_path_error(mut v: &[u8], as_size: usize) -> Option<String> {
    while !v.is_empty() {
        let [kind, count, ..] = *v else {
            return Some("one octet left where a segment header should be".into());
        };
        if !matches!(kind, 1 | 2) {
            return Some(format!("segment type {kind}"));
        }
        if count == 0 {
            return Some("an empty segment".into());
        }
        let end = 2 + count as usize * as_size;
        if end > v.len() {
            return Some(format!(
                "a segment of {count} AS numbers overruns the attribute"
            ));
        }
        v = &v[end..];
    }
    None
}

/// A prefix field after the screen: the prefixes kept, re-encoded.
struct Prefixes {
    bytes: Vec<u8>,
    count: usize,
}

/// Parse a field of (length, prefix) pairs (RFC 4271 §4.3, RFC 4760 §5).
/// RFC 7606 §5.3: a length beyond the family's or a prefix that overruns the
/// field is a session reset (Invalid Network Field, RFC 4271 §6.3). RFC 4271
/// §6.3 and §9.1.3: a prefix that is not unicast (IPv4 multicast 224/4 and
/// class E 240/4, IPv6 multicast ff00::/8) is logged and ignored.
fn prefixes(
    mut field: &[u8],
    family: Family,
    what: &str,
    out: &mut Screened,
) -> Result<Prefixes, Notify> {
    let max = match family {
        Family::Ipv4 => 32,
        Family::Ipv6 => 128,
    };
    let mut kept = Prefixes {
        bytes: Vec::with_capacity(field.len()),
        count: 0,
    };
    while let Some(&bits) = field.first() {
        let n = (bits as usize).div_ceil(8);
        if bits > max || field.len() < 1 + n {
            return Err(Notify::new(
                UpdateMessageError::InvalidNetworkField,
                vec![],
                format!(
                    "{what}: prefix length {bits} in a {family} field that cannot be parsed (RFC 7606 §5.3)"
                ),
            ));
        }
        let (one, rest) = field.split_at(1 + n);
        field = rest;
        let first = one.get(1).copied().unwrap_or(0);
        let unicast = match family {
            Family::Ipv4 => first < 224,
            Family::Ipv6 => first != 0xff,
        };
        if unicast {
            kept.bytes.extend_from_slice(one);
            kept.count += 1;
        } else {
            out.problems.push(format!(
                "{what}: ignored {} (not a unicast prefix, RFC 4271 §6.3)",
                show_prefix(family, one)
            ));
        }
    }
    Ok(kept)
}

fn show_prefix(family: Family, one: &[u8]) -> String {
    let bits = one[0];
    match family {
        Family::Ipv4 => {
            let mut a = [0u8; 4];
            a[..one.len() - 1].copy_from_slice(&one[1..]);
            format!("{}/{bits}", Ipv4Addr::from(a))
        }
        Family::Ipv6 => {
            let mut a = [0u8; 16];
            a[..one.len() - 1].copy_from_slice(&one[1..]);
            format!("{}/{bits}", Ipv6Addr::from(a))
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]) as usize)
}
