//! Reading the annotations that steer IPAM for one pod: the pod's and its
//! namespace's.
//!
//! Two watches keep a copy of the IPAM annotations (only the keys
//! [`choice`] reads) of the pods bound to this node (field selector
//! `spec.nodeName`) and of every namespace. An ADD whose pod and namespace
//! are both in the copy is answered from it, without a round trip: a
//! kubelet runs a pod only after hearing of it through its own watch of
//! the same selector, and creating the sandbox takes far longer than this
//! agent's watch takes to hear the same event. Anything else (the watches
//! not yet listed, a pod or namespace not in the copy, a cached pod being
//! deleted, whose name a new pod may take) is read from the API server,
//! both objects in one round trip with a bounded wait, as the agent's
//! ServiceAccount (`get`, `list` and `watch` of pods and namespaces;
//! metadata only).
//!
//! The copy is as fresh as the watch: an annotation changed a few
//! milliseconds before an ADD may not be seen by that ADD (docs/cni.md).

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use starling_cni_proto::PodRef;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

use super::{Choice, IpamError, choice};

/// How long an ADD waits for the pod's and namespace's annotations unless
/// the plugin's deadline is sooner.
pub const ANNOTATION_TIMEOUT: Duration = Duration::from_secs(5);

/// The IPAM annotations of one object, and whether it is being deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Entry {
    annotations: BTreeMap<String, String>,
    deleting: bool,
}

impl Entry {
    fn of(meta: &kube::api::ObjectMeta) -> Entry {
        let annotations = meta
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| choice::is_ipam_key(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Entry {
            annotations,
            deleting: meta.deletion_timestamp.is_some(),
        }
    }
}

/// One watched kind: the objects by key once the first LIST is complete.
struct Copy {
    listed: bool,
    objects: HashMap<String, Entry>,
    /// Told once the first LIST is complete.
    first_list: watch::Sender<bool>,
}

impl Default for Copy {
    fn default() -> Copy {
        Copy {
            listed: false,
            objects: HashMap::new(),
            first_list: watch::channel(false).0,
        }
    }
}

/// How long after the watches start an ADD waits for their first LIST
/// before reading from the API server instead (later ADDs never wait: a
/// watch that cannot list, say for want of RBAC, costs no time).
pub const FIRST_LIST_WAIT: Duration = Duration::from_secs(2);

/// Where the answer for one ADD came from (counted for the metrics and
/// the benchmark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Watch,
    ApiServer,
}

impl Source {
    /// The metric's label.
    pub fn label(self) -> &'static str {
        match self {
            Source::Watch => "watch",
            Source::ApiServer => "apiserver",
        }
    }
}

/// Reads pods' and namespaces' annotations.
#[derive(Clone)]
pub struct AnnotationReader {
    client: Client,
    timeout: Duration,
    pods: Arc<RwLock<Copy>>,
    namespaces: Arc<RwLock<Copy>>,
    /// When watches started filling the copies (not for
    /// [`AnnotationReader::direct`]).
    watching: Option<std::time::Instant>,
}

fn read_error(what: &str, e: kube::Error) -> IpamError {
    let why = match &e {
        kube::Error::Api(s) if s.code == 404 => format!("{what} not found in the API server"),
        kube::Error::Api(s) if s.code == 403 => format!(
            "reading {what} is forbidden (the agent's ClusterRole needs get on pods and namespaces): {}",
            s.message
        ),
        other => format!("reading {what} from the API server: {other}"),
    };
    IpamError::AnnotationsUnavailable(format!("{why}; nothing allocated, try again"))
}

fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl AnnotationReader {
    /// A reader that only asks the API server (no watches): for tests and
    /// tools.
    pub fn direct(client: Client) -> AnnotationReader {
        AnnotationReader {
            client,
            timeout: ANNOTATION_TIMEOUT,
            pods: Arc::default(),
            namespaces: Arc::default(),
            watching: None,
        }
    }

    /// A reader that watches the pods bound to `node` and every namespace,
    /// and answers from that copy when it can. The watches run on the
    /// current runtime until the reader and all its clones are dropped.
    pub fn watching(client: Client, node: &str) -> AnnotationReader {
        let mut reader = AnnotationReader::direct(client.clone());
        reader.watching = Some(std::time::Instant::now());
        let pods: Api<PartialObjectMeta<Pod>> = Api::all(client.clone());
        let selector = format!("spec.nodeName={node}");
        tokio::spawn(follow(
            pods,
            watcher::Config::default().fields(&selector),
            Arc::downgrade(&reader.pods),
            |o: &PartialObjectMeta<Pod>| {
                pod_key(
                    o.metadata.namespace.as_deref().unwrap_or_default(),
                    o.metadata.name.as_deref().unwrap_or_default(),
                )
            },
            "the pods of this node",
        ));
        let namespaces: Api<PartialObjectMeta<Namespace>> = Api::all(client);
        tokio::spawn(follow(
            namespaces,
            watcher::Config::default(),
            Arc::downgrade(&reader.namespaces),
            |o: &PartialObjectMeta<Namespace>| o.metadata.name.clone().unwrap_or_default(),
            "the namespaces",
        ));
        reader
    }

    /// The pod's and its namespace's entries from the watches' copy, if
    /// both are there and the pod is not being deleted.
    fn cached(&self, pod: &PodRef) -> Option<(Entry, Entry)> {
        let p = {
            let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
            let p = pods.objects.get(&pod_key(&pod.namespace, &pod.name));
            p.filter(|p| pods.listed && !p.deleting)?.clone()
        };
        let n = {
            let namespaces = self.namespaces.read().unwrap_or_else(|e| e.into_inner());
            let n = namespaces.objects.get(&pod.namespace);
            n.filter(|_| namespaces.listed)?.clone()
        };
        Some((p, n))
    }

    /// The operator's choice for `pod`, waiting at most the reader's
    /// timeout or `deadline`, whichever is sooner, and where it was read.
    pub async fn choice(
        &self,
        pod: &PodRef,
        deadline: Duration,
    ) -> Result<(Choice, Source), IpamError> {
        if let Some(started) = self.watching {
            let left =
                (started + FIRST_LIST_WAIT).saturating_duration_since(std::time::Instant::now());
            if !left.is_zero() {
                self.wait_first_list(left.min(deadline / 2)).await;
            }
        }
        let (p, n, source) = match self.cached(pod) {
            Some((p, n)) => (p.annotations, n.annotations, Source::Watch),
            None => {
                let (p, n) = self.read(pod, deadline).await?;
                (p, n, Source::ApiServer)
            }
        };
        let c = choice::from_annotations(&pod.to_string(), &pod.namespace, &p, &n)?;
        Ok((c, source))
    }

    /// Wait at most `within` for both watches' first LIST.
    async fn wait_first_list(&self, within: Duration) {
        let subscribe = |c: &Arc<RwLock<Copy>>| {
            c.read()
                .unwrap_or_else(|e| e.into_inner())
                .first_list
                .subscribe()
        };
        let (mut p, mut n) = (subscribe(&self.pods), subscribe(&self.namespaces));
        let both = async {
            let _ = p.wait_for(|listed| *listed).await;
            let _ = n.wait_for(|listed| *listed).await;
        };
        let _ = tokio::time::timeout(within, both).await;
    }

    /// The pod's and namespace's annotations from the API server.
    async fn read(
        &self,
        pod: &PodRef,
        deadline: Duration,
    ) -> Result<(BTreeMap<String, String>, BTreeMap<String, String>), IpamError> {
        let wait = self.timeout.min(deadline);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let both = async {
            tokio::join!(
                pods.get_metadata(&pod.name),
                namespaces.get_metadata(&pod.namespace)
            )
        };
        let (p, n) = tokio::time::timeout(wait, both).await.map_err(|_| {
            IpamError::AnnotationsUnavailable(format!(
                "the annotations of pod {pod} and its namespace were not read within {wait:?}; nothing allocated, try again"
            ))
        })?;
        let p = p.map_err(|e| read_error(&format!("pod {pod}"), e))?;
        let n = n.map_err(|e| read_error(&format!("namespace {}", pod.namespace), e))?;
        Ok((
            p.metadata.annotations.unwrap_or_default(),
            n.metadata.annotations.unwrap_or_default(),
        ))
    }
}

/// Keep `to` equal to the objects `config` selects (metadata only): a LIST
/// at start and after an expired watch, then events. Until the first LIST
/// is complete the copy is not used. A failing watch keeps the last copy
/// (the watcher resumes from where it was, or lists again) and is logged
/// once per failure. Ends when the reader is dropped.
async fn follow<K>(
    api: Api<PartialObjectMeta<K>>,
    config: watcher::Config,
    to: std::sync::Weak<RwLock<Copy>>,
    key: fn(&PartialObjectMeta<K>) -> String,
    what: &'static str,
) where
    K: kube::Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing: Option<HashMap<String, Entry>> = None;
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let Some(copy) = to.upgrade() else { return };
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "watching {what} for IPAM annotations; ADDs read them from the API server when the copy lacks them");
                }
                failing = true;
                continue;
            }
        };
        if failing {
            tracing::info!("watching {what} for IPAM annotations again");
        }
        failing = false;
        match event {
            watcher::Event::Init => listing = Some(HashMap::new()),
            watcher::Event::InitApply(o) => {
                listing
                    .get_or_insert_default()
                    .insert(key(&o), Entry::of(&o.metadata));
            }
            watcher::Event::InitDone => {
                let mut c = copy.write().unwrap_or_else(|e| e.into_inner());
                c.objects = listing.take().unwrap_or_default();
                c.listed = true;
                c.first_list.send_replace(true);
            }
            watcher::Event::Apply(o) => {
                let mut c = copy.write().unwrap_or_else(|e| e.into_inner());
                c.objects.insert(key(&o), Entry::of(&o.metadata));
            }
            watcher::Event::Delete(o) => {
                let mut c = copy.write().unwrap_or_else(|e| e.into_inner());
                c.objects.remove(&key(&o));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(annotations: &[(&str, &str)], deleting: bool) -> kube::api::ObjectMeta {
        kube::api::ObjectMeta {
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            deletion_timestamp: deleting.then_some({
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                )
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_copy_keeps_only_the_keys_ipam_reads() {
        let e = Entry::of(&meta(
            &[
                ("starling.dev/ipv4pools", "[\"gold\"]"),
                ("cni.projectcalico.org/ipAddrs", "[\"10.0.0.1\"]"),
                ("cni.projectcalico.org/floatingIPs", "[]"),
                ("kubectl.kubernetes.io/last-applied-configuration", "{...}"),
                ("example.com/other", "x"),
            ],
            false,
        ));
        let keys: Vec<&str> = e.annotations.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "cni.projectcalico.org/floatingIPs",
                "cni.projectcalico.org/ipAddrs",
                "starling.dev/ipv4pools"
            ]
        );
        assert!(!e.deleting);
        assert!(Entry::of(&meta(&[], true)).deleting);
    }
}
