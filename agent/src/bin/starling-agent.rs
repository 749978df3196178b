//! `starling-agent run --config FILE`: the node agent. For now it serves IPAM
//! to the CNI plugin; the FIB reconciler and BGP join it later.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use starling_agent::ipam::server::{self, IpamHandle, PodDefaults};
use starling_agent::ipam::{FileDatastore, Ipam, IpamConfig, Store};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The route protocol number pod host routes carry by default: the FIB
/// reconciler's own (it collides with none of Calico's 80, BIRD's 12,
/// kube-router's 17 or zebra's).
const DEFAULT_ROUTE_PROTOCOL: u8 = 73;

#[derive(Parser)]
#[command(name = "starling-agent", version, about = "Starling node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// Agent configuration (YAML or JSON).
        #[arg(long)]
        config: PathBuf,
    },
}

/// How pod traffic leaves the node; decides the MTU overhead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
enum Encapsulation {
    #[default]
    None,
    Ipip,
    CrossSubnet,
    Vxlan,
}

impl Encapsulation {
    fn overhead(self) -> u32 {
        match self {
            Encapsulation::None => 0,
            // CrossSubnet encapsulates some traffic: size for the worst case.
            Encapsulation::Ipip | Encapsulation::CrossSubnet => 20,
            Encapsulation::Vxlan => 50,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AgentConfig {
    node_name: String,
    #[serde(default)]
    node_labels: BTreeMap<String, String>,
    state_dir: PathBuf,
    #[serde(default = "default_socket")]
    socket_path: PathBuf,
    /// Pod MTU; when absent, the uplink's MTU minus the encapsulation overhead.
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    uplink: Option<String>,
    #[serde(default)]
    encapsulation: Encapsulation,
    #[serde(default)]
    route_protocol: Option<u8>,
    #[serde(default)]
    ipam: IpamConfig,
}

fn default_socket() -> PathBuf {
    PathBuf::from(starling_cni::proto::DEFAULT_SOCKET)
}

fn load(path: &Path) -> Result<AgentConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("config {}", path.display()))
}

fn pod_mtu(cfg: &AgentConfig) -> Result<u32> {
    if let Some(mtu) = cfg.mtu {
        if !(576..=65535).contains(&mtu) {
            bail!("mtu {mtu} is outside 576..=65535");
        }
        return Ok(mtu);
    }
    let uplink_mtu = match &cfg.uplink {
        Some(dev) => {
            let p = format!("/sys/class/net/{dev}/mtu");
            std::fs::read_to_string(&p)
                .with_context(|| format!("uplink {dev}: cannot read {p}"))?
                .trim()
                .parse::<u32>()
                .with_context(|| format!("uplink {dev}: {p} is not a number"))?
        }
        None => 1500,
    };
    Ok(uplink_mtu.saturating_sub(cfg.encapsulation.overhead()))
}

async fn run(config: &Path) -> Result<()> {
    let cfg = load(config)?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create stateDir {}", cfg.state_dir.display()))?;
    let store = Store::open(&server::default_store_path(&cfg.state_dir))?;
    let datastore_file = cfg
        .ipam
        .datastore_file
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join("blocks.json"));
    let existing = store.load()?;
    let ipam = Ipam::new(
        &cfg.node_name,
        cfg.node_labels.clone(),
        cfg.ipam.clone(),
        Box::new(FileDatastore::new(datastore_file)),
        existing,
    )?;
    let defaults = PodDefaults {
        mtu: pod_mtu(&cfg)?,
        route_protocol: cfg.route_protocol.unwrap_or(DEFAULT_ROUTE_PROTOCOL),
    };
    tracing::info!(
        node = %cfg.node_name,
        blocks = ?ipam.blocks(),
        mtu = defaults.mtu,
        socket = %cfg.socket_path.display(),
        "IPAM ready"
    );
    let handle = IpamHandle::spawn(ipam, store, defaults);
    let listener = server::bind(&cfg.socket_path)
        .with_context(|| format!("cannot listen on {}", cfg.socket_path.display()))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = server::serve(listener, handle) => r.context("serving the CNI socket")?,
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = std::fs::remove_file(&cfg.socket_path);
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run { config } => rt.block_on(run(&config)),
    }
}
