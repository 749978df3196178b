//! Serving IPAM to the CNI plugin.
//!
//! One thread owns [`Ipam`] and the [`Store`]. It takes every request that is
//! waiting, applies them all, commits them in one durable transaction, and
//! only then answers each: group commit, so 200 pods starting at once cost a
//! handful of fsyncs rather than 200, and no reply ever describes state a
//! crash could lose.
//!
//! The socket is root-only twice over: mode 0600, and the peer's uid is
//! checked on every connection (SO_PEERCRED).

use ipnet::IpNet;
use starling_cni_proto::{
    self as proto, AddReply, AgentError, Envelope, ErrorKind, PodRoute, Reply, Request, Response,
};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Change, Ipam, IpamError, Store};
use crate::metrics::{CniCommand, Metrics};

/// Requests applied (and committed) together at most.
const MAX_BATCH: usize = 256;

/// How long a connected client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent tells the plugin besides addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodDefaults {
    pub mtu: u32,
    pub route_protocol: u8,
}

struct Job {
    envelope: Envelope,
    reply: oneshot::Sender<Response>,
}

/// The running IPAM owner: send it requests, watch the pod routes it wants.
#[derive(Clone)]
pub struct IpamHandle {
    jobs: mpsc::Sender<Job>,
    routes: watch::Receiver<Vec<PodRoute>>,
    blocks: watch::Receiver<Vec<IpNet>>,
    metrics: Option<Metrics>,
}

impl IpamHandle {
    /// Start the owner thread.
    pub fn spawn(ipam: Ipam, store: Store, defaults: PodDefaults) -> IpamHandle {
        let (jobs, rx) = mpsc::channel(4 * MAX_BATCH);
        let (routes_tx, routes) = watch::channel(ipam.pod_routes());
        let (blocks_tx, blocks) = watch::channel(ipam.blocks().to_vec());
        std::thread::Builder::new()
            .name("ipam".into())
            .spawn(move || owner(ipam, store, defaults, rx, routes_tx, blocks_tx))
            .expect("spawning the IPAM thread");
        IpamHandle {
            jobs,
            routes,
            blocks,
            metrics: None,
        }
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

    /// The host routes the node's pods need (`<ip> dev <veth>`), updated
    /// after every commit: the desired state the FIB reconciler installs.
    pub fn pod_routes(&self) -> watch::Receiver<Vec<PodRoute>> {
        self.routes.clone()
    }

    /// Apply one request, as the socket does.
    pub async fn request(&self, envelope: Envelope) -> Response {
        let (tx, rx) = oneshot::channel();
        let deadline = envelope.remaining();
        if self
            .jobs
            .send(Job {
                envelope,
                reply: tx,
            })
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
        IpamError::Datastore(_) | IpamError::Store(_) => ErrorKind::Store,
    };
    Response::Err(AgentError {
        kind,
        message: e.to_string(),
    })
}

fn owner(
    mut ipam: Ipam,
    store: Store,
    defaults: PodDefaults,
    mut rx: mpsc::Receiver<Job>,
    routes: watch::Sender<Vec<PodRoute>>,
    blocks: watch::Sender<Vec<IpNet>>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut changes = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        for job in batch {
            let response = if job.envelope.remaining().is_zero() {
                Response::Err(AgentError {
                    kind: ErrorKind::DeadlineExceeded,
                    message: "deadline passed before the request was applied; nothing changed"
                        .into(),
                })
            } else {
                apply(&mut ipam, &job.envelope.request, defaults, &mut changes)
            };
            answers.push((job.reply, response));
        }
        let mutated = !changes.is_empty();
        if let Err(e) = store.commit(&changes) {
            tracing::error!(error = %e, "IPAM commit failed; rolling back to the stored state");
            if let Err(e) = store
                .load()
                .map_err(IpamError::from)
                .and_then(|all| ipam.reset(all))
            {
                tracing::error!(error = %e, "cannot reload the IPAM store; stopping IPAM");
                return;
            }
            for (reply, _) in answers {
                let _ = reply.send(Response::Err(AgentError {
                    kind: ErrorKind::Store,
                    message: e.to_string(),
                }));
            }
            continue;
        }
        if mutated {
            routes.send_replace(ipam.pod_routes());
            blocks.send_if_modified(|b| {
                let changed = b.as_slice() != ipam.blocks();
                if changed {
                    *b = ipam.blocks().to_vec();
                }
                changed
            });
        }
        for (reply, response) in answers {
            let _ = reply.send(response);
        }
    }
}

fn apply(
    ipam: &mut Ipam,
    request: &Request,
    defaults: PodDefaults,
    changes: &mut Vec<Change>,
) -> Response {
    match request {
        Request::Add(add) => match ipam.add(add) {
            Ok((allocation, change)) => {
                changes.extend(change);
                Response::Ok(Reply::Added(AddReply {
                    allocation,
                    mtu: defaults.mtu,
                    route_protocol: defaults.route_protocol,
                }))
            }
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
        Request::Gc { valid, dry_run } => {
            let allocations = if *dry_run {
                ipam.leaks(valid)
            } else {
                let (released, c) = ipam.gc(valid);
                changes.extend(c);
                released
            };
            Response::Ok(Reply::Collected { allocations })
        }
        Request::Status => Response::Ok(Reply::Status(ipam.status())),
    }
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
                mtu: 1500,
                route_protocol: 73,
            },
        )
    }

    fn add(c: &str, timeout: Duration) -> Envelope {
        Envelope::new(
            Request::Add(AddRequest {
                key: AttachmentKey {
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
