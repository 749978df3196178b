//! A node's FIB reconciler on its own, for system tests: run it inside a
//! network namespace (`ip netns exec`), write desired sets to its stdin
//! (one JSON array of routes per line) and read its status from a file.
//!
//! ```text
//! ip netns exec n1 fib-node --uplink up0 --status /tmp/st.json <<< '[{"dst":"10.1.0.0/26","target":"blackhole"}]'
//! ```

use std::io::BufRead;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use starling_agent::fib::{FibConfig, Reconciler, Route, RouteProtocol};

#[derive(Parser)]
struct Args {
    /// Device towards the other nodes.
    #[arg(long)]
    uplink: Option<String>,
    #[arg(long, default_value_t = 254)]
    table: u32,
    #[arg(long, default_value_t = 73)]
    protocol: u8,
    #[arg(long, default_value_t = 90_000)]
    resync_ms: u64,
    #[arg(long)]
    ipip_mtu: Option<u32>,
    #[arg(long)]
    tunnel_address: Option<Ipv4Addr>,
    /// Keep stale routes of ours (as after a restart before End-of-RIB).
    #[arg(long)]
    keep_stale: bool,
    /// Where to write the status JSON after every pass (replaced atomically).
    #[arg(long)]
    status: PathBuf,
}

fn write_atomic(path: &PathBuf, body: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("info")
        .init();
    let args = Args::parse();
    let config = FibConfig {
        table: args.table,
        protocol: RouteProtocol(args.protocol),
        resync_interval: Duration::from_millis(args.resync_ms),
        uplink: args.uplink,
        ipip_mtu: args.ipip_mtu,
        tunnel_address: args.tunnel_address,
        ..FibConfig::default()
    };
    let (reconciler, task) = Reconciler::new(config);

    // Desired sets arrive on stdin; set_desired is synchronous, so a plain thread feeds it.
    let feeder = reconciler.clone();
    let keep_stale = args.keep_stale;
    let status_path = args.status.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            let parsed: Result<Vec<Route>, _> = serde_json::from_str(&line);
            let result = match parsed {
                Ok(routes) if keep_stale => feeder
                    .set_desired_keep_stale(routes)
                    .map_err(|e| e.to_string()),
                Ok(routes) => feeder.set_desired(routes).map_err(|e| e.to_string()),
                Err(e) => Err(format!("stdin: not a JSON array of routes: {e}")),
            };
            if let Err(e) = result {
                eprintln!("fib-node: {e}");
                let _ = write_atomic(&status_path.with_extension("error"), e.as_bytes());
            }
        }
        // Stdin closed: keep running with the last set until killed.
        std::mem::forget(feeder);
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut status = reconciler.watch_status();
        let path = args.status;
        tokio::spawn(async move {
            while status.changed().await.is_ok() {
                let s = status.borrow_and_update().clone();
                if let Ok(body) = serde_json::to_vec_pretty(&s)
                    && let Err(e) = write_atomic(&path, &body)
                {
                    eprintln!("fib-node: {e:#}");
                }
            }
        });
        task.run().await.context("FIB reconciler stopped")
    })
}
