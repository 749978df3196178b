//! IP pools as IPAM takes them (Calico's IPPool fields that concern
//! addresses): from the agent's own config, or from the model's IPPools.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::IpamError;
use crate::model::IPPoolSpec;
use crate::model::selector::NodeSelector;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pool {
    /// The IPPool's name, which pod and namespace annotations may use;
    /// empty for pools of the agent's own config that give none (those are
    /// named by CIDR).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub cidr: IpNet,
    /// Prefix length of the blocks nodes claim; 26 for IPv4, 122 for IPv6
    /// unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u8>,
    /// Which nodes may claim blocks: `all()`, or `key == 'value'`,
    /// `key != 'value'`, `has(key)` joined with `&&`. Empty means all.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_selector: String,
    /// A disabled pool hands out no new blocks; existing ones stay.
    #[serde(default)]
    pub disabled: bool,
}

impl Pool {
    pub fn block_size(&self) -> u8 {
        self.block_size
            .unwrap_or(if self.cidr.addr().is_ipv4() { 26 } else { 122 })
    }

    /// Reject what would make the pool unusable, naming the pool and field.
    pub fn validate(&self) -> Result<(), IpamError> {
        let bs = self.block_size();
        if bs < self.cidr.prefix_len() || bs > self.cidr.max_prefix_len() {
            return Err(IpamError::Config(format!(
                "pool {}: blockSize {bs} must be between the pool's prefix length {} and {}",
                self.cidr,
                self.cidr.prefix_len(),
                self.cidr.max_prefix_len()
            )));
        }
        if self.cidr != self.cidr.trunc() {
            return Err(IpamError::Config(format!(
                "pool {}: cidr has host bits set (did you mean {}?)",
                self.cidr,
                self.cidr.trunc()
            )));
        }
        NodeSelector::parse(&self.node_selector)
            .map_err(|e| IpamError::Config(format!("pool {}: nodeSelector: {e}", self.cidr)))?;
        Ok(())
    }

    /// Whether a node with `labels` may claim blocks from this pool.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.disabled
            && NodeSelector::parse(&self.node_selector)
                .map(|s| s.matches(labels))
                .unwrap_or(false)
    }

    /// The IPAM view of the model pool `name`.
    pub fn named(name: &str, spec: &IPPoolSpec) -> Pool {
        Pool {
            name: name.to_string(),
            ..Pool::from(spec)
        }
    }

    /// The block of this pool's grid that holds `ip`, if the pool does.
    pub fn block_of(&self, ip: std::net::IpAddr) -> Option<IpNet> {
        if !self.cidr.contains(&ip) {
            return None;
        }
        IpNet::new(ip, self.block_size()).ok().map(|b| b.trunc())
    }

    /// The pool as operators know it: its name, or its CIDR.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            self.cidr.to_string()
        } else {
            format!("{} ({})", self.name, self.cidr)
        }
    }

    /// The pool's blocks in address order (lazily: an IPv6 pool has many).
    pub fn blocks(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.cidr.subnets(self.block_size()).into_iter().flatten()
    }
}

impl From<&IPPoolSpec> for Pool {
    /// The IPAM view of a model pool (unnamed; see [`Pool::named`]).
    fn from(p: &IPPoolSpec) -> Pool {
        Pool {
            name: String::new(),
            cidr: p.cidr,
            block_size: p.block_size,
            node_selector: p.node_selector.clone(),
            disabled: p.disabled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_pool_selects_by_labels_and_a_disabled_one_selects_none() {
        let mut p: Pool =
            serde_json::from_str(r#"{"cidr":"10.0.0.0/16","nodeSelector":"zone == 'a'"}"#).unwrap();
        assert!(p.selects(&labels(&[("zone", "a")])));
        assert!(!p.selects(&labels(&[("zone", "b")])));
        p.disabled = true;
        assert!(!p.selects(&labels(&[("zone", "a")])));
    }

    #[test]
    fn default_block_sizes_and_validation() {
        let v4: Pool = serde_json::from_str(r#"{"cidr":"10.0.0.0/16"}"#).unwrap();
        assert_eq!(v4.block_size(), 26);
        let v6: Pool = serde_json::from_str(r#"{"cidr":"fd00::/48"}"#).unwrap();
        assert_eq!(v6.block_size(), 122);
        let bad: Pool = serde_json::from_str(r#"{"cidr":"10.0.0.0/27","blockSize":26}"#).unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("10.0.0.0/27") && err.contains("blockSize"),
            "{err}"
        );
        let host_bits: Pool = serde_json::from_str(r#"{"cidr":"10.0.0.1/16"}"#).unwrap();
        assert!(host_bits.validate().is_err());
    }

    #[test]
    fn blocks_are_lazy_and_ordered() {
        let p: Pool = serde_json::from_str(r#"{"cidr":"fd00::/48"}"#).unwrap();
        let first: Vec<IpNet> = p.blocks().take(2).collect();
        assert_eq!(first[0].to_string(), "fd00::/122");
        assert_eq!(first[1].to_string(), "fd00::40/122");
    }
}
