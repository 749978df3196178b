//! Import and export policy: an ordered list of rules, first match wins.
//! A rule matches on family, prefix (with a length range, or its negation),
//! community and where the route came from, then accepts (optionally
//! changing attributes) or rejects. When a list exists and nothing matches,
//! the route is rejected.

use crate::attrs::{Family, PathAttrs};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A standard community written `ASN:VALUE` (RFC 1997).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Community(pub u32);

impl fmt::Display for Community {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0 >> 16, self.0 & 0xffff)
    }
}

impl std::str::FromStr for Community {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once(':')
            .ok_or_else(|| format!("community {s:?} is not of the form ASN:VALUE"))?;
        let a: u16 = a
            .parse()
            .map_err(|_| format!("community {s:?}: {a:?} is not a number from 0 to 65535"))?;
        let b: u16 = b
            .parse()
            .map_err(|_| format!("community {s:?}: {b:?} is not a number from 0 to 65535"))?;
        Ok(Community(((a as u32) << 16) | b as u32))
    }
}

impl Serialize for Community {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Community {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A large community written `GLOBAL:LOCAL1:LOCAL2` (RFC 8092), each part
/// a number from 0 to 4294967295.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LargeCommunity(pub u32, pub u32, pub u32);

impl fmt::Display for LargeCommunity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.0, self.1, self.2)
    }
}

impl std::str::FromStr for LargeCommunity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let [a, b, c] = parts[..] else {
            return Err(format!(
                "large community {s:?} is not of the form GLOBAL:LOCAL1:LOCAL2"
            ));
        };
        let num = |x: &str| {
            x.parse::<u32>().map_err(|_| {
                format!("large community {s:?}: {x:?} is not a number from 0 to 4294967295")
            })
        };
        Ok(LargeCommunity(num(a)?, num(b)?, num(c)?))
    }
}

impl Serialize for LargeCommunity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LargeCommunity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Communities added to every route sent to a peer whose prefix is
/// `prefix` or inside it (Calico's `prefixAdvertisements`, BIRD's
/// `net ~ prefix`). Applied before the export rules run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixCommunities {
    pub prefix: IpNet,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<Community>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<LargeCommunity>,
}

impl PrefixCommunities {
    /// Add the communities of every entry whose prefix holds `prefix`.
    pub fn apply(tags: &[PrefixCommunities], prefix: &IpNet, attrs: &mut PathAttrs) {
        for t in tags {
            if is_v4(&t.prefix) != is_v4(prefix) || !t.prefix.contains(prefix) {
                continue;
            }
            for c in &t.communities {
                if !attrs.communities.contains(&c.0) {
                    attrs.communities.push(c.0);
                }
            }
            for c in &t.large_communities {
                let l = (c.0, c.1, c.2);
                if !attrs.large_communities.contains(&l) {
                    attrs.large_communities.push(l);
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Accept,
    Reject,
}

/// Attribute changes made by an accepting rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SetActions {
    #[serde(default)]
    pub local_pref: Option<u32>,
    #[serde(default)]
    pub med: Option<u32>,
    #[serde(default)]
    pub communities_add: Vec<Community>,
    /// On export: advertise ourselves as the next hop (`true`) or keep the
    /// path's next hop (`false`).
    #[serde(default)]
    pub next_hop_self: Option<bool>,
}

/// Where a route came from, for [`PolicyRule::source`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteSource {
    /// Originated by this speaker (the embedder's own prefixes).
    Local,
    /// Learned from a BGP peer.
    Peer,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Match only routes of this family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// Match prefixes inside this one. Without `ge`/`le` only this exact
    /// length matches; `ge`/`le` give a length range (like a prefix list).
    #[serde(default)]
    pub prefix: Option<IpNet>,
    #[serde(default)]
    pub ge: Option<u8>,
    #[serde(default)]
    pub le: Option<u8>,
    /// Turn the prefix condition round: match the routes that `prefix`
    /// (with `ge`/`le`) does not match. Needs a prefix.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_prefix: bool,
    /// Match routes carrying this community.
    #[serde(default)]
    pub community: Option<Community>,
    /// Match by where the route came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RouteSource>,
    #[serde(default)]
    pub action: Verdict,
    #[serde(default)]
    pub set: Option<SetActions>,
}

impl PolicyRule {
    /// Check the rule itself; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(p) = self.prefix {
            if p.trunc() != p {
                return Err(format!(
                    "prefix: {p} has host bits set; did you mean {}?",
                    p.trunc()
                ));
            }
            let max = p.max_prefix_len();
            for (name, v) in [("ge", self.ge), ("le", self.le)] {
                if let Some(v) = v
                    && (v < p.prefix_len() || v > max)
                {
                    return Err(format!(
                        "{name}: {v} is outside {}..={max} for {p}",
                        p.prefix_len()
                    ));
                }
            }
            if let (Some(ge), Some(le)) = (self.ge, self.le)
                && ge > le
            {
                return Err(format!("ge: {ge} is greater than le: {le}"));
            }
            if let Some(f) = self.family
                && f != Family::of(&p)
            {
                return Err(format!("family: {p} is not an {f:?} prefix"));
            }
        } else if self.ge.is_some() || self.le.is_some() {
            return Err("ge/le need a prefix".into());
        } else if self.not_prefix {
            return Err("not_prefix needs a prefix".into());
        }
        Ok(())
    }

    fn prefix_matches(&self, p: &IpNet, prefix: &IpNet) -> bool {
        if !p.contains(prefix) || is_v4(p) != is_v4(prefix) {
            return false;
        }
        let len = prefix.prefix_len();
        let (lo, hi) = match (self.ge, self.le) {
            (None, None) => (p.prefix_len(), p.prefix_len()),
            (ge, le) => (
                ge.unwrap_or(p.prefix_len()),
                le.unwrap_or(p.max_prefix_len()),
            ),
        };
        lo <= len && len <= hi
    }

    fn matches(&self, prefix: &IpNet, attrs: &PathAttrs, source: RouteSource) -> bool {
        self.matches_route(attrs, source) && self.matches_prefix(prefix)
    }

    /// The part of the match that looks at the route's attributes and
    /// source only: the same for every prefix of one UPDATE.
    fn matches_route(&self, attrs: &PathAttrs, source: RouteSource) -> bool {
        if self.source.is_some_and(|s| s != source) {
            return false;
        }
        if let Some(c) = self.community
            && !attrs.communities.contains(&c.0)
        {
            return false;
        }
        true
    }

    /// The part of the match that looks at the prefix (family, prefix range).
    fn matches_prefix(&self, prefix: &IpNet) -> bool {
        if self.family.is_some_and(|f| f != Family::of(prefix)) {
            return false;
        }
        if let Some(p) = &self.prefix
            && self.prefix_matches(p, prefix) == self.not_prefix
        {
            return false;
        }
        true
    }

    /// Whether the rule looks at the prefix at all.
    fn looks_at_prefix(&self) -> bool {
        self.family.is_some() || self.prefix.is_some()
    }

    /// What an accepting rule does to `attrs`; its outcome.
    fn act(&self, attrs: &mut PathAttrs) -> Outcome {
        if self.action == Verdict::Reject {
            return Outcome::Reject;
        }
        let mut nhs = None;
        if let Some(s) = &self.set {
            if let Some(lp) = s.local_pref {
                attrs.local_pref = Some(lp);
            }
            if let Some(m) = s.med {
                attrs.med = Some(m);
            }
            for c in &s.communities_add {
                if !attrs.communities.contains(&c.0) {
                    attrs.communities.push(c.0);
                }
            }
            nhs = s.next_hop_self;
        }
        Outcome::Accept { next_hop_self: nhs }
    }
}

fn is_v4(p: &IpNet) -> bool {
    matches!(p, IpNet::V4(_))
}

/// The outcome of running a policy on one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Reject,
    /// Accepted; `next_hop_self` is the rule's wish, if it said anything.
    Accept {
        next_hop_self: Option<bool>,
    },
}

/// The policy that applies to a peer in one direction, after RFC 8212.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effective<'a> {
    /// No rules configured: everything passes unchanged.
    AcceptAll,
    /// Run these rules.
    Rules(&'a [PolicyRule]),
    /// RFC 8212: an eBGP peer without rules exchanges nothing.
    Blocked,
}

impl<'a> Effective<'a> {
    /// The policy for a peer's `rules` in one direction. `requires` is the
    /// speaker's `ebgp_requires_policy` (RFC 8212 §3, on by default).
    pub fn of(rules: &'a Option<Vec<PolicyRule>>, ebgp: bool, requires: bool) -> Effective<'a> {
        match rules {
            Some(r) => Effective::Rules(r.as_slice()),
            None if ebgp && requires => Effective::Blocked,
            None => Effective::AcceptAll,
        }
    }

    /// The rules to run, for `apply`; `None` for both `AcceptAll` and
    /// `Blocked` (callers stop at `Blocked` first).
    pub fn rules(self) -> Option<&'a [PolicyRule]> {
        match self {
            Effective::Rules(r) => Some(r),
            Effective::AcceptAll | Effective::Blocked => None,
        }
    }
}

/// Run `rules` on a route from `source`, changing `attrs` as the matching
/// rule says. `None` (no policy) accepts unchanged.
pub fn apply(
    rules: Option<&[PolicyRule]>,
    prefix: &IpNet,
    attrs: &mut PathAttrs,
    source: RouteSource,
) -> Outcome {
    let Some(rules) = rules else {
        return Outcome::Accept {
            next_hop_self: None,
        };
    };
    match rules.iter().find(|r| r.matches(prefix, attrs, source)) {
        Some(r) => r.act(attrs),
        None => Outcome::Reject,
    }
}

/// One policy run once for all the prefixes of an UPDATE, which share one
/// attribute set: the attribute and source conditions are checked once,
/// each prefix then only finds the first rule whose prefix conditions it
/// meets, and each rule's changed attribute set is built once and shared
/// (`apply` per prefix would clone and change the set for every prefix).
pub struct PerUpdate<'a, T> {
    rules: &'a [PolicyRule],
    /// Rules whose attribute and source conditions this UPDATE meets.
    candidates: Vec<usize>,
    /// Whether any candidate looks at the prefix; if not, every prefix
    /// gets the same outcome.
    by_prefix: bool,
    /// The outcome of each rule (index into `rules`, `rules.len()` for "no
    /// rule matched"), made by `make` the first time a prefix needs it.
    outcomes: Vec<Option<Option<T>>>,
}

impl<'a, T: Clone> PerUpdate<'a, T> {
    pub fn new(rules: &'a [PolicyRule], attrs: &PathAttrs, source: RouteSource) -> Self {
        let candidates: Vec<usize> = (0..rules.len())
            .filter(|&i| rules[i].matches_route(attrs, source))
            .collect();
        let by_prefix = candidates.iter().any(|&i| rules[i].looks_at_prefix());
        PerUpdate {
            rules,
            candidates,
            by_prefix,
            outcomes: vec![None; rules.len() + 1],
        }
    }

    /// The outcome for `prefix`: `None` rejected, `Some(t)` accepted, `t`
    /// being what `make` built from the accepted, changed attribute set.
    /// `make` runs at most once per rule.
    pub fn outcome(
        &mut self,
        prefix: &IpNet,
        attrs: &PathAttrs,
        make: impl FnOnce(PathAttrs) -> T,
    ) -> Option<T> {
        let rule = if self.by_prefix {
            self.candidates
                .iter()
                .copied()
                .find(|&i| self.rules[i].matches_prefix(prefix))
        } else {
            self.candidates.first().copied()
        };
        let slot = &mut self.outcomes[rule.unwrap_or(self.rules.len())];
        if let Some(o) = slot {
            return o.clone();
        }
        let o = rule.and_then(|i| {
            let mut a = attrs.clone();
            match self.rules[i].act(&mut a) {
                Outcome::Reject => None,
                Outcome::Accept { .. } => Some(make(a)),
            }
        });
        *slot = Some(o.clone());
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(y: &str) -> PolicyRule {
        serde_yaml::from_str(y).unwrap()
    }

    #[test]
    fn once_per_update_gives_what_apply_gives_per_prefix() {
        let rules = vec![
            rule("{prefix: 10.0.7.0/24, action: reject}"),
            rule("{community: \"65000:666\", action: reject}"),
            rule("{prefix: 10.0.0.0/22, le: 24, action: accept, set: {local_pref: 150}}"),
            rule("{family: ipv6, action: reject}"),
            rule("{action: accept, set: {med: 5, communities_add: [\"65000:1\"]}}"),
        ];
        let prefixes: Vec<IpNet> = ["10.0.0.0/24", "10.0.3.0/24", "10.0.7.0/24", "10.0.9.0/24"]
            .iter()
            .chain(&["2001:db8::/64", "10.0.1.0/24", "10.0.8.0/24"])
            .map(|p| p.parse().unwrap())
            .collect();
        for communities in [vec![], vec![(65000 << 16) | 666]] {
            let attrs = PathAttrs {
                communities,
                ..Default::default()
            };
            let mut run = PerUpdate::new(&rules, &attrs, RouteSource::Peer);
            let mut made = 0;
            for p in &prefixes {
                let got = run.outcome(p, &attrs, |a| {
                    made += 1;
                    a
                });
                let mut want = attrs.clone();
                let want = match apply(Some(&rules), p, &mut want, RouteSource::Peer) {
                    Outcome::Reject => None,
                    Outcome::Accept { .. } => Some(want),
                };
                assert_eq!(got, want, "{p}");
            }
            // Two accepting rules at most: each changed set built once.
            assert!(made <= 2, "built {made} sets");
        }
    }

    #[test]
    fn prefix_ranges_match_like_a_prefix_list() {
        let rules = vec![
            rule("{prefix: 10.0.0.0/8, ge: 24, le: 26, action: accept, set: {local_pref: 200}}"),
            rule("{prefix: 10.0.0.0/8, action: accept}"),
        ];
        let mut a = PathAttrs::default();
        assert_eq!(
            apply(
                Some(&rules),
                &"10.1.2.0/24".parse().unwrap(),
                &mut a,
                RouteSource::Local
            ),
            Outcome::Accept {
                next_hop_self: None
            }
        );
        assert_eq!(a.local_pref, Some(200));
        let mut a = PathAttrs::default();
        assert_eq!(
            apply(
                Some(&rules),
                &"10.0.0.0/8".parse().unwrap(),
                &mut a,
                RouteSource::Local
            ),
            Outcome::Accept {
                next_hop_self: None
            }
        );
        assert_eq!(a.local_pref, None);
        // /28 is outside 24..=26 and not exactly /8: no rule matches -> reject.
        assert_eq!(
            apply(
                Some(&rules),
                &"10.1.2.0/28".parse().unwrap(),
                &mut PathAttrs::default(),
                RouteSource::Local
            ),
            Outcome::Reject
        );
        assert_eq!(
            apply(
                Some(&rules),
                &"192.0.2.0/24".parse().unwrap(),
                &mut PathAttrs::default(),
                RouteSource::Local
            ),
            Outcome::Reject
        );
        assert_eq!(
            apply(
                None,
                &"192.0.2.0/24".parse().unwrap(),
                &mut PathAttrs::default(),
                RouteSource::Local
            ),
            Outcome::Accept {
                next_hop_self: None
            }
        );
    }

    #[test]
    fn community_match_and_set() {
        let rules = vec![
            rule("{community: \"65000:666\", action: reject}"),
            rule(
                "{action: accept, set: {communities_add: [\"65000:1\"], med: 5, next_hop_self: true}}",
            ),
        ];
        let mut a = PathAttrs {
            communities: vec![(65000 << 16) | 666],
            ..Default::default()
        };
        assert_eq!(
            apply(
                Some(&rules),
                &"10.0.0.0/24".parse().unwrap(),
                &mut a,
                RouteSource::Local
            ),
            Outcome::Reject
        );
        let mut a = PathAttrs::default();
        assert_eq!(
            apply(
                Some(&rules),
                &"10.0.0.0/24".parse().unwrap(),
                &mut a,
                RouteSource::Local
            ),
            Outcome::Accept {
                next_hop_self: Some(true)
            }
        );
        assert_eq!(a.communities, vec![(65000 << 16) | 1]);
        assert_eq!(a.med, Some(5));
    }

    #[test]
    fn family_negation_and_source() {
        let rules = vec![
            // Peer-learned IPv4 routes outside 10.0.0.0/8 (any length): reject.
            rule(
                "{family: ipv4, prefix: 10.0.0.0/8, le: 32, not_prefix: true, source: peer, action: reject}",
            ),
            rule("{family: ipv6, action: reject}"),
            rule("{action: accept}"),
        ];
        let run = |p: &str, source| {
            apply(
                Some(&rules),
                &p.parse().unwrap(),
                &mut PathAttrs::default(),
                source,
            )
        };
        let accept = Outcome::Accept {
            next_hop_self: None,
        };
        assert_eq!(run("192.0.2.0/24", RouteSource::Peer), Outcome::Reject);
        assert_eq!(run("192.0.2.0/24", RouteSource::Local), accept);
        assert_eq!(run("10.1.0.0/16", RouteSource::Peer), accept);
        // The negated IPv4 rule does not catch IPv6 routes; the family rule does.
        assert_eq!(run("2001:db8::/32", RouteSource::Local), Outcome::Reject);
        assert!(
            rule("{not_prefix: true}")
                .validate()
                .unwrap_err()
                .starts_with("not_prefix")
        );
        assert!(
            rule("{family: ipv6, prefix: 10.0.0.0/8}")
                .validate()
                .unwrap_err()
                .starts_with("family:")
        );
    }

    #[test]
    fn bad_rules_name_the_field() {
        assert!(
            rule("{prefix: 10.0.0.0/8, ge: 4}")
                .validate()
                .unwrap_err()
                .starts_with("ge:")
        );
        assert!(
            rule("{prefix: 10.0.0.1/8}")
                .validate()
                .unwrap_err()
                .starts_with("prefix:")
        );
        assert!("65536:1".parse::<Community>().is_err());
        assert_eq!(
            "65000:100".parse::<Community>().unwrap().to_string(),
            "65000:100"
        );
    }

    #[test]
    fn prefix_communities_tag_the_prefix_and_what_is_inside() {
        let tags: Vec<PrefixCommunities> = serde_yaml::from_str(
            "[{prefix: 10.0.0.0/16, communities: [\"65000:1\"], large_communities: [\"4200000000:2:3\"]},
              {prefix: 10.0.1.0/24, communities: [\"65000:1\", \"65000:2\"]}]",
        )
        .unwrap();
        let run = |p: &str| {
            let mut a = PathAttrs::default();
            PrefixCommunities::apply(&tags, &p.parse().unwrap(), &mut a);
            (a.communities, a.large_communities)
        };
        let c = |v: u32| (65000 << 16) | v;
        // Equal to the first, inside both, outside both, a wider prefix.
        assert_eq!(
            run("10.0.0.0/16"),
            (vec![c(1)], vec![(4_200_000_000, 2, 3)])
        );
        assert_eq!(
            run("10.0.1.64/26"),
            (vec![c(1), c(2)], vec![(4_200_000_000, 2, 3)])
        );
        assert_eq!(run("10.1.0.0/24"), (vec![], vec![]));
        assert_eq!(run("10.0.0.0/8"), (vec![], vec![]));
        assert_eq!(run("::/0"), (vec![], vec![]));
        assert!("1:2".parse::<LargeCommunity>().is_err());
        assert!(
            "1:2:4294967296"
                .parse::<LargeCommunity>()
                .unwrap_err()
                .contains("4294967296")
        );
        assert_eq!(
            "4200000000:2:3"
                .parse::<LargeCommunity>()
                .unwrap()
                .to_string(),
            "4200000000:2:3"
        );
    }

    #[test]
    fn ebgp_without_rules_is_blocked_unless_allowed() {
        let none = None;
        let some = Some(vec![rule("{action: accept}")]);
        assert_eq!(Effective::of(&none, true, true), Effective::Blocked);
        assert_eq!(Effective::of(&none, true, false), Effective::AcceptAll);
        assert_eq!(Effective::of(&none, false, true), Effective::AcceptAll);
        assert!(matches!(Effective::of(&some, true, true), Effective::Rules(r) if r.len() == 1));
    }
}
