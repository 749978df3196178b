//! `starlingctl`: the operator's command line for Starling.

use anyhow::Result;
use clap::{Parser, Subcommand};
use starling_agent::model::{crd, file};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "starlingctl", version, about = "Operate a Starling cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions of the model (manifests/crds.yaml
    /// is this output: `starlingctl crds > manifests/crds.yaml`).
    Crds,
    /// Check a file datastore YAML stream as the agent would load it.
    Validate {
        /// The YAML file (several `---` separated documents).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("starlingctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Crds => {
            let yaml = crd::crds_yaml()?;
            std::io::stdout().lock().write_all(yaml.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { file: path } => match file::load_file(&path) {
            Ok(s) => {
                println!(
                    "{}: ok: {} IPPool, {} BGPConfiguration, {} BGPPeer, {} StarlingNode, {} BlockAffinity",
                    path.display(),
                    s.pools.len(),
                    usize::from(s.bgp_configuration.is_some()),
                    s.peers.len(),
                    s.nodes.len(),
                    s.affinities.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{} problem(s); nothing was loaded", e.problems.len());
                Ok(ExitCode::FAILURE)
            }
        },
    }
}
