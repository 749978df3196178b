//! Starling against a real Kubernetes control plane: etcd and kube-apiserver
//! built by `tests/k8s/control-plane.sh build` and started on loopback (TLS,
//! client certificates, service-account tokens), driven with the kubectl and
//! cnitool built alongside them, never with tools from PATH.
//!
//! One control plane serves the whole test process (`k8s_parts/cluster.rs`);
//! every test names its objects so that tests running in parallel never meet.

// ADD latency through the API server (an ignored benchmark).
#[path = "k8s_parts/add_bench.rs"]
mod add_bench;
#[path = "k8s_parts/bgp.rs"]
mod bgp;
// Borrowing's cross-node record (IPAMBlock) under races.
#[path = "k8s_parts/borrow.rs"]
mod borrow;
// Borrowing across real agents: a borrowed address pinged and released.
#[path = "k8s_parts/borrow_e2e.rs"]
mod borrow_e2e;
#[path = "k8s_parts/cluster.rs"]
mod cluster;
#[path = "k8s_parts/datastore.rs"]
mod datastore;
#[path = "k8s_parts/e2e.rs"]
mod e2e;
#[path = "k8s_parts/health.rs"]
mod health;
#[path = "k8s_parts/ipam.rs"]
mod ipam;
#[path = "k8s_parts/node_cleanup.rs"]
mod node_cleanup;
#[path = "k8s_parts/services.rs"]
mod services;

use anyhow::{Context, Result, ensure};
use cluster::{Cluster, checked, cluster, log, repo_root, tool};
use serde_json::{Value, json};
use starling_cni_proto::{self as proto, Reply, Request};
use starling_tests::{Daemon, Netns, TempDir, bin, require_tool, wait_for};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn apiserver_version_is_logged_and_matches_the_build() -> Result<()> {
    let c = cluster();
    let v: Value = serde_json::from_str(&c.kubectl_ok(&["version", "-o", "json"])?)?;
    let server = v["serverVersion"]["gitVersion"]
        .as_str()
        .context("no serverVersion.gitVersion")?;
    let client = v["clientVersion"]["gitVersion"]
        .as_str()
        .context("no clientVersion.gitVersion")?;
    log(&format!(
        "kube-apiserver {server} at {} (kubectl {client})",
        c.server
    ));
    // k8s-openapi's `v1_33` feature: the agent speaks this release's API.
    ensure!(server.starts_with("v1.33."), "apiserver is {server}");
    ensure!(client == server, "kubectl {client} vs apiserver {server}");
    Ok(())
}

#[test]
fn manifests_apply_cleanly_and_crds_become_established() -> Result<()> {
    let c = cluster();
    for file in ["manifests/crds.yaml", "manifests/rbac.yaml"] {
        let path = repo_root().join(file);
        let args = [
            "apply",
            "--server-side",
            "--field-manager",
            "starling-tests",
            "-f",
            path.to_str().context("path")?,
        ];
        let out = c.kubectl(&args);
        let said = checked(&args, out.clone())?;
        // Cleanly: no warnings either (unknown fields, deprecated APIs).
        ensure!(
            out.stderr.is_empty(),
            "{file} applied with warnings: {}",
            stderr(&out)
        );
        ensure!(said.contains("serverside-applied"), "{file}: {said}");
    }
    let crds = c.kubectl_ok(&[
        "get",
        "-f",
        repo_root()
            .join("manifests/crds.yaml")
            .to_str()
            .context("path")?,
        "-o",
        "name",
    ])?;
    let names: Vec<&str> = crds.lines().collect();
    for kind in [
        "ippools",
        "bgpconfigurations",
        "bgppeers",
        "starlingnodes",
        "blockaffinities",
        "ipamblocks",
        "ipreservations",
        "bgpfilters",
    ] {
        let name = format!("customresourcedefinition.apiextensions.k8s.io/{kind}.starling.dev");
        ensure!(names.contains(&name.as_str()), "{name} missing: {crds}");
    }
    wait_for("every CRD Established", Cluster::SETTLE, || {
        let out = c.kubectl_ok(&[
            "get",
            "crd",
            "-o",
            "jsonpath={range .items[?(@.spec.group==\"starling.dev\")]}{.metadata.name}={.status.conditions[?(@.type==\"Established\")].status}{\"\\n\"}{end}",
        ])?;
        Ok(out.lines().count() == 8 && out.lines().all(|l| l.ends_with("=True")))
    })?;
    // The served API answers for every kind.
    for kind in [
        "ippools",
        "bgpconfigurations",
        "bgppeers",
        "starlingnodes",
        "blockaffinities",
        "ipamblocks",
        "ipreservations",
        "bgpfilters",
    ] {
        c.kubectl_ok(&["get", &format!("{kind}.starling.dev")])?;
    }
    let sa = c.kubectl_ok(&[
        "get",
        "serviceaccount",
        "starling-agent",
        "-n",
        "kube-system",
    ])?;
    ensure!(sa.contains("starling-agent"), "{sa}");
    c.kubectl_ok(&["get", "clusterrole,clusterrolebinding", "starling-agent"])?;
    c.kubectl_ok(&[
        "get",
        "role,rolebinding",
        "starling-agent",
        "-n",
        "kube-system",
    ])?;
    Ok(())
}

/// A resource our validation must refuse, and the message it must say.
struct Invalid {
    what: &'static str,
    yaml: &'static str,
    message: &'static str,
}

const INVALID: &[Invalid] = &[
    Invalid {
        what: "IPPool with host bits",
        yaml: "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: bad-host-bits}\nspec: {cidr: 10.244.1.5/16}\n",
        message: "cidr has host bits set: write the network address, e.g. 10.244.0.0/16",
    },
    Invalid {
        what: "IPPool whose cidr is no prefix",
        yaml: "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: bad-cidr}\nspec: {cidr: not-a-prefix}\n",
        message: "cidr must be a prefix such as 10.244.0.0/16 or fd00:10:244::/56",
    },
    Invalid {
        what: "IPv6 IPPool with an IPv4 block size",
        yaml: "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: bad-block}\nspec: {cidr: 'fd00:10:244::/56', blockSize: 26}\n",
        message: "blockSize must be 20-32 for an IPv4 pool and 116-128 for an IPv6 pool",
    },
    Invalid {
        what: "IPv6 IPPool with IPIP",
        yaml: "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: bad-ipip}\nspec: {cidr: 'fd00:10:244::/56', ipipMode: Always}\n",
        message: "ipipMode applies to IPv4 pools only: use Never for an IPv6 pool",
    },
    Invalid {
        what: "IPPool with IPIP and VXLAN",
        yaml: "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: bad-both-encaps}\nspec: {cidr: 10.245.0.0/16, ipipMode: CrossSubnet, vxlanMode: Always}\n",
        message: "ipipMode and vxlanMode cannot both be enabled: set one of them to Never",
    },
    Invalid {
        what: "StarlingNode without addresses",
        yaml: "apiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata: {name: bad-node}\nspec: {asNumber: 65001}\n",
        message: "a node needs ipv4Address or ipv6Address (or both)",
    },
    Invalid {
        what: "StarlingNode with an IPv6 ipv4Address",
        yaml: "apiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata: {name: bad-node4}\nspec: {ipv4Address: '2001:db8::1/64'}\n",
        message: "ipv4Address must be an IPv4 address with prefix length, e.g. 192.0.2.10/24",
    },
    Invalid {
        what: "StarlingNode podCIDR with host bits",
        yaml: "apiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata: {name: bad-podcidr}\nspec: {ipv4Address: 192.0.2.10/24, podCIDRs: [10.244.1.1/24]}\n",
        message: "podCIDRs must be prefixes without host bits, such as 10.244.1.0/24",
    },
    Invalid {
        what: "BGPPeer with node and nodeSelector",
        yaml: "apiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: bad-both}\nspec: {node: n1, nodeSelector: all(), peerIP: 192.0.2.9, asNumber: 65000}\n",
        message: "set at most one of node and nodeSelector (neither: every node has this peer)",
    },
    Invalid {
        what: "BGPPeer with peerIP but no AS",
        yaml: "apiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: bad-as}\nspec: {peerIP: 192.0.2.9}\n",
        message: "asNumber is required with peerIP",
    },
    Invalid {
        what: "BGPPeer with neither peerIP nor peerSelector",
        yaml: "apiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: bad-none}\nspec: {node: n1}\n",
        message: "set exactly one of peerIP (a router outside the cluster) and peerSelector (the nodes to peer with)",
    },
    Invalid {
        what: "BGPPeer password from two places",
        yaml: "apiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: bad-password}\nspec: {peerIP: 192.0.2.9, asNumber: 65000, password: {file: /etc/bgp, secretKeyRef: {name: bgp, key: tor}}}\n",
        message: "password: set exactly one of secretKeyRef and file",
    },
    Invalid {
        what: "BGPConfiguration not named default",
        yaml: "apiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {name: other}\nspec: {asNumber: 64512}\n",
        message: "BGPConfiguration is a singleton: name it `default`",
    },
    Invalid {
        what: "BlockAffinity with host bits",
        yaml: "apiVersion: starling.dev/v1\nkind: BlockAffinity\nmetadata: {name: bad-affinity}\nspec: {cidr: 10.244.3.1/26, node: n1}\n",
        message: "cidr has host bits set: write the block's network address",
    },
];

/// The same kinds, valid: proves the rejections above come from the rule
/// each names, not from a broken schema.
const VALID: &[&str] = &[
    "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: good-pool}\nspec: {cidr: 10.244.0.0/16, blockSize: 26, ipipMode: CrossSubnet}\n",
    "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: good-pool6}\nspec: {cidr: 'fd00:10:244::/56', blockSize: 122}\n",
    "apiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata: {name: good-node}\nspec: {ipv4Address: 192.0.2.10/24, podCIDRs: [10.244.1.0/24]}\n",
    "apiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: good-peer}\nspec: {node: n1, peerIP: 192.0.2.9, asNumber: 65000, password: {secretKeyRef: {name: bgp, key: tor}}}\n",
    "apiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: good-mesh}\nspec: {peerSelector: has(route-reflector)}\n",
    "apiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 64512}\n",
    "apiVersion: starling.dev/v1\nkind: BlockAffinity\nmetadata: {name: good-affinity}\nspec: {cidr: 10.244.3.0/26, node: n1}\n",
];

#[test]
fn invalid_resources_are_rejected_with_our_validation_messages() -> Result<()> {
    let c = cluster();
    c.ensure_manifests()?;
    // Server-side dry run: the full admission and validation path, and no
    // objects left for other tests' agents to see.
    let args = ["create", "--dry-run=server", "-f", "-"];
    for yaml in VALID {
        checked(&args, c.kubectl_stdin(&args, yaml)).context("a valid resource")?;
    }
    let mut wrong = Vec::new();
    for case in INVALID {
        let out = c.kubectl_stdin(&args, case.yaml);
        let err = stderr(&out);
        if out.status.success() {
            wrong.push(format!("{}: accepted", case.what));
        } else if !err.contains(case.message) {
            wrong.push(format!(
                "{}: rejected without {:?}: {err}",
                case.what, case.message
            ));
        }
    }
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// `starlingctl import-calico` of a kubectl export of Calico's CRDs and
/// Nodes writes objects the real API server takes as they are: strict field
/// validation (no unknown field is pruned away) and our CEL rules, in a
/// server-side dry run.
#[test]
fn imported_calico_yaml_is_accepted_by_the_apiserver() -> Result<()> {
    let c = cluster();
    c.ensure_manifests()?;
    let dir = TempDir::new("calico-k8s")?;
    let calico = dir.join("calico.yaml");
    std::fs::write(
        &calico,
        r#"apiVersion: v1
kind: List
items:
- apiVersion: crd.projectcalico.org/v1
  kind: IPPool
  metadata:
    annotations:
      projectcalico.org/metadata: '{"uid":"0b5d1f0e","creationTimestamp":"2025-03-01T09:12:44Z"}'
    generation: 1
    managedFields:
    - apiVersion: crd.projectcalico.org/v1
      fieldsType: FieldsV1
      fieldsV1:
        f:spec:
          f:cidr: {}
      manager: calico-node
      operation: Update
    name: calico-import-pool
    resourceVersion: "812"
    uid: 0b5d1f0e-8a44-4a07-9d0a-3f6c2a9b7e11
  spec:
    allowedUses: [Workload, Tunnel]
    blockSize: 26
    cidr: 10.250.0.0/16
    ipipMode: CrossSubnet
    natOutgoing: true
    nodeSelector: all()
    vxlanMode: Never
- apiVersion: crd.projectcalico.org/v1
  kind: BGPPeer
  metadata:
    name: calico-import-tor
    uid: 1c3e0a52-9b7d-4f8e-8b0f-2d4c6e8a0b44
  spec:
    asNumber: 64567
    nodeSelector: rack == 'r1'
    peerIP: 192.0.2.1
    password:
      secretKeyRef: {name: starling-bgp-passwords, key: tor, optional: false}
    filters: [no-default]
- apiVersion: crd.projectcalico.org/v1
  kind: BGPFilter
  metadata:
    name: no-default
    uid: 2d4f1b63-0c8e-4a9f-9c1a-3e5d7f9b1c55
  spec:
    exportV4:
    - {action: Accept, matchOperator: In, cidr: 10.250.0.0/16, prefixLength: {min: 26}}
    importV4:
    - {action: Reject, matchOperator: Equal, cidr: 0.0.0.0/0}
    - {action: Accept, matchOperator: NotIn, cidr: 10.0.0.0/8, source: RemotePeers}
---
apiVersion: v1
kind: Node
metadata:
  annotations:
    projectcalico.org/IPv4Address: 192.0.2.11/24
    projectcalico.org/ASNumber: "64513"
    projectcalico.org/RouteReflectorClusterID: 224.0.0.1
  labels:
    kubernetes.io/os: linux
  name: calico-import-node
status:
  addresses:
  - address: 192.0.2.11
    type: InternalIP
"#,
    )?;
    let out = Command::new(bin("starlingctl"))
        .arg("import-calico")
        .arg(&calico)
        .output()?;
    ensure!(out.status.success(), "import-calico: {}", stderr(&out));
    // The filters carry over: no warning about them any more.
    ensure!(
        !stderr(&out).contains("spec.filters") && !stderr(&out).contains("BGPFilter"),
        "{}",
        stderr(&out)
    );
    let yaml = String::from_utf8(out.stdout)?;
    ensure!(
        yaml.matches("apiVersion: starling.dev/v1").count() == 4
            && yaml.contains("kind: BGPFilter"),
        "{yaml}"
    );
    let args = ["create", "--dry-run=server", "--validate=strict", "-f", "-"];
    let created = checked(&args, c.kubectl_stdin(&args, &yaml))
        .with_context(|| format!("the API server refused the import:\n{yaml}"))?;
    for object in [
        "ippool.starling.dev/calico-import-pool",
        "bgppeer.starling.dev/calico-import-tor",
        "bgpfilter.starling.dev/no-default",
        "starlingnode.starling.dev/calico-import-node",
    ] {
        ensure!(created.contains(object), "{object} not created: {created}");
    }
    Ok(())
}

/// kubectl as the agent's ServiceAccount.
struct Agent<'a> {
    c: &'a Cluster,
    kubeconfig: PathBuf,
}

const AGENT_USER: &str = "system:serviceaccount:kube-system:starling-agent";

impl Agent<'_> {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.c.kubectl_as(&self.kubeconfig, args, stdin)
    }

    fn allowed(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        checked(args, self.run(args, stdin)).context("the agent's RBAC must allow this")
    }

    /// A real watch: the server streams events until `timeoutSeconds`.
    fn watch(&self, path: &str) -> Result<()> {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.allowed(
            &[
                "get",
                "--raw",
                &format!("{path}{sep}watch=1&timeoutSeconds=1"),
            ],
            None,
        )
        .map(|_| ())
    }

    fn forbidden(&self, args: &[&str], stdin: Option<&str>) -> Result<()> {
        let out = self.run(args, stdin);
        let err = stderr(&out);
        ensure!(
            // kubectl words a 403 as `Error from server (Forbidden)` or,
            // for some commands, `... is forbidden: User ...`.
            !out.status.success()
                && err.to_lowercase().contains("forbidden")
                && err.contains(AGENT_USER),
            "`kubectl {}` as the agent must get 403 Forbidden, got {}: {err}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(())
    }
}

#[test]
fn agent_service_account_can_do_its_job_and_nothing_more() -> Result<()> {
    let c = cluster();
    c.ensure_manifests()?;
    let dir = TempDir::new("k8s-rbac")?;
    let token = c.token_for("kube-system", "starling-agent")?;
    let agent = Agent {
        c,
        kubeconfig: dir.join("agent.kubeconfig"),
    };
    c.kubeconfig_with_token(&token, &agent.kubeconfig)?;
    let who = agent.allowed(
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
        None,
    )?;
    ensure!(who == AGENT_USER, "token authenticates as {who}");

    // The whole grant, as the API server's authorizer answers it (`kubectl
    // auth can-i --as` the ServiceAccount): every verb the code uses is
    // granted and every neighbouring one is refused.
    let sa = format!("--as={AGENT_USER}");
    let can_i = |verb: &str, resource: &str, ns: Option<&str>| -> Result<bool> {
        let mut args = vec!["auth", "can-i", verb, resource, sa.as_str()];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let out = c.kubectl(&args);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match answer.as_str() {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => anyhow::bail!("kubectl {}: {answer} {}", args.join(" "), stderr(&out)),
        }
    };
    let config_kinds = [
        "ippools",
        "bgpconfigurations",
        "bgppeers",
        "bgpfilters",
        "starlingnodes",
        "ipreservations",
    ];
    let mut grants: Vec<(&str, String, Option<&str>)> = vec![
        ("list", "nodes".into(), None),
        ("watch", "nodes".into(), None),
        // The agent's autodetected address, in its Node's annotation.
        ("patch", "nodes".into(), None),
        ("list", "services".into(), None),
        ("watch", "services".into(), None),
        ("list", "endpointslices.discovery.k8s.io".into(), None),
        ("watch", "endpointslices.discovery.k8s.io".into(), None),
        ("list", "blockaffinities.starling.dev".into(), None),
        ("watch", "blockaffinities.starling.dev".into(), None),
        ("get", "blockaffinities.starling.dev".into(), None),
        ("create", "blockaffinities.starling.dev".into(), None),
        ("delete", "blockaffinities.starling.dev".into(), None),
        // Borrowing's records (docs/cni.md, Borrowing).
        ("get", "ipamblocks.starling.dev".into(), None),
        ("list", "ipamblocks.starling.dev".into(), None),
        ("watch", "ipamblocks.starling.dev".into(), None),
        ("create", "ipamblocks.starling.dev".into(), None),
        ("update", "ipamblocks.starling.dev".into(), None),
        ("delete", "ipamblocks.starling.dev".into(), None),
        (
            "get",
            "secrets/starling-bgp-passwords".into(),
            Some("kube-system"),
        ),
        // IPAM annotations of the pod an ADD names, and of its namespace:
        // watched (this node's pods), read with get when the copy lacks them.
        ("get", "pods".into(), Some("default")),
        ("list", "pods".into(), None),
        ("watch", "pods".into(), None),
        ("get", "namespaces".into(), None),
        ("list", "namespaces".into(), None),
        ("watch", "namespaces".into(), None),
    ];
    let mut refusals: Vec<(&str, String, Option<&str>)> = vec![
        ("get", "nodes".into(), None),
        ("update", "nodes".into(), None),
        ("create", "nodes".into(), None),
        ("delete", "nodes".into(), None),
        ("get", "services".into(), Some("default")),
        ("update", "services".into(), Some("default")),
        ("patch", "services/status".into(), Some("default")),
        ("create", "services".into(), Some("default")),
        (
            "get",
            "endpointslices.discovery.k8s.io".into(),
            Some("default"),
        ),
        (
            "create",
            "endpointslices.discovery.k8s.io".into(),
            Some("default"),
        ),
        (
            "update",
            "endpointslices.discovery.k8s.io".into(),
            Some("default"),
        ),
        ("list", "endpoints".into(), None),
        // Borrowing's record: edited by compare-and-swap, never deleted.
        ("patch", "ipamblocks.starling.dev".into(), None),
        ("deletecollection", "ipamblocks.starling.dev".into(), None),
        ("update", "blockaffinities.starling.dev".into(), None),
        ("patch", "blockaffinities.starling.dev".into(), None),
        (
            "deletecollection",
            "blockaffinities.starling.dev".into(),
            None,
        ),
        // Secrets by name only, that one name only, never listed or watched.
        ("list", "secrets".into(), Some("kube-system")),
        ("watch", "secrets".into(), Some("kube-system")),
        (
            "get",
            "secrets/some-other-secret".into(),
            Some("kube-system"),
        ),
        (
            "get",
            "secrets/starling-bgp-passwords".into(),
            Some("default"),
        ),
        ("list", "secrets".into(), None),
        ("create", "secrets".into(), Some("kube-system")),
        ("create", "pods".into(), Some("default")),
        ("update", "pods".into(), Some("default")),
        ("patch", "pods".into(), Some("default")),
        ("delete", "pods".into(), Some("default")),
        ("update", "namespaces".into(), None),
        ("patch", "namespaces".into(), None),
        ("create", "configmaps".into(), Some("default")),
    ];
    for kind in config_kinds {
        let r = format!("{kind}.starling.dev");
        grants.push(("list", r.clone(), None));
        grants.push(("watch", r.clone(), None));
        for verb in ["get", "create", "update", "patch", "delete"] {
            refusals.push((verb, r.clone(), None));
        }
    }
    for (verb, resource, ns) in &grants {
        ensure!(
            can_i(verb, resource, *ns)?,
            "the agent must be allowed to {verb} {resource} ({ns:?})"
        );
    }
    for (verb, resource, ns) in &refusals {
        ensure!(
            !can_i(verb, resource, *ns)?,
            "the agent must NOT be allowed to {verb} {resource} ({ns:?})"
        );
    }

    // The same through real requests with the ServiceAccount's token.
    agent.allowed(&["get", "nodes"], None)?;
    agent.watch("/api/v1/nodes")?;
    agent.watch("/api/v1/services")?;
    agent.watch("/apis/discovery.k8s.io/v1/endpointslices")?;
    agent.forbidden(&["get", "node", "no-such-node-starling"], None)?;
    // patch nodes is exercised by real requests in
    // bgp::agents_publish_their_autodetected_address_and_read_each_others_subnet
    // (the agents run with this ServiceAccount's token); kubectl's patch
    // would need get, which the agent does not have.
    for kind in [
        "ippools",
        "bgpconfigurations",
        "bgppeers",
        "starlingnodes",
        "blockaffinities",
        "ipreservations",
        "bgpfilters",
    ] {
        agent.allowed(&["get", &format!("{kind}.starling.dev")], None)?;
        agent.watch(&format!("/apis/starling.dev/v1/{kind}"))?;
    }
    // The named Secret: the get is authorised (404 when it does not exist).
    let named = agent.run(
        &[
            "get",
            "secret",
            "starling-bgp-passwords",
            "-n",
            "kube-system",
        ],
        None,
    );
    ensure!(
        named.status.success() || stderr(&named).contains("NotFound"),
        "get secret starling-bgp-passwords: {}",
        stderr(&named)
    );
    agent.forbidden(&["get", "secrets", "-n", "kube-system"], None)?;
    agent.forbidden(
        &[
            "get",
            "secret",
            "bootstrap-token-abcdef",
            "-n",
            "kube-system",
        ],
        None,
    )?;

    // IPAM writes: claim a block, read the holder, release it; no update.
    let name = format!("rbac-check-{}", std::process::id());
    let affinity = format!(
        "apiVersion: starling.dev/v1\nkind: BlockAffinity\nmetadata: {{name: {name}}}\nspec: {{cidr: 198.51.100.0/26, node: rbac-check}}\n"
    );
    agent.allowed(&["create", "-f", "-"], Some(&affinity))?;
    let fetched = agent.allowed(
        &["get", "blockaffinity.starling.dev", &name, "-o", "json"],
        None,
    );
    let replaced = fetched.and_then(|json| {
        let mut obj: Value = serde_json::from_str(&json)?;
        ensure!(obj["metadata"]["resourceVersion"].is_string(), "{obj}");
        obj["spec"]["state"] = json!("pending");
        agent.forbidden(&["replace", "-f", "-"], Some(&obj.to_string()))
    });
    let deleted = agent.allowed(&["delete", "blockaffinity.starling.dev", &name], None);
    if deleted.is_err() {
        let _ = c.kubectl(&[
            "delete",
            "blockaffinity.starling.dev",
            &name,
            "--ignore-not-found",
        ]);
    }
    replaced?;
    deleted?;

    // Nothing more: writes outside the agent's needs are refused.
    agent.forbidden(
        &[
            "create",
            "configmap",
            "starling-rbac-check",
            "-n",
            "default",
        ],
        None,
    )?;
    agent.forbidden(&["delete", "node", "no-such-node-starling"], None)?;
    agent.forbidden(
        &["create", "-f", "-"],
        Some("apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: rbac-check}\nspec: {cidr: 10.250.0.0/16}\n"),
    )?;
    // Node objects are the kubelet's: no creating (a server-side dry run
    // is authorised like the real request and leaves nothing behind).
    agent.forbidden(
        &["create", "--dry-run=server", "-f", "-"],
        Some("apiVersion: v1\nkind: Node\nmetadata: {name: starling-rbac-check}\n"),
    )?;
    // Secrets of other namespaces stay closed.
    agent.forbidden(&["get", "secrets", "-n", "default"], None)?;
    agent.forbidden(&["get", "secrets", "--all-namespaces"], None)?;
    Ok(())
}

/// The node agent serving IPAM for the plugin, inside a namespace that plays the node.
struct Node {
    ns: Netns,
    dir: TempDir,
    socket: PathBuf,
    agent: Option<Daemon>,
}

impl Node {
    fn start(tag: &str) -> Result<Node> {
        let ns = Netns::new(tag)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"])?;
        let dir = TempDir::new("k8s-cni")?;
        let socket = dir.join("run/cni.sock");
        let config = dir.join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "nodeName: {}\nstateDir: {}\nsocketPath: {}\nmtu: 1450\nipam:\n  podCIDRs: [\"10.244.7.0/24\"]\n",
                ns.name,
                dir.join("state").display(),
                socket.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut cmd = ns.command(bin("starling-agent").to_str().context("path")?);
        cmd.args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log);
        let mut agent = Daemon::spawn("starling-agent", cmd)?;
        let s = socket.clone();
        wait_for(
            "the agent to answer STATUS",
            Duration::from_secs(20),
            || {
                agent.check_alive()?;
                Ok(matches!(
                    proto::call(&s, Request::Status, Duration::from_secs(2)),
                    Ok(Reply::Status(st)) if st.ready
                ))
            },
        )
        .with_context(|| {
            format!(
                "agent log: {}",
                std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
            )
        })?;
        Ok(Node {
            ns,
            dir,
            socket,
            agent: Some(agent),
        })
    }

    fn allocated(&self) -> Result<usize> {
        match proto::call(&self.socket, Request::Status, Duration::from_secs(10))? {
            Reply::Status(s) => Ok(s.allocated),
            other => anyhow::bail!("unexpected reply {other:?}"),
        }
    }
}

/// cnitool, run inside the node namespace the way a runtime would.
struct Libcni {
    node_ns: String,
    agent_log: PathBuf,
    cnitool: PathBuf,
    cni_path: String,
    netconf_dir: PathBuf,
    network: String,
}

impl Libcni {
    fn run(&self, command: &str, netns: &str) -> Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node_ns])
            .arg(&self.cnitool)
            .args([command, &self.network, netns])
            .env("CNI_PATH", &self.cni_path)
            .env("NETCONFPATH", &self.netconf_dir)
            .env("CNI_IFNAME", "eth0")
            .stdin(Stdio::null());
        cmd.output().context("cannot run cnitool")
    }

    fn ok(&self, command: &str, netns: &str) -> Result<String> {
        let out = self.run(command, netns)?;
        ensure!(
            out.status.success(),
            "cnitool {command} failed ({}): {}{}\nagent log: {}",
            out.status,
            stderr(&out),
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(&self.agent_log).unwrap_or_default()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// libcni's result cache entries of one network (it caches every ADD there).
fn cached_results(network: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/var/lib/cni/results")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{network}-")))
        })
        .collect()
}

/// Removes the network's libcni cache entries, also when the test fails.
struct CacheGuard(String);

impl Drop for CacheGuard {
    fn drop(&mut self) {
        for p in cached_results(&self.0) {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn netns_path(ns: &Netns) -> String {
    format!("/var/run/netns/{}", ns.name)
}

fn global_addresses(ns: &Netns) -> Result<String> {
    ns.ip(&["-4", "addr", "show", "dev", "eth0", "scope", "global"])
}

#[test]
fn cnitool_drives_the_plugin_through_libcni_add_check_del_gc_status() -> Result<()> {
    require_tool("ping", "iputils-ping");
    let cnitool = tool("CNITOOL")?;
    let mut node = Node::start("cninode")?;
    let dir = TempDir::new("k8s-libcni")?;
    // libcni finds plugins by `type` in CNI_PATH: ours first, the reference
    // plugins after it.
    let plugins = dir.join("bin");
    std::fs::create_dir_all(&plugins)?;
    std::os::unix::fs::symlink(bin("starling"), plugins.join("starling"))?;
    let netconf_dir = dir.join("net.d");
    std::fs::create_dir_all(&netconf_dir)?;
    // A network name of our own: cnitool's GC deletes every cached attachment
    // of the network it is given.
    let network = format!("starling-cnitool-{}", std::process::id());
    let _cache = CacheGuard(network.clone());
    std::fs::write(
        netconf_dir.join("10-starling.conflist"),
        serde_json::to_string_pretty(&json!({
            "cniVersion": "1.1.0",
            "name": network,
            "plugins": [{"type": "starling", "socketPath": node.socket}],
        }))?,
    )?;
    let cni = Libcni {
        node_ns: node.ns.name.clone(),
        agent_log: node.dir.join("agent.log"),
        cnitool,
        cni_path: format!("{}:/usr/lib/cni", plugins.display()),
        netconf_dir,
        network: network.clone(),
    };

    // STATUS: the agent is up.
    let a = Netns::new("cnipa")?;
    cni.ok("status", &netns_path(&a))?;

    // ADD: libcni execs the plugin, prints the result, caches it.
    let result: Value = serde_json::from_str(&cni.ok("add", &netns_path(&a))?)
        .context("cnitool add prints the result")?;
    let ip = result["ips"][0]["address"]
        .as_str()
        .context("no ips in the result")?
        .split('/')
        .next()
        .context("address")?
        .to_string();
    ensure!(
        ip.starts_with("10.244.7."),
        "address from the pool: {result}"
    );
    ensure!(
        global_addresses(&a)?.contains(&ip),
        "the pod's eth0 holds {ip}"
    );
    ensure!(node.allocated()? == 1, "one allocation after ADD");
    ensure!(
        cached_results(&network).len() == 1,
        "libcni cached the ADD result"
    );
    let ping = a.exec_output("ping", &["-c1", "-W1", "192.0.2.1"])?;
    ensure!(
        ping.status.success(),
        "pod reaches its node: {}",
        stderr(&ping)
    );

    // CHECK: libcni hands the cached prevResult to the plugin.
    cni.ok("check", &netns_path(&a))?;

    // DEL: released, unwired, uncached.
    cni.ok("del", &netns_path(&a))?;
    ensure!(node.allocated()? == 0, "DEL released the address");
    ensure!(
        a.ip(&["link", "show", "eth0"]).is_err(),
        "DEL removed the pod's eth0"
    );
    ensure!(
        cached_results(&network).is_empty(),
        "libcni dropped the cache entry"
    );

    // GC: libcni DELs what it cached (b). cnitool then GCs the plugin
    // without a valid-attachments list (it passes no GC arguments), and a GC
    // without the list is refused, releasing nothing: c, whose cache entry is
    // gone, keeps its address until a runtime's GC lists the valid
    // attachments (the cni target covers that) or its DEL comes.
    let b = Netns::new("cnipb")?;
    let c = Netns::new("cnipc")?;
    cni.ok("add", &netns_path(&b))?;
    cni.ok("add", &netns_path(&c))?;
    ensure!(node.allocated()? == 2, "two allocations");
    let entries = cached_results(&network);
    ensure!(entries.len() == 2, "{entries:?}");
    let c_entry = entries
        .iter()
        .find(|p| std::fs::read_to_string(p).is_ok_and(|s| s.contains(&netns_path(&c))))
        .context("cache entry of pod c")?;
    std::fs::remove_file(c_entry)?;
    let gc = cni.run("gc", &netns_path(&b))?;
    ensure!(
        !gc.status.success() && stderr(&gc).contains("cni.dev/valid-attachments"),
        "a GC without the valid-attachments list must be refused by name: {} {}",
        gc.status,
        stderr(&gc)
    );
    ensure!(
        node.allocated()? == 1,
        "libcni's DEL released b, the refused GC released nothing"
    );
    ensure!(
        b.ip(&["link", "show", "eth0"]).is_err(),
        "libcni's DEL removed b's eth0"
    );
    ensure!(
        c.ip(&["link", "show", "eth0"]).is_ok(),
        "the refused GC left c wired"
    );
    cni.ok("del", &netns_path(&c))?;
    ensure!(node.allocated()? == 0, "DEL released c");
    let links = node.ns.ip(&["-o", "link", "show"])?;
    ensure!(
        links.lines().count() == 1,
        "only lo left in the node: {links}"
    );

    // STATUS reports the agent gone: libcni passes the plugin's error on.
    if let Some(mut agent) = node.agent.take() {
        agent.kill();
    }
    let down = cni.run("status", &netns_path(&a))?;
    ensure!(
        !down.status.success(),
        "STATUS must fail with the agent down: {}",
        String::from_utf8_lossy(&down.stdout)
    );
    Ok(())
}

#[test]
fn a_restarted_apiserver_serves_the_same_objects_at_the_same_url() -> Result<()> {
    // A control plane of its own: a restart would interrupt the other tests.
    let c = Cluster::private("restart")?;
    c.apply_manifests()?;
    let pool = "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: survivor}\nspec: {cidr: 10.244.0.0/16}\n";
    let args = ["create", "-f", "-"];
    checked(&args, c.kubectl_stdin(&args, pool))?;
    let before = c.kubectl_ok(&[
        "get",
        "ippool.starling.dev",
        "survivor",
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    let pid = |c: &Cluster| std::fs::read_to_string(c.dir.join("kube-apiserver.pid"));
    let old_pid = pid(&c)?;
    c.restart_apiserver()?;
    ensure!(pid(&c)? != old_pid, "a new kube-apiserver process");
    let after = c.kubectl_ok(&[
        "get",
        "ippool.starling.dev",
        "survivor",
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    ensure!(!before.is_empty() && before == after, "{before} vs {after}");
    Ok(())
}
