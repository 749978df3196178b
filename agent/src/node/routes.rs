//! The node's desired FIB, from what it holds (blocks, pods) and what BGP
//! taught it. Pure, so the rules are unit-tested without a kernel.

use crate::encap::Encapsulation;
use crate::fib::{NextHop, Route};
use crate::model::crd::IPPoolSpec;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use starling_cni_proto::PodRoute;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Everything the desired set is computed from.
pub struct Inputs<'a> {
    /// Blocks this node holds: blackholed, so traffic to their unused
    /// addresses is dropped here instead of looping towards the default route.
    pub blocks: &'a [IpNet],
    /// Blocks of `blocks` other nodes borrow from: a learned host route
    /// inside one (a borrowed address) is accepted, unless a pod here
    /// holds the address.
    pub lent: &'a [IpNet],
    pub pods: &'a [PodRoute],
    /// Best paths learned over BGP: prefix → next hops (ECMP when several).
    pub learned: &'a BTreeMap<IpNet, Vec<IpAddr>>,
    pub pools: &'a [IPPoolSpec],
    /// This node's own addresses; a path through one of them is ignored.
    pub own: &'a [IpAddr],
}

/// Why a learned prefix was kept out of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RefusedReason {
    /// Covers or sits inside one of this node's own addresses: it would
    /// steal the node's own traffic (the default route, which covers
    /// everything, is allowed).
    NodeAddress,
    /// Inside a block this node holds: it would steal its pods' traffic.
    OwnBlock,
    /// Link-local (169.254.0.0/16, fe80::/10): never routed off the link.
    LinkLocal,
    /// Loopback (127.0.0.0/8, ::1).
    Loopback,
}

impl RefusedReason {
    pub const ALL: [RefusedReason; 4] = [
        RefusedReason::NodeAddress,
        RefusedReason::OwnBlock,
        RefusedReason::LinkLocal,
        RefusedReason::Loopback,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RefusedReason::NodeAddress => "node_address",
            RefusedReason::OwnBlock => "own_block",
            RefusedReason::LinkLocal => "link_local",
            RefusedReason::Loopback => "loopback",
        }
    }
}

/// A learned prefix the import path refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub prefix: IpNet,
    pub reason: RefusedReason,
}

/// Would installing `prefix` hijack this node? Checked before anything a
/// peer taught us reaches the kernel.
pub fn hijack(prefix: &IpNet, blocks: &[IpNet], own: &[IpAddr]) -> Option<RefusedReason> {
    let overlaps = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
    let link_local: [IpNet; 2] = [
        IpNet::V4("169.254.0.0/16".parse().ok()?),
        IpNet::V6("fe80::/10".parse().ok()?),
    ];
    let loopback: [IpNet; 2] = [
        IpNet::V4("127.0.0.0/8".parse().ok()?),
        IpNet::V6("::1/128".parse().ok()?),
    ];
    // The default route covers every range; it is refused only by what
    // it is, never for covering them.
    let specific = prefix.prefix_len() > 0;
    if specific && loopback.iter().any(|l| overlaps(l, prefix)) {
        return Some(RefusedReason::Loopback);
    }
    if specific && link_local.iter().any(|l| overlaps(l, prefix)) {
        return Some(RefusedReason::LinkLocal);
    }
    if specific && own.iter().any(|a| prefix.contains(a)) {
        return Some(RefusedReason::NodeAddress);
    }
    // Strictly inside one of our blocks (the block itself echoed back is
    // simply ours, see `desired`).
    if blocks
        .iter()
        .any(|b| b.contains(prefix) && b.prefix_len() < prefix.prefix_len())
    {
        return Some(RefusedReason::OwnBlock);
    }
    None
}

/// How traffic to `prefix` travels, from the pool that contains it (Felix's
/// rule: the pool's mode; prefixes outside every pool go plain). IPIP is
/// IPv4 only (the model refuses `ipipMode` on IPv6 pools); VXLAN is either
/// family, over an underlay of the prefix's family.
pub fn encapsulation(pools: &[IPPoolSpec], prefix: &IpNet) -> Encapsulation {
    let encap = pools
        .iter()
        .filter(|p| p.cidr.contains(prefix))
        // The most specific pool decides when pools nest.
        .max_by_key(|p| p.cidr.prefix_len())
        .map_or(Encapsulation::None, IPPoolSpec::encapsulation);
    match encap {
        Encapsulation::Ipip(_) if prefix.addr().is_ipv6() => Encapsulation::None,
        e => e,
    }
}

/// The routes the reconciler should converge the kernel to, and the learned
/// prefixes refused as hijacks.
pub struct Desired {
    pub routes: Vec<Route>,
    pub refused: Vec<Refused>,
}

/// The routes the reconciler should converge the kernel to.
pub fn desired(i: &Inputs) -> Desired {
    let mut refused = Vec::new();
    let mut out: BTreeMap<IpNet, Route> = BTreeMap::new();
    for b in i.blocks {
        out.insert(*b, Route::blackhole(*b));
    }
    for p in i.pods {
        out.insert(
            p.destination,
            Route::device(p.destination, p.device.clone()),
        );
    }
    for (prefix, hops) in i.learned {
        // Our own block or pod echoed back by a peer: ours wins.
        if out.contains_key(prefix) {
            continue;
        }
        let borrowed = prefix.prefix_len() == prefix.max_prefix_len()
            && i.lent.iter().any(|b| b.contains(prefix));
        let reason = hijack(prefix, i.blocks, i.own)
            .filter(|r| !(borrowed && *r == RefusedReason::OwnBlock));
        if let Some(reason) = reason {
            refused.push(Refused {
                prefix: *prefix,
                reason,
            });
            continue;
        }
        let encap = encapsulation(i.pools, prefix);
        let hops: BTreeSet<IpAddr> = hops
            .iter()
            .filter(|h| !i.own.contains(h) && h.is_ipv4() == prefix.addr().is_ipv4())
            .copied()
            .collect();
        if hops.is_empty() {
            continue;
        }
        let hops = hops
            .into_iter()
            .map(|gateway| NextHop { gateway, encap })
            .collect();
        out.insert(*prefix, Route::ecmp(*prefix, hops));
    }
    Desired {
        routes: out.into_values().collect(),
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encap::EncapMode;
    use crate::fib::RouteTarget;
    use crate::model::crd::IpipMode;

    #[test]
    fn vxlan_pools_give_their_mode_to_learned_prefixes() {
        let mut vx = pool("10.244.0.0/16", IpipMode::Never);
        vx.vxlan_mode = crate::model::crd::VxlanMode::CrossSubnet;
        let learned = BTreeMap::from([(net("10.244.2.0/26"), vec![ip("198.51.100.2")])]);
        let got = desired(&Inputs {
            lent: &[],
            blocks: &[],
            pods: &[],
            learned: &learned,
            pools: &[vx],
            own: &[],
        })
        .routes;
        assert_eq!(
            got[0].target,
            RouteTarget::Via(vec![NextHop {
                gateway: ip("198.51.100.2"),
                encap: Encapsulation::Vxlan(EncapMode::CrossSubnet)
            }])
        );
    }

    fn pool(cidr: &str, mode: IpipMode) -> IPPoolSpec {
        serde_json::from_value(serde_json::json!({"cidr": cidr})).map_or_else(
            |e| panic!("pool {cidr}: {e}"),
            |mut p: IPPoolSpec| {
                p.ipip_mode = mode;
                p
            },
        )
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn encapsulation_follows_the_most_specific_pool() {
        let pools = [
            pool("10.0.0.0/8", IpipMode::Always),
            pool("10.244.0.0/16", IpipMode::CrossSubnet),
        ];
        assert_eq!(
            encapsulation(&pools, &net("10.244.1.0/26")),
            Encapsulation::Ipip(EncapMode::CrossSubnet)
        );
        assert_eq!(
            encapsulation(&pools, &net("10.1.0.0/26")),
            Encapsulation::Ipip(EncapMode::Always)
        );
        assert_eq!(
            encapsulation(&pools, &net("192.0.2.0/24")),
            Encapsulation::None
        );
        assert_eq!(
            encapsulation(&pools, &net("fd00::/64")),
            Encapsulation::None
        );
        let mut vx6 = pool("fd00:10:244::/56", IpipMode::Never);
        vx6.vxlan_mode = crate::model::crd::VxlanMode::Always;
        assert_eq!(
            encapsulation(&[vx6], &net("fd00:10:244::40/122")),
            Encapsulation::Vxlan(EncapMode::Always)
        );
    }

    #[test]
    fn local_routes_win_and_own_next_hops_are_dropped() {
        let pools = [pool("10.244.0.0/16", IpipMode::Never)];
        let blocks = [net("10.244.1.0/26")];
        let pods = [PodRoute {
            destination: net("10.244.1.5/32"),
            device: "sta1".into(),
            pod: None,
        }];
        let learned = BTreeMap::from([
            // Our own block, reflected back to us.
            (net("10.244.1.0/26"), vec![ip("192.0.2.2")]),
            (net("10.244.2.0/26"), vec![ip("192.0.2.2")]),
            // Only through ourselves: unusable.
            (net("10.244.3.0/26"), vec![ip("192.0.2.1")]),
            (
                net("10.244.4.0/26"),
                vec![ip("192.0.2.4"), ip("192.0.2.3"), ip("192.0.2.3")],
            ),
        ]);
        let own = [ip("192.0.2.1")];
        let got = desired(&Inputs {
            lent: &[],
            blocks: &blocks,
            pods: &pods,
            learned: &learned,
            pools: &pools,
            own: &own,
        })
        .routes;
        let find = |p: &str| got.iter().find(|r| r.dst == net(p)).map(|r| &r.target);
        assert_eq!(find("10.244.1.0/26"), Some(&RouteTarget::Blackhole));
        assert_eq!(
            find("10.244.1.5/32"),
            Some(&RouteTarget::Device("sta1".into()))
        );
        assert_eq!(
            find("10.244.2.0/26"),
            Some(&RouteTarget::Via(vec![NextHop {
                gateway: ip("192.0.2.2"),
                encap: Encapsulation::None
            }]))
        );
        assert_eq!(find("10.244.3.0/26"), None);
        match find("10.244.4.0/26") {
            Some(RouteTarget::Via(hops)) => assert_eq!(
                hops.iter().map(|h| h.gateway).collect::<Vec<_>>(),
                vec![ip("192.0.2.3"), ip("192.0.2.4")]
            ),
            other => panic!("expected an ECMP route, got {other:?}"),
        }
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn hijacking_prefixes_are_refused_by_reason() {
        let blocks = [net("10.244.1.0/26")];
        let own = [ip("192.0.2.1"), ip("2001:db8::1")];
        let learned: BTreeMap<IpNet, Vec<IpAddr>> = [
            ("0.0.0.0/0", None),
            ("::/0", None),
            ("10.0.0.0/8", None),
            ("10.244.2.0/26", None),
            ("192.0.2.1/32", Some(RefusedReason::NodeAddress)),
            ("192.0.2.0/25", Some(RefusedReason::NodeAddress)),
            ("2001:db8::/64", Some(RefusedReason::NodeAddress)),
            ("10.244.1.5/32", Some(RefusedReason::OwnBlock)),
            ("10.244.1.32/27", Some(RefusedReason::OwnBlock)),
            ("169.254.0.0/16", Some(RefusedReason::LinkLocal)),
            ("169.254.169.254/32", Some(RefusedReason::LinkLocal)),
            ("fe80::/64", Some(RefusedReason::LinkLocal)),
            ("127.0.0.0/8", Some(RefusedReason::Loopback)),
            ("127.0.0.1/32", Some(RefusedReason::Loopback)),
            ("::1/128", Some(RefusedReason::Loopback)),
        ]
        .iter()
        .map(|(p, why)| {
            let p = net(p);
            assert_eq!(hijack(&p, &blocks, &own), *why, "{p}");
            let hop = if p.addr().is_ipv4() {
                ip("192.0.2.2")
            } else {
                ip("2001:db8::2")
            };
            (p, vec![hop])
        })
        .collect();
        let got = desired(&Inputs {
            lent: &[],
            blocks: &blocks,
            pods: &[],
            learned: &learned,
            pools: &[],
            own: &own,
        });
        assert_eq!(got.refused.len(), 11, "{:?}", got.refused);
        for r in &got.refused {
            assert!(
                got.routes.iter().all(|route| route.dst != r.prefix),
                "{} refused yet installed",
                r.prefix
            );
        }
        // Five accepted plus our blackholed block.
        assert_eq!(got.routes.len(), 5, "{:?}", got.routes);
    }
}
