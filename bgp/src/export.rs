//! The export rules, as pure functions: for a best path, where it came from
//! and the peer it would go to, the attributes we advertise, or nothing
//! (RFC 4271 §5.1 and §9.2, RFC 4456 §6 and §8, RFC 8212). The instance runs
//! them on the before and the after of every change, once per group of
//! peers with equal settings, and sends the difference (there is no
//! Adj-RIB-Out); nothing here touches a table or a socket.

use crate::attrs::{Family, PathAttrs};
use crate::policy::{self, Effective, Outcome, PrefixCommunities, RouteSource};
use crate::rib::{Best, PeerMeta, Rib, Source};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr};

/// The receiving side of an export.
#[derive(Clone, Debug)]
pub struct ExportTo<'a> {
    pub addr: IpAddr,
    pub ebgp: bool,
    pub rr_client: bool,
    pub next_hop_self: bool,
    /// eBGP: pass on the next hop of learned routes (BIRD's `next hop keep`).
    pub next_hop_keep: bool,
    /// Communities added by prefix before the export rules run.
    pub tags: &'a [PrefixCommunities],
    pub local_asn: u32,
    pub cluster_id: Ipv4Addr,
    /// Our address on this session: the next hop when we set ourselves.
    pub local_addr: IpAddr,
}

/// How a best path travels to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hop {
    /// One of our own prefixes.
    Local,
    /// Learned from a peer and passed on with eBGP on at least one side.
    Passed,
    /// iBGP to iBGP, with us as the route reflector (RFC 4456).
    Reflected { originator: Ipv4Addr },
}

/// The attributes we advertise to `to` for `best`, or `None` when the path
/// must not go there. `from` is what the RIB knows of the peer the path
/// came from (`None` for our own prefixes, or a peer already gone).
#[cfg(test)]
pub fn export_attrs(
    best: &Best,
    from: Option<&PeerMeta>,
    to: &ExportTo<'_>,
    policy: Effective,
    prefix: &IpNet,
) -> Option<PathAttrs> {
    export_path(best.source, &best.attrs, from, to, policy, prefix)
}

/// `export_attrs` for a path given as its source and attributes.
pub fn export_path(
    source: Source,
    attrs: &PathAttrs,
    from: Option<&PeerMeta>,
    to: &ExportTo<'_>,
    policy: Effective,
    prefix: &IpNet,
) -> Option<PathAttrs> {
    if policy == Effective::Blocked {
        return None;
    }
    // The checks that need no copy of the attributes come first: most
    // (prefix, peer) pairs end here in a full mesh or a big ingest.
    let hop = hop(source, from, to)?;
    let mut a = attrs.clone();
    match hop {
        Hop::Local => a.next_hop = None,
        Hop::Reflected { originator } => reflect(&mut a, originator, to.cluster_id),
        Hop::Passed => {}
    }
    let source = if hop == Hop::Local {
        RouteSource::Local
    } else {
        RouteSource::Peer
    };
    PrefixCommunities::apply(to.tags, prefix, &mut a);
    let next_hop_self = match policy::apply(policy.rules(), prefix, &mut a, source) {
        Outcome::Reject => return None,
        Outcome::Accept { next_hop_self } => next_hop_self.unwrap_or(to.next_hop_self),
    };
    if to.ebgp {
        // MED is not passed beyond the neighbouring AS (§5.1.4) unless policy sets it.
        let strip_med = hop != Hop::Local && policy == Effective::AcceptAll;
        let keep = to.next_hop_keep && hop != Hop::Local;
        to_external(&mut a, to.local_asn, strip_med, keep);
    } else {
        // A reflector does not change the next hop unless told to (RFC 4456 §10).
        let reflected = matches!(hop, Hop::Reflected { .. });
        to_internal(&mut a, next_hop_self && !reflected);
    }
    if a.next_hop.is_none() {
        a.next_hop = Some(own_next_hop(prefix, to.local_addr)?);
    }
    a.next_hop_local = None;
    Some(a)
}

/// Whether a path may go to `to` at all, and how: never back to the peer
/// it came from; iBGP to iBGP only through a reflector, where a client's
/// routes go to everyone and a non-client's only to clients (RFC 4456 §6).
fn hop(source: Source, from: Option<&PeerMeta>, to: &ExportTo<'_>) -> Option<Hop> {
    let Source::Peer(addr) = source else {
        return Some(Hop::Local);
    };
    if addr == to.addr {
        return None;
    }
    let from = from?;
    if to.ebgp || from.ebgp {
        return Some(Hop::Passed);
    }
    if !(from.rr_client || to.rr_client) {
        return None;
    }
    Some(Hop::Reflected {
        originator: from.router_id,
    })
}

/// RFC 4456 §8: ORIGINATOR_ID is the router that first put the path into
/// the cluster, kept if already there; our cluster ID goes in front of the
/// CLUSTER_LIST.
fn reflect(a: &mut PathAttrs, originator: Ipv4Addr, cluster_id: Ipv4Addr) {
    if a.originator_id.is_none() {
        a.originator_id = Some(originator);
    }
    a.cluster_list.insert(0, cluster_id);
}

/// To an external peer (RFC 4271 §5.1.2-§5.1.5, RFC 4456 §8): our AS in
/// front, our own next hop (unless `keep_next_hop`), no LOCAL_PREF, no
/// reflection attributes.
fn to_external(a: &mut PathAttrs, local_asn: u32, strip_med: bool, keep_next_hop: bool) {
    a.prepend(local_asn);
    if !keep_next_hop {
        a.next_hop = None;
    }
    a.local_pref = None;
    if strip_med {
        a.med = None;
    }
    a.originator_id = None;
    a.cluster_list.clear();
}

/// To an internal peer: LOCAL_PREF is always sent (RFC 4271 §5.1.5,
/// default 100); with next-hop-self we put our own address in.
fn to_internal(a: &mut PathAttrs, next_hop_self: bool) {
    if a.local_pref.is_none() {
        a.local_pref = Some(100);
    }
    if next_hop_self {
        a.next_hop = None;
    }
}

/// Our address on the session as the next hop, when it is of the prefix's
/// family; otherwise the path cannot be sent on this session.
fn own_next_hop(prefix: &IpNet, local_addr: IpAddr) -> Option<IpAddr> {
    (Family::of(prefix) == Family::of_addr(&local_addr)).then_some(local_addr)
}

/// The kinds of source among the paths that changed in one flush, to skip
/// peers that can receive none of it (RFC 4271 §9.2, RFC 4456 §6) without
/// looking at each prefix.
#[derive(Default)]
pub struct Kinds {
    local: bool,
    ebgp: bool,
    ibgp_client: bool,
    ibgp_other: bool,
}

impl Kinds {
    pub fn note(&mut self, best: Option<&Best>, rib: &Rib) {
        match best.map(|b| b.source) {
            None => {}
            Some(Source::Local) => self.local = true,
            Some(Source::Peer(p)) => match rib.meta(p) {
                Some(m) if m.ebgp => self.ebgp = true,
                Some(m) if m.rr_client => self.ibgp_client = true,
                _ => self.ibgp_other = true,
            },
        }
    }

    /// Whether a peer (eBGP or not, our reflector client or not) could be
    /// sent any of it. Withdrawals only matter to peers with an Adj-RIB-Out,
    /// which the caller checks.
    pub fn reach(&self, to_ebgp: bool, to_client: bool) -> bool {
        let any = self.local || self.ebgp || self.ibgp_client || self.ibgp_other;
        if to_ebgp {
            any
        } else {
            self.local || self.ebgp || self.ibgp_client || (to_client && self.ibgp_other)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::{AsSegment, SegmentKind};
    use crate::policy::PolicyRule;
    use std::sync::Arc;

    const LOCAL_ASN: u32 = 65000;
    const CLUSTER: &str = "192.0.2.100";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn prefix() -> IpNet {
        "10.0.0.0/24".parse().unwrap()
    }

    fn learned(peer: &str, nh: &str) -> Best {
        Best {
            source: Source::Peer(ip(peer)),
            attrs: Arc::new(PathAttrs {
                as_path: vec![AsSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![65001],
                }],
                next_hop: Some(ip(nh)),
                med: Some(7),
                local_pref: Some(300),
                ..Default::default()
            }),
            multipath: None,
        }
    }

    fn local_best() -> Best {
        Best {
            source: Source::Local,
            attrs: Arc::new(PathAttrs::default()),
            multipath: None,
        }
    }

    fn meta(ebgp: bool, rr_client: bool, id: &str) -> PeerMeta {
        PeerMeta {
            ebgp,
            router_id: id.parse().unwrap(),
            rr_client,
        }
    }

    fn to(addr: &str, ebgp: bool, rr_client: bool) -> ExportTo<'static> {
        ExportTo {
            addr: ip(addr),
            ebgp,
            rr_client,
            next_hop_self: false,
            next_hop_keep: false,
            tags: &[],
            local_asn: LOCAL_ASN,
            cluster_id: CLUSTER.parse().unwrap(),
            local_addr: ip("192.0.2.1"),
        }
    }

    fn export(best: &Best, from: Option<&PeerMeta>, to: &ExportTo<'_>) -> Option<PathAttrs> {
        export_attrs(best, from, to, Effective::AcceptAll, &prefix())
    }

    #[test]
    fn next_hop_keep_passes_the_learned_next_hop_to_ebgp() {
        let b = learned("192.0.2.2", "192.0.2.2");
        let from = meta(false, false, "192.0.2.2");
        let mut keep = to("198.51.100.1", true, false);
        keep.next_hop_keep = true;
        let a = export(&b, Some(&from), &keep).unwrap();
        assert_eq!(a.next_hop, Some(ip("192.0.2.2")));
        assert_eq!(a.as_path[0].asns, vec![LOCAL_ASN, 65001]);
        // Without it, and for our own prefixes either way: ours.
        let a = export(&b, Some(&from), &to("198.51.100.1", true, false)).unwrap();
        assert_eq!(a.next_hop, Some(ip("192.0.2.1")));
        let a = export(&local_best(), None, &keep).unwrap();
        assert_eq!(a.next_hop, Some(ip("192.0.2.1")));
    }

    #[test]
    fn prefix_communities_are_added_before_the_export_rules() {
        let tags: Vec<PrefixCommunities> =
            serde_yaml::from_str("[{prefix: 10.0.0.0/16, communities: [\"65000:7\"]}]").unwrap();
        let mut dest = to("192.0.2.3", false, false);
        dest.tags = &tags;
        // A rule matching the community sees it.
        let rules: Vec<PolicyRule> =
            serde_yaml::from_str("[{community: \"65000:7\", action: accept, set: {med: 9}}]")
                .unwrap();
        let a = export_attrs(
            &local_best(),
            None,
            &dest,
            Effective::Rules(&rules),
            &prefix(),
        )
        .unwrap();
        assert_eq!(a.communities, vec![(65000 << 16) | 7]);
        assert_eq!(a.med, Some(9));
        let outside: IpNet = "10.1.0.0/24".parse().unwrap();
        let a = export_attrs(&local_best(), None, &dest, Effective::AcceptAll, &outside).unwrap();
        assert!(a.communities.is_empty());
    }

    #[test]
    fn a_path_never_goes_back_to_its_peer() {
        let b = learned("192.0.2.2", "192.0.2.2");
        let m = meta(true, false, "192.0.2.2");
        assert_eq!(export(&b, Some(&m), &to("192.0.2.2", true, false)), None);
    }

    #[test]
    fn non_client_routes_are_reflected_to_clients_only() {
        let b = learned("192.0.2.2", "192.0.2.2");
        let from = meta(false, false, "192.0.2.22");
        assert_eq!(
            export(&b, Some(&from), &to("192.0.2.3", false, false)),
            None
        );
        let a = export(&b, Some(&from), &to("192.0.2.4", false, true)).unwrap();
        assert_eq!(a.originator_id, Some("192.0.2.22".parse().unwrap()));
        assert_eq!(a.cluster_list, vec![CLUSTER.parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(
            a.next_hop,
            Some(ip("192.0.2.2")),
            "a reflector keeps the next hop"
        );
        assert_eq!(a.local_pref, Some(300));
    }

    #[test]
    fn client_routes_are_reflected_to_everyone_keeping_the_first_originator() {
        let mut attrs = (*learned("192.0.2.2", "192.0.2.2").attrs).clone();
        attrs.originator_id = Some("198.51.100.1".parse().unwrap());
        attrs.cluster_list = vec!["198.51.100.9".parse().unwrap()];
        let b = Best {
            attrs: Arc::new(attrs),
            ..learned("192.0.2.2", "192.0.2.2")
        };
        let from = meta(false, true, "192.0.2.22");
        for dest in [to("192.0.2.3", false, false), to("192.0.2.4", false, true)] {
            let a = export(&b, Some(&from), &dest).unwrap();
            assert_eq!(a.originator_id, Some("198.51.100.1".parse().unwrap()));
            assert_eq!(
                a.cluster_list,
                vec![
                    CLUSTER.parse::<Ipv4Addr>().unwrap(),
                    "198.51.100.9".parse().unwrap()
                ]
            );
        }
    }

    #[test]
    fn ebgp_export_prepends_and_strips_internal_attributes() {
        let mut attrs = (*learned("192.0.2.2", "192.0.2.2").attrs).clone();
        attrs.originator_id = Some("198.51.100.1".parse().unwrap());
        attrs.cluster_list = vec!["198.51.100.9".parse().unwrap()];
        let b = Best {
            attrs: Arc::new(attrs),
            ..learned("192.0.2.2", "192.0.2.2")
        };
        let a = export(
            &b,
            Some(&meta(false, false, "192.0.2.2")),
            &to("192.0.2.9", true, false),
        )
        .unwrap();
        assert_eq!(a.as_path_flat(), vec![LOCAL_ASN, 65001]);
        assert_eq!(
            a.next_hop,
            Some(ip("192.0.2.1")),
            "our address on the session"
        );
        assert_eq!(a.local_pref, None);
        assert_eq!(a.med, None, "MED stays in the neighbouring AS");
        assert_eq!((a.originator_id, a.cluster_list.len()), (None, 0));
    }

    #[test]
    fn med_goes_out_to_ebgp_when_policy_or_origin_allows() {
        let rules = vec![serde_yaml::from_str::<PolicyRule>("{action: accept}").unwrap()];
        let b = learned("192.0.2.2", "192.0.2.2");
        let from = meta(false, false, "192.0.2.2");
        let a = export_attrs(
            &b,
            Some(&from),
            &to("192.0.2.9", true, false),
            Effective::Rules(&rules),
            &prefix(),
        )
        .unwrap();
        assert_eq!(a.med, Some(7), "an export policy keeps MED");
        let mut own = (*local_best().attrs).clone();
        own.med = Some(3);
        let own = Best {
            attrs: Arc::new(own),
            ..local_best()
        };
        assert_eq!(
            export(&own, None, &to("192.0.2.9", true, false))
                .unwrap()
                .med,
            Some(3)
        );
    }

    #[test]
    fn ibgp_gets_local_pref_and_next_hop_self_on_request() {
        let b = learned("192.0.2.2", "192.0.2.2");
        let from = meta(true, false, "192.0.2.2");
        let mut dest = to("192.0.2.3", false, false);
        let a = export(&b, Some(&from), &dest).unwrap();
        assert_eq!(a.next_hop, Some(ip("192.0.2.2")));
        assert_eq!(a.local_pref, Some(300));
        dest.next_hop_self = true;
        let a = export(&b, Some(&from), &dest).unwrap();
        assert_eq!(a.next_hop, Some(ip("192.0.2.1")));
        let own = export(&local_best(), None, &dest).unwrap();
        assert_eq!(own.local_pref, Some(100), "LOCAL_PREF defaults to 100");
        assert_eq!(own.next_hop, Some(ip("192.0.2.1")));
    }

    #[test]
    fn next_hop_self_does_not_apply_to_reflected_routes_but_policy_can_say_so() {
        let b = learned("192.0.2.2", "192.0.2.2");
        let from = meta(false, true, "192.0.2.2");
        let mut dest = to("192.0.2.3", false, false);
        dest.next_hop_self = true;
        assert_eq!(
            export(&b, Some(&from), &dest).unwrap().next_hop,
            Some(ip("192.0.2.2"))
        );
        dest.next_hop_self = false;
        let eb = meta(true, false, "192.0.2.2");
        let rules = vec![
            serde_yaml::from_str::<PolicyRule>("{action: accept, set: {next_hop_self: true}}")
                .unwrap(),
        ];
        let a = export_attrs(&b, Some(&eb), &dest, Effective::Rules(&rules), &prefix()).unwrap();
        assert_eq!(a.next_hop, Some(ip("192.0.2.1")));
    }

    #[test]
    fn rfc8212_blocks_and_policy_rejects() {
        let b = local_best();
        assert_eq!(
            export_attrs(
                &b,
                None,
                &to("192.0.2.9", true, false),
                Effective::Blocked,
                &prefix()
            ),
            None
        );
        let rules = vec![serde_yaml::from_str::<PolicyRule>("{action: reject}").unwrap()];
        assert_eq!(
            export_attrs(
                &b,
                None,
                &to("192.0.2.9", true, false),
                Effective::Rules(&rules),
                &prefix()
            ),
            None
        );
    }

    #[test]
    fn no_next_hop_of_the_prefix_family_means_no_export() {
        let b = local_best();
        let mut dest = to("2001:db8::9", true, false);
        dest.local_addr = ip("2001:db8::1");
        assert_eq!(export(&b, None, &dest), None);
        let v6: IpNet = "2001:db8:1::/48".parse().unwrap();
        let a = export_attrs(&b, None, &dest, Effective::AcceptAll, &v6).unwrap();
        assert_eq!(a.next_hop, Some(ip("2001:db8::1")));
    }

    #[test]
    fn a_path_from_a_peer_the_rib_no_longer_knows_is_not_exported() {
        let b = learned("192.0.2.2", "192.0.2.2");
        assert_eq!(export(&b, None, &to("192.0.2.9", true, false)), None);
    }
}
