//! The node's desired FIB, from what it holds (blocks, pods) and what BGP
//! taught it. Pure, so the rules are unit-tested without a kernel.

use crate::encap::Encapsulation;
use crate::fib::{NextHop, Route};
use crate::model::crd::IPPoolSpec;
use ipnet::IpNet;
use starling_cni_proto::PodRoute;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Everything the desired set is computed from.
pub struct Inputs<'a> {
    /// Blocks this node holds: blackholed, so traffic to their unused
    /// addresses is dropped here instead of looping towards the default route.
    pub blocks: &'a [IpNet],
    pub pods: &'a [PodRoute],
    /// Best paths learned over BGP: prefix → next hops (ECMP when several).
    pub learned: &'a BTreeMap<IpNet, Vec<IpAddr>>,
    pub pools: &'a [IPPoolSpec],
    /// This node's own addresses; a path through one of them is ignored.
    pub own: &'a [IpAddr],
}

/// How traffic to `prefix` travels, from the pool that contains it (Felix's
/// rule: the pool's mode; prefixes outside every pool go plain). IPIP is
/// IPv4 only, so IPv6 prefixes go plain.
pub fn encapsulation(pools: &[IPPoolSpec], prefix: &IpNet) -> Encapsulation {
    if !prefix.addr().is_ipv4() {
        return Encapsulation::None;
    }
    pools
        .iter()
        .filter(|p| p.cidr.contains(prefix))
        // The most specific pool decides when pools nest.
        .max_by_key(|p| p.cidr.prefix_len())
        .map_or(Encapsulation::None, IPPoolSpec::encapsulation)
}

/// The routes the reconciler should converge the kernel to.
pub fn desired(i: &Inputs) -> Vec<Route> {
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
            .map(|gateway| NextHop {
                gateway,
                encap: if gateway.is_ipv4() {
                    encap
                } else {
                    Encapsulation::None
                },
            })
            .collect();
        out.insert(*prefix, Route::ecmp(*prefix, hops));
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encap::EncapMode;
    use crate::fib::RouteTarget;
    use crate::model::crd::IpipMode;

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
            blocks: &blocks,
            pods: &pods,
            learned: &learned,
            pools: &pools,
            own: &own,
        });
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
}
