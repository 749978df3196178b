//! The lab's underlay shapes. `flat`: every node on one bridge, one subnet
//! (192.0.2.0/24). `two-subnets`: odd nodes on `br0` (192.0.2.0/24), even
//! nodes on `br1` (198.51.100.0/24), joined by a router namespace
//! `NAME-rtr` (192.0.2.1 and 198.51.100.1) that forwards between them and
//! knows no pod route: pod traffic crosses it only encapsulated. An nftables
//! table in the router's namespace (never the host's) counts what it
//! forwards (VXLAN, IPIP, plain pod packets), so tests can prove the
//! encapsulation on the wire.

use super::{LabState, ip, plug};
use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::process::{Command, Stdio};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Underlay {
    /// All nodes on one L2 subnet.
    #[default]
    Flat,
    /// Nodes on two subnets joined by a router that knows no pod routes.
    TwoSubnets,
}

/// The router of the `two-subnets` underlay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabRouter {
    pub netns: String,
}

/// What the router forwarded, from its nftables counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterCounters {
    /// VXLAN packets (UDP to port 4789).
    pub vxlan: u64,
    /// IP-in-IP packets (IP protocol 4).
    pub ipip: u64,
    /// Plain pod packets: an IPv4 destination inside 10.0.0.0/8 (every lab
    /// pool), not encapsulated.
    pub plain_pod: u64,
}

const SUBNETS: [(&str, &str, &str); 2] = [
    ("br0", "192.0.2", "192.0.2.0/24"),
    ("br1", "198.51.100", "198.51.100.0/24"),
];

/// The bridge, address and (with a router) the route to the other subnet
/// of node `nodeI`.
pub(super) fn node_address(underlay: Underlay, i: usize) -> Result<(&'static str, IpNet)> {
    let (bridge, net, _) = match underlay {
        Underlay::Flat => SUBNETS[0],
        Underlay::TwoSubnets => SUBNETS[(i + 1) % 2],
    };
    Ok((bridge, format!("{net}.{}/24", 10 + i).parse()?))
}

/// Refuse what the underlay cannot carry.
pub(super) fn check(opts: &super::LabOptions) -> Result<()> {
    if opts.underlay == Underlay::TwoSubnets {
        if opts.encapsulation == super::LabEncapsulation::None {
            bail!(
                "--underlay two-subnets needs an encapsulation (the router knows no pod routes): \
                 use --encapsulation vxlan, vxlan-cross-subnet, ipip or cross-subnet"
            );
        }
        if opts.ipv6 {
            bail!("--underlay two-subnets is IPv4 only (VXLAN and IPIP are IPv4 only here)");
        }
        if opts.tor.is_some() {
            bail!("--underlay two-subnets has no top-of-rack router yet; leave out --tor");
        }
    }
    Ok(())
}

/// Extra bridges in the fabric namespace.
pub(super) fn make_bridges(fabric: &str, underlay: Underlay) -> Result<()> {
    if underlay == Underlay::TwoSubnets {
        ip(
            "underlay",
            &["-n", fabric, "link", "add", "br1", "type", "bridge"],
        )?;
        ip("underlay", &["-n", fabric, "link", "set", "br1", "up"])?;
    }
    Ok(())
}

/// The default route through the subnet's router, for a node of the
/// two-subnets underlay, as a cloud VM has one via its subnet's gateway: it
/// reaches the other subnet, and it is how the agent finds its uplink
/// (there is no outside host on this underlay).
pub(super) fn route_node(lab: &LabState, netns: &str, addr: &IpNet) -> Result<()> {
    if lab.options.underlay != Underlay::TwoSubnets {
        return Ok(());
    }
    let gateway = format!("{}.1", own_net(addr)?);
    ip(
        "default route via the subnet router",
        &["-n", netns, "route", "add", "default", "via", &gateway],
    )
    .with_context(|| format!("{netns}: default route via {gateway}"))?;
    Ok(())
}

fn own_net(addr: &IpNet) -> Result<&'static str> {
    for (_, net, prefix) in SUBNETS {
        if prefix.parse::<IpNet>()?.contains(&addr.addr()) {
            return Ok(net);
        }
    }
    bail!("{addr} is on no lab subnet")
}

const NFT_TABLE: &str = "starling_lab";

/// The router namespace: one leg on each bridge, forwarding on, counters.
pub(super) fn start_router(lab: &mut LabState, progress: &mut dyn FnMut(&str)) -> Result<()> {
    if lab.options.underlay != Underlay::TwoSubnets {
        return Ok(());
    }
    let netns = format!("{}-rtr", lab.name);
    progress(&format!(
        "underlay: router {netns} between 192.0.2.0/24 and 198.51.100.0/24 (no pod routes)"
    ));
    // Its first leg is `eth0` on br0 (plug's shape); the second is added here.
    plug(
        &lab.fabric,
        &netns,
        "rtr0",
        "br0",
        &"192.0.2.1/24".parse()?,
        None,
    )
    .context("router: first leg")?;
    ip(
        "router: second leg",
        &[
            "-n",
            &lab.fabric,
            "link",
            "add",
            "rtr1",
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
            "netns",
            &netns,
        ],
    )?;
    ip(
        "router: second leg",
        &[
            "-n",
            &lab.fabric,
            "link",
            "set",
            "rtr1",
            "master",
            "br1",
            "up",
        ],
    )?;
    ip(
        "router: second leg",
        &[
            "-n",
            &netns,
            "addr",
            "add",
            "198.51.100.1/24",
            "dev",
            "eth1",
        ],
    )?;
    ip(
        "router: second leg",
        &["-n", &netns, "link", "set", "eth1", "up"],
    )?;
    super::in_ns(
        "router: forwarding",
        &netns,
        &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
    )?;
    let rules = format!(
        "table ip {NFT_TABLE} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    udp dport 4789 counter comment \"vxlan\"\n    ip protocol 4 counter comment \"ipip\"\n    ip daddr 10.0.0.0/8 counter comment \"plain_pod\"\n  }}\n}}\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("router: running nft (Debian package nftables)")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin.write_all(rules.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "router: nft refused the counters: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    lab.router = Some(LabRouter { netns });
    lab.save()
}

impl LabState {
    /// Re-address a node's underlay, as when a VM gets a new address: its
    /// fabric port moves to the bridge of `ipv4`'s subnet (on `two-subnets`;
    /// `flat` has one), the old address goes, the new one comes, the
    /// default route is put back, and the model gets the new address. The
    /// node's agent is left running: it takes its own address (the VXLAN
    /// device's `local`) at start, so restart it afterwards
    /// ([`LabState::kill_agent`], [`LabState::start_agent`]) as an operator
    /// would. IPv4 only.
    pub fn move_node(&mut self, node: &str, ipv4: IpNet) -> Result<()> {
        let n = self.node(node)?.clone();
        let (bridge, gateway) = match self.options.underlay {
            Underlay::TwoSubnets => {
                let net = own_net(&ipv4)?;
                let bridge = SUBNETS.iter().find(|s| s.1 == net).map(|s| s.0);
                (bridge.unwrap_or("br0"), format!("{net}.1"))
            }
            Underlay::Flat => {
                if !"192.0.2.0/24".parse::<IpNet>()?.contains(&ipv4.addr()) {
                    bail!("{node}: {ipv4} is not on the flat underlay's 192.0.2.0/24");
                }
                ("br0", super::outside::GATEWAY_V4.to_string())
            }
        };
        if self.nodes.iter().any(|m| m.ipv4.addr() == ipv4.addr()) {
            bail!("{node}: {ipv4} is already a node's address");
        }
        let what = format!("{node}: moving to {ipv4}");
        ip(
            &what,
            &["-n", &self.fabric, "link", "set", &n.port, "master", bridge],
        )?;
        let old = n.ipv4.to_string();
        ip(&what, &["-n", &n.netns, "addr", "del", &old, "dev", "eth0"])?;
        ip(
            &what,
            &[
                "-n",
                &n.netns,
                "addr",
                "add",
                &ipv4.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        if self.options.underlay == Underlay::TwoSubnets || self.outside.is_some() {
            ip(
                &what,
                &[
                    "-n", &n.netns, "route", "replace", "default", "via", &gateway,
                ],
            )?;
        }
        self.node_mut(node)?.ipv4 = ipv4;
        self.save()?;
        self.write_model()
    }

    /// The router's counters (two-subnets underlay only).
    pub fn router_counters(&self) -> Result<RouterCounters> {
        let Some(r) = &self.router else {
            bail!(
                "lab {} has no router (it needs --underlay two-subnets)",
                self.name
            )
        };
        let text = super::in_ns(
            "router: reading counters",
            &r.netns,
            &["nft", "-j", "list", "table", "ip", NFT_TABLE],
        )?;
        let json: serde_json::Value = serde_json::from_str(&text).context("router: nft's JSON")?;
        let mut c = RouterCounters::default();
        for item in json["nftables"].as_array().into_iter().flatten() {
            let rule = &item["rule"];
            let packets = rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|e| e["counter"]["packets"].as_u64());
            match (rule["comment"].as_str(), packets) {
                (Some("vxlan"), Some(p)) => c.vxlan = p,
                (Some("ipip"), Some(p)) => c.ipip = p,
                (Some("plain_pod"), Some(p)) => c.plain_pod = p,
                _ => {}
            }
        }
        Ok(c)
    }

    /// Packets a node's device sent (`ip -s link`), e.g. `vxlan.starling`.
    pub fn tx_packets(&self, node: &str, dev: &str) -> Result<u64> {
        let n = self.node(node)?;
        let text = ip(
            &format!("{node}: counters of {dev}"),
            &["-n", &n.netns, "-j", "-s", "link", "show", dev],
        )?;
        let json: serde_json::Value = serde_json::from_str(&text)?;
        json[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .with_context(|| format!("{node}: no tx counter for {dev}"))
    }
}
