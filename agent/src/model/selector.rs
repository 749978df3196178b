//! Node selectors (`nodeSelector` of IPPool and BGPPeer): the subset of
//! Calico's selector syntax that node pools and peers use in practice.

use std::collections::BTreeMap;

/// A conjunction of label tests, the subset of Calico's selector syntax that
/// node pools use in practice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSelector(Vec<Term>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Has(String),
}

impl NodeSelector {
    pub fn parse(text: &str) -> Result<NodeSelector, String> {
        let text = text.trim();
        if text.is_empty() || text == "all()" {
            return Ok(NodeSelector(Vec::new()));
        }
        let mut terms = Vec::new();
        for part in text.split("&&").map(str::trim) {
            if let Some(inner) = part.strip_prefix("has(").and_then(|p| p.strip_suffix(')')) {
                terms.push(Term::Has(label_key(inner)?));
            } else if let Some((k, v)) = part.split_once("==") {
                terms.push(Term::Eq(label_key(k)?, quoted(v)?));
            } else if let Some((k, v)) = part.split_once("!=") {
                terms.push(Term::Ne(label_key(k)?, quoted(v)?));
            } else {
                return Err(format!(
                    "cannot parse `{part}`: expected key == 'value', key != 'value', has(key) or all()"
                ));
            }
        }
        Ok(NodeSelector(terms))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Has(k) => labels.contains_key(k),
        })
    }
}

fn label_key(k: &str) -> Result<String, String> {
    let k = k.trim();
    if k.is_empty()
        || !k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        return Err(format!("`{k}` is not a label key"));
    }
    Ok(k.to_string())
}

fn quoted(v: &str) -> Result<String, String> {
    let v = v.trim();
    for q in ['\'', '"'] {
        if let Some(inner) = v.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return Ok(inner.to_string());
        }
    }
    Err(format!("value {v} must be quoted"))
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
    fn selector_terms() {
        let s = NodeSelector::parse("zone == 'a' && has(gpu) && rack != \"r2\"").unwrap();
        assert!(s.matches(&labels(&[("zone", "a"), ("gpu", ""), ("rack", "r1")])));
        assert!(!s.matches(&labels(&[("zone", "a"), ("gpu", ""), ("rack", "r2")])));
        assert!(!s.matches(&labels(&[("zone", "a")])));
        assert!(NodeSelector::parse("all()").unwrap().matches(&labels(&[])));
        assert!(NodeSelector::parse("zone = a").is_err());
    }
}
