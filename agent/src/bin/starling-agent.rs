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

/// One malloc arena for the whole process (glibc's `M_ARENA_MAX`), unless
/// `MALLOC_ARENA_MAX` says otherwise. The agent runs on one tokio thread
/// plus a few helper threads; glibc's default of an arena per thread keeps
/// the memory each of them once used (at 5,000 nodes with the Kubernetes
/// datastore, ≈ 4 MiB of the peak RSS; docs/benchmarks.md, issue 19).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn one_malloc_arena() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter, and no other
        // thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() {}

fn main() -> Result<()> {
    one_malloc_arena();
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
