//! `bgp-loadgen scale`: two route reflectors and thousands of clients, the
//! load behind `tests/bench/scale-rr.sh` (issue 19).
//!
//! Every client is one node: it opens a session from its own loopback
//! address to each of the two reflectors (so 5,000 clients are 10,000
//! sessions) and announces its block (a /26) and `--pod-routes` /32s (the
//! borrowed addresses a Calico node also advertises). Every session keeps
//! the set of routes the reflector sent it, and the phases are timed by the
//! moment the last session holds what it should:
//!
//! 1. converge: all sessions Established, then every client writes its
//!    routes and End-of-RIB at once; the clock stops when every session of
//!    every client holds every other client's routes (each reflector's own
//!    figure too);
//! 2. join: one more client connects to both and announces; time until
//!    every session of the others holds its routes;
//! 3. leave: that client closes both sessions with a Cease; time until
//!    every session has withdrawn its routes;
//! 4. restart (with `--stop-first CMD --start-first CMD`): the first
//!    reflector is stopped. Clients keep its routes, as a graceful-restart
//!    helper does when the reflector offered the capability (reported); no
//!    session with the second reflector may drop; another client joins
//!    through the second reflector alone while the first is away, timed;
//!    then the first is started again, every client reconnects to it, and
//!    the clock runs until it has again sent every session everything.
//!
//! A reflector's UPDATEs are read with a minimal IPv4 unicast parser (the
//! withdrawn routes and NLRI fields, attributes skipped): 10,000 sessions
//! each receiving 15,000 routes is 150M prefixes, and a full decode per
//! UPDATE would make the generator, not the reflectors, the figure. The
//! generator's own CPU time is printed.

use super::*;
use std::process::Command;

#[derive(Args)]
pub struct ScaleArgs {
    /// `--target` is the first reflector, `--daemon-pid` its process.
    #[command(flatten)]
    common: Common,
    /// The second reflector (`ADDR:PORT`).
    #[arg(long)]
    second_target: String,
    /// The second reflector's process, for its CPU time and peak RSS.
    #[arg(long)]
    second_pid: Option<u32>,
    #[arg(long, default_value_t = 5000)]
    clients: usize,
    /// /32 routes per client besides its /26 block.
    #[arg(long, default_value_t = 2)]
    pod_routes: usize,
    /// Shell command that stops the first reflector (the restart phase).
    #[arg(long, requires_all = ["start_first", "first_pid_file"])]
    stop_first: Option<String>,
    /// Shell command that starts the first reflector again, in the
    /// background, writing its process ID to `--first-pid-file`, and returns
    /// once it accepts connections.
    #[arg(long)]
    start_first: Option<String>,
    #[arg(long)]
    first_pid_file: Option<PathBuf>,
}

/// Where a client's routes live: its /26 block at 10.0.0.0 + 64·c, its /32s
/// from 10.192.0.0 + K·c.
struct Layout {
    pods: usize,
}

const BLOCKS_BASE: u32 = 0x0a00_0000;
const PODS_BASE: u32 = 0x0ac0_0000;

impl Layout {
    fn per_client(&self) -> usize {
        1 + self.pods
    }

    fn routes(&self, c: usize) -> Vec<IpNet> {
        let mut v = vec![IpNet::V4(
            Ipv4Net::new(Ipv4Addr::from(BLOCKS_BASE + 64 * c as u32), 26).expect("26 is valid"),
        )];
        for k in 0..self.pods {
            let a = PODS_BASE + (c * self.pods + k) as u32;
            v.push(IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(a), 32).expect("32 is valid"),
            ));
        }
        v
    }

    /// (client, route number) of a received prefix, if it is one of ours.
    fn index(&self, addr: u32, len: u8) -> Option<(usize, usize)> {
        match len {
            26 if (BLOCKS_BASE..PODS_BASE).contains(&addr) => {
                Some(((addr - BLOCKS_BASE) as usize / 64, 0))
            }
            32 if addr >= PODS_BASE && self.pods > 0 => {
                let off = (addr - PODS_BASE) as usize;
                Some((off / self.pods, 1 + off % self.pods))
            }
            _ => None,
        }
    }
}

/// Counters of one reflector's sessions (one generation: a restarted
/// reflector's new sessions get new counters).
struct Progress {
    /// Sessions holding every route of every other base client.
    complete: AtomicUsize,
    /// Per extra client (joiners): sessions holding all of its routes, and
    /// sessions that held them and now hold none.
    extra_full: [AtomicUsize; 2],
    extra_gone: [AtomicUsize; 2],
    /// UPDATE messages and prefixes received.
    updates: AtomicU64,
    prefixes: AtomicU64,
}

impl Progress {
    fn new() -> Arc<Progress> {
        Arc::new(Progress {
            complete: AtomicUsize::new(0),
            extra_full: [AtomicUsize::new(0), AtomicUsize::new(0)],
            extra_gone: [AtomicUsize::new(0), AtomicUsize::new(0)],
            updates: AtomicU64::new(0),
            prefixes: AtomicU64::new(0),
        })
    }
}

/// What one session holds.
struct View {
    me: usize,
    base: usize,
    per: usize,
    bits: Vec<u64>,
    have_base: usize,
    have_extra: [usize; 2],
    progress: Arc<Progress>,
}

impl View {
    fn new(me: usize, base: usize, per: usize, progress: Arc<Progress>) -> View {
        View {
            me,
            base,
            per,
            bits: vec![0; ((base + 2) * per).div_ceil(64)],
            have_base: 0,
            have_extra: [0; 2],
            progress,
        }
    }

    fn set(&mut self, client: usize, route: usize, on: bool) {
        if client == self.me || client >= self.base + 2 {
            return;
        }
        let bit = client * self.per + route;
        let (w, m) = (bit / 64, 1u64 << (bit % 64));
        if (self.bits[w] & m != 0) == on {
            return;
        }
        self.bits[w] ^= m;
        let want = (self.base - 1) * self.per;
        if client < self.base {
            if on {
                self.have_base += 1;
                if self.have_base == want {
                    self.progress.complete.fetch_add(1, Ordering::SeqCst);
                }
            } else {
                if self.have_base == want {
                    self.progress.complete.fetch_sub(1, Ordering::SeqCst);
                }
                self.have_base -= 1;
            }
            return;
        }
        let e = client - self.base;
        if on {
            self.have_extra[e] += 1;
            if self.have_extra[e] == self.per {
                self.progress.extra_full[e].fetch_add(1, Ordering::SeqCst);
            }
        } else {
            self.have_extra[e] -= 1;
            if self.have_extra[e] == 0 {
                self.progress.extra_gone[e].fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// The prefixes of an IPv4 withdrawn-routes or NLRI field, as (address, length).
pub(super) fn prefixes(mut b: &[u8], mut f: impl FnMut(u32, u8)) -> Result<()> {
    while let Some((&len, rest)) = b.split_first() {
        let n = usize::from(len).div_ceil(8);
        if len > 32 || rest.len() < n {
            bail!("malformed IPv4 prefix (length {len})");
        }
        let mut a = [0u8; 4];
        a[..n].copy_from_slice(&rest[..n]);
        f(u32::from_be_bytes(a), len);
        b = &rest[n..];
    }
    Ok(())
}

/// The withdrawn-routes and NLRI fields of a framed UPDATE (attributes
/// skipped: the loads are IPv4 unicast only).
pub(super) fn update_fields(msg: &[u8]) -> Result<(&[u8], &[u8])> {
    let body = &msg[19..];
    let short = || anyhow!("truncated UPDATE");
    let len = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
    let wlen = len(body.get(..2).ok_or_else(short)?);
    let withdrawn = body.get(2..2 + wlen).ok_or_else(short)?;
    let at = 2 + wlen;
    let alen = len(body.get(at..at + 2).ok_or_else(short)?);
    let nlri = body.get(at + 2 + alen..).ok_or_else(short)?;
    Ok((withdrawn, nlri))
}

/// Apply one framed message to the view: UPDATEs change it, a NOTIFICATION
/// is an error, anything else is skipped.
fn apply(msg: &[u8], layout: &Layout, view: &mut View) -> Result<()> {
    match msg[18] {
        2 => {
            let (withdrawn, nlri) = update_fields(msg)?;
            let mut n = 0u64;
            prefixes(withdrawn, |a, l| {
                if let Some((c, r)) = layout.index(a, l) {
                    view.set(c, r, false);
                }
            })?;
            prefixes(nlri, |a, l| {
                n += 1;
                if let Some((c, r)) = layout.index(a, l) {
                    view.set(c, r, true);
                }
            })?;
            view.progress.updates.fetch_add(1, Ordering::Relaxed);
            view.progress.prefixes.fetch_add(n, Ordering::Relaxed);
            Ok(())
        }
        3 => bail!("the reflector sent a NOTIFICATION"),
        _ => Ok(()),
    }
}

/// Read and frame everything `peer` (the reflector, the speaker) sends on
/// one session, handing each message to `on_msg`, until the session ends.
/// An error of `on_msg`, bad framing, or an end while `stop` is false is
/// reported through `errors`.
pub(super) async fn read_frames(
    mut rd: OwnedReadHalf,
    mut buf: Vec<u8>,
    name: String,
    peer: &'static str,
    stop: Arc<AtomicBool>,
    errors: mpsc::UnboundedSender<String>,
    mut on_msg: impl FnMut(&[u8]) -> Result<()>,
) {
    loop {
        let mut at = 0;
        loop {
            match wire::frame(&buf[at..], MAX_MESSAGE_LEN) {
                Ok(Some(len)) => {
                    if let Err(e) = on_msg(&buf[at..at + len]) {
                        if !stop.load(Ordering::Relaxed) {
                            let _ = errors.send(format!("{name}: {e}"));
                        }
                        return;
                    }
                    at += len;
                }
                Ok(None) => break,
                Err(n) => {
                    let _ = errors.send(format!("{name}: bad framing: {}", n.reason));
                    return;
                }
            }
        }
        buf.drain(..at);
        match read_more(&mut rd, &mut buf).await {
            Ok(n) if n > 0 => {}
            _ => {
                if !stop.load(Ordering::Relaxed) {
                    let _ = errors.send(format!("{name}: the {peer} closed the session"));
                }
                return;
            }
        }
    }
}

/// Write the client's routes once `go` turns true, then KEEPALIVEs until
/// `leave` turns true; then a Cease, and the time it went out into `left_at`.
#[allow(clippy::too_many_arguments)]
async fn writer(
    mut wr: OwnedWriteHalf,
    blob: Arc<Vec<u8>>,
    mut go: watch::Receiver<bool>,
    mut leave: watch::Receiver<bool>,
    hold_time: u16,
    name: String,
    stop: Arc<AtomicBool>,
    errors: mpsc::UnboundedSender<String>,
) {
    if go.wait_for(|g| *g).await.is_err() {
        return;
    }
    if let Err(e) = wr.write_all(&blob).await {
        if !stop.load(Ordering::Relaxed) {
            let _ = errors.send(format!("{name}: write failed: {e}"));
        }
        return;
    }
    let every = Duration::from_secs(u64::from(hold_time.max(3) / 3));
    loop {
        tokio::select! {
            left = async { leave.wait_for(|l| *l).await.is_ok() } => {
                if left {
                    let bye = wire::Notify::admin_shutdown("node leaves").to_message();
                    let _ = wr.write_all(&wire::encode(&bye)).await;
                }
                return;
            }
            _ = tokio::time::sleep(every) => {
                if wr.write_all(&wire::keepalive()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One client's UPDATEs and End-of-RIB, encoded once.
fn client_blob(layout: &Layout, c: usize, src: Ipv4Addr) -> Arc<Vec<u8>> {
    let attrs = PathAttrs {
        origin: Origin::Igp,
        next_hop: Some(IpAddr::V4(src)),
        local_pref: Some(100),
        ..PathAttrs::default()
    };
    let mut blob = Vec::new();
    for u in wire::encode_announce(
        Family::Ipv4,
        &layout.routes(c),
        &attrs,
        true,
        true,
        MAX_MESSAGE_LEN,
    ) {
        blob.extend_from_slice(&u);
    }
    blob.extend_from_slice(&wire::encode_end_of_rib(Family::Ipv4));
    Arc::new(blob)
}

/// The shared state of a run.
struct Run {
    layout: Arc<Layout>,
    base: usize,
    asn: u32,
    hold_time: u16,
    sources: Vec<Ipv4Addr>,
    errors: mpsc::UnboundedSender<String>,
    err_rx: mpsc::UnboundedReceiver<String>,
    imp: String,
    deadline: Instant,
}

/// The sessions of some clients with one reflector, reading and writing.
struct Group {
    go: watch::Sender<bool>,
    leave: watch::Sender<bool>,
    stop: Arc<AtomicBool>,
    peer_gr: usize,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Group {
    fn start(&self) {
        self.go.send_replace(true);
    }

    /// Close the sessions: Ceases, and ends of session are not errors.
    fn end(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.leave.send_replace(true);
    }
}

impl Run {
    /// Establish `clients` with `target` and start their tasks (writing waits for `go`).
    fn connect(
        &self,
        rt: &tokio::runtime::Runtime,
        clients: &[usize],
        target: SocketAddr,
        progress: &Arc<Progress>,
        label: &str,
    ) -> Result<Group> {
        let srcs: Vec<Ipv4Addr> = clients.iter().map(|&c| self.sources[c]).collect();
        let t = Instant::now();
        let sessions = rt.block_on(establish_all_gr(
            &srcs,
            target,
            self.asn,
            self.hold_time,
            true,
            self.deadline,
        ))?;
        eprintln!(
            "bgp-loadgen: {} sessions with {label} ({target}) Established in {:?}",
            sessions.len(),
            t.elapsed()
        );
        let (go, go_rx) = watch::channel(false);
        let (leave, leave_rx) = watch::channel(false);
        let stop = Arc::new(AtomicBool::new(false));
        let peer_gr = sessions.iter().filter(|s| s.peer_gr).count();
        let mut tasks = Vec::new();
        for (s, &c) in sessions.into_iter().zip(clients) {
            let name = format!("{} -> {label}", self.sources[c]);
            let mut view = View::new(c, self.base, self.layout.per_client(), progress.clone());
            let layout = self.layout.clone();
            tasks.push(rt.spawn(read_frames(
                s.rd,
                s.pending,
                name.clone(),
                "reflector",
                stop.clone(),
                self.errors.clone(),
                move |m| apply(m, &layout, &mut view),
            )));
            tasks.push(rt.spawn(writer(
                s.wr,
                client_blob(&self.layout, c, self.sources[c]),
                go_rx.clone(),
                leave_rx.clone(),
                self.hold_time,
                name,
                stop.clone(),
                self.errors.clone(),
            )));
        }
        Ok(Group {
            go,
            leave,
            stop,
            peer_gr,
            tasks,
        })
    }

    /// Wait until every condition holds, noting when each first did; a
    /// session error or the deadline ends the run.
    fn wait(&mut self, what: &str, conds: &[&dyn Fn() -> bool]) -> Result<Vec<Duration>> {
        let t = Instant::now();
        let mut at: Vec<Option<Duration>> = vec![None; conds.len()];
        loop {
            for (i, c) in conds.iter().enumerate() {
                if at[i].is_none() && c() {
                    at[i] = Some(t.elapsed());
                }
            }
            if at.iter().all(Option::is_some) {
                return Ok(at.into_iter().flatten().collect());
            }
            if let Ok(e) = self.err_rx.try_recv() {
                bail!("{what}: {e}");
            }
            if Instant::now() > self.deadline {
                bail!("{what}: timed out");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn line(&self, metric: &str, value: f64, unit: &str) {
        bench_line("scale-rr", &self.imp, metric, value, unit);
    }
}

pub(super) fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64 / 100.0).round() / 10.0
}

pub fn run(rt: &tokio::runtime::Runtime, a: ScaleArgs) -> Result<()> {
    let c = &a.common;
    if a.clients < 2 {
        bail!("--clients must be at least 2");
    }
    let first = resolve_target(&c.target)?;
    let second = resolve_target(&a.second_target)?;
    let base = a.clients;
    let layout = Arc::new(Layout { pods: a.pod_routes });
    // Base clients, then the joiner, then the client that joins during the restart.
    let sources = (0..base + 2)
        .map(|i| source_addr(c.source_base, i))
        .collect::<Result<Vec<_>>>()?;
    let (errors, err_rx) = mpsc::unbounded_channel();
    let mut run = Run {
        layout,
        base,
        asn: c.asn,
        hold_time: c.hold_time,
        sources,
        errors,
        err_rx,
        imp: c.imp.clone(),
        deadline: Instant::now() + Duration::from_secs(c.timeout),
    };
    let all: Vec<usize> = (0..base).collect();
    let (pa, pb) = (Progress::new(), Progress::new());
    let ga = run.connect(rt, &all, first, &pa, "reflector 1")?;
    let gb = run.connect(rt, &all, second, &pb, "reflector 2")?;
    run.line(
        "reflector_offers_graceful_restart",
        (ga.peer_gr + gb.peer_gr) as f64 / (2 * base) as f64,
        "fraction",
    );

    // 1. converge
    let cpu = |pid: Option<u32>| pid.map(cpu_ms).transpose();
    let (cpu_a0, cpu_b0, own0) = (
        cpu(c.daemon_pid)?,
        cpu(a.second_pid)?,
        cpu_ms(std::process::id())?,
    );
    ga.start();
    gb.start();
    let t = run.wait(
        "converge",
        &[&|| pa.complete.load(Ordering::SeqCst) == base, &|| {
            pb.complete.load(Ordering::SeqCst) == base
        }],
    )?;
    run.line("converge_reflector_1", millis(t[0]), "ms");
    run.line("converge_reflector_2", millis(t[1]), "ms");
    run.line("converge_all", millis(t[0].max(t[1])), "ms");
    for (n, pid, before) in [(1, c.daemon_pid, cpu_a0), (2, a.second_pid, cpu_b0)] {
        if let (Some(pid), Some(before)) = (pid, before) {
            run.line(
                &format!("cpu_time_reflector_{n}"),
                (cpu_ms(pid)? - before).round(),
                "ms",
            );
            run.line(
                &format!("peak_rss_reflector_{n}"),
                status_mib(pid, "VmHWM")?,
                "MiB",
            );
        }
    }
    let prefixes = pa.prefixes.load(Ordering::SeqCst) + pb.prefixes.load(Ordering::SeqCst);
    let updates = pa.updates.load(Ordering::SeqCst) + pb.updates.load(Ordering::SeqCst);
    run.line("prefixes_received", prefixes as f64, "prefixes");
    run.line("updates_received", updates as f64, "messages");
    bench_line(
        "scale-rr",
        "loadgen",
        &format!("cpu_time_during_{}", run.imp),
        (cpu_ms(std::process::id())? - own0).round(),
        "ms",
    );

    // 2. join and 3. leave
    let joiner = [base];
    let ja = run.connect(rt, &joiner, first, &Progress::new(), "reflector 1")?;
    let jb = run.connect(rt, &joiner, second, &Progress::new(), "reflector 2")?;
    ja.start();
    jb.start();
    let t = run.wait(
        "join",
        &[&|| {
            pa.extra_full[0].load(Ordering::SeqCst) == base
                && pb.extra_full[0].load(Ordering::SeqCst) == base
        }],
    )?;
    run.line("node_join_seen_by_all", millis(t[0]), "ms");
    ja.end();
    jb.end();
    let t = run.wait(
        "leave",
        &[&|| {
            pa.extra_gone[0].load(Ordering::SeqCst) == base
                && pb.extra_gone[0].load(Ordering::SeqCst) == base
        }],
    )?;
    run.line("node_leave_seen_by_all", millis(t[0]), "ms");

    // 4. restart of the first reflector
    if let (Some(stop), Some(start), Some(pid_file)) =
        (&a.stop_first, &a.start_first, &a.first_pid_file)
    {
        let cmds = RestartCmds {
            stop,
            start,
            pid_file,
        };
        restart_phase(rt, &mut run, &ga, &pb, first, second, &cmds)?;
    }
    for g in [&ga, &gb] {
        g.end();
    }
    rt.block_on(async {
        for t in ga.tasks.into_iter().chain(gb.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
    });
    Ok(())
}

struct RestartCmds<'a> {
    stop: &'a str,
    start: &'a str,
    pid_file: &'a std::path::Path,
}

fn shell(what: &str, cmd: &str) -> Result<()> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn restart_phase(
    rt: &tokio::runtime::Runtime,
    run: &mut Run,
    ga: &Group,
    pb: &Arc<Progress>,
    first: SocketAddr,
    second: SocketAddr,
    cmds: &RestartCmds,
) -> Result<()> {
    let base = run.base;
    // The first reflector's sessions are going away: not an error. Their
    // views keep what they hold (the graceful-restart helper's stale routes).
    ga.stop.store(true, Ordering::SeqCst);
    let away = Instant::now();
    shell("--stop-first", cmds.stop)?;
    // A node joins through the second reflector while the first is away.
    let late = [base + 1];
    let jb = run.connect(rt, &late, second, &Progress::new(), "reflector 2")?;
    jb.start();
    let t = run.wait(
        "join during restart",
        &[&|| pb.extra_full[1].load(Ordering::SeqCst) == base],
    )?;
    run.line("node_join_during_restart_seen_by_all", millis(t[0]), "ms");
    let t0 = Instant::now();
    shell("--start-first", cmds.start)?;
    run.line("restart_start_to_ready", millis(t0.elapsed()), "ms");
    // Every client reconnects to the restarted reflector.
    let pa1 = Progress::new();
    let all: Vec<usize> = (0..base).collect();
    let ga1 = run.connect(rt, &all, first, &pa1, "reflector 1 (restarted)")?;
    run.line("restart_sessions_reestablished", millis(t0.elapsed()), "ms");
    ga1.start();
    let t = run.wait(
        "reconverge after restart",
        &[&|| pa1.complete.load(Ordering::SeqCst) == base],
    )?;
    run.line("restart_reconverged", millis(t0.elapsed()), "ms");
    run.line("restart_reconverge_after_reconnect", millis(t[0]), "ms");
    // Within the restart time the reflector offered (120 s), a helper keeps
    // its routes all along.
    run.line("restart_first_away_total", millis(away.elapsed()), "ms");
    // No session with the second reflector dropped (a drop is an error, and
    // any error ended the run above); say so as a figure too.
    run.line("sessions_lost_on_reflector_2", 0.0, "sessions");
    let pid_file = cmds.pid_file;
    let pid: u32 = std::fs::read_to_string(pid_file)
        .with_context(|| format!("{}", pid_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{}: not a process ID", pid_file.display()))?;
    run.line(
        "peak_rss_reflector_1_restarted",
        status_mib(pid, "VmHWM")?,
        "MiB",
    );
    jb.end();
    ga1.end();
    Ok(())
}
