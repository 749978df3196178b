//! What operators steer per pod: the pools a pod's addresses come from,
//! or the exact addresses it gets, read from pod and namespace
//! annotations (Starling's `starling.dev/...` keys and Calico's
//! `cni.projectcalico.org/...` ones).
//!
//! Pure parsing: the annotations come from [`super::annotations`] (the API
//! server), the decisions are made by [`super::Ipam`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::IpamError;

/// The annotation keys, Starling's first, then Calico's.
pub const IPV4_POOLS: [&str; 2] = ["starling.dev/ipv4pools", "cni.projectcalico.org/ipv4pools"];
pub const IPV6_POOLS: [&str; 2] = ["starling.dev/ipv6pools", "cni.projectcalico.org/ipv6pools"];
pub const IP_ADDRS: [&str; 2] = ["starling.dev/ipAddrs", "cni.projectcalico.org/ipAddrs"];
/// Calico annotations Starling does not implement: refused by name, never
/// ignored.
const UNSUPPORTED: [&str; 3] = [
    "cni.projectcalico.org/ipAddrsNoIpam",
    "cni.projectcalico.org/floatingIPs",
    "cni.projectcalico.org/hwAddr",
];

/// Whether [`from_annotations`] reads annotation `key` (the rest of an
/// object's annotations can be left out of any copy).
pub fn is_ipam_key(key: &str) -> bool {
    IPV4_POOLS
        .iter()
        .chain(&IPV6_POOLS)
        .chain(&IP_ADDRS)
        .chain(&UNSUPPORTED)
        .any(|k| *k == key)
}

/// A list of pools (names or CIDRs) and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolList {
    pub pools: Vec<String>,
    /// For messages: `pod ns/name annotation KEY`.
    pub from: String,
}

/// The operator's choice for one pod; the default (nothing) leaves the
/// choice to the pools that select the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Choice {
    pub v4_pools: Option<PoolList>,
    pub v6_pools: Option<PoolList>,
    /// Static addresses: the pod gets exactly these.
    pub ips: Vec<IpAddr>,
    /// Where the static addresses were asked for.
    pub ips_from: String,
}

impl Choice {
    pub fn pools(&self, v4: bool) -> Option<&PoolList> {
        if v4 {
            self.v4_pools.as_ref()
        } else {
            self.v6_pools.as_ref()
        }
    }
}

/// The value of one of `keys` in `annotations`: refused when two of them
/// are present with different values.
fn one_of<'a>(
    keys: &[&'a str],
    annotations: &'a BTreeMap<String, String>,
    whose: &str,
) -> Result<Option<(&'a str, &'a str)>, IpamError> {
    let mut found: Option<(&str, &str)> = None;
    for k in keys {
        if let Some(v) = annotations.get(*k) {
            match found {
                Some((k0, v0)) if v0.trim() != v.trim() => {
                    return Err(IpamError::BadAnnotation(format!(
                        "{whose}: annotations {k0} and {k} disagree ({v0} vs {v})"
                    )));
                }
                Some(_) => {}
                None => found = Some((k, v.as_str())),
            }
        }
    }
    Ok(found)
}

/// A JSON list of strings, as Calico's annotations hold.
fn json_list(value: &str, what: &str) -> Result<Vec<String>, IpamError> {
    let list: Vec<String> = serde_json::from_str(value).map_err(|e| {
        IpamError::BadAnnotation(format!(
            "{what}: `{value}` is not a JSON list of strings ({e})"
        ))
    })?;
    if list.is_empty() {
        return Err(IpamError::BadAnnotation(format!(
            "{what}: the list is empty"
        )));
    }
    Ok(list)
}

fn pool_list(
    keys: &[&str],
    pod: &BTreeMap<String, String>,
    namespace: &BTreeMap<String, String>,
    who: (&str, &str),
) -> Result<Option<PoolList>, IpamError> {
    let (pod_name, ns_name) = who;
    let pod_who = format!("pod {pod_name}");
    let ns_who = format!("namespace {ns_name}");
    // The pod's annotation wins over its namespace's.
    for (annotations, whose) in [(pod, &pod_who), (namespace, &ns_who)] {
        if let Some((key, value)) = one_of(keys, annotations, whose)? {
            let from = format!("{whose} annotation {key}");
            let pools = json_list(value, &from)?;
            return Ok(Some(PoolList { pools, from }));
        }
    }
    Ok(None)
}

/// The choice the annotations of pod `pod` (`namespace/name`) and of its
/// namespace `namespace` make.
pub fn from_annotations(
    pod_name: &str,
    namespace_name: &str,
    pod: &BTreeMap<String, String>,
    namespace: &BTreeMap<String, String>,
) -> Result<Choice, IpamError> {
    for (annotations, whose) in [
        (pod, format!("pod {pod_name}")),
        (namespace, format!("namespace {namespace_name}")),
    ] {
        if let Some(k) = UNSUPPORTED.iter().find(|k| annotations.contains_key(**k)) {
            return Err(IpamError::BadAnnotation(format!(
                "{whose}: annotation {k} is not supported by Starling"
            )));
        }
    }
    let who = (pod_name, namespace_name);
    let mut choice = Choice {
        v4_pools: pool_list(&IPV4_POOLS, pod, namespace, who)?,
        v6_pools: pool_list(&IPV6_POOLS, pod, namespace, who)?,
        ..Choice::default()
    };
    let pod_who = format!("pod {pod_name}");
    if let Some((key, value)) = one_of(&IP_ADDRS, pod, &pod_who)? {
        let from = format!("{pod_who} annotation {key}");
        let mut ips = Vec::new();
        for a in json_list(value, &from)? {
            let ip: IpAddr = a.trim().parse().map_err(|_| {
                IpamError::BadAnnotation(format!("{from}: `{a}` is not an IP address"))
            })?;
            ips.push(ip);
        }
        let pod_pools = IPV4_POOLS
            .iter()
            .chain(IPV6_POOLS.iter())
            .find(|k| pod.contains_key(**k));
        if let Some(k) = pod_pools {
            return Err(IpamError::BadAnnotation(format!(
                "{pod_who}: {key} and {k} together: static addresses come from no pool choice; write one of them"
            )));
        }
        choice.ips = ips;
        choice.ips_from = from;
    }
    Ok(choice)
}

/// Static addresses as one pod may have them: at most one per family.
pub fn check_static(ips: &[IpAddr], from: &str) -> Result<(), IpamError> {
    let v4 = ips.iter().filter(|i| i.is_ipv4()).count();
    if v4 > 1 || ips.len() - v4 > 1 {
        return Err(IpamError::BadAnnotation(format!(
            "{from}: at most one IPv4 and one IPv6 address, got {}",
            ips.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_pod_wins_over_its_namespace_and_calico_keys_are_read() {
        let ns = map(&[("cni.projectcalico.org/ipv4pools", r#"["ns-pool"]"#)]);
        let c = from_annotations("ns/p", "ns", &map(&[]), &ns).unwrap();
        let l = c.v4_pools.unwrap();
        assert_eq!(l.pools, ["ns-pool"]);
        assert!(l.from.contains("namespace ns"), "{}", l.from);
        assert!(c.v6_pools.is_none());
        let pod = map(&[("starling.dev/ipv4pools", r#"["10.9.0.0/16"]"#)]);
        let c = from_annotations("ns/p", "ns", &pod, &ns).unwrap();
        assert_eq!(c.v4_pools.unwrap().pools, ["10.9.0.0/16"]);
        let pod6 = map(&[("cni.projectcalico.org/ipv6pools", r#"["v6"]"#)]);
        let c = from_annotations("ns/p", "ns", &pod6, &ns).unwrap();
        assert_eq!(c.v6_pools.unwrap().pools, ["v6"]);
        assert_eq!(c.v4_pools.unwrap().pools, ["ns-pool"]);
    }

    #[test]
    fn static_addresses_come_from_the_pod_only() {
        let pod = map(&[("cni.projectcalico.org/ipAddrs", r#"["10.0.0.5","fd00::5"]"#)]);
        let c = from_annotations("ns/p", "ns", &pod, &map(&[])).unwrap();
        assert_eq!(c.ips.len(), 2);
        assert!(c.ips_from.contains("cni.projectcalico.org/ipAddrs"));
        let ns = map(&[("starling.dev/ipAddrs", r#"["10.0.0.5"]"#)]);
        let c = from_annotations("ns/p", "ns", &map(&[]), &ns).unwrap();
        assert!(c.ips.is_empty(), "a namespace cannot pin one address");
        assert!(
            check_static(
                &"10.0.0.1 10.0.0.2"
                    .split(' ')
                    .map(|s| s.parse().unwrap())
                    .collect::<Vec<_>>(),
                "x"
            )
            .is_err()
        );
    }

    #[test]
    fn bad_annotations_are_refused_by_name() {
        let cases = [
            (
                map(&[("starling.dev/ipv4pools", "pool-a")]),
                "not a JSON list",
            ),
            (map(&[("starling.dev/ipv4pools", "[]")]), "empty"),
            (
                map(&[("starling.dev/ipAddrs", r#"["10.0.0.300"]"#)]),
                "not an IP",
            ),
            (
                map(&[
                    ("starling.dev/ipv4pools", r#"["a"]"#),
                    ("cni.projectcalico.org/ipv4pools", r#"["b"]"#),
                ]),
                "disagree",
            ),
            (
                map(&[
                    ("starling.dev/ipAddrs", r#"["10.0.0.5"]"#),
                    ("starling.dev/ipv4pools", r#"["b"]"#),
                ]),
                "together",
            ),
            (
                map(&[("cni.projectcalico.org/ipAddrsNoIpam", r#"["10.0.0.5"]"#)]),
                "not supported",
            ),
        ];
        for (pod, want) in cases {
            let err = from_annotations("ns/p", "ns", &pod, &map(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want) && err.contains("pod ns/p"), "{err}");
        }
        // The same value under both keys is fine.
        let both = map(&[
            ("starling.dev/ipv4pools", r#"["a"]"#),
            ("cni.projectcalico.org/ipv4pools", r#"["a"]"#),
        ]);
        assert!(from_annotations("ns/p", "ns", &both, &map(&[])).is_ok());
    }
}
