//! A hand-made BGP peer: plain TCP from inside a test namespace, OPEN and
//! KEEPALIVE done by the book, then whatever bytes the test writes, so a
//! system test can send UPDATEs no real implementation would. A thread keeps
//! the session alive with KEEPALIVEs and records what the other side sends
//! (NOTIFICATIONs above all) until the connection closes.

use crate::Netns;
use anyhow::{Context, Result, anyhow, bail};
use starling_bgp::Family;
use starling_bgp::wire;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the other side sent, as the reader thread saw it.
#[derive(Debug, Default)]
pub struct Heard {
    /// (code, subcode) of every NOTIFICATION received.
    pub notifications: Vec<(u8, u8)>,
    /// The connection is closed.
    pub closed: bool,
    /// UPDATE messages received, raw.
    pub updates: Vec<Vec<u8>>,
}

pub struct RawPeer {
    writer: Arc<Mutex<TcpStream>>,
    pub heard: Arc<Mutex<Heard>>,
}

/// A TCP connection to `to` made from inside `ns` (a thread joins the
/// namespace for the `connect`; the socket stays in it afterwards).
fn connect_in(ns: &Netns, to: SocketAddr) -> Result<TcpStream> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::scope(|s| {
        s.spawn(|| -> Result<TcpStream> {
            let f = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .with_context(|| format!("connect to {to} from {}", ns.name))
        })
        .join()
        .map_err(|_| anyhow!("the connect thread panicked"))?
    })
}

impl RawPeer {
    /// Connect from `ns` to the speaker at `to` port 179, retrying until it
    /// listens, and bring the session to Established: our OPEN (AS `asn`,
    /// IPv4 and IPv6 unicast, 4-octet AS), theirs, KEEPALIVEs both ways.
    pub fn establish(
        ns: &Netns,
        to: IpAddr,
        asn: u32,
        router_id: Ipv4Addr,
        hold_time: u16,
        timeout: Duration,
    ) -> Result<RawPeer> {
        let until = Instant::now() + timeout;
        let mut s = loop {
            match connect_in(ns, SocketAddr::new(to, 179)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > until => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        s.set_read_timeout(Some(timeout))?;
        let open = wire::build_open(&wire::OpenParams {
            asn,
            hold_time,
            router_id,
            families: vec![Family::Ipv4, Family::Ipv6],
            graceful_restart: None,
            extended_message: false,
        });
        s.write_all(&wire::encode(&open))?;
        let mut buf = Vec::new();
        let mut got = (false, false);
        while !(got.0 && got.1) {
            let m = read_message(&mut s, &mut buf).context("waiting for OPEN and KEEPALIVE")?;
            match m[18] {
                1 => got.0 = true,
                4 => got.1 = true,
                3 => bail!("the speaker sent a NOTIFICATION {}/{}", m[19], m[20]),
                _ => {}
            }
        }
        s.write_all(&wire::keepalive())?;
        s.set_read_timeout(None)?;
        let writer = Arc::new(Mutex::new(s.try_clone()?));
        let heard = Arc::new(Mutex::new(Heard::default()));
        let keepalive = Duration::from_secs((hold_time / 3).max(1) as u64);
        {
            let heard = heard.clone();
            std::thread::spawn(move || {
                let mut buf = buf;
                loop {
                    match read_message(&mut s, &mut buf) {
                        Ok(m) => {
                            let mut h = heard.lock().expect("lock");
                            match m[18] {
                                3 => h.notifications.push((m[19], m[20])),
                                2 => h.updates.push(m),
                                _ => {}
                            }
                        }
                        Err(_) => {
                            heard.lock().expect("lock").closed = true;
                            return;
                        }
                    }
                }
            });
        }
        {
            let (writer, heard) = (writer.clone(), heard.clone());
            std::thread::spawn(move || {
                loop {
                    std::thread::sleep(keepalive);
                    if heard.lock().expect("lock").closed {
                        return;
                    }
                    let mut w = writer.lock().expect("lock");
                    if w.write_all(&wire::keepalive()).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(RawPeer { writer, heard })
    }

    /// Write raw bytes (one or more whole messages).
    pub fn send(&self, bytes: &[u8]) -> Result<()> {
        let mut w = self.writer.lock().map_err(|_| anyhow!("lock"))?;
        w.write_all(bytes).context("write to the speaker")
    }

    pub fn notifications(&self) -> Vec<(u8, u8)> {
        self.heard.lock().expect("lock").notifications.clone()
    }

    pub fn closed(&self) -> bool {
        self.heard.lock().expect("lock").closed
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// One whole message from `s`, buffering in `buf`.
fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>> {
    loop {
        if buf.len() >= 19 {
            let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
            if len < 19 {
                bail!("bad message length {len}");
            }
            if buf.len() >= len {
                return Ok(buf.drain(..len).collect());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// UPDATE building blocks for tests: attributes and whole messages.
pub mod update {
    pub const WELL_KNOWN: u8 = 0x40;
    pub const OPT_TRANS: u8 = 0xc0;
    pub const OPT: u8 = 0x80;

    pub fn attr(flags: u8, code: u8, value: &[u8]) -> Vec<u8> {
        let mut a = vec![flags, code, value.len() as u8];
        a.extend_from_slice(value);
        a
    }

    /// An UPDATE of raw withdrawn routes, attributes and NLRI.
    pub fn message(withdrawn: &[u8], attrs: &[Vec<u8>], nlri: &[u8]) -> Vec<u8> {
        let a: Vec<u8> = attrs.concat();
        let mut m = vec![0xff; 16];
        let len = 19 + 2 + withdrawn.len() + 2 + a.len() + nlri.len();
        m.extend_from_slice(&(len as u16).to_be_bytes());
        m.push(2);
        m.extend_from_slice(&(withdrawn.len() as u16).to_be_bytes());
        m.extend_from_slice(withdrawn);
        m.extend_from_slice(&(a.len() as u16).to_be_bytes());
        m.extend_from_slice(&a);
        m.extend_from_slice(nlri);
        m
    }

    /// ORIGIN IGP, AS_PATH [asn] (4-octet), NEXT_HOP `nh`.
    pub fn mandatory(asn: u32, nh: [u8; 4]) -> Vec<Vec<u8>> {
        let mut path = vec![2, 1];
        path.extend_from_slice(&asn.to_be_bytes());
        vec![
            attr(WELL_KNOWN, 1, &[0]),
            attr(WELL_KNOWN, 2, &path),
            attr(WELL_KNOWN, 3, &nh),
        ]
    }

    /// The NLRI encoding of an IPv4 prefix.
    pub fn nlri(p: ipnet::Ipv4Net) -> Vec<u8> {
        let n = (p.prefix_len() as usize).div_ceil(8);
        let mut v = vec![p.prefix_len()];
        v.extend_from_slice(&p.network().octets()[..n]);
        v
    }
}
