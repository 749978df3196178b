//! `starling-bgpd`'s configuration file (YAML). Errors name the file, the
//! field and the line, so `starling-bgpd --check` can point at the mistake.

use ipnet::IpNet;
use serde::Deserialize;
use starling_bgp::{PeerConfig, SpeakerConfig};
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GracefulRestartConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_restart_time")]
    pub restart_time: u16,
    /// We kept forwarding across our own restart: advertise the F bit and
    /// defer best-path results until peers send End-of-RIB (RFC 4724).
    #[serde(default)]
    pub forwarding_preserved: bool,
}

fn yes() -> bool {
    true
}

fn default_restart_time() -> u16 {
    120
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    pub router_id: Ipv4Addr,
    pub asn: u32,
    #[serde(default)]
    pub listen: Option<Vec<SocketAddr>>,
    pub control_socket: PathBuf,
    #[serde(default)]
    pub hold_time: Option<u16>,
    /// The smallest non-zero hold time accepted from a peer (default 3);
    /// an OPEN with less is refused with 2/6 (RFC 4271 §6.2).
    #[serde(default)]
    pub min_hold_time: Option<u16>,
    #[serde(default)]
    pub connect_retry: Option<u16>,
    #[serde(default)]
    pub graceful_restart: Option<GracefulRestartConfig>,
    #[serde(default)]
    pub prefixes: Vec<IpNet>,
    /// Route reflector cluster ID (default: router_id); used with peers
    /// marked `route_reflector_client`.
    #[serde(default)]
    pub cluster_id: Option<Ipv4Addr>,
    /// ECMP: the most paths kept per prefix (default 1).
    #[serde(default)]
    pub max_paths: Option<usize>,
    /// RFC 8212: eBGP peers without import/export rules exchange nothing (default true).
    #[serde(default)]
    pub ebgp_requires_policy: Option<bool>,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

/// The line of the `nth` (0-based) occurrence of `key:` in `text`, 1-based.
fn line_of(text: &str, key: &str, nth: usize) -> Option<usize> {
    let pat = format!("{key}:");
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim_start().trim_start_matches("- ");
            t.starts_with(&pat)
        })
        .nth(nth)
        .map(|(i, _)| i + 1)
}

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<DaemonConfig, ConfigError> {
        let err = |line: Option<usize>, message: String| ConfigError {
            file: file.to_string(),
            line,
            message,
        };
        let cfg: DaemonConfig = serde_yaml::from_str(text)
            .map_err(|e| err(e.location().map(|l| l.line()), e.to_string()))?;
        if cfg.asn == 0 {
            return Err(err(
                line_of(text, "asn", 0),
                "asn: 0 is reserved (RFC 7607); use a private AS such as 64512".into(),
            ));
        }
        if let Some(h) = cfg.hold_time.filter(|h| *h == 1 || *h == 2) {
            return Err(err(
                line_of(text, "hold_time", 0),
                format!("hold_time: {h} is not allowed; use 0 or at least 3 (RFC 4271 §4.2)"),
            ));
        }
        for (i, p) in cfg.prefixes.iter().enumerate() {
            if p.trunc() != *p {
                return Err(err(
                    line_of(text, "prefixes", 0).map(|l| l + i + 1),
                    format!(
                        "prefixes[{i}]: {p} has host bits set; did you mean {}?",
                        p.trunc()
                    ),
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, p) in cfg.peers.iter().enumerate() {
            let line = line_of(text, "address", i);
            if !seen.insert(p.address) {
                return Err(err(
                    line,
                    format!("peers[{i}].address: {} is configured twice", p.address),
                ));
            }
            if p.asn == 0 {
                return Err(err(line, format!("peers[{i}].asn: 0 is reserved")));
            }
            if let Some(h) = p.hold_time.filter(|h| *h == 1 || *h == 2) {
                return Err(err(
                    line,
                    format!("peers[{i}].hold_time: {h} is not allowed; use 0 or at least 3"),
                ));
            }
            if p.md5_password
                .as_ref()
                .is_some_and(|pw| pw.len() > 80 || pw.is_empty())
            {
                return Err(err(
                    line,
                    format!("peers[{i}].md5_password: must be 1 to 80 bytes"),
                ));
            }
            for (dir, rules) in [("import", &p.import), ("export", &p.export)] {
                for (j, r) in rules.iter().flatten().enumerate() {
                    if let Err(e) = r.validate() {
                        return Err(err(line, format!("peers[{i}].{dir}[{j}].{e}")));
                    }
                }
            }
            if p.max_prefixes.is_some_and(|m| m.limit == 0) {
                return Err(err(
                    line,
                    format!("peers[{i}].max_prefixes.limit: must be at least 1"),
                ));
            }
            if let Some(src) = p.source_address
                && src.is_ipv4() != p.address.is_ipv4()
            {
                {
                    return Err(err(
                        line,
                        format!(
                            "peers[{i}].source_address: {src} is not of the same family as {}",
                            p.address
                        ),
                    ));
                }
            }
        }
        Ok(cfg)
    }

    pub fn speaker(&self) -> SpeakerConfig {
        let mut s = SpeakerConfig::new(self.asn, self.router_id);
        if let Some(l) = &self.listen {
            s.listen = l.clone();
        }
        if let Some(h) = self.hold_time {
            s.hold_time = h;
        }
        if let Some(c) = self.connect_retry {
            s.connect_retry = c;
        }
        if let Some(m) = self.min_hold_time {
            s.min_hold_time = m;
        }
        s.cluster_id = self.cluster_id;
        if let Some(m) = self.max_paths {
            s.max_paths = m.max(1);
        }
        if let Some(r) = self.ebgp_requires_policy {
            s.ebgp_requires_policy = r;
        }
        s.forwarding_preserved = self
            .graceful_restart
            .as_ref()
            .is_some_and(|g| g.enabled && g.forwarding_preserved);
        s.graceful_restart = match &self.graceful_restart {
            Some(g) if !g.enabled => None,
            Some(g) => Some(g.restart_time),
            None => Some(120),
        };
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_config_parses() {
        let c = DaemonConfig::parse(
            "router_id: 192.0.2.1\nasn: 65000\ncontrol_socket: /tmp/x.sock\nprefixes: [10.0.0.0/24]\npeers:\n  - address: 192.0.2.2\n    asn: 65001\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(c.peers[0].port, 179);
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let e = DaemonConfig::parse(
            "router_id: 192.0.2.1\nasn: 65000\ncontrol_socket: /tmp/x\npeers:\n  - address: 192.0.2.2\n    asn: 1\n    pasive: true\n",
            "t.yaml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(7), "{e}");
        assert!(e.to_string().contains("pasive"), "{e}");
    }

    #[test]
    fn semantic_errors_name_field_and_line() {
        let e = DaemonConfig::parse(
            "router_id: 192.0.2.1\nasn: 65000\ncontrol_socket: /tmp/x\npeers:\n  - address: 192.0.2.2\n    asn: 1\n  - address: 192.0.2.2\n    asn: 2\n",
            "t.yaml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(7));
        assert!(e.message.starts_with("peers[1].address"), "{e}");
        let e = DaemonConfig::parse(
            "router_id: 192.0.2.1\nasn: 65000\ncontrol_socket: /x\nprefixes:\n  - 10.0.0.1/24\n",
            "t",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(5));
        assert!(e.message.contains("10.0.0.0/24"));
        let e = DaemonConfig::parse(
            "router_id: 192.0.2.1\nasn: 65000\ncontrol_socket: /x\nhold_time: 2\n",
            "t",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(4));
    }

    #[test]
    fn min_hold_time_reaches_the_speaker() {
        let c = DaemonConfig::parse(
            "router_id: 192.0.2.1\nasn: 65000\ncontrol_socket: /x\nmin_hold_time: 30\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.speaker().min_hold_time, 30);
        let c = DaemonConfig::parse(
            "router_id: 192.0.2.1\nasn: 65000\ncontrol_socket: /x\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.speaker().min_hold_time, 3);
    }
}
