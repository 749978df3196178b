//! `bgp-loadgen transit`: full-table transit through one speaker, the load
//! behind `tests/bench/transit.sh` (issue 16).
//!
//! One eBGP *feeder* (its own AS) sends a full table: `--prefixes` IPv4 /24s
//! from 10.0.0.0 in groups of `--prefixes-per-set` sharing one attribute set
//! (AS paths of 2 to 8 hops, a community), so a 1M-prefix table has 100,000
//! distinct sets, as the Internet's does. `--receivers` eBGP peers (each in
//! its own AS) read what the speaker re-advertises with a minimal IPv4 parser
//! into one bit per prefix. The phases, each timed until the last receiver
//! holds what it should:
//!
//! 1. load: every session Established, then the feeder writes its table and
//!    End-of-RIB; the clock stops when every receiver holds every prefix;
//! 2. churn (with `--churn-secs`): every second the feeder withdraws the
//!    next `--churn-percent` of the table and re-announces the slice it
//!    withdrew the second before (one flap = one prefix withdrawn and
//!    announced again); the speaker's CPU time and RSS are sampled once a
//!    second; then the last slice comes back and the clock runs until every
//!    receiver holds the whole table again;
//! 3. withdraw: the feeder closes its session with a Cease; the clock stops
//!    when every receiver holds nothing.
//!
//! The speaker's CPU time and peak RSS (`VmHWM`) and the generator's own CPU
//! time are printed for each phase.

use super::scale::{millis, prefixes, read_frames, update_fields};
use super::*;

#[derive(Args)]
pub struct TransitArgs {
    /// `--asn` is the speaker's AS here; the feeder and receivers are eBGP.
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1_000_000)]
    prefixes: usize,
    /// Prefixes per distinct attribute set.
    #[arg(long, default_value_t = 10)]
    prefixes_per_set: usize,
    #[arg(long, default_value_t = 10)]
    receivers: usize,
    #[arg(long, default_value_t = 65100)]
    feeder_asn: u32,
    /// Receiver `i` is in AS `--receiver-asn + i`.
    #[arg(long, default_value_t = 65201)]
    receiver_asn: u32,
    /// Seconds of churn between the load and the withdrawal (0: none).
    #[arg(long, default_value_t = 0)]
    churn_secs: usize,
    /// Share of the table flapped per second.
    #[arg(long, default_value_t = 1.0)]
    churn_percent: f64,
}

const BENCH_TRANSIT: &str = "bgp-transit";
const BENCH_CHURN: &str = "bgp-churn";
const BASE: u32 = 0x0a00_0000;

/// The attribute set of set number `s`: the feeder's AS then 1 to 7 more
/// hops (4-octet private ASes, distinct per set), a community.
fn set_attrs(s: usize, feeder_asn: u32, next_hop: Ipv4Addr) -> PathAttrs {
    let hops = 1 + s % 7;
    let mut asns = vec![feeder_asn];
    asns.extend((0..hops).map(|j| 4_200_000_000 + ((s + j * 7_777) % 1_000_000) as u32));
    PathAttrs {
        origin: Origin::Igp,
        as_path: vec![AsSegment {
            kind: SegmentKind::Sequence,
            asns,
        }],
        next_hop: Some(IpAddr::V4(next_hop)),
        communities: vec![(feeder_asn << 16) | (s % 100) as u32],
        ..PathAttrs::default()
    }
}

fn prefix(k: usize) -> IpNet {
    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(BASE + ((k as u32) << 8)), 24).expect("24 is valid"))
}

/// Announcements of prefixes `from..to` (set-aligned), with their sets' attributes.
fn announce(a: &TransitArgs, from: usize, to: usize, nh: Ipv4Addr, blob: &mut Vec<u8>) {
    let mut k = from;
    while k < to {
        let s = k / a.prefixes_per_set;
        let end = ((s + 1) * a.prefixes_per_set).min(to);
        let ps: Vec<IpNet> = (k..end).map(prefix).collect();
        let attrs = set_attrs(s, a.feeder_asn, nh);
        for u in wire::encode_announce(Family::Ipv4, &ps, &attrs, true, false, MAX_MESSAGE_LEN) {
            blob.extend_from_slice(&u);
        }
        k = end;
    }
}

fn withdraw(from: usize, to: usize, blob: &mut Vec<u8>) {
    let ps: Vec<IpNet> = (from..to).map(prefix).collect();
    for u in wire::encode_withdraw(Family::Ipv4, &ps, MAX_MESSAGE_LEN) {
        blob.extend_from_slice(&u);
    }
}

/// What one receiver holds: one bit per prefix of the table.
struct Held {
    bits: Vec<u64>,
    count: Arc<AtomicU64>,
    total: usize,
    updates: Arc<AtomicU64>,
}

impl Held {
    fn set(&mut self, addr: u32, len: u8, on: bool) -> Result<()> {
        let k = addr.wrapping_sub(BASE) as usize >> 8;
        if len != 24 || addr < BASE || k >= self.total {
            bail!(
                "the speaker sent {}/{len}, not in the table",
                Ipv4Addr::from(addr)
            );
        }
        let (w, m) = (k / 64, 1u64 << (k % 64));
        if (self.bits[w] & m != 0) != on {
            self.bits[w] ^= m;
            if on {
                self.count.fetch_add(1, Ordering::Relaxed);
            } else {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn apply(&mut self, msg: &[u8]) -> Result<()> {
        match msg[18] {
            2 => {
                let (withdrawn, nlri) = update_fields(msg)?;
                let mut bad = None;
                prefixes(withdrawn, |a, l| {
                    if let Err(e) = self.set(a, l, false) {
                        bad.get_or_insert(e);
                    }
                })?;
                prefixes(nlri, |a, l| {
                    if let Err(e) = self.set(a, l, true) {
                        bad.get_or_insert(e);
                    }
                })?;
                self.updates.fetch_add(1, Ordering::Relaxed);
                bad.map_or(Ok(()), Err)
            }
            3 => bail!("the speaker sent a NOTIFICATION"),
            _ => Ok(()),
        }
    }
}

enum Feed {
    Write(Vec<u8>),
    Leave,
}

/// The feeder's writer: blobs as they are handed over, KEEPALIVEs between
/// them, a Cease on `Leave`.
async fn feed(
    mut wr: OwnedWriteHalf,
    mut cmds: mpsc::UnboundedReceiver<Feed>,
    hold_time: u16,
    errors: mpsc::UnboundedSender<String>,
) {
    let every = Duration::from_secs(u64::from(hold_time.max(3) / 3));
    loop {
        let cmd = tokio::select! {
            c = cmds.recv() => c,
            _ = tokio::time::sleep(every) => {
                if wr.write_all(&wire::keepalive()).await.is_err() {
                    let _ = errors.send("feeder: keepalive write failed".into());
                    return;
                }
                continue;
            }
        };
        match cmd {
            Some(Feed::Write(b)) => {
                if let Err(e) = wr.write_all(&b).await {
                    let _ = errors.send(format!("feeder: write failed: {e}"));
                    return;
                }
            }
            Some(Feed::Leave) | None => {
                let bye = wire::Notify::admin_shutdown("feeder leaves").to_message();
                let _ = wr.write_all(&wire::encode(&bye)).await;
                return;
            }
        }
    }
}

struct Meter {
    pid: Option<u32>,
    cpu0: Option<f64>,
    own0: f64,
}

impl Meter {
    fn start(pid: Option<u32>) -> Result<Meter> {
        Ok(Meter {
            pid,
            cpu0: pid.map(cpu_ms).transpose()?,
            own0: cpu_ms(std::process::id())?,
        })
    }

    /// (speaker CPU ms, generator CPU ms) since `start`.
    fn read(&self) -> Result<(Option<f64>, f64)> {
        let cpu = match (self.pid, self.cpu0) {
            (Some(p), Some(c0)) => Some(cpu_ms(p)? - c0),
            _ => None,
        };
        Ok((cpu, cpu_ms(std::process::id())? - self.own0))
    }
}

struct Phase<'a> {
    counts: &'a [Arc<AtomicU64>],
    err_rx: &'a mut mpsc::UnboundedReceiver<String>,
    deadline: Instant,
}

impl Phase<'_> {
    /// Wait until every receiver holds `want` prefixes; the time it took.
    fn wait_all(&mut self, what: &str, want: u64) -> Result<Duration> {
        let t = Instant::now();
        loop {
            if self
                .counts
                .iter()
                .all(|c| c.load(Ordering::Relaxed) == want)
            {
                return Ok(t.elapsed());
            }
            if let Ok(e) = self.err_rx.try_recv() {
                bail!("{what}: {e}");
            }
            if Instant::now() > self.deadline {
                let have: Vec<u64> = self
                    .counts
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect();
                bail!("{what}: timed out; receivers hold {have:?}, want {want} each");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

pub fn run(rt: &tokio::runtime::Runtime, a: TransitArgs) -> Result<()> {
    let c = &a.common;
    if a.prefixes_per_set == 0 || !a.prefixes.is_multiple_of(a.prefixes_per_set) {
        bail!("--prefixes must be a multiple of --prefixes-per-set (> 0)");
    }
    if a.prefixes > 1 << 22 {
        bail!("--prefixes: at most 4,194,304 /24s fit above 10.0.0.0");
    }
    if a.receivers == 0 {
        bail!("--receivers must be at least 1");
    }
    let target = resolve_target(&c.target)?;
    let feeder = source_addr(c.source_base, 0)?;
    let t = Instant::now();
    let mut table = Vec::new();
    announce(&a, 0, a.prefixes, feeder, &mut table);
    table.extend_from_slice(&wire::encode_end_of_rib(Family::Ipv4));
    let churn = churn_blobs(&a, feeder);
    eprintln!(
        "bgp-loadgen: {} prefixes in {} attribute sets encoded in {:?}: {} octets",
        a.prefixes,
        a.prefixes / a.prefixes_per_set,
        t.elapsed(),
        table.len()
    );
    let mut peers = vec![(feeder, a.feeder_asn)];
    for i in 0..a.receivers {
        peers.push((
            source_addr(c.source_base, 1 + i)?,
            a.receiver_asn + i as u32,
        ));
    }
    let connect_deadline = Instant::now() + Duration::from_secs(c.connect_timeout);
    let mut sessions = rt.block_on(establish_each(
        &peers,
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
    let (err_tx, mut err_rx) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let updates = Arc::new(AtomicU64::new(0));
    let mut counts = Vec::new();
    let (_go, go_rx) = watch::channel(true);
    let written = Arc::new(AtomicU64::new(0));
    for (s, (src, _)) in sessions.drain(1..).zip(&peers[1..]) {
        let count = Arc::new(AtomicU64::new(0));
        counts.push(count.clone());
        let mut held = Held {
            bits: vec![0; a.prefixes.div_ceil(64)],
            count,
            total: a.prefixes,
            updates: updates.clone(),
        };
        rt.spawn(read_frames(
            s.rd,
            s.pending,
            format!("receiver {src}"),
            "speaker",
            stop.clone(),
            err_tx.clone(),
            move |m| held.apply(m),
        ));
        // Receivers send nothing but KEEPALIVEs (an empty blob), then a Cease.
        rt.spawn(write_loop(
            s.wr,
            Arc::new(Vec::new()),
            go_rx.clone(),
            c.hold_time,
            stop.clone(),
            Instant::now(),
            written.clone(),
            err_tx.clone(),
            *src,
        ));
    }
    let fs = sessions.pop().context("no feeder session")?;
    let (feed_tx, feed_rx) = mpsc::unbounded_channel();
    // The feeder's reads are only drained: the speaker sends it nothing it
    // must act on (its own routes are not sent back to it).
    rt.spawn(async move {
        let mut rd = fs.rd;
        let mut b = vec![0u8; 1 << 16];
        while matches!(rd.read(&mut b).await, Ok(n) if n > 0) {}
    });
    let feeder_task = rt.spawn(feed(fs.wr, feed_rx, c.hold_time, err_tx.clone()));
    let mut phase = Phase {
        counts: &counts,
        err_rx: &mut err_rx,
        deadline: Instant::now() + Duration::from_secs(c.timeout),
    };
    let line =
        |bench: &str, metric: &str, v: f64, unit: &str| bench_line(bench, &c.imp, metric, v, unit);
    let gen_line = |bench: &str, metric: &str, v: f64| {
        bench_line(
            bench,
            "loadgen",
            &format!("{metric}_{}", c.imp),
            v.round(),
            "ms",
        )
    };
    let hwm = |pid: Option<u32>| pid.map(|p| status_mib(p, "VmHWM")).transpose();

    // 1. load
    let m = Meter::start(c.daemon_pid)?;
    feed_tx
        .send(Feed::Write(table))
        .ok()
        .context("feeder gone")?;
    let took = phase.wait_all("load", a.prefixes as u64)?;
    let (cpu, own) = m.read()?;
    line(
        BENCH_TRANSIT,
        "time_all_receivers_hold_table",
        millis(took),
        "ms",
    );
    if let Some(cpu) = cpu {
        line(BENCH_TRANSIT, "cpu_time_load", cpu.round(), "ms");
    }
    if let Some(h) = hwm(c.daemon_pid)? {
        line(
            BENCH_TRANSIT,
            "peak_rss_after_load",
            (h * 10.0).round() / 10.0,
            "MiB",
        );
    }
    line(
        BENCH_TRANSIT,
        "updates_received_load",
        updates.swap(0, Ordering::Relaxed) as f64,
        "messages",
    );
    gen_line(BENCH_TRANSIT, "cpu_time_load_during", own);

    // 2. churn
    if !churn.is_empty() {
        churn_phase(&a, churn, &feed_tx, &mut phase, &updates)?;
    }

    // 3. withdraw: the feeder leaves
    let m = Meter::start(c.daemon_pid)?;
    feed_tx.send(Feed::Leave).ok().context("feeder gone")?;
    let took = phase.wait_all("withdraw", 0)?;
    let (cpu, own) = m.read()?;
    line(
        BENCH_TRANSIT,
        "time_all_receivers_withdrawn",
        millis(took),
        "ms",
    );
    if let Some(cpu) = cpu {
        line(BENCH_TRANSIT, "cpu_time_withdraw", cpu.round(), "ms");
    }
    if let Some(h) = hwm(c.daemon_pid)? {
        line(BENCH_TRANSIT, "peak_rss", (h * 10.0).round() / 10.0, "MiB");
    }
    gen_line(BENCH_TRANSIT, "cpu_time_withdraw_during", own);
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(3), feeder_task).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    Ok(())
}

/// Second `i`'s blob: withdraw slice `i`, announce slice `i - 1` again; the
/// last entry announces the last slice (the table is whole again).
fn churn_blobs(a: &TransitArgs, nh: Ipv4Addr) -> Vec<Vec<u8>> {
    if a.churn_secs == 0 {
        return Vec::new();
    }
    let per = a.prefixes_per_set;
    let n = (((a.prefixes as f64 * a.churn_percent / 100.0) as usize) / per).max(1) * per;
    let slice = |i: usize| {
        let from = (i * n) % a.prefixes;
        (from, (from + n).min(a.prefixes))
    };
    let mut out = Vec::new();
    for i in 0..=a.churn_secs {
        let mut b = Vec::new();
        if i < a.churn_secs {
            let (f, t) = slice(i);
            withdraw(f, t, &mut b);
        }
        if i > 0 {
            let (f, t) = slice(i - 1);
            announce(a, f, t, nh, &mut b);
        }
        out.push(b);
    }
    out
}

fn churn_phase(
    a: &TransitArgs,
    blobs: Vec<Vec<u8>>,
    feed_tx: &mpsc::UnboundedSender<Feed>,
    phase: &mut Phase,
    updates: &AtomicU64,
) -> Result<()> {
    let c = &a.common;
    let per = a.prefixes_per_set;
    let flaps_per_sec =
        (((a.prefixes as f64 * a.churn_percent / 100.0) as usize) / per).max(1) * per;
    let m = Meter::start(c.daemon_pid)?;
    let t0 = Instant::now();
    let mut last_cpu = 0.0;
    let mut max_rss: f64 = 0.0;
    let secs = blobs.len() - 1;
    for (i, b) in blobs.into_iter().enumerate() {
        let at = t0 + Duration::from_secs(i as u64);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        if let Ok(e) = phase.err_rx.try_recv() {
            bail!("churn: {e}");
        }
        feed_tx.send(Feed::Write(b)).ok().context("feeder gone")?;
        if i == 0 {
            continue;
        }
        // Sample the second that just ended.
        if let (Some(cpu), _) = m.read()? {
            let pid = c.daemon_pid.expect("cpu implies a pid");
            let rss = status_mib(pid, "VmRSS")?;
            series(&c.imp, "cpu_per_second", i, cpu - last_cpu, "ms");
            series(&c.imp, "rss", i, (rss * 10.0).round() / 10.0, "MiB");
            max_rss = max_rss.max(rss);
            last_cpu = cpu;
        }
    }
    let settle = phase.wait_all("churn settle", a.prefixes as u64)?;
    let (cpu, own) = m.read()?;
    let flaps = (flaps_per_sec * secs) as f64;
    bench_line(BENCH_CHURN, &c.imp, "flaps", flaps, "flaps");
    bench_line(
        BENCH_CHURN,
        &c.imp,
        "settle_after_last_second",
        millis(settle),
        "ms",
    );
    if let Some(cpu) = cpu {
        bench_line(BENCH_CHURN, &c.imp, "cpu_time", cpu.round(), "ms");
        bench_line(
            BENCH_CHURN,
            &c.imp,
            "cpu_per_flap",
            (cpu * 1000.0 / flaps * 100.0).round() / 100.0,
            "us",
        );
    }
    if c.daemon_pid.is_some() {
        // The highest per-second sample (VmHWM would be the load's peak).
        bench_line(
            BENCH_CHURN,
            &c.imp,
            "max_rss",
            (max_rss * 10.0).round() / 10.0,
            "MiB",
        );
    }
    bench_line(
        BENCH_CHURN,
        &c.imp,
        "updates_received",
        updates.swap(0, Ordering::Relaxed) as f64,
        "messages",
    );
    bench_line(
        BENCH_CHURN,
        "loadgen",
        &format!("cpu_time_during_{}", c.imp),
        own.round(),
        "ms",
    );
    Ok(())
}

/// One point of a time series: the usual JSON line plus `t` (seconds).
fn series(imp: &str, metric: &str, t: usize, value: f64, unit: &str) {
    let mut v = starling_tests::bench_json(BENCH_CHURN, imp, metric, value, unit);
    v["t"] = serde_json::json!(t);
    println!("{v}");
}
