//! The shared block records ([`super::borrow`]) as `IPAMBlock` objects in
//! the API server, named like the block's BlockAffinity. Every update is a
//! replace carrying the resourceVersion of the object it edited, so the API
//! server applies it only if nobody wrote the object since (409 Conflict
//! otherwise, and the edit is done again on a fresh read, at most
//! [`MAX_CAS_ROUNDS`] times). Calls run on a thread of their own with its
//! own runtime and client, like the block claims ([`super::kube`]), each
//! with a deadline.

use super::borrow::{Edit, EditFn, SharedBlocks, Updated};
use super::datastore::DatastoreError;
use super::kube::{CALL_TIMEOUT, block_name};
use crate::model::crd::{IPAMBlock, IPAMBlockSpec, IPAMBlockState};
use ipnet::IpNet;
use kube::api::{Api, ListParams, PostParams};
use kube::core::ObjectMeta;
use kube::runtime::watcher;
use kube::{Client, Config};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Conflicts one update retries past before it gives up (each round is a
/// fresh read; a round loses only to another successful write).
pub const MAX_CAS_ROUNDS: u32 = 64;

type Reply<T> = std_mpsc::Sender<Result<T, DatastoreError>>;

enum Call {
    Request(IpNet, String, Reply<IPAMBlockSpec>),
    Update(IpNet, EditFn, Reply<Updated>),
    List(Reply<Vec<IPAMBlockSpec>>),
    Watch(String, std_mpsc::Sender<IpNet>),
    WaitOpen(IpNet, Duration, Reply<()>),
}

/// The API server's shared block records.
pub struct KubeSharedBlocks {
    tx: Option<mpsc::UnboundedSender<Call>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for KubeSharedBlocks {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn api_error(block: Option<IpNet>, what: impl std::fmt::Display) -> DatastoreError {
    DatastoreError::Io {
        path: PathBuf::from(format!(
            "ipamblocks.starling.dev/{}",
            block.map_or_else(|| "*".to_string(), block_name)
        )),
        source: std::io::Error::other(what.to_string()),
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl KubeSharedBlocks {
    pub fn new(config: Config) -> Result<KubeSharedBlocks, DatastoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let thread = crate::runtime::spawn_with_runtime("ipam-blocks", move || async move {
            match crate::model::kube::client_of(config) {
                Ok(client) => {
                    let _ = ready_tx.send(Ok(()));
                    serve(Api::all(client), rx).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot make a client: {e}")));
                }
            }
        })
        .map_err(|e| api_error(None, format!("cannot start the thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(KubeSharedBlocks {
                tx: Some(tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(api_error(None, e)),
            Err(_) => Err(api_error(None, "the thread ended at start")),
        }
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Call) -> Result<T, DatastoreError> {
        let (tx, rx) = std_mpsc::channel();
        let sent = self.tx.as_ref().map(|t| t.send(make(tx)).is_ok());
        if sent != Some(true) {
            return Err(api_error(None, "the IPAM block-record thread has stopped"));
        }
        rx.recv_timeout(CALL_TIMEOUT * 3)
            .map_err(|_| api_error(None, "no answer from the IPAM block-record thread"))?
    }
}

impl SharedBlocks for KubeSharedBlocks {
    fn request(&self, block: IpNet, owner: &str) -> Result<IPAMBlockSpec, DatastoreError> {
        self.call(|tx| Call::Request(block, owner.to_string(), tx))
    }
    fn update(&self, block: IpNet, edit: EditFn) -> Result<Updated, DatastoreError> {
        self.call(|tx| Call::Update(block, edit, tx))
    }
    fn list(&self) -> Result<Vec<IPAMBlockSpec>, DatastoreError> {
        self.call(Call::List)
    }
    fn wait_open(&self, block: IpNet, until: Instant) -> Result<(), DatastoreError> {
        let within = until.saturating_duration_since(Instant::now());
        self.call(|tx| Call::WaitOpen(block, within, tx))
    }
    fn watch_requests(&self, owner: &str) -> Option<std_mpsc::Receiver<IpNet>> {
        let (tx, rx) = std_mpsc::channel();
        let sent = self.tx.as_ref()?.send(Call::Watch(owner.to_string(), tx));
        sent.is_ok().then_some(rx)
    }
}

async fn serve(api: Api<IPAMBlock>, mut rx: mpsc::UnboundedReceiver<Call>) {
    let late = |b: Option<IpNet>| api_error(b, format!("no answer within {CALL_TIMEOUT:?}"));
    while let Some(call) = rx.recv().await {
        match call {
            Call::Request(block, owner, reply) => {
                let r = tokio::time::timeout(CALL_TIMEOUT, request(&api, block, &owner))
                    .await
                    .unwrap_or_else(|_| Err(late(Some(block))));
                let _ = reply.send(r);
            }
            Call::Update(block, edit, reply) => {
                let r = tokio::time::timeout(CALL_TIMEOUT, update(&api, block, edit))
                    .await
                    .unwrap_or_else(|_| Err(late(Some(block))));
                let _ = reply.send(r);
            }
            Call::List(reply) => {
                let r = tokio::time::timeout(CALL_TIMEOUT, api.list(&ListParams::default()))
                    .await
                    .map_err(|_| late(None))
                    .and_then(|r| r.map_err(|e| api_error(None, e)))
                    .map(|l| l.items.into_iter().map(|o| o.spec).collect());
                let _ = reply.send(r);
            }
            Call::Watch(owner, to) => {
                // The records labelled with this owner, and those with no
                // owner label (older agents', or an owner name too long
                // for a label value); with such a name, every record.
                let selectors = if owner_label_value(&owner) {
                    vec![format!("{OWNER_LABEL}={owner}"), format!("!{OWNER_LABEL}")]
                } else {
                    vec![String::new()]
                };
                for labels in selectors {
                    let config = watcher::Config::default().labels(&labels);
                    tokio::spawn(watch_requests(
                        api.clone(),
                        config,
                        owner.clone(),
                        to.clone(),
                    ));
                }
            }
            Call::WaitOpen(block, within, reply) => {
                // A task of its own: other calls go on meanwhile.
                tokio::spawn(wait_open(api.clone(), block, within, reply));
            }
        }
    }
}

/// The label naming a record's owner node, set when the record is
/// created, so the owner's watch reads its own records only.
pub const OWNER_LABEL: &str = "starling.dev/owner";

/// Whether a node name can be a label value (at most 63 characters; node
/// names are DNS subdomains, so the characters fit).
fn owner_label_value(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 63
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && node.starts_with(|c: char| c.is_ascii_alphanumeric())
        && node.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// One watch of the records `config` selects (a LIST at start and after
/// an expired watch, then events): each record naming `owner` in state
/// `requested` goes to `to`, again on each change while it stays
/// requested. Ends when `to` is dropped.
async fn watch_requests(
    api: Api<IPAMBlock>,
    config: watcher::Config,
    owner: String,
    to: std_mpsc::Sender<IpNet>,
) {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let object = match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
            Ok(_) => continue,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "watching the IPAMBlock records; borrow requests for this node wait");
                }
                failing = true;
                continue;
            }
        };
        failing = false;
        if object.spec.owner == owner
            && object.spec.state == IPAMBlockState::Requested
            && to.send(object.spec.cidr).is_err()
        {
            return;
        }
    }
}

/// Every record, watched (one LIST at start and after an expired watch,
/// then events): `to` gets all records after each complete LIST and after
/// each change; the API server is sent nothing while nothing changes.
/// Ends when `to` answers false.
pub async fn watch_records(client: Client, mut to: impl FnMut(Vec<IPAMBlockSpec>) -> bool) {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    use std::collections::BTreeMap;
    let api: Api<IPAMBlock> = Api::all(client);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut records: BTreeMap<String, IPAMBlockSpec> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, IPAMBlockSpec>> = None;
    let mut failing = false;
    let name = |o: &IPAMBlock| o.metadata.name.clone().unwrap_or_default();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "watching the IPAMBlock records; borrowed addresses' routes keep their last state");
                }
                failing = true;
                continue;
            }
        };
        failing = false;
        match event {
            watcher::Event::Init => listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                listing.get_or_insert_default().insert(name(&o), o.spec);
            }
            watcher::Event::InitDone => records = listing.take().unwrap_or_default(),
            watcher::Event::Apply(o) => {
                records.insert(name(&o), o.spec);
            }
            watcher::Event::Delete(o) => {
                records.remove(&name(&o));
            }
        }
        if listing.is_none() && !to(records.values().cloned().collect()) {
            return;
        }
    }
}

/// Watch the one record of `block` (a LIST and a watch with the field
/// selector `metadata.name=NAME`) until it is no longer `requested` or
/// `within` passed; either way the answer is `Ok` and the borrower reads
/// the record again.
async fn wait_open(api: Api<IPAMBlock>, block: IpNet, within: Duration, reply: Reply<()>) {
    let name = block_name(block);
    let left = |o: Option<&IPAMBlock>| o.is_none_or(|o| o.spec.state != IPAMBlockState::Requested);
    let waited = tokio::time::timeout(
        within,
        kube::runtime::wait::await_condition(api, &name, left),
    )
    .await;
    let r = match waited {
        Ok(Err(e)) => Err(api_error(Some(block), e)),
        Ok(Ok(_)) | Err(_) => Ok(()),
    };
    let _ = reply.send(r);
}

async fn request(
    api: &Api<IPAMBlock>,
    block: IpNet,
    owner: &str,
) -> Result<IPAMBlockSpec, DatastoreError> {
    let name = block_name(block);
    let object = IPAMBlock {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: owner_label_value(owner)
                .then(|| [(OWNER_LABEL.to_string(), owner.to_string())].into()),
            ..Default::default()
        },
        spec: IPAMBlockSpec {
            cidr: block,
            owner: owner.to_string(),
            state: IPAMBlockState::Requested,
            allocations: Vec::new(),
        },
    };
    match api.create(&PostParams::default(), &object).await {
        Ok(created) => Ok(created.spec),
        Err(e) if status_code(&e) == Some(409) => match api.get_opt(&name).await {
            Ok(Some(o)) => Ok(o.spec),
            Ok(None) => Err(api_error(
                Some(block),
                "created and deleted by others meanwhile",
            )),
            Err(e) => Err(api_error(Some(block), e)),
        },
        Err(e) => Err(api_error(Some(block), e)),
    }
}

/// Read, edit, replace with the resourceVersion read; a 409 starts over.
async fn update(
    api: &Api<IPAMBlock>,
    block: IpNet,
    mut edit: EditFn,
) -> Result<Updated, DatastoreError> {
    let name = block_name(block);
    let mut conflicts = 0;
    loop {
        let Some(mut object) = api
            .get_opt(&name)
            .await
            .map_err(|e| api_error(Some(block), e))?
        else {
            return Ok(Updated {
                spec: None,
                conflicts,
            });
        };
        if object
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or("")
            .is_empty()
        {
            return Err(api_error(
                Some(block),
                "the API server sent no resourceVersion",
            ));
        }
        if edit(&mut object.spec) == Edit::Keep {
            return Ok(Updated {
                spec: Some(object.spec),
                conflicts,
            });
        }
        fault("before-write");
        // The object carries the resourceVersion read: the API server's
        // compare-and-swap.
        match api.replace(&name, &PostParams::default(), &object).await {
            Ok(written) => {
                fault("after-write");
                return Ok(Updated {
                    spec: Some(written.spec),
                    conflicts,
                });
            }
            Err(e) if status_code(&e) == Some(409) => {
                conflicts += 1;
                if conflicts >= MAX_CAS_ROUNDS {
                    return Err(api_error(
                        Some(block),
                        format!("{conflicts} conflicting writes in a row; giving up this round"),
                    ));
                }
            }
            Err(e) => return Err(api_error(Some(block), e)),
        }
    }
}

/// Test-only fault hook: with `STARLING_TEST_FAULT=ipamblock-<point>` in
/// the environment the process aborts at that point (`after-write`: the
/// mark is in the API server, nothing else happened), as a crash would.
fn fault(point: &str) {
    if std::env::var("STARLING_TEST_FAULT").is_ok_and(|v| v == format!("ipamblock-{point}")) {
        tracing::error!("STARLING_TEST_FAULT: aborting at ipamblock-{point}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_names_that_fit_a_label_value() {
        assert!(super::owner_label_value("node-1.example"));
        assert!(!super::owner_label_value(&"n".repeat(64)));
        assert!(!super::owner_label_value(""));
        assert!(!super::owner_label_value("-x"));
    }
}
