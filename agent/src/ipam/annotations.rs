//! Reading the annotations that steer IPAM for one pod from the API server:
//! the pod's and its namespace's, fetched together (one round trip) with a
//! bounded wait, as the agent's ServiceAccount (`get pods`, `get
//! namespaces`: metadata only).

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use starling_cni_proto::PodRef;
use std::collections::BTreeMap;
use std::time::Duration;

use super::{Choice, IpamError, choice};

/// How long an ADD waits for the pod's and namespace's annotations unless
/// the plugin's deadline is sooner.
pub const ANNOTATION_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads pods' and namespaces' annotations.
#[derive(Clone)]
pub struct AnnotationReader {
    client: kube::Client,
    timeout: Duration,
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

impl AnnotationReader {
    pub fn new(client: kube::Client) -> AnnotationReader {
        AnnotationReader {
            client,
            timeout: ANNOTATION_TIMEOUT,
        }
    }

    /// The operator's choice for `pod`, waiting at most the reader's
    /// timeout or `deadline`, whichever is sooner.
    pub async fn choice(&self, pod: &PodRef, deadline: Duration) -> Result<Choice, IpamError> {
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
        let none = BTreeMap::new();
        choice::from_annotations(
            &pod.to_string(),
            &pod.namespace,
            p.metadata.annotations.as_ref().unwrap_or(&none),
            n.metadata.annotations.as_ref().unwrap_or(&none),
        )
    }
}
