//! The checks of the CRDs' CEL rules, in Rust, for the file datastore (and
//! for objects the Kubernetes datastore reads, in case a CRD was installed
//! without its rules). Each finding names the field as a path from the
//! document's root, so the loader can point at its line.

use super::crd::*;
use super::selector::NodeSelector;
use std::fmt;

/// One thing wrong with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Dotted path from the document root, e.g. `spec.blockSize`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn finding(field: &str, message: impl Into<String>) -> Finding {
    Finding {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Kubernetes object names: a DNS-1123 subdomain.
pub fn name(name: &str) -> Vec<Finding> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        vec![]
    } else {
        vec![finding(
            "metadata.name",
            format!(
                "`{name}` is not a valid name: use lower-case letters, digits, '-' and '.', \
                 starting and ending with a letter or digit"
            ),
        )]
    }
}

fn selector(field: &str, text: &str, out: &mut Vec<Finding>) {
    if let Err(e) = NodeSelector::parse(text) {
        out.push(finding(field, e));
    }
}

fn password(field: &str, p: &Password, out: &mut Vec<Finding>) {
    if p.secret_key_ref.is_some() == p.file.is_some() {
        out.push(finding(field, "set exactly one of secretKeyRef and file"));
    }
    if let Some(f) = &p.file
        && !f.is_absolute()
    {
        out.push(finding(
            &format!("{field}.file"),
            format!("password file {} must be an absolute path", f.display()),
        ));
    }
}

pub fn ip_pool(spec: &IPPoolSpec) -> Vec<Finding> {
    let mut out = Vec::new();
    let cidr = spec.cidr;
    if cidr != cidr.trunc() {
        out.push(finding(
            "spec.cidr",
            format!(
                "{cidr} has host bits set: write the network address, e.g. {}",
                cidr.trunc()
            ),
        ));
    }
    if let Some(bs) = spec.block_size {
        let (lo, hi) = if cidr.addr().is_ipv4() {
            (20, 32)
        } else {
            (116, 128)
        };
        if bs < lo || bs > hi {
            out.push(finding(
                "spec.blockSize",
                format!(
                    "blockSize {bs} must be 20-32 for an IPv4 pool and 116-128 for an IPv6 pool"
                ),
            ));
        } else if bs < cidr.prefix_len() {
            out.push(finding(
                "spec.blockSize",
                format!(
                    "blockSize {bs} is shorter than the pool's own prefix length {}",
                    cidr.prefix_len()
                ),
            ));
        }
    }
    if cidr.addr().is_ipv6() && spec.ipip_mode != IpipMode::Never {
        out.push(finding(
            "spec.ipipMode",
            "ipipMode applies to IPv4 pools only: use Never for an IPv6 pool",
        ));
    }
    // Calico refuses the same: one encapsulation per pool.
    if spec.ipip_mode != IpipMode::Never && spec.vxlan_mode != VxlanMode::Never {
        out.push(finding(
            "spec.vxlanMode",
            "ipipMode and vxlanMode cannot both be enabled: set one of them to Never",
        ));
    }
    selector("spec.nodeSelector", &spec.node_selector, &mut out);
    out
}

/// One community of `prefixAdvertisements`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommunityValue {
    Standard(starling_bgp::policy::Community),
    Large(starling_bgp::policy::LargeCommunity),
}

/// What a community of `prefixAdvertisements` stands for: a name from
/// `spec.communities`, or else a value `aa:nn` / `aa:nn:mm`; `None`: neither.
pub fn community_value(bgp: &BGPConfigurationSpec, name: &str) -> Option<CommunityValue> {
    let v = bgp
        .communities
        .iter()
        .find(|c| c.name == name)
        .map_or(name, |c| c.value.as_str());
    match v.parse::<starling_bgp::policy::Community>() {
        Ok(c) => Some(CommunityValue::Standard(c)),
        Err(_) => v
            .parse::<starling_bgp::policy::LargeCommunity>()
            .ok()
            .map(CommunityValue::Large),
    }
}

pub fn bgp_configuration(name: &str, spec: &BGPConfigurationSpec) -> Vec<Finding> {
    let mut out = Vec::new();
    if name != "default" {
        out.push(finding(
            "metadata.name",
            format!("BGPConfiguration is a singleton: name it `default`, not `{name}`"),
        ));
    }
    if spec.as_number == 0 {
        out.push(finding("spec.asNumber", "asNumber must be at least 1"));
    }
    if spec.listen_port == 0 {
        out.push(finding("spec.listenPort", "listenPort must be at least 1"));
    }
    for (i, c) in spec.communities.iter().enumerate() {
        let parts: Vec<&str> = c.value.split(':').collect();
        let numeric = parts.iter().all(|p| p.parse::<u32>().is_ok());
        let ok = match parts.len() {
            2 => numeric && parts.iter().all(|p| p.parse::<u16>().is_ok()),
            3 => numeric,
            _ => false,
        };
        if !ok {
            out.push(finding(
                &format!("spec.communities[{i}].value"),
                format!(
                    "`{}` is not a community: write aa:nn (16-bit numbers) or aa:nn:mm (32-bit numbers)",
                    c.value
                ),
            ));
        }
        if c.name.is_empty() {
            out.push(finding(
                &format!("spec.communities[{i}].name"),
                "a community needs a name",
            ));
        }
    }
    for (i, a) in spec.prefix_advertisements.iter().enumerate() {
        if a.cidr != a.cidr.trunc() {
            out.push(finding(
                &format!("spec.prefixAdvertisements[{i}].cidr"),
                format!("{} has host bits set: write {}", a.cidr, a.cidr.trunc()),
            ));
        }
        for (j, c) in a.communities.iter().enumerate() {
            if community_value(spec, c).is_none() {
                out.push(finding(
                    &format!("spec.prefixAdvertisements[{i}].communities[{j}]"),
                    format!(
                        "`{c}` is neither a name in spec.communities nor a community (aa:nn with 16-bit numbers, aa:nn:mm with 32-bit numbers)"
                    ),
                ));
            }
        }
    }
    if let Some(p) = &spec.node_mesh_password {
        password("spec.nodeMeshPassword", p, &mut out);
    }
    out
}

pub fn bgp_peer(spec: &BGPPeerSpec) -> Vec<Finding> {
    let mut out = Vec::new();
    if spec.peer_ip.is_some() == spec.peer_selector.is_some() {
        out.push(finding(
            "spec.peerIP",
            "set exactly one of peerIP (a router outside the cluster) and peerSelector (the nodes to peer with)",
        ));
    }
    if spec.node.is_some() && spec.node_selector.is_some() {
        out.push(finding(
            "spec.nodeSelector",
            "set at most one of node and nodeSelector (neither: every node has this peer)",
        ));
    }
    if spec.peer_ip.is_some() && spec.as_number.is_none() {
        out.push(finding("spec.asNumber", "asNumber is required with peerIP"));
    }
    if spec.peer_selector.is_some() && spec.as_number.is_some() {
        out.push(finding(
            "spec.asNumber",
            "with peerSelector the AS comes from each selected node: remove asNumber",
        ));
    }
    if spec.as_number == Some(0) {
        out.push(finding("spec.asNumber", "asNumber must be at least 1"));
    }
    if spec.max_prefixes.is_some_and(|m| m.limit == 0) {
        out.push(finding(
            "spec.maxPrefixes.limit",
            "maxPrefixes.limit must be at least 1",
        ));
    }
    if spec.keep_original_next_hop == Some(true) && spec.next_hop_mode.is_some() {
        out.push(finding(
            "spec.keepOriginalNextHop",
            "keepOriginalNextHop is the old spelling of nextHopMode: Keep; set only one",
        ));
    }
    if let Some(node) = &spec.node
        && node.is_empty()
    {
        out.push(finding("spec.node", "node must name a node"));
    }
    if let Some(s) = &spec.node_selector {
        selector("spec.nodeSelector", s, &mut out);
    }
    if let Some(s) = &spec.peer_selector {
        selector("spec.peerSelector", s, &mut out);
    }
    if let Some(p) = &spec.password {
        password("spec.password", p, &mut out);
    }
    out
}

/// Fields Starling's BGPConfiguration accepts and does not act on (yet):
/// warnings, not problems.
pub fn unsupported_bgp_configuration(spec: &BGPConfigurationSpec) -> Vec<Finding> {
    let mut out = Vec::new();
    if spec.log_severity_screen.is_some() {
        out.push(finding(
            "spec.logSeverityScreen",
            "ignored: the agent's log level is its own setting (RUST_LOG)",
        ));
    }
    out
}

/// Values of a BGPPeer Starling accepts and does not act on: warnings.
/// None at present (Calico's fields Starling does not act on are taken out
/// with a warning when Calico YAML is loaded, see `calico::CALICO_FIELDS`).
pub fn unsupported_bgp_peer(_spec: &BGPPeerSpec) -> Vec<Finding> {
    Vec::new()
}

pub fn starling_node(spec: &StarlingNodeSpec) -> Vec<Finding> {
    let mut out = Vec::new();
    if spec.ipv4_address.is_none() && spec.ipv6_address.is_none() {
        out.push(finding(
            "spec.ipv4Address",
            "a node needs ipv4Address or ipv6Address (or both)",
        ));
    }
    if spec.as_number == Some(0) {
        out.push(finding("spec.asNumber", "asNumber must be at least 1"));
    }
    if spec.pod_cidrs.len() > 2 {
        out.push(finding(
            "spec.podCIDRs",
            "at most two podCIDRs (one per family)",
        ));
    }
    for (i, c) in spec.pod_cidrs.iter().enumerate() {
        if *c != c.trunc() {
            out.push(finding(
                &format!("spec.podCIDRs[{i}]"),
                format!("{c} has host bits set: write {}", c.trunc()),
            ));
        }
    }
    out
}

pub fn block_affinity(spec: &BlockAffinitySpec) -> Vec<Finding> {
    let mut out = Vec::new();
    if spec.cidr != spec.cidr.trunc() {
        out.push(finding(
            "spec.cidr",
            format!(
                "{} has host bits set: write the block's network address {}",
                spec.cidr,
                spec.cidr.trunc()
            ),
        ));
    }
    if spec.node.is_empty() {
        out.push(finding("spec.node", "node must name a node"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, bs: Option<u8>) -> IPPoolSpec {
        IPPoolSpec {
            cidr: cidr.parse().unwrap(),
            block_size: bs,
            ipip_mode: IpipMode::Never,
            vxlan_mode: VxlanMode::Never,
            nat_outgoing: false,
            disabled: false,
            node_selector: String::new(),
        }
    }

    #[test]
    fn pool_checks() {
        assert!(ip_pool(&pool("10.244.0.0/16", None)).is_empty());
        assert!(ip_pool(&pool("10.244.0.0/16", Some(26))).is_empty());
        assert_eq!(ip_pool(&pool("10.244.1.0/16", None))[0].field, "spec.cidr");
        assert_eq!(
            ip_pool(&pool("10.244.0.0/16", Some(19)))[0].field,
            "spec.blockSize"
        );
        assert_eq!(
            ip_pool(&pool("10.244.0.0/24", Some(22)))[0].field,
            "spec.blockSize"
        );
        assert!(ip_pool(&pool("fd00::/48", Some(122))).is_empty());
        assert_eq!(
            ip_pool(&pool("fd00::/48", Some(64)))[0].field,
            "spec.blockSize"
        );
        let mut v6 = pool("fd00::/48", None);
        v6.ipip_mode = IpipMode::Always;
        assert_eq!(ip_pool(&v6)[0].field, "spec.ipipMode");
        // VXLAN is for IPv6 pools too (over the IPv6 underlay).
        let mut v6x = pool("fd00::/48", None);
        v6x.vxlan_mode = VxlanMode::Always;
        assert!(ip_pool(&v6x).is_empty());
        let mut both = pool("10.0.0.0/16", None);
        both.ipip_mode = IpipMode::CrossSubnet;
        both.vxlan_mode = VxlanMode::Always;
        let f = ip_pool(&both);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].message.contains("cannot both be enabled"), "{f:?}");
        let mut vx = pool("10.0.0.0/16", None);
        vx.vxlan_mode = VxlanMode::CrossSubnet;
        assert!(ip_pool(&vx).is_empty());
        let mut sel = pool("10.0.0.0/16", None);
        sel.node_selector = "zone = a".into();
        assert_eq!(ip_pool(&sel)[0].field, "spec.nodeSelector");
    }

    #[test]
    fn peer_checks() {
        let base = BGPPeerSpec {
            node: None,
            node_selector: None,
            peer_ip: Some("192.0.2.1".parse().unwrap()),
            peer_selector: None,
            as_number: Some(65000),
            password: None,
            source_address: SourceAddress::UseNodeIP,
            max_restart_time: None,
            keepalive_time: None,
            ttl_security: None,
            keep_original_next_hop: None,
            next_hop_mode: None,
            num_allowed_local_as_numbers: None,
            max_prefixes: None,
            filters: vec![],
        };
        assert!(bgp_peer(&base).is_empty());
        let zero = BGPPeerSpec {
            max_prefixes: Some(crate::model::crd::MaxPrefixes {
                limit: 0,
                action: crate::model::crd::MaxPrefixAction::Warn,
            }),
            ..base.clone()
        };
        assert_eq!(bgp_peer(&zero)[0].field, "spec.maxPrefixes.limit");
        let both = BGPPeerSpec {
            node: Some("a".into()),
            node_selector: Some("all()".into()),
            ..base.clone()
        };
        assert_eq!(bgp_peer(&both)[0].field, "spec.nodeSelector");
        let no_as = BGPPeerSpec {
            as_number: None,
            ..base.clone()
        };
        assert_eq!(bgp_peer(&no_as)[0].field, "spec.asNumber");
        let neither = BGPPeerSpec {
            peer_ip: None,
            ..base.clone()
        };
        assert_eq!(bgp_peer(&neither)[0].field, "spec.peerIP");
        let pw = BGPPeerSpec {
            password: Some(Password {
                secret_key_ref: None,
                file: Some("relative".into()),
            }),
            ..base.clone()
        };
        assert_eq!(bgp_peer(&pw)[0].field, "spec.password.file");
    }

    #[test]
    fn singleton_and_names() {
        let spec = BGPConfigurationSpec::default();
        assert!(bgp_configuration("default", &spec).is_empty());
        assert_eq!(bgp_configuration("main", &spec)[0].field, "metadata.name");
        assert!(name("node-a.example").is_empty());
        assert!(!name("Node_A").is_empty());
        let bad = BGPConfigurationSpec {
            communities: vec![Community {
                name: "c".into(),
                value: "70000:1".into(),
            }],
            ..spec
        };
        assert_eq!(
            bgp_configuration("default", &bad)[0].field,
            "spec.communities[0].value"
        );
    }

    #[test]
    fn durations_and_addresses() {
        let d = |s: &str| s.parse::<GoDuration>().map(|d| d.0.as_millis());
        assert_eq!(d("120s"), Ok(120_000));
        assert_eq!(d("1m30s"), Ok(90_000));
        assert_eq!(d("500ms"), Ok(500));
        assert_eq!(d("0"), Ok(0));
        assert!(d("").is_err());
        assert!(d("10").is_err());
        assert!(d("5x").is_err());
        let p = |s: &str| s.parse::<PeerAddress>();
        assert_eq!(p("192.0.2.1").unwrap().port, None);
        assert_eq!(p("192.0.2.1:1179").unwrap().port, Some(1179));
        assert_eq!(p("[2001:db8::1]:1179").unwrap().port, Some(1179));
        assert!(p("2001:db8::1").unwrap().ip.is_ipv6());
        assert!(p("router").is_err());
    }
}
