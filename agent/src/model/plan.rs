//! The peering plan: from a [`Snapshot`] and the name of this node, the BGP
//! sessions this node's speaker should have. Pure: passwords were resolved
//! by the datastore, so the same snapshot always gives the same plan, and
//! the agent applies a new plan by diffing it against the old one.

use super::Snapshot;
use super::calico;
use super::crd::*;
use super::selector::NodeSelector;
use super::validate::{CommunityValue, community_value};
use starling_bgp::PeerConfig;
use starling_bgp::policy::{PolicyRule, PrefixCommunities};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// The PEER TYPE column of `calicoctl node status`, which `description`
/// starts with (`"<type>: <name>"`).
pub const MESH: &str = "node-to-node mesh";
pub const REFLECTOR: &str = "route reflector";
pub const REFLECTOR_CLIENT: &str = "route reflector client";
pub const GLOBAL: &str = "global";
pub const NODE_SPECIFIC: &str = "node specific";

/// A full mesh of more nodes than this gets [`mesh_advice`] (Calico's docs
/// advise route reflectors beyond about 100 nodes).
pub const DEFAULT_MESH_WARN_NODES: usize = 100;

/// The advice to switch to route reflectors when the node-to-node mesh
/// spans more than `limit` nodes (0: never): every node keeps a session to
/// every other, so sessions grow with the square of the cluster.
pub fn mesh_advice(snapshot: &Snapshot, limit: usize) -> Option<String> {
    let nodes = snapshot.nodes.len();
    if limit == 0 || !snapshot.bgp().node_to_node_mesh_enabled || nodes <= limit {
        return None;
    }
    Some(format!(
        "the node-to-node mesh spans {nodes} nodes (more than meshWarnNodes {limit}): each node keeps {} sessions and every route goes to every node; use route reflectors (nodeToNodeMeshEnabled: false and routeReflectorClusterID on two or more nodes; docs/operations.md, \"Mesh or reflectors?\"); the switch loses no packets",
        nodes - 1
    ))
}

/// A plan and what could not be planned (a peer whose password is not
/// resolved, a peer at one of this node's own addresses, ...).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerPlan {
    /// Sorted by address; at most one session per address.
    pub peers: Vec<PeerConfig>,
    pub warnings: Vec<String>,
}

/// This node's side of BGP, for the speaker's own configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBgp {
    pub asn: u32,
    /// The node's IPv4 address; an IPv6-only node has none and the agent
    /// must pick one.
    pub router_id: Option<Ipv4Addr>,
    /// Set on route reflectors.
    pub cluster_id: Option<Ipv4Addr>,
    pub listen_port: u16,
    /// Graceful restart time to advertise.
    pub restart_time: u16,
    /// Where to listen for BGP: `bindMode: NodeIP` gives the node's
    /// addresses; empty: every address.
    pub listen_addresses: Vec<IpAddr>,
}

pub fn local(snapshot: &Snapshot, this_node: &str) -> Option<LocalBgp> {
    let me = snapshot.node(this_node)?;
    let bgp = snapshot.bgp();
    Some(LocalBgp {
        asn: me.as_number.unwrap_or(bgp.as_number),
        router_id: me.ipv4_address.map(|a| a.addr()),
        cluster_id: me.route_reflector_cluster_id,
        listen_port: bgp.listen_port,
        restart_time: bgp.node_mesh_max_restart_time.secs_u16(),
        listen_addresses: match bgp.bind_mode {
            Some(BindMode::NodeIp) => addresses(me).into_iter().flatten().collect(),
            Some(BindMode::None) | None => Vec::new(),
        },
    })
}

/// `prefixAdvertisements` as the speaker takes it, for every peer. A
/// community that is neither a name nor a value was refused by the checks.
pub fn prefix_communities(bgp: &BGPConfigurationSpec) -> Vec<PrefixCommunities> {
    let mut out = Vec::new();
    for a in &bgp.prefix_advertisements {
        let mut t = PrefixCommunities {
            prefix: a.cidr.trunc(),
            communities: Vec::new(),
            large_communities: Vec::new(),
        };
        for c in &a.communities {
            match community_value(bgp, c) {
                Some(CommunityValue::Standard(c)) => t.communities.push(c),
                Some(CommunityValue::Large(c)) => t.large_communities.push(c),
                None => {}
            }
        }
        out.push(t);
    }
    out
}

/// The TTL of eBGP sessions without ttlSecurity: Calico's BIRD sets
/// `multihop` on every peer, so an eBGP peer need not be directly
/// connected; 255 as FRR's `ebgp-multihop` without a count.
pub const EBGP_MULTIHOP_TTL: u8 = 255;

/// The sessions `this_node` should have.
pub fn plan(snapshot: &Snapshot, this_node: &str) -> Vec<PeerConfig> {
    plan_detailed(snapshot, this_node).peers
}

fn addresses(n: &StarlingNodeSpec) -> [Option<IpAddr>; 2] {
    [
        n.ipv4_address.map(|a| IpAddr::V4(a.addr())),
        n.ipv6_address.map(|a| IpAddr::V6(a.addr())),
    ]
}

/// This node's address of `peer`'s family.
fn same_family(me: &StarlingNodeSpec, peer: IpAddr) -> Option<IpAddr> {
    addresses(me)
        .into_iter()
        .flatten()
        .find(|a| a.is_ipv4() == peer.is_ipv4())
}

fn selects(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    NodeSelector::parse(selector)
        .map(|s| s.matches(labels))
        .unwrap_or(false)
}

/// A peer's import and export rules.
type ImportExport = (Vec<PolicyRule>, Vec<PolicyRule>);

struct Planner<'a> {
    snap: &'a Snapshot,
    this: &'a str,
    me: &'a StarlingNodeSpec,
    out: BTreeMap<IpAddr, PeerConfig>,
    warnings: Vec<String>,
}

impl Planner<'_> {
    fn add(&mut self, mut pc: PeerConfig) {
        let bgp = self.snap.bgp();
        pc.prefix_communities = prefix_communities(bgp);
        let local_asn = self.me.as_number.unwrap_or(bgp.as_number);
        if pc.asn != local_asn && !pc.ttl_security && pc.multihop.is_none() {
            pc.multihop = Some(EBGP_MULTIHOP_TTL);
        }
        let addr = pc.address;
        if addresses(self.me).contains(&Some(addr)) {
            self.warnings.push(format!(
                "{}: {addr} is this node's own address; no session",
                pc.description.as_deref().unwrap_or_default()
            ));
            return;
        }
        match self.out.get(&addr) {
            Some(first) => self.warnings.push(format!(
                "{}: a session to {addr} is already planned ({}); ignored",
                pc.description.as_deref().unwrap_or_default(),
                first.description.as_deref().unwrap_or_default()
            )),
            None => {
                self.out.insert(addr, pc);
            }
        }
    }

    fn password(&mut self, p: Option<&Password>, what: &str) -> Result<Option<String>, ()> {
        match p {
            None => Ok(None),
            Some(p) => match self.snap.passwords.get(p) {
                Some(k) => Ok(Some(k.clone())),
                None => {
                    self.warnings.push(format!(
                        "{what}: its password is not available (a Secret the datastore could not read?); no session"
                    ));
                    Err(())
                }
            },
        }
    }

    /// The import and export rules of the BGPFilters a peer names, in
    /// order (`None`: it names none). A filter missing from the model
    /// means no session: its routes would otherwise pass unfiltered.
    fn filters(&mut self, names: &[String], what: &str) -> Result<Option<ImportExport>, ()> {
        if names.is_empty() {
            return Ok(None);
        }
        let (mut import, mut export) = (Vec::new(), Vec::new());
        for name in names {
            let Some(f) = self.snap.filters.get(name) else {
                self.warnings.push(format!(
                    "{what}: BGPFilter `{name}` is not in the model; no session (its routes would pass unfiltered)"
                ));
                return Err(());
            };
            import.extend(calico::filter_policy(f, false));
            export.extend(calico::filter_policy(f, true));
        }
        Ok(Some((import, export)))
    }

    /// Sessions to other nodes: the full mesh, or reflectors and clients.
    fn nodes(&mut self) {
        let (snap, me) = (self.snap, self.me);
        let bgp = snap.bgp();
        let Ok(password) = self.password(bgp.node_mesh_password.as_ref(), "node-to-node sessions")
        else {
            return;
        };
        let restart = bgp.node_mesh_max_restart_time.secs_u16();
        let me_reflector = me.route_reflector_cluster_id.is_some();
        for (name, node) in &snap.nodes {
            if name == self.this {
                continue;
            }
            let node_reflector = node.spec.route_reflector_cluster_id.is_some();
            let kind = if bgp.node_to_node_mesh_enabled {
                MESH
            } else {
                match (me_reflector, node_reflector) {
                    (true, true) | (false, true) => REFLECTOR,
                    (true, false) => REFLECTOR_CLIENT,
                    (false, false) => continue,
                }
            };
            for (mine, theirs) in addresses(me).into_iter().zip(addresses(&node.spec)) {
                let (Some(mine), Some(theirs)) = (mine, theirs) else {
                    continue;
                };
                let mut pc = PeerConfig::new(theirs, node.spec.as_number.unwrap_or(bgp.as_number));
                pc.port = bgp.listen_port;
                // One side of each pair waits, so the two never open
                // crossing connections: the higher address, as Calico does.
                pc.passive = mine > theirs;
                pc.source_address = Some(mine);
                pc.md5_password = password.clone();
                pc.max_restart_time = Some(restart);
                pc.restart_time = Some(restart);
                pc.route_reflector_client = kind == REFLECTOR_CLIENT;
                pc.description = Some(format!("{kind}: {name}"));
                self.add(pc);
            }
        }
    }

    /// BGPPeer objects that apply to this node.
    fn bgp_peers(&mut self) {
        let (snap, me, this) = (self.snap, self.me, self.this);
        let bgp = snap.bgp();
        let labels = snap.labels(this);
        for (pname, peer) in &snap.peers {
            let spec = &peer.spec;
            let applies = match (&spec.node, &spec.node_selector) {
                (Some(n), _) => n == this,
                (None, Some(sel)) => selects(sel, labels),
                (None, None) => true,
            };
            if !applies {
                continue;
            }
            let kind = if spec.node.is_some() {
                NODE_SPECIFIC
            } else {
                GLOBAL
            };
            let what = format!("{kind}: {pname}");
            let Ok(password) = self.password(spec.password.as_ref(), &what) else {
                continue;
            };
            let Ok(filters) = self.filters(&spec.filters, &what) else {
                continue;
            };
            // (address, port, AS, between two nodes)
            let mut targets: Vec<(IpAddr, u16, u32, bool)> = Vec::new();
            if let (Some(ip), Some(asn)) = (spec.peer_ip, spec.as_number) {
                targets.push((ip.ip, ip.port.unwrap_or(179), asn, false));
            }
            if let Some(sel) = &spec.peer_selector {
                for (name, node) in &snap.nodes {
                    if name == this || !selects(sel, snap.labels(name)) {
                        continue;
                    }
                    let asn = node.spec.as_number.unwrap_or(bgp.as_number);
                    for (mine, theirs) in addresses(me).into_iter().zip(addresses(&node.spec)) {
                        if let (Some(_), Some(theirs)) = (mine, theirs) {
                            targets.push((theirs, bgp.listen_port, asn, true));
                        }
                    }
                }
            }
            for (ip, port, asn, node_pair) in targets {
                let mut pc = PeerConfig::new(ip, asn);
                pc.port = port;
                let mine = same_family(me, ip);
                pc.source_address = match spec.source_address {
                    SourceAddress::UseNodeIP => mine,
                    SourceAddress::None => None,
                };
                if node_pair {
                    pc.passive = mine.is_some_and(|m| m > ip);
                }
                pc.md5_password = password.clone();
                if let Some(hops) = spec.ttl_security.filter(|h| *h > 0) {
                    pc.ttl_security = true;
                    pc.multihop = Some(hops);
                }
                // Advertised to the peer (BIRD's `graceful restart time`,
                // as Calico sets it), and our cap on what the peer advertises.
                pc.max_restart_time = spec.max_restart_time.map(|d| d.secs_u16());
                pc.restart_time = pc.max_restart_time;
                // BGP's usual ratio: the hold time is three keepalives.
                pc.hold_time = spec.keepalive_time.map(|k| k.secs_u16().saturating_mul(3));
                pc.next_hop_self = spec.next_hop_mode == Some(NextHopMode::SelfAddress);
                // keepOriginalNextHop applies to eBGP peers only, as in Calico.
                let ebgp = asn != me.as_number.unwrap_or(bgp.as_number);
                pc.next_hop_keep = spec.next_hop_mode == Some(NextHopMode::Keep)
                    || (spec.keep_original_next_hop == Some(true) && ebgp);
                pc.allow_local_as = spec.num_allowed_local_as_numbers.unwrap_or(0);
                // A router outside the cluster is not ours to trust with a
                // full table: it gets a limit unless the peer sets one.
                let limit = match (spec.max_prefixes, node_pair) {
                    (Some(m), _) => Some(m),
                    (None, false) => Some(DEFAULT_EXTERNAL_MAX_PREFIXES),
                    (None, true) => None,
                };
                pc.max_prefixes = limit.map(|m| starling_bgp::MaxPrefixes {
                    limit: m.limit as usize,
                    action: match m.action {
                        MaxPrefixAction::Warn => starling_bgp::MaxPrefixAction::Warn,
                        MaxPrefixAction::Close => starling_bgp::MaxPrefixAction::Close,
                    },
                });
                if let Some((import, export)) = &filters {
                    pc.import = Some(import.clone());
                    pc.export = Some(export.clone());
                }
                pc.description = Some(what.clone());
                self.add(pc);
            }
        }
    }
}

/// The sessions `this_node` should have, with what had to be left out. A
/// node missing from the snapshot has no sessions.
pub fn plan_detailed(snapshot: &Snapshot, this_node: &str) -> PeerPlan {
    let Some(me) = snapshot.node(this_node) else {
        return PeerPlan {
            peers: Vec::new(),
            warnings: vec![format!(
                "node {this_node} is not in the model (no StarlingNode named so): no sessions"
            )],
        };
    };
    let mut p = Planner {
        snap: snapshot,
        this: this_node,
        me,
        out: BTreeMap::new(),
        warnings: Vec::new(),
    };
    p.nodes();
    p.bgp_peers();
    PeerPlan {
        peers: p.out.into_values().collect(),
        warnings: p.warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::file::load_str;
    use std::path::Path;

    fn node(name: &str, v4: &str, extra: &str) -> String {
        format!(
            "---\napiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata:\n  name: {name}\n  labels:\n    name: {name}\nspec:\n  ipv4Address: {v4}\n{extra}"
        )
    }

    fn config(mesh: bool) -> String {
        format!(
            "---\napiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  nodeToNodeMeshEnabled: {mesh}\n"
        )
    }

    fn snap(parts: &[String]) -> Snapshot {
        load_str(Path::new("test.yaml"), &parts.concat()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// (address, passive, rr client, description) of each session.
    fn summary(peers: &[PeerConfig]) -> Vec<(String, bool, bool, String)> {
        peers
            .iter()
            .map(|p| {
                (
                    p.address.to_string(),
                    p.passive,
                    p.route_reflector_client,
                    p.description.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn mesh_of_three() {
        let s = snap(&[
            node("a", "10.0.0.1/24", ""),
            node("b", "10.0.0.2/24", ""),
            node("c", "10.0.0.3/24", ""),
        ]);
        let a = plan(&s, "a");
        assert_eq!(
            summary(&a),
            [
                (
                    "10.0.0.2".into(),
                    false,
                    false,
                    "node-to-node mesh: b".into()
                ),
                (
                    "10.0.0.3".into(),
                    false,
                    false,
                    "node-to-node mesh: c".into()
                ),
            ]
        );
        assert!(a.iter().all(|p| p.asn == DEFAULT_AS_NUMBER
            && p.port == 179
            && p.source_address == Some(ip("10.0.0.1"))
            && p.max_restart_time == Some(120)
            && p.md5_password.is_none()));
        let b = plan(&s, "b");
        assert_eq!(
            summary(&b),
            [
                (
                    "10.0.0.1".into(),
                    true,
                    false,
                    "node-to-node mesh: a".into()
                ),
                (
                    "10.0.0.3".into(),
                    false,
                    false,
                    "node-to-node mesh: c".into()
                ),
            ]
        );
        let c = plan(&s, "c");
        assert!(
            c.iter().all(|p| p.passive),
            "the highest address only waits"
        );
        // Exactly one passive side per pair, across the whole cluster.
        for (x, y) in [("a", "b"), ("a", "c"), ("b", "c")] {
            let addr = |n: &str| IpAddr::V4(s.node(n).unwrap().ipv4_address.unwrap().addr());
            let px = plan(&s, x)
                .into_iter()
                .find(|p| p.address == addr(y))
                .unwrap();
            let py = plan(&s, y)
                .into_iter()
                .find(|p| p.address == addr(x))
                .unwrap();
            assert!(px.passive != py.passive, "{x}-{y}");
        }
    }

    /// BGP policy from the model: communities by prefix on every session,
    /// next hop keep, allowas-in, the advertised restart time, the eBGP
    /// TTL and bindMode.
    #[test]
    fn policy_knobs_reach_the_speaker() {
        let cfg = "---\napiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec:\n  asNumber: 64512\n  bindMode: NodeIP\n  communities: [{name: pods, value: '64512:100'}, {name: big, value: '64512:1:2'}]\n  prefixAdvertisements:\n  - {cidr: 10.244.0.0/16, communities: [pods, big, '65000:7']}\n";
        let peers = "---\napiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: tor}\nspec: {peerIP: 192.0.2.254, asNumber: 65000, nextHopMode: Keep, numAllowedLocalASNumbers: 2, maxRestartTime: 45s}\n---\napiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: old}\nspec: {peerIP: 192.0.2.253, asNumber: 64512, keepOriginalNextHop: true}\n---\napiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: gtsm}\nspec: {peerIP: 192.0.2.252, asNumber: 65001, ttlSecurity: 2}\n";
        let s = snap(&[
            cfg.to_string(),
            node("a", "10.0.0.1/24", ""),
            node("b", "10.0.0.2/24", ""),
            peers.to_string(),
        ]);
        let p = plan(&s, "a");
        let by = |a: &str| p.iter().find(|x| x.address == ip(a)).unwrap();
        let want: Vec<starling_bgp::policy::PrefixCommunities> = serde_yaml::from_str(
            "[{prefix: 10.244.0.0/16, communities: ['64512:100', '65000:7'], large_communities: ['64512:1:2']}]",
        )
        .unwrap();
        assert!(p.iter().all(|x| x.prefix_communities == want), "{p:#?}");
        let tor = by("192.0.2.254");
        assert!(tor.next_hop_keep && !tor.next_hop_self);
        assert_eq!(tor.allow_local_as, 2);
        assert_eq!(
            (tor.restart_time, tor.max_restart_time),
            (Some(45), Some(45))
        );
        assert_eq!(tor.multihop, Some(EBGP_MULTIHOP_TTL));
        // keepOriginalNextHop applies to eBGP peers only (as in Calico); an
        // iBGP peer keeps next hops anyway and gets no multihop TTL.
        let old = by("192.0.2.253");
        assert!(!old.next_hop_keep && old.multihop.is_none());
        let gtsm = by("192.0.2.252");
        assert!(gtsm.ttl_security && gtsm.multihop == Some(2));
        let mesh = by("10.0.0.2");
        assert_eq!((mesh.restart_time, mesh.multihop), (Some(120), None));
        let l = local(&s, "a").unwrap();
        assert_eq!(l.listen_addresses, vec![ip("10.0.0.1")]);
        let l = local(&snap(&[node("a", "10.0.0.1/24", "")]), "a").unwrap();
        assert!(l.listen_addresses.is_empty());
        // A community that is neither a name nor a value is refused by name.
        let bad = cfg.replace("'65000:7'", "nosuch");
        let e = load_str(
            Path::new("t.yaml"),
            &[bad, node("a", "10.0.0.1/24", "")].concat(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("spec.prefixAdvertisements[0].communities[2]") && e.contains("nosuch"),
            "{e}"
        );
    }

    #[test]
    fn passive_side_compares_addresses_not_names() {
        // "z" has the lower address, so "a" is the passive one.
        let s = snap(&[node("a", "10.0.0.9/24", ""), node("z", "10.0.0.1/24", "")]);
        assert!(plan(&s, "a")[0].passive);
        assert!(!plan(&s, "z")[0].passive);
        // IPv6 sessions compare IPv6 addresses, each family on its own.
        let s = snap(&[
            node("a", "10.0.0.9/24", "  ipv6Address: 2001:db8::1/64\n"),
            node("z", "10.0.0.1/24", "  ipv6Address: 2001:db8::2/64\n"),
        ]);
        let a = summary(&plan(&s, "a"));
        assert_eq!(a[0].0, "10.0.0.1");
        assert!(a[0].1);
        assert_eq!(a[1].0, "2001:db8::2");
        assert!(!a[1].1);
    }

    #[test]
    fn two_reflectors_four_clients() {
        let rr = "  routeReflectorClusterID: 224.0.0.1\n";
        let s = snap(&[
            config(false),
            node("rr1", "10.0.0.1/24", rr),
            node("rr2", "10.0.0.2/24", rr),
            node("c1", "10.0.0.11/24", ""),
            node("c2", "10.0.0.12/24", ""),
            node("c3", "10.0.0.13/24", ""),
            node("c4", "10.0.0.14/24", ""),
        ]);
        assert_eq!(
            summary(&plan(&s, "rr1")),
            [
                (
                    "10.0.0.2".into(),
                    false,
                    false,
                    "route reflector: rr2".into()
                ),
                (
                    "10.0.0.11".into(),
                    false,
                    true,
                    "route reflector client: c1".into()
                ),
                (
                    "10.0.0.12".into(),
                    false,
                    true,
                    "route reflector client: c2".into()
                ),
                (
                    "10.0.0.13".into(),
                    false,
                    true,
                    "route reflector client: c3".into()
                ),
                (
                    "10.0.0.14".into(),
                    false,
                    true,
                    "route reflector client: c4".into()
                ),
            ]
        );
        assert_eq!(
            summary(&plan(&s, "rr2")),
            [
                (
                    "10.0.0.1".into(),
                    true,
                    false,
                    "route reflector: rr1".into()
                ),
                (
                    "10.0.0.11".into(),
                    false,
                    true,
                    "route reflector client: c1".into()
                ),
                (
                    "10.0.0.12".into(),
                    false,
                    true,
                    "route reflector client: c2".into()
                ),
                (
                    "10.0.0.13".into(),
                    false,
                    true,
                    "route reflector client: c3".into()
                ),
                (
                    "10.0.0.14".into(),
                    false,
                    true,
                    "route reflector client: c4".into()
                ),
            ]
        );
        for c in ["c1", "c2", "c3", "c4"] {
            assert_eq!(
                summary(&plan(&s, c)),
                [
                    (
                        "10.0.0.1".into(),
                        true,
                        false,
                        "route reflector: rr1".into()
                    ),
                    (
                        "10.0.0.2".into(),
                        true,
                        false,
                        "route reflector: rr2".into()
                    ),
                ],
                "{c} peers with the reflectors only"
            );
        }
        let l = local(&s, "rr1").unwrap();
        assert_eq!(l.cluster_id, Some("224.0.0.1".parse().unwrap()));
        assert_eq!(local(&s, "c1").unwrap().cluster_id, None);
    }

    #[test]
    fn mesh_enabled_ignores_reflector_roles() {
        let rr = "  routeReflectorClusterID: 224.0.0.1\n";
        let s = snap(&[
            node("rr1", "10.0.0.1/24", rr),
            node("c1", "10.0.0.11/24", ""),
            node("c2", "10.0.0.12/24", ""),
        ]);
        let c1 = summary(&plan(&s, "c1"));
        assert_eq!(c1.len(), 2);
        assert!(c1.iter().all(|p| p.3.starts_with(MESH) && !p.2));
    }

    #[test]
    fn mesh_disabled_without_reflectors_has_no_node_sessions() {
        let s = snap(&[
            config(false),
            node("a", "10.0.0.1/24", ""),
            node("b", "10.0.0.2/24", ""),
        ]);
        assert!(plan(&s, "a").is_empty());
    }

    fn peer(name: &str, body: &str) -> String {
        format!(
            "---\napiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata:\n  name: {name}\nspec:\n{body}"
        )
    }

    #[test]
    fn external_peers_global_node_and_selector() {
        let dir = std::env::temp_dir().join(format!("starling-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("tor.key");
        std::fs::write(&key, "hunter2\n").unwrap();
        let s = snap(&[
            config(false),
            node("a", "10.0.0.1/24", ""),
            node("b", "10.0.0.2/24", "  asNumber: 65002\n"),
            node("c", "10.0.0.3/24", "  ipv6Address: 2001:db8::3/64\n"),
            peer(
                "route-server",
                "  peerIP: 192.0.2.100\n  asNumber: 65100\n  sourceAddress: None\n",
            ),
            peer(
                "tor-a",
                &format!(
                    "  node: a\n  peerIP: 10.0.0.254:1179\n  asNumber: 65200\n  password:\n    file: {}\n  ttlSecurity: 1\n  maxRestartTime: 30s\n  keepaliveTime: 10s\n  nextHopMode: Self\n",
                    key.display()
                ),
            ),
            peer(
                "rack",
                "  nodeSelector: name != 'a'\n  peerIP: 198.51.100.1\n  asNumber: 65300\n  maxPrefixes: {limit: 50, action: Warn}\n",
            ),
            peer("to-b", "  node: c\n  peerSelector: name == 'b'\n"),
        ]);
        let a = plan(&s, "a");
        assert_eq!(
            summary(&a),
            [
                (
                    "10.0.0.254".into(),
                    false,
                    false,
                    "node specific: tor-a".into()
                ),
                (
                    "192.0.2.100".into(),
                    false,
                    false,
                    "global: route-server".into()
                ),
            ]
        );
        let tor = &a[0];
        assert_eq!(tor.port, 1179);
        assert_eq!(tor.asn, 65200);
        assert_eq!(tor.md5_password.as_deref(), Some("hunter2"));
        assert!(tor.ttl_security);
        assert_eq!(tor.multihop, Some(1));
        assert_eq!(tor.max_restart_time, Some(30));
        assert_eq!(tor.hold_time, Some(30));
        assert!(tor.next_hop_self);
        assert_eq!(tor.source_address, Some(ip("10.0.0.1")));
        let rs = &a[1];
        assert_eq!((rs.asn, rs.port, rs.source_address), (65100, 179, None));
        assert!(!rs.ttl_security && rs.md5_password.is_none() && rs.hold_time.is_none());

        let b: Vec<_> = summary(&plan(&s, "b")).into_iter().map(|p| p.3).collect();
        assert_eq!(b, ["global: route-server", "global: rack"]);

        // peerSelector: c peers with node b at b's address and AS.
        let c = plan(&s, "c");
        let to_b = c.iter().find(|p| p.address == ip("10.0.0.2")).unwrap();
        assert_eq!(to_b.asn, 65002);
        assert!(to_b.passive, "10.0.0.3 > 10.0.0.2");
        assert_eq!(to_b.description.as_deref(), Some("node specific: to-b"));
        assert_eq!(c.len(), 3);

        // Routers outside the cluster get the default prefix limit unless
        // they set one; sessions between nodes get none unless set.
        let default = Some(starling_bgp::MaxPrefixes {
            limit: 10_000,
            action: starling_bgp::MaxPrefixAction::Close,
        });
        assert_eq!(tor.max_prefixes, default);
        assert_eq!(rs.max_prefixes, default);
        let rack = c.iter().find(|p| p.address == ip("198.51.100.1")).unwrap();
        assert_eq!(
            rack.max_prefixes,
            Some(starling_bgp::MaxPrefixes {
                limit: 50,
                action: starling_bgp::MaxPrefixAction::Warn,
            })
        );
        assert_eq!(to_b.max_prefixes, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A peer's BGPFilters become its import and export rules, in the
    /// order it names them; a filter missing from the model means no
    /// session, with a warning naming it.
    #[test]
    fn filters_become_peer_policy() {
        let filter = |name: &str, cidr: &str| {
            format!(
                "---\napiVersion: projectcalico.org/v3\nkind: BGPFilter\nmetadata: {{name: {name}}}\nspec:\n  importV4: [{{action: Reject, matchOperator: Equal, cidr: {cidr}}}]\n  exportV4: [{{action: Reject, matchOperator: In, cidr: {cidr}}}]\n"
            )
        };
        let s = snap(&[
            config(true),
            node("a", "192.0.2.11/24", ""),
            filter("f1", "198.51.100.0/24"),
            filter("f2", "203.0.113.0/24"),
            peer(
                "tor",
                "  peerIP: 192.0.2.254\n  asNumber: 65000\n  filters: [f2, f1]\n",
            ),
            peer(
                "gone",
                "  peerIP: 192.0.2.253\n  asNumber: 65000\n  filters: [f1, nope]\n",
            ),
        ]);
        let p = plan_detailed(&s, "a");
        let tor = p
            .peers
            .iter()
            .find(|pc| pc.address == ip("192.0.2.254"))
            .expect("tor session");
        let prefixes = |r: &Option<Vec<PolicyRule>>| -> Vec<String> {
            r.iter()
                .flatten()
                .map(|r| r.prefix.unwrap().to_string())
                .collect()
        };
        assert_eq!(prefixes(&tor.import), ["203.0.113.0/24", "198.51.100.0/24"]);
        assert_eq!(prefixes(&tor.export), ["203.0.113.0/24", "198.51.100.0/24"]);
        assert!(!p.peers.iter().any(|pc| pc.address == ip("192.0.2.253")));
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("gone") && w.contains("BGPFilter `nope`")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn duplicates_self_and_unknown_nodes() {
        let s = snap(&[
            node("a", "10.0.0.1/24", ""),
            node("b", "10.0.0.2/24", ""),
            peer("dup", "  peerIP: 10.0.0.2\n  asNumber: 65000\n"),
            peer("me", "  peerIP: 10.0.0.1\n  asNumber: 65000\n"),
        ]);
        let d = plan_detailed(&s, "a");
        assert_eq!(summary(&d.peers).len(), 1);
        assert_eq!(
            d.peers[0].description.as_deref(),
            Some("node-to-node mesh: b")
        );
        assert_eq!(d.warnings.len(), 2, "{:?}", d.warnings);
        assert!(d.warnings.iter().any(|w| w.contains("own address")));
        let none = plan_detailed(&s, "ghost");
        assert!(none.peers.is_empty() && none.warnings[0].contains("ghost"));
    }

    #[test]
    fn unresolved_password_skips_only_that_peer() {
        let mut s = snap(&[node("a", "10.0.0.1/24", ""), node("b", "10.0.0.2/24", "")]);
        let mut p = BGPPeer::new(
            "secret",
            serde_yaml::from_str("peerIP: 192.0.2.9\nasNumber: 65000\npassword:\n  secretKeyRef: {name: bgp, key: tor}\n")
                .unwrap(),
        );
        p.metadata.name = Some("secret".into());
        s.peers.insert("secret".into(), p);
        let d = plan_detailed(&s, "a");
        assert_eq!(d.peers.len(), 1);
        assert!(d.warnings[0].contains("password"), "{:?}", d.warnings);
    }

    #[test]
    fn a_mesh_past_the_limit_gets_the_advice_to_use_reflectors() {
        let three = [
            node("a", "10.0.0.1/24", ""),
            node("b", "10.0.0.2/24", ""),
            node("c", "10.0.0.3/24", ""),
        ];
        let s = snap(&three);
        assert_eq!(mesh_advice(&s, 3), None, "3 nodes are not more than 3");
        let w = mesh_advice(&s, 2).expect("3 nodes are more than 2");
        assert!(
            w.contains("spans 3 nodes") && w.contains("meshWarnNodes 2"),
            "{w}"
        );
        assert!(
            w.contains("2 sessions") && w.contains("route reflectors"),
            "{w}"
        );
        assert_eq!(mesh_advice(&s, 0), None, "0 turns it off");
        let mut parts = three.to_vec();
        parts.push(config(false));
        assert_eq!(mesh_advice(&snap(&parts), 2), None, "no mesh, no advice");
    }
}
