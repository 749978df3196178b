//! The kernel socket options BGP needs that the standard library lacks:
//! TCP-MD5 signatures (RFC 2385) and the generalized TTL security mechanism
//! (GTSM, RFC 5082). The only `unsafe` in the crate is here.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

const TCP_MD5SIG: libc::c_int = 14;
const TCP_MD5SIG_MAXKEYLEN: usize = 80;
const IP_MINTTL: libc::c_int = 21;
const IPV6_MINHOPCOUNT: libc::c_int = 73;

/// `struct tcp_md5sig` from linux/tcp.h.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; TCP_MD5SIG_MAXKEYLEN],
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live, properly sized `T` for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sockaddr_storage(addr: IpAddr) -> libc::sockaddr_storage {
    let sa: socket2::SockAddr = SocketAddr::new(addr, 0).into();
    // SAFETY: sockaddr_storage is plain data; we copy at most its size.
    unsafe {
        let mut st: libc::sockaddr_storage = std::mem::zeroed();
        std::ptr::copy_nonoverlapping(
            sa.as_ptr() as *const u8,
            &mut st as *mut _ as *mut u8,
            (sa.len() as usize).min(std::mem::size_of::<libc::sockaddr_storage>()),
        );
        st
    }
}

/// Install (or, with `None`, remove) the TCP-MD5 key for `peer` on a socket.
/// On a listening socket it applies to connections accepted from `peer`.
pub fn set_md5(sock: &impl AsRawFd, peer: IpAddr, key: Option<&str>) -> io::Result<()> {
    let key = key.unwrap_or("");
    if key.len() > TCP_MD5SIG_MAXKEYLEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("TCP-MD5 password for {peer} is longer than {TCP_MD5SIG_MAXKEYLEN} bytes"),
        ));
    }
    let mut sig = TcpMd5Sig {
        addr: sockaddr_storage(peer),
        flags: 0,
        prefixlen: 0,
        keylen: key.len() as u16,
        ifindex: 0,
        key: [0; TCP_MD5SIG_MAXKEYLEN],
    };
    sig.key[..key.len()].copy_from_slice(key.as_bytes());
    setsockopt(sock.as_raw_fd(), libc::IPPROTO_TCP, TCP_MD5SIG, &sig)
}

/// The TTL (hop limit) of packets we send.
pub fn set_ttl(sock: &impl AsRawFd, v6: bool, ttl: u8) -> io::Result<()> {
    let v = ttl as libc::c_int;
    if v6 {
        setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_UNICAST_HOPS,
            &v,
        )
    } else {
        setsockopt(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TTL, &v)
    }
}

/// GTSM (RFC 5082): send with TTL 255 and drop anything that arrives with a
/// TTL below `255 - hops + 1`.
pub fn set_gtsm(sock: &impl AsRawFd, v6: bool, hops: u8) -> io::Result<()> {
    set_ttl(sock, v6, 255)?;
    let min = (256 - hops.max(1) as i32) as libc::c_int;
    if v6 {
        setsockopt(sock.as_raw_fd(), libc::IPPROTO_IPV6, IPV6_MINHOPCOUNT, &min)
    } else {
        setsockopt(sock.as_raw_fd(), libc::IPPROTO_IP, IP_MINTTL, &min)
    }
}
