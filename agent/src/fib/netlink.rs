//! rtnetlink I/O: many requests per write, errors matched by sequence
//! number, dumps, and the event subscription.
//!
//! The kernel handles every message of one `send` before the call returns
//! (rtnetlink input runs synchronously under RTNL), so a batch whose last
//! message asks for an ACK is complete once that ACK arrives; every other
//! message only answers when it fails. That is what makes a batch cheap:
//! one syscall and no reply for thousands of routes.

use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;

/// Receive and send buffers large enough that a batch's error replies and a
/// burst of route events fit (SO_*BUFFORCE, we run as root; plain SO_*BUF
/// is capped by net.core.[rw]mem_max).
const SOCKET_BUFFER: i32 = 32 << 20;

/// The multicast groups that tell us our table, our links or our addresses changed.
const RTNLGRP_LINK: u32 = 1;
/// Neighbour and FDB changes (the VXLAN device's entries).
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// A request that failed: its index in the batch and the kernel's errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Nack {
    pub index: usize,
    pub errno: i32,
}

pub(crate) fn errno_text(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

fn force_buffer(fd: i32, option: libc::c_int, bytes: i32) -> io::Result<()> {
    // SAFETY: setsockopt reads exactly size_of::<i32>() bytes from a live i32.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn enlarge(sock: &TokioSocket) {
    let fd = sock.as_raw_fd();
    // Without CAP_NET_ADMIN the forced sizes fail; fall back to the capped ones.
    if force_buffer(fd, libc::SO_RCVBUFFORCE, SOCKET_BUFFER).is_err() {
        let _ = force_buffer(fd, libc::SO_RCVBUF, SOCKET_BUFFER);
    }
    if force_buffer(fd, libc::SO_SNDBUFFORCE, SOCKET_BUFFER).is_err() {
        let _ = force_buffer(fd, libc::SO_SNDBUF, SOCKET_BUFFER);
    }
}

/// The request socket: batches, single requests and dumps.
pub(crate) struct RtSocket {
    sock: TokioSocket,
    /// The kernel-assigned port ID; the kernel stamps it into the
    /// notifications our requests cause.
    port: u32,
    seq: u32,
    rx: Vec<u8>,
    tx: Vec<u8>,
}

impl RtSocket {
    pub fn open() -> io::Result<RtSocket> {
        let mut sock = TokioSocket::new(NETLINK_ROUTE)?;
        let port = sock.socket_mut().bind_auto()?.port_number();
        sock.socket_mut().connect(&SocketAddr::new(0, 0))?;
        // Errors then carry only the request's header, not the whole request:
        // a failed batch of 100k routes must not need 100k full copies.
        sock.socket_ref().set_cap_ack(true)?;
        // Lets the kernel filter dumps by table and protocol.
        sock.socket_ref().set_netlink_get_strict_chk(true)?;
        enlarge(&sock);
        Ok(RtSocket {
            sock,
            port,
            seq: 1,
            rx: Vec::with_capacity(1 << 20),
            tx: Vec::with_capacity(1 << 20),
        })
    }

    /// This socket's netlink port ID (what [`EventSocket::ignore_routes_from`] takes).
    pub fn port(&self) -> u32 {
        self.port
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn push(&mut self, msg: RouteNetlinkMessage, flags: u16, seq: u32) {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let at = self.tx.len();
        self.tx.resize(at + nl.buffer_len(), 0);
        nl.serialize(&mut self.tx[at..]);
    }

    /// Send `msgs` (each with its own NLM_F_* flags), packing about
    /// `chunk_bytes` per write, and return the ones the kernel refused.
    pub async fn batch<I>(&mut self, msgs: I, chunk_bytes: usize) -> io::Result<Vec<Nack>>
    where
        I: IntoIterator<Item = (RouteNetlinkMessage, u16)>,
    {
        let mut nacks = Vec::new();
        let mut msgs = msgs.into_iter().enumerate().peekable();
        while msgs.peek().is_some() {
            self.tx.clear();
            let first_seq = self.seq.wrapping_add(1);
            let first_index = msgs.peek().map(|(i, _)| *i).unwrap_or(0);
            let mut last_seq = first_seq;
            while let Some((_, (msg, flags))) = msgs.next() {
                let seq = self.next_seq();
                last_seq = seq;
                let last = self.tx.len() >= chunk_bytes || msgs.peek().is_none();
                self.push(msg, if last { flags | NLM_F_ACK } else { flags }, seq);
                if last {
                    break;
                }
            }
            self.sock.send(&self.tx).await?;
            self.collect(first_seq, first_index, last_seq, &mut nacks)
                .await?;
        }
        Ok(nacks)
    }

    /// Read replies until the ACK (or error) of `last_seq`, recording errors.
    async fn collect(
        &mut self,
        first_seq: u32,
        first_index: usize,
        last_seq: u32,
        nacks: &mut Vec<Nack>,
    ) -> io::Result<()> {
        loop {
            self.rx.clear();
            self.sock.recv(&mut self.rx).await?;
            let mut done = false;
            for (kind, seq, body) in frames(&self.rx) {
                if kind != NLMSG_ERROR || body.len() < 4 {
                    continue;
                }
                let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                if code != 0 {
                    let index = first_index + seq.wrapping_sub(first_seq) as usize;
                    nacks.push(Nack {
                        index,
                        errno: -code,
                    });
                }
                if seq == last_seq {
                    done = true;
                }
            }
            if done {
                return Ok(());
            }
        }
    }

    /// One request, waiting for its ACK.
    pub async fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let nacks = self.batch([(msg, flags)], usize::MAX).await?;
        match nacks.first() {
            Some(n) => Err(io::Error::from_raw_os_error(n.errno)),
            None => Ok(()),
        }
    }

    /// Dump with `msg` as the filter, handing every reply to `each`. A dump
    /// that the kernel marks interrupted (the table changed under it) is
    /// started again, `each` being told so with `None` first.
    pub async fn dump<F>(&mut self, msg: RouteNetlinkMessage, mut each: F) -> io::Result<()>
    where
        F: FnMut(Option<RouteNetlinkMessage>),
    {
        self.dump_raw(msg, |m| match m {
            None => each(None),
            Some((kind, body)) => {
                if let Some(m) = parse_inner(kind, body) {
                    each(Some(m));
                }
            }
        })
        .await
    }

    /// [`RtSocket::dump`] handing over each reply's type and body unparsed.
    pub async fn dump_raw<F>(&mut self, msg: RouteNetlinkMessage, mut each: F) -> io::Result<()>
    where
        F: FnMut(Option<(u16, &[u8])>),
    {
        'again: for _attempt in 0..8 {
            self.tx.clear();
            let seq = self.next_seq();
            self.push(msg.clone(), NLM_F_DUMP, seq);
            self.sock.send(&self.tx).await?;
            let mut interrupted = false;
            loop {
                self.rx.clear();
                self.sock.recv(&mut self.rx).await?;
                for (kind, got_seq, body, flags) in frames_with_flags(&self.rx) {
                    if got_seq != seq {
                        continue;
                    }
                    interrupted |= flags & NLM_F_DUMP_INTR != 0;
                    match kind {
                        NLMSG_DONE => {
                            if interrupted {
                                each(None);
                                continue 'again;
                            }
                            return Ok(());
                        }
                        NLMSG_ERROR => {
                            let code = body
                                .get(..4)
                                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                                .unwrap_or(0);
                            if code != 0 {
                                return Err(io::Error::from_raw_os_error(-code));
                            }
                        }
                        _ => each(Some((kind, body))),
                    }
                }
            }
        }
        Err(io::Error::other(
            "dump interrupted 8 times in a row; the table keeps changing",
        ))
    }
}

fn parse_inner(kind: u16, body: &[u8]) -> Option<RouteNetlinkMessage> {
    use netlink_packet_core::NetlinkDeserializable;
    let mut header = NetlinkHeader::default();
    header.message_type = kind;
    header.length = (body.len() + NLMSG_HDRLEN) as u32;
    RouteNetlinkMessage::deserialize(&header, body).ok()
}

/// Split a datagram into (type, seq, body).
fn frames(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    frames_with_flags(buf).map(|(k, s, b, _)| (k, s, b))
}

fn frames_with_flags(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8], u16)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let h = buf.get(at..at + NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let flags = u16::from_ne_bytes([h[6], h[7]]);
        let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return None;
        }
        let body = &buf[at + NLMSG_HDRLEN..at + len];
        at += (len + 3) & !3;
        Some((kind, seq, body, flags))
    })
}

/// What the subscription saw.
pub(crate) enum Event {
    Message(RouteNetlinkMessage),
    /// The kernel dropped events (ENOBUFS): only a full resync is safe.
    Overrun,
}

/// The subscription to route, link, address and neighbour changes.
pub(crate) struct EventSocket {
    sock: TokioSocket,
    rx: Vec<u8>,
}

impl EventSocket {
    pub fn open() -> io::Result<EventSocket> {
        let mut sock = TokioSocket::new(NETLINK_ROUTE)?;
        sock.socket_mut().bind_auto()?;
        for g in [
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_IFADDR,
            RTNLGRP_IPV6_ROUTE,
        ] {
            sock.socket_ref().add_membership(g)?;
        }
        enlarge(&sock);
        Ok(EventSocket {
            sock,
            rx: Vec::with_capacity(1 << 20),
        })
    }

    /// Have the kernel drop, before they are queued to this socket, the
    /// route notifications caused by requests of the socket with port ID
    /// `port`: our own adds and deletes echoed back. A bulk load of 100k
    /// routes would otherwise queue 100k notifications here (overflowing
    /// the buffer, which costs a full resync afterwards) and have each one
    /// parsed only to find it matches what we wrote. Notifications of
    /// anyone else (port 0 for the kernel's own, e.g. a link going down)
    /// still arrive.
    pub fn ignore_routes_from(&self, port: u32) -> io::Result<()> {
        let prog = own_route_filter(port);
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the kernel copies the program during the call; `prog`
        // and `fprog` outlive it.
        let rc = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Wait for the next datagram and hand its messages to `each`.
    pub async fn next<F: FnMut(Event)>(&mut self, mut each: F) -> io::Result<()> {
        self.rx.clear();
        match self.sock.recv(&mut self.rx).await {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                each(Event::Overrun);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        for (kind, _, body) in frames(&self.rx) {
            if let Some(m) = parse_inner(kind, body) {
                each(Event::Message(m));
            }
        }
        Ok(())
    }

    /// Take whatever else is already queued, without waiting.
    pub fn drain<F: FnMut(Event)>(&mut self, mut each: F) -> io::Result<()> {
        loop {
            self.rx.clear();
            match self
                .sock
                .socket_ref()
                .recv(&mut self.rx, libc::MSG_DONTWAIT)
            {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    each(Event::Overrun);
                    continue;
                }
                Err(e) => return Err(e),
            }
            for (kind, _, body) in frames(&self.rx) {
                if let Some(m) = parse_inner(kind, body) {
                    each(Event::Message(m));
                }
            }
        }
    }
}

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;

/// Classic BPF over one notification (one message per skb): drop it when
/// its type is RTM_NEWROUTE or RTM_DELROUTE and its `nlmsg_pid` is `port`,
/// accept everything else. BPF loads read big-endian while the netlink
/// header is in host order, so the constants are compared as the load
/// sees the host's bytes.
fn own_route_filter(port: u32) -> [libc::sock_filter; 7] {
    // linux/bpf_common.h; BPF_LD, BPF_W and BPF_K are 0.
    const BPF_H: u16 = 0x08;
    const BPF_ABS: u16 = 0x20;
    const BPF_JMP: u16 = 0x05;
    const BPF_JEQ: u16 = 0x10;
    const BPF_RET: u16 = 0x06;
    const LD_H_ABS: u16 = BPF_H | BPF_ABS;
    const LD_W_ABS: u16 = BPF_ABS;
    const JEQ_K: u16 = BPF_JMP | BPF_JEQ;
    const RET_K: u16 = BPF_RET;
    let half = |v: u16| u32::from(u16::from_be_bytes(v.to_ne_bytes()));
    let word = |v: u32| u32::from_be_bytes(v.to_ne_bytes());
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        // nlmsg_type at offset 4, nlmsg_pid at offset 12.
        op(LD_H_ABS, 0, 0, 4),
        op(JEQ_K, 1, 0, half(RTM_NEWROUTE)),
        op(JEQ_K, 0, 3, half(RTM_DELROUTE)),
        op(LD_W_ABS, 0, 0, 12),
        op(JEQ_K, 0, 1, word(port)),
        op(RET_K, 0, 0, 0),
        op(RET_K, 0, 0, u32::MAX),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel checks a classic BPF program when it is attached: a
    /// malformed jump or load would be refused here.
    #[tokio::test]
    async fn the_kernel_accepts_the_own_route_filter() {
        let events = EventSocket::open().expect("netlink socket");
        events
            .ignore_routes_from(0x1234_5678)
            .expect("SO_ATTACH_FILTER accepted");
    }

    #[test]
    fn the_own_route_filter_drops_only_route_messages_of_that_port() {
        let prog = own_route_filter(0x0102_0304);
        // The two type tests lead to the port test, which leads to drop.
        assert_eq!(
            prog[1].k,
            u32::from(u16::from_be_bytes(24u16.to_ne_bytes()))
        );
        assert_eq!(
            prog[2].k,
            u32::from(u16::from_be_bytes(25u16.to_ne_bytes()))
        );
        assert_eq!(1 + 1 + prog[1].jt as usize, 3);
        assert_eq!(2 + 1 + prog[2].jf as usize, 6);
        assert_eq!(prog[4].k, u32::from_be_bytes(0x0102_0304u32.to_ne_bytes()));
        assert_eq!(4 + 1 + prog[4].jt as usize, 5);
        assert_eq!(4 + 1 + prog[4].jf as usize, 6);
        assert_eq!((prog[5].k, prog[6].k), (0, u32::MAX));
    }

    #[test]
    fn frames_splits_aligned_messages_and_stops_at_garbage() {
        let mut buf = Vec::new();
        for (kind, seq, body) in [
            (24u16, 7u32, vec![1u8, 2, 3]),
            (NLMSG_DONE, 8, vec![0, 0, 0, 0]),
        ] {
            let len = (NLMSG_HDRLEN + body.len()) as u32;
            buf.extend_from_slice(&len.to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&body);
            while buf.len() % 4 != 0 {
                buf.push(0);
            }
        }
        buf.extend_from_slice(&[0xff; 7]);
        let got: Vec<_> = frames(&buf).map(|(k, s, b)| (k, s, b.len())).collect();
        assert_eq!(got, vec![(24, 7, 3), (NLMSG_DONE, 8, 4)]);
    }
}
