//! Our nftables table as JSON objects: what we write ([`batch`]) and what
//! we read back ([`Observed`]), compared in a form that ignores handles
//! and element order. Pure, so the rule set is unit-tested without `nft`.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{
    Chain, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::{NatError, NatRules};

/// The family and name of our table: shown in messages and docs.
pub const TABLE: &str = "inet starling";
const FAMILY: NfFamily = NfFamily::INet;
const NAME: &str = "starling";
const CHAIN: &str = "postrouting";
/// `srcnat`: where iptables' nat POSTROUTING (and Calico's) sits.
const SRCNAT: i32 = 100;

/// The four sets: name, element type, and their elements in `rules`.
fn sets(r: &NatRules) -> [(&'static str, SetType, Vec<IpNet>); 4] {
    [
        (
            "pools-v4",
            SetType::Ipv4Addr,
            r.pools_v4.iter().map(|n| IpNet::V4(*n)).collect(),
        ),
        (
            "masq-v4",
            SetType::Ipv4Addr,
            r.masq_v4.iter().map(|n| IpNet::V4(*n)).collect(),
        ),
        (
            "pools-v6",
            SetType::Ipv6Addr,
            r.pools_v6.iter().map(|n| IpNet::V6(*n)).collect(),
        ),
        (
            "masq-v6",
            SetType::Ipv6Addr,
            r.masq_v6.iter().map(|n| IpNet::V6(*n)).collect(),
        ),
    ]
}

fn field(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

/// `<proto> saddr @masq-vN <proto> daddr != @pools-vN masquerade`.
fn masquerade_rule(protocol: &'static str, v: &str) -> Vec<Statement<'static>> {
    vec![
        Statement::Match(Match {
            left: field(protocol, "saddr"),
            right: Expression::String(format!("@masq-{v}").into()),
            op: Operator::EQ,
        }),
        Statement::Match(Match {
            left: field(protocol, "daddr"),
            right: Expression::String(format!("@pools-{v}").into()),
            op: Operator::NEQ,
        }),
        Statement::Masquerade(None),
    ]
}

fn rules() -> [Vec<Statement<'static>>; 2] {
    [masquerade_rule("ip", "v4"), masquerade_rule("ip6", "v6")]
}

fn element(n: &IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(n.addr().to_string().into())),
        len: u32::from(n.prefix_len()),
    }))
}

fn table() -> Table<'static> {
    Table {
        family: FAMILY,
        name: NAME.into(),
        handle: None,
    }
}

/// The one transaction that makes our table exactly `r` (or removes it):
/// `add table` (a no-op when it exists) then `delete table`, so the delete
/// cannot fail, then the whole table anew. `nft -f` applies it atomically:
/// no packet sees a half-written table, and no other table is named.
pub fn batch(r: &NatRules) -> Nftables<'static> {
    let mut b = Batch::new();
    b.add(NfListObject::Table(table()));
    b.delete(NfListObject::Table(table()));
    if r.wanted() {
        b.add(NfListObject::Table(table()));
        for (name, ty, elems) in sets(r) {
            b.add(NfListObject::Set(Box::new(Set {
                family: FAMILY,
                table: NAME.into(),
                name: name.into(),
                handle: None,
                set_type: SetTypeValue::Single(ty),
                policy: None,
                flags: Some(HashSet::from([SetFlag::Interval])),
                elem: (!elems.is_empty()).then(|| Cow::Owned(elems.iter().map(element).collect())),
                timeout: None,
                gc_interval: None,
                size: None,
                comment: None,
            })));
        }
        b.add(NfListObject::Chain(Chain {
            family: FAMILY,
            table: NAME.into(),
            name: CHAIN.into(),
            _type: Some(NfChainType::NAT),
            hook: Some(NfHook::Postrouting),
            prio: Some(SRCNAT),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        }));
        for expr in rules() {
            b.add(NfListObject::Rule(Rule {
                family: FAMILY,
                table: NAME.into(),
                chain: CHAIN.into(),
                expr: expr.into(),
                handle: None,
                index: None,
                comment: None,
            }));
        }
    }
    b.to_nftables()
}

/// Our table in a comparable form: no handles, elements as sorted prefixes,
/// rules as their JSON in order. Anything else found in the table (another
/// chain, a rule added by hand, a flowtable) is kept by kind and name so it
/// counts as drift.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub present: bool,
    /// Set name -> (element type, interval flag, elements).
    pub sets: BTreeMap<String, (String, bool, BTreeSet<IpNet>)>,
    /// Chain name -> (type, hook, priority, policy) as JSON.
    pub chains: BTreeMap<String, serde_json::Value>,
    /// (chain, statements as JSON), in the kernel's order.
    pub rules: Vec<(String, serde_json::Value)>,
    /// Objects of other kinds, by kind.
    pub other: Vec<String>,
}

impl Observed {
    /// What `nft -j list table inet starling` shows once `r` is in place.
    pub fn of(r: &NatRules) -> Observed {
        if !r.wanted() {
            return Observed::default();
        }
        Observed::read(&batch(r)).unwrap_or_default()
    }

    /// Read a listing (or our own batch: its `add` commands are read as the
    /// objects they create). Only objects of our table are looked at.
    pub fn read(doc: &Nftables) -> Result<Observed, NatError> {
        let mut o = Observed::default();
        for obj in doc.objects.iter() {
            let obj = match obj {
                NfObject::ListObject(l) => l,
                NfObject::CmdObject(nftables::schema::NfCmd::Add(l)) => l,
                NfObject::CmdObject(_) => {
                    // `delete table` of our batch: start afresh.
                    o = Observed::default();
                    continue;
                }
            };
            o.take(obj)?;
        }
        Ok(o)
    }

    fn take(&mut self, obj: &NfListObject) -> Result<(), NatError> {
        let ours = |family: NfFamily, table: &str| family == FAMILY && table == NAME;
        match obj {
            NfListObject::Table(t) if ours(t.family, &t.name) => self.present = true,
            NfListObject::Set(s) if ours(s.family, &s.table) => {
                let ty = serde_json::to_string(&s.set_type).unwrap_or_default();
                let interval = s
                    .flags
                    .as_ref()
                    .is_some_and(|f| f.contains(&SetFlag::Interval) && f.len() == 1);
                let mut elems = BTreeSet::new();
                for e in s.elem.iter().flat_map(|e| e.iter()) {
                    elems.insert(prefix_of(e).ok_or_else(|| {
                        NatError::Parse(format!(
                            "set {}: element {} is not an address or prefix",
                            s.name,
                            serde_json::to_string(e).unwrap_or_default()
                        ))
                    })?);
                }
                self.sets.insert(s.name.to_string(), (ty, interval, elems));
            }
            NfListObject::Chain(c) if ours(c.family, &c.table) => {
                let v = serde_json::json!([c._type, c.hook, c.prio, c.policy, c.dev]);
                self.chains.insert(c.name.to_string(), v);
            }
            NfListObject::Rule(r) if ours(r.family, &r.table) => {
                let v = serde_json::to_value(&r.expr)
                    .map_err(|e| NatError::Parse(format!("rule in {}: {e}", r.chain)))?;
                self.rules.push((r.chain.to_string(), v));
            }
            NfListObject::MetainfoObject(_) => {}
            NfListObject::Table(_)
            | NfListObject::Set(_)
            | NfListObject::Chain(_)
            | NfListObject::Rule(_) => {}
            other => {
                let kind = serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v.as_object().and_then(|m| m.keys().next().cloned()))
                    .unwrap_or_default();
                self.other.push(kind);
            }
        }
        Ok(())
    }
}

/// An element as nft lists it: an address (a full-length prefix) or
/// `{"prefix": {"addr", "len"}}`.
fn prefix_of(e: &Expression) -> Option<IpNet> {
    match e {
        Expression::String(s) => s.parse::<std::net::IpAddr>().ok().map(IpNet::from),
        Expression::Named(NamedExpression::Prefix(p)) => match &*p.addr {
            Expression::String(a) => {
                let addr: std::net::IpAddr = a.parse().ok()?;
                IpNet::new(addr, u8::try_from(p.len).ok()?).ok()
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{NatPool, desired};
    use super::*;

    fn rules_of(pools: &[(&str, bool)]) -> NatRules {
        let pools: Vec<NatPool> = pools
            .iter()
            .map(|(c, n)| NatPool {
                cidr: c.parse().unwrap(),
                nat_outgoing: *n,
            })
            .collect();
        desired(&pools)
    }

    /// `nft -j list table inet starling` as nftables 1.0.6 printed it for
    /// the table the lab's pools make (handles included), so a change of
    /// our JSON that nft would list differently is caught here.
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
 {"table": {"family": "inet", "name": "starling", "handle": 1}},
 {"set": {"family": "inet", "name": "pools-v4", "table": "starling", "type": "ipv4_addr", "handle": 2, "flags": ["interval"], "elem": ["10.98.0.1", {"prefix": {"addr": "10.244.0.0", "len": 16}}]}},
 {"set": {"family": "inet", "name": "masq-v4", "table": "starling", "type": "ipv4_addr", "handle": 3, "flags": ["interval"], "elem": [{"prefix": {"addr": "10.244.0.0", "len": 16}}]}},
 {"set": {"family": "inet", "name": "pools-v6", "table": "starling", "type": "ipv6_addr", "handle": 4, "flags": ["interval"], "elem": [{"prefix": {"addr": "fd00:10:244::", "len": 56}}]}},
 {"set": {"family": "inet", "name": "masq-v6", "table": "starling", "type": "ipv6_addr", "handle": 5, "flags": ["interval"]}},
 {"chain": {"family": "inet", "table": "starling", "name": "postrouting", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "starling", "chain": "postrouting", "handle": 6, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@masq-v4"}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@pools-v4"}}, {"masquerade": null}]}},
 {"rule": {"family": "inet", "table": "starling", "chain": "postrouting", "handle": 7, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "@masq-v6"}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "@pools-v6"}}, {"masquerade": null}]}}]}"#;

    fn listed() -> Observed {
        let doc: Nftables = serde_json::from_str(LISTED).unwrap();
        Observed::read(&doc).unwrap()
    }

    #[test]
    fn the_kernels_listing_of_our_table_equals_what_we_write() {
        let r = rules_of(&[
            ("10.244.0.0/16", true),
            ("10.98.0.1/32", false),
            ("fd00:10:244::/56", false),
        ]);
        assert_eq!(listed(), Observed::of(&r));
    }

    #[test]
    fn a_changed_element_rule_or_extra_rule_is_drift() {
        let r = rules_of(&[
            ("10.244.0.0/16", true),
            ("10.98.0.1/32", false),
            ("fd00:10:244::/56", false),
        ]);
        let want = Observed::of(&r);
        let mut o = listed();
        o.rules.pop();
        assert_ne!(o, want, "a deleted rule");
        let mut o = listed();
        o.rules.push(o.rules[0].clone());
        assert_ne!(o, want, "a rule added to our chain");
        let mut o = listed();
        o.sets.get_mut("masq-v4").unwrap().2.clear();
        assert_ne!(o, want, "an emptied set");
        // IPv6 natOutgoing turned on is a different table.
        let r6 = rules_of(&[
            ("10.244.0.0/16", true),
            ("10.98.0.1/32", false),
            ("fd00:10:244::/56", true),
        ]);
        assert_ne!(listed(), Observed::of(&r6));
    }

    #[test]
    fn the_batch_touches_only_our_table_and_masquerades_both_families() {
        let r = rules_of(&[("10.244.0.0/16", true), ("fd00:10:244::/56", true)]);
        let json = serde_json::to_value(batch(&r)).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        for c in cmds {
            let (_, obj) = c.as_object().unwrap().iter().next().unwrap();
            let (_, body) = obj.as_object().unwrap().iter().next().unwrap();
            assert_eq!(body["family"], "inet", "{c}");
            let table = body.get("table").unwrap_or(&body["name"]);
            assert_eq!(table, "starling", "{c}");
        }
        // add + delete table, then table, 4 sets, chain, 2 rules.
        assert_eq!(cmds.len(), 2 + 1 + 4 + 1 + 2);
        let text = json.to_string();
        assert!(text.contains(r#""protocol":"ip6""#), "{text}");
        assert!(text.contains(r#""masquerade":null"#), "{text}");
        assert!(text.contains(r#""hook":"postrouting""#), "{text}");
    }

    #[test]
    fn without_natoutgoing_the_batch_only_removes_our_table() {
        let r = rules_of(&[("10.244.0.0/16", false)]);
        let json = serde_json::to_value(batch(&r)).unwrap();
        assert_eq!(json["nftables"].as_array().unwrap().len(), 2);
        assert_eq!(Observed::of(&r), Observed::default());
    }

    #[test]
    fn an_element_that_is_not_a_prefix_is_an_error_naming_the_set() {
        let bad = LISTED.replace(r#""10.98.0.1""#, r#"{"range": ["10.98.0.1", "10.98.0.9"]}"#);
        let doc: Nftables = serde_json::from_str(&bad).unwrap();
        let err = Observed::read(&doc).unwrap_err().to_string();
        assert!(err.contains("pools-v4"), "{err}");
    }
}
