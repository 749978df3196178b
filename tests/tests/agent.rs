//! The node agent, driven the way an operator drives it: `starlingctl`
//! generating the CRDs and checking a file datastore.

use anyhow::{Context, Result, ensure};
use ipnet::IpNet;
use starling_agent::lab::Topology;
use starling_agent::node::routes::RefusedReason;
use starling_tests::cluster::{Cluster, options, session_types};
use starling_tests::{TempDir, bin, require_tool, run};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const REGENERATE: &str =
    "cargo run -p starling-agent --bin starlingctl -- manifests --out manifests";

/// manifests/ is exactly what `starlingctl manifests` generates: the CRDs
/// from the Rust types, the RBAC and DaemonSet from agent/src/manifests/.
#[test]
fn manifests_are_current() -> Result<()> {
    let dir = TempDir::new("manifests")?;
    let out = Command::new(bin("starlingctl"))
        .args(["manifests", "--out"])
        .arg(&dir.path)
        .output()
        .context("running starlingctl manifests")?;
    ensure!(
        out.status.success(),
        "starlingctl manifests failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    for file in ["crds.yaml", "rbac.yaml", "daemonset.yaml"] {
        let generated = std::fs::read_to_string(dir.join(file))?;
        let path = repo.join(file);
        let committed = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: missing; generate it with `{REGENERATE}`",
                path.display()
            )
        })?;
        ensure!(
            committed == generated,
            "manifests/{file} is stale (the model's Rust types or agent/src/manifests/ changed): \
             regenerate it with `{REGENERATE}`"
        );
    }
    let generated = std::fs::read_to_string(dir.join("crds.yaml"))?;
    for kind in [
        "IPPool",
        "BGPConfiguration",
        "BGPPeer",
        "StarlingNode",
        "BlockAffinity",
    ] {
        ensure!(
            generated.contains(&format!("kind: {kind}\n")),
            "no CRD for {kind}"
        );
    }
    ensure!(
        generated.contains("x-kubernetes-validations"),
        "CEL rules missing"
    );
    // The image comes from the command line, into both containers.
    let ds = Command::new(bin("starlingctl"))
        .args(["manifests", "--image", "registry.example/starling:9.9.9"])
        .output()?;
    ensure!(ds.status.success(), "starlingctl manifests --image failed");
    let stream = String::from_utf8(ds.stdout)?;
    ensure!(
        stream
            .matches("image: registry.example/starling:9.9.9\n")
            .count()
            == 2,
        "the image reference is not in both containers:\n{stream}"
    );
    let bad = Command::new(bin("starlingctl"))
        .args(["manifests", "--image", "bad image"])
        .output()?;
    ensure!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("image `bad image`"),
        "a bad image reference must be refused by name"
    );
    Ok(())
}

fn validate(dir: &TempDir, text: &str) -> Result<(bool, String, String)> {
    let file = dir.join("model.yaml");
    std::fs::write(&file, text)?;
    let out = Command::new(bin("starlingctl"))
        .arg("validate")
        .arg(&file)
        .output()
        .context("running starlingctl validate")?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

/// A Calico YAML stream loads as it is; a bad one is refused with every
/// problem located by file, line and field.
#[test]
fn file_loader_names_file_line_and_field() -> Result<()> {
    let dir = TempDir::new("model")?;
    let good = "\
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  name: default
spec:
  logSeverityScreen: Info
  nodeToNodeMeshEnabled: false
  asNumber: 63400
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: default-ipv4-ippool
spec:
  cidr: 10.244.0.0/16
  blockSize: 26
  ipipMode: CrossSubnet
  natOutgoing: true
  nodeSelector: all()
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: rack1-tor
spec:
  peerIP: 192.0.2.1
  asNumber: 64567
  nodeSelector: rack == 'rack-1'
---
apiVersion: starling.dev/v1
kind: StarlingNode
metadata:
  name: node-a
  labels:
    rack: rack-1
spec:
  ipv4Address: 192.0.2.10/24
  routeReflectorClusterID: 224.0.0.1
";
    let (ok, stdout, stderr) = validate(&dir, good)?;
    ensure!(ok, "a good file was refused: {stderr}");
    ensure!(
        stdout.contains("1 IPPool, 1 BGPConfiguration, 1 BGPPeer, 1 StarlingNode"),
        "{stdout}"
    );

    let bad = good
        .replace("  blockSize: 26", "  blockSize: 33")
        .replace("  asNumber: 64567\n", "  asNumber: 64567\n  node: node-a\n")
        .replace("ipv4Address: 192.0.2.10/24", "ipv4Address: 192.0.2.10");
    let (ok, _, stderr) = validate(&dir, &bad)?;
    ensure!(!ok, "a bad file was accepted");
    let file = dir.join("model.yaml");
    let line_of = |needle: &str| bad.lines().position(|l| l.contains(needle)).map(|i| i + 1);
    for (needle, field, words) in [
        (
            "blockSize: 33",
            "spec.blockSize",
            "blockSize 33 must be 20-32",
        ),
        (
            "nodeSelector: rack",
            "spec.nodeSelector",
            "at most one of node and nodeSelector",
        ),
        (
            "ipv4Address: 192.0.2.10",
            "spec.ipv4Address",
            "invalid IP address syntax",
        ),
    ] {
        let line = line_of(needle).context(needle)?;
        let prefix = format!("{}:{line}:", file.display());
        ensure!(
            stderr
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains(field) && l.contains(words)),
            "expected a problem at {prefix} naming {field} ({words}); got:\n{stderr}"
        );
    }
    ensure!(stderr.contains("3 problem(s)"), "{stderr}");

    let syntax = format!("{good}---\nkind: IPPool\nspec: [unclosed\n");
    let (ok, _, stderr) = validate(&dir, &syntax)?;
    ensure!(!ok && stderr.contains("document 5"), "{stderr}");
    Ok(())
}

/// Calico YAML as users have it, through the real binaries into a running
/// agent: `starlingctl validate` prints the warnings and exits 0,
/// `starlingctl import-calico` writes Starling's kinds, and the agents of a
/// two-node lab load both (the export's route reflector takes effect; the
/// agent logs the warnings when it loads the Calico file).
#[test]
fn calico_export_validates_imports_and_loads() -> Result<()> {
    let c = Cluster::up(options("cal", 2, Topology::Mesh))?;
    c.converged(CONVERGE)?;
    let (n1, n2) = (c.lab.node("node1")?, c.lab.node("node2")?);
    let dir = TempDir::new("calico")?;
    let calico = dir.join("calico.yaml");
    // calicoctl's BGPConfiguration, BGPPeer, BGPFilter and Nodes; kubectl's
    // IPPool CRD with its metadata noise.
    let text = format!(
        r#"apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  creationTimestamp: "2025-03-01T09:12:44Z"
  name: default
  resourceVersion: "1044"
  uid: 3f0c2b7e-1d2a-4b5c-9e8f-0a1b2c3d4e5f
spec:
  asNumber: {asn}
  nodeToNodeMeshEnabled: false
  nodeMeshMaxRestartTime: 2m0s
  ignoredInterfaces: [eth9]
---
apiVersion: v1
kind: List
items:
- apiVersion: crd.projectcalico.org/v1
  kind: IPPool
  metadata:
    annotations:
      projectcalico.org/metadata: '{{"uid":"0b5d1f0e","creationTimestamp":"2025-03-01T09:12:44Z"}}'
    generation: 1
    managedFields:
    - apiVersion: crd.projectcalico.org/v1
      fieldsType: FieldsV1
      fieldsV1:
        f:spec:
          f:cidr: {{}}
      manager: calico-node
      operation: Update
    name: default-ipv4-ippool
    resourceVersion: "812"
    uid: 0b5d1f0e-8a44-4a07-9d0a-3f6c2a9b7e11
  spec:
    allowedUses: [Workload, Tunnel]
    blockSize: 26
    cidr: {pool}
    ipipMode: Never
    natOutgoing: false
    nodeSelector: all()
    vxlanMode: Never
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: reflectors
spec:
  nodeSelector: all()
  peerSelector: has(nothing)
  filters: [no-default]
---
apiVersion: projectcalico.org/v3
kind: BGPFilter
metadata:
  name: no-default
spec:
  exportV4:
  - action: Reject
    cidr: 0.0.0.0/0
    matchOperator: Equal
---
apiVersion: projectcalico.org/v3
kind: NodeList
items:
- apiVersion: projectcalico.org/v3
  kind: Node
  metadata:
    name: node1
  spec:
    bgp:
      ipv4Address: {a1}
      routeReflectorClusterID: 224.0.0.1
    orchRefs:
    - nodeName: node1
      orchestrator: k8s
- apiVersion: projectcalico.org/v3
  kind: Node
  metadata:
    name: node2
  spec:
    bgp:
      ipv4Address: {a2}
"#,
        asn = starling_agent::lab::NODE_AS,
        pool = starling_agent::lab::POOL_V4,
        a1 = n1.ipv4,
        a2 = n2.ipv4,
    );
    std::fs::write(&calico, &text)?;

    let ctl = |args: &[&str]| -> Result<(bool, String, String)> {
        let out = Command::new(bin("starlingctl"))
            .args(args)
            .output()
            .context("running starlingctl")?;
        Ok((
            out.status.success(),
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    };
    let path = calico.to_str().context("path")?;
    let (ok, stdout, stderr) = ctl(&["validate", path])?;
    ensure!(ok, "validate refused the export:\n{stderr}");
    ensure!(
        stdout.contains("1 IPPool, 1 BGPConfiguration, 1 BGPPeer, 2 StarlingNode")
            && stdout.contains("1 BGPFilter"),
        "{stdout}"
    );
    // The file datastore applies BGPFilters: no word about them.
    ensure!(
        !stderr.contains("spec.filters") && !stderr.contains("spec.exportV4"),
        "{stderr}"
    );
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).map(|i| i + 1);
    for (needle, object, field) in [
        (
            "ignoredInterfaces",
            "BGPConfiguration/default",
            "spec.ignoredInterfaces",
        ),
        ("orchRefs", "Node/node1", "spec.orchRefs"),
    ] {
        let want = format!("warning: {path}:{}: ", line_of(needle).context(needle)?);
        ensure!(
            stderr
                .lines()
                .any(|l| l.starts_with(&want) && l.contains(object) && l.contains(field)),
            "no warning at {want} for {object} {field}:\n{stderr}"
        );
    }

    let imported = dir.join("imported.yaml");
    let (ok, _, stderr) = ctl(&[
        "import-calico",
        path,
        "-o",
        imported.to_str().context("path")?,
    ])?;
    ensure!(ok, "import-calico failed:\n{stderr}");
    // BGPFilters carry over (the Kubernetes datastore reads them): no
    // warning about them or the peer's `filters`.
    ensure!(
        stderr.contains("spec.ignoredInterfaces"),
        "no warning for spec.ignoredInterfaces:\n{stderr}"
    );
    for field in ["spec.filters", "spec.exportV4"] {
        ensure!(!stderr.contains(field), "a warning for {field}:\n{stderr}");
    }
    let out = std::fs::read_to_string(&imported)?;
    for gone in [
        "uid",
        "managedFields",
        "projectcalico.org",
        "ignoredInterfaces",
    ] {
        ensure!(!out.contains(gone), "{gone} carried over:\n{out}");
    }
    ensure!(
        out.contains("kind: BGPFilter"),
        "the BGPFilter not carried over:\n{out}"
    );
    ensure!(
        out.contains("no-default"),
        "filters not carried over:\n{out}"
    );
    let (ok, stdout, stderr) = ctl(&["validate", imported.to_str().context("path")?])?;
    ensure!(ok && !stderr.contains("warning"), "{stdout}{stderr}");

    // The imported file as the lab's model: the export's reflector (node1)
    // and client (node2) replace the mesh.
    let model = c.dir().join("model.yaml");
    let replace = |from: &Path| -> Result<()> {
        let tmp = model.with_extension("import");
        std::fs::copy(from, &tmp)?;
        std::fs::rename(&tmp, &model)?;
        Ok(())
    };
    replace(&imported)?;
    let reflector = |c: &Cluster| -> Result<bool> {
        let t1 = session_types(c, "node1")?;
        let t2 = session_types(c, "node2")?;
        Ok(t1.iter().any(|(_, k)| k == "route reflector client")
            && t2.iter().any(|(_, k)| k == "route reflector")
            && c.established("node1")?.len() == 1
            && c.established("node2")?.len() == 1)
    };
    starling_tests::wait_for("node1 reflects for node2", CONVERGE, || reflector(&c))?;

    // The Calico file itself as the model: same sessions, and the agent
    // logs what it does not act on.
    replace(&calico)?;
    let log = n1.dir.join("agent.log");
    starling_tests::wait_for("the agent logs the Calico warnings", CONVERGE, || {
        let l = std::fs::read_to_string(&log)?;
        Ok(l.contains("BGPConfiguration/default") && l.contains("spec.ignoredInterfaces"))
    })?;
    ensure!(
        reflector(&c)?,
        "sessions changed: {:?}",
        session_types(&c, "node1")?
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Multi-node clusters: real agents in network namespaces, the file datastore,
// pods wired by the real CNI plugin.

const CONVERGE: Duration = Duration::from_secs(60);

/// Three nodes in a full mesh: every pair has one session, every node routes
/// to the others' blocks through their addresses (host-gw), and every pod
/// reaches every other pod. `starlingctl status -o json` lists the sessions.
#[test]
fn three_node_mesh() -> Result<()> {
    let c = Cluster::up(options("mesh", 3, Topology::Mesh))?;
    c.converged(CONVERGE)?;
    for n in ["node1", "node2", "node3"] {
        let types = session_types(&c, n)?;
        ensure!(types.len() == 2, "{n}: sessions {types:?}");
        ensure!(
            types.iter().all(|(_, k)| k == "node-to-node mesh"),
            "{n}: {types:?}"
        );
    }
    // Each node's kernel has the others' blocks via their node address.
    for (n, st) in ["node1", "node2", "node3"]
        .iter()
        .map(|n| (*n, c.status(n)))
    {
        let st = st?;
        ensure!(st.blocks.len() == 1, "{n} holds {:?}", st.blocks);
        for other in ["node1", "node2", "node3"].iter().filter(|o| **o != n) {
            let addr = c.lab.node(other)?.ipv4.addr();
            let block = c.status(other)?.blocks[0];
            let routes = c.kernel_routes(n)?;
            ensure!(
                routes.contains(&format!("{block} via {addr} dev eth0")),
                "{n}: no host-gw route to {block} via {addr}:\n{routes}"
            );
        }
        ensure!(
            c.kernel_routes(n)?
                .contains(&format!("blackhole {}", st.blocks[0])),
            "{n}: no blackhole for its own block"
        );
    }
    let pairs = c.all_pairs_answer()?;
    ensure!(pairs == 6, "expected 6 pod pairs, pinged {pairs}");

    let out = Command::new(bin("starlingctl"))
        .args(["status", "-o", "json", "--socket"])
        .arg(c.lab.node("node1")?.dir.join("agent.sock"))
        .output()?;
    ensure!(
        out.status.success(),
        "starlingctl status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let sessions = v["sessions"].as_array().context("no sessions array")?;
    ensure!(sessions.len() == 2, "{v}");
    ensure!(sessions.iter().all(|s| s["state"] == "Established"), "{v}");
    // The table form, as calicoctl node status prints it.
    let out = Command::new(bin("starlingctl"))
        .args(["status", "--socket"])
        .arg(c.lab.node("node1")?.dir.join("agent.sock"))
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    for col in [
        "PEER ADDRESS",
        "PEER TYPE",
        "STATE",
        "SINCE",
        "INFO",
        "node-to-node mesh",
    ] {
        ensure!(table.contains(col), "no {col} in\n{table}");
    }

    // The DaemonSet's probes and Prometheus, over plain HTTP in the node.
    let ns = c.lab.node("node1")?.netns.clone();
    let get = |port: u16, path: &str| {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
        );
        run("ip", &["netns", "exec", &ns, "bash", "-c", &script])
    };
    // Readiness follows the session table the agent samples every 2 s.
    starling_tests::wait_for("readyz answers 200", CONVERGE, || {
        Ok(get(9099, "/readyz")?.contains(" 200 "))
    })?;
    starling_tests::wait_for("metrics show 2 Established sessions", CONVERGE, || {
        Ok(get(9091, "/metrics")?.contains("starling_bgp_sessions{state=\"Established\"} 2"))
    })?;
    let metrics = get(9091, "/metrics")?;
    for series in [
        "starling_ipam_blocks 1",
        "starling_cni_request_duration_seconds_count{cmd=\"add\"} 1",
        "starling_fib_operations_total",
    ] {
        ensure!(metrics.contains(series), "no {series} in\n{metrics}");
    }
    Ok(())
}

/// Two reflectors and four clients: clients peer only with the reflectors,
/// reflectors with each other and every client, and all pods connect.
#[test]
fn two_reflectors_four_clients() -> Result<()> {
    let c = Cluster::up(options("rr", 6, Topology::Reflectors))?;
    c.converged(CONVERGE)?;
    let rr: Vec<String> = ["node1", "node2"]
        .iter()
        .map(|n| Ok(c.lab.node(n)?.ipv4.addr().to_string()))
        .collect::<Result<_>>()?;
    for n in ["node3", "node4", "node5", "node6"] {
        let types = session_types(&c, n)?;
        let mut peers: Vec<&str> = types.iter().map(|(p, _)| p.as_str()).collect();
        peers.sort();
        ensure!(
            peers == rr,
            "{n}: a client must peer with the reflectors only: {types:?}"
        );
        ensure!(
            types.iter().all(|(_, k)| k == "route reflector"),
            "{n}: {types:?}"
        );
    }
    for n in ["node1", "node2"] {
        let types = session_types(&c, n)?;
        ensure!(types.len() == 5, "{n}: {types:?}");
        let clients = types
            .iter()
            .filter(|(_, k)| k == "route reflector client")
            .count();
        ensure!(clients == 4, "{n}: {types:?}");
        ensure!(c.status(n)?.cluster_id.is_some(), "{n} has no cluster ID");
    }
    c.all_pairs_answer()?;
    Ok(())
}

/// A BIRD top-of-rack router with TCP-MD5 learns every node's block with the
/// node as next hop (eBGP, RFC 8212 default policy exports only own blocks).
#[test]
fn bird_top_of_rack_with_md5() -> Result<()> {
    require_tool("bird", "bird2");
    let mut o = options("tor", 3, Topology::Mesh);
    o.tor = Some(starling_agent::lab::Tor::Bird);
    o.tor_password = Some("s3cret-tor".into());
    let c = Cluster::up(o)?;
    c.converged(CONVERGE)?;
    let sock = c.dir().join("tor.ctl");
    let sock = sock.to_str().context("socket path")?;
    for n in ["node1", "node2", "node3"] {
        let addr = c.lab.node(n)?.ipv4.addr();
        let block = c.status(n)?.blocks[0];
        wait_for_tor_route(sock, &block.to_string(), &addr.to_string())?;
        let types = session_types(&c, n)?;
        ensure!(
            types
                .iter()
                .any(|(p, k)| p == "192.0.2.254" && k == "global"),
            "{n}: {types:?}"
        );
    }
    // The signature is really on the wire: BIRD reports the password in use.
    let proto = run("birdc", &["-s", sock, "show", "protocols", "all", "node1"])?;
    ensure!(proto.contains("Established"), "{proto}");
    Ok(())
}

fn wait_for_tor_route(sock: &str, prefix: &str, via: &str) -> Result<()> {
    starling_tests::wait_for(&format!("BIRD route {prefix} via {via}"), CONVERGE, || {
        let out = run(
            "birdc",
            &["-s", sock, "show", "route", "for", prefix, "all"],
        )?;
        Ok(out.contains(&format!("via {via}")) && out.contains(prefix))
    })?;
    Ok(())
}

/// A node that joins gets sessions and routes everywhere without restarting
/// anything; a node that leaves takes its routes with it.
#[test]
fn node_joins_and_leaves() -> Result<()> {
    let mut c = Cluster::up(options("join", 3, Topology::Mesh))?;
    c.converged(CONVERGE)?;
    let pids: Vec<Option<u32>> = c.lab.nodes.iter().map(|n| n.pid).collect();
    let name = c.lab.add_node(4)?;
    let pod = c.lab.add_pod(&name, "pod1")?;
    c.converged(CONVERGE)?;
    let block = c.status(&name)?.blocks[0];
    for n in ["node1", "node2", "node3"] {
        ensure!(
            c.kernel_routes(n)?
                .contains(&format!("{block} via 192.0.2.14")),
            "{n}: no route to the new node's block {block}"
        );
    }
    ensure!(!pod.ips.is_empty());
    c.all_pairs_answer()?;
    let now: Vec<Option<u32>> = c.lab.nodes.iter().take(3).map(|n| n.pid).collect();
    ensure!(pids == now, "agents were restarted: {pids:?} -> {now:?}");

    c.lab.remove_node(&name)?;
    c.wait_all(
        "the departed node's block gone from every kernel",
        CONVERGE,
        |n| Ok(!c.kernel_routes(n)?.contains(&block.to_string())),
    )?;
    c.wait_all("sessions to the departed node gone", CONVERGE, |n| {
        Ok(!c
            .status(n)?
            .sessions
            .iter()
            .any(|s| s.peer.to_string() == "192.0.2.14"))
    })?;
    c.all_pairs_answer()?;
    Ok(())
}

/// A client becomes a third reflector, live: its sessions change type
/// without its agent restarting, and every pod still reaches every other.
#[test]
fn role_change_client_to_reflector() -> Result<()> {
    let mut c = Cluster::up(options("role", 4, Topology::Reflectors))?;
    c.converged(CONVERGE)?;
    let pid = c.lab.node("node3")?.pid;
    c.lab.set_reflector("node3", true)?;
    c.wait_all("node3 is a reflector to node4", CONVERGE, |n| {
        if n != "node3" {
            return Ok(true);
        }
        let types = session_types(&c, n)?;
        Ok(types
            .iter()
            .any(|(p, k)| p == "192.0.2.14" && k == "route reflector client")
            && c.status(n)?.cluster_id.is_some())
    })?;
    c.converged(CONVERGE)?;
    ensure!(c.lab.node("node3")?.pid == pid, "node3's agent restarted");
    c.all_pairs_answer()?;
    Ok(())
}

/// Switching a mesh to reflectors is make-before-break: a ping between two
/// clients at 50 packets/s loses nothing.
#[test]
fn mesh_to_reflectors_loses_nothing() -> Result<()> {
    let count = starling_tests::cluster::mesh_to_reflectors("m2r")?;
    ensure!(
        count.lost() == 0,
        "lost {} of {} pings",
        count.lost(),
        count.sent
    );
    Ok(())
}

/// A BIRD top-of-rack router (eBGP, a router outside the cluster) announces
/// prefixes that would hijack a node: a prefix covering its address, a
/// link-local one, and a prefix inside the node's own block. (BIRD does not
/// announce loopback ranges at all; the unit tests of `node::routes` cover
/// them.) Each node refuses them by reason, keeps them out of the kernel,
/// shows them in `starlingctl routes`, and still installs an honest route.
#[test]
fn external_peer_cannot_hijack_a_node() -> Result<()> {
    require_tool("bird", "bird2");
    let mut o = options("hijack", 2, Topology::Mesh);
    o.tor = Some(starling_agent::lab::Tor::Bird);
    o.tor_announce = [
        "203.0.113.0/24",     // honest
        "192.0.2.0/25",       // covers both nodes' addresses
        "169.254.169.254/32", // link-local (the metadata address)
        "10.244.0.0/28",      // inside the pool's first block
        "10.244.0.64/28",     // inside the second
    ]
    .iter()
    .map(|p| p.parse())
    .collect::<Result<_, _>>()?;
    let c = Cluster::up(o)?;
    c.converged(CONVERGE)?;
    for n in ["node1", "node2"] {
        let block = c.status(n)?.blocks[0];
        let mut want: Vec<(String, RefusedReason)> = vec![
            ("192.0.2.0/25".into(), RefusedReason::NodeAddress),
            ("169.254.169.254/32".into(), RefusedReason::LinkLocal),
        ];
        for inner in ["10.244.0.0/28", "10.244.0.64/28"] {
            if block.contains(&inner.parse::<IpNet>()?) {
                want.push((inner.into(), RefusedReason::OwnBlock));
            }
        }
        want.sort();
        let mut got = Vec::new();
        starling_tests::wait_for(
            &format!("{n} to refuse the hijacking prefixes"),
            CONVERGE,
            || {
                let r = c.lab.routes_of(n)?;
                got = r
                    .refused
                    .iter()
                    .map(|x| (x.prefix.to_string(), x.reason))
                    .collect();
                got.sort();
                Ok(got == want && r.fib.iter().any(|x| x.dst.to_string() == "203.0.113.0/24"))
            },
        )
        .with_context(|| format!("{n}: refused {got:?}, wanted {want:?}"))?;
        // Nothing refused reached the kernel; the honest route did.
        let ns = &c.lab.node(n)?.netns;
        let kernel = run("ip", &["-n", ns, "route", "show", "proto", "73"])?;
        for (p, _) in &want {
            ensure!(
                !kernel.lines().any(|l| l.starts_with(&format!("{p} "))
                    || (p.ends_with("/32")
                        && l.starts_with(&format!("{} ", p.trim_end_matches("/32"))))),
                "{n}: refused {p} is in the kernel:\n{kernel}"
            );
        }
        ensure!(
            kernel.contains("203.0.113.0/24 via 192.0.2.254"),
            "{n}: honest route missing:\n{kernel}"
        );
        // And `starlingctl routes` shows them with their reason.
        let ctl = run(
            bin("starlingctl").to_str().context("path")?,
            &[
                "routes",
                "--socket",
                c.lab
                    .node(n)?
                    .dir
                    .join("agent.sock")
                    .to_str()
                    .context("path")?,
            ],
        )?;
        ensure!(
            ctl.contains("Refused")
                && ctl.contains("169.254.169.254/32")
                && ctl.contains("link local"),
            "{n}: starlingctl routes:\n{ctl}"
        );
        // And the metric counts them by reason (the agent samples every 2 s).
        let count = |r: RefusedReason| want.iter().filter(|(_, x)| *x == r).count();
        let series: Vec<String> = [
            RefusedReason::NodeAddress,
            RefusedReason::OwnBlock,
            RefusedReason::LinkLocal,
            RefusedReason::Loopback,
        ]
        .into_iter()
        .map(|r| {
            format!(
                "starling_bgp_routes_refused{{reason=\"{}\"}} {}\n",
                r.label(),
                count(r)
            )
        })
        .collect();
        let mut metrics = String::new();
        starling_tests::wait_for(
            &format!("{n}'s metrics to count the refused prefixes by reason"),
            CONVERGE,
            || {
                metrics = run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        ns,
                        "curl",
                        "-s",
                        "-m",
                        "2",
                        "http://127.0.0.1:9091/metrics",
                    ],
                )?;
                Ok(series.iter().all(|s| metrics.contains(s.as_str())))
            },
        )
        .with_context(|| format!("{n}: wanted {series:?} in\n{metrics}"))?;
    }
    Ok(())
}

/// Calico's BGPFilter on the top-of-rack peer (eBGP, BIRD), applied live
/// and taken away live: import rejects an exact prefix (Equal) and the
/// longer prefixes of a range (In with prefixLength), keeping the rest;
/// export rejects every block outside node1's (NotIn), so only node1's
/// block reaches the router. What BIRD shows and what the nodes' kernels
/// hold are the evidence.
#[test]
fn bgp_filters_on_a_bird_peer() -> Result<()> {
    require_tool("bird", "bird2");
    let mut o = options("bgpfilter", 2, Topology::Mesh);
    o.tor = Some(starling_agent::lab::Tor::Bird);
    o.tor_announce = ["203.0.113.0/24", "198.51.100.0/24", "198.51.100.128/25"]
        .iter()
        .map(|p| p.parse())
        .collect::<Result<_, _>>()?;
    let mut c = Cluster::up(o)?;
    c.converged(CONVERGE)?;
    let blocks = [c.status("node1")?.blocks[0], c.status("node2")?.blocks[0]];
    let learned = |c: &Cluster, n: &str, p: &str| -> Result<bool> {
        Ok(c.kernel_routes(n)?
            .lines()
            .any(|l| l.starts_with(&format!("{p} via 192.0.2.254"))))
    };
    let at_tor = |c: &Cluster, b: &IpNet| -> Result<bool> {
        let routes = c.lab.tor_routes()?;
        Ok(routes.lines().any(|l| l.starts_with(&b.to_string())))
    };
    // Without filters: everything both ways.
    c.wait_all("every announced prefix learned", CONVERGE, |n| {
        Ok(learned(&c, n, "203.0.113.0/24")?
            && learned(&c, n, "198.51.100.0/24")?
            && learned(&c, n, "198.51.100.128/25")?)
    })?;
    starling_tests::wait_for("both blocks at the router", CONVERGE, || {
        Ok(at_tor(&c, &blocks[0])? && at_tor(&c, &blocks[1])?)
    })?;

    let filters = format!(
        "apiVersion: projectcalico.org/v3
kind: BGPFilter
metadata: {{name: tor-import}}
spec:
  importV4:
  - {{action: Reject, matchOperator: In, cidr: 198.51.100.0/24, prefixLength: {{min: 25}}}}
  - {{action: Reject, matchOperator: Equal, cidr: 203.0.113.0/24}}
---
apiVersion: projectcalico.org/v3
kind: BGPFilter
metadata: {{name: tor-export}}
spec:
  exportV4:
  - {{action: Reject, matchOperator: NotIn, cidr: {}}}
",
        blocks[0]
    );
    c.lab
        .set_tor_filters(&["tor-import", "tor-export"], &filters)?;
    c.wait_all("the import filter applied", CONVERGE, |n| {
        Ok(!learned(&c, n, "203.0.113.0/24")?
            && !learned(&c, n, "198.51.100.128/25")?
            && learned(&c, n, "198.51.100.0/24")?)
    })?;
    starling_tests::wait_for(
        "the export filter applied: node2's block withdrawn from the router",
        CONVERGE,
        || Ok(at_tor(&c, &blocks[0])? && !at_tor(&c, &blocks[1])?),
    )
    .with_context(|| format!("router:\n{}", c.lab.tor_routes().unwrap_or_default()))?;
    // The sessions stayed up: a policy change is no reset.
    let proto = run(
        "birdc",
        &[
            "-s",
            c.dir().join("tor.ctl").to_str().context("path")?,
            "show",
            "protocols",
        ],
    )?;
    ensure!(
        proto.lines().filter(|l| l.contains("Established")).count() == 2,
        "{proto}"
    );

    // Filters taken away: everything is back, both ways.
    c.lab.set_tor_filters(&[], "")?;
    c.wait_all("every announced prefix learned again", CONVERGE, |n| {
        Ok(learned(&c, n, "203.0.113.0/24")? && learned(&c, n, "198.51.100.128/25")?)
    })?;
    starling_tests::wait_for("both blocks at the router again", CONVERGE, || {
        Ok(at_tor(&c, &blocks[0])? && at_tor(&c, &blocks[1])?)
    })?;
    Ok(())
}

/// BGP policy from the model against BIRD: BGPConfiguration `communities`
/// and `prefixAdvertisements` (standard and large) on the routes BIRD
/// receives; BGPPeer `nextHopMode: Keep` (BIRD sees node2's block via
/// node2 from node1 too), `numAllowedLocalASNumbers` (routes whose AS path
/// holds the nodes' AS are accepted, and withdrawn again without it),
/// `maxRestartTime` (the restart time BIRD sees in our OPEN); eBGP TTL 255
/// (BIRD's sessions use GTSM and come up only so); `bindMode: NodeIP` (the
/// restarted agent listens on the node's address only).
#[test]
fn bgp_policy_knobs_on_a_bird_peer() -> Result<()> {
    require_tool("bird", "bird2");
    require_tool("ss", "iproute2");
    let mut o = options("knobs", 2, Topology::Mesh);
    o.tor = Some(starling_agent::lab::Tor::Bird);
    o.tor_announce = vec!["203.0.113.0/24".parse()?];
    o.tor_prepend_node_as = true;
    o.tor_gtsm = true;
    let mut c = Cluster::up(o)?;
    // GTSM on BIRD's side: the sessions come up only with TTL 255 from us.
    c.converged(CONVERGE)?;
    let sock = c.dir().join("tor.ctl");
    let sock = sock.to_str().context("path")?.to_string();
    let birdc = |args: &[&str]| -> Result<String> {
        let mut a = vec!["-s", sock.as_str()];
        a.extend_from_slice(args);
        run("birdc", &a)
    };
    let addrs: Vec<String> = c
        .lab
        .nodes
        .iter()
        .map(|n| n.ipv4.addr().to_string())
        .collect();
    let addr = |i: usize| addrs[i].clone();
    let blocks = [c.status("node1")?.blocks[0], c.status("node2")?.blocks[0]];
    let paths = |b: &IpNet| birdc(&["show", "route", &b.to_string(), "all"]);
    // An export filter that passes the pool's routes on: node1 sends
    // node2's block too (the default sends only a node's own blocks).
    c.lab.set_tor_filters(
        &["pool-out"],
        &format!(
            "apiVersion: projectcalico.org/v3\nkind: BGPFilter\nmetadata: {{name: pool-out}}\nspec:\n  exportV4:\n  - {{action: Accept, matchOperator: In, cidr: {}}}\n",
            starling_agent::lab::POOL_V4
        ),
    )?;
    // Before: node1 passes node2's block on with itself as the next hop,
    // and the router's routes (our AS in their path) are refused.
    starling_tests::wait_for("node2's block at the router via node1", CONVERGE, || {
        Ok(paths(&blocks[1])?.contains(&format!("via {}", addr(0))))
    })?;
    let learned = |c: &Cluster, n: &str| -> Result<bool> {
        Ok(c.kernel_routes(n)?
            .lines()
            .any(|l| l.starts_with("203.0.113.0/24 via 192.0.2.254")))
    };
    ensure!(!learned(&c, "node1")?, "{}", c.kernel_routes("node1")?);
    let caps = birdc(&["show", "protocols", "all", "node1"])?;
    ensure!(caps.contains("Restart time: 120"), "{caps}");

    c.lab.set_bgp_knobs(
        &format!(
            "  communities: [{{name: pods, value: '64512:100'}}]\n  prefixAdvertisements:\n  - {{cidr: {}, communities: [pods, '64512:1:2']}}\n  bindMode: NodeIP\n",
            starling_agent::lab::POOL_V4
        ),
        ", nextHopMode: Keep, numAllowedLocalASNumbers: 1, maxRestartTime: 45s",
    )?;
    starling_tests::wait_for("communities on both blocks at the router", CONVERGE, || {
        for b in &blocks {
            let p = paths(b)?;
            if !(p.contains("BGP.community: (64512,100)")
                && p.contains("BGP.large_community: (64512, 1, 2)"))
            {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .with_context(|| paths(&blocks[0]).unwrap_or_default())?;
    starling_tests::wait_for(
        "next hop kept: node2's block only via node2",
        CONVERGE,
        || {
            let p = paths(&blocks[1])?;
            Ok(p.contains(&format!("via {}", addr(1))) && !p.contains(&format!("via {}", addr(0))))
        },
    )
    .with_context(|| paths(&blocks[1]).unwrap_or_default())?;
    c.wait_all(
        "the router's routes accepted (allowas-in 1)",
        CONVERGE,
        |n| learned(&c, n),
    )?;
    starling_tests::wait_for("restart time 45 in our OPEN", CONVERGE, || {
        Ok(birdc(&["show", "protocols", "all", "node1"])?.contains("Restart time: 45"))
    })?;

    // bindMode takes effect when the agent starts.
    c.lab.kill_agent("node1")?;
    c.lab.start_agent("node1")?;
    let ns = c.lab.nodes[0].netns.clone();
    let listening = || {
        run(
            "ip",
            &["netns", "exec", &ns, "ss", "-Hltn", "sport", "= :179"],
        )
    };
    starling_tests::wait_for("node1 listens on its address only", CONVERGE, || {
        let l = listening()?;
        Ok(l.contains(&format!("{}:179", addr(0)))
            && !l.contains("0.0.0.0:179")
            && !l.contains("*:179")
            && !l.contains("[::]:179"))
    })
    .with_context(|| listening().unwrap_or_default())?;
    c.converged(CONVERGE)?;

    // Without numAllowedLocalASNumbers the router's routes go again.
    c.lab.set_bgp_knobs("", "")?;
    c.lab.set_tor_filters(&[], "")?;
    c.wait_all("the router's routes refused again", CONVERGE, |n| {
        Ok(!learned(&c, n)?)
    })?;
    Ok(())
}
