//! Recording what a real BGP implementation sends: a listener inside a test
//! namespace accepts the reference daemon's connection, answers with a
//! valid OPEN and KEEPALIVEs, and keeps every message the daemon sends,
//! raw. The fuzz seed corpus (fuzz/seeds/, docs/bgp.md "Fuzzing") is made
//! from these recordings by `capture_fuzz_corpus` in bgp_interop.

use crate::Netns;
use anyhow::{Context, Result, anyhow, bail};
use starling_bgp::{Family, wire};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// BGP message types (RFC 4271 §4.1).
pub const OPEN: u8 = 1;
pub const UPDATE: u8 = 2;
pub const NOTIFICATION: u8 = 3;
pub const KEEPALIVE: u8 = 4;

/// A TCP listener bound to `addr` inside `ns` (a thread joins the namespace
/// for the bind; the socket stays in it afterwards).
pub fn listen_in(ns: &Netns, addr: SocketAddr) -> Result<TcpListener> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::scope(|s| {
        s.spawn(|| -> Result<TcpListener> {
            let f = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            TcpListener::bind(addr).with_context(|| format!("bind {addr} in {}", ns.name))
        })
        .join()
        .map_err(|_| anyhow!("the bind thread panicked"))?
    })
}

/// One accepted session being recorded.
pub struct Recording {
    stream: TcpStream,
    /// Every message received so far, in order, KEEPALIVEs included.
    pub messages: Vec<Vec<u8>>,
    stop_keepalives: Arc<AtomicBool>,
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.stop_keepalives.store(true, Ordering::Relaxed);
    }
}

impl Recording {
    /// Wait up to `timeout` for a connection on `l`, then send our OPEN
    /// (`asn`, IPv4 and IPv6 unicast, graceful restart and extended
    /// messages, so the daemon shows those capabilities and sends
    /// End-of-RIB) and a KEEPALIVE. A thread sends a KEEPALIVE every
    /// second until the recording is dropped.
    pub fn accept(l: &TcpListener, asn: u32, timeout: Duration) -> Result<Recording> {
        let until = Instant::now() + timeout;
        l.set_nonblocking(true)?;
        let stream = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > until {
                        bail!("no connection on {} within {timeout:?}", l.local_addr()?);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).context("accept"),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(timeout))?;
        let open = wire::build_open(&wire::OpenParams {
            asn,
            hold_time: crate::peers::HOLD_TIME,
            router_id: "192.0.2.10".parse()?,
            families: vec![Family::Ipv4, Family::Ipv6],
            graceful_restart: Some(wire::GracefulRestart {
                restart_time: 120,
                restarting: false,
                forwarding: false,
            }),
            extended_message: true,
        });
        let mut w = stream.try_clone()?;
        w.write_all(&wire::encode(&open))?;
        w.write_all(&wire::keepalive())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if w.write_all(&wire::keepalive()).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        Ok(Recording {
            stream,
            messages: Vec::new(),
            stop_keepalives: stop,
        })
    }

    /// Read one whole message (header included) and record it.
    pub fn next_message(&mut self) -> Result<Vec<u8>> {
        let mut head = [0u8; 19];
        self.stream
            .read_exact(&mut head)
            .context("reading a message header")?;
        let len = u16::from_be_bytes([head[16], head[17]]) as usize;
        if len < 19 {
            bail!("message length {len} is below the 19-octet header");
        }
        let mut m = head.to_vec();
        m.resize(len, 0);
        self.stream
            .read_exact(&mut m[19..])
            .context("reading a message body")?;
        self.messages.push(m.clone());
        Ok(m)
    }

    /// Read until a message satisfies `done`; fails at the read timeout.
    pub fn until(&mut self, what: &str, mut done: impl FnMut(&[u8]) -> bool) -> Result<()> {
        loop {
            let m = self
                .next_message()
                .with_context(|| format!("waiting for {what}"))?;
            if done(&m) {
                return Ok(());
            }
        }
    }

    /// Send raw bytes on the session.
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("write")
    }
}

/// Whether `m` is an End-of-RIB marker for `family` (RFC 4724 §2): an
/// empty UPDATE for IPv4 unicast, an UPDATE holding only an empty
/// MP_UNREACH_NLRI for the others.
pub fn is_end_of_rib(m: &[u8], family: Family) -> bool {
    if m.len() < 23 || m[18] != UPDATE {
        return false;
    }
    match family {
        Family::Ipv4 => m.len() == 23,
        Family::Ipv6 => {
            let body = &m[19..];
            let withdrawn = u16::from_be_bytes([body[0], body[1]]) as usize;
            if withdrawn != 0 {
                return false;
            }
            let attrs = &body[4..];
            let alen = u16::from_be_bytes([body[2], body[3]]) as usize;
            if attrs.len() != alen || alen < 3 {
                return false;
            }
            let (flags, code) = (attrs[0], attrs[1]);
            let (vlen, off) = if flags & 0x10 != 0 {
                (
                    u16::from_be_bytes([attrs[2], *attrs.get(3).unwrap_or(&0)]) as usize,
                    4,
                )
            } else {
                (attrs[2] as usize, 3)
            };
            code == 15 && off + vlen == alen && attrs[off..] == [0, 2, 1]
        }
    }
}

/// Whether `m` is an UPDATE carrying withdrawn routes (IPv4 withdrawn
/// field or MP_UNREACH_NLRI) and not an End-of-RIB marker.
pub fn is_withdrawal(m: &[u8], family: Family) -> bool {
    if m.len() < 23 || m[18] != UPDATE || is_end_of_rib(m, family) {
        return false;
    }
    match family {
        Family::Ipv4 => u16::from_be_bytes([m[19], m[20]]) > 0,
        // An MP_UNREACH_NLRI attribute (type code 15) in the attributes.
        Family::Ipv6 => {
            let body = &m[19..];
            let withdrawn = u16::from_be_bytes([body[0], body[1]]) as usize;
            let start = 4 + withdrawn;
            let mut attrs = body.get(start..).unwrap_or(&[]);
            while attrs.len() >= 3 {
                let ext = attrs[0] & 0x10 != 0;
                let (vlen, off) = if ext {
                    if attrs.len() < 4 {
                        return false;
                    }
                    (u16::from_be_bytes([attrs[2], attrs[3]]) as usize, 4)
                } else {
                    (attrs[2] as usize, 3)
                };
                if attrs[1] == 15 {
                    return true;
                }
                attrs = attrs.get(off + vlen..).unwrap_or(&[]);
            }
            false
        }
    }
}

/// The attributes of an UPDATE and its IPv4 NLRI field, if it is one.
fn update_parts(m: &[u8]) -> Option<(&[u8], &[u8])> {
    if m.len() < 23 || m[18] != UPDATE {
        return None;
    }
    let body = &m[19..];
    let withdrawn = u16::from_be_bytes([body[0], body[1]]) as usize;
    let at = 2 + withdrawn;
    let alen = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]) as usize;
    let attrs = body.get(at + 2..at + 2 + alen)?;
    let nlri = body.get(at + 2 + alen..)?;
    Some((attrs, nlri))
}

/// Prefixes in an NLRI-encoded field (RFC 4271 §4.3: a length octet, then
/// as many octets as the length needs).
fn count_prefixes(mut field: &[u8]) -> usize {
    let mut n = 0;
    while let Some(&bits) = field.first() {
        let octets = (bits as usize).div_ceil(8);
        if field.len() < 1 + octets {
            break;
        }
        field = &field[1 + octets..];
        n += 1;
    }
    n
}

/// Prefixes `m` announces for `family`: the IPv4 NLRI field, or the NLRI
/// of an MP_REACH_NLRI (RFC 4760 §3) for IPv6. Zero for anything else.
pub fn announced(m: &[u8], family: Family) -> usize {
    let Some((mut attrs, nlri)) = update_parts(m) else {
        return 0;
    };
    if family == Family::Ipv4 {
        return count_prefixes(nlri);
    }
    while attrs.len() >= 3 {
        let ext = attrs[0] & 0x10 != 0;
        let (vlen, off) = match (ext, attrs.get(3)) {
            (true, Some(&lo)) => (u16::from_be_bytes([attrs[2], lo]) as usize, 4),
            (true, None) => return 0,
            (false, _) => (attrs[2] as usize, 3),
        };
        let Some(value) = attrs.get(off..off + vlen) else {
            return 0;
        };
        // AFI 2 SAFI 1: the next hop's length, the next hop, a reserved octet.
        if attrs[1] == 14 && value.len() > 4 && value[..3] == [0, 2, 1] {
            let nh = value[3] as usize;
            return value.get(4 + nh + 1..).map_or(0, count_prefixes);
        }
        attrs = &attrs[off + vlen..];
    }
    0
}
