//! Time from process start to Established against a BIRD peer, for
//! `starling-bgpd` and for a second BIRD as the reference, in the same run.
//!
//! Topology: two namespaces on a bridge. `ref` runs BIRD 192.0.2.1 AS 65000
//! with a passive neighbor 192.0.2.10 AS 65010, restarted fresh before every
//! repetition (so no error-wait or back-off state carries over). The
//! candidate runs in `cand` as 192.0.2.10. The clock starts right before the
//! candidate's process is spawned and stops when the reference BIRD reports
//! the session Established in `birdc show protocols`, polled every 5 ms: one
//! observer for both implementations.
//!
//! Prints one JSON line per figure (ms): min, median, max over the repetitions.

use anyhow::{Context, Result, bail};
use clap::Parser;
use ipnet::IpNet;
use starling_tests::peers::{
    Lan, Neighbor, Peer, PeerKind, PeerSpec, Starling, StarlingPeer, StarlingSpec,
};
use starling_tests::{Netns, bench_line};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Repetitions per implementation (they alternate).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// The `starling-bgpd` binary; default: next to this program.
    #[arg(long)]
    bgpd: Option<PathBuf>,
}

const REF_AS: u32 = 65000;
const CAND_AS: u32 = 65010;
const GIVE_UP: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    let args = Args::parse();
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let bgpd = match args.bgpd {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("this program has no directory")?
            .join("starling-bgpd"),
    };
    if !bgpd.is_file() {
        bail!(
            "{} does not exist; build it with `cargo build --release -p starling-bgpd`",
            bgpd.display()
        );
    }
    PeerKind::Bird.require_tools();

    let ref_ip: IpAddr = "192.0.2.1".parse()?;
    let cand_ip: IpAddr = "192.0.2.10".parse()?;
    let mut lan = Lan::new()?;
    let ref_ns = Netns::new("ref")?;
    let cand_ns = Netns::new("cand")?;
    lan.attach(&ref_ns, "192.0.2.1/24")?;
    lan.attach(&cand_ns, "192.0.2.10/24")?;
    let prefix: IpNet = "10.99.0.0/24".parse()?;

    let mut reference = Peer::start(
        PeerKind::Bird,
        &ref_ns,
        PeerSpec {
            router_id: Ipv4Addr::new(192, 0, 2, 1),
            local_as: REF_AS,
            local_addresses: vec![ref_ip],
            neighbors: vec![Neighbor::new(cand_ip, CAND_AS).passive()],
            prefixes: vec!["10.1.0.0/24".parse()?],
        },
    )?;
    let bird_spec = PeerSpec {
        router_id: Ipv4Addr::new(192, 0, 2, 10),
        local_as: CAND_AS,
        local_addresses: vec![cand_ip],
        neighbors: vec![Neighbor::new(ref_ip, REF_AS)],
        prefixes: vec![prefix],
    };
    let ours_spec = StarlingSpec {
        router_id: Ipv4Addr::new(192, 0, 2, 10),
        asn: CAND_AS,
        prefixes: vec![prefix],
        peers: vec![StarlingPeer::new(ref_ip, REF_AS)],
    };

    let mut times: [(&str, Vec<f64>); 2] = [("starling", Vec::new()), ("bird", Vec::new())];
    for rep in 0..args.reps {
        for (imp, samples) in &mut times {
            reference.restart()?;
            let started = Instant::now();
            // The candidate starts in a second thread (its start-up returns
            // once its control channel answers); this thread watches the
            // reference so the figure is spawn -> Established, nothing else.
            let ms = std::thread::scope(|s| -> Result<f64> {
                let cand = s.spawn(|| -> Result<Box<dyn Send>> {
                    Ok(match *imp {
                        "starling" => Box::new(Starling::start(&cand_ns, &bgpd, &ours_spec)?),
                        _ => Box::new(Peer::start(PeerKind::Bird, &cand_ns, bird_spec.clone())?),
                    })
                });
                let mut established = None;
                while started.elapsed() < GIVE_UP {
                    if reference.session_established(cand_ip)? {
                        established = Some(started.elapsed());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let handle = cand
                    .join()
                    .map_err(|_| anyhow::anyhow!("candidate start-up panicked"))??;
                let Some(t) = established else {
                    bail!("{imp} did not reach Established within {GIVE_UP:?} (repetition {rep})");
                };
                drop(handle);
                Ok(t.as_secs_f64() * 1000.0)
            })?;
            samples.push(ms);
        }
    }
    for (imp, mut samples) in times {
        samples.sort_by(f64::total_cmp);
        let median = samples[samples.len() / 2];
        bench_line(
            "bgp-establish",
            imp,
            "time_to_established_min",
            round(samples[0]),
            "ms",
        );
        bench_line(
            "bgp-establish",
            imp,
            "time_to_established_median",
            round(median),
            "ms",
        );
        bench_line(
            "bgp-establish",
            imp,
            "time_to_established_max",
            round(samples[samples.len() - 1]),
            "ms",
        );
    }
    Ok(())
}

fn round(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}
