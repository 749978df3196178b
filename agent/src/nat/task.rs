//! The NAT reconciler's task: read our table, compare, rewrite it when it
//! differs; again on every nftables change in the namespace (netlink
//! group NFNLGRP_NFTABLES, what `nft monitor` listens to) and periodically.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket, protocols::NETLINK_NETFILTER};
use nftables::helper::{self, NftablesError};
use tokio::sync::watch;

use super::table::{self, Observed};
use super::{NatError, NatRules, NatStatus};

/// `NFNLGRP_NFTABLES` (linux/netfilter/nfnetlink.h): every ruleset change.
const NFNLGRP_NFTABLES: u32 = 7;
/// How long to gather change events before reading the table again.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Full re-read even without events (events can be lost under load).
const RESYNC: Duration = Duration::from_secs(30);

/// The handle the node keeps: set the desired rules, read the status.
#[derive(Clone)]
pub struct NatReconciler {
    desired: watch::Sender<(u64, Option<NatRules>)>,
    status: watch::Receiver<NatStatus>,
}

/// The task; run it on a thread with a current-thread runtime: `nft` is
/// run synchronously from it.
pub struct NatTask {
    program: OsString,
    desired: watch::Receiver<(u64, Option<NatRules>)>,
    status: watch::Sender<NatStatus>,
}

impl NatReconciler {
    /// A reconciler that runs `program` (`nft` from `PATH` unless told).
    pub fn new(program: Option<OsString>) -> (NatReconciler, NatTask) {
        let (dtx, drx) = watch::channel((0, None));
        let (stx, srx) = watch::channel(NatStatus::default());
        (
            NatReconciler {
                desired: dtx,
                status: srx,
            },
            NatTask {
                program: program.unwrap_or_else(|| "nft".into()),
                desired: drx,
                status: stx,
            },
        )
    }

    /// Replace the desired rules; returns the generation the status will
    /// report once they are applied. Unchanged rules are not re-sent.
    pub fn set_desired(&self, rules: NatRules) -> u64 {
        let mut generation = 0;
        self.desired.send_if_modified(|(g, r)| {
            if r.as_ref() == Some(&rules) {
                generation = *g;
                return false;
            }
            *g += 1;
            *r = Some(rules.clone());
            generation = *g;
            true
        });
        generation
    }

    pub fn status(&self) -> NatStatus {
        self.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<NatStatus> {
        self.status.clone()
    }
}

impl NatTask {
    /// Run until the handle is dropped. Does nothing before the first
    /// desired set: an agent that has not read its pools must not remove
    /// the table a previous run left (established flows keep their NAT in
    /// conntrack either way, but new ones would go out unNATed).
    pub async fn run(mut self) {
        let mut events = match open_events() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "nftables change events unavailable; NAT drift is repaired by the {}-second resync only", RESYNC.as_secs());
                None
            }
        };
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = self.desired.changed() => {
                    if r.is_err() { return; }
                }
                _ = resync.tick() => {}
                r = next_event(&mut events, &mut buf) => {
                    if r.is_err() {
                        tracing::warn!("nftables change events failed; relying on the resync");
                        events = None;
                        continue;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    drain(&mut events, &mut buf);
                }
            }
            let (generation, rules) = self.desired.borrow_and_update().clone();
            if let Some(rules) = rules {
                self.pass(generation, &rules);
            }
        }
    }

    /// One pass: read our table, rewrite it if it differs.
    fn pass(&mut self, generation: u64, rules: &NatRules) {
        let t0 = Instant::now();
        let want = Observed::of(rules);
        let outcome = read(&self.program).and_then(|have| {
            if have.as_ref() == Some(&want) {
                Ok(false)
            } else {
                if let Some(have) = have
                    && (have.present || want.present)
                {
                    tracing::info!(
                        was_present = have.present,
                        wanted = want.present,
                        "NAT table {} differs from the pools; rewriting it",
                        table::TABLE
                    );
                }
                apply(&self.program, rules).map(|()| true)
            }
        });
        self.status.send_modify(|s| match &outcome {
            Ok(wrote) => {
                if s.error.is_some() {
                    tracing::info!("NAT table {} in place again", table::TABLE);
                }
                s.error = None;
                s.generation = generation;
                s.table_present = want.present;
                if *wrote {
                    s.writes += 1;
                    s.last_write_us = t0.elapsed().as_micros() as u64;
                } else {
                    s.adopted += 1;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if s.error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, "natOutgoing is not applied");
                }
                s.error = Some(msg);
            }
        });
    }
}

/// Our table as the kernel has it; `Some(default)` when it is absent, and
/// `None` when it is unreadable (which counts as drift: it is rewritten).
fn read(program: &OsString) -> Result<Option<Observed>, NatError> {
    let args = ["list", "table", "inet", "starling"];
    match helper::get_current_ruleset_with_args(Some(program), &args) {
        Ok(doc) => match Observed::read(&doc) {
            Ok(o) => Ok(Some(o)),
            Err(e) => {
                tracing::warn!(error = %e, "rewriting it");
                Ok(None)
            }
        },
        Err(NftablesError::NftFailed { stderr, .. })
            if stderr.contains("No such file or directory") =>
        {
            Ok(Some(Observed::default()))
        }
        Err(NftablesError::NftInvalidJson(e)) => {
            tracing::warn!(error = %e, "nft listed our table in JSON we cannot read; rewriting it");
            Ok(None)
        }
        Err(e) => Err(nft_error("listing our table", program, e)),
    }
}

fn apply(program: &OsString, rules: &NatRules) -> Result<(), NatError> {
    helper::apply_ruleset_with_args(&table::batch(rules), Some(program), helper::DEFAULT_ARGS)
        .map_err(|e| nft_error("writing our table", program, e))
}

fn nft_error(what: &'static str, program: &OsString, e: NftablesError) -> NatError {
    let why = match e {
        NftablesError::NftExecution { inner, .. } => format!(
            "cannot run {}: {inner} (install nftables: Debian package `nftables`)",
            program.to_string_lossy()
        ),
        NftablesError::NftFailed { stderr, .. } => stderr.trim().to_string(),
        other => other.to_string(),
    };
    NatError::Nft { what, why }
}

fn open_events() -> std::io::Result<TokioSocket> {
    let mut sock = TokioSocket::new(NETLINK_NETFILTER)?;
    sock.socket_mut().bind_auto()?;
    sock.socket_ref().add_membership(NFNLGRP_NFTABLES)?;
    Ok(sock)
}

/// The next change event; never, without a socket.
async fn next_event(events: &mut Option<TokioSocket>, buf: &mut Vec<u8>) -> std::io::Result<()> {
    match events {
        Some(s) => {
            buf.clear();
            match s.recv(buf).await {
                // Overrun: events were lost, which is a reason to re-read.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
                r => r,
            }
        }
        None => std::future::pending().await,
    }
}

/// Drop the events already queued: one read covers them all.
fn drain(events: &mut Option<TokioSocket>, buf: &mut Vec<u8>) {
    if let Some(s) = events {
        loop {
            buf.clear();
            match s.socket_ref().recv(buf, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nft_is_an_error_that_names_the_program_and_the_package() {
        let e = read(&OsString::from("/nonexistent/nft"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/nft"), "{e}");
        assert!(e.contains("nftables"), "{e}");
    }

    #[test]
    fn set_desired_counts_generations_only_for_changes() {
        let (h, _task) = NatReconciler::new(None);
        let r = NatRules::default();
        assert_eq!(h.set_desired(r.clone()), 1);
        assert_eq!(h.set_desired(r), 1);
        let r2 = NatRules {
            masq_v4: vec!["10.0.0.0/8".parse().unwrap()],
            ..NatRules::default()
        };
        assert_eq!(h.set_desired(r2), 2);
    }
}
