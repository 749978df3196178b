//! `bgp-loadgen`: the BGP load generator behind `tests/bench/bgp-ingest.sh`
//! and `tests/bench/rr-fanout.sh`.
//!
//! It opens one iBGP session per simulated peer, each from its own loopback
//! source address (all of 127.0.0.0/8 is local on Linux), to the speaker
//! under test, and drives it:
//!
//! * `ingest`: every peer sends its own disjoint set of IPv4 prefixes, all
//!   UPDATEs encoded before the first connection so encoding is not in the
//!   figure, then End-of-RIB. The clock starts right before the first UPDATE
//!   is written and stops when the speaker's own view (its control socket:
//!   `starling-bgpd`'s summary or BIRD's `show protocols all` import
//!   counters) holds every prefix. `--target sink` runs the same load into
//!   an in-process BGP listener that only frames and discards, which is the
//!   generator's own time: the speakers' figures are only theirs if they are
//!   well above it.
//! * `fanout`: every client announces one /26; each client decodes what the
//!   route reflector sends it and the clock stops when every client holds
//!   every other client's prefix.
//!
//! Prints one JSON line per figure (`starling_tests::bench_line`).

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use ipnet::{IpNet, Ipv4Net};
use netgauze_bgp_pkt::BgpMessage;
use starling_bgp::attrs::{AsSegment, Origin, SegmentKind};
use starling_bgp::wire::{self, MAX_MESSAGE_LEN, OpenParams};
use starling_bgp::{Family, PathAttrs};
use starling_tests::bench_line;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, mpsc, watch};

#[derive(Parser)]
#[command(
    name = "bgp-loadgen",
    about = "BGP load generator for Starling's benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Many peers × many prefixes into one speaker; time until its Loc-RIB holds them all.
    Ingest(IngestArgs),
    /// Route-reflector clients announcing one /26 each; time until every client holds all.
    Fanout(FanoutArgs),
    /// One prefix re-announced with a new MED many times into starling-bgpd;
    /// its RSS and attribute-set count before and after.
    Flap(FlapArgs),
    /// Two route reflectors and thousands of clients (a block and a few pod
    /// routes each): convergence, a node joining and leaving, and a
    /// reflector restart (`tests/bench/scale-rr.sh`).
    Scale(scale::ScaleArgs),
    /// Full-table transit: one eBGP feeder sends a table with many attribute
    /// sets, the speaker re-advertises it to eBGP receivers; load, optional
    /// churn, and the withdrawal when the feeder leaves
    /// (`tests/bench/transit.sh`).
    Transit(transit::TransitArgs),
}

#[path = "bgp_loadgen_scale.rs"]
mod scale;
#[path = "bgp_loadgen_transit.rs"]
mod transit;

#[derive(Args)]
struct Common {
    /// The speaker under test (`ADDR:PORT`), or `sink` for the generator's own time.
    #[arg(long)]
    target: String,
    /// Our AS and the speaker's (iBGP throughout).
    #[arg(long, default_value_t = 65000)]
    asn: u32,
    /// Source address of the first session; the others count up from it.
    #[arg(long, default_value = "127.1.0.1")]
    source_base: Ipv4Addr,
    /// Hold time offered in our OPEN (seconds).
    #[arg(long, default_value_t = 90)]
    hold_time: u16,
    /// Name of the implementation in the JSON lines.
    #[arg(long = "impl", default_value = "starling")]
    imp: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// The speaker's process: its CPU time (user + system) from the first
    /// UPDATE to the end is reported too, a figure other work on a shared
    /// machine disturbs less than wall time.
    #[arg(long)]
    daemon_pid: Option<u32>,
    /// Give up if the sessions are not all Established after this many seconds.
    #[arg(long, default_value_t = 60)]
    connect_timeout: u64,
}

#[derive(Args)]
struct IngestArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 10)]
    peers: usize,
    /// Prefixes per peer, disjoint between peers.
    #[arg(long, default_value_t = 100_000)]
    prefixes: usize,
    /// Prefix length of the generated prefixes (16..=32).
    #[arg(long, default_value_t = 24)]
    prefix_len: u8,
    /// Prefixes per distinct attribute set (AS_PATH); 0: one set per peer.
    #[arg(long, default_value_t = 0)]
    prefixes_per_set: usize,
    /// How to tell that every prefix arrived: `starling:SOCKET`, `bird:SOCKET`,
    /// or nothing with `--target sink`.
    #[arg(long)]
    watch: Option<String>,
    /// Poll interval of the watch, milliseconds.
    #[arg(long, default_value_t = 10)]
    poll_ms: u64,
    /// eBGP: peer `p` is in AS 64600 + p (the first AS of its paths) and
    /// `--asn` is the speaker's; without it every session is iBGP in `--asn`.
    #[arg(long)]
    ebgp: bool,
    /// Keep the sessions (and so their routes) up after the figures until
    /// this file exists (or `--timeout`), for a caller that measures
    /// something else meanwhile (`agent-scale.sh` counts the routes in the
    /// agent's kernel and creates the file when they are all there).
    #[arg(long)]
    hold_until: Option<PathBuf>,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 500)]
    clients: usize,
}

#[derive(Args)]
struct FlapArgs {
    #[command(flatten)]
    common: Common,
    /// Announcements of the flapping prefix, each with the next MED.
    #[arg(long, default_value_t = 1_000_000)]
    flaps: u32,
    /// Rounds of `flaps` on the same session and daemon.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// starling-bgpd's control socket, for its summary.
    #[arg(long)]
    socket: PathBuf,
}

const BENCH_INGEST: &str = "bgp-ingest";
const BENCH_FLAP: &str = "bgp-flap";
const BENCH_FANOUT: &str = "rr-fanout";

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Two workers: the machine's core count; the generator must not need more.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Ingest(a) => ingest(&rt, a),
        Cmd::Fanout(a) => fanout(&rt, a),
        Cmd::Flap(a) => flap(&rt, a),
        Cmd::Scale(a) => scale::run(&rt, a),
        Cmd::Transit(a) => transit::run(&rt, a),
    }
}

/// The `n`-th source address from `base`, skipping .0 and .255 so no address
/// looks like a network or broadcast address to a daemon.
fn source_addr(base: Ipv4Addr, n: usize) -> Result<Ipv4Addr> {
    let mut a = u32::from(base);
    let mut left = n;
    loop {
        let last = a & 0xff;
        if last != 0 && last != 255 {
            if left == 0 {
                break;
            }
            left -= 1;
        }
        a = a.checked_add(1).context("source addresses overflow")?;
    }
    let addr = Ipv4Addr::from(a);
    // A base on loopback must stay there (all of 127/8 is local); any other
    // base is addresses the caller put on an interface.
    if base.octets()[0] == 127 && addr.octets()[0] != 127 {
        bail!("source address {addr} left 127.0.0.0/8; use a lower --source-base");
    }
    Ok(addr)
}

fn resolve_target(t: &str) -> Result<SocketAddr> {
    t.parse()
        .with_context(|| format!("--target {t}: expected ADDR:PORT or `sink`"))
}

// ------------------------------------------------------------------ sessions

/// An Established session: the socket halves and the bytes already read past
/// the peer's KEEPALIVE.
struct Session {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    pending: Vec<u8>,
    four_octet: bool,
    /// The speaker offered graceful restart (RFC 4724) in its OPEN.
    peer_gr: bool,
}

/// How many OPEN exchanges are in flight at once. BIRD listens with a short
/// backlog: hundreds of simultaneous connects overflow it, and a connection
/// whose final ACK the kernel dropped looks open to us but never reaches the
/// daemon. Real peers do not all arrive in the same millisecond either.
const HANDSHAKES_IN_FLIGHT: usize = 16;
/// An attempt that got no OPEN in this long is abandoned and retried.
const HANDSHAKE_ATTEMPT: Duration = Duration::from_secs(5);

/// Establish one session per source address, retrying each until `deadline`.
async fn establish_all(
    sources: &[Ipv4Addr],
    target: SocketAddr,
    asn: u32,
    hold_time: u16,
    deadline: Instant,
) -> Result<Vec<Session>> {
    establish_all_gr(sources, target, asn, hold_time, false, deadline).await
}

/// `establish_all`, offering graceful restart in our OPENs when `gr`.
async fn establish_all_gr(
    sources: &[Ipv4Addr],
    target: SocketAddr,
    asn: u32,
    hold_time: u16,
    gr: bool,
    deadline: Instant,
) -> Result<Vec<Session>> {
    let each: Vec<(Ipv4Addr, u32)> = sources.iter().map(|s| (*s, asn)).collect();
    establish_each(&each, target, asn, hold_time, gr, deadline).await
}

/// Establish one session per `(source address, our AS)` with a speaker of
/// AS `peer_asn` (eBGP where the two differ), retrying each until `deadline`.
async fn establish_each(
    sources: &[(Ipv4Addr, u32)],
    target: SocketAddr,
    peer_asn: u32,
    hold_time: u16,
    gr: bool,
    deadline: Instant,
) -> Result<Vec<Session>> {
    let permits = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT));
    let mut tasks = Vec::new();
    for (src, asn) in sources.iter().copied() {
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let ases = (asn, peer_asn);
            loop {
                let attempt = (Instant::now() + HANDSHAKE_ATTEMPT).min(deadline);
                match try_establish(src, target, ases, hold_time, gr, attempt).await {
                    Ok(s) => return Ok(s),
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Connect from `src` (AS `asn`) to `target` (AS `peer_asn`), exchange OPEN
/// and KEEPALIVE, and return
/// once the speaker's KEEPALIVE has arrived. Refused connections are retried
/// until `deadline` (a speaker with hundreds of peers may accept slowly).
async fn try_establish(
    src: Ipv4Addr,
    target: SocketAddr,
    (asn, peer_asn): (u32, u32),
    hold_time: u16,
    gr: bool,
    deadline: Instant,
) -> Result<Session> {
    let stream = loop {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(IpAddr::V4(src), 0))
            .with_context(|| format!("bind {src}"))?;
        match sock.connect(target).await {
            Ok(s) => break s,
            // Not listening yet (the daemon is still starting): try again.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("{src}: connect to {target}")),
        }
    };
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let open = wire::build_open(&OpenParams {
        asn,
        hold_time,
        router_id: src,
        families: vec![Family::Ipv4],
        graceful_restart: gr.then_some(wire::GracefulRestart {
            restart_time: 120,
            restarting: false,
            forwarding: false,
        }),
        extended_message: false,
    });
    wr.write_all(&wire::encode(&open)).await?;
    let mut buf = Vec::with_capacity(1 << 16);
    let mut ctx = wire::parsing_context(true);
    let mut four_octet = true;
    let mut peer_gr = false;
    let mut got_open = false;
    loop {
        let Some(len) =
            wire::frame(&buf, MAX_MESSAGE_LEN).map_err(|n| anyhow!("{src}: {}", n.reason))?
        else {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, read_more(&mut rd, &mut buf))
                .await
                .map_err(|_| anyhow!("{src}: no OPEN/KEEPALIVE from {target} in time"))??;
            if n == 0 {
                bail!("{src}: {target} closed the connection during the OPEN exchange");
            }
            continue;
        };
        let msg: Vec<u8> = buf.drain(..len).collect();
        match wire::decode(&msg, &mut ctx) {
            Ok((BgpMessage::Open(o), _)) => {
                let peer = wire::check_open(&o, peer_asn, src, asn == peer_asn)
                    .map_err(|n| anyhow!("{src}: bad OPEN from {target}: {}", n.reason))?;
                four_octet = peer.four_octet;
                peer_gr = peer.graceful_restart.is_some();
                wr.write_all(&wire::keepalive()).await?;
                got_open = true;
            }
            Ok((BgpMessage::KeepAlive, _)) if got_open => {
                return Ok(Session {
                    rd,
                    wr,
                    pending: buf,
                    four_octet,
                    peer_gr,
                });
            }
            Ok((BgpMessage::Notification(n), _)) => {
                bail!("{src}: {target} sent {}", wire::describe_notification(&n))
            }
            Ok(_) => {}
            Err(n) => bail!("{src}: cannot decode a message from {target}: {}", n.reason),
        }
    }
}

async fn read_more(rd: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    // Appends into spare capacity: no zero-filling per read, which with
    // hundreds of sessions receiving small UPDATEs was most of our CPU time.
    buf.reserve(16384);
    rd.read_buf(buf).await
}

/// Read and frame everything the speaker sends until `stop`, handing each
/// UPDATE to `on_update`. A NOTIFICATION or a closed connection is an error
/// (the benchmark is void), reported through `errors`.
async fn read_loop<F>(
    mut s_rd: OwnedReadHalf,
    mut buf: Vec<u8>,
    src: Ipv4Addr,
    four_octet: bool,
    stop: Arc<AtomicBool>,
    errors: mpsc::UnboundedSender<String>,
    mut on_update: F,
) where
    F: FnMut(wire::Update),
{
    let mut ctx = wire::parsing_context(four_octet);
    loop {
        // Consumed bytes are dropped once per read, not once per message.
        let mut at = 0;
        loop {
            match wire::frame(&buf[at..], MAX_MESSAGE_LEN) {
                Ok(Some(len)) => {
                    match wire::decode(&buf[at..at + len], &mut ctx) {
                        Ok((BgpMessage::Update(u), ignored)) => {
                            match wire::decode_update(&u, &ignored, four_octet, false) {
                                Ok(upd) => on_update(upd),
                                Err(n) => {
                                    let _ = errors.send(format!("{src}: bad UPDATE: {}", n.reason));
                                    return;
                                }
                            }
                        }
                        Ok((BgpMessage::Notification(n), _)) => {
                            if !stop.load(Ordering::Relaxed) {
                                let _ = errors.send(format!(
                                    "{src}: the speaker sent {}",
                                    wire::describe_notification(&n)
                                ));
                            }
                            return;
                        }
                        Ok(_) => {}
                        Err(n) => {
                            let _ = errors.send(format!("{src}: cannot decode: {}", n.reason));
                            return;
                        }
                    }
                    at += len;
                }
                Ok(None) => break,
                Err(n) => {
                    let _ = errors.send(format!("{src}: bad framing: {}", n.reason));
                    return;
                }
            }
        }
        buf.drain(..at);
        match read_more(&mut s_rd, &mut buf).await {
            Ok(0) | Err(_) => {
                if !stop.load(Ordering::Relaxed) {
                    let _ = errors.send(format!("{src}: the speaker closed the session"));
                }
                return;
            }
            Ok(_) => {}
        }
    }
}

/// Write `blob` once `go` turns true, note when the kernel has taken its last
/// byte, then keep the session alive with KEEPALIVEs until `stop`, and close
/// it with a Cease so the speaker does not wait for a hold timer.
#[allow(clippy::too_many_arguments)]
async fn write_loop(
    mut wr: OwnedWriteHalf,
    blob: Arc<Vec<u8>>,
    mut go: watch::Receiver<bool>,
    hold_time: u16,
    stop: Arc<AtomicBool>,
    epoch: Instant,
    written_at: Arc<AtomicU64>,
    errors: mpsc::UnboundedSender<String>,
    src: Ipv4Addr,
) {
    if go.wait_for(|g| *g).await.is_err() {
        return;
    }
    if let Err(e) = wr.write_all(&blob).await {
        let _ = errors.send(format!("{src}: write failed: {e}"));
        return;
    }
    written_at.fetch_max(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
    let every = Duration::from_secs(u64::from(hold_time.max(3) / 3));
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Short steps, so that a finished run exits promptly.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if last.elapsed() >= every {
            if wr.write_all(&wire::keepalive()).await.is_err() {
                return;
            }
            last = Instant::now();
        }
    }
    let bye = wire::Notify::admin_shutdown("benchmark done").to_message();
    let _ = wr.write_all(&wire::encode(&bye)).await;
}

// -------------------------------------------------------------------- sink

/// A BGP listener that completes the OPEN exchange and then only frames what
/// arrives, counting End-of-RIB markers: the cheapest possible receiver.
async fn sink(
    listener: TcpListener,
    asn: u32,
    eors: Arc<AtomicUsize>,
    done: Arc<Notify>,
    want: usize,
    epoch: Instant,
    done_at: Arc<AtomicU64>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let eors = eors.clone();
        let done = done.clone();
        let done_at = done_at.clone();
        tokio::spawn(async move {
            let (mut rd, mut wr) = stream.into_split();
            let open = wire::build_open(&OpenParams {
                asn,
                hold_time: 90,
                router_id: Ipv4Addr::new(192, 0, 2, 254),
                families: vec![Family::Ipv4],
                graceful_restart: None,
                extended_message: false,
            });
            if wr.write_all(&wire::encode(&open)).await.is_err()
                || wr.write_all(&wire::keepalive()).await.is_err()
            {
                return;
            }
            let mut buf = Vec::with_capacity(1 << 17);
            loop {
                let mut at = 0;
                while let Ok(Some(len)) = wire::frame(&buf[at..], MAX_MESSAGE_LEN) {
                    // An IPv4 End-of-RIB is the empty UPDATE: header only plus two zero lengths.
                    if len == 23
                        && buf[at + 18] == 2
                        && eors.fetch_add(1, Ordering::SeqCst) + 1 == want
                    {
                        done_at.store(epoch.elapsed().as_micros() as u64, Ordering::SeqCst);
                        done.notify_one();
                    }
                    at += len;
                }
                buf.drain(..at);
                match read_more(&mut rd, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
    }
}

// ------------------------------------------------------------------ ingest

/// Prefix number `k` of the whole load: consecutive prefixes of `len`
/// starting at 10.0.0.0 (with /28, 10.0.0.0/8 holds 1,048,576 of them).
fn nth_prefix(k: usize, len: u8) -> Result<IpNet> {
    let step = 1u64 << (32 - u32::from(len));
    let addr = 0x0a00_0000u64 + k as u64 * step;
    if addr + step > 1 << 32 {
        bail!("prefix number {k} of length /{len} does not fit in IPv4");
    }
    Ok(IpNet::V4(Ipv4Net::new(Ipv4Addr::from(addr as u32), len)?))
}

/// The UPDATEs of peer `p`, concatenated, End-of-RIB last.
fn encode_peer_load(a: &IngestArgs, p: usize, next_hop: Ipv4Addr) -> Result<Vec<u8>> {
    let per_set = if a.prefixes_per_set == 0 {
        a.prefixes
    } else {
        a.prefixes_per_set
    };
    let mut blob = Vec::new();
    let mut k = 0;
    let mut set = 0u32;
    while k < a.prefixes {
        let n = per_set.min(a.prefixes - k);
        let prefixes = (k..k + n)
            .map(|i| nth_prefix(p * a.prefixes + i, a.prefix_len))
            .collect::<Result<Vec<_>>>()?;
        // Distinct sets differ in AS_PATH, the way a full table's do.
        let attrs = PathAttrs {
            origin: Origin::Igp,
            as_path: vec![AsSegment {
                kind: SegmentKind::Sequence,
                asns: vec![64_600 + p as u32, 4_200_000_000 + set],
            }],
            next_hop: Some(IpAddr::V4(next_hop)),
            local_pref: Some(100),
            communities: vec![(65000 << 16) | 100],
            ..PathAttrs::default()
        };
        for u in wire::encode_announce(
            Family::Ipv4,
            &prefixes,
            &attrs,
            true,
            !a.ebgp,
            MAX_MESSAGE_LEN,
        ) {
            blob.extend_from_slice(&u);
        }
        k += n;
        set += 1;
    }
    blob.extend_from_slice(&wire::encode_end_of_rib(Family::Ipv4));
    Ok(blob)
}

/// The speaker's own count of prefixes in its Loc-RIB, over one persistent
/// control connection (no process spawned per poll).
enum Watch {
    /// `starling-bgpd`'s control socket: `{"cmd":"summary"}` -> loc_rib_prefixes.
    Starling(BufReader<UnixStream>),
    /// BIRD's control socket: the sum of every protocol's "imported" counter
    /// in `show protocols all`, which BIRD updates as it puts a route in its
    /// table (constant cost, unlike walking the table for `show route count`).
    Bird(BufReader<UnixStream>),
}

impl Watch {
    fn open(spec: &str) -> Result<Watch> {
        let (kind, path) = spec
            .split_once(':')
            .with_context(|| format!("--watch {spec}: expected starling:SOCKET or bird:SOCKET"))?;
        let path = PathBuf::from(path);
        let s = UnixStream::connect(&path)
            .with_context(|| format!("cannot connect to {}", path.display()))?;
        let mut r = BufReader::new(s);
        match kind {
            "starling" => Ok(Watch::Starling(r)),
            "bird" => {
                bird_reply(&mut r).context("BIRD's greeting")?;
                Ok(Watch::Bird(r))
            }
            _ => bail!("--watch {spec}: unknown kind {kind}; use starling or bird"),
        }
    }

    fn count(&mut self) -> Result<u64> {
        match self {
            Watch::Starling(r) => {
                r.get_mut().write_all(b"{\"cmd\":\"summary\"}\n")?;
                let mut line = String::new();
                r.read_line(&mut line)?;
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("bad summary reply: {line}"))?;
                v["summary"]["loc_rib_prefixes"]
                    .as_u64()
                    .with_context(|| format!("no summary.loc_rib_prefixes in {line}"))
            }
            Watch::Bird(r) => {
                r.get_mut().write_all(b"show protocols all\n")?;
                let text = bird_reply(r)?;
                Ok(bird_imported(&text))
            }
        }
    }

    /// The final figure's cross-check: BIRD's table walk, once.
    fn bird_route_count(&mut self) -> Result<Option<u64>> {
        let Watch::Bird(r) = self else {
            return Ok(None);
        };
        r.get_mut().write_all(b"show route count\n")?;
        let text = bird_reply(r)?;
        // "1000000 of 1000000 routes for 1000000 networks in table master4"
        let n = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[1] == "networks")
            .and_then(|w| w[0].parse().ok());
        Ok(n)
    }
}

/// Read one reply of BIRD's control protocol: lines `NNNN-text` or ` text`
/// continue it, `NNNN text` ends it. Codes 8xxx and 9xxx are errors.
fn bird_reply(r: &mut BufReader<UnixStream>) -> Result<String> {
    let mut out = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("BIRD closed its control socket");
        }
        let b = line.as_bytes();
        let coded = b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit);
        if coded && (b[0] == b'8' || b[0] == b'9') {
            bail!("BIRD: {}", line.trim_end());
        }
        if coded {
            out.push_str(&line[5..]);
        } else {
            out.push_str(line.get(1..).unwrap_or(""));
        }
        if coded && b[4] == b' ' {
            return Ok(out);
        }
    }
}

/// Sum of "Routes: N imported" over the protocols in `show protocols all`.
fn bird_imported(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("Routes:"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// User + system CPU time of a process so far, in ms.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} (--daemon-pid) is gone"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/PID/stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 * 1000.0 / hz)
}

fn ms(us: u64) -> f64 {
    (us as f64 / 100.0).round() / 10.0
}

fn ingest(rt: &tokio::runtime::Runtime, a: IngestArgs) -> Result<()> {
    let c = &a.common;
    if !(16..=32).contains(&a.prefix_len) {
        bail!("--prefix-len {} must be 16..=32", a.prefix_len);
    }
    nth_prefix(a.peers * a.prefixes - 1, a.prefix_len).context(
        "--peers × --prefixes does not fit the address space; use a longer --prefix-len",
    )?;
    let total = (a.peers * a.prefixes) as u64;
    let sources = (0..a.peers)
        .map(|i| source_addr(c.source_base, i))
        .collect::<Result<Vec<_>>>()?;
    // Encode everything before the first connection.
    let t = Instant::now();
    let blobs: Vec<Arc<Vec<u8>>> = sources
        .iter()
        .enumerate()
        .map(|(p, src)| encode_peer_load(&a, p, *src).map(Arc::new))
        .collect::<Result<_>>()?;
    let bytes: usize = blobs.iter().map(|b| b.len()).sum();
    eprintln!(
        "bgp-loadgen: {total} prefixes from {} peers encoded in {:?}: {bytes} octets",
        a.peers,
        t.elapsed()
    );

    let epoch = Instant::now();
    let sink_done = Arc::new(Notify::new());
    let sink_done_at = Arc::new(AtomicU64::new(0));
    let is_sink = c.target == "sink";
    let target = if is_sink {
        let l = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = l.local_addr()?;
        rt.spawn(sink(
            l,
            c.asn,
            Arc::new(AtomicUsize::new(0)),
            sink_done.clone(),
            a.peers,
            epoch,
            sink_done_at.clone(),
        ));
        addr
    } else {
        resolve_target(&c.target)?
    };
    let mut watch = match (&a.watch, is_sink) {
        (Some(w), false) => Some(Watch::open(w)?),
        (None, true) => None,
        (None, false) => bail!("--watch is required unless --target sink"),
        (Some(_), true) => bail!("--watch makes no sense with --target sink"),
    };

    let connect_deadline = Instant::now() + Duration::from_secs(c.connect_timeout);
    let ases: Vec<(Ipv4Addr, u32)> = sources
        .iter()
        .enumerate()
        .map(|(p, src)| (*src, if a.ebgp { 64_600 + p as u32 } else { c.asn }))
        .collect();
    let sessions = rt.block_on(establish_each(
        &ases,
        target,
        c.asn,
        c.hold_time,
        false,
        connect_deadline,
    ))?;
    eprintln!(
        "bgp-loadgen: {} sessions Established with {target}",
        sessions.len()
    );
    let deadline = Instant::now() + Duration::from_secs(c.timeout);

    let (go, go_rx) = watch::channel(false);
    let stop = Arc::new(AtomicBool::new(false));
    let written_at = Arc::new(AtomicU64::new(0));
    let (err_tx, mut err_rx) = mpsc::unbounded_channel();
    let mut writers = Vec::new();
    for ((s, blob), src) in sessions.into_iter().zip(&blobs).zip(&sources) {
        rt.spawn(read_loop(
            s.rd,
            s.pending,
            *src,
            s.four_octet,
            stop.clone(),
            err_tx.clone(),
            |_| {},
        ));
        writers.push(rt.spawn(write_loop(
            s.wr,
            blob.clone(),
            go_rx.clone(),
            c.hold_time,
            stop.clone(),
            epoch,
            written_at.clone(),
            err_tx.clone(),
            *src,
        )));
    }
    let base = match &mut watch {
        Some(w) => w.count()?,
        None => 0,
    };
    let cpu0 = c.daemon_pid.map(cpu_ms).transpose()?;
    let own_cpu0 = cpu_ms(std::process::id())?;
    let started = epoch.elapsed().as_micros() as u64;
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_micros() as f64 / 1000.0);
    go.send_replace(true);

    let finished = match &mut watch {
        None => {
            rt.block_on(async {
                tokio::time::timeout(
                    deadline.saturating_duration_since(Instant::now()),
                    sink_done.notified(),
                )
                .await
            })
            .map_err(|_| anyhow!("the sink did not receive every End-of-RIB in time"))?;
            sink_done_at.load(Ordering::SeqCst)
        }
        Some(w) => loop {
            if let Ok(e) = err_rx.try_recv() {
                bail!("{e}");
            }
            let n = w.count()?.saturating_sub(base);
            if n >= total {
                break epoch.elapsed().as_micros() as u64;
            }
            if Instant::now() > deadline {
                bail!("timed out with {n} of {total} prefixes in the Loc-RIB");
            }
            std::thread::sleep(Duration::from_millis(a.poll_ms));
        },
    };
    let cpu = match (c.daemon_pid, cpu0) {
        (Some(pid), Some(before)) => Some(cpu_ms(pid)? - before),
        _ => None,
    };
    let own_cpu = cpu_ms(std::process::id())? - own_cpu0;
    let elapsed = finished.saturating_sub(started);
    let write_done = written_at.load(Ordering::SeqCst).saturating_sub(started);
    if let Some(w) = &mut watch
        && let Some(n) = w.bird_route_count()?
        && n < total
    {
        bail!("BIRD's import counters reached {total} but `show route count` says {n} networks");
    }
    if !is_sink {
        // Wall-clock time of the first UPDATE, for a caller timing the
        // routes' arrival somewhere else (the agent's kernel).
        bench_line(
            BENCH_INGEST,
            "loadgen",
            "first_update_unix",
            started_unix.round(),
            "ms",
        );
    }
    if let Some(f) = &a.hold_until {
        while !f.exists() {
            if let Ok(e) = err_rx.try_recv() {
                bail!("holding the routes: {e}");
            }
            if Instant::now() > deadline {
                bail!("{} did not appear in time", f.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    stop.store(true, Ordering::SeqCst);
    if is_sink {
        bench_line(BENCH_INGEST, "loadgen", "time_into_sink", ms(elapsed), "ms");
        bench_line(
            BENCH_INGEST,
            "loadgen",
            "cpu_time_into_sink",
            own_cpu.round(),
            "ms",
        );
        bench_line(
            BENCH_INGEST,
            "loadgen",
            "prefixes_per_sec_into_sink",
            (total as f64 / (elapsed.max(1) as f64 / 1e6)).round(),
            "prefixes/s",
        );
    } else {
        bench_line(BENCH_INGEST, &c.imp, "time_to_loc_rib", ms(elapsed), "ms");
        if let Some(cpu) = cpu {
            bench_line(BENCH_INGEST, &c.imp, "cpu_time", cpu.round(), "ms");
        }
        bench_line(
            BENCH_INGEST,
            &c.imp,
            "prefixes_per_sec",
            (total as f64 / (elapsed.max(1) as f64 / 1e6)).round(),
            "prefixes/s",
        );
        bench_line(
            BENCH_INGEST,
            "loadgen",
            &format!("write_done_into_{}", c.imp),
            ms(write_done),
            "ms",
        );
        bench_line(
            BENCH_INGEST,
            "loadgen",
            &format!("cpu_time_during_{}", c.imp),
            own_cpu.round(),
            "ms",
        );
    }
    rt.block_on(async {
        for w in writers {
            let _ = tokio::time::timeout(Duration::from_secs(3), w).await;
        }
    });
    Ok(())
}

// ------------------------------------------------------------------ fan-out

/// Client `i`'s /26: 10.0.0.0 + 64·i.
fn client_prefix(i: usize) -> Result<IpNet> {
    nth_prefix(i, 26)
}

fn fanout(rt: &tokio::runtime::Runtime, a: FanoutArgs) -> Result<()> {
    let c = &a.common;
    if a.clients < 2 {
        bail!("--clients must be at least 2");
    }
    let target = resolve_target(&c.target)?;
    let sources = (0..a.clients)
        .map(|i| source_addr(c.source_base, i))
        .collect::<Result<Vec<_>>>()?;
    let blobs = sources
        .iter()
        .enumerate()
        .map(|(i, src)| {
            let attrs = PathAttrs {
                origin: Origin::Igp,
                next_hop: Some(IpAddr::V4(*src)),
                local_pref: Some(100),
                ..PathAttrs::default()
            };
            let mut blob = Vec::new();
            for u in wire::encode_announce(
                Family::Ipv4,
                &[client_prefix(i)?],
                &attrs,
                true,
                true,
                MAX_MESSAGE_LEN,
            ) {
                blob.extend_from_slice(&u);
            }
            blob.extend_from_slice(&wire::encode_end_of_rib(Family::Ipv4));
            Ok(Arc::new(blob))
        })
        .collect::<Result<Vec<_>>>()?;

    let connect_deadline = Instant::now() + Duration::from_secs(c.connect_timeout);
    let t = Instant::now();
    let sessions = rt.block_on(establish_all(
        &sources,
        target,
        c.asn,
        c.hold_time,
        connect_deadline,
    ))?;
    eprintln!(
        "bgp-loadgen: {} clients Established with {target} in {:?}",
        sessions.len(),
        t.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(c.timeout);

    let epoch = Instant::now();
    let (go, go_rx) = watch::channel(false);
    let stop = Arc::new(AtomicBool::new(false));
    let written_at = Arc::new(AtomicU64::new(0));
    let complete = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    // Per client: when it came to hold every other client's prefix (µs since epoch).
    let done_at: Arc<Vec<AtomicU64>> =
        Arc::new((0..a.clients).map(|_| AtomicU64::new(0)).collect());
    let (err_tx, mut err_rx) = mpsc::unbounded_channel();
    let mut writers = Vec::new();
    let n_clients = a.clients;
    // What the reflector sent, in total: UPDATE messages and announced prefixes.
    let updates_in = Arc::new(AtomicU64::new(0));
    let prefixes_in = Arc::new(AtomicU64::new(0));
    for (i, ((s, blob), src)) in sessions.into_iter().zip(&blobs).zip(&sources).enumerate() {
        let mut seen = vec![false; n_clients];
        let mut have = 0usize;
        let complete = complete.clone();
        let all_done = all_done.clone();
        let done_at = done_at.clone();
        let updates_in = updates_in.clone();
        let prefixes_in = prefixes_in.clone();
        let on_update = move |u: wire::Update| {
            updates_in.fetch_add(1, Ordering::Relaxed);
            prefixes_in.fetch_add(u.announced.len() as u64, Ordering::Relaxed);
            for p in u.withdrawn {
                if let Some(j) = client_index(&p, n_clients)
                    && j != i
                    && std::mem::replace(&mut seen[j], false)
                {
                    have -= 1;
                }
            }
            for p in u.announced {
                if let Some(j) = client_index(&p, n_clients)
                    && j != i
                    && !std::mem::replace(&mut seen[j], true)
                {
                    have += 1;
                    if have == n_clients - 1 && done_at[i].load(Ordering::Relaxed) == 0 {
                        done_at[i].store(epoch.elapsed().as_micros() as u64, Ordering::SeqCst);
                        if complete.fetch_add(1, Ordering::SeqCst) + 1 == n_clients {
                            all_done.notify_one();
                        }
                    }
                }
            }
        };
        rt.spawn(read_loop(
            s.rd,
            s.pending,
            *src,
            s.four_octet,
            stop.clone(),
            err_tx.clone(),
            on_update,
        ));
        writers.push(rt.spawn(write_loop(
            s.wr,
            blob.clone(),
            go_rx.clone(),
            c.hold_time,
            stop.clone(),
            epoch,
            written_at.clone(),
            err_tx.clone(),
            *src,
        )));
    }
    let cpu0 = c.daemon_pid.map(cpu_ms).transpose()?;
    let own_cpu0 = cpu_ms(std::process::id())?;
    let started = epoch.elapsed().as_micros() as u64;
    go.send_replace(true);
    let outcome = rt.block_on(async {
        tokio::select! {
            _ = all_done.notified() => Ok(()),
            Some(e) = err_rx.recv() => Err(anyhow!("{e}")),
            _ = tokio::time::sleep(deadline.saturating_duration_since(Instant::now())) => {
                Err(anyhow!(
                    "timed out: {} of {} clients hold every route",
                    complete.load(Ordering::SeqCst),
                    n_clients
                ))
            }
        }
    });
    let cpu = match (c.daemon_pid, cpu0) {
        (Some(pid), Some(before)) => Some(cpu_ms(pid)? - before),
        _ => None,
    };
    let own_cpu = cpu_ms(std::process::id())? - own_cpu0;
    stop.store(true, Ordering::SeqCst);
    outcome?;
    let mut times: Vec<u64> = done_at
        .iter()
        .map(|t| t.load(Ordering::SeqCst).saturating_sub(started))
        .collect();
    times.sort_unstable();
    bench_line(
        BENCH_FANOUT,
        &c.imp,
        "time_all_clients_complete",
        ms(times[times.len() - 1]),
        "ms",
    );
    bench_line(
        BENCH_FANOUT,
        &c.imp,
        "time_median_client_complete",
        ms(times[times.len() / 2]),
        "ms",
    );
    bench_line(
        BENCH_FANOUT,
        &c.imp,
        "time_first_client_complete",
        ms(times[0]),
        "ms",
    );
    if let Some(cpu) = cpu {
        bench_line(BENCH_FANOUT, &c.imp, "cpu_time", cpu.round(), "ms");
    }
    bench_line(
        BENCH_FANOUT,
        "loadgen",
        &format!("write_done_into_{}", c.imp),
        ms(written_at.load(Ordering::SeqCst).saturating_sub(started)),
        "ms",
    );
    bench_line(
        BENCH_FANOUT,
        &c.imp,
        "updates_sent",
        updates_in.load(Ordering::SeqCst) as f64,
        "messages",
    );
    bench_line(
        BENCH_FANOUT,
        &c.imp,
        "prefixes_sent",
        prefixes_in.load(Ordering::SeqCst) as f64,
        "prefixes",
    );
    // Decoding 250,000 reflected UPDATEs is the generator's share of the work.
    bench_line(
        BENCH_FANOUT,
        "loadgen",
        &format!("cpu_time_during_{}", c.imp),
        own_cpu.round(),
        "ms",
    );
    rt.block_on(async {
        for w in writers {
            let _ = tokio::time::timeout(Duration::from_secs(3), w).await;
        }
    });
    Ok(())
}

/// Which client announced `p`, if any.
fn client_index(p: &IpNet, clients: usize) -> Option<usize> {
    let IpNet::V4(n) = p else { return None };
    if n.prefix_len() != 26 {
        return None;
    }
    let off = u32::from(n.network()).checked_sub(0x0a00_0000)? as usize / 64;
    (off < clients).then_some(off)
}

/// `starling-bgpd`'s summary over its control socket.
fn bgpd_summary(socket: &std::path::Path) -> Result<serde_json::Value> {
    let s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let mut r = BufReader::new(s);
    r.get_mut().write_all(b"{\"cmd\":\"summary\"}\n")?;
    let mut line = String::new();
    r.read_line(&mut line)?;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("bad summary reply: {line}"))?;
    Ok(v["summary"].clone())
}

/// A `/proc/PID/status` field in MiB (`VmRSS`, `VmHWM`).
fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .with_context(|| format!("no {field} for process {pid}"))
}

/// 10.0.0.0/24 announced `flaps` times, MED 1, 2, 3, ...: every UPDATE
/// makes a new attribute set and drops the previous one. Then a marker
/// prefix (10.0.1.0/24, 10.0.2.0/24, ... one per round) is announced on
/// the same session; the speaker handles a session's UPDATEs in order, so
/// once its Loc-RIB holds the marker every flap has been processed. Each
/// round prints the RSS and attribute-set count after it: a leak grows
/// them round after round, the high-water mark of the input backlog
/// (the generator writes faster than the speaker decides) does not.
fn flap(rt: &tokio::runtime::Runtime, a: FlapArgs) -> Result<()> {
    let c = &a.common;
    let pid = c
        .daemon_pid
        .context("--daemon-pid: the speaker's process, for its RSS")?;
    let target = resolve_target(&c.target)?;
    let deadline = Instant::now() + Duration::from_secs(c.timeout);
    let sets = |v: &serde_json::Value| {
        v["attribute_sets"]
            .as_f64()
            .context("no attribute_sets in the summary")
    };
    let line =
        |metric: &str, value: f64, unit: &str| bench_line(BENCH_FLAP, &c.imp, metric, value, unit);
    line("flaps_per_round", f64::from(a.flaps), "updates");
    line("rss_before", status_mib(pid, "VmRSS")?, "MiB");
    line(
        "attribute_sets_before",
        sets(&bgpd_summary(&a.socket)?)?,
        "sets",
    );
    rt.block_on(async {
        let connect = Instant::now() + Duration::from_secs(c.connect_timeout);
        let mut sessions =
            establish_all(&[c.source_base], target, c.asn, c.hold_time, connect).await?;
        let Session { mut rd, mut wr, .. } = sessions.pop().context("no session")?;
        // Whatever the speaker sends (KEEPALIVEs) is read and dropped.
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let flapping = nth_prefix(0, 24)?;
        let mut med = 0u32;
        for round in 1..=a.rounds {
            let started = Instant::now();
            let mut blob = Vec::with_capacity(1 << 20);
            for _ in 0..a.flaps {
                med = med.wrapping_add(1);
                let attrs = PathAttrs {
                    origin: Origin::Igp,
                    next_hop: Some(IpAddr::V4(c.source_base)),
                    local_pref: Some(100),
                    med: Some(med),
                    ..PathAttrs::default()
                };
                for u in wire::encode_announce(
                    Family::Ipv4,
                    &[flapping],
                    &attrs,
                    true,
                    true,
                    MAX_MESSAGE_LEN,
                ) {
                    blob.extend_from_slice(&u);
                }
                if blob.len() >= 1 << 20 {
                    wr.write_all(&blob).await?;
                    blob.clear();
                }
            }
            let attrs = PathAttrs {
                origin: Origin::Igp,
                next_hop: Some(IpAddr::V4(c.source_base)),
                ..PathAttrs::default()
            };
            let marker = nth_prefix(round as usize, 24)?;
            for u in
                wire::encode_announce(Family::Ipv4, &[marker], &attrs, true, true, MAX_MESSAGE_LEN)
            {
                blob.extend_from_slice(&u);
            }
            wr.write_all(&blob).await?;
            let want = 1 + u64::from(round);
            loop {
                let n = bgpd_summary(&a.socket)?["loc_rib_prefixes"]
                    .as_u64()
                    .unwrap_or(0);
                if n >= want {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "starling-bgpd did not process round {round} within {} s",
                        c.timeout
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let took = started.elapsed().as_secs_f64();
            line(&format!("round{round}_seconds"), took, "s");
            line(
                &format!("round{round}_flaps_per_sec"),
                f64::from(a.flaps) / took,
                "updates/s",
            );
            line(
                &format!("round{round}_rss_after"),
                status_mib(pid, "VmRSS")?,
                "MiB",
            );
            line(
                &format!("round{round}_attribute_sets_after"),
                sets(&bgpd_summary(&a.socket)?)?,
                "sets",
            );
        }
        drop(wr);
        anyhow::Ok(())
    })?;
    line("peak_rss", status_mib(pid, "VmHWM")?, "MiB");
    Ok(())
}
