//! What the embedder tells the speaker: its own settings (`SpeakerConfig`,
//! with the `NextHopResolver` it plugs in) and one `PeerConfig` per
//! neighbour. A leaf of the crate: it imports only the attribute model and
//! the policy rules, so the RIB, the sessions, the export rules and the
//! instance all take their settings from here and never from each other.
//!
//! A `PeerConfig` is what an operator writes (the `peers:` entries of
//! `starling-bgpd`'s YAML) and what the agent builds. Inside the speaker it
//! splits in two: the `SessionConfig` a session task owns (change it and the
//! session restarts) and the `PeerPolicy` the instance applies to the peer's
//! routes (change it and the session stays).

use crate::attrs::Family;
use crate::policy::{PolicyRule, PrefixCommunities};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Tells the speaker whether a next hop is reachable, and at what IGP cost
/// (RFC 4271 §9.1.2 and §9.1.2.2 e). The embedder (the agent) implements it
/// from the kernel's view; `starling-bgpd` uses none (everything reachable).
pub trait NextHopResolver: Send + Sync {
    /// `None`: unreachable, the path is not eligible. `Some(cost)`: reachable.
    fn resolve(&self, next_hop: IpAddr) -> Option<u32>;
}

impl std::fmt::Debug for dyn NextHopResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NextHopResolver")
    }
}

/// Speaker-wide configuration.
#[derive(Clone, Debug)]
pub struct SpeakerConfig {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Addresses to accept connections on; empty: none (active sessions only).
    pub listen: Vec<SocketAddr>,
    pub hold_time: u16,
    /// The smallest non-zero hold time accepted from a peer; an OPEN with
    /// less is refused with 2/6 Unacceptable Hold Time (RFC 4271 §6.2 lets
    /// an implementation refuse any value it finds too small). At least 3.
    pub min_hold_time: u16,
    pub connect_retry: u16,
    /// Restart time advertised in the graceful restart capability; `None`: not advertised.
    pub graceful_restart: Option<u16>,
    /// Whether forwarding state was kept across our restart (the F bit).
    pub forwarding_preserved: bool,
    pub extended_message: bool,
    /// Route reflector cluster ID (RFC 4456); peers marked
    /// `route_reflector_client` are reflected to. Default: our router ID.
    pub cluster_id: Option<Ipv4Addr>,
    /// Largest multipath (ECMP) set per prefix.
    pub max_paths: usize,
    /// RFC 8212: eBGP peers without a policy exchange nothing.
    pub ebgp_requires_policy: bool,
    /// How long changes are gathered before the Loc-RIB and Adj-RIBs-Out
    /// are updated, so that bursts go out packed.
    pub batch_interval: Duration,
    /// Reachability and cost of next hops, from the embedder.
    pub resolver: Option<Arc<dyn NextHopResolver>>,
}

impl SpeakerConfig {
    pub fn new(asn: u32, router_id: Ipv4Addr) -> SpeakerConfig {
        SpeakerConfig {
            asn,
            router_id,
            listen: vec![
                "0.0.0.0:179".parse().expect("literal"),
                "[::]:179".parse().expect("literal"),
            ],
            hold_time: 90,
            min_hold_time: 3,
            connect_retry: 5,
            graceful_restart: Some(120),
            forwarding_preserved: false,
            extended_message: true,
            cluster_id: None,
            max_paths: 1,
            ebgp_requires_policy: true,
            batch_interval: Duration::from_millis(5),
            resolver: None,
        }
    }
}

/// What to do when a peer sends more prefixes than allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaxPrefixAction {
    /// Log a warning and keep the session.
    Warn,
    /// Close the session with Cease / Maximum Number of Prefixes Reached (RFC 4486).
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxPrefixes {
    pub limit: usize,
    pub action: MaxPrefixAction,
}

fn default_port() -> u16 {
    179
}

/// One configured neighbour, as the operator writes it. Every field is
/// either a session setting or a policy setting; `split` says which.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub address: IpAddr,
    pub asn: u32,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Only accept connections; never initiate one.
    #[serde(default)]
    pub passive: bool,
    /// TCP-MD5 signature password (RFC 2385).
    #[serde(default)]
    pub md5_password: Option<String>,
    #[serde(default)]
    pub source_address: Option<IpAddr>,
    /// GTSM (RFC 5082); `multihop` then gives the allowed hop count.
    #[serde(default)]
    pub ttl_security: bool,
    /// eBGP multihop TTL (default 1: directly connected).
    #[serde(default)]
    pub multihop: Option<u8>,
    /// Families to negotiate; default: the family of `address`.
    #[serde(default)]
    pub families: Vec<Family>,
    #[serde(default)]
    pub hold_time: Option<u16>,
    #[serde(default)]
    pub connect_retry: Option<u16>,
    /// Free text shown in the session table.
    #[serde(default)]
    pub description: Option<String>,
    /// This iBGP peer is a route-reflector client of ours (RFC 4456).
    #[serde(default)]
    pub route_reflector_client: bool,
    /// Advertise ourselves as the next hop of routes we pass to this iBGP peer.
    #[serde(default)]
    pub next_hop_self: bool,
    #[serde(default)]
    pub max_prefixes: Option<MaxPrefixes>,
    /// Import policy; without one, iBGP accepts everything and eBGP accepts
    /// nothing unless `ebgp_requires_policy` is off (RFC 8212).
    #[serde(default)]
    pub import: Option<Vec<PolicyRule>>,
    /// Export policy; same defaults as `import`.
    #[serde(default)]
    pub export: Option<Vec<PolicyRule>>,
    /// Cap on the restart time this peer advertises (graceful restart, receiving side).
    #[serde(default)]
    pub max_restart_time: Option<u16>,
    /// The restart time we advertise to this peer in our graceful restart
    /// capability; default: the speaker's `graceful_restart`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_time: Option<u16>,
    /// Communities added to the routes sent to this peer, by prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_communities: Vec<PrefixCommunities>,
    /// Toward an eBGP peer, keep the next hop of routes learned from other
    /// peers instead of putting ourselves in (BIRD's `next hop keep`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub next_hop_keep: bool,
    /// Accept routes from this eBGP peer whose AS_PATH holds our AS up to
    /// this many times (allowas-in, BIRD's `allow local as`); 0: never.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub allow_local_as: u8,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// The settings a session task owns: the transport, the OPEN we send and
/// the timers (RFC 4271 §4.2, §8). Any change needs a new session.
/// The fields are `PeerConfig`'s of the same name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    pub address: IpAddr,
    pub asn: u32,
    pub port: u16,
    pub passive: bool,
    pub md5_password: Option<String>,
    pub source_address: Option<IpAddr>,
    pub ttl_security: bool,
    pub multihop: Option<u8>,
    pub families: Vec<Family>,
    pub hold_time: Option<u16>,
    pub connect_retry: Option<u16>,
    pub restart_time: Option<u16>,
}

/// The settings the instance applies to a peer's routes: policy,
/// reflection, limits and how it is shown. They change without a session
/// reset. The fields are `PeerConfig`'s of the same name.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PeerPolicy {
    pub description: Option<String>,
    pub route_reflector_client: bool,
    pub next_hop_self: bool,
    pub max_prefixes: Option<MaxPrefixes>,
    pub import: Option<Vec<PolicyRule>>,
    pub export: Option<Vec<PolicyRule>>,
    pub max_restart_time: Option<u16>,
    pub prefix_communities: Vec<PrefixCommunities>,
    pub next_hop_keep: bool,
    pub allow_local_as: u8,
}

impl PeerConfig {
    pub fn new(address: IpAddr, asn: u32) -> PeerConfig {
        PeerConfig::join(SessionConfig::new(address, asn), PeerPolicy::default())
    }

    /// The session's part and the policy part. Destructured field by field,
    /// so a field added to `PeerConfig` must be given to one of them.
    pub fn split(self) -> (SessionConfig, PeerPolicy) {
        let PeerConfig {
            address,
            asn,
            port,
            passive,
            md5_password,
            source_address,
            ttl_security,
            multihop,
            families,
            hold_time,
            connect_retry,
            restart_time,
            description,
            route_reflector_client,
            next_hop_self,
            max_prefixes,
            import,
            export,
            max_restart_time,
            prefix_communities,
            next_hop_keep,
            allow_local_as,
        } = self;
        (
            SessionConfig {
                address,
                asn,
                port,
                passive,
                md5_password,
                source_address,
                ttl_security,
                multihop,
                families,
                hold_time,
                connect_retry,
                restart_time,
            },
            PeerPolicy {
                description,
                route_reflector_client,
                next_hop_self,
                max_prefixes,
                import,
                export,
                max_restart_time,
                prefix_communities,
                next_hop_keep,
                allow_local_as,
            },
        )
    }

    /// The two parts back in one (the inverse of `split`).
    pub fn join(session: SessionConfig, policy: PeerPolicy) -> PeerConfig {
        let SessionConfig {
            address,
            asn,
            port,
            passive,
            md5_password,
            source_address,
            ttl_security,
            multihop,
            families,
            hold_time,
            connect_retry,
            restart_time,
        } = session;
        let PeerPolicy {
            description,
            route_reflector_client,
            next_hop_self,
            max_prefixes,
            import,
            export,
            max_restart_time,
            prefix_communities,
            next_hop_keep,
            allow_local_as,
        } = policy;
        PeerConfig {
            address,
            asn,
            port,
            passive,
            md5_password,
            source_address,
            ttl_security,
            multihop,
            families,
            hold_time,
            connect_retry,
            restart_time,
            description,
            route_reflector_client,
            next_hop_self,
            max_prefixes,
            import,
            export,
            max_restart_time,
            prefix_communities,
            next_hop_keep,
            allow_local_as,
        }
    }

    /// The checks the speaker makes before it takes a peer; the message
    /// names the peer and the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.address.is_unspecified() || self.address.is_multicast() {
            return Err(format!(
                "peer address {} is not a unicast address",
                self.address
            ));
        }
        if self.md5_password.as_ref().is_some_and(|p| p.len() > 80) {
            return Err(format!(
                "peer {}: md5_password is longer than 80 bytes",
                self.address
            ));
        }
        for (i, t) in self.prefix_communities.iter().enumerate() {
            if t.prefix.trunc() != t.prefix {
                return Err(format!(
                    "peer {}: prefix_communities[{i}].prefix: {} has host bits set; did you mean {}?",
                    self.address,
                    t.prefix,
                    t.prefix.trunc()
                ));
            }
        }
        for (dir, rules) in [("import", &self.import), ("export", &self.export)] {
            for (i, r) in rules.iter().flatten().enumerate() {
                r.validate()
                    .map_err(|e| format!("peer {}: {dir}[{i}].{e}", self.address))?;
            }
        }
        Ok(())
    }
}

impl SessionConfig {
    pub fn new(address: IpAddr, asn: u32) -> SessionConfig {
        SessionConfig {
            address,
            asn,
            port: default_port(),
            passive: false,
            md5_password: None,
            source_address: None,
            ttl_security: false,
            multihop: None,
            families: vec![],
            hold_time: None,
            connect_retry: None,
            restart_time: None,
        }
    }

    /// The families to negotiate: the configured ones, or the family of the
    /// peer's address.
    pub fn families(&self) -> Vec<Family> {
        if self.families.is_empty() {
            vec![Family::of_addr(&self.address)]
        } else {
            self.families.clone()
        }
    }

    /// An external peer: its AS is not ours.
    pub fn ebgp(&self, local_asn: u32) -> bool {
        self.asn != local_asn
    }
}

/// The peer-table key of an address: IPv4-mapped IPv6 addresses from a
/// dual-stack socket are IPv4 peers.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `peers:` entry of `starling-bgpd`'s YAML with every field set.
    const PEER: &str = r#"
address: 2001:db8::2
asn: 65001
port: 1179
passive: true
md5_password: hunter2
source_address: 2001:db8::1
ttl_security: true
multihop: 2
families: [ipv4, ipv6]
hold_time: 9
connect_retry: 3
description: "tor: rack-1"
route_reflector_client: true
next_hop_self: true
max_prefixes: {limit: 1000, action: close}
import:
  - {prefix: 10.0.0.0/8, ge: 24, le: 26, action: accept, set: {local_pref: 200}}
export:
  - {community: "65000:666", action: reject}
  - {action: accept, set: {med: 5, communities_add: ["65000:1"], next_hop_self: false}}
max_restart_time: 30
restart_time: 60
prefix_communities:
  - {prefix: 10.0.0.0/16, communities: ["65000:100"], large_communities: ["65000:1:2"]}
next_hop_keep: true
allow_local_as: 2
"#;

    #[test]
    fn yaml_round_trips_through_the_split() {
        let cfg: PeerConfig = serde_yaml::from_str(PEER).unwrap();
        let (session, policy) = cfg.clone().split();
        assert_eq!(session.port, 1179);
        assert!(session.passive && policy.route_reflector_client);
        let joined = PeerConfig::join(session, policy);
        assert_eq!(joined, cfg);
        // Written out and read back, nothing is lost or renamed.
        let text = serde_yaml::to_string(&joined).unwrap();
        let again: PeerConfig = serde_yaml::from_str(&text).unwrap();
        assert_eq!(again, cfg);
        let as_yaml: serde_yaml::Value = serde_yaml::from_str(PEER).unwrap();
        let written: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        for (key, value) in as_yaml.as_mapping().unwrap() {
            let ours = &written[key.as_str().unwrap()];
            if key == "import" || key == "export" {
                // Rules are written with their defaults spelled out.
                let back: Vec<PolicyRule> = serde_yaml::from_value(ours.clone()).unwrap();
                let orig: Vec<PolicyRule> = serde_yaml::from_value(value.clone()).unwrap();
                assert_eq!(back, orig);
            } else {
                assert_eq!(ours, value, "{key:?}");
            }
        }
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let cfg: PeerConfig = serde_yaml::from_str("address: 192.0.2.2\nasn: 65001\n").unwrap();
        assert_eq!(cfg, PeerConfig::new("192.0.2.2".parse().unwrap(), 65001));
        let (session, _) = cfg.split();
        assert_eq!(session.families(), vec![Family::Ipv4]);
        let e = serde_yaml::from_str::<PeerConfig>("address: 192.0.2.2\nasn: 1\npasive: true\n")
            .unwrap_err();
        assert!(e.to_string().contains("pasive"), "{e}");
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4_peers() {
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
