//! The agent's HTTP endpoints: `/metrics` for Prometheus, `/healthz` and
//! `/readyz` for the DaemonSet's probes.
//!
//! The server is deliberately tiny: GET and HEAD, one request per
//! connection, headers bounded, nothing else. Probes and scrapers need no
//! more, and hyper is not otherwise in the agent's dependency tree.
//!
//! [`Readiness`] is a set of flags the agent's loops flip as they come up;
//! `/readyz` answers 200 only when all say ready and 503 with the list of
//! what is missing otherwise. `/healthz` answers 200 until a loop reports
//! that it stopped ([`Readiness::set_stopped`]), so the kubelet restarts an
//! agent that is up but no longer doing its job.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use starling_bgp::SessionStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::metrics::{self, Metrics};

/// Calico's felix answers its probes on this port too.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:9099";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9091";

/// Request line and headers together, at most.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the response: one that stops
/// reading must not hold a connection slot (and its response) for ever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// After answering, how long and how much unread input is drained.
const LINGER: Duration = Duration::from_secs(1);
const MAX_LINGER_BYTES: usize = 64 * 1024;

/// Where the endpoints listen: the `endpoints` section of the agent config.
/// Both addresses may be the same; then one listener serves every path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConfig {
    /// `/healthz` and `/readyz` (and `/metrics`).
    #[serde(default = "default_health")]
    pub health: SocketAddr,
    /// `/metrics` (and the probes).
    #[serde(default = "default_metrics")]
    pub metrics: SocketAddr,
}

fn default_health() -> SocketAddr {
    DEFAULT_HEALTH_ADDR.parse().expect("a valid constant")
}

fn default_metrics() -> SocketAddr {
    DEFAULT_METRICS_ADDR.parse().expect("a valid constant")
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            health: default_health(),
            metrics: default_metrics(),
        }
    }
}

#[derive(Default)]
struct Flags {
    datastore_synced: AtomicBool,
    ipam_serving: AtomicBool,
    fib_synced: AtomicBool,
    speaker_running: AtomicBool,
    bgp_planned: AtomicUsize,
    bgp_established: AtomicUsize,
    stopped: Mutex<Option<String>>,
}

/// What `/readyz` and `/healthz` report; clone it into each loop that sets
/// a flag. Everything starts not ready (BGP starts with no peers planned,
/// which counts as ready).
#[derive(Clone, Default)]
pub struct Readiness {
    flags: Arc<Flags>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("not_ready", &self.not_ready())
            .field("stopped", &self.stopped())
            .finish()
    }
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// The cluster model has been read in full (and, for an agent without a
    /// datastore, set it at start: there is nothing to wait for).
    pub fn set_datastore_synced(&self, v: bool) {
        self.flags.datastore_synced.store(v, Ordering::Relaxed);
    }

    /// The CNI socket is bound and IPAM answers.
    pub fn set_ipam_serving(&self, v: bool) {
        self.flags.ipam_serving.store(v, Ordering::Relaxed);
    }

    /// The FIB reconciler finished its first pass.
    pub fn set_fib_synced(&self, v: bool) {
        self.flags.fib_synced.store(v, Ordering::Relaxed);
    }

    /// The BGP speaker is listening and announcing this node's blocks.
    pub fn set_speaker_running(&self, v: bool) {
        self.flags.speaker_running.store(v, Ordering::Relaxed);
    }

    /// Watch a thread the agent cannot do without: when it ends, returning
    /// an error or not, or panics, `/healthz` fails naming `what` and why,
    /// so the kubelet restarts the agent rather than leave it half alive.
    pub fn supervise(
        &self,
        what: &'static str,
        thread: std::thread::JoinHandle<Result<(), String>>,
    ) -> io::Result<()> {
        let readiness = self.clone();
        std::thread::Builder::new()
            .name(format!("watch {what}"))
            .spawn(move || {
                let why = match thread.join() {
                    Ok(Ok(())) => format!("{what} ended"),
                    Ok(Err(e)) => format!("{what} stopped: {e}"),
                    Err(panic) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "no message".into());
                        format!("{what} panicked: {msg}")
                    }
                };
                tracing::error!("{why}; /healthz fails from now on");
                readiness.set_stopped(why);
            })
            .map(|_| ())
    }

    /// How many BGP sessions the plan wants and how many are Established.
    pub fn set_bgp(&self, planned: usize, established: usize) {
        self.flags.bgp_planned.store(planned, Ordering::Relaxed);
        self.flags
            .bgp_established
            .store(established, Ordering::Relaxed);
    }

    /// [`Readiness::set_bgp`] from the speaker's session table.
    pub fn observe_sessions(&self, sessions: &[SessionStatus]) {
        let established = sessions.iter().filter(|s| s.state == "Established").count();
        self.set_bgp(sessions.len(), established);
    }

    /// A loop the agent cannot do without has ended: `/healthz` fails from
    /// now on, with `why`.
    pub fn set_stopped(&self, why: impl Into<String>) {
        let mut s = self
            .flags
            .stopped
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        s.get_or_insert_with(|| why.into());
    }

    /// Why the agent is not live, if it is not.
    pub fn stopped(&self) -> Option<String> {
        self.flags
            .stopped
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// What is not ready yet; empty when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let f = &self.flags;
        let mut out = Vec::new();
        if !f.datastore_synced.load(Ordering::Relaxed) {
            out.push("datastore: the cluster model is not synced yet".to_string());
        }
        if !f.ipam_serving.load(Ordering::Relaxed) {
            out.push("ipam: the CNI socket is not serving yet".to_string());
        }
        if !f.fib_synced.load(Ordering::Relaxed) {
            out.push("fib: the first route sync has not finished".to_string());
        }
        if !f.speaker_running.load(Ordering::Relaxed) {
            out.push("bgp: the speaker has not started yet".to_string());
        }
        let planned = f.bgp_planned.load(Ordering::Relaxed);
        if planned > 0 && f.bgp_established.load(Ordering::Relaxed) == 0 {
            out.push(format!(
                "bgp: none of the {planned} planned sessions is Established"
            ));
        }
        out
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready().is_empty()
    }
}

/// What the server answers from; the agent's loops write both.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub metrics: Metrics,
    pub readiness: Readiness,
}

impl Endpoints {
    /// Fresh metrics (labelled with the agent's `version`) and readiness.
    pub fn new(version: &str) -> Endpoints {
        Endpoints {
            metrics: Metrics::new(version),
            readiness: Readiness::new(),
        }
    }
}

/// Bind the configured addresses (one listener when they are equal) and
/// serve until a listener fails. Bind errors name the address.
pub async fn run(config: &EndpointConfig, endpoints: Endpoints) -> io::Result<()> {
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen for {what} on {addr}: {e}"))
        })
    };
    let health = bind(config.health, "health probes").await?;
    if config.metrics == config.health {
        return serve(health, endpoints).await;
    }
    let metrics = bind(config.metrics, "metrics").await?;
    tokio::try_join!(serve(health, endpoints.clone()), serve(metrics, endpoints))?;
    Ok(())
}

/// Answer every path on `listener` until accepting fails.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            // A peer that reset before we accepted it, or a transient lack
            // of descriptors, is not the listener failing.
            Err(e) if is_transient(&e) => {
                tracing::debug!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &endpoints).await {
                tracing::debug!(error = %e, %peer, "HTTP connection ended");
            }
            drop(permit);
        });
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

async fn connection(mut stream: TcpStream, endpoints: &Endpoints) -> io::Result<()> {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Head::Closed)) => return Ok(()),
        Ok(Ok(Head::TooLarge)) => Response::text(431, "request header too large\n"),
        Ok(Ok(Head::Complete(bytes))) => match parse_request_line(&bytes) {
            Err(why) => Response::text(400, format!("bad request: {why}\n")),
            Ok(req) => answer(&req, endpoints),
        },
    };
    let send = async {
        stream.write_all(&response.to_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, send).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client did not read the response within {}s",
                    WRITE_TIMEOUT.as_secs()
                ),
            ));
        }
    }
    // Closing with unread input makes the kernel send a reset, which can
    // destroy the response before the client reads it (an oversized
    // request): read what is left, bounded, until the client closes.
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut left = MAX_LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    Ok(())
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The client went away before finishing its request.
    Closed,
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        match head_end(&buf) {
            Some(end) if end <= MAX_HEAD => {
                buf.truncate(end);
                return Ok(Head::Complete(buf));
            }
            Some(_) => return Ok(Head::TooLarge),
            None => {}
        }
        if buf.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the head ends: after the first empty line (CRLF, or bare LF as
/// RFC 9112 §2.2 lets a server accept).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, PartialEq, Eq)]
struct RequestLine {
    method: String,
    path: String,
}

fn parse_request_line(head: &[u8]) -> Result<RequestLine, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "the request head is not UTF-8")?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the request line is not `METHOD TARGET HTTP/1.x`");
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("the method is not a token");
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err("only HTTP/1.0 and HTTP/1.1 are spoken here");
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err("the target is not an absolute path");
    }
    for h in lines.filter(|l| !l.is_empty()) {
        match h.split_once(':') {
            Some((name, _))
                if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':') => {}
            _ => return Err("a header line is not `Name: value`"),
        }
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Ok(RequestLine {
        method: method.to_string(),
        path: path.to_string(),
    })
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    head_only: bool,
    allow: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            head_only: false,
            allow: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut head = String::new();
        let _ = write!(
            head,
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            head.push_str("Allow: GET, HEAD\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if !self.head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

fn answer(req: &RequestLine, endpoints: &Endpoints) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        let mut r = Response::text(405, "only GET and HEAD\n");
        r.allow = true;
        return r;
    }
    let mut r = match req.path.as_str() {
        "/metrics" => Response {
            content_type: metrics::CONTENT_TYPE,
            ..Response::text(200, endpoints.metrics.encode())
        },
        "/healthz" | "/livez" => match endpoints.readiness.stopped() {
            None => Response::text(200, "ok\n"),
            Some(why) => Response::text(503, format!("stopped: {why}\n")),
        },
        "/readyz" => {
            let missing = endpoints.readiness.not_ready();
            if missing.is_empty() {
                Response::text(200, "ready\n")
            } else {
                let mut body = String::from("not ready:\n");
                for m in missing {
                    let _ = writeln!(body, "- {m}");
                }
                Response::text(503, body)
            }
        }
        _ => Response::text(404, "not found; try /metrics, /healthz or /readyz\n"),
    };
    r.head_only = req.method == "HEAD";
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request over a real socket; returns the status and the body.
    async fn fetch(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line in {head}"));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("Content-Length in {head}"));
        assert_eq!(length, body.len(), "Content-Length matches the body");
        (status, body.to_string())
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        fetch(
            addr,
            format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: kube-probe/1.33\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
    }

    async fn start() -> (SocketAddr, Endpoints) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoints = Endpoints {
            metrics: Metrics::new("1.2.3"),
            readiness: Readiness::new(),
        };
        tokio::spawn(serve(listener, endpoints.clone()));
        (addr, endpoints)
    }

    #[tokio::test]
    async fn metrics_and_probes_answer_over_http() {
        let (addr, ep) = start().await;

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("starling_agent_info{version=\"1.2.3\"} 1"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));

        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        for part in ["datastore", "ipam", "fib"] {
            assert!(body.contains(&format!("- {part}:")), "{part} in {body}");
        }
        assert!(
            body.contains("- bgp: the speaker has not started yet"),
            "{body}"
        );

        ep.readiness.set_datastore_synced(true);
        ep.readiness.set_ipam_serving(true);
        ep.readiness.set_fib_synced(true);
        ep.readiness.set_speaker_running(true);
        assert!(ep.readiness.is_ready(), "no peers planned is ready");
        ep.readiness.set_bgp(3, 0);
        let (status, body) = get(addr, "/readyz?verbose").await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "not ready:\n- bgp: none of the 3 planned sessions is Established\n"
        );

        ep.readiness.set_bgp(3, 1);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));

        ep.readiness
            .set_stopped("the FIB task ended: netlink socket closed");
        ep.readiness.set_stopped("a later reason is not the first");
        assert_eq!(
            get(addr, "/healthz").await,
            (
                503,
                "stopped: the FIB task ended: netlink socket closed\n".into()
            )
        );
    }

    /// Clients that ask for a large answer and never read it, as many as
    /// the listener serves at once: the next client is still answered, and
    /// promptly. The answer (a 256 KiB stop reason on /healthz) is far
    /// larger than the socket buffers, kept small on both sides (the
    /// listener's are inherited by the sockets it accepts), so the server's
    /// writes to the stuck clients really block.
    #[tokio::test]
    async fn clients_that_never_read_do_not_hold_the_listener() {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_send_buffer_size(4096).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoints = Endpoints {
            metrics: Metrics::new("1.2.3"),
            readiness: Readiness::new(),
        };
        let reason = "x".repeat(256 << 10);
        endpoints.readiness.set_stopped(reason.clone());
        tokio::spawn(serve(listener, endpoints));
        let mut stuck = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            let mut s = s.connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            stuck.push(s);
        }
        // The write timeout plus a margin for a loaded box; without a
        // write deadline the answer never comes.
        let limit = WRITE_TIMEOUT + Duration::from_secs(15);
        let started = std::time::Instant::now();
        let (status, body) = tokio::time::timeout(limit, get(addr, "/healthz"))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "not answered within {limit:?} while {MAX_CONNECTIONS} clients leave their answers unread"
                )
            });
        assert_eq!(status, 503);
        assert_eq!(body, format!("stopped: {reason}\n"));
        println!(
            "answered after {:.1}s behind {MAX_CONNECTIONS} non-reading clients",
            started.elapsed().as_secs_f64()
        );
        drop(stuck);
    }

    #[tokio::test]
    async fn a_dead_thread_fails_healthz_with_its_reason() {
        for (what, body, expected) in [
            (
                "the FIB reconciler",
                (|| Err("netlink socket closed".to_string())) as fn() -> Result<(), String>,
                "stopped: the FIB reconciler stopped: netlink socket closed\n",
            ),
            (
                "the FIB reconciler",
                || panic!("dump parser bug"),
                "stopped: the FIB reconciler panicked: dump parser bug\n",
            ),
            (
                "the FIB reconciler",
                || Ok(()),
                "stopped: the FIB reconciler ended\n",
            ),
        ] {
            let (addr, ep) = start().await;
            assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
            let thread = std::thread::spawn(body);
            ep.readiness.supervise(what, thread).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while ep.readiness.stopped().is_none() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(get(addr, "/healthz").await, (503, expected.into()));
        }
    }

    #[tokio::test]
    async fn bad_requests_get_a_status_not_a_hangup() {
        let (addr, _) = start().await;
        assert_eq!(get(addr, "/nope").await.0, 404);
        assert_eq!(fetch(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await.0, 405);
        assert_eq!(fetch(addr, b"garbage\r\n\r\n").await.0, 400);
        assert_eq!(fetch(addr, b"GET /metrics SPDY/3\r\n\r\n").await.0, 400);
        assert_eq!(fetch(addr, b"GET metrics HTTP/1.1\r\n\r\n").await.0, 400);
        assert_eq!(
            fetch(addr, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
                .await
                .0,
            400
        );
        assert_eq!(fetch(addr, b"GET /\xff HTTP/1.1\r\n\r\n").await.0, 400);
        // Bare LF line ends are accepted.
        assert_eq!(fetch(addr, b"GET /healthz HTTP/1.0\n\n").await.0, 200);
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(MAX_HEAD + 10)
        );
        assert_eq!(fetch(addr, huge.as_bytes()).await.0, 431);

        // HEAD: headers only, with the length GET would have.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"HEAD /healthz HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("Content-Length: 3\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "{out}");

        // A client that connects and leaves does not stop the server.
        drop(TcpStream::connect(addr).await.unwrap());
        assert_eq!(get(addr, "/healthz").await.0, 200);
    }

    #[tokio::test]
    async fn run_serves_both_addresses_and_names_a_busy_one() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let busy = taken.local_addr().unwrap();
        let cfg = EndpointConfig {
            health: "127.0.0.1:0".parse().unwrap(),
            metrics: busy,
        };
        let ep = Endpoints {
            metrics: Metrics::new("0"),
            readiness: Readiness::new(),
        };
        let err = run(&cfg, ep).await.unwrap_err();
        assert!(
            err.to_string().contains(&format!("metrics on {busy}")),
            "{err}"
        );
    }

    #[test]
    fn the_config_section_has_felix_like_defaults() {
        let cfg: EndpointConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(cfg, EndpointConfig::default());
        assert_eq!(cfg.health.to_string(), "127.0.0.1:9099");
        assert_eq!(cfg.metrics.to_string(), "0.0.0.0:9091");
        let cfg: EndpointConfig =
            serde_yaml::from_str("health: 127.0.0.1:19099\nmetrics: 127.0.0.1:19099").unwrap();
        assert_eq!(cfg.health, cfg.metrics);
        assert!(serde_yaml::from_str::<EndpointConfig>("helth: 1.2.3.4:1").is_err());
    }
}
