//! Serving IPAM to the CNI plugin.
//!
//! One thread owns [`Ipam`] and the [`Store`]. It takes every request that is
//! waiting, applies them all, commits them in one durable transaction, and
//! only then answers each: group commit, so 200 pods starting at once cost a
//! handful of fsyncs rather than 200, and no reply ever describes state a
//! crash could lose.
//!
//! Block claims (API calls) never run on that thread: an ADD that needs a
//! new block waits while a claim thread talks to the datastore, and every
//! other request, pods in blocks already held included, goes on being
//! served. Pods wait for a claim at most the block claim timeout; a claim
//! that finishes after it is still adopted.
//!
//! The socket is root-only twice over: mode 0600, and the peer's uid is
//! checked on every connection (SO_PEERCRED).

use ipnet::IpNet;
use starling_cni_proto::{
    self as proto, AddReply, AgentError, Envelope, ErrorKind, PodRoute, Reply, Request, Response,
};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::annotations::AnnotationReader;
use super::{Change, Choice, ClaimPlan, Ipam, IpamError, Pool, Store, Want};
use crate::metrics::{CniCommand, Metrics};
use crate::mtu::PodMtu;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Requests applied (and committed) together at most.
const MAX_BATCH: usize = 256;

/// How long a connected client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent tells the plugin besides addresses.
#[derive(Debug, Clone)]
pub struct PodDefaults {
    /// Worked out for every batch of requests: a changed uplink MTU
    /// reaches the next pod.
    pub mtu: PodMtu,
    pub route_protocol: u8,
}

/// [`PodDefaults`] as they are for one batch.
#[derive(Debug, Clone, Copy)]
struct Answer {
    mtu: u32,
    route_protocol: u8,
}

struct Job {
    envelope: Envelope,
    /// The operator's choice for the pod (annotations), read before the
    /// job reaches the IPAM thread.
    choice: Choice,
    reply: oneshot::Sender<Response>,
}

/// What the IPAM thread hears: requests, and how its block claims went.
enum Msg {
    Job(Box<Job>),
    /// A claim for the family (`v4`) is past its timeout, still running.
    ClaimLate {
        v4: bool,
        why: String,
    },
    /// A claim ended: the blocks to adopt, or why none.
    Claimed {
        v4: bool,
        want: Want,
        result: Result<Vec<IpNet>, IpamError>,
    },
    /// A node asked to borrow from this node's block (its record is
    /// `requested`): open it.
    Requested(IpNet),
    /// The opening write of the block's record ended.
    Opened(IpNet),
    /// The model changed: pools, this node's labels, reservations.
    Model {
        pools: Vec<Pool>,
        labels: BTreeMap<String, String>,
        reserved: Vec<IpNet>,
    },
}

/// The running IPAM owner: send it requests, watch the pod routes it wants.
#[derive(Clone)]
pub struct IpamHandle {
    jobs: mpsc::Sender<Msg>,
    routes: watch::Receiver<Vec<PodRoute>>,
    blocks: watch::Receiver<Vec<IpNet>>,
    lent: watch::Receiver<Vec<IpNet>>,
    metrics: Option<Metrics>,
    annotations: Option<Arc<AnnotationReader>>,
}

impl IpamHandle {
    /// Start the owner thread.
    pub fn spawn(ipam: Ipam, store: Store, defaults: PodDefaults) -> IpamHandle {
        let (jobs, rx) = mpsc::channel(4 * MAX_BATCH);
        let (routes_tx, routes) = watch::channel(ipam.pod_routes());
        let (blocks_tx, blocks) = watch::channel(ipam.announced());
        let (lent_tx, lent) = watch::channel(ipam.lent_blocks());
        if let Some(shared) = ipam.shared_blocks() {
            watch_records(shared, ipam.node().to_string(), jobs.downgrade());
        }
        let owner = Owner {
            ipam,
            store,
            defaults,
            // Weak: the thread ends when the last handle goes.
            claims_to: jobs.downgrade(),
            claiming: [false; 2],
            parked: Vec::new(),
            routes: routes_tx,
            blocks: blocks_tx,
            lent: lent_tx,
            opening: std::collections::HashSet::new(),
        };
        std::thread::Builder::new()
            .name("ipam".into())
            .spawn(move || owner.run(rx))
            .expect("spawning the IPAM thread");
        IpamHandle {
            jobs,
            routes,
            blocks,
            lent,
            metrics: None,
            annotations: None,
        }
    }

    /// Read each ADD's pod and namespace annotations (pools, static
    /// addresses) from the API server before allocating.
    pub fn with_annotations(mut self, reader: AnnotationReader) -> IpamHandle {
        self.annotations = Some(Arc::new(reader));
        self
    }

    /// Tell IPAM about a model change: pools and node selectors apply to
    /// the next ADD and block claim; reservations to the next allocation.
    /// Nothing already handed out moves.
    pub async fn set_model(
        &self,
        pools: Vec<Pool>,
        labels: BTreeMap<String, String>,
        reserved: Vec<IpNet>,
    ) {
        let _ = self
            .jobs
            .send(Msg::Model {
                pools,
                labels,
                reserved,
            })
            .await;
    }

    /// Record how long each plugin request on the socket takes, by command
    /// (`starling_cni_request_duration_seconds`).
    pub fn with_metrics(mut self, metrics: Metrics) -> IpamHandle {
        self.metrics = Some(metrics);
        self
    }

    /// The blocks this node holds, updated when it claims one: what the
    /// agent announces over BGP and blackholes.
    pub fn blocks(&self) -> watch::Receiver<Vec<IpNet>> {
        self.blocks.clone()
    }

    /// The blocks this node holds that other nodes borrow from (they have
    /// an IPAMBlock record): the borrowers' host routes inside them are
    /// accepted from BGP.
    pub fn lent(&self) -> watch::Receiver<Vec<IpNet>> {
        self.lent.clone()
    }

    /// The host routes the node's pods need (`<ip> dev <veth>`), updated
    /// after every commit: the desired state the FIB reconciler installs.
    pub fn pod_routes(&self) -> watch::Receiver<Vec<PodRoute>> {
        self.routes.clone()
    }

    /// Apply one request, as the socket does.
    pub async fn request(&self, envelope: Envelope) -> Response {
        let (tx, rx) = oneshot::channel();
        let mut choice = Choice::default();
        if let (Some(reader), Request::Add(add)) = (&self.annotations, &envelope.request)
            && let Some(pod) = &add.pod
        {
            match reader.choice(pod, envelope.remaining()).await {
                Ok((c, source)) => {
                    if let Some(m) = &self.metrics {
                        m.annotation_read(source.label());
                    }
                    choice = c;
                }
                Err(e) => return error_response(e),
            }
        }
        let deadline = envelope.remaining();
        if self
            .jobs
            .send(Msg::Job(Box::new(Job {
                envelope,
                choice,
                reply: tx,
            })))
            .await
            .is_err()
        {
            return not_ready("the IPAM thread has stopped");
        }
        // Past the deadline the plugin has gone; answering later is harmless
        // (the owner drops late requests before applying them).
        match tokio::time::timeout(deadline + Duration::from_secs(1), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => not_ready("the IPAM thread has stopped"),
            Err(_) => Response::Err(AgentError {
                kind: ErrorKind::DeadlineExceeded,
                message: "request deadline passed in the agent".into(),
            }),
        }
    }
}

fn not_ready(msg: &str) -> Response {
    Response::Err(AgentError {
        kind: ErrorKind::NotReady,
        message: msg.into(),
    })
}

fn error_response(e: IpamError) -> Response {
    let kind = match &e {
        IpamError::Exhausted(_) => ErrorKind::Exhausted,
        IpamError::Invalid(_) | IpamError::Config(_) => ErrorKind::InvalidRequest,
        IpamError::Datastore(_) | IpamError::Store(_) | IpamError::NeedsBlock { .. } => {
            ErrorKind::Store
        }
        // Nothing was allocated; the plugin returns 11 (try again later).
        IpamError::ClaimTimeout(_) | IpamError::AnnotationsUnavailable(_) => {
            ErrorKind::DeadlineExceeded
        }
        IpamError::AddressInUse(_) => ErrorKind::AddressInUse,
        IpamError::AddressNotAllowed(_) => ErrorKind::AddressNotAllowed,
        IpamError::BadAnnotation(_) => ErrorKind::BadAnnotation,
    };
    Response::Err(AgentError {
        kind,
        message: e.to_string(),
    })
}

/// The IPAM thread's state.
struct Owner {
    ipam: Ipam,
    store: Store,
    defaults: PodDefaults,
    claims_to: mpsc::WeakSender<Msg>,
    /// A claim thread is running, per family (`[IPv4, IPv6]`).
    claiming: [bool; 2],
    /// ADDs waiting for a block of the family (`true`: IPv4), and which.
    parked: Vec<(Job, bool, Want)>,
    routes: watch::Sender<Vec<PodRoute>>,
    blocks: watch::Sender<Vec<IpNet>>,
    lent: watch::Sender<Vec<IpNet>>,
    /// Blocks whose record's opening write is under way.
    opening: std::collections::HashSet<IpNet>,
}

/// What applying one request came to.
enum Applied {
    Answer(Box<Response>),
    /// The ADD needs a block of the family (`true`: IPv4).
    Park(bool, Want),
}

impl Owner {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = Vec::new();
            let mut msg = Some(first);
            while let Some(m) = msg.take() {
                match m {
                    Msg::Job(job) => batch.push(*job),
                    Msg::ClaimLate { v4, why } => self.answer_parked(v4, |_| {
                        Response::Err(AgentError {
                            kind: ErrorKind::DeadlineExceeded,
                            message: format!("{why}; nothing allocated, try again"),
                        })
                    }),
                    Msg::Claimed { v4, want, result } => {
                        self.claiming[usize::from(!v4)] = false;
                        let failed = self.claimed(v4, &want, result);
                        let (again, rest): (Vec<_>, Vec<_>) =
                            self.parked.drain(..).partition(|(_, f, _)| *f == v4);
                        self.parked = rest;
                        for (job, _, w) in again {
                            match &failed {
                                Some(r) if w == want => {
                                    let _ = job.reply.send(r.clone());
                                }
                                _ => batch.push(job),
                            }
                        }
                    }
                    Msg::Requested(block) => self.open(block),
                    Msg::Opened(block) => {
                        self.opening.remove(&block);
                    }
                    Msg::Model {
                        pools,
                        labels,
                        reserved,
                    } => {
                        self.ipam.set_pools(pools, labels);
                        self.ipam.set_reserved(reserved);
                    }
                }
                if batch.len() < MAX_BATCH {
                    msg = rx.try_recv().ok();
                }
            }
            if !self.apply_batch(batch) {
                return;
            }
        }
    }

    /// Take a claim's or a borrow's result in; the error for the ADDs that
    /// waited for it, if any. A claim that found every block of the pools
    /// held is no error on a node that borrows: its ADDs are applied again
    /// and borrow.
    fn claimed(
        &mut self,
        v4: bool,
        want: &Want,
        result: Result<Vec<IpNet>, IpamError>,
    ) -> Option<Response> {
        match (want, result) {
            (Want::Borrow { key, .. }, Ok(got)) => self.ipam.lend_result(key, &got),
            (_, Ok(blocks)) => self.ipam.adopt(&blocks),
            (Want::Pools(_), Err(IpamError::Exhausted(why))) if self.ipam.borrows() => {
                tracing::info!(%why, "no block to claim; borrowing");
                self.ipam.set_pools_full(v4);
            }
            (_, Err(e)) => return Some(error_response(e)),
        }
        None
    }

    /// The owner's side of a borrow request: stop handing out the block's
    /// addresses from the store, then mark what it holds in the block and
    /// open the record in one write, on a thread of its own.
    fn open(&mut self, block: IpNet) {
        let (Some(shared), Some(tx)) = (self.ipam.shared_blocks(), self.claims_to.upgrade()) else {
            return;
        };
        if self.opening.contains(&block) {
            return;
        }
        let Some(own) = self.ipam.lend(block) else {
            tracing::warn!(%block, "a borrow request names this node as the owner of a block it does not hold");
            return;
        };
        self.lent.send_replace(self.ipam.lent_blocks());
        self.opening.insert(block);
        let node = self.ipam.node().to_string();
        let spawned = std::thread::Builder::new()
            .name("ipam-open".into())
            .spawn(move || {
                let n = own.len();
                match super::borrow::open(shared.as_ref(), block, &node, own) {
                    Ok(_) => tracing::info!(%block, marked = n, "opened the block's IPAMBlock record for borrowing"),
                    Err(e) => tracing::warn!(%block, error = %e, "cannot open the block's IPAMBlock record; trying again"),
                }
                let _ = tx.blocking_send(Msg::Opened(block));
            });
        if spawned.is_err() {
            self.opening.remove(&block);
        }
    }

    /// Clear the marks of committed releases, on a thread of its own (a
    /// failure leaves a mark this node does not hold: a leak the next
    /// start clears, never a double).
    fn clear_marks(&mut self) {
        let unmarks = self.ipam.take_unmarks();
        let Some(shared) = self.ipam.shared_blocks().filter(|_| !unmarks.is_empty()) else {
            return;
        };
        let node = self.ipam.node().to_string();
        let _ = std::thread::Builder::new()
            .name("ipam-unmark".into())
            .spawn(move || {
                for (block, ip, attachment) in unmarks {
                    let drop = move |a: &crate::model::crd::BlockAllocation| {
                        a.ip == ip && a.attachment == attachment
                    };
                    if let Err(e) = super::borrow::clear(shared.as_ref(), block, &node, drop) {
                        tracing::warn!(%block, %ip, error = %e, "cannot clear the mark of a released address; it stays leaked until the next start");
                    }
                }
            });
    }

    fn answer_parked(&mut self, v4: bool, response: impl Fn(&Job) -> Response) {
        let (done, rest): (Vec<_>, Vec<_>) = self.parked.drain(..).partition(|(_, f, _)| *f == v4);
        self.parked = rest;
        for (job, _, _) in done {
            let r = response(&job);
            let _ = job.reply.send(r);
        }
    }

    /// Apply, commit, answer. False when IPAM must stop.
    fn apply_batch(&mut self, batch: Vec<Job>) -> bool {
        let answer = Answer {
            mtu: self.defaults.mtu.current().mtu,
            route_protocol: self.defaults.route_protocol,
        };
        let mut changes = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        for job in batch {
            let applied = if job.envelope.remaining().is_zero() {
                Applied::Answer(Box::new(Response::Err(AgentError {
                    kind: ErrorKind::DeadlineExceeded,
                    message: "deadline passed before the request was applied; nothing changed"
                        .into(),
                })))
            } else {
                apply(
                    &mut self.ipam,
                    (&job.envelope.request, &job.choice),
                    answer,
                    &mut changes,
                )
            };
            match applied {
                Applied::Answer(response) => answers.push((job.reply, *response)),
                Applied::Park(v4, want) => {
                    self.parked.push((job, v4, want.clone()));
                    self.start_claim(v4, want);
                }
            }
        }
        let mutated = !changes.is_empty();
        if let Err(e) = self.store.commit(&changes) {
            tracing::error!(error = %e, "IPAM commit failed; rolling back to the stored state");
            if let Err(e) = self
                .store
                .load()
                .map_err(IpamError::from)
                .and_then(|all| self.ipam.reset(all))
            {
                tracing::error!(error = %e, "cannot reload the IPAM store; stopping IPAM");
                return false;
            }
            for (reply, _) in answers {
                let _ = reply.send(Response::Err(AgentError {
                    kind: ErrorKind::Store,
                    message: e.to_string(),
                }));
            }
            return true;
        }
        if mutated {
            self.routes.send_replace(self.ipam.pod_routes());
        }
        self.clear_marks();
        // Blocks change by claims as well as by commits (borrowed host
        // prefixes come and go with their pods).
        let announced = self.ipam.announced();
        self.blocks.send_if_modified(|b| {
            let changed = *b != announced;
            if changed {
                *b = announced;
            }
            changed
        });
        for (reply, response) in answers {
            let _ = reply.send(response);
        }
        true
    }

    /// Claim a block of the family on a thread of its own, unless one is
    /// already being claimed. Past the claim timeout the waiting ADDs are
    /// answered; the claim itself runs on, and its block is adopted.
    fn start_claim(&mut self, v4: bool, want: Want) {
        let slot = usize::from(!v4);
        if self.claiming[slot] {
            return;
        }
        let Some(tx) = self.claims_to.upgrade() else {
            return;
        };
        self.claiming[slot] = true;
        let plan: ClaimPlan = self.ipam.claim_plan(v4, want.clone(), Instant::now());
        let timeout = self.ipam.block_claim_timeout();
        let spawned = std::thread::Builder::new()
            .name("ipam-claim".into())
            .spawn(move || {
                let (done_tx, done_rx) = std::sync::mpsc::channel();
                let worker = std::thread::Builder::new()
                    .name("ipam-claim-call".into())
                    .spawn(move || {
                        let _ = done_tx.send(plan.run());
                    });
                let result = match worker {
                    Err(e) => Err(IpamError::Config(format!(
                        "cannot start a claim thread: {e}"
                    ))),
                    Ok(_) => match done_rx.recv_timeout(timeout) {
                        Ok(r) => r,
                        Err(_) => {
                            let why = format!(
                                "claiming an {} block took longer than {timeout:?}",
                                if v4 { "IPv4" } else { "IPv6" }
                            );
                            tracing::warn!(
                                "{why}; pods waiting for it are answered, the claim goes on"
                            );
                            let _ = tx.blocking_send(Msg::ClaimLate { v4, why });
                            done_rx.recv().unwrap_or_else(|_| {
                                Err(IpamError::Config(
                                    "the claim thread ended without an answer".into(),
                                ))
                            })
                        }
                    },
                };
                let _ = tx.blocking_send(Msg::Claimed { v4, want, result });
            });
        if let Err(e) = spawned {
            self.claiming[slot] = false;
            let r = error_response(IpamError::Config(format!(
                "cannot start a claim thread: {e}"
            )));
            self.answer_parked(v4, |_| r.clone());
        }
    }
}

/// How often the owner reads the IPAMBlock records for requests naming it
/// when the records cannot be watched (the in-memory records of the unit
/// tests); the API server's records are watched (one LIST at start, then
/// events), so an idle node sends no requests.
const RECORD_POLL: Duration = Duration::from_millis(200);

/// The owner's watch of the records: the records naming this node as owner
/// in state `requested` go to the IPAM thread, which opens them. Ends with
/// the IPAM thread.
fn watch_records(
    shared: Arc<dyn super::borrow::SharedBlocks>,
    node: String,
    to: mpsc::WeakSender<Msg>,
) {
    let spawned = std::thread::Builder::new()
        .name("ipam-records".into())
        .spawn(move || match shared.watch_requests(&node) {
            Some(requests) => forward_requests(&requests, &to),
            None => poll_records(shared.as_ref(), &node, &to),
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the IPAMBlock record watch; borrow requests for this node are not answered");
    }
}

fn forward_requests(requests: &std::sync::mpsc::Receiver<IpNet>, to: &mpsc::WeakSender<Msg>) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        match requests.recv_timeout(Duration::from_secs(1)) {
            Ok(cidr) => {
                let Some(tx) = to.upgrade() else { return };
                if tx.blocking_send(Msg::Requested(cidr)).is_err() {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) if to.upgrade().is_some() => {}
            Err(RecvTimeoutError::Timeout) => return,
            Err(RecvTimeoutError::Disconnected) => {
                tracing::error!(
                    "the IPAMBlock record watch ended; borrow requests for this node are not answered"
                );
                return;
            }
        }
    }
}

fn poll_records(shared: &dyn super::borrow::SharedBlocks, node: &str, to: &mpsc::WeakSender<Msg>) {
    let mut failing = false;
    loop {
        match shared.list() {
            Ok(records) => {
                failing = false;
                let requested = records.into_iter().filter(|r| {
                    r.owner == node && r.state == crate::model::crd::IPAMBlockState::Requested
                });
                for r in requested {
                    let Some(tx) = to.upgrade() else { return };
                    if tx.blocking_send(Msg::Requested(r.cidr)).is_err() {
                        return;
                    }
                }
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot read the IPAMBlock records; borrow requests for this node wait");
            }
            Err(_) => {}
        }
        if to.upgrade().is_none() {
            return;
        }
        std::thread::sleep(RECORD_POLL);
    }
}

fn apply(
    ipam: &mut Ipam,
    (request, choice): (&Request, &Choice),
    defaults: Answer,
    changes: &mut Vec<Change>,
) -> Applied {
    let response = match request {
        Request::Add(add) => match ipam.try_add(add, choice) {
            Ok((allocation, change)) => {
                changes.extend(change);
                Response::Ok(Reply::Added(AddReply {
                    allocation,
                    mtu: defaults.mtu,
                    route_protocol: defaults.route_protocol,
                }))
            }
            Err(IpamError::NeedsBlock { v4, want }) => return Applied::Park(v4, want),
            Err(e) => error_response(e),
        },
        Request::Del { key } => {
            let (allocation, change) = ipam.del(key);
            changes.extend(change);
            Response::Ok(Reply::Released { allocation })
        }
        Request::Check { key } => Response::Ok(Reply::Found {
            allocation: ipam.get(key).cloned(),
        }),
        Request::Gc {
            network,
            valid,
            dry_run,
        } => {
            let now = std::time::SystemTime::now();
            let collected = if *dry_run {
                ipam.leaks(network, valid, now)
            } else {
                ipam.gc(network, valid, now).map(|(released, c)| {
                    changes.extend(c);
                    released
                })
            };
            match collected {
                Ok(allocations) => Response::Ok(Reply::Collected { allocations }),
                Err(e) => error_response(e),
            }
        }
        Request::Status => Response::Ok(Reply::Status(ipam.status())),
        Request::List => Response::Ok(Reply::Listed {
            allocations: ipam.allocations(),
        }),
    };
    Applied::Answer(Box::new(response))
}

/// Accept plugin connections until the listener fails.
pub async fn serve(listener: UnixListener, ipam: IpamHandle) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let ipam = ipam.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, ipam).await {
                tracing::debug!(error = %e, "plugin connection ended");
            }
        });
    }
}

async fn connection(mut stream: UnixStream, ipam: IpamHandle) -> io::Result<()> {
    let started = std::time::Instant::now();
    let mut cmd = CniCommand::Invalid;
    let uid = stream.peer_cred()?.uid();
    let response = if uid != 0 {
        // Take the request before refusing it: closing with it unread
        // resets the connection, and the plugin would see a broken pipe
        // instead of the refusal. Discarded as it comes, within the read
        // timeout.
        let _ = tokio::time::timeout(READ_TIMEOUT, discard_request(&mut stream)).await;
        Response::Err(AgentError {
            kind: ErrorKind::InvalidRequest,
            message: format!("only root may use this socket (peer uid {uid})"),
        })
    } else {
        match tokio::time::timeout(READ_TIMEOUT, read_envelope(&mut stream)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) => Response::Err(AgentError {
                kind: ErrorKind::InvalidRequest,
                message: e.to_string(),
            }),
            Ok(Ok(envelope)) => {
                cmd = CniCommand::of(&envelope.request);
                ipam.request(envelope).await
            }
        }
    };
    let frame = proto::encode(&response).map_err(io::Error::other)?;
    stream.write_all(&frame).await?;
    if let Some(m) = &ipam.metrics {
        m.observe_cni(cmd, started.elapsed());
    }
    stream.shutdown().await
}

/// Read one frame and drop it unparsed.
async fn discard_request(stream: &mut UnixStream) -> Result<(), proto::FrameError> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = proto::frame_len(header)? as u64;
    tokio::io::copy(&mut (&mut *stream).take(len), &mut tokio::io::sink()).await?;
    Ok(())
}

async fn read_envelope(stream: &mut UnixStream) -> Result<Envelope, proto::FrameError> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let mut body = vec![0u8; proto::frame_len(header)?];
    stream.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// Where the agent keeps its state and socket unless configured otherwise.
pub fn default_store_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ipam.redb")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{FileDatastore, IpamConfig};
    use crate::mtu::MtuRule;
    use starling_cni_proto::{AddRequest, AttachmentKey};
    use std::collections::{BTreeMap, HashSet};

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p =
                std::env::temp_dir().join(format!("starling-ipam-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn start(dir: &Path) -> IpamHandle {
        // A previous owner thread may still be closing the store: wait for
        // the store to open, with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let store = loop {
            match Store::open(&default_store_path(dir)) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let ipam = Ipam::new(
            "n1",
            BTreeMap::new(),
            IpamConfig {
                pod_cidrs: vec!["10.9.0.0/24".parse().unwrap()],
                ..Default::default()
            },
            Box::new(FileDatastore::new(dir.join("blocks.json"))),
            store.load().unwrap(),
        )
        .unwrap();
        IpamHandle::spawn(
            ipam,
            store,
            PodDefaults {
                mtu: PodMtu::new(MtuRule::Fixed(1500)),
                route_protocol: 73,
            },
        )
    }

    fn add(c: &str, timeout: Duration) -> Envelope {
        Envelope::new(
            Request::Add(AddRequest {
                ips: vec![],
                key: AttachmentKey {
                    network: "pods".into(),
                    container_id: c.into(),
                    ifname: "eth0".into(),
                },
                netns: "/run/netns/x".into(),
                host_veth: starling_cni_proto::host_veth_name(c, "eth0"),
                pod: None,
            }),
            timeout,
        )
    }

    fn status(h: &IpamHandle, rt: &tokio::runtime::Runtime) -> usize {
        match rt.block_on(h.request(Envelope::new(Request::Status, Duration::from_secs(5)))) {
            Response::Ok(Reply::Status(s)) => s.allocated,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn concurrent_requests_commit_together_and_survive_a_restart() {
        let dir = Scratch::new("restart");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let first: Vec<Response> = {
            let h = start(&dir.0);
            let tasks: Vec<_> = (0..50)
                .map(|i| {
                    let h = h.clone();
                    rt.spawn(async move {
                        h.request(add(&format!("c{i}"), Duration::from_secs(5)))
                            .await
                    })
                })
                .collect();
            let replies: Vec<Response> =
                tasks.into_iter().map(|t| rt.block_on(t).unwrap()).collect();
            assert_eq!(status(&h, &rt), 50);
            assert_eq!(
                h.pod_routes().borrow().len(),
                50,
                "desired pod routes published"
            );
            replies
        };
        let mut seen = HashSet::new();
        for r in &first {
            let Response::Ok(Reply::Added(a)) = r else {
                panic!("{r:?}")
            };
            assert!(
                seen.insert(a.allocation.ips[0]),
                "duplicate {:?}",
                a.allocation.ips
            );
        }
        // Dropping the handle ends the owner thread, which closes the store.
        let h = start(&dir.0);
        assert_eq!(status(&h, &rt), 50, "allocations persisted");
        // A retried ADD gets the same addresses back.
        let again = rt.block_on(h.request(add("c7", Duration::from_secs(5))));
        assert!(first.contains(&again), "{again:?}");
    }

    /// A datastore whose claims wait until the test opens the gate: an API
    /// server that is slow or away.
    struct Gated {
        inner: FileDatastore,
        open: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
        /// A claim is waiting at the gate.
        waiting: std::sync::atomic::AtomicBool,
    }

    impl Gated {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl crate::ipam::Datastore for Gated {
        fn affinities(&self) -> Result<Vec<crate::ipam::Affinity>, crate::ipam::DatastoreError> {
            self.inner.affinities()
        }
        fn claim(
            &self,
            block: IpNet,
            node: &str,
        ) -> Result<crate::ipam::Affinity, crate::ipam::DatastoreError> {
            let mut open = self.open.lock().unwrap();
            while !*open {
                self.waiting
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                open = self.opened.wait(open).unwrap();
            }
            self.inner.claim(block, node)
        }
        fn release(&self, a: &crate::ipam::Affinity) -> Result<(), crate::ipam::DatastoreError> {
            self.inner.release(a)
        }
    }

    struct SharedGate(std::sync::Arc<Gated>);

    impl crate::ipam::Datastore for SharedGate {
        fn affinities(&self) -> Result<Vec<crate::ipam::Affinity>, crate::ipam::DatastoreError> {
            self.0.affinities()
        }
        fn claim(
            &self,
            block: IpNet,
            node: &str,
        ) -> Result<crate::ipam::Affinity, crate::ipam::DatastoreError> {
            self.0.claim(block, node)
        }
        fn release(&self, a: &crate::ipam::Affinity) -> Result<(), crate::ipam::DatastoreError> {
            self.0.release(a)
        }
    }

    /// A node holding 10.9.0.0/31 (two addresses) that claims /30s from
    /// 10.10.0.0/24 through a gated datastore.
    fn gated(dir: &Path, claim_timeout: u64) -> (IpamHandle, std::sync::Arc<Gated>) {
        let gate = std::sync::Arc::new(Gated {
            inner: FileDatastore::new(dir.join("blocks.json")),
            // Open while the podCIDR is claimed at start.
            open: std::sync::Mutex::new(true),
            opened: std::sync::Condvar::new(),
            waiting: std::sync::atomic::AtomicBool::new(false),
        });
        let store = Store::open(&default_store_path(dir)).unwrap();
        let ipam = Ipam::new(
            "n1",
            BTreeMap::new(),
            IpamConfig {
                pod_cidrs: vec!["10.9.0.0/31".parse().unwrap()],
                pools: vec![
                    serde_json::from_str(r#"{"cidr":"10.10.0.0/24","blockSize":30}"#).unwrap(),
                ],
                block_claim_timeout_seconds: Some(claim_timeout),
                ..Default::default()
            },
            Box::new(SharedGate(gate.clone())),
            vec![],
        )
        .unwrap();
        *gate.open.lock().unwrap() = false;
        let h = IpamHandle::spawn(
            ipam,
            store,
            PodDefaults {
                mtu: PodMtu::new(MtuRule::Fixed(1500)),
                route_protocol: 73,
            },
        );
        (h, gate)
    }

    fn added(r: Response) -> IpNet {
        match r {
            Response::Ok(Reply::Added(a)) => a.allocation.ips[0],
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pods_in_blocks_already_held_never_wait_for_a_claim() {
        let dir = Scratch::new("gated");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (h, gate) = gated(&dir.0, 60);
        let held: IpNet = "10.9.0.0/31".parse().unwrap();
        for c in ["c1", "c2"] {
            assert!(
                held.contains(
                    &added(rt.block_on(h.request(add(c, Duration::from_secs(30))))).addr()
                )
            );
        }
        // c3 needs a new block: its claim hangs at the gate.
        let h3 = h.clone();
        let c3 = rt.spawn(async move { h3.request(add("c3", Duration::from_secs(30))).await });
        let parked = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                while !gate.waiting.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
        });
        assert!(parked.is_ok(), "c3's claim reached the datastore");
        // Meanwhile c1 goes and c4 takes its address, answered at once.
        let quick =
            |r| rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), r).await });
        let del = Envelope::new(
            Request::Del {
                key: AttachmentKey {
                    network: "pods".into(),
                    container_id: "c1".into(),
                    ifname: "eth0".into(),
                },
            },
            Duration::from_secs(30),
        );
        assert!(matches!(
            quick(h.request(del)).expect("DEL answered while a claim hangs"),
            Response::Ok(Reply::Released {
                allocation: Some(_)
            })
        ));
        let c4 = quick(h.request(add("c4", Duration::from_secs(30))))
            .expect("an ADD served from a held block does not wait for the claim");
        assert!(held.contains(&added(c4).addr()));
        assert!(!c3.is_finished(), "c3 still waits for its block");
        gate.open();
        let c3 = rt.block_on(c3).unwrap();
        let pool: IpNet = "10.10.0.0/24".parse().unwrap();
        assert!(pool.contains(&added(c3).addr()));
    }

    #[test]
    fn a_claim_past_its_timeout_answers_the_pod_and_its_block_is_adopted_later() {
        let dir = Scratch::new("late");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (h, gate) = gated(&dir.0, 1);
        for c in ["c1", "c2"] {
            added(rt.block_on(h.request(add(c, Duration::from_secs(30)))));
        }
        // The claim hangs past the 1 s claim timeout: c3 hears so, well
        // before its own 30 s deadline.
        match rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                h.request(add("c3", Duration::from_secs(30))),
            )
            .await
        }) {
            Ok(Response::Err(AgentError {
                kind: ErrorKind::DeadlineExceeded,
                message,
            })) => assert!(message.contains("block"), "{message}"),
            other => panic!("expected the claim timeout, got {other:?}"),
        }
        // The API server answers at last: the block is adopted, not orphaned.
        let mut blocks = h.blocks();
        gate.open();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), blocks.wait_for(|b| b.len() == 2))
                .await
                .map(|r| r.map(|_| ()))
        })
        .expect("the late claim's block is adopted")
        .unwrap();
        let claimed: IpNet = "10.10.0.0/30".parse().unwrap();
        assert!(
            claimed.contains(
                &added(rt.block_on(h.request(add("c3", Duration::from_secs(30))))).addr()
            )
        );
        let claims = crate::ipam::Datastore::affinities(&*gate).unwrap();
        assert_eq!(
            claims.iter().filter(|a| a.node == "n1").count(),
            2,
            "{claims:?}"
        );
    }

    #[test]
    fn a_request_past_its_deadline_changes_nothing() {
        let dir = Scratch::new("deadline");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let h = start(&dir.0);
        let mut late = add("late", Duration::from_secs(5));
        late.deadline_unix_ms = 1;
        match rt.block_on(h.request(late)) {
            Response::Err(AgentError {
                kind: ErrorKind::DeadlineExceeded,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(status(&h, &rt), 0);
    }
}
