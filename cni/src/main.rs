//! The `starling` CNI plugin (CNI spec 1.1.0).
//!
//! The runtime execs it once per operation. It asks the agent for addresses
//! first (so an unreachable agent means error 11 and nothing created), then
//! wires the pod; if wiring fails it removes what it made and releases the
//! addresses again.

mod netns;
mod wiring;

use ipnet::IpNet;
use rscni_plugin::cni::{Cni, Plugin};
use rscni_plugin::error::Error;
use rscni_plugin::types::{Args, CNIResult, Interface, IpConfig, NetConf, Route};
use rscni_plugin::version::SpecVersion;
use serde_json::Value;
use starling_cni_proto::{
    self as proto, AddRequest, AgentError, AttachmentKey, CallError, ErrorKind, PodRef, Reply,
    Request,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wiring::{GATEWAY_V4, GATEWAY_V6, HOST_VETH_MAC};

/// Plugin-specific error codes (the spec reserves 0-99).
const CODE_EXHAUSTED: u32 = 100;
const CODE_WIRING: u32 = 101;
const CODE_CHECK: u32 = 102;
const CODE_AGENT: u32 = 103;
const CODE_ADDRESS_IN_USE: u32 = 104;
const CODE_ADDRESS_NOT_ALLOWED: u32 = 105;
const CODE_BAD_ANNOTATION: u32 = 106;

/// The options this plugin reads from its network configuration, beyond the
/// spec's own keys.
#[derive(Debug)]
struct Options {
    socket: PathBuf,
    timeout: Duration,
    mtu: Option<u32>,
    route_protocol: Option<u8>,
}

impl Options {
    fn from_conf(conf: &NetConf) -> Result<Options, Error> {
        let field = |name: &str| conf.custom.get(name).filter(|v| !v.is_null());
        let invalid = |name: &str, want: &str, got: &Value| {
            Error::InvalidNetworkConfig(format!("field `{name}` must be {want}, got {got}"))
        };
        let socket = match field("socketPath") {
            None => PathBuf::from(proto::DEFAULT_SOCKET),
            Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
            Some(v) => return Err(invalid("socketPath", "a non-empty string", v)),
        };
        let timeout = match field("timeoutMs") {
            None => Duration::from_secs(10),
            Some(v) => match v.as_u64().filter(|ms| (1..=600_000).contains(ms)) {
                Some(ms) => Duration::from_millis(ms),
                None => return Err(invalid("timeoutMs", "an integer from 1 to 600000", v)),
            },
        };
        let mtu = match field("mtu") {
            None => None,
            Some(v) => match v.as_u64().filter(|m| (576..=65535).contains(m)) {
                Some(m) => Some(m as u32),
                None => return Err(invalid("mtu", "an integer from 576 to 65535", v)),
            },
        };
        let route_protocol = match field("routeProtocol") {
            None => None,
            Some(v) => match v.as_u64().filter(|p| (1..=255).contains(p)) {
                Some(p) => Some(p as u8),
                None => return Err(invalid("routeProtocol", "an integer from 1 to 255", v)),
            },
        };
        Ok(Options {
            socket,
            timeout,
            mtu,
            route_protocol,
        })
    }
}

/// What the runtime told us about the attachment (all present for ADD, DEL
/// and CHECK: rscni-plugin checks the environment before calling us).
struct Attachment {
    key: AttachmentKey,
    netns: Option<PathBuf>,
    host_veth: String,
}

impl Attachment {
    fn from_args(args: &Args) -> Result<Attachment, Error> {
        let container_id = args
            .container_id()
            .map(|c| c.to_string())
            .ok_or_else(|| Error::missing_env(&["CNI_CONTAINERID"]))?;
        let ifname = args
            .ifname()
            .map(|i| i.to_string())
            .ok_or_else(|| Error::missing_env(&["CNI_IFNAME"]))?;
        let host_veth = proto::host_veth_name(&container_id, &ifname);
        Ok(Attachment {
            key: AttachmentKey {
                network: args.config().name.clone(),
                container_id,
                ifname,
            },
            netns: args.netns().cloned(),
            host_veth,
        })
    }

    fn netns(&self) -> Result<&Path, Error> {
        self.netns
            .as_deref()
            .ok_or_else(|| Error::missing_env(&["CNI_NETNS"]))
    }
}

fn agent_error(e: CallError) -> Error {
    match e {
        CallError::Unreachable { .. } | CallError::NoAnswer { .. } => {
            Error::TryAgainLater(e.to_string())
        }
        CallError::Agent {
            error: AgentError { kind, message },
            ..
        } => match kind {
            ErrorKind::DeadlineExceeded | ErrorKind::NotReady => Error::TryAgainLater(message),
            ErrorKind::InvalidRequest => Error::InvalidNetworkConfig(message),
            ErrorKind::Exhausted => {
                Error::Custom(CODE_EXHAUSTED, "no free address".into(), message)
            }
            ErrorKind::Store => Error::Custom(CODE_AGENT, "IPAM store failure".into(), message),
            ErrorKind::AddressInUse => {
                Error::Custom(CODE_ADDRESS_IN_USE, "static address in use".into(), message)
            }
            ErrorKind::AddressNotAllowed => Error::Custom(
                CODE_ADDRESS_NOT_ALLOWED,
                "static address not allowed".into(),
                message,
            ),
            ErrorKind::BadAnnotation => Error::Custom(
                CODE_BAD_ANNOTATION,
                "invalid IPAM annotation".into(),
                message,
            ),
        },
    }
}

fn wiring_error(e: wiring::WiringError) -> Error {
    match e {
        wiring::WiringError::Netns { .. } => Error::InvalidNetNS(e.to_string()),
        other => Error::Custom(CODE_WIRING, "pod wiring failed".into(), other.to_string()),
    }
}

struct Starling;

impl Starling {
    fn call(opts: &Options, request: Request) -> Result<Reply, Error> {
        proto::call(&opts.socket, request, opts.timeout).map_err(agent_error)
    }
}

fn unexpected(reply: &Reply) -> Error {
    Error::Custom(
        CODE_AGENT,
        "unexpected reply from the agent".into(),
        format!("{reply:?}"),
    )
}

impl Cni for Starling {
    fn add(&self, args: Args) -> Result<CNIResult, Error> {
        let opts = Options::from_conf(args.config())?;
        let att = Attachment::from_args(&args)?;
        let netns = att.netns()?.to_path_buf();
        let cni_args = args.args().unwrap_or("");
        let pod =
            PodRef::from_cni_args(cni_args).map_err(|e| Error::InvalidEnvValue(e.to_string()))?;
        let ips = proto::static_ips_from_cni_args(cni_args).map_err(Error::InvalidEnvValue)?;
        // Unreachable agent: error 11 here, before anything is created.
        let mut pending = Some(
            proto::send(
                &opts.socket,
                Request::Add(AddRequest {
                    key: att.key.clone(),
                    netns: netns.display().to_string(),
                    host_veth: att.host_veth.clone(),
                    pod,
                    ips,
                }),
                opts.timeout,
            )
            .map_err(agent_error)?,
        );
        let pod_mac = proto::pod_mac(&att.key.container_id, &att.key.ifname);
        let link = wiring::Link {
            netns: &netns,
            ifname: &att.key.ifname,
            pod_mac,
            host_veth: &att.host_veth,
        };
        let wired = wiring::add(&link, || {
            let reply = pending
                .take()
                .ok_or_else(|| Error::Custom(CODE_AGENT, "internal".into(), "no request".into()))?
                .wait()
                .map_err(agent_error)?;
            let Reply::Added(added) = reply else {
                return Err(unexpected(&reply));
            };
            Ok(wiring::Addressing {
                ips: added.allocation.ips,
                mtu: opts.mtu.unwrap_or(added.mtu),
                route_protocol: opts.route_protocol.unwrap_or(added.route_protocol),
            })
        });
        let addressing = match wired {
            Ok(a) => a,
            // The agent refused or could not be heard; the veth is gone again.
            Err(wiring::AddError::Addressing(e)) => return Err(e),
            Err(wiring::AddError::Wiring(e)) => {
                // The veth is gone (wiring::add rolls back); give the
                // addresses back too, once the agent has answered the ADD so
                // the release cannot overtake it. If the agent went away
                // meanwhile, the runtime's DEL or the next GC releases them.
                if let Some(p) = pending.take() {
                    let _ = p.wait();
                }
                let _ = Self::call(
                    &opts,
                    Request::Del {
                        key: att.key.clone(),
                    },
                );
                return Err(wiring_error(e));
            }
        };
        Ok(result(
            args.config().prev_result.clone(),
            &att,
            &netns,
            pod_mac,
            addressing.mtu,
            &addressing.ips,
            args.config(),
        ))
    }

    fn del(&self, args: Args) -> Result<(), Error> {
        let opts = Options::from_conf(args.config())?;
        let att = Attachment::from_args(&args)?;
        // Unwire before releasing: an address must not be handed to a new pod
        // while the old pod's route still points at the old veth.
        wiring::del(&[att.host_veth.as_str()]).map_err(wiring_error)?;
        let reply = Self::call(&opts, Request::Del { key: att.key })?;
        match reply {
            Reply::Released { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    fn check(&self, args: Args) -> Result<(), Error> {
        let opts = Options::from_conf(args.config())?;
        let att = Attachment::from_args(&args)?;
        let netns = att.netns()?.to_path_buf();
        let reply = Self::call(
            &opts,
            Request::Check {
                key: att.key.clone(),
            },
        )?;
        let Reply::Found { allocation } = reply else {
            return Err(unexpected(&reply));
        };
        let allocation = allocation.ok_or_else(|| {
            Error::Custom(
                CODE_CHECK,
                "no allocation".into(),
                format!("the agent holds no addresses for {}", att.key),
            )
        })?;
        if let Some(prev) = &args.config().prev_result {
            for ip in &allocation.ips {
                if !prev.ips.iter().any(|c| c.address.addr() == ip.addr()) {
                    return Err(Error::Custom(
                        CODE_CHECK,
                        "prevResult does not match".into(),
                        format!("prevResult lacks {}", ip.addr()),
                    ));
                }
            }
        }
        let pod = wiring::Pod {
            link: wiring::Link {
                netns: &netns,
                ifname: &att.key.ifname,
                pod_mac: proto::pod_mac(&att.key.container_id, &att.key.ifname),
                host_veth: &att.host_veth,
            },
            ips: &allocation.ips,
        };
        wiring::check(&pod).map_err(|e| match e {
            wiring::WiringError::Drift(msg) => {
                Error::Custom(CODE_CHECK, "pod networking drifted".into(), msg)
            }
            other => wiring_error(other),
        })
    }

    fn status(&self, args: Args) -> Result<(), Error> {
        let opts = Options::from_conf(args.config())?;
        match proto::call(&opts.socket, Request::Status, opts.timeout) {
            Ok(Reply::Status(s)) if s.ready => Ok(()),
            Ok(Reply::Status(s)) => Err(Error::PluginNotAvailable(s.reason)),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(Error::PluginNotAvailable(e.to_string())),
        }
    }

    fn gc(&self, args: Args) -> Result<(), Error> {
        let opts = Options::from_conf(args.config())?;
        let valid = valid_attachments(args.config())?;
        let reply = Self::call(
            &opts,
            Request::Gc {
                network: args.config().name.clone(),
                valid,
                dry_run: false,
            },
        )?;
        let Reply::Collected { allocations } = reply else {
            return Err(unexpected(&reply));
        };
        let veths: Vec<&str> = allocations.iter().map(|a| a.host_veth.as_str()).collect();
        wiring::del(&veths).map_err(wiring_error)
    }
}

/// `cni.dev/valid-attachments` (spec 1.1), or the older `cni.dev/attachments`,
/// as keys of this network. Neither present is refused: GC releases what is
/// not listed, so a missing list (a runtime bug, an old runtime) would read
/// as "no pod is valid" and wipe the node. (`null` under the older key is
/// libcni's empty list.)
fn valid_attachments(conf: &NetConf) -> Result<Vec<AttachmentKey>, Error> {
    let network = conf.name.clone();
    if let Some(list) = &conf.valid_attachments {
        return Ok(list
            .iter()
            .map(|a| AttachmentKey {
                network: network.clone(),
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect());
    }
    match conf.custom.get("cni.dev/attachments") {
        // libcni sends both spellings, each `null` when no attachment is
        // valid (a Go nil slice): the keys are there, the list is empty.
        Some(Value::Null) => Ok(Vec::new()),
        None => Err(Error::InvalidNetworkConfig(format!(
            "GC of network `{network}` without `cni.dev/valid-attachments`: refusing to \
             release anything (an absent list is not an empty one)"
        ))),
        Some(v) => {
            #[derive(serde::Deserialize)]
            struct Old {
                #[serde(rename = "containerID")]
                container_id: String,
                ifname: String,
            }
            let old: Vec<Old> = serde_json::from_value(v.clone())
                .map_err(|e| Error::FailedToDecode(format!("field `cni.dev/attachments`: {e}")))?;
            Ok(old
                .into_iter()
                .map(|o| AttachmentKey {
                    network: network.clone(),
                    container_id: o.container_id,
                    ifname: o.ifname,
                })
                .collect())
        }
    }
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The ADD result: the host veth and the pod interface, one IP config per
/// family with its gateway, and the default routes. When chained after
/// another plugin, ours is appended to its result.
fn result(
    prev: Option<CNIResult>,
    att: &Attachment,
    netns: &Path,
    pod_mac: [u8; 6],
    mtu: u32,
    ips: &[IpNet],
    conf: &NetConf,
) -> CNIResult {
    let mut out = prev.unwrap_or_default();
    let base = out.interfaces.len() as u32;
    out.interfaces.push(Interface {
        name: att.host_veth.clone(),
        mac: mac_string(HOST_VETH_MAC),
        mtu: Some(mtu),
        sandbox: None,
        socket_path: None,
        pci_id: None,
    });
    out.interfaces.push(Interface {
        name: att.key.ifname.clone(),
        mac: mac_string(pod_mac),
        mtu: Some(mtu),
        sandbox: Some(netns.display().to_string()),
        socket_path: None,
        pci_id: None,
    });
    for ip in ips {
        let gw = match ip.addr() {
            IpAddr::V4(_) => IpAddr::V4(GATEWAY_V4),
            IpAddr::V6(_) => IpAddr::V6(GATEWAY_V6),
        };
        out.ips.push(IpConfig {
            interface: Some(base + 1),
            address: *ip,
            gateway: Some(gw),
        });
        let any = match ip.addr() {
            IpAddr::V4(_) => IpNet::V4(Default::default()),
            IpAddr::V6(_) => IpNet::V6(Default::default()),
        };
        out.routes.push(Route {
            dst: any,
            gw: Some(gw),
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        });
    }
    if out.dns.is_none() {
        out.dns = conf.dns.clone();
    }
    out
}

fn main() {
    let versions = proto::CNI_VERSIONS
        .iter()
        .filter_map(|v| v.parse::<SpecVersion>().ok())
        .collect();
    let plugin = Plugin::new(SpecVersion::new(1, 1, 0), versions)
        .msg(concat!("starling CNI plugin v", env!("CARGO_PKG_VERSION")));
    // rscni-plugin has already written the spec error JSON on stdout; the
    // exit status is what tells the runtime it failed.
    if plugin.run(&Starling).is_err() {
        std::process::exit(1);
    }
}
