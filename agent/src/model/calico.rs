//! Calico YAML as users have it: `calicoctl get -o yaml` exports
//! (`projectcalico.org/v3`), `kubectl get -o yaml` of Calico's CRDs
//! (`crd.projectcalico.org/v1`, with uid, resourceVersion, managedFields,
//! status ...), `List` wrappers, and core `v1` Nodes with Calico's
//! `projectcalico.org/*` annotations.
//!
//! [`normalize`] turns one such object into the Starling object the loader
//! then parses and checks like any other: metadata noise and `status` are
//! dropped, Calico's `Node` becomes a `StarlingNode` (its `spec.bgp`), and
//! every Calico field Starling does not act on is taken out with a warning
//! that says what Starling does instead. [`CALICO_FIELDS`] is the table of
//! every field of Calico's IPPool, BGPConfiguration, BGPPeer, BGPFilter and
//! Node (BGP part) with what Starling does with it; a field that is in
//! neither the table nor Starling's own kinds stays in the object, where
//! the loader refuses it as an unknown field (a typo).

use super::crd::{CALICO_API_VERSION, GROUP, VERSION};
use super::validate::Finding;
use serde_yaml::{Mapping, Value};
use starling_bgp::Family;
use starling_bgp::policy::{PolicyRule, RouteSource, Verdict};

/// The API version of Calico's CRDs (Kubernetes datastore), as `kubectl`
/// exports them.
pub const CALICO_CRD_API_VERSION: &str = "crd.projectcalico.org/v1";

/// What Starling does with one Calico field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// Starling does what Calico does with it.
    Implemented,
    /// Starling acts on some values (the first string says which); its own
    /// checks ([`super::validate::unsupported_bgp_peer`] and friends) warn
    /// about the others.
    Partly(&'static str),
    /// Carried into Starling's kind, which keeps it but does not act on it
    /// yet; Starling's own checks warn whenever it is set.
    Stored(&'static str),
    /// Taken out with a warning saying what Starling does instead; the
    /// values in `same` (YAML) mean what Starling does anyway and pass
    /// without one.
    Warned {
        instead: &'static str,
        same: &'static [&'static str],
    },
    /// Calico's own record of a node (written by calico-node, not by
    /// users): dropped, with one warning per node listing what was there.
    State,
    /// A Calico v1 leftover Calico refuses too unless empty or false.
    Obsolete(&'static str),
}

use Support::*;

/// What Starling does with a BGPFilter's rules.
const FILTER_RULES: &str = "every rule (cidr with Equal, NotEqual, In, NotIn, prefixLength, source, action), in both datastores; a rule with `interface` is left out with a warning (Starling matches no interfaces)";

/// Every field of Calico 3.2x's IPPool, BGPConfiguration, BGPPeer,
/// BGPFilter and Node (read from projectcalico/api
/// pkg/apis/projectcalico/v3 and libcalico-go's Node), with what Starling
/// does with it. docs/model.md's "Calico fields" tables say the same.
pub const CALICO_FIELDS: &[(&str, &str, Support)] = &[
    // IPPool
    ("IPPool", "spec.cidr", Implemented),
    ("IPPool", "spec.blockSize", Implemented),
    ("IPPool", "spec.ipipMode", Implemented),
    (
        "IPPool",
        "spec.vxlanMode",
        Partly(
            "Always and CrossSubnet on IPv4 and IPv6 pools; refused together with an enabled ipipMode",
        ),
    ),
    ("IPPool", "spec.natOutgoing", Implemented),
    ("IPPool", "spec.disabled", Implemented),
    (
        "IPPool",
        "spec.nodeSelector",
        Partly("all(), ==, !=, has() joined with &&; other selectors are refused"),
    ),
    (
        "IPPool",
        "spec.disableBGPExport",
        Warned {
            instead: "Starling advertises every block of every pool to its peers",
            same: &["false"],
        },
    ),
    (
        "IPPool",
        "spec.namespaceSelector",
        Warned {
            instead: "Starling picks pools by node only: pods of every namespace get addresses from this pool",
            same: &["''", "all()"],
        },
    ),
    (
        "IPPool",
        "spec.allowedUses",
        Warned {
            instead: "Starling uses every pool for pod addresses (Workload) and nothing else",
            same: &[
                "[Workload, Tunnel]",
                "[Tunnel, Workload]",
                "[Workload]",
                "[]",
            ],
        },
    ),
    (
        "IPPool",
        "spec.assignmentMode",
        Warned {
            instead: "Starling assigns addresses from every enabled pool automatically",
            same: &["Automatic"],
        },
    ),
    (
        "IPPool",
        "spec.ipip",
        Obsolete("Calico v1's `ipip`; Calico refuses it too: use ipipMode"),
    ),
    (
        "IPPool",
        "spec.nat-outgoing",
        Obsolete("Calico v1's `nat-outgoing`; Calico refuses it too: use natOutgoing"),
    ),
    // BGPConfiguration
    (
        "BGPConfiguration",
        "spec.logSeverityScreen",
        Stored("the agent's log level is its own setting (RUST_LOG)"),
    ),
    (
        "BGPConfiguration",
        "spec.nodeToNodeMeshEnabled",
        Implemented,
    ),
    ("BGPConfiguration", "spec.asNumber", Implemented),
    ("BGPConfiguration", "spec.listenPort", Implemented),
    ("BGPConfiguration", "spec.nodeMeshPassword", Implemented),
    (
        "BGPConfiguration",
        "spec.nodeMeshMaxRestartTime",
        Implemented,
    ),
    ("BGPConfiguration", "spec.serviceClusterIPs", Implemented),
    ("BGPConfiguration", "spec.communities", Implemented),
    ("BGPConfiguration", "spec.serviceExternalIPs", Implemented),
    (
        "BGPConfiguration",
        "spec.serviceLoadBalancerIPs",
        Implemented,
    ),
    (
        "BGPConfiguration",
        "spec.serviceLoadBalancerAggregation",
        Implemented,
    ),
    ("BGPConfiguration", "spec.prefixAdvertisements", Implemented),
    ("BGPConfiguration", "spec.bindMode", Implemented),
    (
        "BGPConfiguration",
        "spec.ignoredInterfaces",
        Warned {
            instead: "Starling never exports interface routes, so there is nothing to ignore",
            same: &["[]"],
        },
    ),
    (
        "BGPConfiguration",
        "spec.localWorkloadPeeringIPV4",
        Warned {
            instead: "Starling does not peer with workloads",
            same: &["''"],
        },
    ),
    (
        "BGPConfiguration",
        "spec.localWorkloadPeeringIPV6",
        Warned {
            instead: "Starling does not peer with workloads",
            same: &["''"],
        },
    ),
    // BGPPeer
    ("BGPPeer", "spec.node", Implemented),
    (
        "BGPPeer",
        "spec.nodeSelector",
        Partly("all(), ==, !=, has() joined with &&; other selectors are refused"),
    ),
    ("BGPPeer", "spec.peerIP", Implemented),
    ("BGPPeer", "spec.asNumber", Implemented),
    (
        "BGPPeer",
        "spec.peerSelector",
        Partly("all(), ==, !=, has() joined with &&; other selectors are refused"),
    ),
    ("BGPPeer", "spec.keepOriginalNextHop", Implemented),
    ("BGPPeer", "spec.nextHopMode", Implemented),
    ("BGPPeer", "spec.password", Implemented),
    ("BGPPeer", "spec.sourceAddress", Implemented),
    ("BGPPeer", "spec.maxRestartTime", Implemented),
    ("BGPPeer", "spec.ttlSecurity", Implemented),
    (
        "BGPPeer",
        "spec.localASNumber",
        Warned {
            instead: "Starling speaks to the peer with the node's own AS",
            same: &[],
        },
    ),
    ("BGPPeer", "spec.numAllowedLocalASNumbers", Implemented),
    (
        "BGPPeer",
        "spec.reachableBy",
        Warned {
            instead: "Starling reaches the peer by the kernel's routes, with no static route of its own",
            same: &["''"],
        },
    ),
    ("BGPPeer", "spec.filters", Implemented),
    (
        "BGPPeer",
        "spec.localWorkloadSelector",
        Warned {
            instead: "Starling does not peer with workloads",
            same: &["''"],
        },
    ),
    (
        "BGPPeer",
        "spec.reversePeering",
        Warned {
            instead: "Starling adds no reverse session: a selected node peers back only if a BGPPeer applies to it too (or through routeReflectorClusterID)",
            same: &[],
        },
    ),
    // BGPFilter: loaded by both datastores, applied to the peers that name
    // it in spec.filters.
    ("BGPFilter", "spec.exportV4", Partly(FILTER_RULES)),
    ("BGPFilter", "spec.importV4", Partly(FILTER_RULES)),
    ("BGPFilter", "spec.exportV6", Partly(FILTER_RULES)),
    ("BGPFilter", "spec.importV6", Partly(FILTER_RULES)),
    // Node: the BGP part becomes a StarlingNode.
    ("Node", "spec.bgp.ipv4Address", Implemented),
    ("Node", "spec.bgp.ipv6Address", Implemented),
    ("Node", "spec.bgp.asNumber", Implemented),
    ("Node", "spec.bgp.routeReflectorClusterID", Implemented),
    ("Node", "spec.bgp.ipv4IPIPTunnelAddr", State),
    ("Node", "spec.ipv4VXLANTunnelAddr", State),
    ("Node", "spec.vxlanTunnelMACAddr", State),
    ("Node", "spec.ipv6VXLANTunnelAddr", State),
    ("Node", "spec.vxlanTunnelMACAddrV6", State),
    ("Node", "spec.orchRefs", State),
    ("Node", "spec.wireguard", State),
    ("Node", "spec.addresses", State),
    ("Node", "spec.interfaces", State),
];

/// Calico kinds Starling does not model: left out with a warning, so a
/// whole export loads.
const OTHER_CALICO_KINDS: &[&str] = &[
    "BlockAffinity",
    "IPAMBlock",
    "IPAMHandle",
    "IPAMConfig",
    "IPAMConfiguration",
    "IPReservation",
    "FelixConfiguration",
    "ClusterInformation",
    "KubeControllersConfiguration",
    "CalicoNodeStatus",
    "GlobalNetworkPolicy",
    "NetworkPolicy",
    "StagedGlobalNetworkPolicy",
    "StagedNetworkPolicy",
    "StagedKubernetesNetworkPolicy",
    "GlobalNetworkSet",
    "NetworkSet",
    "HostEndpoint",
    "WorkloadEndpoint",
    "Profile",
    "Tier",
];

/// Calico's Node annotations on a core Node (Kubernetes datastore) and the
/// StarlingNode field each becomes.
const NODE_ANNOTATIONS: &[(&str, &str)] = &[
    ("projectcalico.org/IPv4Address", "ipv4Address"),
    ("projectcalico.org/IPv6Address", "ipv6Address"),
    ("projectcalico.org/ASNumber", "asNumber"),
    (
        "projectcalico.org/RouteReflectorClusterID",
        "routeReflectorClusterID",
    ),
];

/// What the normalised object is for: the file datastore keeps a Node's
/// labels (selectors match them); the Kubernetes datastore has the Node's
/// own, live labels, so an import leaves them out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    File,
    Kubernetes,
}

/// What became of one Calico object.
#[derive(Debug)]
pub enum Normalized {
    /// A Starling object (`starling.dev/v1`) to parse and check; `kind` is
    /// Starling's kind, or `BGPFilter` (checked, never loaded).
    Object {
        kind: String,
        value: Value,
        warnings: Vec<Finding>,
    },
    /// Nothing Starling loads (a kind it does not model, a per-node
    /// BGPConfiguration, a Node without BGP addresses).
    Skipped { warnings: Vec<Finding> },
    /// Malformed: these are problems.
    Refused { problems: Vec<Finding> },
}

/// Whether a document is one for [`normalize`].
pub fn is_calico(api_version: &str, kind: &str) -> bool {
    api_version == CALICO_API_VERSION
        || api_version == CALICO_CRD_API_VERSION
        || (api_version == "v1" && kind == "Node")
}

fn finding(field: &str, message: impl Into<String>) -> Finding {
    Finding {
        field: field.to_string(),
        message: message.into(),
    }
}

fn key(k: &str) -> Value {
    Value::String(k.to_string())
}

fn get<'a>(m: &'a Mapping, k: &str) -> Option<&'a Value> {
    m.get(key(k))
}

/// `metadata` without the noise: name, labels, and the annotations that
/// are not Kubernetes' or Calico's own bookkeeping.
fn clean_metadata(meta: Option<&Value>, keep_labels: bool) -> Value {
    let mut out = Mapping::new();
    let Some(Value::Mapping(m)) = meta else {
        return Value::Mapping(out);
    };
    if let Some(n) = get(m, "name") {
        out.insert(key("name"), n.clone());
    }
    if keep_labels
        && let Some(Value::Mapping(l)) = get(m, "labels")
        && !l.is_empty()
    {
        out.insert(key("labels"), Value::Mapping(l.clone()));
    }
    if let Some(Value::Mapping(a)) = get(m, "annotations") {
        let kept: Mapping = a
            .iter()
            .filter(|(k, _)| {
                k.as_str().is_some_and(|k| {
                    !(k.starts_with("projectcalico.org/")
                        || k.contains("kubernetes.io/")
                        || k.contains("k8s.io/")
                        || k.starts_with("meta.helm.sh/"))
                })
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !kept.is_empty() {
            out.insert(key("annotations"), Value::Mapping(kept));
        }
    }
    Value::Mapping(out)
}

/// Calico's `numorstring.ASNumber`: a number, a number in a string, or
/// `asdot` (`1.10` = 65546).
fn as_number(field: &str, v: &mut Value, problems: &mut Vec<Finding>) {
    let Value::String(s) = v else { return };
    let parsed = match s.split_once('.') {
        Some((hi, lo)) => hi
            .parse::<u16>()
            .ok()
            .zip(lo.parse::<u16>().ok())
            .map(|(hi, lo)| (u32::from(hi) << 16) | u32::from(lo)),
        None => s.parse::<u32>().ok(),
    };
    match parsed {
        Some(n) => *v = Value::Number(n.into()),
        None => problems.push(finding(
            field,
            format!("`{s}` is not an AS number: write e.g. 64512 or 1.10 (asdot)"),
        )),
    }
}

/// `secretKeyRef.optional` is Kubernetes' SecretKeySelector field: Starling
/// always leaves a session out when its Secret or key is missing.
fn password(field: &str, spec: &mut Mapping, warnings: &mut Vec<Finding>) {
    let Some(Value::Mapping(p)) = spec.get_mut(key(field)) else {
        return;
    };
    let Some(Value::Mapping(r)) = p.get_mut(key("secretKeyRef")) else {
        return;
    };
    if let Some(opt) = r.remove(key("optional"))
        && opt != Value::Bool(false)
    {
        warnings.push(finding(
            &format!("spec.{field}.secretKeyRef.optional"),
            "ignored: Starling leaves the session out while the Secret or its key is missing, optional or not",
        ));
    }
}

fn yaml_eq(v: &Value, text: &str) -> bool {
    serde_yaml::from_str::<Value>(text).is_ok_and(|t| t == *v || (text == "''" && v.is_null()))
}

/// Apply the table to `spec` of a `kind`: take out what is warned,
/// refuse obsolete fields that are set, report state fields.
fn apply_table(
    kind: &str,
    prefix: &str,
    spec: &mut Mapping,
    warnings: &mut Vec<Finding>,
    problems: &mut Vec<Finding>,
) {
    let mut state = Vec::new();
    for (k, path, support) in CALICO_FIELDS {
        if *k != kind {
            continue;
        }
        let Some(field) = path.strip_prefix(prefix) else {
            continue;
        };
        if field.contains('.') {
            continue;
        }
        let Some(v) = spec.get(key(field)) else {
            continue;
        };
        match support {
            Implemented | Partly(_) | Stored(_) => {}
            Warned { instead, same } => {
                if !same.iter().any(|s| yaml_eq(v, s)) {
                    warnings.push(finding(path, format!("not supported: {instead}")));
                }
                spec.remove(key(field));
            }
            State => {
                state.push(*path);
                spec.remove(key(field));
            }
            Obsolete(why) => {
                let empty = matches!(v, Value::Null | Value::Bool(false))
                    || v.as_mapping().is_some_and(Mapping::is_empty);
                if empty {
                    spec.remove(key(field));
                } else {
                    problems.push(finding(path, *why));
                }
            }
        }
    }
    if !state.is_empty() {
        warnings.push(finding(
            state[0],
            format!(
                "dropped {}: calico-node's record of the node; Starling keeps its own",
                state.join(", ")
            ),
        ));
    }
}

fn object(kind: &str, metadata: Value, spec: Option<Mapping>) -> Value {
    let mut m = Mapping::new();
    m.insert(key("apiVersion"), key(&format!("{GROUP}/{VERSION}")));
    m.insert(key("kind"), key(kind));
    m.insert(key("metadata"), metadata);
    if let Some(s) = spec {
        m.insert(key("spec"), Value::Mapping(s));
    }
    Value::Mapping(m)
}

/// Turn one Calico object (a mapping with `apiVersion` and `kind` for
/// which [`is_calico`] holds) into what Starling loads.
pub fn normalize(doc: &Value, target: Target) -> Normalized {
    let Value::Mapping(top) = doc else {
        return Normalized::Refused {
            problems: vec![finding("kind", "a document must be a mapping")],
        };
    };
    let kind = get(top, "kind").and_then(Value::as_str).unwrap_or_default();
    let api_version = get(top, "apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = get(top, "metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut warnings = Vec::new();
    let mut problems = Vec::new();
    // Top-level keys: the usual four; anything else stays, so that the
    // loader refuses it by name.
    let mut extra = Mapping::new();
    for (k, v) in top {
        if !matches!(
            k.as_str(),
            Some("apiVersion" | "kind" | "metadata" | "spec" | "status")
        ) {
            extra.insert(k.clone(), v.clone());
        }
    }
    let spec = match get(top, "spec") {
        None | Some(Value::Null) => None,
        Some(Value::Mapping(s)) => Some(s.clone()),
        Some(_) => {
            return Normalized::Refused {
                problems: vec![finding("spec", "spec must be a mapping")],
            };
        }
    };
    if api_version == "v1" {
        return core_node(top, &name, target);
    }
    let keep_labels = !(kind == "Node" && target == Target::Kubernetes);
    let metadata = clean_metadata(get(top, "metadata"), keep_labels);
    let out_kind;
    let mut spec = spec;
    match kind {
        "IPPool" | "BGPPeer" | "BGPConfiguration" | "BGPFilter" => {
            if kind == "BGPConfiguration" && name != "default" {
                let warning = if let Some(node) = name.strip_prefix("node.") {
                    format!(
                        "left out: a per-node BGPConfiguration (node {node}); Starling uses `default` for every node"
                    )
                } else {
                    format!(
                        "left out: Calico uses only `default` and `node.<name>`; `{name}` configures nothing there either"
                    )
                };
                return Normalized::Skipped {
                    warnings: vec![finding("metadata.name", warning)],
                };
            }
            if let Some(s) = &mut spec {
                if kind == "BGPFilter" {
                    // Warned about as a whole, and kept for the checks.
                    apply_table(kind, "spec.", &mut s.clone(), &mut warnings, &mut problems);
                } else {
                    apply_table(kind, "spec.", s, &mut warnings, &mut problems);
                }
                for f in ["asNumber"] {
                    if let Some(v) = s.get_mut(key(f)) {
                        as_number(&format!("spec.{f}"), v, &mut problems);
                    }
                }
                match kind {
                    "BGPPeer" => password("password", s, &mut warnings),
                    "BGPConfiguration" => password("nodeMeshPassword", s, &mut warnings),
                    _ => {}
                }
            }
            out_kind = kind;
        }
        "Node" => {
            match node_spec(spec.take(), &mut warnings, &mut problems) {
                Ok(bgp) => spec = Some(bgp),
                Err(done) => return done,
            }
            out_kind = "StarlingNode";
        }
        other if OTHER_CALICO_KINDS.contains(&other) => return other_kind(other),
        other => {
            return Normalized::Refused {
                problems: vec![finding(
                    "kind",
                    format!(
                        "unknown Calico kind `{other}`: Starling loads IPPool, BGPConfiguration, BGPPeer, BGPFilter and Node"
                    ),
                )],
            };
        }
    }
    if !problems.is_empty() {
        return Normalized::Refused { problems };
    }
    let mut value = object(out_kind, metadata, spec);
    if let Value::Mapping(m) = &mut value {
        m.extend(extra);
    }
    Normalized::Object {
        kind: out_kind.to_string(),
        value,
        warnings,
    }
}

/// A Calico Node's spec: its BGP part becomes a StarlingNode's spec; the
/// error is the whole answer (refused, or left out without an address).
fn node_spec(
    spec: Option<Mapping>,
    warnings: &mut Vec<Finding>,
    problems: &mut Vec<Finding>,
) -> Result<Mapping, Normalized> {
    let mut s = spec.unwrap_or_default();
    apply_table("Node", "spec.", &mut s, warnings, problems);
    let mut bgp = match s.remove(key("bgp")) {
        Some(Value::Mapping(b)) => b,
        None | Some(Value::Null) => Mapping::new(),
        Some(_) => {
            problems.push(finding("spec.bgp", "spec.bgp must be a mapping"));
            Mapping::new()
        }
    };
    apply_table("Node", "spec.bgp.", &mut bgp, warnings, problems);
    if let Some(v) = bgp.get_mut(key("asNumber")) {
        as_number("spec.bgp.asNumber", v, problems);
    }
    // What is left of spec (not bgp) is unknown: keep it for the
    // loader to refuse, under its Calico path.
    for k in s.keys() {
        let k = k.as_str().unwrap_or_default();
        problems.push(finding(
            &format!("spec.{k}"),
            format!(
                "unknown field `{k}`: a Calico Node's spec has bgp and calico-node's own fields"
            ),
        ));
    }
    if !problems.is_empty() {
        return Err(Normalized::Refused {
            problems: std::mem::take(problems),
        });
    }
    if !bgp.contains_key(key("ipv4Address")) && !bgp.contains_key(key("ipv6Address")) {
        warnings.push(finding(
            "spec.bgp",
            "left out: the node has no BGP address (spec.bgp.ipv4Address or ipv6Address)",
        ));
        return Err(Normalized::Skipped {
            warnings: std::mem::take(warnings),
        });
    }
    Ok(bgp)
}

/// A Calico kind Starling does not load: left out with the reason.
fn other_kind(other: &str) -> Normalized {
    let what = match other {
        "BlockAffinity" | "IPAMBlock" | "IPAMHandle" => {
            "Starling's IPAM claims its own blocks; pods keep their addresses until they are recreated"
        }
        "IPAMConfig" | "IPAMConfiguration" | "IPReservation" => {
            "Starling's IPAM has no such settings"
        }
        _ => "Starling does not model it",
    };
    Normalized::Skipped {
        warnings: vec![finding(
            "kind",
            format!("left out: Calico's {other}: {what}"),
        )],
    }
}

/// A core Node (`kubectl get nodes -o yaml` of a Calico cluster): its BGP
/// part is in Calico's annotations.
fn core_node(top: &Mapping, name: &str, target: Target) -> Normalized {
    let meta = get(top, "metadata").and_then(Value::as_mapping);
    let annotations = meta
        .and_then(|m| get(m, "annotations"))
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    let mut spec = Mapping::new();
    let mut problems = Vec::new();
    for (annotation, field) in NODE_ANNOTATIONS {
        if let Some(v) = get(&annotations, annotation) {
            let mut v = v.clone();
            if *field == "asNumber" {
                as_number(
                    &format!("metadata.annotations[{annotation}]"),
                    &mut v,
                    &mut problems,
                );
            }
            spec.insert(key(field), v);
        }
    }
    if !problems.is_empty() {
        return Normalized::Refused { problems };
    }
    let state: Vec<&str> = annotations
        .iter()
        .filter_map(|(k, _)| k.as_str())
        .filter(|k| {
            k.starts_with("projectcalico.org/") && !NODE_ANNOTATIONS.iter().any(|(a, _)| a == k)
        })
        .collect();
    let mut warnings = Vec::new();
    if !state.is_empty() {
        warnings.push(finding(
            "metadata.annotations",
            format!(
                "dropped {}: calico-node's record of the node; Starling keeps its own",
                state.join(", ")
            ),
        ));
    }
    if spec.is_empty() {
        warnings.push(finding(
            "metadata.annotations",
            "left out: no projectcalico.org/IPv4Address or IPv6Address annotation (not a Calico BGP node)",
        ));
        return Normalized::Skipped { warnings };
    }
    let mut metadata = Mapping::new();
    metadata.insert(key("name"), key(name));
    if target == Target::File
        && let Some(Value::Mapping(l)) = meta.and_then(|m| get(m, "labels"))
        && !l.is_empty()
    {
        metadata.insert(key("labels"), Value::Mapping(l.clone()));
    }
    Normalized::Object {
        kind: "StarlingNode".into(),
        value: object("StarlingNode", Value::Mapping(metadata), Some(spec)),
        warnings,
    }
}

// ---------------------------------------------------------------------------
// BGPFilter: checked so that a malformed filter is refused; loaded by the
// file datastore and turned into speaker policy for the peers naming it.

pub use super::crd::{
    BGPFilterSpec, FilterAction, FilterRule, FilterSource, MatchOperator, PrefixLength,
};

/// What Calico's validation refuses in a BGPFilter.
pub fn bgp_filter(spec: &BGPFilterSpec) -> Vec<Finding> {
    let mut out = Vec::new();
    for (list, rules, v4) in [
        ("exportV4", &spec.export_v4, true),
        ("importV4", &spec.import_v4, true),
        ("exportV6", &spec.export_v6, false),
        ("importV6", &spec.import_v6, false),
    ] {
        let max = if v4 { 32 } else { 128 };
        for (i, r) in rules.iter().enumerate() {
            let at = |f: &str| format!("spec.{list}[{i}].{f}");
            if let Some(c) = r.cidr
                && c.addr().is_ipv4() != v4
            {
                out.push(finding(
                    &at("cidr"),
                    format!(
                        "{c} is not an IPv{} prefix, as {list} needs",
                        if v4 { 4 } else { 6 }
                    ),
                ));
            }
            if r.cidr.is_some() != r.match_operator.is_some() {
                out.push(finding(
                    &at("matchOperator"),
                    "cidr and matchOperator go together: set both or neither",
                ));
            }
            if let Some(pl) = &r.prefix_length {
                if r.cidr.is_none() {
                    out.push(finding(&at("prefixLength"), "prefixLength needs a cidr"));
                }
                for (f, v) in [("min", pl.min), ("max", pl.max)] {
                    if let Some(v) = v
                        && v > max
                    {
                        out.push(finding(
                            &at(&format!("prefixLength.{f}")),
                            format!("{v} is longer than an IPv{} prefix", if v4 { 4 } else { 6 }),
                        ));
                    }
                }
                if let (Some(lo), Some(hi)) = (pl.min, pl.max)
                    && lo > hi
                {
                    out.push(finding(
                        &at("prefixLength"),
                        format!("min {lo} is more than max {hi}"),
                    ));
                }
                if let (Some(c), Some(hi)) = (r.cidr, pl.max)
                    && hi < c.prefix_len()
                {
                    out.push(finding(
                        &at("prefixLength.max"),
                        format!("{hi} is shorter than {c}: no prefix inside it is that short"),
                    ));
                }
            }
            if let Some(ifname) = &r.interface
                && (ifname.is_empty() || ifname.len() > 15 && !ifname.contains('*'))
            {
                out.push(finding(
                    &at("interface"),
                    format!("`{ifname}` is not an interface name (1-15 characters, * allowed)"),
                ));
            }
        }
    }
    out
}

/// The rule lists of a filter that apply to one direction.
fn filter_lists(spec: &BGPFilterSpec, export: bool) -> [(&[FilterRule], Family); 2] {
    if export {
        [
            (&spec.export_v4, Family::Ipv4),
            (&spec.export_v6, Family::Ipv6),
        ]
    } else {
        [
            (&spec.import_v4, Family::Ipv4),
            (&spec.import_v6, Family::Ipv6),
        ]
    }
}

/// What Starling does differently from Calico with a (valid) BGPFilter:
/// rules with `interface` are left out; prefixLength with Equal or
/// NotEqual compares the exact cidr, as BIRD's `=` does.
pub fn bgp_filter_warnings(spec: &BGPFilterSpec) -> Vec<Finding> {
    let mut out = Vec::new();
    for export in [true, false] {
        for (rules, family) in filter_lists(spec, export) {
            let list = list_name(export, family);
            for (i, r) in rules.iter().enumerate() {
                if let Some(ifname) = &r.interface {
                    out.push(finding(
                        &format!("spec.{list}[{i}].interface"),
                        format!(
                            "not supported: Starling matches no interfaces, so this rule (interface `{ifname}`) is left out and routes go on to the next rule"
                        ),
                    ));
                }
                if r.prefix_length.is_some()
                    && matches!(
                        r.match_operator,
                        Some(MatchOperator::Equal | MatchOperator::NotEqual)
                    )
                {
                    out.push(finding(
                        &format!("spec.{list}[{i}].prefixLength"),
                        "not used with Equal or NotEqual: the route's prefix is compared with cidr exactly; use In or NotIn for a length range",
                    ));
                }
            }
        }
    }
    out
}

fn list_name(export: bool, family: Family) -> &'static str {
    match (export, family) {
        (true, Family::Ipv4) => "exportV4",
        (true, Family::Ipv6) => "exportV6",
        (false, Family::Ipv4) => "importV4",
        (false, Family::Ipv6) => "importV6",
    }
}

/// A BGPFilter's rules for one direction as speaker policy rules, IPv4
/// first: each rule matches only its family. Without a default at the end:
/// the caller adds the peer's own.
pub fn filter_policy(spec: &BGPFilterSpec, export: bool) -> Vec<PolicyRule> {
    let mut out = Vec::new();
    for (rules, family) in filter_lists(spec, export) {
        for r in rules.iter().filter(|r| r.interface.is_none()) {
            let mut rule = PolicyRule {
                family: Some(family),
                source: r.source.map(|FilterSource::RemotePeers| RouteSource::Peer),
                action: match r.action {
                    FilterAction::Accept => Verdict::Accept,
                    FilterAction::Reject => Verdict::Reject,
                },
                ..PolicyRule::default()
            };
            if let (Some(cidr), Some(op)) = (r.cidr, r.match_operator) {
                // BIRD's `net ~ cidr` / `net = cidr`, as Calico renders them.
                let cidr = cidr.trunc();
                rule.prefix = Some(cidr);
                rule.not_prefix = matches!(op, MatchOperator::NotEqual | MatchOperator::NotIn);
                if matches!(op, MatchOperator::In | MatchOperator::NotIn) {
                    let pl = r.prefix_length.unwrap_or(PrefixLength {
                        min: None,
                        max: None,
                    });
                    let len = cidr.prefix_len();
                    rule.ge = Some(pl.min.map_or(len, |m| m.max(len)));
                    rule.le = Some(
                        pl.max
                            .map_or(cidr.max_prefix_len(), |m| m.min(cidr.max_prefix_len())),
                    );
                }
            }
            out.push(rule);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::file::{Mode, Problem, check_str, import_str, load_str};
    use std::path::Path;

    /// A BGPFilter as speaker policy: each operator, prefixLength and
    /// source, run through the speaker's own `apply` on real prefixes.
    #[test]
    fn filter_rules_become_speaker_policy() {
        use starling_bgp::PathAttrs;
        use starling_bgp::policy::{Outcome, apply};
        let spec: BGPFilterSpec = serde_yaml::from_str(
            r#"
exportV4:
- {action: Accept, matchOperator: In, cidr: 77.0.0.0/16, source: RemotePeers}
- {action: Reject, interface: '*.calico'}
- {action: Reject, matchOperator: NotIn, cidr: 10.244.0.0/16}
importV4:
- {action: Accept, matchOperator: In, cidr: 55.0.0.0/16, prefixLength: {min: 30}}
- {action: Reject, matchOperator: Equal, cidr: 198.51.100.0/24}
- {action: Reject, matchOperator: NotEqual, cidr: 203.0.113.0/24}
importV6:
- {action: Reject, matchOperator: In, cidr: 'fd00::/8', prefixLength: {max: 64}}
"#,
        )
        .unwrap();
        assert!(bgp_filter(&spec).is_empty());
        // The interface rule is left out, with a warning naming it.
        let w = bgp_filter_warnings(&spec);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].field, "spec.exportV4[1].interface");
        let export = filter_policy(&spec, true);
        let import = filter_policy(&spec, false);
        assert_eq!((export.len(), import.len()), (2, 4));
        let run = |rules: &[PolicyRule], p: &str, source| {
            let mut a = PathAttrs::default();
            match apply(Some(rules), &p.parse().unwrap(), &mut a, source) {
                Outcome::Accept { .. } => "accept",
                Outcome::Reject => "reject",
            }
        };
        // Nothing matched: rejected by the bare list; the agent appends the
        // peer's default after it.
        let (local, peer) = (RouteSource::Local, RouteSource::Peer);
        assert_eq!(run(&export, "77.0.1.0/24", peer), "accept");
        assert_eq!(run(&export, "77.0.1.0/24", local), "reject"); // NotIn 10.244/16
        assert_eq!(run(&export, "10.244.3.0/26", local), "reject"); // no match
        assert_eq!(run(&export, "2001:db8::/64", local), "reject"); // no v6 rule
        assert_eq!(run(&import, "55.0.0.0/30", peer), "accept");
        assert_eq!(run(&import, "55.0.0.0/24", peer), "reject"); // shorter than /30: on to NotEqual
        assert_eq!(run(&import, "198.51.100.0/24", peer), "reject");
        assert_eq!(run(&import, "203.0.113.0/25", peer), "reject"); // NotEqual
        assert_eq!(run(&import, "fd00:1::/48", peer), "reject");
        // In with prefixLength: the length range, clamped to the cidr's.
        let v6 = import.last().unwrap();
        assert_eq!((v6.ge, v6.le, v6.not_prefix), (Some(8), Some(64), false));
        assert_eq!(import[0].ge, Some(30));
        assert_eq!(import[0].le, Some(32));
        assert!(import[2].not_prefix && import[2].ge.is_none());
        for r in export.iter().chain(&import) {
            r.validate().unwrap();
        }
    }

    #[test]
    fn table_has_no_duplicates() {
        let mut seen = std::collections::BTreeSet::new();
        for (k, p, _) in CALICO_FIELDS {
            assert!(seen.insert((k, p)), "{k} {p} twice");
        }
    }

    #[test]
    fn as_numbers_as_calico_writes_them() {
        let mut p = Vec::new();
        for (s, want) in [("64512", 64512u32), ("1.10", 65546)] {
            let mut v = Value::String(s.into());
            as_number("f", &mut v, &mut p);
            assert_eq!(v, Value::Number(want.into()));
        }
        let mut v = Value::String("sixty".into());
        as_number("spec.asNumber", &mut v, &mut p);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "spec.asNumber");
    }

    /// Every field of Calico 3.2x's IPPool, BGPConfiguration, BGPPeer,
    /// BGPFilter (projectcalico/api pkg/apis/projectcalico/v3) and Node
    /// (libcalico-go), with a spec that sets it and whether Starling warns
    /// about that value.
    const CALICO: &[(&str, &str, &str, bool)] = &[
        ("IPPool", "spec.cidr", "{cidr: 10.245.0.0/16}", false),
        (
            "IPPool",
            "spec.blockSize",
            "{cidr: 10.245.0.0/16, blockSize: 28}",
            false,
        ),
        (
            "IPPool",
            "spec.ipipMode",
            "{cidr: 10.245.0.0/16, ipipMode: CrossSubnet}",
            false,
        ),
        (
            "IPPool",
            "spec.vxlanMode",
            "{cidr: 10.245.0.0/16, vxlanMode: Always}",
            false,
        ),
        (
            "IPPool",
            "spec.natOutgoing",
            "{cidr: 10.245.0.0/16, natOutgoing: true}",
            false,
        ),
        (
            "IPPool",
            "spec.disabled",
            "{cidr: 10.245.0.0/16, disabled: true}",
            false,
        ),
        (
            "IPPool",
            "spec.nodeSelector",
            "{cidr: 10.245.0.0/16, nodeSelector: \"rack == 'a'\"}",
            false,
        ),
        (
            "IPPool",
            "spec.disableBGPExport",
            "{cidr: 10.245.0.0/16, disableBGPExport: true}",
            true,
        ),
        (
            "IPPool",
            "spec.namespaceSelector",
            "{cidr: 10.245.0.0/16, namespaceSelector: \"team == 'x'\"}",
            true,
        ),
        (
            "IPPool",
            "spec.allowedUses",
            "{cidr: 10.245.0.0/16, allowedUses: [LoadBalancer]}",
            true,
        ),
        (
            "IPPool",
            "spec.assignmentMode",
            "{cidr: 10.245.0.0/16, assignmentMode: Manual}",
            true,
        ),
        (
            "IPPool",
            "spec.ipip",
            "{cidr: 10.245.0.0/16, ipip: {}}",
            false,
        ),
        (
            "IPPool",
            "spec.nat-outgoing",
            "{cidr: 10.245.0.0/16, nat-outgoing: false}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.logSeverityScreen",
            "{logSeverityScreen: Info}",
            true,
        ),
        (
            "BGPConfiguration",
            "spec.nodeToNodeMeshEnabled",
            "{nodeToNodeMeshEnabled: false}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.asNumber",
            "{asNumber: 65001}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.serviceLoadBalancerIPs",
            "{serviceLoadBalancerIPs: [{cidr: 203.0.113.0/24}]}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.serviceExternalIPs",
            "{serviceExternalIPs: [{cidr: 198.51.100.0/24}]}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.serviceClusterIPs",
            "{serviceClusterIPs: [{cidr: 10.96.0.0/12}]}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.serviceLoadBalancerAggregation",
            "{serviceLoadBalancerAggregation: Disabled}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.communities",
            "{communities: [{name: a, value: '65000:100'}]}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.prefixAdvertisements",
            "{communities: [{name: a, value: '65000:100'}], prefixAdvertisements: [{cidr: 10.244.0.0/16, communities: [a, '65000:1:2']}]}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.listenPort",
            "{listenPort: 1179}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.nodeMeshPassword",
            "{nodeMeshPassword: {secretKeyRef: {name: s, key: k}}}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.nodeMeshMaxRestartTime",
            "{nodeMeshMaxRestartTime: 2m0s}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.bindMode",
            "{bindMode: NodeIP}",
            false,
        ),
        (
            "BGPConfiguration",
            "spec.ignoredInterfaces",
            "{ignoredInterfaces: [eth9]}",
            true,
        ),
        (
            "BGPConfiguration",
            "spec.localWorkloadPeeringIPV4",
            "{localWorkloadPeeringIPV4: 169.254.0.179}",
            true,
        ),
        (
            "BGPConfiguration",
            "spec.localWorkloadPeeringIPV6",
            "{localWorkloadPeeringIPV6: 'fe80::179'}",
            true,
        ),
        (
            "BGPPeer",
            "spec.node",
            "{node: n1, peerIP: 192.0.2.1, asNumber: 65000}",
            false,
        ),
        (
            "BGPPeer",
            "spec.nodeSelector",
            "{nodeSelector: all(), peerIP: 192.0.2.1, asNumber: 65000}",
            false,
        ),
        (
            "BGPPeer",
            "spec.peerIP",
            "{peerIP: '192.0.2.1:1179', asNumber: 65000}",
            false,
        ),
        (
            "BGPPeer",
            "spec.asNumber",
            "{peerIP: 192.0.2.1, asNumber: 65000}",
            false,
        ),
        (
            "BGPPeer",
            "spec.localASNumber",
            "{peerIP: 192.0.2.1, asNumber: 65000, localASNumber: 65100}",
            true,
        ),
        (
            "BGPPeer",
            "spec.peerSelector",
            "{peerSelector: \"rr == 'true'\"}",
            false,
        ),
        (
            "BGPPeer",
            "spec.keepOriginalNextHop",
            "{peerIP: 192.0.2.1, asNumber: 65000, keepOriginalNextHop: true}",
            false,
        ),
        (
            "BGPPeer",
            "spec.nextHopMode",
            "{peerIP: 192.0.2.1, asNumber: 65000, nextHopMode: Keep}",
            false,
        ),
        (
            "BGPPeer",
            "spec.password",
            "{peerIP: 192.0.2.1, asNumber: 65000, password: {secretKeyRef: {name: s, key: k}}}",
            false,
        ),
        (
            "BGPPeer",
            "spec.sourceAddress",
            "{peerIP: 192.0.2.1, asNumber: 65000, sourceAddress: None}",
            false,
        ),
        (
            "BGPPeer",
            "spec.maxRestartTime",
            "{peerIP: 192.0.2.1, asNumber: 65000, maxRestartTime: 30s}",
            false,
        ),
        (
            "BGPPeer",
            "spec.numAllowedLocalASNumbers",
            "{peerIP: 192.0.2.1, asNumber: 65000, numAllowedLocalASNumbers: 1}",
            false,
        ),
        (
            "BGPPeer",
            "spec.ttlSecurity",
            "{peerIP: 192.0.2.1, asNumber: 65000, ttlSecurity: 1}",
            false,
        ),
        (
            "BGPPeer",
            "spec.reachableBy",
            "{peerIP: 192.0.2.1, asNumber: 65000, reachableBy: 192.0.2.254}",
            true,
        ),
        (
            "BGPPeer",
            "spec.filters",
            "{peerIP: 192.0.2.1, asNumber: 65000, filters: [f1]}",
            false,
        ),
        (
            "BGPPeer",
            "spec.localWorkloadSelector",
            "{peerIP: 192.0.2.1, asNumber: 65000, localWorkloadSelector: \"app == 'x'\"}",
            true,
        ),
        (
            "BGPPeer",
            "spec.reversePeering",
            "{peerSelector: \"rr == 'true'\", reversePeering: Manual}",
            true,
        ),
        (
            "BGPFilter",
            "spec.exportV4",
            "{exportV4: [{cidr: 10.0.0.0/8, matchOperator: In, action: Reject}]}",
            false,
        ),
        (
            "BGPFilter",
            "spec.importV4",
            "{importV4: [{cidr: 10.0.0.0/8, prefixLength: {min: 16, max: 24}, matchOperator: NotIn, action: Accept}]}",
            false,
        ),
        (
            "BGPFilter",
            "spec.exportV6",
            "{exportV6: [{source: RemotePeers, action: Reject}]}",
            false,
        ),
        (
            "BGPFilter",
            "spec.importV6",
            "{importV6: [{cidr: 'fd00::/8', matchOperator: Equal, interface: 'eth*', action: Accept}]}",
            false,
        ),
        (
            "Node",
            "spec.bgp.ipv4Address",
            "{bgp: {ipv4Address: 192.0.2.10/24}}",
            false,
        ),
        (
            "Node",
            "spec.bgp.ipv6Address",
            "{bgp: {ipv6Address: '2001:db8::10/64'}}",
            false,
        ),
        (
            "Node",
            "spec.bgp.asNumber",
            "{bgp: {ipv4Address: 192.0.2.10/24, asNumber: 65010}}",
            false,
        ),
        (
            "Node",
            "spec.bgp.routeReflectorClusterID",
            "{bgp: {ipv4Address: 192.0.2.10/24, routeReflectorClusterID: 224.0.0.1}}",
            false,
        ),
        (
            "Node",
            "spec.bgp.ipv4IPIPTunnelAddr",
            "{bgp: {ipv4Address: 192.0.2.10/24, ipv4IPIPTunnelAddr: 10.244.1.1}}",
            true,
        ),
        (
            "Node",
            "spec.ipv4VXLANTunnelAddr",
            "{bgp: {ipv4Address: 192.0.2.10/24}, ipv4VXLANTunnelAddr: 10.244.1.2}",
            true,
        ),
        (
            "Node",
            "spec.vxlanTunnelMACAddr",
            "{bgp: {ipv4Address: 192.0.2.10/24}, vxlanTunnelMACAddr: '66:1e:00:00:00:01'}",
            true,
        ),
        (
            "Node",
            "spec.ipv6VXLANTunnelAddr",
            "{bgp: {ipv4Address: 192.0.2.10/24}, ipv6VXLANTunnelAddr: 'fd00::1'}",
            true,
        ),
        (
            "Node",
            "spec.vxlanTunnelMACAddrV6",
            "{bgp: {ipv4Address: 192.0.2.10/24}, vxlanTunnelMACAddrV6: '66:1e:00:00:00:02'}",
            true,
        ),
        (
            "Node",
            "spec.orchRefs",
            "{bgp: {ipv4Address: 192.0.2.10/24}, orchRefs: [{nodeName: n1, orchestrator: k8s}]}",
            true,
        ),
        (
            "Node",
            "spec.wireguard",
            "{bgp: {ipv4Address: 192.0.2.10/24}, wireguard: {interfaceIPv4Address: 10.244.1.3}}",
            true,
        ),
        (
            "Node",
            "spec.addresses",
            "{bgp: {ipv4Address: 192.0.2.10/24}, addresses: [{address: 192.0.2.10/24, type: CalicoNodeIP}]}",
            true,
        ),
        (
            "Node",
            "spec.interfaces",
            "{bgp: {ipv4Address: 192.0.2.10/24}, interfaces: [{name: eth0, addresses: [192.0.2.10]}]}",
            true,
        ),
    ];

    fn doc(api: &str, kind: &str, spec: &str) -> String {
        let name = if kind == "BGPConfiguration" {
            "default"
        } else {
            "x1"
        };
        format!("apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: {name}\nspec: {spec}\n")
    }

    fn names(w: &[Problem], field: &str) -> bool {
        w.iter()
            .any(|p| p.field.as_deref() == Some(field) || p.message.contains(field))
    }

    /// No Calico field is silently ignored: each is in the table, and
    /// loading it either acts on it or warns naming it, with both API
    /// versions.
    #[test]
    fn every_calico_field_is_implemented_or_warned() {
        for (kind, path, _, _) in CALICO {
            assert!(
                CALICO_FIELDS.iter().any(|(k, p, _)| k == kind && p == path),
                "{kind} {path} is not in CALICO_FIELDS"
            );
        }
        for (kind, path, _) in CALICO_FIELDS {
            assert!(
                CALICO.iter().any(|(k, p, _, _)| k == kind && p == path),
                "{kind} {path} is in CALICO_FIELDS but not one of Calico's fields"
            );
        }
        for api in [CALICO_API_VERSION, CALICO_CRD_API_VERSION] {
            for (kind, path, spec, warns) in CALICO {
                let support = CALICO_FIELDS
                    .iter()
                    .find(|(k, p, _)| k == kind && p == path)
                    .unwrap()
                    .2;
                match support {
                    Implemented => assert!(!warns, "{kind} {path}"),
                    Warned { .. } | Stored(_) | State => assert!(warns, "{kind} {path}"),
                    Partly(_) | Obsolete(_) => {}
                }
                let text = doc(api, kind, spec);
                let (r, w) = check_str(Path::new("calico.yaml"), &text, Mode::Kubernetes);
                if let Err(e) = &r {
                    panic!("{kind} {path} ({api}) refused:\n{e}\n{text}");
                }
                let snap = r.unwrap().snapshot;
                assert_eq!(
                    names(&w, path),
                    *warns,
                    "{kind} {path} ({api}): warnings {w:#?}"
                );
                for p in &w {
                    assert_eq!(
                        p.object.as_deref(),
                        Some(&*format!(
                            "{kind}/{}",
                            if *kind == "BGPConfiguration" {
                                "default"
                            } else {
                                "x1"
                            }
                        )),
                        "{p}"
                    );
                }
                let loaded = match *kind {
                    "IPPool" => snap.pools.len(),
                    "BGPConfiguration" => usize::from(snap.bgp_configuration.is_some()),
                    "BGPPeer" => snap.peers.len(),
                    "Node" => snap.nodes.len(),
                    "BGPFilter" => snap.filters.len(),
                    _ => 0,
                };
                assert_eq!(loaded, 1, "{kind} {path}");
            }
        }
    }

    #[test]
    fn obsolete_v1_fields_are_refused_when_set() {
        for (spec, field) in [
            ("{cidr: 10.245.0.0/16, ipip: {enabled: true}}", "spec.ipip"),
            (
                "{cidr: 10.245.0.0/16, nat-outgoing: true}",
                "spec.nat-outgoing",
            ),
        ] {
            let e = load_str(
                Path::new("c.yaml"),
                &doc(CALICO_API_VERSION, "IPPool", spec),
            )
            .unwrap_err();
            assert_eq!(e.problems[0].field.as_deref(), Some(field), "{e}");
        }
    }

    /// `calicoctl get ippools,bgppeers,bgpconfig,nodes -o yaml`.
    const CALICOCTL: &str = r#"apiVersion: projectcalico.org/v3
items:
- apiVersion: projectcalico.org/v3
  kind: IPPool
  metadata:
    creationTimestamp: "2025-03-01T09:12:44Z"
    name: default-ipv4-ippool
    resourceVersion: "812"
    uid: 0b5d1f0e-8a44-4a07-9d0a-3f6c2a9b7e11
  spec:
    allowedUses:
    - Workload
    - Tunnel
    blockSize: 26
    cidr: 10.244.0.0/16
    ipipMode: Always
    natOutgoing: true
    nodeSelector: all()
    vxlanMode: Never
kind: IPPoolList
metadata:
  resourceVersion: "90211"
---
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  name: default
  resourceVersion: "1044"
spec:
  asNumber: 64512
  nodeToNodeMeshEnabled: false
  serviceLoadBalancerIPs:
  - cidr: 203.0.113.0/24
  serviceLoadBalancerAggregation: Disabled
  ignoredInterfaces: [eth9]
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: peer-a
  uid: 77e9c7f2-25a1-4e0c-b1c1-5e1a3b7f9a02
spec:
  peerIP: 192.0.2.1
  asNumber: "65100"
  keepOriginalNextHop: true
  localASNumber: 64600
  filters:
  - no-default
---
apiVersion: projectcalico.org/v3
kind: BGPFilter
metadata:
  name: no-default
spec:
  exportV4:
  - action: Reject
    cidr: 0.0.0.0/0
    matchOperator: Equal
---
apiVersion: projectcalico.org/v3
kind: NodeList
metadata: {}
items:
- apiVersion: projectcalico.org/v3
  kind: Node
  metadata:
    labels:
      kubernetes.io/hostname: node-a
      rack: r1
    name: node-a
  spec:
    addresses:
    - address: 192.0.2.10/24
      type: CalicoNodeIP
    - address: 192.0.2.10
      type: InternalIP
    bgp:
      ipv4Address: 192.0.2.10/24
      ipv4IPIPTunnelAddr: 10.244.12.128
      routeReflectorClusterID: 224.0.0.1
    orchRefs:
    - nodeName: node-a
      orchestrator: k8s
  status:
    podCIDRs:
    - 10.244.12.0/24
"#;

    /// `kubectl get ippools.crd.projectcalico.org,bgppeers.crd.projectcalico.org -o yaml`.
    const KUBECTL: &str = r#"apiVersion: v1
items:
- apiVersion: crd.projectcalico.org/v1
  kind: IPPool
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"crd.projectcalico.org/v1","kind":"IPPool","metadata":{"annotations":{},"name":"pods-v6"},"spec":{"cidr":"fd00:10:244::/56"}}
      projectcalico.org/metadata: '{"uid":"d3b1f6b4-0c36-4c2a-a8f7-6f2b6e1a1d01","creationTimestamp":"2025-03-01T09:12:44Z"}'
      team: net
    creationTimestamp: "2025-03-01T09:12:44Z"
    generation: 1
    managedFields:
    - apiVersion: crd.projectcalico.org/v1
      fieldsType: FieldsV1
      fieldsV1:
        f:spec:
          .: {}
          f:cidr: {}
      manager: kubectl-client-side-apply
      operation: Update
      time: "2025-03-01T09:12:44Z"
    name: pods-v6
    resourceVersion: "1733"
    uid: 9b0d6f0c-6d43-4d8e-9a55-0c8a4f1b2e33
  spec:
    allowedUses:
    - Workload
    - Tunnel
    blockSize: 122
    cidr: fd00:10:244::/56
    ipipMode: Never
    nodeSelector: all()
    vxlanMode: Never
- apiVersion: crd.projectcalico.org/v1
  kind: BGPPeer
  metadata:
    generation: 2
    name: rack1-tor
    resourceVersion: "5120"
    uid: 1c3e0a52-9b7d-4f8e-8b0f-2d4c6e8a0b44
  spec:
    asNumber: 64567
    nodeSelector: rack == 'r1'
    password:
      secretKeyRef:
        key: rack1-tor
        name: bgp-passwords
        optional: false
    peerIP: 192.0.2.1
    numAllowedLocalASNumbers: 0
kind: List
metadata:
  resourceVersion: ""
---
apiVersion: v1
kind: Node
metadata:
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
    projectcalico.org/IPv4Address: 192.0.2.11/24
    projectcalico.org/IPv4IPIPTunnelAddr: 10.244.9.64
    projectcalico.org/ASNumber: "64513"
  labels:
    kubernetes.io/os: linux
  name: node-b
spec:
  podCIDR: 10.244.9.0/24
status:
  addresses:
  - address: 192.0.2.11
    type: InternalIP
"#;

    fn warned(w: &[Problem], object: &str, field: &str) -> bool {
        w.iter().any(|p| {
            p.object.as_deref() == Some(object)
                && (p.field.as_deref() == Some(field) || p.message.contains(field))
        })
    }

    #[test]
    fn calicoctl_export_loads_with_warnings() {
        let (r, w) = check_str(Path::new("calico.yaml"), CALICOCTL, Mode::File);
        let snap = r.unwrap_or_else(|e| panic!("{e}")).snapshot;
        let pool = &snap.pools["default-ipv4-ippool"].spec;
        assert!(pool.nat_outgoing);
        assert_eq!(pool.ipip_mode, crate::model::crd::IpipMode::Always);
        assert_eq!(snap.bgp().as_number, 64512);
        assert!(!snap.bgp().node_to_node_mesh_enabled);
        assert_eq!(snap.peers["peer-a"].spec.as_number, Some(65100));
        let node = &snap.nodes["node-a"];
        assert_eq!(node.spec.ipv4_address.unwrap().to_string(), "192.0.2.10/24");
        assert_eq!(
            node.spec.route_reflector_cluster_id.unwrap().to_string(),
            "224.0.0.1"
        );
        assert_eq!(snap.labels("node-a")["rack"], "r1");
        assert_eq!(
            snap.bgp().service_load_balancer_ips[0].cidr.to_string(),
            "203.0.113.0/24"
        );
        for (object, field) in [
            ("BGPConfiguration/default", "spec.ignoredInterfaces"),
            ("BGPPeer/peer-a", "spec.localASNumber"),
            ("Node/node-a", "spec.addresses"),
        ] {
            assert!(
                warned(&w, object, field),
                "no warning for {object} {field}: {w:#?}"
            );
        }
        // Implemented: loaded, no word.
        assert_eq!(snap.peers["peer-a"].spec.keep_original_next_hop, Some(true));
        assert!(!warned(&w, "BGPPeer/peer-a", "spec.keepOriginalNextHop"));
        assert_eq!(
            snap.bgp().service_load_balancer_aggregation,
            Some(super::super::crd::Aggregation::Disabled)
        );
        // The file datastore loads BGPFilters and applies them: no word.
        assert_eq!(snap.peers["peer-a"].spec.filters, ["no-default"]);
        assert_eq!(snap.filters["no-default"].export_v4.len(), 1);
        assert!(!warned(&w, "BGPPeer/peer-a", "spec.filters"));
        assert!(!warned(&w, "BGPFilter/no-default", "spec.exportV4"));
        // allowedUses [Workload, Tunnel] is what Starling does: no word.
        assert!(
            !w.iter().any(|p| p.message.contains("allowedUses")
                || p.field.as_deref() == Some("spec.allowedUses"))
        );
        // Lines point into the file.
        let p = w
            .iter()
            .find(|p| p.field.as_deref() == Some("spec.localASNumber"))
            .unwrap();
        let want = CALICOCTL
            .lines()
            .position(|l| l.contains("localASNumber"))
            .unwrap()
            + 1;
        assert_eq!(p.line, Some(want), "{p}");
        assert!(
            p.to_string()
                .contains("(BGPPeer/peer-a): spec.localASNumber: not supported: Starling speaks"),
            "{p}"
        );
    }

    #[test]
    fn kubectl_export_with_metadata_noise_loads() {
        let (r, w) = check_str(Path::new("calico.yaml"), KUBECTL, Mode::Kubernetes);
        let snap = r.unwrap_or_else(|e| panic!("{e}")).snapshot;
        let pool = &snap.pools["pods-v6"];
        assert_eq!(pool.spec.block_size(), 122);
        // Only the user's own annotation is kept.
        assert_eq!(
            pool.metadata
                .annotations
                .as_ref()
                .map(|a| a.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["team".to_string()])
        );
        let peer = &snap.peers["rack1-tor"].spec;
        assert_eq!(
            peer.password
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .key,
            "rack1-tor"
        );
        let node = &snap.nodes["node-b"].spec;
        assert_eq!(node.as_number, Some(64513));
        assert_eq!(node.ipv4_address.unwrap().to_string(), "192.0.2.11/24");
        assert!(warned(&w, "Node/node-b", "metadata.annotations"), "{w:#?}");
        assert_eq!(w.len(), 1, "{w:#?}");
        // The file datastore cannot resolve a Secret: that is a problem there.
        let e = load_str(Path::new("calico.yaml"), KUBECTL).unwrap_err();
        assert!(e.to_string().contains("spec.password.secretKeyRef"), "{e}");
    }

    #[test]
    fn typos_and_malformed_values_are_refused_by_name() {
        for (from, to, field) in [
            (
                "    natOutgoing: true",
                "    natOutgong: true",
                "natOutgong",
            ),
            (
                "  keepOriginalNextHop: true",
                "  keepOriginalNextHp: true",
                "keepOriginalNextHp",
            ),
            (
                "    cidr: 10.244.0.0/16",
                "    cidr: 10.244.0.0/33",
                "spec.cidr",
            ),
            (
                "  asNumber: \"65100\"",
                "  asNumber: \"sixty\"",
                "spec.asNumber",
            ),
            (
                "    matchOperator: Equal",
                "    matchOperator: Equals",
                "matchOperator",
            ),
            ("  - action: Reject", "  - action: Drop", "action"),
            (
                "      ipv4IPIPTunnelAddr",
                "      ipv4IPIPTunelAddr",
                "ipv4IPIPTunelAddr",
            ),
        ] {
            assert!(CALICOCTL.contains(from), "{from}");
            let text = CALICOCTL.replace(from, to);
            let e = load_str(Path::new("calico.yaml"), &text).unwrap_err();
            assert_eq!(e.problems.len(), 1, "{e}");
            let p = &e.problems[0];
            assert!(p.to_string().contains(field), "{field}: {p}");
            assert!(p.to_string().starts_with("calico.yaml:"), "{p}");
            let bad = to
                .trim()
                .trim_start_matches("- ")
                .split(':')
                .next()
                .unwrap();
            let want = text.lines().position(|l| l.contains(to.trim())).unwrap() + 1;
            assert_eq!(p.line, Some(want), "{bad}: {p}");
        }
        // A kind Calico does not have.
        let e = load_str(Path::new("c.yaml"), &doc(CALICO_API_VERSION, "IPPol", "{}")).unwrap_err();
        assert_eq!(e.problems[0].field.as_deref(), Some("kind"), "{e}");
        // A BGPFilter rule of the wrong family.
        let e = load_str(
            Path::new("c.yaml"),
            &doc(
                CALICO_API_VERSION,
                "BGPFilter",
                "{exportV6: [{cidr: 10.0.0.0/8, matchOperator: In, action: Accept}]}",
            ),
        )
        .unwrap_err();
        assert_eq!(
            e.problems[0].field.as_deref(),
            Some("spec.exportV6[0].cidr"),
            "{e}"
        );
    }

    #[test]
    fn other_calico_kinds_and_per_node_config_are_left_out_with_a_word() {
        let text = format!(
            "{}---\n{}---\n{}",
            doc(
                CALICO_CRD_API_VERSION,
                "FelixConfiguration",
                "{bpfEnabled: false}"
            ),
            doc(
                CALICO_CRD_API_VERSION,
                "BlockAffinity",
                "{cidr: 10.244.1.0/26, node: a, state: confirmed, deleted: 'false'}"
            ),
            "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: node.node-a}\nspec: {listenPort: 1179}\n"
        );
        let (r, w) = check_str(Path::new("c.yaml"), &text, Mode::File);
        let snap = r.unwrap_or_else(|e| panic!("{e}")).snapshot;
        assert!(snap.affinities.is_empty() && snap.bgp_configuration.is_none());
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(
            w[2].message.contains("per-node BGPConfiguration"),
            "{}",
            w[2]
        );
    }

    #[test]
    fn import_writes_starling_kinds_that_load() {
        let (r, w) = import_str(Path::new("calico.yaml"), KUBECTL);
        let yaml = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w.len(), 1, "{w:#?}");
        for noise in [
            "uid",
            "managedFields",
            "resourceVersion",
            "projectcalico.org",
            "crd.",
            "optional",
            "kubernetes.io/os",
        ] {
            assert!(!yaml.contains(noise), "{noise} in\n{yaml}");
        }
        assert_eq!(
            yaml.matches("apiVersion: starling.dev/v1").count(),
            3,
            "{yaml}"
        );
        let (again, w2) = check_str(Path::new("imported.yaml"), &yaml, Mode::Kubernetes);
        let again = again.unwrap_or_else(|e| panic!("{e}\n{yaml}")).snapshot;
        assert!(w2.is_empty(), "{w2:#?}");
        let (orig, _) = check_str(Path::new("calico.yaml"), KUBECTL, Mode::Kubernetes);
        let orig = orig.unwrap().snapshot;
        assert_eq!(again.pools, orig.pools);
        assert_eq!(again.peers, orig.peers);
        assert_eq!(again.nodes["node-b"].spec, orig.nodes["node-b"].spec);

        // calicoctl's: Node labels are the Node's own in Kubernetes.
        let (r, w) = import_str(Path::new("calico.yaml"), CALICOCTL);
        let yaml = r.unwrap_or_else(|e| panic!("{e}"));
        assert!(!yaml.contains("rack: r1"), "{yaml}");
        assert!(
            yaml.contains("routeReflectorClusterID: 224.0.0.1"),
            "{yaml}"
        );
        // BGPFilters carry over as ours, with the peer's `filters`.
        assert!(
            yaml.contains("kind: BGPFilter") && yaml.contains("name: no-default"),
            "{yaml}"
        );
        assert!(!warned(&w, "BGPFilter/no-default", "spec.exportV4"));
        assert!(!warned(&w, "BGPPeer/peer-a", "spec.filters"));
        let (again, w2) = check_str(Path::new("imported.yaml"), &yaml, Mode::Kubernetes);
        let again = again.unwrap_or_else(|e| panic!("{e}\n{yaml}")).snapshot;
        assert!(
            !w2.iter().any(|p| p.message.contains("BGPFilter")),
            "{w2:#?}"
        );
        assert_eq!(again.filters["no-default"].export_v4.len(), 1);
    }

    #[test]
    fn starling_yaml_is_unchanged() {
        let text = "apiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 65001}\n---\napiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata: {name: a}\nspec: {ipv4Address: 192.0.2.1/24}\n";
        let (r, w) = check_str(Path::new("m.yaml"), text, Mode::File);
        assert!(r.is_ok() && w.is_empty(), "{w:#?}");
        // Starling's own fields that are stored, not applied, are warned.
        let text = text.replace(
            "{asNumber: 65001}",
            "{asNumber: 65001, logSeverityScreen: Info}",
        );
        let (r, w) = check_str(Path::new("m.yaml"), &text, Mode::File);
        assert!(r.is_ok());
        assert_eq!(
            w[0].field.as_deref(),
            Some("spec.logSeverityScreen"),
            "{w:#?}"
        );
        assert_eq!(w[0].line, Some(4));
    }
}
