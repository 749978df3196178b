//! Block claims as BlockAffinity objects in the API server. The object's
//! name is derived from the block (`10-244-3-0-26`), so creating it is the
//! compare-and-swap on the block's absence: the API server lets exactly one
//! create of a name succeed and answers the others 409 AlreadyExists. A
//! claim's revision is the object's resourceVersion, kept as the opaque
//! string it is (never parsed, never ordered), and a release is a delete
//! with that resourceVersion as its precondition.
//!
//! Blocks of one pool share a size and pools do not overlap, so two claims
//! of overlapping blocks almost always have the same name. The exception (a
//! static podCIDR inside a pool's range, claimed as a different-sized
//! block) is settled after the create: a claimer that finds an older
//! overlapping claim (by creationTimestamp, then by name, so every claimer
//! decides alike) withdraws its own and reports a conflict.
//!
//! [`Datastore`] is synchronous and IPAM calls it from inside a tokio task,
//! where `block_on` panics and where waiting on the caller's own runtime
//! could deadlock (a current-thread runtime would be the very thread that
//! waits). So the API calls run on a dedicated thread with its own
//! current-thread runtime and its own client, and the caller waits on a
//! plain channel for the answer. Every call has a deadline, so a caller
//! never waits forever on an unreachable API server.

use super::datastore::{Affinity, Datastore, DatastoreError, Revision};
use crate::model::crd::{AffinityState, BlockAffinity, BlockAffinitySpec};
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams, Preconditions,
};
use kube::core::ObjectMeta;
use kube::{Client, Config};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// How long one claim, release or listing may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

enum Request {
    Affinities(std_mpsc::Sender<Result<Vec<Affinity>, DatastoreError>>),
    Claim(
        IpNet,
        String,
        std_mpsc::Sender<Result<Affinity, DatastoreError>>,
    ),
    Release(Affinity, std_mpsc::Sender<Result<(), DatastoreError>>),
}

/// The Kubernetes block-claim datastore.
pub struct KubeBlockClaims {
    tx: Option<mpsc::UnboundedSender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for KubeBlockClaims {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; no call is in flight
        // (calls are synchronous), so the join is immediate.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The object name of a block's claim: its address and prefix length with
/// `-` for separators (`10-244-3-0-26`; IPv6 written in full,
/// `fd00-0-0-0-0-0-0-0-122`, so a name never starts or ends with `-`).
pub fn block_name(block: IpNet) -> String {
    match block {
        IpNet::V4(n) => {
            let o = n.addr().octets();
            format!("{}-{}-{}-{}-{}", o[0], o[1], o[2], o[3], n.prefix_len())
        }
        IpNet::V6(n) => {
            let segs: Vec<String> = n
                .addr()
                .segments()
                .iter()
                .map(|s| format!("{s:x}"))
                .collect();
            format!("{}-{}", segs.join("-"), n.prefix_len())
        }
    }
}

fn api_error(name: &str, what: impl std::fmt::Display) -> DatastoreError {
    DatastoreError::Io {
        path: PathBuf::from(format!("blockaffinities.starling.dev/{name}")),
        source: std::io::Error::other(what.to_string()),
    }
}

/// The object's resourceVersion, as the opaque string it is.
fn revision(name: &str, meta: &ObjectMeta) -> Result<Revision, DatastoreError> {
    match meta.resource_version.as_deref() {
        Some(rv) if !rv.is_empty() => Ok(Revision(rv.to_string())),
        _ => Err(DatastoreError::Corrupt {
            path: PathBuf::from(format!("blockaffinities.starling.dev/{name}")),
            reason: "the API server sent no resourceVersion".into(),
        }),
    }
}

/// Which of two overlapping claims came first: the earlier creationTimestamp,
/// then the smaller name. Every claimer sees the same two objects, so all
/// decide alike, without reading anything into resourceVersions.
type Age = (Option<Time>, String);

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl KubeBlockClaims {
    /// Start the datastore's thread, with a client made from `config`
    /// (see [`crate::model::kube::config`]).
    pub fn new(config: Config) -> Result<KubeBlockClaims, DatastoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let thread = crate::runtime::spawn_with_runtime("ipam-kube", move || async move {
            match crate::model::kube::client_of(config) {
                Ok(client) => {
                    let _ = ready_tx.send(Ok(()));
                    serve(client, rx).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot make a client: {e}")));
                }
            }
        })
        .map_err(|e| api_error("*", format!("cannot start the IPAM thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(KubeBlockClaims {
                tx: Some(tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(api_error("*", e)),
            Err(_) => Err(api_error("*", "the IPAM thread ended at start")),
        }
    }

    fn call<T>(
        &self,
        make: impl FnOnce(std_mpsc::Sender<Result<T, DatastoreError>>) -> Request,
    ) -> Result<T, DatastoreError> {
        let (tx, rx) = std_mpsc::channel();
        let sent = self.tx.as_ref().map(|t| t.send(make(tx)).is_ok());
        if sent != Some(true) {
            return Err(api_error("*", "the IPAM datastore thread has stopped"));
        }
        // The thread applies CALL_TIMEOUT to the request; the margin covers
        // a request queued behind another.
        rx.recv_timeout(CALL_TIMEOUT * 3)
            .map_err(|_| api_error("*", "no answer from the IPAM datastore thread"))?
    }
}

impl Datastore for KubeBlockClaims {
    fn affinities(&self) -> Result<Vec<Affinity>, DatastoreError> {
        self.call(Request::Affinities)
    }
    fn claim(&self, block: IpNet, node: &str) -> Result<Affinity, DatastoreError> {
        self.call(|tx| Request::Claim(block, node.to_string(), tx))
    }
    fn release(&self, affinity: &Affinity) -> Result<(), DatastoreError> {
        self.call(|tx| Request::Release(affinity.clone(), tx))
    }
}

async fn serve(client: Client, mut rx: mpsc::UnboundedReceiver<Request>) {
    let typed: Api<BlockAffinity> = Api::all(client.clone());
    let dynamic: Api<DynamicObject> =
        Api::all_with(client, &ApiResource::erase::<BlockAffinity>(&()));
    let timeout = |name: &str| api_error(name, format!("no answer within {CALL_TIMEOUT:?}"));
    while let Some(req) = rx.recv().await {
        match req {
            Request::Affinities(reply) => {
                let r = tokio::time::timeout(CALL_TIMEOUT, list(&dynamic))
                    .await
                    .unwrap_or_else(|_| Err(timeout("*")));
                let _ = reply.send(r.map(|all| all.into_iter().map(|(_, a)| a).collect()));
            }
            Request::Claim(block, node, reply) => {
                let r = tokio::time::timeout(CALL_TIMEOUT, claim(&typed, &dynamic, block, &node))
                    .await
                    .unwrap_or_else(|_| Err(timeout(&block_name(block))));
                let _ = reply.send(r);
            }
            Request::Release(a, reply) => {
                let r = tokio::time::timeout(CALL_TIMEOUT, release(&typed, &a))
                    .await
                    .unwrap_or_else(|_| Err(timeout(&block_name(a.block))));
                let _ = reply.send(r);
            }
        }
    }
}

/// Objects per page when every claim is listed: pages of one consistent
/// list (the API server's continue token), so a cluster of thousands of
/// blocks is never decoded in one piece (at 5,000 blocks a single list
/// was the agent's largest allocation, about 20 MB at its peak).
const LIST_PAGE: u32 = 500;

/// Every settled claim with its age (creationTimestamp and object name).
/// Objects our types refuse are skipped with a warning rather than failing
/// every listing.
async fn list(api: &Api<DynamicObject>) -> Result<Vec<(Age, Affinity)>, DatastoreError> {
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(LIST_PAGE);
    loop {
        let page = api.list(&params).await.map_err(|e| api_error("*", e))?;
        let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
        add_settled(page.items, &mut out)?;
        match next {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

/// The settled claims among `objects`, with their ages, onto `out`.
fn add_settled(
    objects: Vec<DynamicObject>,
    out: &mut Vec<(Age, Affinity)>,
) -> Result<(), DatastoreError> {
    for o in objects {
        let name = o.metadata.name.clone().unwrap_or_default();
        let spec = o.data.get("spec").cloned().unwrap_or_default();
        match serde_json::from_value::<BlockAffinitySpec>(spec) {
            Ok(spec) => {
                let rev = revision(&name, &o.metadata)?;
                if let Some(a) = settled(&spec, rev) {
                    out.push(((o.metadata.creation_timestamp.clone(), name), a));
                }
            }
            Err(e) => warn!("BlockAffinity/{name}: spec: {e}; skipped"),
        }
    }
    Ok(())
}

/// The claim a BlockAffinity records, when it is a settled one.
fn settled(spec: &BlockAffinitySpec, revision: Revision) -> Option<Affinity> {
    (spec.state == AffinityState::Confirmed).then(|| Affinity {
        block: spec.cidr,
        node: spec.node.clone(),
        revision,
    })
}

async fn claim(
    api: &Api<BlockAffinity>,
    dynamic: &Api<DynamicObject>,
    block: IpNet,
    node: &str,
) -> Result<Affinity, DatastoreError> {
    let name = block_name(block);
    // A holder seen by the 409 may release before we read it; a few rounds
    // settle that.
    for _ in 0..5 {
        let object = BlockAffinity {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            spec: BlockAffinitySpec {
                cidr: block,
                node: node.to_string(),
                state: AffinityState::Confirmed,
            },
        };
        match api.create(&PostParams::default(), &object).await {
            Ok(created) => {
                let rev = revision(&name, &created.metadata)?;
                let mine = Affinity {
                    block,
                    node: node.to_string(),
                    revision: rev,
                };
                let age = (created.metadata.creation_timestamp.clone(), name.clone());
                return settle_overlap(api, dynamic, &age, mine).await;
            }
            Err(e) if status_code(&e) == Some(409) => match api.get_opt(&name).await {
                Ok(Some(held)) => {
                    let rev = revision(&name, &held.metadata)?;
                    if held.spec.node == node && held.spec.cidr == block {
                        return Ok(Affinity {
                            block,
                            node: node.to_string(),
                            revision: rev,
                        });
                    }
                    return Err(DatastoreError::Conflict {
                        block,
                        holder: held.spec.node,
                    });
                }
                Ok(None) => continue,
                Err(e) => return Err(api_error(&name, e)),
            },
            Err(e) => return Err(api_error(&name, e)),
        }
    }
    Err(api_error(
        &name,
        "claimed and released by others five times while we tried; giving up this round",
    ))
}

/// After creating `mine`: if an overlapping block (a different name) is
/// claimed too, the older claim (see [`Age`]) keeps it.
async fn settle_overlap(
    api: &Api<BlockAffinity>,
    dynamic: &Api<DynamicObject>,
    age: &Age,
    mine: Affinity,
) -> Result<Affinity, DatastoreError> {
    let all = list(dynamic).await?;
    let older = all.iter().find(|(other, a)| {
        other.1 != age.1
            && (a.block.contains(&mine.block.network()) || mine.block.contains(&a.block.network()))
            && other < age
    });
    let Some((_, older)) = older else {
        return Ok(mine);
    };
    let holder = format!("{} (as {})", older.node, older.block);
    release(api, &mine).await?;
    Err(DatastoreError::Conflict {
        block: mine.block,
        holder,
    })
}

async fn release(api: &Api<BlockAffinity>, a: &Affinity) -> Result<(), DatastoreError> {
    let name = block_name(a.block);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: Some(a.revision.0.clone()),
            uid: None,
        }),
        ..Default::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => Ok(()),
        Err(e) if status_code(&e) == Some(404) => Ok(()),
        Err(e) if status_code(&e) == Some(409) => Err(DatastoreError::Stale {
            block: a.block,
            expected: a.revision.clone(),
        }),
        Err(e) => Err(api_error(&name, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_are_valid_object_names() {
        for (block, name) in [
            ("10.244.3.0/26", "10-244-3-0-26"),
            ("fd00::3c0/122", "fd00-0-0-0-0-0-0-3c0-122"),
            ("::/120", "0-0-0-0-0-0-0-0-120"),
        ] {
            let got = block_name(block.parse().unwrap());
            assert_eq!(got, name);
            assert!(crate::model::validate::name(&got).is_empty(), "{got}");
        }
    }

    /// resourceVersion is opaque: whatever the API server sends, numeric
    /// or not, past u64 or not, is kept byte for byte (and only ever
    /// compared for equality: `Revision` has no ordering); none is an
    /// error naming the object, never a default.
    #[test]
    fn resource_versions_are_kept_as_opaque_strings() {
        for rv in ["42", "a1b2/c3==", "99999999999999999999999", "0x10", " 7 "] {
            let meta = ObjectMeta {
                resource_version: Some(rv.into()),
                ..Default::default()
            };
            assert_eq!(revision("10-0-0-0-26", &meta).unwrap(), Revision(rv.into()));
        }
        for none in [None, Some(String::new())] {
            let meta = ObjectMeta {
                resource_version: none,
                ..Default::default()
            };
            let e = revision("10-0-0-0-26", &meta).unwrap_err().to_string();
            assert!(
                e.contains("blockaffinities.starling.dev/10-0-0-0-26")
                    && e.contains("no resourceVersion"),
                "{e}"
            );
        }
    }
}
