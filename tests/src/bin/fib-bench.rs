//! The FIB half of tests/bench/fib.sh: run inside a prepared network
//! namespace, install N remote-block routes with the reconciler, resync the
//! unchanged table, remove them all, and print one JSON line per figure.
//! `--write-batch DIR` instead writes the same routes as `ip -batch` files.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Parser;
use ipnet::{IpNet, Ipv4Net};
use starling_agent::encap::Encapsulation;
use starling_agent::fib::{Fib, FibConfig, Route, RouteProtocol};
use starling_tests::bench_line;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "up0")]
    uplink: String,
    #[arg(long, default_value_t = 100_000)]
    routes: u32,
    /// Next hops are 192.0.2.2 .. 192.0.2.(1+gateways) on the uplink's /24.
    #[arg(long, default_value_t = 100)]
    gateways: u32,
    #[arg(long, default_value_t = 73)]
    protocol: u8,
    /// Unchanged resyncs to time; the median is reported.
    #[arg(long, default_value_t = 5)]
    resyncs: usize,
    /// Write add.batch and del.batch for `ip -batch` (protocol + 1) and exit.
    #[arg(long)]
    write_batch: Option<PathBuf>,
}

/// Block i: the i-th /26 of 10.0.0.0/8, via one of the gateways.
fn block(i: u32, gateways: u32) -> (Ipv4Net, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i * 64;
    let gw = Ipv4Addr::new(192, 0, 2, (2 + i % gateways) as u8);
    (
        Ipv4Net::new(Ipv4Addr::from(base), 26).expect("26 is a valid IPv4 prefix length"),
        gw,
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.routes > (1 << 18) || args.gateways == 0 || args.gateways > 250 {
        bail!("--routes must be at most 262144 (/26s of 10/8) and --gateways 1..=250");
    }
    if let Some(dir) = &args.write_batch {
        let proto = args.protocol.wrapping_add(1);
        let mut add = std::io::BufWriter::new(std::fs::File::create(dir.join("add.batch"))?);
        let mut del = std::io::BufWriter::new(std::fs::File::create(dir.join("del.batch"))?);
        for i in 0..args.routes {
            let (net, gw) = block(i, args.gateways);
            writeln!(
                add,
                "route add {net} via {gw} dev {} proto {proto}",
                args.uplink
            )?;
            writeln!(
                del,
                "route del {net} via {gw} dev {} proto {proto}",
                args.uplink
            )?;
        }
        add.flush()?;
        del.flush()?;
        return Ok(());
    }

    let routes: Vec<Route> = (0..args.routes)
        .map(|i| {
            let (net, gw) = block(i, args.gateways);
            Route::via(IpNet::V4(net), IpAddr::V4(gw), Encapsulation::None)
        })
        .collect();
    let config = FibConfig {
        uplink: Some(args.uplink.clone()),
        protocol: RouteProtocol(args.protocol),
        ..FibConfig::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut fib = Fib::open(config)?;
        let n = routes.len() as f64;

        let t = Instant::now();
        fib.set_desired(routes.clone(), true)?;
        let r = fib.sync().await?;
        let install = t.elapsed().as_secs_f64();
        if r.added != routes.len() || r.failed != 0 {
            bail!(
                "install: expected {} added, got {r:?}; status {:?}",
                routes.len(),
                fib.status().errors.first()
            );
        }
        bench_line(
            "fib",
            "starling",
            "install_routes_per_s",
            (n / install).round(),
            "routes/s",
        );

        let mut times = Vec::new();
        let mut dumps = Vec::new();
        for _ in 0..args.resyncs.max(1) {
            let t = Instant::now();
            let r = fib.sync().await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            dumps.push(r.dump_us as f64 / 1000.0);
            if r.adopted != routes.len() || r.added + r.replaced + r.removed != 0 {
                bail!("unchanged resync wrote something: {r:?}");
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2] * 10.0).round() / 10.0
        };
        bench_line(
            "fib",
            "starling",
            "resync_unchanged_ms",
            median(&mut times),
            "ms",
        );
        bench_line(
            "fib",
            "starling",
            "resync_dump_ms",
            median(&mut dumps),
            "ms",
        );

        let t = Instant::now();
        fib.set_desired(Vec::new(), true)?;
        let r = fib.sync().await?;
        let remove = t.elapsed().as_secs_f64();
        if r.removed != routes.len() || r.failed != 0 {
            bail!("remove: expected {} removed, got {r:?}", routes.len());
        }
        bench_line(
            "fib",
            "starling",
            "remove_routes_per_s",
            (n / remove).round(),
            "routes/s",
        );
        Ok(())
    })
}
