//! Service advertisement (Calico's `serviceClusterIPs`,
//! `serviceExternalIPs`, `serviceLoadBalancerIPs`): which prefixes this
//! node originates for Kubernetes Services.
//!
//! - Every node advertises every configured CIDR (an aggregate).
//! - A Service with `externalTrafficPolicy: Local` has the host route
//!   (/32 or /128) of each of its cluster IPs, external IPs and
//!   load-balancer ingress IPs that lies inside a configured CIDR of its
//!   kind advertised only by the nodes with a ready endpoint of it (its
//!   EndpointSlices' `endpoints[].nodeName`, `conditions.ready` not false).
//! - With `serviceLoadBalancerAggregation: Disabled` the load-balancer
//!   CIDRs are not advertised; instead every node advertises the host route
//!   of each load-balancer IP inside them of a Service that is not `Local`
//!   and has a ready endpoint somewhere.
//! - Nothing outside a configured CIDR is ever advertised.
//!
//! This module is the pure decision ([`advertised`]) over a small digest of
//! the Services and EndpointSlices ([`Catalog`]); [`watch`] fills the
//! digest from the API server.

pub mod watch;

use crate::model::BGPConfigurationSpec;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The configured CIDRs, by kind of address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges {
    pub cluster: Vec<IpNet>,
    pub external: Vec<IpNet>,
    pub load_balancer: Vec<IpNet>,
    /// `serviceLoadBalancerAggregation: Disabled`: instead of the
    /// load-balancer CIDRs, every node advertises the host route of each
    /// load-balancer IP inside them of a Service with a ready endpoint.
    pub load_balancer_host_routes: bool,
}

impl Ranges {
    pub fn from_spec(spec: &BGPConfigurationSpec) -> Ranges {
        let cidrs = |v: &[crate::model::crd::ServiceClusterIPBlock]| -> Vec<IpNet> {
            v.iter().map(|b| b.cidr.trunc()).collect()
        };
        Ranges {
            cluster: cidrs(&spec.service_cluster_ips),
            external: cidrs(&spec.service_external_ips),
            load_balancer: cidrs(&spec.service_load_balancer_ips),
            load_balancer_host_routes: spec.service_load_balancer_aggregation
                == Some(crate::model::crd::Aggregation::Disabled),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cluster.is_empty() && self.external.is_empty() && self.load_balancer.is_empty()
    }

    /// Every configured CIDR.
    pub fn all(&self) -> impl Iterator<Item = &IpNet> {
        self.cluster
            .iter()
            .chain(&self.external)
            .chain(&self.load_balancer)
    }

    /// Inside one of the configured CIDRs (of any kind): a learned prefix
    /// there is a Service route of another node, not for the kernel.
    pub fn covers(&self, prefix: &IpNet) -> bool {
        self.all().any(|r| r.contains(prefix))
    }
}

/// What the decision needs of one Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `externalTrafficPolicy: Local` on a ClusterIP, NodePort or
    /// LoadBalancer Service that has a cluster IP.
    pub local: bool,
    /// `spec.clusterIPs` (or `spec.clusterIP`).
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<IpAddr>,
}

/// `namespace/name`.
pub type ServiceKey = (String, String);

/// The Services and, per Service, the nodes with a ready endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub services: BTreeMap<ServiceKey, ServiceInfo>,
    pub ready_nodes: BTreeMap<ServiceKey, BTreeSet<String>>,
    /// Both kinds have been listed once: what is missing is not there.
    pub synced: bool,
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// The prefixes `node` originates for Services: every configured CIDR, and
/// the host routes of the `Local` Services it has a ready endpoint of,
/// where they lie inside a configured CIDR of their kind.
///
/// With `load_balancer_host_routes` the load-balancer CIDRs themselves are
/// not advertised; every node advertises the host route of each
/// load-balancer IP inside them of a Service that is not `Local` and has a
/// ready endpoint somewhere (Calico's `serviceLoadBalancerAggregation:
/// Disabled`), so a Service without endpoints is withdrawn everywhere.
pub fn advertised(ranges: &Ranges, catalog: &Catalog, node: &str) -> BTreeSet<IpNet> {
    let mut out: BTreeSet<IpNet> = ranges
        .cluster
        .iter()
        .chain(&ranges.external)
        .copied()
        .collect();
    if !ranges.load_balancer_host_routes {
        out.extend(ranges.load_balancer.iter().copied());
    }
    for (key, svc) in &catalog.services {
        let ready = catalog.ready_nodes.get(key);
        if !svc.local {
            if ranges.load_balancer_host_routes && ready.is_some_and(|n| !n.is_empty()) {
                for ip in &svc.load_balancer_ips {
                    if ranges.load_balancer.iter().any(|r| r.contains(ip)) {
                        out.insert(host(*ip));
                    }
                }
            }
            continue;
        }
        if !ready.is_some_and(|n| n.contains(node)) {
            continue;
        }
        for (ips, within) in [
            (&svc.cluster_ips, &ranges.cluster),
            (&svc.external_ips, &ranges.external),
            (&svc.load_balancer_ips, &ranges.load_balancer),
        ] {
            for ip in ips {
                if within.iter().any(|r| r.contains(ip)) {
                    out.insert(host(*ip));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn key(n: &str) -> ServiceKey {
        ("default".into(), n.into())
    }

    fn ranges() -> Ranges {
        Ranges {
            cluster: vec![net("10.96.0.0/16"), net("fd00:96::/112")],
            external: vec![net("198.51.100.0/24")],
            load_balancer: vec![net("203.0.113.0/24")],
            load_balancer_host_routes: false,
        }
    }

    #[test]
    fn without_aggregation_load_balancer_ips_go_one_by_one_from_every_node() {
        let r = Ranges {
            load_balancer_host_routes: true,
            ..ranges()
        };
        let mut c = catalog();
        c.services.insert(
            key("lb"),
            ServiceInfo {
                local: false,
                cluster_ips: vec![ip("10.96.0.30")],
                external_ips: vec![],
                // The second is outside every load-balancer CIDR.
                load_balancer_ips: vec![ip("203.0.113.30"), ip("192.0.2.30")],
            },
        );
        c.services.insert(
            key("lb-no-endpoints"),
            ServiceInfo {
                local: false,
                cluster_ips: vec![ip("10.96.0.31")],
                external_ips: vec![],
                load_balancer_ips: vec![ip("203.0.113.31")],
            },
        );
        c.ready_nodes
            .insert(key("lb"), ["node2".to_string()].into());
        for node in ["node1", "node2", "node3"] {
            let a = advertised(&r, &c, node);
            assert!(!a.contains(&net("203.0.113.0/24")), "{node}: {a:?}");
            assert!(a.contains(&net("203.0.113.30/32")), "{node}: {a:?}");
            assert!(!a.contains(&net("192.0.2.30/32")), "{node}: {a:?}");
            assert!(!a.contains(&net("203.0.113.31/32")), "{node}: {a:?}");
            // The other kinds keep their CIDRs.
            assert!(a.contains(&net("10.96.0.0/16")) && a.contains(&net("198.51.100.0/24")));
        }
        // The Local Service's load-balancer IP: from node1 only, as before.
        assert!(advertised(&r, &c, "node1").contains(&net("203.0.113.5/32")));
        assert!(!advertised(&r, &c, "node2").contains(&net("203.0.113.5/32")));
        // Learned host routes inside the CIDR are still Service routes.
        assert!(r.covers(&net("203.0.113.30/32")));
    }

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        c.services.insert(
            key("web"),
            ServiceInfo {
                local: true,
                cluster_ips: vec![ip("10.96.0.10"), ip("fd00:96::10")],
                // The second is outside every external CIDR.
                external_ips: vec![ip("198.51.100.7"), ip("192.0.2.77")],
                // A load-balancer IP inside the *external* CIDR only: not
                // advertised, each kind has its own CIDRs.
                load_balancer_ips: vec![ip("203.0.113.5"), ip("198.51.100.9")],
            },
        );
        c.services.insert(
            key("cluster-wide"),
            ServiceInfo {
                local: false,
                cluster_ips: vec![ip("10.96.0.20")],
                external_ips: vec![ip("198.51.100.20")],
                load_balancer_ips: vec![],
            },
        );
        c.ready_nodes
            .insert(key("web"), ["node1".to_string()].into());
        c.ready_nodes.insert(
            key("cluster-wide"),
            ["node1".to_string(), "node2".into()].into(),
        );
        c
    }

    #[test]
    fn every_node_advertises_the_cidrs() {
        let r = ranges();
        let got = advertised(&r, &Catalog::default(), "node9");
        let want: BTreeSet<IpNet> = r.all().copied().collect();
        assert_eq!(got, want);
        assert!(advertised(&Ranges::default(), &catalog(), "node1").is_empty());
    }

    #[test]
    fn local_services_add_host_routes_only_on_nodes_with_a_ready_endpoint() {
        let r = ranges();
        let on1 = advertised(&r, &catalog(), "node1");
        let hosts: BTreeSet<IpNet> = on1
            .iter()
            .filter(|p| p.prefix_len() == p.max_prefix_len())
            .copied()
            .collect();
        let want: BTreeSet<IpNet> = [
            "10.96.0.10/32",
            "fd00:96::10/128",
            "198.51.100.7/32",
            "203.0.113.5/32",
        ]
        .iter()
        .map(|s| net(s))
        .collect();
        assert_eq!(hosts, want);
        // node2 has an endpoint of the Cluster service only: CIDRs alone.
        let on2 = advertised(&r, &catalog(), "node2");
        assert_eq!(on2, r.all().copied().collect());
    }

    #[test]
    fn nothing_outside_a_configured_cidr() {
        // No serviceClusterIPs: the cluster IP is not advertised even on
        // the node with the endpoint; the external IP still is.
        let r = Ranges {
            cluster: vec![],
            ..ranges()
        };
        let on1 = advertised(&r, &catalog(), "node1");
        assert!(!on1.contains(&net("10.96.0.10/32")));
        assert!(on1.contains(&net("198.51.100.7/32")));
        assert!(!on1.iter().any(|p| p.contains(&ip("192.0.2.77"))));
    }

    #[test]
    fn learned_prefixes_inside_the_cidrs_are_covered() {
        let r = ranges();
        assert!(r.covers(&net("10.96.0.10/32")));
        assert!(r.covers(&net("10.96.0.0/16")));
        assert!(!r.covers(&net("10.96.0.0/12")));
        assert!(!r.covers(&net("10.244.1.0/26")));
    }

    #[test]
    fn ranges_come_from_the_bgp_configuration() {
        let spec: BGPConfigurationSpec = serde_yaml::from_str(
            "{serviceClusterIPs: [{cidr: 10.96.0.0/12}], serviceExternalIPs: [{cidr: 198.51.100.0/24}], serviceLoadBalancerIPs: [{cidr: '2001:db8::/64'}]}",
        )
        .unwrap();
        let r = Ranges::from_spec(&spec);
        assert_eq!(r.cluster, vec![net("10.96.0.0/12")]);
        assert_eq!(r.external, vec![net("198.51.100.0/24")]);
        assert_eq!(r.load_balancer, vec![net("2001:db8::/64")]);
    }
}
