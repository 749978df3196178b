//! Entering a network namespace: the one place the plugin needs `unsafe`
//! (the `setns` syscall). Only the calling thread moves, so the plugin keeps
//! everything on one thread (a current-thread runtime).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The calling thread's current network namespace, to come back to.
pub fn current() -> io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

pub fn open(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// While alive, the calling thread is inside `target`; dropping it returns to
/// the namespace the thread was in.
pub struct Entered {
    home: File,
}

pub fn enter(target: &File) -> io::Result<Entered> {
    let home = current()?;
    set(target)?;
    Ok(Entered { home })
}

impl Drop for Entered {
    fn drop(&mut self) {
        // Failing to return would leave host-side work in the pod's namespace:
        // abort rather than continue in the wrong place.
        if let Err(e) = set(&self.home) {
            eprintln!("starling: cannot return to the host network namespace: {e}");
            std::process::abort();
        }
    }
}

fn set(ns: &File) -> io::Result<()> {
    // SAFETY: setns takes a file descriptor we own for the duration of the
    // call and a namespace type constant; it touches no Rust-managed memory.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
