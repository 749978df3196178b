//! The protocol between the `starling` CNI plugin and the agent that owns
//! IPAM, in a crate of its own so the agent builds none of the plugin's
//! dependencies (rscni-plugin, rtnetlink): requests, replies, attachment
//! keys, framing, and the naming rules both sides must agree on.
//!
//! One request per connection on a Unix socket (root-only, mode 0600). Each
//! frame is a 4-byte big-endian length followed by that many bytes of JSON.
//! The plugin sends an [`Envelope`]; the agent answers with one [`Response`].
//! Every request carries a deadline: the agent drops a request whose deadline
//! has passed before it is applied, so a plugin that gave up never leaves an
//! allocation it did not hear about (and if the deadline passes while the
//! agent commits, the runtime's DEL or GC releases it).
//!
//! Both sides import these types from here, so there is one definition of the
//! wire format. The agent's allocation store converts [`Allocation`] to a
//! versioned record of its own, so a change here never changes what is on
//! disk.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The CNI spec versions the `starling` plugin speaks: what a conflist's
/// `cniVersion` may name.
pub const CNI_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Where the agent listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/starling/cni.sock";

/// Frames larger than this are refused on both sides: a GC request listing
/// every attachment of a large node stays far below it.
pub const MAX_FRAME: u32 = 16 << 20;

/// A pod attachment: the network configuration's `name`, and what the
/// runtime names with `CNI_CONTAINERID` and `CNI_IFNAME`; what GC's
/// valid-attachments list holds.
///
/// The network name is part of the key because two network configurations
/// may both use this plugin (Multus: the pod network and a second one), and
/// the runtime sends each its own GC with only its own attachments: without
/// the name, GC of one network would release every attachment of the other.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentKey {
    /// Empty only in allocations stored before keys carried it.
    #[serde(default)]
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

impl std::fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.network.is_empty() {
            write!(f, "{}/{}", self.container_id, self.ifname)
        } else {
            write!(f, "{}/{}/{}", self.network, self.container_id, self.ifname)
        }
    }
}

/// The Kubernetes pod an attachment belongs to, from the runtime's
/// `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`), so `starlingctl ipam
/// show` names the pod behind every address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why `CNI_ARGS` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CniArgsError {
    #[error("CNI_ARGS: `{0}` is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("CNI_ARGS: {key} `{value}` is not a Kubernetes name (1-253 of a-z 0-9 . -)")]
    BadName { key: &'static str, value: String },
    #[error("CNI_ARGS names {present} but not {missing}")]
    Half {
        present: &'static str,
        missing: &'static str,
    },
}

/// Namespace and pod names as the API server allows them (RFC 1123
/// subdomains; namespaces are labels, a subset).
fn kube_name(key: &'static str, value: &str) -> Result<String, CniArgsError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    if ok {
        Ok(value.to_string())
    } else {
        Err(CniArgsError::BadName {
            key,
            value: value.to_string(),
        })
    }
}

impl PodRef {
    /// The pod in `CNI_ARGS` (`IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=name;...`):
    /// `None` when the runtime names no pod (not Kubernetes); other keys are
    /// the runtime's business and left alone.
    pub fn from_cni_args(args: &str) -> Result<Option<PodRef>, CniArgsError> {
        let (mut namespace, mut name) = (None, None);
        for pair in args.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| CniArgsError::NotKeyValue(pair.to_string()))?;
            match k {
                "K8S_POD_NAMESPACE" => namespace = Some(kube_name("K8S_POD_NAMESPACE", v)?),
                "K8S_POD_NAME" => name = Some(kube_name("K8S_POD_NAME", v)?),
                _ => {}
            }
        }
        match (namespace, name) {
            (Some(namespace), Some(name)) => Ok(Some(PodRef { namespace, name })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(CniArgsError::Half {
                present: "K8S_POD_NAMESPACE",
                missing: "K8S_POD_NAME",
            }),
            (None, Some(_)) => Err(CniArgsError::Half {
                present: "K8S_POD_NAME",
                missing: "K8S_POD_NAMESPACE",
            }),
        }
    }
}

/// What the plugin sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Milliseconds since the Unix epoch after which the plugin no longer waits.
    pub deadline_unix_ms: u64,
    pub request: Request,
}

impl Envelope {
    pub fn new(request: Request, timeout: Duration) -> Envelope {
        Envelope {
            deadline_unix_ms: unix_ms(SystemTime::now() + timeout),
            request,
        }
    }

    /// Time left before the deadline; zero once it has passed.
    pub fn remaining(&self) -> Duration {
        let now = unix_ms(SystemTime::now());
        Duration::from_millis(self.deadline_unix_ms.saturating_sub(now))
    }
}

/// Milliseconds since the Unix epoch; 0 for times before it.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// Allocate (or return the existing allocation of) one address per
    /// address family for the attachment, and record the host-side wiring so
    /// the agent can re-derive the pod's host routes after a restart.
    Add(AddRequest),
    /// Release the attachment's addresses. Releasing an unknown attachment
    /// succeeds: DEL must be idempotent.
    Del { key: AttachmentKey },
    /// Return the attachment's allocation, if any.
    Check { key: AttachmentKey },
    /// Release every allocation of `network` whose attachment is not in
    /// `valid` and that is older than the agent's grace period; with
    /// `dry_run`, only report them (the leak report). Allocations of other
    /// networks are never touched.
    Gc {
        network: String,
        valid: Vec<AttachmentKey>,
        #[serde(default)]
        dry_run: bool,
    },
    /// Is the agent ready to serve ADD?
    Status,
    /// Every allocation the agent holds (for `starlingctl ipam check` and
    /// `release`; the plugin never sends it).
    List,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddRequest {
    pub key: AttachmentKey,
    /// `CNI_NETNS`, recorded for operators and GC reports.
    pub netns: String,
    /// Host-side veth name; the pod's host routes are `<ip> dev <host_veth>`.
    pub host_veth: String,
    /// The pod, when the runtime named one in `CNI_ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// Static addresses the runtime asked for (`CNI_ARGS` `IP=`): the pod
    /// gets exactly these or the ADD is refused. Pod annotations, read by
    /// the agent, take precedence.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<std::net::IpAddr>,
}

/// The static addresses in `CNI_ARGS` (`IP=10.0.0.5` or
/// `IP=10.0.0.5,fd00::5`, as Calico and the reference plugins read them);
/// empty when there is no `IP` key. A prefix length is accepted and dropped.
pub fn static_ips_from_cni_args(args: &str) -> Result<Vec<std::net::IpAddr>, String> {
    let mut out = Vec::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some(("IP", v)) = pair.split_once('=') else {
            continue;
        };
        for a in v.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let addr = a.split_once('/').map_or(a, |(ip, _)| ip);
            let ip: std::net::IpAddr = addr
                .parse()
                .map_err(|_| format!("CNI_ARGS: IP `{a}` is not an IP address"))?;
            out.push(ip);
        }
    }
    Ok(out)
}

/// One attachment's addresses, as the agent reports them (its store keeps
/// its own record of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub key: AttachmentKey,
    /// Host prefixes: a /32 for IPv4, a /128 for IPv6.
    pub ips: Vec<IpNet>,
    pub host_veth: String,
    pub netns: String,
    /// The pod, when the runtime named one in `CNI_ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// When the agent made it (milliseconds since the Unix epoch); 0 when
    /// not known (stored before it was recorded). GC leaves allocations
    /// younger than its grace period alone.
    #[serde(default)]
    pub allocated_unix_ms: u64,
}

impl Allocation {
    /// The host routes the pod needs: `<ip> dev <host_veth> scope link`.
    pub fn host_routes(&self) -> Vec<PodRoute> {
        self.ips
            .iter()
            .map(|ip| PodRoute {
                destination: *ip,
                device: self.host_veth.clone(),
                pod: self.pod.clone(),
            })
            .collect()
    }
}

/// A host route towards a local pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRoute {
    pub destination: IpNet,
    pub device: String,
    /// Whose route it is (not part of the kernel route; for reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddReply {
    pub allocation: Allocation,
    /// MTU for the pod interface: the uplink's minus the encapsulation overhead.
    pub mtu: u32,
    /// Protocol number the pod's host routes carry, so the FIB reconciler
    /// recognises them as its own.
    pub route_protocol: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReply {
    pub ready: bool,
    /// Why not, when not ready.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub node: String,
    /// Blocks this node holds, per address family.
    pub blocks: Vec<IpNet>,
    pub allocated: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "camelCase")]
pub enum Reply {
    Added(AddReply),
    /// The allocation DEL released, if there was one.
    Released {
        allocation: Option<Allocation>,
    },
    Found {
        allocation: Option<Allocation>,
    },
    /// What GC released (or, with `dry_run`, would release).
    Collected {
        allocations: Vec<Allocation>,
    },
    Status(StatusReply),
    /// Every allocation, answering [`Request::List`].
    Listed {
        allocations: Vec<Allocation>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// No free address in any block the node holds or may claim.
    Exhausted,
    /// The request was malformed or named something invalid.
    InvalidRequest,
    /// The deadline passed before the request was applied; nothing changed.
    DeadlineExceeded,
    /// The agent could not read or write its store or datastore.
    Store,
    /// The agent is starting or shutting down.
    NotReady,
    /// A static address asked for is held by another attachment.
    AddressInUse,
    /// A static address asked for is outside every pool and block of the
    /// node, reserved, in a disabled pool, or in another node's block.
    AddressNotAllowed,
    /// A pod or namespace annotation steering IPAM is malformed or names
    /// a pool that does not exist or is disabled.
    BadAnnotation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{kind:?}: {message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Response {
    Ok(Reply),
    Err(AgentError),
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(u64),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Serialise `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or(FrameError::TooLarge(body.len() as u64))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The body length a frame header announces, refused past [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len.into()));
    }
    Ok(len as usize)
}

/// Read one frame from a blocking stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header)?;
    let mut body = vec![0u8; frame_len(header)?];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Why a call to the agent failed, sorted by what the plugin should tell the
/// runtime.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody listens (agent down or starting): the runtime should retry.
    #[error("cannot reach the starling agent at {path}: {source}")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Connected, but no answer before the deadline (or the agent died mid-call).
    #[error("no answer from the starling agent at {path} before the deadline: {source}")]
    NoAnswer { path: PathBuf, source: FrameError },
    #[error("the starling agent at {path} refused the request: {error}")]
    Agent { path: PathBuf, error: AgentError },
}

/// A request sent to the agent whose answer has not been read yet.
pub struct Pending {
    stream: UnixStream,
    path: PathBuf,
}

/// Connect and send one request; the answer is read by [`Pending::wait`].
/// Splitting the two lets the plugin do work that does not depend on the
/// answer while the agent commits.
pub fn send(socket: &Path, request: Request, timeout: Duration) -> Result<Pending, CallError> {
    let envelope = Envelope::new(request, timeout);
    let no_answer = |source| CallError::NoAnswer {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| CallError::Unreachable {
        path: socket.to_path_buf(),
        source,
    })?;
    let timeout = envelope.remaining().max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| no_answer(e.into()))?;
    let frame = encode(&envelope).map_err(no_answer)?;
    stream.write_all(&frame).map_err(|e| no_answer(e.into()))?;
    Ok(Pending {
        stream,
        path: socket.to_path_buf(),
    })
}

impl Pending {
    /// Wait for the answer (the deadline set by [`send`] still applies).
    pub fn wait(mut self) -> Result<Reply, CallError> {
        match read_frame::<Response>(&mut self.stream) {
            Ok(Response::Ok(reply)) => Ok(reply),
            Ok(Response::Err(error)) => Err(CallError::Agent {
                path: self.path,
                error,
            }),
            Err(source) => Err(CallError::NoAnswer {
                path: self.path,
                source,
            }),
        }
    }
}

/// Send one request and wait for its answer, all within `timeout`.
pub fn call(socket: &Path, request: Request, timeout: Duration) -> Result<Reply, CallError> {
    send(socket, request, timeout)?.wait()
}

/// The host-side veth name for a container: "stl" plus the first 11 hex
/// digits of an FNV-1a hash of the container id and interface, so a
/// retry or a DEL finds the same name without any stored state (15 bytes,
/// the kernel's IFNAMSIZ limit).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let h = fnv1a64(container_id.as_bytes(), ifname.as_bytes());
    format!("stl{:011x}", h >> 20)
}

/// A locally administered unicast MAC for the pod side, derived from the same
/// hash: a fixed pod MAC means the result needs no read-back from the kernel.
pub fn pod_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let h = fnv1a64(container_id.as_bytes(), ifname.as_bytes()).to_be_bytes();
    [0x0a, h[0], h[1], h[2], h[3], h[4]]
}

fn fnv1a64(a: &[u8], b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.iter().chain([0u8].iter()).chain(b.iter()) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_ips_come_from_the_ip_key_of_cni_args() {
        let ips = static_ips_from_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAME=p;IP=10.0.0.5/24,fd00::5;K8S_POD_NAMESPACE=ns",
        )
        .unwrap();
        assert_eq!(ips.len(), 2);
        assert_eq!(ips[0].to_string(), "10.0.0.5");
        assert!(
            static_ips_from_cni_args("K8S_POD_NAME=p")
                .unwrap()
                .is_empty()
        );
        let err = static_ips_from_cni_args("IP=10.0.0.300").unwrap_err();
        assert!(err.contains("IP `10.0.0.300`"), "{err}");
    }

    #[test]
    fn envelope_round_trips_through_a_frame() {
        let env = Envelope::new(
            Request::Add(AddRequest {
                ips: vec![],
                key: AttachmentKey {
                    network: "k8s-pod-network".into(),
                    container_id: "c1".into(),
                    ifname: "eth0".into(),
                },
                netns: "/run/netns/p".into(),
                host_veth: "stl0123456789a".into(),
                pod: Some(PodRef {
                    namespace: "default".into(),
                    name: "web-0".into(),
                }),
            }),
            Duration::from_secs(1),
        );
        let frame = encode(&env).unwrap();
        let back: Envelope = read_frame(&mut frame.as_slice()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn the_pod_comes_from_cni_args() {
        let pod = PodRef::from_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-5d78c9869d-x2xkq;\
             K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=2b4e-11",
        )
        .unwrap();
        assert_eq!(
            pod,
            Some(PodRef {
                namespace: "kube-system".into(),
                name: "coredns-5d78c9869d-x2xkq".into(),
            })
        );
        assert_eq!(PodRef::from_cni_args("").unwrap(), None);
        assert_eq!(PodRef::from_cni_args("IgnoreUnknown=1").unwrap(), None);
        for (bad, names) in [
            ("K8S_POD_NAMESPACE=ns", "K8S_POD_NAME"),
            ("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=Web", "`Web`"),
            ("K8S_POD_NAMESPACE=;K8S_POD_NAME=w", "K8S_POD_NAMESPACE"),
            ("IgnoreUnknown", "`IgnoreUnknown`"),
        ] {
            let e = PodRef::from_cni_args(bad).unwrap_err().to_string();
            assert!(e.contains(names), "{bad}: {e}");
        }
    }

    #[test]
    fn oversized_frame_header_is_refused() {
        let header = (MAX_FRAME + 1).to_be_bytes();
        assert!(matches!(frame_len(header), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn host_veth_name_fits_ifnamsiz_and_is_stable() {
        let a = host_veth_name("0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("stl"));
        assert_eq!(
            a,
            host_veth_name("0123456789abcdef0123456789abcdef", "eth0")
        );
        assert_ne!(
            a,
            host_veth_name("0123456789abcdef0123456789abcdef", "eth1")
        );
    }

    #[test]
    fn pod_mac_is_locally_administered_unicast() {
        let m = pod_mac("c", "eth0");
        assert_eq!(m[0] & 0x01, 0, "unicast");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
    }
}
