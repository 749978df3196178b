//! `starling-bgpd`: the speaker as a standalone daemon, configured by a YAML
//! file and inspected through its control socket.

mod config;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use config::DaemonConfig;
use ipnet::IpNet;
use starling_bgp::control::{self, Reply, Request};
use starling_bgp::{RouteEvent, Speaker};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "starling-bgpd",
    version,
    about = "Starling's BGP speaker as a standalone daemon"
)]
struct Cli {
    /// Configuration file (YAML); see docs/bgp.md.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the session table or the routes of a running daemon.
    Show {
        what: What,
        #[arg(long)]
        socket: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Originate a prefix.
    Announce {
        prefix: IpNet,
        #[arg(long)]
        socket: PathBuf,
    },
    /// Stop originating a prefix.
    Withdraw {
        prefix: IpNet,
        #[arg(long)]
        socket: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum What {
    Sessions,
    Routes,
    /// Table sizes (cheap with millions of paths).
    Summary,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("starling-bgpd: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(cmd) = cli.cmd {
        return client(cmd);
    }
    let Some(path) = cli.config else {
        bail!("--config FILE is required to run the daemon")
    };
    let cfg = match DaemonConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("starling-bgpd: {e}");
            std::process::exit(1);
        }
    };
    if cli.check {
        println!(
            "{}: ok ({} peers, {} prefixes)",
            path.display(),
            cfg.peers.len(),
            cfg.prefixes.len()
        );
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cfg, path))
}

async fn run(mut cfg: DaemonConfig, path: PathBuf) -> Result<()> {
    let (speaker, mut changes) = Speaker::start(cfg.speaker()).await?;
    for p in &cfg.prefixes {
        speaker.announce(*p)?;
    }
    for p in &cfg.peers {
        speaker.add_peer(p.clone()).await?;
    }
    let sock = cfg.control_socket.clone();
    let ctl = speaker.clone();
    tokio::spawn(async move {
        if let Err(e) = control::serve(&sock, ctl).await {
            tracing::error!(socket = %sock.display(), error = %e, "control socket failed");
        }
    });
    // The daemon programs nothing. With debug logging it logs best-path
    // changes; otherwise the receiver is dropped and the speaker builds no
    // route events at all (a million of them on a full-table ingest).
    if tracing::enabled!(tracing::Level::DEBUG) {
        tokio::spawn(async move {
            while let Some(ev) = changes.recv().await {
                let RouteEvent::Change(c) = ev else { continue };
                let hops: Vec<String> = c
                    .paths
                    .iter()
                    .map(|p| p.next_hop.map(|n| n.to_string()).unwrap_or_default())
                    .collect();
                tracing::debug!(prefix = %c.prefix, next_hops = ?hops, "best paths");
            }
        });
    } else {
        drop(changes);
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => match DaemonConfig::load(&path) {
                Ok(new) => {
                    reload(&speaker, &cfg, &new).await;
                    cfg = new;
                }
                Err(e) => tracing::error!("reload refused, keeping the running configuration: {e}"),
            },
        }
    }
    speaker.shutdown("starling-bgpd is stopping").await.ok();
    // Give the sessions a moment to put their NOTIFICATIONs on the wire.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let _ = std::fs::remove_file(&cfg.control_socket);
    Ok(())
}

/// SIGHUP: apply a new configuration without restarting. Peers whose
/// session settings are unchanged keep their sessions; a changed import
/// policy is applied through a route refresh (RFC 2918). Speaker-wide
/// settings (router ID, AS, listen addresses) need a restart.
async fn reload(speaker: &Speaker, old: &DaemonConfig, new: &DaemonConfig) {
    if old.router_id != new.router_id || old.asn != new.asn || old.listen != new.listen {
        tracing::warn!("router_id, asn and listen only change on restart; applying the rest");
    }
    let _ = speaker.set_cluster_id(new.cluster_id.unwrap_or(new.router_id));
    for p in &old.prefixes {
        if !new.prefixes.contains(p) {
            let _ = speaker.withdraw(*p);
        }
    }
    for p in &new.prefixes {
        let _ = speaker.announce(*p);
    }
    for p in &old.peers {
        if !new.peers.iter().any(|n| n.address == p.address) {
            let _ = speaker.remove_peer(p.address).await;
        }
    }
    for p in &new.peers {
        if let Err(e) = speaker.add_peer(p.clone()).await {
            tracing::error!(peer = %p.address, "reload: {e}");
        }
    }
    tracing::info!(
        peers = new.peers.len(),
        prefixes = new.prefixes.len(),
        "configuration reloaded"
    );
}

fn client(cmd: Cmd) -> Result<()> {
    let (socket, req, output) = match cmd {
        Cmd::Show {
            what: What::Sessions,
            socket,
            output,
        } => (socket, Request::Sessions, output),
        Cmd::Show {
            what: What::Routes,
            socket,
            output,
        } => (socket, Request::Routes, output),
        Cmd::Show {
            what: What::Summary,
            socket,
            output,
        } => (socket, Request::Summary, output),
        Cmd::Announce { prefix, socket } => (socket, Request::Announce { prefix }, Output::Table),
        Cmd::Withdraw { prefix, socket } => (socket, Request::Withdraw { prefix }, Output::Table),
    };
    let reply = control::request(&socket, &req).map_err(anyhow::Error::msg)?;
    match reply {
        Reply::Error(e) => bail!("{e}"),
        Reply::Ok => println!("ok"),
        Reply::Sessions(s) if output == Output::Json => {
            println!("{}", serde_json::to_string_pretty(&s)?)
        }
        Reply::Sessions(s) => print!("{}", control::session_table(&s)),
        Reply::Summary(s) if output == Output::Json => {
            println!("{}", serde_json::to_string_pretty(&s)?)
        }
        Reply::Summary(s) => println!(
            "sessions {}/{} established, {} prefixes in the Loc-RIB, {} paths, {} attribute sets",
            s.sessions_established,
            s.sessions_configured,
            s.loc_rib_prefixes,
            s.paths,
            s.attribute_sets
        ),
        Reply::Routes(r) if output == Output::Json => {
            println!("{}", serde_json::to_string_pretty(&r)?)
        }
        Reply::Routes(r) => {
            for e in r {
                println!(
                    "{:<24} via {:<28} from {:<20} as-path {:?}{}",
                    e.prefix,
                    e.next_hop
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "-".into()),
                    e.peer,
                    e.as_path,
                    if e.best { " *" } else { "" }
                );
            }
        }
    }
    Ok(())
}
