//! `starling-agent run --config FILE`: the node agent. With a datastore it
//! peers over BGP, programs the FIB and serves IPAM to the CNI plugin; without
//! one it serves IPAM only.

use anyhow::Result;
use clap::{Parser, Subcommand};
use starling_agent::node::{self, AgentConfig};
use std::path::PathBuf;

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
    /// Copy the CNI plugin to the host and write its conflist, atomically
    /// (the DaemonSet's init container).
    InstallCni(starling_agent::install::InstallOptions),
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
        Command::Run { config } => {
            let cfg = AgentConfig::load(&config)?;
            rt.block_on(node::run(cfg))
        }
        Command::InstallCni(opts) => {
            let r = starling_agent::install::install_cni(&opts)?;
            for w in &r.warnings {
                eprintln!("install-cni: warning: {w}");
            }
            println!(
                "install-cni: {} {:?}, {} {:?}",
                r.binary.display(),
                r.binary_outcome,
                r.conflist.display(),
                r.conflist_outcome
            );
            Ok(())
        }
    }
}
