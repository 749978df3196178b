//! The lab's outside host: a namespace `NAME-out` on the underlay bridge
//! standing for the world beyond the cluster. It has an underlay address
//! (192.0.2.250, and 2001:db8::fa with IPv6) that the nodes use as their
//! default gateway, and a "public" address on its loopback, 203.0.113.1
//! (2001:db8:ff::1), that pods reach through their node. It knows no pod
//! route: a pod's packet gets an answer only when the node masquerades it
//! (natOutgoing), so `lab check` sees NAT working or not.

use super::{LabState, ip, plug};
use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// The outside host's underlay address: the nodes' default gateway.
pub const GATEWAY_V4: &str = "192.0.2.250";
pub const GATEWAY_V6: &str = "2001:db8::fa";
/// The address pods reach (documentation range, RFC 5737 / RFC 3849).
pub const OUTSIDE_V4: &str = "203.0.113.1";
pub const OUTSIDE_V6: &str = "2001:db8:ff::1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabOutside {
    pub netns: String,
    /// The addresses pods reach it at (IPv4, and IPv6 with `--ipv6`).
    pub addresses: Vec<IpAddr>,
}

impl LabState {
    /// Build the outside host on the fabric (before the nodes, which route
    /// through it).
    pub(super) fn build_outside(&mut self) -> Result<()> {
        let netns = format!("{}-out", self.name);
        let v4: IpNet = format!("{GATEWAY_V4}/24").parse()?;
        let v6: Option<IpNet> = self
            .options
            .ipv6
            .then(|| format!("{GATEWAY_V6}/64").parse())
            .transpose()?;
        plug(&self.fabric, &netns, "out", "br0", &v4, v6.as_ref())
            .context("outside host: wiring")?;
        let mut addresses = vec![OUTSIDE_V4.parse::<IpAddr>()?];
        ip(
            "outside host: its address",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{OUTSIDE_V4}/32"),
                "dev",
                "lo",
            ],
        )?;
        if self.options.ipv6 {
            ip(
                "outside host: its IPv6 address",
                &[
                    "-n",
                    &netns,
                    "addr",
                    "add",
                    &format!("{OUTSIDE_V6}/128"),
                    "dev",
                    "lo",
                ],
            )?;
            addresses.push(OUTSIDE_V6.parse()?);
        }
        self.outside = Some(LabOutside { netns, addresses });
        self.save()
    }

    /// A node's default route through the outside host, as a real node's
    /// towards its gateway (the agent finds its uplink by it).
    pub(super) fn route_via_outside(&self, netns: &str) -> Result<()> {
        if self.outside.is_none() {
            return Ok(());
        }
        ip(
            "default route via the outside host",
            &["-n", netns, "route", "add", "default", "via", GATEWAY_V4],
        )?;
        if self.options.ipv6 {
            ip(
                "IPv6 default route via the outside host",
                &[
                    "-n", netns, "-6", "route", "add", "default", "via", GATEWAY_V6,
                ],
            )?;
        }
        Ok(())
    }

    /// Ping the outside host from every pod. Returns (pod, address, answered).
    pub fn check_outside(&self) -> Vec<(String, IpAddr, bool)> {
        let Some(out) = &self.outside else {
            return Vec::new();
        };
        let mut jobs = Vec::new();
        for p in &self.pods {
            for a in &out.addresses {
                // A pod without an address of the family has nothing to send from.
                if p.ips.iter().any(|i| i.is_ipv4() == a.is_ipv4()) {
                    jobs.push((p.clone(), *a));
                }
            }
        }
        let mut results: Vec<(String, IpAddr, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(p, a)| {
                    s.spawn(move || {
                        let ok = Command::new("ip")
                            .args([
                                "netns", "exec", &p.netns, "ping", "-c", "3", "-i", "0.2", "-W",
                                "1", "-q",
                            ])
                            .arg(a.to_string())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()
                            .is_ok_and(|s| s.success());
                        (p.name.clone(), *a, ok)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        results.sort();
        results
    }

    /// Turn `natOutgoing` of the lab's pools on or off (rewrites the model).
    pub fn set_nat_outgoing(&mut self, on: bool) -> Result<()> {
        self.nat_outgoing = on;
        self.save()?;
        self.write_model()
    }
}
