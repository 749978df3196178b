//! One task per peer: it owns the TCP connection(s), the timers and the FSM
//! state, turns bytes and timer expiries into FSM events, and carries out the
//! FSM's actions. It talks to the speaker's instance task only through typed
//! messages, so a session that fails (or whose decoder panics) takes nothing
//! else with it.

use crate::attrs::Family;
use crate::config::{SessionConfig, SpeakerConfig};
use crate::fsm::{self, Action, Event, State};
pub use crate::sendq::Batch;
use crate::sendq::{OutQueue, WRITE_PARTS};
use crate::sockopt;
use crate::wire::{self, Cease, ErrorCode, GracefulRestart, Notify, OpenParams, PeerOpen};
use bytes::BytesMut;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::wire::deserializer::BgpParsingContext;
use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Speaker-wide facts every session needs.
#[derive(Clone, Debug)]
pub struct LocalInfo {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub hold_time: u16,
    pub min_hold_time: u16,
    pub connect_retry: u16,
    pub graceful_restart: Option<GracefulRestart>,
    pub extended_message: bool,
}

impl LocalInfo {
    pub fn new(cfg: &SpeakerConfig) -> LocalInfo {
        LocalInfo {
            asn: cfg.asn,
            router_id: cfg.router_id,
            hold_time: cfg.hold_time,
            min_hold_time: cfg.min_hold_time,
            connect_retry: cfg.connect_retry,
            graceful_restart: cfg.graceful_restart.map(|t| GracefulRestart {
                restart_time: t,
                restarting: cfg.forwarding_preserved,
                forwarding: cfg.forwarding_preserved,
            }),
            extended_message: cfg.extended_message,
        }
    }
}

/// What both sides agreed on in the OPEN exchange.
#[derive(Clone, Debug)]
pub struct Negotiated {
    pub local_addr: IpAddr,
    pub families: Vec<Family>,
    pub four_octet: bool,
    pub max_len: usize,
    pub hold_time: u16,
    pub peer: PeerOpen,
}

/// Instance -> session.
#[derive(Debug)]
pub enum ToSession {
    /// Encoded messages to write, in order (dropped unless Established):
    /// everything one flush has for this peer, as slices of buffers shared
    /// by the peers of an update group, encoded once for them all.
    Send(Batch),
    /// An incoming connection from this peer, accepted by a listener.
    Incoming(TcpStream),
    /// Stop the session with this Cease NOTIFICATION; the task ends.
    Stop(Notify),
    /// Ask the peer to resend a family (RFC 2918).
    Refresh(Family),
    /// Close the session with this NOTIFICATION and try again after the delay.
    Reset(Notify, Duration),
}

/// Session -> instance.
#[derive(Debug)]
pub enum FromSession {
    State {
        peer: IpAddr,
        state: State,
        negotiated: Option<Arc<Negotiated>>,
        error: Option<String>,
        /// Left Established without a NOTIFICATION either way (RFC 4724 §4.2).
        graceful: bool,
    },
    Update {
        peer: IpAddr,
        update: Box<wire::Update>,
    },
    RefreshRequest {
        peer: IpAddr,
        family: Family,
    },
    /// The session task panicked (a bug of ours, never the peer's input by
    /// design): its connection is gone with it, and the instance resets the
    /// session as if it had failed and starts a new task.
    Panicked {
        peer: IpAddr,
        message: String,
    },
}

/// Start a session task, watched: if it panics, the panic is caught by
/// its task boundary and reported as `FromSession::Panicked`, so the
/// speaker lives on and the instance can withdraw the peer's routes.
pub fn spawn(
    cfg: SessionConfig,
    local: Arc<LocalInfo>,
    tx: mpsc::UnboundedSender<FromSession>,
    rx: mpsc::UnboundedReceiver<ToSession>,
) {
    let peer = cfg.address;
    let task = tokio::spawn(Driver::new(cfg, local, tx.clone()).run(rx));
    tokio::spawn(async move {
        if let Err(e) = task.await
            && e.is_panic()
        {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            let _ = tx.send(FromSession::Panicked { peer, message });
        }
    });
}

/// A test-only hook: an UPDATE carrying this community makes the session
/// task panic, so the tests can prove a panic is contained.
#[cfg(test)]
pub(crate) const PANIC_COMMUNITY: u32 = 0xffff_0bad;

struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    /// Bytes queued for the peer and not yet taken by the kernel. Writing
    /// never blocks the session task: what the socket does not take at once
    /// waits here and goes out from the task's loop, which keeps reading
    /// and running timers meanwhile (two speakers sending each other full
    /// tables would otherwise both block in a write, neither reading).
    /// Its parts are shared with the other members of the update group.
    out: OutQueue,
    local: SocketAddr,
}

impl Conn {
    fn new(s: TcpStream) -> std::io::Result<Conn> {
        let local = s.local_addr()?;
        let _ = s.set_nodelay(true);
        let (rd, wr) = s.into_split();
        Ok(Conn {
            rd,
            wr,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: OutQueue::default(),
            local,
        })
    }

    /// Hand the kernel as much of `out` as it takes now, without waiting.
    /// `Ok(true)`: something was written.
    fn flush_now(&mut self) -> std::io::Result<bool> {
        let mut wrote = false;
        while !self.out.is_empty() {
            let mut iov = [IoSlice::new(&[]); WRITE_PARTS];
            let k = self.out.slices(&mut iov);
            match self.wr.try_write_vectored(&iov[..k]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.advance(n);
                    wrote = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(wrote)
    }
}

/// The read buffer starts this small and grows only for a longer message
/// (up to 65,535 octets with RFC 8654); an idle session shrinks back to it.
/// Thousands of sessions that send us little (reflector clients) would
/// otherwise hold 64 KiB each.
const READ_CHUNK: usize = 4096;

/// Room for the next read: at least `READ_CHUNK` free, or a fresh small
/// buffer when an earlier long message left a big empty one.
fn read_room(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 4 * READ_CHUNK {
        *buf = BytesMut::with_capacity(READ_CHUNK);
    } else if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Per-peer output is bounded: beyond this many queued bytes the peer is
/// not keeping up with even a full table, and the session is closed as for
/// the send hold timer.
const MAX_QUEUED_OUTPUT: usize = 256 << 20;

/// How much output one wake-up of a session queues from the instance's
/// batches before it writes: enough for one write to carry thousands of
/// UPDATEs, small enough that reading and timers are not held up.
const COALESCE_BYTES: usize = 256 << 10;

/// RFC 9687 §4: with a hold time of 0 the send hold timer still runs, at
/// its suggested 8 minutes.
const SEND_HOLD_WITHOUT_HOLD_TIME: Duration = Duration::from_secs(8 * 60);

/// What the main connection did: bytes read, or some of `out` written.
enum Io {
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
}

/// Read from the connection and, while output waits, write some of it,
/// whichever the socket allows first.
async fn conn_io(c: &mut Option<Conn>) -> Io {
    let Some(Conn {
        rd, wr, buf, out, ..
    }) = c
    else {
        return std::future::pending().await;
    };
    read_room(buf);
    if out.is_empty() {
        return Io::Read(rd.read_buf(buf).await);
    }
    let mut iov = [IoSlice::new(&[]); WRITE_PARTS];
    let k = out.slices(&mut iov);
    tokio::select! {
        r = rd.read_buf(buf) => Io::Read(r),
        r = wr.write_vectored(&iov[..k]) => Io::Wrote(r),
    }
}

async fn read_more(c: &mut Option<Conn>) -> std::io::Result<usize> {
    match c {
        Some(c) => {
            read_room(&mut c.buf);
            c.rd.read_buf(&mut c.buf).await
        }
        None => std::future::pending().await,
    }
}

async fn connect_result(
    c: &mut Option<tokio::task::JoinHandle<std::io::Result<TcpStream>>>,
) -> std::io::Result<TcpStream> {
    match c {
        Some(h) => match h.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e.to_string())),
        },
        None => std::future::pending().await,
    }
}

/// Apply the peer's socket options: MD5, GTSM or multihop TTL.
pub fn prepare_socket(
    fd: &impl std::os::fd::AsRawFd,
    cfg: &SessionConfig,
    ebgp: bool,
) -> std::io::Result<()> {
    let v6 = cfg.address.is_ipv6();
    if let Some(pw) = &cfg.md5_password {
        sockopt::set_md5(fd, cfg.address, Some(pw))?;
    }
    if cfg.ttl_security {
        sockopt::set_gtsm(fd, v6, cfg.multihop.unwrap_or(1))?;
    } else if ebgp {
        // RFC 4271 eBGP peers are directly connected unless multihop is configured.
        sockopt::set_ttl(fd, v6, cfg.multihop.unwrap_or(1))?;
    }
    Ok(())
}

async fn connect(cfg: SessionConfig, ebgp: bool) -> std::io::Result<TcpStream> {
    let sock = if cfg.address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    prepare_socket(&sock, &cfg, ebgp)?;
    if let Some(src) = cfg.source_address {
        sock.bind(SocketAddr::new(src, 0))?;
    }
    sock.connect(SocketAddr::new(cfg.address, cfg.port)).await
}

pub struct Driver {
    cfg: SessionConfig,
    local: Arc<LocalInfo>,
    fsm: fsm::Session,
    conn: Option<Conn>,
    /// A second connection during collision resolution (RFC 4271 §6.8),
    /// read until its OPEN tells us the remote BGP identifier.
    pending: Option<Conn>,
    connecting: Option<tokio::task::JoinHandle<std::io::Result<TcpStream>>>,
    ctx: BgpParsingContext,
    max_len: usize,
    peer_open: Option<PeerOpen>,
    negotiated: Option<Arc<Negotiated>>,
    connect_retry_at: Option<Instant>,
    hold_at: Option<Instant>,
    /// RFC 9687 send hold timer: runs while output waits and the peer
    /// takes none of it.
    send_hold_at: Option<Instant>,
    /// The output queue passed `MAX_QUEUED_OUTPUT`.
    overflowed: bool,
    keepalive_at: Option<Instant>,
    restart_at: Option<Instant>,
    last_error: Option<String>,
    /// A NOTIFICATION was sent or received on the current connection.
    notified: bool,
    /// A message taken from the channel while coalescing UPDATEs, to be
    /// handled next.
    deferred: Option<ToSession>,
    tx: mpsc::UnboundedSender<FromSession>,
}

impl Driver {
    pub fn new(
        cfg: SessionConfig,
        local: Arc<LocalInfo>,
        tx: mpsc::UnboundedSender<FromSession>,
    ) -> Driver {
        let passive = cfg.passive;
        Driver {
            cfg,
            local,
            fsm: fsm::Session::new(passive),
            conn: None,
            pending: None,
            connecting: None,
            ctx: wire::parsing_context(true),
            max_len: wire::MAX_MESSAGE_LEN,
            peer_open: None,
            negotiated: None,
            connect_retry_at: None,
            hold_at: None,
            send_hold_at: None,
            overflowed: false,
            keepalive_at: None,
            restart_at: None,
            last_error: None,
            notified: false,
            deferred: None,
            tx,
        }
    }

    fn ebgp(&self) -> bool {
        self.cfg.ebgp(self.local.asn)
    }

    fn connect_retry(&self) -> Duration {
        Duration::from_secs(
            self.cfg
                .connect_retry
                .unwrap_or(self.local.connect_retry)
                .max(1) as u64,
        )
    }

    fn our_hold_time(&self) -> u16 {
        self.cfg.hold_time.unwrap_or(self.local.hold_time)
    }

    /// Run until told to stop.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ToSession>) {
        self.event(Event::ManualStart).await;
        loop {
            if let Some(m) = self.deferred.take() {
                if !self.command(Some(m), &mut rx).await {
                    return;
                }
                continue;
            }
            let deadline = [
                self.connect_retry_at,
                self.hold_at,
                self.send_hold_at,
                self.keepalive_at,
                self.restart_at,
            ]
            .into_iter()
            .flatten()
            .min();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = rx.recv() => if !self.command(cmd, &mut rx).await {
                    return;
                },
                r = connect_result(&mut self.connecting) => {
                    self.connecting = None;
                    match r.and_then(Conn::new) {
                        Ok(c) => {
                            self.conn = Some(c);
                            self.event(Event::TcpCrAcked).await;
                        }
                        Err(e) => {
                            debug!(peer = %self.cfg.address, error = %e, "connect failed");
                            self.last_error = Some(format!("connect: {e}"));
                            self.event(Event::TcpConnectionFails).await;
                        }
                    }
                }
                io = conn_io(&mut self.conn) => match io {
                    Io::Wrote(Ok(n)) if n > 0 => {
                        if let Some(c) = &mut self.conn {
                            c.out.advance(n);
                        }
                        self.wrote();
                    }
                    Io::Wrote(Ok(_)) => self.write_failed(std::io::ErrorKind::WriteZero.into()),
                    Io::Wrote(Err(e)) => self.write_failed(e),
                    Io::Read(r) => match r {
                    Ok(0) | Err(_) => {
                        if let Err(e) = &r {
                            self.last_error = Some(format!("read: {e}"));
                        } else if self.fsm.state != State::Idle {
                            self.last_error.get_or_insert_with(|| "connection closed by peer".into());
                        }
                        self.event(Event::TcpConnectionFails).await;
                    }
                    Ok(_) => self.drain().await,
                    },
                },
                r = read_more(&mut self.pending) => match r {
                    Ok(0) | Err(_) => self.pending = None,
                    Ok(_) => self.drain_pending().await,
                },
                _ = sleep => self.timers().await,
            }
        }
    }

    /// A message from the instance; `false`: the task ends.
    async fn command(
        &mut self,
        cmd: Option<ToSession>,
        rx: &mut mpsc::UnboundedReceiver<ToSession>,
    ) -> bool {
        match cmd {
            None => {
                self.event(Event::ManualStop(Notify::new(
                    Cease::PeerDeconfigured,
                    vec![],
                    "peer de-configured",
                )))
                .await;
                return false;
            }
            Some(ToSession::Stop(n)) => {
                self.event(Event::ManualStop(n)).await;
                if let Some(mut p) = self.pending.take() {
                    let _ = p.wr.shutdown().await;
                }
                return false;
            }
            Some(ToSession::Send(batch)) => self.send_batches(batch, rx),
            Some(ToSession::Refresh(f)) => {
                if self.fsm.state == State::Established
                    && self.peer_open.as_ref().is_some_and(|p| p.route_refresh)
                {
                    self.write(&[wire::encode_route_refresh(f)]);
                }
            }
            Some(ToSession::Incoming(stream)) => self.incoming(stream).await,
            Some(ToSession::Reset(n, after)) => {
                self.event(Event::ManualStop(n)).await;
                self.restart_at = Some(Instant::now() + after);
            }
        }
        true
    }

    async fn timers(&mut self) {
        let now = Instant::now();
        let due = |t: &mut Option<Instant>| {
            if t.is_some_and(|t| t <= now) {
                *t = None;
                true
            } else {
                false
            }
        };
        if due(&mut self.restart_at) {
            let ev = if self.cfg.passive {
                Event::AutomaticStartWithPassiveTcpEstablishment
            } else {
                Event::AutomaticStart
            };
            self.event(ev).await;
        }
        if due(&mut self.hold_at) {
            self.last_error = Some("hold timer expired".into());
            self.event(Event::HoldTimerExpires).await;
        }
        if due(&mut self.send_hold_at) {
            let why = if std::mem::take(&mut self.overflowed) {
                format!(
                    "more than {} MiB of output queued for the peer",
                    MAX_QUEUED_OUTPUT >> 20
                )
            } else {
                "send hold timer expired: the peer took none of our output for the hold time (RFC 9687)".into()
            };
            self.send_hold_expired(&why).await;
        }
        if due(&mut self.keepalive_at) {
            self.event(Event::KeepaliveTimerExpires).await;
        }
        if due(&mut self.connect_retry_at) {
            self.event(Event::ConnectRetryTimerExpires).await;
        }
    }

    /// Feed one event to the FSM and carry out its actions.
    async fn event(&mut self, ev: Event) {
        let before = self.fsm.state;
        let (next, actions) = fsm::step(self.fsm, ev);
        self.fsm = next;
        let mut up = false;
        for a in actions {
            match a {
                Action::InitiateTcp => {
                    let cfg = self.cfg.clone();
                    let ebgp = self.ebgp();
                    self.connecting = Some(tokio::spawn(connect(cfg, ebgp)));
                }
                Action::DropTcp => {
                    if let Some(h) = self.connecting.take() {
                        h.abort();
                    }
                    if let Some(mut c) = self.conn.take() {
                        // What is queued (a NOTIFICATION above all) gets a
                        // moment to go out; a peer that reads nothing does
                        // not hold the close up.
                        let flush = async {
                            for p in c.out.parts() {
                                c.wr.write_all(p).await?;
                            }
                            std::io::Result::Ok(())
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
                        let _ = c.wr.shutdown().await;
                    }
                    self.send_hold_at = None;
                    self.ctx = wire::parsing_context(true);
                    self.max_len = wire::MAX_MESSAGE_LEN;
                }
                Action::SendOpen => {
                    self.notified = false;
                    let families = self.cfg.families();
                    let open = wire::build_open(&OpenParams {
                        asn: self.local.asn,
                        hold_time: self.our_hold_time(),
                        router_id: self.local.router_id,
                        families,
                        graceful_restart: self.local.graceful_restart.clone().map(|mut g| {
                            g.restart_time = self.cfg.restart_time.unwrap_or(g.restart_time);
                            g
                        }),
                        extended_message: self.local.extended_message,
                    });
                    self.write(&[wire::encode(&open)]);
                }
                Action::SendKeepalive => self.write(&[wire::keepalive()]),
                Action::SendNotification(n) => {
                    self.notified = true;
                    warn!(peer = %self.cfg.address, "sending NOTIFICATION {n}");
                    self.last_error = Some(format!("sent {n}"));
                    self.write(&[wire::encode(&n.to_message())]);
                }
                Action::StartConnectRetryTimer => {
                    self.connect_retry_at = Some(Instant::now() + self.connect_retry())
                }
                Action::StopConnectRetryTimer => self.connect_retry_at = None,
                Action::StartHoldTimer(s) => {
                    self.hold_at = (s > 0).then(|| Instant::now() + Duration::from_secs(s as u64))
                }
                Action::StartKeepaliveTimer(s) => {
                    self.keepalive_at =
                        (s > 0).then(|| Instant::now() + Duration::from_secs(s as u64))
                }
                Action::SessionUp => up = true,
                Action::SessionDown => {
                    self.negotiated = None;
                }
                Action::ScheduleRestart => {
                    // Idle hold: wait one connect-retry interval before trying again,
                    // so a peer that keeps refusing us is not hammered.
                    self.restart_at = Some(Instant::now() + self.connect_retry());
                }
            }
        }
        if up {
            self.last_error = None;
            if let (Some(po), Some(c)) = (&self.peer_open, &self.conn) {
                let ours = self.cfg.families();
                let families = ours
                    .into_iter()
                    .filter(|f| po.families.contains(f))
                    .collect();
                self.negotiated = Some(Arc::new(Negotiated {
                    local_addr: c.local.ip(),
                    families,
                    four_octet: po.four_octet,
                    max_len: self.max_len,
                    hold_time: self.fsm.hold_time,
                    peer: po.clone(),
                }));
            }
            info!(peer = %self.cfg.address, asn = self.cfg.asn, "session Established");
        }
        if self.fsm.state != before {
            debug!(peer = %self.cfg.address, from = %before, to = %self.fsm.state, "state change");
            let _ = self.tx.send(FromSession::State {
                peer: self.cfg.address,
                state: self.fsm.state,
                negotiated: self.negotiated.clone(),
                error: self.last_error.clone(),
                graceful: !self.notified,
            });
        }
    }

    /// Queue messages for the peer and hand the kernel what it takes now;
    /// the rest goes out from the task's loop (`write_some`).
    fn write(&mut self, msgs: &[Vec<u8>]) {
        self.write_batch(Batch::of(msgs));
    }

    /// UPDATEs from the instance, and whatever more it has already queued
    /// for us (up to `COALESCE_BYTES`): one write for them all.
    fn send_batches(&mut self, first: Batch, rx: &mut mpsc::UnboundedReceiver<ToSession>) {
        if self.fsm.state != State::Established {
            return;
        }
        let Some(c) = &mut self.conn else { return };
        let start = c.out.len();
        c.out.extend(first);
        let mut other = None;
        while c.out.len() - start < COALESCE_BYTES {
            match rx.try_recv() {
                Ok(ToSession::Send(b)) => c.out.extend(b),
                Ok(m) => {
                    other = Some(m);
                    break;
                }
                Err(_) => break,
            }
        }
        self.write_batch(Batch::default());
        if let Some(m) = other {
            // Anything else ends the run and is handled in order, next.
            self.deferred = Some(m);
        }
    }

    /// Queue a batch and hand the kernel what it takes now.
    fn write_batch(&mut self, batch: Batch) {
        let Some(c) = &mut self.conn else { return };
        c.out.extend(batch);
        match c.flush_now() {
            Ok(true) => self.wrote(),
            Ok(false) => self.waiting(),
            Err(e) => self.write_failed(e),
        }
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.out.len() > MAX_QUEUED_OUTPUT)
        {
            // Closed from the loop (the timer is due now): closing runs the
            // FSM, which writes.
            self.overflowed = true;
            self.send_hold_at = Some(Instant::now());
        }
    }

    fn send_hold_time(&self) -> Duration {
        match self.fsm.hold_time {
            0 => SEND_HOLD_WITHOUT_HOLD_TIME,
            h => Duration::from_secs(h as u64),
        }
    }

    /// The peer took some output: the send hold timer starts over, or stops
    /// when nothing is left.
    fn wrote(&mut self) {
        let pending = self.conn.as_ref().is_some_and(|c| !c.out.is_empty());
        self.send_hold_at = pending.then(|| Instant::now() + self.send_hold_time());
    }

    /// Output is waiting and none was taken: the send hold timer runs.
    fn waiting(&mut self) {
        if self.send_hold_at.is_none() {
            self.send_hold_at = Some(Instant::now() + self.send_hold_time());
        }
    }

    fn write_failed(&mut self, e: std::io::Error) {
        self.last_error = Some(format!("write: {e}"));
        if let Some(c) = &mut self.conn {
            // The read side will see the failure and raise TcpConnectionFails.
            c.out.clear();
        }
        self.send_hold_at = None;
    }

    /// RFC 9687 §3: the peer is not reading. Queue NOTIFICATION 8 (Send
    /// Hold Timer Expired) on a best-effort basis and close: the session
    /// goes down, not gracefully, so the peer's routes are withdrawn.
    async fn send_hold_expired(&mut self, why: &str) {
        warn!(peer = %self.cfg.address, "{why}; closing the session");
        self.last_error = Some(why.to_string());
        self.notified = true;
        if let Some(c) = &mut self.conn {
            c.out.clear();
            let mut n = vec![0xff; 16];
            n.extend_from_slice(&[0, 21, 3, 8, 0]);
            let _ = c.wr.try_write(&n);
        }
        self.send_hold_at = None;
        self.event(Event::TcpConnectionFails).await;
    }

    async fn incoming(&mut self, stream: TcpStream) {
        let Ok(conn) = Conn::new(stream) else { return };
        match self.fsm.state {
            State::Idle if self.restart_at.is_none() => {
                // Manually stopped: refuse.
                reject(
                    conn,
                    Notify::new(
                        Cease::ConnectionRejected,
                        vec![],
                        "connection rejected: session is stopped",
                    ),
                )
                .await;
            }
            State::Idle => {
                self.restart_at = None;
                self.event(Event::AutomaticStartWithPassiveTcpEstablishment)
                    .await;
                self.conn = Some(conn);
                self.event(Event::TcpConnectionConfirmed).await;
            }
            State::Connect | State::Active => {
                if let Some(h) = self.connecting.take() {
                    h.abort();
                }
                self.conn = Some(conn);
                self.event(Event::TcpConnectionConfirmed).await;
            }
            State::OpenSent | State::OpenConfirm if self.pending.is_none() => {
                self.pending = Some(conn)
            }
            _ => {
                reject(
                    conn,
                    Notify::new(
                        Cease::ConnectionCollisionResolution,
                        vec![],
                        "connection collision with an Established session",
                    ),
                )
                .await
            }
        }
    }

    /// Process every complete message buffered on the main connection.
    async fn drain(&mut self) {
        loop {
            let Some(c) = &mut self.conn else { return };
            let len = match wire::frame(&c.buf, self.max_len) {
                Ok(Some(len)) => len,
                Ok(None) => return,
                Err(n) => {
                    self.last_error = Some(n.to_string());
                    self.event(Event::BgpHeaderErr(n)).await;
                    return;
                }
            };
            let frame = c.buf.split_to(len);
            if frame[18] == wire::MessageType::Update as u8 && self.fsm.state == State::Established
            {
                self.update(&frame).await;
                if self.conn.is_none() {
                    return;
                }
                continue;
            }
            let decoded = wire::decode(&frame, &mut self.ctx);
            match decoded {
                Err(n) => {
                    warn!(peer = %self.cfg.address, "bad message: {n}");
                    let ev = match n.error {
                        ErrorCode::OpenMessage(_) => Event::BgpOpenMsgErr(n),
                        ErrorCode::UpdateMessage(_) => Event::UpdateMsgErr(n),
                        _ => Event::BgpHeaderErr(n),
                    };
                    self.event(ev).await;
                    return;
                }
                Ok((msg, _)) => self.message(msg).await,
            }
            if self.conn.is_none() {
                return;
            }
        }
    }

    async fn message(&mut self, msg: BgpMessage) {
        match msg {
            BgpMessage::Open(open) => {
                if self.fsm.state != State::OpenSent {
                    self.event(Event::BgpOpen { hold_time: 0 }).await;
                    return;
                }
                match wire::check_open(&open, self.cfg.asn, self.local.router_id, !self.ebgp())
                    .and_then(|po| {
                        wire::check_hold_time(po.hold_time, self.local.min_hold_time).map(|_| po)
                    }) {
                    Err(n) => {
                        self.last_error = Some(n.to_string());
                        self.event(Event::BgpOpenMsgErr(n)).await
                    }
                    Ok(po) => self.accept_open(po).await,
                }
            }
            BgpMessage::KeepAlive => self.event(Event::KeepAliveMsg).await,
            BgpMessage::Notification(n) => {
                self.notified = true;
                let text = wire::describe_notification(&n);
                warn!(peer = %self.cfg.address, "received NOTIFICATION {text}");
                self.last_error = Some(format!("received {text}"));
                self.event(Event::NotifMsg).await;
            }
            BgpMessage::RouteRefresh(r) => {
                if self.fsm.state == State::Established {
                    if let Some(family) = wire::route_refresh_family(&r) {
                        let _ = self.tx.send(FromSession::RefreshRequest {
                            peer: self.cfg.address,
                            family,
                        });
                    }
                    // RFC 4271 §8: only KEEPALIVE and UPDATE restart the hold timer; a
                    // ROUTE-REFRESH is proof of life all the same.
                    self.event(Event::KeepAliveMsg).await;
                } else {
                    self.event(Event::UpdateMsg).await;
                }
            }
            // An UPDATE in Established goes through `update`; in any other
            // state it is an FSM error (RFC 4271 §8.2.2, Event 27).
            BgpMessage::Update(_) => self.event(Event::UpdateMsg).await,
        }
    }

    /// An UPDATE in Established: RFC 7606 on the raw bytes, then the model.
    async fn update(&mut self, frame: &[u8]) {
        let n = self.negotiated.as_ref();
        let screen = wire::Screen {
            four_octet: n.is_some_and(|n| n.four_octet),
            ebgp: self.ebgp(),
            local_addr: n.map(|n| n.local_addr),
        };
        match wire::receive_update(frame, &mut self.ctx, &screen) {
            Err(n) => {
                warn!(peer = %self.cfg.address, "UPDATE error, resetting the session: {n}");
                self.last_error = Some(n.to_string());
                self.event(Event::UpdateMsgErr(n)).await;
            }
            Ok(update) => {
                #[cfg(test)]
                if update.attrs.communities.contains(&PANIC_COMMUNITY) {
                    panic!("test hook: UPDATE with the panic community");
                }
                for p in &update.problems {
                    warn!(peer = %self.cfg.address, "{p}");
                }
                self.event(Event::UpdateMsg).await;
                let _ = self.tx.send(FromSession::Update {
                    peer: self.cfg.address,
                    update: Box::new(update),
                });
            }
        }
    }

    async fn accept_open(&mut self, po: PeerOpen) {
        let ours = self.our_hold_time();
        let hold = if ours == 0 || po.hold_time == 0 {
            0
        } else {
            ours.min(po.hold_time)
        };
        self.ctx.set_asn4(po.four_octet);
        if self.local.extended_message && po.extended_message {
            self.max_len = wire::MAX_EXTENDED_MESSAGE_LEN;
        }
        self.peer_open = Some(po);
        self.event(Event::BgpOpen { hold_time: hold }).await;
    }

    /// Read the colliding connection until its OPEN arrives, then resolve the
    /// collision by BGP identifier (RFC 4271 §6.8).
    async fn drain_pending(&mut self) {
        let Some(p) = &mut self.pending else { return };
        let len = match wire::frame(&p.buf, wire::MAX_MESSAGE_LEN) {
            Ok(Some(len)) => len,
            Ok(None) => return,
            Err(_) => {
                self.pending = None;
                return;
            }
        };
        let frame = p.buf.split_to(len);
        let mut ctx = wire::parsing_context(true);
        let open = match wire::decode(&frame, &mut ctx) {
            Ok((BgpMessage::Open(o), _)) => o,
            _ => {
                self.pending = None;
                return;
            }
        };
        let po = match wire::check_open(&open, self.cfg.asn, self.local.router_id, !self.ebgp())
            .and_then(|po| {
                wire::check_hold_time(po.hold_time, self.local.min_hold_time).map(|_| po)
            }) {
            Ok(po) => po,
            Err(n) => {
                if let Some(p) = self.pending.take() {
                    reject(p, n).await;
                }
                return;
            }
        };
        let Some(p) = self.pending.take() else { return };
        if u32::from(self.local.router_id) < u32::from(po.router_id) {
            // The remote wins: close the existing connection, continue on the new one.
            info!(peer = %self.cfg.address, "connection collision: keeping the peer's connection");
            self.event(Event::OpenCollisionDump).await;
            self.restart_at = None;
            self.event(Event::AutomaticStartWithPassiveTcpEstablishment)
                .await;
            self.conn = Some(p);
            self.event(Event::TcpConnectionConfirmed).await;
            if self.fsm.state == State::OpenSent {
                self.accept_open(po).await;
            }
        } else {
            info!(peer = %self.cfg.address, "connection collision: keeping our connection");
            reject(
                p,
                Notify::new(
                    Cease::ConnectionCollisionResolution,
                    vec![],
                    "connection collision resolution",
                ),
            )
            .await;
        }
    }
}

async fn reject(mut c: Conn, n: Notify) {
    let _ = c.wr.write_all(&wire::encode(&n.to_message())).await;
    let _ = c.wr.shutdown().await;
}

/// Seconds since the Unix epoch, for "since" timestamps.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Connection collisions (RFC 4271 §6.8) on real loopback TCP: the test
/// plays the peer on both connections and reads what the session writes.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Cease, ErrorCode};
    use tokio::net::TcpListener;

    const PEER_ASN: u32 = 65001;
    const DEADLINE: Duration = Duration::from_secs(10);

    /// The peer's end of one connection.
    struct PeerEnd {
        s: TcpStream,
        buf: Vec<u8>,
    }

    impl PeerEnd {
        fn new(s: TcpStream) -> PeerEnd {
            PeerEnd { s, buf: Vec::new() }
        }

        /// The next message the session wrote, or `None` once it closed.
        async fn read(&mut self) -> Option<BgpMessage> {
            let frame = self.read_frame().await?;
            let mut ctx = wire::parsing_context(true);
            Some(wire::decode(&frame, &mut ctx).unwrap().0)
        }

        /// The next message's bytes, or `None` once the session closed.
        async fn read_frame(&mut self) -> Option<Vec<u8>> {
            loop {
                if let Some(len) = wire::frame(&self.buf, wire::MAX_MESSAGE_LEN).unwrap() {
                    return Some(self.buf.drain(..len).collect());
                }
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(DEADLINE, self.s.read(&mut chunk))
                    .await
                    .expect("the session writes or closes within the deadline")
                    .unwrap_or(0);
                if n == 0 {
                    return None;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        /// The error of the NOTIFICATION read next, if that is what it is.
        async fn notification(&mut self) -> Option<ErrorCode> {
            match self.read().await {
                Some(BgpMessage::Notification(n)) => ErrorCode::of_message(&n),
                _ => None,
            }
        }

        async fn send_open(&mut self, id: &str) {
            self.send_open_hold(id, 90).await
        }

        async fn send_open_hold(&mut self, id: &str, hold_time: u16) {
            let open = wire::build_open(&OpenParams {
                asn: PEER_ASN,
                hold_time,
                router_id: id.parse().unwrap(),
                families: vec![Family::Ipv4],
                graceful_restart: None,
                extended_message: false,
            });
            self.s.write_all(&wire::encode(&open)).await.unwrap();
        }

        async fn send_keepalive(&mut self) {
            self.s.write_all(&wire::keepalive()).await.unwrap();
        }
    }

    struct Peer {
        /// The session's outgoing connection, as the peer accepted it.
        outgoing: PeerEnd,
        events: mpsc::UnboundedReceiver<FromSession>,
        cmd: mpsc::UnboundedSender<ToSession>,
        task: tokio::task::JoinHandle<()>,
    }

    /// A session for a peer on 127.0.0.1 (`our_id` is our BGP identifier),
    /// up to OpenSent on its own outgoing connection, our OPEN read.
    async fn session_in_open_sent(our_id: &str) -> Peer {
        session_in_open_sent_with(our_id, |_| {}).await
    }

    async fn session_in_open_sent_with(our_id: &str, f: impl FnOnce(&mut SpeakerConfig)) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = SessionConfig::new("127.0.0.1".parse().unwrap(), PEER_ASN);
        cfg.port = listener.local_addr().unwrap().port();
        let mut speaker = SpeakerConfig::new(65000, our_id.parse().unwrap());
        speaker.graceful_restart = None;
        f(&mut speaker);
        let local = Arc::new(LocalInfo::new(&speaker));
        let (tx, events) = mpsc::unbounded_channel();
        let (cmd, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(Driver::new(cfg, local, tx).run(rx));
        let (s, _) = tokio::time::timeout(DEADLINE, listener.accept())
            .await
            .expect("the session connects within the deadline")
            .unwrap();
        let mut outgoing = PeerEnd::new(s);
        assert!(matches!(outgoing.read().await, Some(BgpMessage::Open(_))));
        Peer {
            outgoing,
            events,
            cmd,
            task,
        }
    }

    /// A second connection from the peer, handed to the session as a
    /// listener would; returns the peer's end.
    async fn connect_again(p: &Peer) -> PeerEnd {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (theirs, _) = l.accept().await.unwrap();
        p.cmd.send(ToSession::Incoming(theirs)).unwrap();
        PeerEnd::new(ours)
    }

    async fn established(p: &mut Peer) -> Arc<Negotiated> {
        loop {
            let ev = tokio::time::timeout(DEADLINE, p.events.recv())
                .await
                .expect("Established within the deadline")
                .unwrap();
            if let FromSession::State {
                state: State::Established,
                negotiated: Some(n),
                ..
            } = ev
            {
                return n;
            }
        }
    }

    const COLLISION: ErrorCode = ErrorCode::Cease(Cease::ConnectionCollisionResolution);

    #[tokio::test]
    async fn the_higher_bgp_identifier_wins_the_peers_connection() {
        // We are 192.0.2.1, the peer 192.0.2.9: its connection survives.
        let mut p = session_in_open_sent("192.0.2.1").await;
        let mut second = connect_again(&p).await;
        second.send_open("192.0.2.9").await;
        assert_eq!(p.outgoing.notification().await, Some(COLLISION));
        assert!(p.outgoing.read().await.is_none(), "closed after the Cease");
        assert!(matches!(second.read().await, Some(BgpMessage::Open(_))));
        assert!(matches!(second.read().await, Some(BgpMessage::KeepAlive)));
        second.send_keepalive().await;
        let n = established(&mut p).await;
        assert_eq!(n.peer.router_id, "192.0.2.9".parse::<Ipv4Addr>().unwrap());
        p.task.abort();
    }

    #[tokio::test]
    async fn the_higher_bgp_identifier_wins_our_connection() {
        // We are 192.0.2.9, the peer 192.0.2.1: our connection survives.
        let mut p = session_in_open_sent("192.0.2.9").await;
        let mut second = connect_again(&p).await;
        second.send_open("192.0.2.1").await;
        assert_eq!(second.notification().await, Some(COLLISION));
        assert!(second.read().await.is_none(), "closed after the Cease");
        p.outgoing.send_open("192.0.2.1").await;
        assert!(matches!(
            p.outgoing.read().await,
            Some(BgpMessage::KeepAlive)
        ));
        p.outgoing.send_keepalive().await;
        established(&mut p).await;

        // Established: a new connection is refused with the same Cease.
        let mut third = connect_again(&p).await;
        assert_eq!(third.notification().await, Some(COLLISION));
        p.task.abort();
    }

    #[tokio::test]
    async fn an_open_below_the_minimum_hold_time_is_refused_with_2_6() {
        let mut p = session_in_open_sent_with("192.0.2.1", |s| s.min_hold_time = 30).await;
        p.outgoing.send_open_hold("192.0.2.9", 10).await;
        assert_eq!(
            p.outgoing.notification().await,
            Some(ErrorCode::OpenMessage(
                crate::wire::OpenMessageError::UnacceptableHoldTime
            ))
        );
        p.task.abort();
        // At the minimum it is accepted.
        let mut p = session_in_open_sent_with("192.0.2.1", |s| s.min_hold_time = 30).await;
        p.outgoing.send_open_hold("192.0.2.9", 30).await;
        assert!(matches!(
            p.outgoing.read().await,
            Some(BgpMessage::KeepAlive)
        ));
        p.task.abort();
    }

    /// Until the session reports a state other than Established; its error.
    async fn left_established(events: &mut mpsc::UnboundedReceiver<FromSession>) -> Option<String> {
        loop {
            let ev = tokio::time::timeout(DEADLINE, events.recv())
                .await
                .expect("the session leaves Established within the deadline")
                .unwrap();
            if let FromSession::State { state, error, .. } = ev
                && state != State::Established
            {
                return error;
            }
        }
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_is_dropped_by_the_send_hold_timer() {
        let mut p = session_in_open_sent("192.0.2.1").await;
        p.outgoing.send_open_hold("192.0.2.9", 3).await;
        assert!(matches!(
            p.outgoing.read().await,
            Some(BgpMessage::KeepAlive)
        ));
        p.outgoing.send_keepalive().await;
        established(&mut p).await;
        // 64 MiB for the peer, which from now on only sends KEEPALIVEs and
        // reads nothing: the session must go on reading them (so its hold
        // timer never fires) and close on the send hold timer.
        let chunk = wire::keepalive().repeat(4 << 20 >> 4);
        p.cmd
            .send(ToSession::Send(Batch::of(&vec![chunk; 16])))
            .unwrap();
        let PeerEnd { s, .. } = p.outgoing;
        let (_rd, mut wr) = s.into_split();
        let keepalives = tokio::spawn(async move {
            while wr.write_all(&wire::keepalive()).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let error = left_established(&mut p.events).await.unwrap_or_default();
        assert!(error.contains("send hold timer"), "{error}");
        keepalives.abort();
        p.task.abort();
    }

    /// An UPDATE withdrawing 1000 /24s under 10.`n`/16..: 4023 octets.
    fn big_withdrawal(n: u8) -> Vec<u8> {
        let mut w = Vec::new();
        for i in 0..1000u32 {
            w.extend_from_slice(&[24, 10, n.wrapping_add((i >> 8) as u8), i as u8]);
        }
        let mut m = vec![0xff; 16];
        m.extend_from_slice(&((23 + w.len()) as u16).to_be_bytes());
        m.push(2);
        m.extend_from_slice(&(w.len() as u16).to_be_bytes());
        m.extend_from_slice(&w);
        m.extend_from_slice(&[0, 0]);
        m
    }

    /// Batches queued while the session task was not running (slices of
    /// shared buffers, as the instance sends them) go out whole and in
    /// order, and a message of another kind queued after them (a Stop)
    /// is handled after them, not dropped and not ahead of them.
    #[tokio::test]
    async fn queued_batches_go_out_in_order_before_what_was_queued_after_them() {
        let mut p = session_in_open_sent("192.0.2.1").await;
        p.outgoing.send_open("192.0.2.9").await;
        assert!(matches!(
            p.outgoing.read().await,
            Some(BgpMessage::KeepAlive)
        ));
        p.outgoing.send_keepalive().await;
        established(&mut p).await;
        let msgs: Vec<Vec<u8>> = (0..200).map(big_withdrawal).collect();
        let shared = bytes::Bytes::from(msgs[..100].concat());
        let cut = 40 * msgs[0].len();
        // Not awaited in between: all of it waits in the channel.
        for part in [shared.slice(..cut), shared.slice(cut..)] {
            let mut b = Batch::default();
            b.push(part);
            p.cmd.send(ToSession::Send(b)).unwrap();
        }
        for m in &msgs[100..] {
            p.cmd
                .send(ToSession::Send(Batch::of(std::slice::from_ref(m))))
                .unwrap();
        }
        p.cmd
            .send(ToSession::Stop(Notify::admin_shutdown("test")))
            .unwrap();
        for (i, m) in msgs.iter().enumerate() {
            let got = p.outgoing.read_frame().await;
            assert_eq!(got.as_ref(), Some(m), "message {i}");
        }
        assert_eq!(
            p.outgoing.notification().await,
            Some(ErrorCode::Cease(Cease::AdministrativeShutdown))
        );
        p.task.await.unwrap();
    }

    #[tokio::test]
    async fn two_sessions_sending_each_other_much_at_once_never_deadlock() {
        const MESSAGES: usize = 5000; // 20 MB each way, far past the socket buffers
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let start = |asn: u32, peer_asn: u32, id: &str, passive: bool| {
            let mut cfg = SessionConfig::new("127.0.0.1".parse().unwrap(), peer_asn);
            cfg.port = listener.local_addr().unwrap().port();
            cfg.passive = passive;
            let mut speaker = SpeakerConfig::new(asn, id.parse().unwrap());
            speaker.graceful_restart = None;
            let (tx, events) = mpsc::unbounded_channel();
            let (cmd, rx) = mpsc::unbounded_channel();
            let task =
                tokio::spawn(Driver::new(cfg, Arc::new(LocalInfo::new(&speaker)), tx).run(rx));
            (events, cmd, task)
        };
        let (mut a_events, a_cmd, a_task) = start(65000, 65001, "192.0.2.1", false);
        let (mut b_events, b_cmd, b_task) = start(65001, 65000, "192.0.2.2", true);
        let (s, _) = tokio::time::timeout(DEADLINE, listener.accept())
            .await
            .unwrap()
            .unwrap();
        b_cmd.send(ToSession::Incoming(s)).unwrap();
        for events in [&mut a_events, &mut b_events] {
            loop {
                let ev = tokio::time::timeout(DEADLINE, events.recv())
                    .await
                    .unwrap()
                    .unwrap();
                if let FromSession::State {
                    state: State::Established,
                    ..
                } = ev
                {
                    break;
                }
            }
        }
        let batch: Vec<Vec<u8>> = (0..MESSAGES).map(|i| big_withdrawal(i as u8)).collect();
        a_cmd.send(ToSession::Send(Batch::of(&batch))).unwrap();
        b_cmd.send(ToSession::Send(Batch::of(&batch))).unwrap();
        let count = async |events: &mut mpsc::UnboundedReceiver<FromSession>| {
            let mut n = 0;
            while n < MESSAGES {
                match events.recv().await {
                    Some(FromSession::Update { .. }) => n += 1,
                    Some(FromSession::State { state, error, .. })
                        if state != State::Established =>
                    {
                        panic!("session left Established: {error:?}")
                    }
                    Some(_) => {}
                    None => panic!("session task ended"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(count(&mut a_events), count(&mut b_events))
        })
        .await
        .expect("both sides receive everything (no deadlock)");
        a_task.abort();
        b_task.abort();
    }
}
