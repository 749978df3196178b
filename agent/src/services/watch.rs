//! The Services and EndpointSlices of the whole cluster, watched (kube
//! runtime watchers: list + watch, resumed with backoff) and digested into
//! a [`Catalog`] the event loop reads: within a watch event of a change.

use super::{Catalog, ServiceInfo, ServiceKey};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Service types that have a cluster IP worth advertising (Calico's list).
const ADVERTISED_TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer"];

fn parse_ips(list: impl IntoIterator<Item = String>) -> Vec<IpAddr> {
    list.into_iter().filter_map(|s| s.parse().ok()).collect()
}

/// What the decision needs of a Service; `None` without a name.
pub fn service_info(svc: &Service) -> Option<(ServiceKey, ServiceInfo)> {
    let key = (
        svc.metadata.namespace.clone().unwrap_or_default(),
        svc.metadata.name.clone()?,
    );
    let spec = svc.spec.clone().unwrap_or_default();
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    let mut cluster_ips = spec.cluster_ips.clone().unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.clone());
    }
    let cluster_ips = parse_ips(cluster_ips);
    let local = ADVERTISED_TYPES.contains(&kind)
        && !cluster_ips.is_empty()
        && spec.external_traffic_policy.as_deref() == Some("Local");
    let lb = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .map(|i| i.iter().filter_map(|x| x.ip.clone()).collect::<Vec<_>>())
        .unwrap_or_default();
    Some((
        key,
        ServiceInfo {
            local,
            cluster_ips,
            external_ips: parse_ips(spec.external_ips.unwrap_or_default()),
            load_balancer_ips: parse_ips(lb),
        },
    ))
}

/// An EndpointSlice's Service and the nodes with a ready endpoint in it
/// (`conditions.ready` unset counts as ready, as the API documents).
pub fn slice_nodes(slice: &EndpointSlice) -> Option<(ServiceKey, BTreeSet<String>)> {
    let service = slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)?
        .clone();
    let key = (
        slice.metadata.namespace.clone().unwrap_or_default(),
        service,
    );
    let nodes = slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.node_name.clone())
        .collect();
    Some((key, nodes))
}

enum Update {
    Service(Box<Result<watcher::Event<Service>, String>>),
    Slice(Box<Result<watcher::Event<EndpointSlice>, String>>),
}

/// One kind's objects by `namespace/name`, with a relist in progress.
struct Cache<T> {
    objects: BTreeMap<ServiceKey, T>,
    relist: Option<BTreeMap<ServiceKey, T>>,
    listed: bool,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Cache {
            objects: BTreeMap::new(),
            relist: None,
            listed: false,
        }
    }
}

impl<T> Cache<T> {
    /// Apply an event; `digest` maps an object to its key and digest.
    fn apply<K: kube::Resource>(
        &mut self,
        ev: watcher::Event<K>,
        digest: impl Fn(&K) -> Option<T>,
    ) -> bool {
        let key = |o: &K| {
            (
                o.meta().namespace.clone().unwrap_or_default(),
                o.meta().name.clone().unwrap_or_default(),
            )
        };
        match ev {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(o) => {
                if let Some(d) = digest(&o) {
                    self.relist.get_or_insert_default().insert(key(&o), d);
                }
                false
            }
            watcher::Event::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                self.listed = true;
                true
            }
            watcher::Event::Apply(o) => {
                match digest(&o) {
                    Some(d) => self.objects.insert(key(&o), d),
                    None => self.objects.remove(&key(&o)),
                };
                true
            }
            watcher::Event::Delete(o) => self.objects.remove(&key(&o)).is_some(),
        }
    }
}

fn catalog(
    services: &Cache<ServiceInfo>,
    slices: &Cache<(ServiceKey, BTreeSet<String>)>,
) -> Catalog {
    let mut ready_nodes: BTreeMap<ServiceKey, BTreeSet<String>> = BTreeMap::new();
    for (svc, nodes) in slices.objects.values() {
        ready_nodes
            .entry(svc.clone())
            .or_default()
            .extend(nodes.iter().cloned());
    }
    Catalog {
        services: services.objects.clone(),
        ready_nodes,
        synced: services.listed && slices.listed,
    }
}

async fn forward<K, F>(api: Api<K>, cfg: watcher::Config, tx: mpsc::Sender<Update>, wrap: F)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
    F: Fn(Result<watcher::Event<K>, String>) -> Update,
{
    let stream = watcher(api, cfg).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        if tx
            .send(wrap(item.map_err(|e| e.to_string())))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Watch every Service and every EndpointSlice that names a Service; the
/// receiver holds the digest, replaced whenever it changes.
pub fn start(client: Client) -> watch::Receiver<Arc<Catalog>> {
    let (tx, rx) = watch::channel(Arc::new(Catalog::default()));
    let (utx, mut urx) = mpsc::channel::<Update>(256);
    tokio::spawn(forward(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        utx.clone(),
        |r| Update::Service(Box::new(r)),
    ));
    tokio::spawn(forward(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
        utx,
        |r| Update::Slice(Box::new(r)),
    ));
    tokio::spawn(async move {
        let mut services = Cache::<ServiceInfo>::default();
        let mut slices = Cache::<(ServiceKey, BTreeSet<String>)>::default();
        let mut last_error = String::new();
        while let Some(first) = urx.recv().await {
            let mut changed = false;
            let mut next = Some(first);
            // Take the whole burst before rebuilding.
            while let Some(u) = next {
                let r = match u {
                    Update::Service(r) => {
                        r.map(|ev| services.apply(ev, |s| service_info(s).map(|x| x.1)))
                    }
                    Update::Slice(r) => (*r).map(|ev| slices.apply(ev, slice_nodes)),
                };
                match r {
                    Ok(c) => changed |= c,
                    Err(e) if e != last_error => {
                        warn!("watching Services and EndpointSlices: {e}");
                        last_error = e;
                    }
                    Err(_) => {}
                }
                next = urx.try_recv().ok();
            }
            if changed {
                let c = catalog(&services, &slices);
                tx.send_if_modified(|old| {
                    let differs = **old != c;
                    if differs {
                        *old = Arc::new(c);
                    }
                    differs
                });
            }
            if tx.is_closed() {
                return;
            }
        }
        info!("the Service watch ended");
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_and_slices_are_digested() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                     "externalTrafficPolicy": "Local", "externalIPs": ["198.51.100.7", "not-an-ip"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}, {"hostname": "lb.example"}]}}
        }))
        .unwrap();
        let (key, info) = service_info(&svc).unwrap();
        assert_eq!(key, ("shop".to_string(), "web".to_string()));
        assert!(info.local);
        assert_eq!(info.cluster_ips.len(), 2);
        assert_eq!(
            info.external_ips,
            vec!["198.51.100.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            info.load_balancer_ips,
            vec!["203.0.113.5".parse::<IpAddr>().unwrap()]
        );

        // Headless and ExternalName Services are never Local.
        for spec in [
            serde_json::json!({"clusterIP": "None", "externalTrafficPolicy": "Local"}),
            serde_json::json!({"type": "ExternalName", "externalName": "x", "externalTrafficPolicy": "Local"}),
        ] {
            let s: Service = serde_json::from_value(
                serde_json::json!({"metadata": {"name": "h"}, "spec": spec}),
            )
            .unwrap();
            assert!(!service_info(&s).unwrap().1.local);
        }

        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.2"], "nodeName": "node1", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.2"], "nodeName": "node2", "conditions": {"ready": false}},
                {"addresses": ["10.244.3.2"], "nodeName": "node3"},
                {"addresses": ["10.244.4.2"]}
            ]
        }))
        .unwrap();
        let (k, nodes) = slice_nodes(&slice).unwrap();
        assert_eq!(k, ("shop".to_string(), "web".to_string()));
        assert_eq!(nodes, ["node1".to_string(), "node3".to_string()].into());
    }
}
