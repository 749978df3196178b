//! A JSON-lines control socket: one JSON request per line, one JSON reply
//! per line, any number of requests on one connection, over a Unix socket
//! that only root can open (mode 0600). `starling-bgpd`'s control socket,
//! the node agent's (`starlingctl status|routes|ipam`) and the lab all speak
//! it through [`serve`] and [`request`], each with its own request and reply
//! types.
//!
//! Nothing here is BGP: the module lives in this crate because the daemon
//! needs it and the agent already depends on the speaker, so no crate of its
//! own is needed for some hundred lines. It is the one place where the
//! node's root-only sockets are made ([`bind`], also used for the CNI
//! plugin's socket) and served, so access checks, request-size bounds and
//! idle timeouts added here apply to every control socket at once.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// A reply type that can carry the server's refusal of a line it could not
/// read as a request.
pub trait ErrorReply {
    fn error(message: String) -> Self;
}

/// Bind a root-only socket at `path`: the parent directory is created
/// (mode 0700) when missing, a stale socket from an earlier run is replaced,
/// and the socket gets mode 0600.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// What a control connection may do: the longest request line, and how
/// long the server waits for the next one before it hangs up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_line: usize,
    pub idle: Duration,
}

impl Default for Limits {
    /// 1 MiB (the largest real request is a few hundred bytes) and 60 s.
    fn default() -> Limits {
        Limits {
            max_line: 1 << 20,
            idle: Duration::from_secs(60),
        }
    }
}

/// Answer every connection on `listener` with `answer`, one task per
/// connection, until accepting fails, with the default [`Limits`]. A line
/// that is not a `Req` gets `Rep::error("bad request: ...")` and the
/// connection stays open.
pub async fn serve<Req, Rep, A, F>(listener: UnixListener, answer: A) -> io::Result<()>
where
    Req: DeserializeOwned + Send + 'static,
    Rep: Serialize + ErrorReply + Send + 'static,
    A: Fn(Req) -> F + Clone + Send + 'static,
    F: Future<Output = Rep> + Send + 'static,
{
    serve_with(listener, Limits::default(), answer).await
}

/// [`serve`] with explicit limits. Every connection is checked first: a
/// peer that is not root (SO_PEERCRED uid 0) gets one error reply and is
/// hung up on, even if the socket's mode was loosened. A line longer than
/// `max_line` gets an error reply and the connection is closed (the rest of
/// the line cannot be told from the next request); a client that sends
/// nothing for `idle` is disconnected.
pub async fn serve_with<Req, Rep, A, F>(
    listener: UnixListener,
    limits: Limits,
    answer: A,
) -> io::Result<()>
where
    Req: DeserializeOwned + Send + 'static,
    Rep: Serialize + ErrorReply + Send + 'static,
    A: Fn(Req) -> F + Clone + Send + 'static,
    F: Future<Output = Rep> + Send + 'static,
{
    loop {
        let (stream, _) = listener.accept().await?;
        let answer = answer.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, limits, answer).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn connection<Req, Rep, A, F>(stream: UnixStream, limits: Limits, answer: A) -> io::Result<()>
where
    Req: DeserializeOwned,
    Rep: Serialize + ErrorReply,
    A: Fn(Req) -> F,
    F: Future<Output = Rep>,
{
    let uid = stream.peer_cred()?.uid();
    let (rd, mut wr) = stream.into_split();
    if uid != 0 {
        tracing::warn!(
            uid,
            "control socket: refused a connection from a non-root peer"
        );
        let refusal = encode_reply(&Rep::error(format!(
            "only root may use this socket (peer uid {uid})"
        )))?;
        return wr.write_all(&refusal).await;
    }
    let mut reader = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte past the limit tells an over-long line from one that fits.
        let mut limited = (&mut reader).take(limits.max_line as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        let n = match tokio::time::timeout(limits.idle, read).await {
            Ok(r) => r?,
            Err(_) => {
                tracing::debug!(
                    "control socket: client idle for {:?}; disconnected",
                    limits.idle
                );
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        } else if line.len() > limits.max_line {
            let refusal = encode_reply(&Rep::error(format!(
                "request longer than {} bytes; closing the connection",
                limits.max_line
            )))?;
            return wr.write_all(&refusal).await;
        }
        let reply = match serde_json::from_slice::<Req>(&line) {
            Err(e) => Rep::error(format!("bad request: {e}")),
            Ok(req) => answer(req).await,
        };
        let out = encode_reply(&reply)?;
        wr.write_all(&out).await?;
    }
}

fn encode_reply<Rep: Serialize + ErrorReply>(reply: &Rep) -> io::Result<Vec<u8>> {
    let mut out = match serde_json::to_vec(reply) {
        Ok(out) => out,
        Err(e) => serde_json::to_vec(&Rep::error(format!("cannot encode the reply: {e}")))
            .map_err(io::Error::other)?,
    };
    out.push(b'\n');
    Ok(out)
}

/// Why a [`request`] got no reply; each names the socket.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Nothing listens there (the daemon is not running, or another socket
    /// was meant).
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("{path}: no reply within {} s", .deadline.as_secs_f64())]
    Deadline { path: PathBuf, deadline: Duration },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: the connection closed without a reply")]
    Closed { path: PathBuf },
    #[error("{path}: cannot encode the request: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: a reply that is not one: {source}")]
    BadReply {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Send one request and wait for its reply, all within `deadline`.
pub fn request<Req, Rep>(path: &Path, req: &Req, deadline: Duration) -> Result<Rep, RequestError>
where
    Req: Serialize,
    Rep: DeserializeOwned,
{
    use std::io::{BufRead, Write};
    let end = Instant::now() + deadline;
    let p = || path.to_path_buf();
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => RequestError::Deadline {
            path: p(),
            deadline,
        },
        _ => RequestError::Io { path: p(), source },
    };
    // What is left of the deadline; never zero, which would mean "none".
    let left = || {
        end.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut line =
        serde_json::to_vec(req).map_err(|source| RequestError::Encode { path: p(), source })?;
    line.push(b'\n');
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|source| RequestError::Connect { path: p(), source })?;
    s.set_write_timeout(Some(left())).map_err(io_err)?;
    s.write_all(&line).map_err(io_err)?;
    s.set_read_timeout(Some(left())).map_err(io_err)?;
    let mut reply = String::new();
    if std::io::BufReader::new(s)
        .read_line(&mut reply)
        .map_err(io_err)?
        == 0
    {
        return Err(RequestError::Closed { path: p() });
    }
    serde_json::from_str(&reply).map_err(|source| RequestError::BadReply { path: p(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(tag = "cmd", rename_all = "snake_case")]
    enum Req {
        Double { n: u32 },
        Stall,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Rep {
        Doubled(u32),
        Error(String),
    }

    impl ErrorReply for Rep {
        fn error(message: String) -> Rep {
            Rep::Error(message)
        }
    }

    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A server on a fresh socket, answering from a thread of its own.
    fn server(tag: &str) -> (Scratch, PathBuf) {
        server_with(tag, Limits::default())
    }

    fn server_with(tag: &str, limits: Limits) -> (Scratch, PathBuf) {
        let dir = std::env::temp_dir().join(format!("starling-jsonl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("ctl.sock");
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = bind(&p).expect("bind");
                ready_tx.send(()).expect("ready");
                let _ = serve_with(listener, limits, |req: Req| async move {
                    match req {
                        Req::Double { n } => Rep::Doubled(2 * n),
                        Req::Stall => std::future::pending().await,
                    }
                })
                .await;
            });
        });
        ready.recv().expect("server started");
        (Scratch(dir), path)
    }

    #[test]
    fn requests_get_replies_and_the_socket_is_root_only() {
        let (_dir, path) = server("reply");
        let rep: Rep = request(&path, &Req::Double { n: 21 }, Duration::from_secs(5)).unwrap();
        assert_eq!(rep, Rep::Doubled(42));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }

    #[test]
    fn a_bad_line_gets_an_error_reply_and_the_connection_stays() {
        use std::io::{BufRead, Write};
        let (_dir, path) = server("bad");
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"cmd\":\"nonsense\"}\n{\"cmd\":\"double\",\"n\":2}\n")
            .unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let first: Rep = serde_json::from_str(&line).unwrap();
        assert!(
            matches!(&first, Rep::Error(e) if e.starts_with("bad request")),
            "{first:?}"
        );
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(serde_json::from_str::<Rep>(&line).unwrap(), Rep::Doubled(4));
    }

    #[test]
    fn a_request_gives_up_at_its_deadline() {
        let (_dir, path) = server("deadline");
        let started = Instant::now();
        let err = request::<_, Rep>(&path, &Req::Stall, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, RequestError::Deadline { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn no_server_names_the_socket() {
        let path =
            std::env::temp_dir().join(format!("starling-jsonl-none-{}.sock", std::process::id()));
        let err =
            request::<_, Rep>(&path, &Req::Double { n: 1 }, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, RequestError::Connect { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn an_oversize_request_gets_an_error_and_the_connection_closes() {
        use std::io::{BufRead, Write};
        let limits = Limits {
            max_line: 64,
            ..Limits::default()
        };
        let (_dir, path) = server_with("oversize", limits);
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let big = format!("{{\"cmd\":\"double\",\"n\":{}}}\n", "1".repeat(100));
        // The server may hang up before reading it all.
        let _ = s.write_all(big.as_bytes());
        let mut r = std::io::BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let rep: Rep = serde_json::from_str(&line).unwrap();
        assert!(
            matches!(&rep, Rep::Error(e) if e.contains("longer than 64 bytes")),
            "{rep:?}"
        );
        line.clear();
        assert_eq!(
            r.read_line(&mut line).unwrap(),
            0,
            "then the server hangs up"
        );
        // A request that fits still works on a new connection.
        let ok: Rep = request(&path, &Req::Double { n: 3 }, Duration::from_secs(5)).unwrap();
        assert_eq!(ok, Rep::Doubled(6));
    }

    #[test]
    fn an_idle_client_is_disconnected() {
        use std::io::Read;
        let limits = Limits {
            idle: Duration::from_millis(200),
            ..Limits::default()
        };
        let (_dir, path) = server_with("idle", limits);
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        // Far longer than the idle limit: the server, not this, ends it.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).expect("the server closes the connection");
        assert_eq!(n, 0, "EOF from the server, nothing else");
    }

    /// A client running as nobody (uid 65534), on a socket whose mode was
    /// loosened so the kernel lets it connect: the server still refuses it
    /// by its credentials, before reading anything.
    #[test]
    fn a_non_root_peer_is_refused() {
        use std::os::unix::process::CommandExt;
        assert_eq!(
            unsafe_free_euid(),
            0,
            "this test needs root (it runs a client as uid 65534)"
        );
        let (dir, path) = server("peercred");
        for p in [dir.0.as_path(), path.parent().unwrap()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let client = "import socket,sys\n\
s=socket.socket(socket.AF_UNIX)\n\
s.connect(sys.argv[1])\n\
s.settimeout(10)\n\
sys.stdout.write(s.makefile().readline())\n";
        let out = std::process::Command::new("python3")
            .args(["-c", client])
            .arg(&path)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("python3 runs the non-root client (Debian package python3)");
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rep: Rep = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            matches!(&rep, Rep::Error(e) if e.contains("only root") && e.contains("65534")),
            "{rep:?}"
        );
    }

    /// The effective uid, read from /proc (no unsafe libc call).
    fn unsafe_free_euid() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse().ok())
            .expect("Uid line in /proc/self/status")
    }
}
