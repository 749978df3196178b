//! IPAM steered through the API server: pools per namespace and per pod
//! (Starling's and Calico's annotations), static addresses refused with
//! their CNI error codes when taken, outside every pool or reserved, and
//! IPReservations honoured. One agent (the lab's, Kubernetes datastore,
//! the DaemonSet's ServiceAccount) and the real `starling` plugin exec'd
//! in its node namespace with the runtime's CNI_ARGS.

use super::cluster::{Cluster, checked};
use anyhow::{Context, Result, ensure};
use serde_json::Value;
use starling_tests::Netns;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

const MODEL: &str = "\
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: main}
spec: {cidr: 10.244.0.0/16, blockSize: 26}
---
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: gold}
spec: {cidr: 10.250.0.0/24, blockSize: 28, nodeSelector: \"tier == 'gold'\"}
---
apiVersion: starling.dev/v1
kind: IPReservation
metadata: {name: first-eight}
spec: {reservedCIDRs: [10.244.0.0/29, 10.244.0.40]}
---
apiVersion: starling.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {asNumber: 64512}
---
apiVersion: v1
kind: Node
metadata:
  name: node1
  annotations: {starling.dev/ipv4-address: 192.0.2.11/24}
---
apiVersion: v1
kind: Namespace
metadata:
  name: steered
  annotations: {starling.dev/ipv4pools: '[\"gold\"]'}
";

/// A pod object (never run: no kubelet) with annotations.
/// A pod bound to no node (never run: no kubelet). Deleted at once when
/// deleted: no kubelet has to confirm it.
fn pod(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> String {
    pod_on(namespace, name, None, annotations)
}

/// A pod bound to node1, as the scheduler would bind it (never run).
fn bound(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> String {
    pod_on(namespace, name, Some("node1"), annotations)
}

/// A pod bound to `node`, or to none.
fn pod_on(namespace: &str, name: &str, node: Option<&str>, annotations: &[(&str, &str)]) -> String {
    let mut a = String::new();
    for (k, v) in annotations {
        a.push_str(&format!("    {k}: '{v}'\n"));
    }
    let a = if a.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{a}")
    };
    let bound = node
        .map(|n| format!("  nodeName: {n}\n"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{a}spec:\n{bound}  containers: [{{name: c, image: busybox}}]\n"
    )
}

/// What one CNI ADD came to: the addresses, or the error code and message.
enum Added {
    Ips(Vec<IpAddr>),
    Error(u64, String),
}

/// Exec the plugin for an ADD of pod `namespace/name` as a runtime does.
fn add(node_ns: &str, socket: &Path, pod_ns: &Netns, namespace: &str, name: &str) -> Result<Added> {
    let conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "starling-ipam-test",
        "type": "starling",
        "socketPath": socket,
    });
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(starling_tests::bin("starling"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &pod_ns.name)
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod_ns.name))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={}", pod_ns.name),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running the starling plugin")?;
    use std::io::Write;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "plugin output is not JSON: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if out.status.success() {
        let ips = v["ips"]
            .as_array()
            .context("no ips")?
            .iter()
            .filter_map(|i| i["address"].as_str())
            .filter_map(|s| s.parse::<ipnet::IpNet>().ok())
            .map(|n| n.addr())
            .collect();
        return Ok(Added::Ips(ips));
    }
    Ok(Added::Error(
        v["code"].as_u64().unwrap_or(0),
        format!("{} {}", v["msg"], v["details"]),
    ))
}

fn in_net(ip: IpAddr, net: &str) -> bool {
    net.parse::<ipnet::IpNet>().is_ok_and(|n| n.contains(&ip))
}

#[test]
fn annotations_static_addresses_and_reservations_through_the_api_server() -> Result<()> {
    let k = Cluster::private("ipam")?;
    k.apply_manifests()?;
    let mut yaml = MODEL.to_string();
    // Bound to no node: the agent's watch of node1's pods never sees it,
    // its ADD reads it from the API server.
    yaml.push_str(&pod("default", "plain", &[]));
    yaml.push_str(&bound("steered", "in-gold", &[]));
    yaml.push_str(&bound(
        "steered",
        "back-to-main",
        &[("cni.projectcalico.org/ipv4pools", r#"["main"]"#)],
    ));
    yaml.push_str(&bound(
        "default",
        "pinned",
        &[("cni.projectcalico.org/ipAddrs", r#"["10.244.0.20"]"#)],
    ));
    yaml.push_str(&bound(
        "default",
        "same-address",
        &[("starling.dev/ipAddrs", r#"["10.244.0.20"]"#)],
    ));
    yaml.push_str(&bound(
        "default",
        "outside",
        &[("starling.dev/ipAddrs", r#"["198.51.100.7"]"#)],
    ));
    yaml.push_str(&bound(
        "default",
        "reserved",
        &[("starling.dev/ipAddrs", r#"["10.244.0.40"]"#)],
    ));
    yaml.push_str(&bound(
        "default",
        "bad-pool",
        &[("starling.dev/ipv4pools", r#"["no-such-pool"]"#)],
    ));
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], &yaml))?;

    let (c, _dir) = super::e2e::lab_on(&k, "kipam", 1, |_| {})?;
    let node_ns = format!("{}-node1", c.lab.name);
    let socket = c.dir().join("node1").join("cni.sock");

    // The lab's own pod (no CNI_ARGS) and a pod without annotations: the
    // main pool, never a reserved address.
    let lab_pod = c.pod("node1")?.ips[0];
    let run = |tag: &str, ns: &str, name: &str| -> Result<Added> {
        let p = Netns::new(tag)?;
        let r = add(&node_ns, &socket, &p, ns, name);
        // The namespace goes with `p`; the address stays allocated (the
        // agent goes with the lab).
        r
    };
    let Added::Ips(plain) = run("kip-plain", "default", "plain")? else {
        anyhow::bail!("plain pod refused");
    };
    for ip in [lab_pod, plain[0]] {
        ensure!(in_net(ip, "10.244.0.0/16"), "{ip} from the main pool");
        ensure!(
            !in_net(ip, "10.244.0.0/29") && ip.to_string() != "10.244.0.40",
            "{ip} is reserved and was handed out"
        );
    }

    // The namespace's pool, and the pod's annotation over its namespace's.
    let Added::Ips(gold) = run("kip-gold", "steered", "in-gold")? else {
        anyhow::bail!("in-gold refused");
    };
    ensure!(
        in_net(gold[0], "10.250.0.0/24"),
        "{gold:?} from gold (namespace annotation)"
    );
    let Added::Ips(back) = run("kip-back", "steered", "back-to-main")? else {
        anyhow::bail!("back-to-main refused");
    };
    ensure!(
        in_net(back[0], "10.244.0.0/16"),
        "{back:?}: the pod's annotation wins"
    );

    // A static address; the same again, one outside every pool, one
    // reserved: refused with their codes.
    let Added::Ips(pinned) = run("kip-pin", "default", "pinned")? else {
        anyhow::bail!("pinned refused");
    };
    ensure!(pinned[0].to_string() == "10.244.0.20", "{pinned:?}");
    for (tag, name, code, words) in [
        ("kip-same", "same-address", 104, "in use"),
        ("kip-out", "outside", 105, "outside every IP pool"),
        ("kip-res", "reserved", 105, "reserved"),
        ("kip-bad", "bad-pool", 106, "no-such-pool"),
        // Not in the API server: try again later (11), nothing allocated.
        ("kip-none", "no-such-pod", 11, "not found"),
    ] {
        match run(tag, "default", name)? {
            Added::Ips(ips) => anyhow::bail!("{name} got {ips:?}, must be refused"),
            Added::Error(got, msg) => ensure!(
                got == code && msg.contains(words),
                "{name}: code {got} ({msg}), want {code} mentioning {words:?}"
            ),
        }
    }
    // Seven ADDs of node1's pods were answered from the agent's watch (the
    // refused ones too: their annotations were read), the unbound pod's and
    // the missing pod's from the API server (the 404 is not counted).
    let metrics = Command::new("ip")
        .args(["netns", "exec", &node_ns])
        .args(["curl", "-sf", "http://127.0.0.1:9091/metrics"])
        .output()
        .context("reading node1's metrics")?;
    let text = String::from_utf8_lossy(&metrics.stdout);
    for want in [
        "starling_ipam_annotation_reads_total{source=\"watch\"} 7",
        "starling_ipam_annotation_reads_total{source=\"apiserver\"} 1",
    ] {
        ensure!(text.lines().any(|l| l == want), "no `{want}` in\n{text}");
    }
    let st = c.status("node1")?;
    ensure!(st.datastore == "kubernetes", "{}", st.datastore);
    let logs = std::fs::read_to_string(c.dir().join("node1").join("agent.log"))?;
    ensure!(
        !logs.to_lowercase().contains("forbidden"),
        "a request was forbidden:\n{logs}"
    );
    Ok(())
}

/// One pool, the default BGPConfiguration and node1: the model of the
/// `ipam check` test and of the node clean-up test.
pub(super) const CHECK_MODEL: &str = "\
apiVersion: starling.dev/v1
kind: IPPool
metadata: {name: main}
spec: {cidr: 10.244.0.0/16, blockSize: 26}
---
apiVersion: starling.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {asNumber: 64512}
---
apiVersion: v1
kind: Node
metadata:
  name: node1
  annotations: {starling.dev/ipv4-address: 192.0.2.11/24}
";

/// `starlingctl ipam <args> --socket SOCKET`: exit success, stdout, stderr.
fn ctl(socket: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(starling_tests::bin("starlingctl"))
        .arg("ipam")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .context("running starlingctl")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn addresses(report: &Value, list: &str) -> Vec<String> {
    report[list]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["address"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A BlockAffinity written directly, as another node (or a bug) would.
fn affinity(block: &str, node: &str) -> String {
    let name = block.replace(['.', '/', ':'], "-");
    format!(
        "---\napiVersion: starling.dev/v1\nkind: BlockAffinity\nmetadata: {{name: {name}}}\nspec: {{cidr: {block}, node: {node}, state: confirmed}}\n"
    )
}

/// `ipam check` finds a planted leak (pod deleted), orphan (a block of a
/// node not in the cluster), duplicate (an address of node1 inside a block
/// another node claims) and reservation overlap, with -o json and exit 1;
/// `ipam release` refuses an address whose pod exists, releases the leaked
/// one, and the check is clean again; the metrics endpoint shows pool and
/// block utilisation.
#[test]
fn ipam_check_and_release_through_the_api_server() -> Result<()> {
    let k = Cluster::private("ipchk")?;
    k.apply_manifests()?;
    let mut yaml = CHECK_MODEL.to_string();
    yaml.push_str(&pod("default", "alive", &[]));
    yaml.push_str(&pod("default", "leaky", &[]));
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], &yaml))?;

    let (c, _dir) = super::e2e::lab_on(&k, "kchk", 1, |_| {})?;
    let node_ns = format!("{}-node1", c.lab.name);
    let socket = c.dir().join("node1").join("cni.sock");
    let control = c.dir().join("node1").join("agent.sock");

    // Clean at first (the lab's own pod and nothing else).
    let (ok, out, err) = ctl(&control, &["check", "-o", "json"])?;
    ensure!(ok, "a clean cluster: exit 0\n{out}\n{err}");

    let alive_ns = Netns::new("kchk-alive")?;
    let leaky_ns = Netns::new("kchk-leaky")?;
    let ip_of = |ns: &Netns, name: &str| -> Result<IpAddr> {
        match add(&node_ns, &socket, ns, "default", name)? {
            Added::Ips(ips) => ips.first().copied().context("no address"),
            Added::Error(code, msg) => anyhow::bail!("{name}: code {code}: {msg}"),
        }
    };
    let alive = ip_of(&alive_ns, "alive")?;
    let leaky = ip_of(&leaky_ns, "leaky")?;
    let block = format!("{}/26", {
        let o = match alive {
            IpAddr::V4(v) => v.octets(),
            IpAddr::V6(_) => anyhow::bail!("IPv4 expected"),
        };
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3] & 0xc0)
    });

    // Plant: the pod of `leaky` deleted; a block of a node that does not
    // exist; a /24 around node1's block claimed by another (existing) node;
    // a reservation over `alive`.
    k.kubectl_ok(&["delete", "pod", "-n", "default", "leaky", "--wait=false"])?;
    let mut planted = affinity("10.244.200.0/26", "ghost");
    planted.push_str(
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: other\n  annotations: {starling.dev/ipv4-address: 192.0.2.99/24}\n",
    );
    let wide = match block.parse::<ipnet::IpNet>()? {
        ipnet::IpNet::V4(n) => ipnet::IpNet::V4(ipnet::Ipv4Net::new(n.network(), 24)?.trunc()),
        ipnet::IpNet::V6(_) => anyhow::bail!("IPv4 expected"),
    };
    planted.push_str(&affinity(&wide.to_string(), "other"));
    planted.push_str(&format!(
        "---\napiVersion: starling.dev/v1\nkind: IPReservation\nmetadata: {{name: late}}\nspec: {{reservedCIDRs: [{alive}/32]}}\n"
    ));
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], &planted))?;

    // The agent sees the new Node and reservation through its watch; the
    // check reads the claims and pods itself.
    let mut report = Value::Null;
    starling_tests::wait_for(
        "ipam check to see every planted problem",
        std::time::Duration::from_secs(30),
        || {
            let (ok, out, err) = ctl(&control, &["check", "-o", "json"])?;
            ensure!(
                !ok || out.contains("\"leaks\": []"),
                "exit 0 with problems:\n{out}\n{err}"
            );
            report = serde_json::from_str(&out).with_context(|| format!("{out}\n{err}"))?;
            Ok(!ok
                && addresses(&report, "leaks") == [leaky.to_string()]
                && addresses(&report, "reserved") == [alive.to_string()]
                && report["orphans"].as_array().is_some_and(|o| {
                    o.iter()
                        .any(|x| x["node"] == "ghost" && x["block"] == "10.244.200.0/26")
                })
                && report["overlappingBlocks"]
                    .as_array()
                    .is_some_and(|o| !o.is_empty()))
        },
    )
    .with_context(|| format!("last report: {report:#}"))?;
    let dups = addresses(&report, "duplicates");
    ensure!(
        dups.contains(&alive.to_string()) && dups.contains(&leaky.to_string()),
        "node1's addresses inside other's {wide}: {report:#}"
    );
    ensure!(
        report["leaks"][0]["pod"] == "default/leaky"
            && report["leaks"][0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("does not exist")),
        "{report:#}"
    );
    // The readable report names the same.
    let (ok, out, _) = ctl(&control, &["check"])?;
    ensure!(
        !ok && out.contains("Leaked addresses") && out.contains("ghost"),
        "{out}"
    );

    // Release: refused while the pod exists, done for the leaked address.
    let (ok, out, err) = ctl(&control, &["release", "--ip", &alive.to_string()])?;
    ensure!(
        !ok && err.contains("in use") && err.contains("default/alive"),
        "release of an address in use must be refused: {out} {err}"
    );
    let (ok, out, err) = ctl(
        &control,
        &["release", "--ip", &leaky.to_string(), "-o", "json"],
    )?;
    ensure!(ok, "release of the leaked address: {out} {err}");
    let released: Value = serde_json::from_str(&out)?;
    ensure!(
        released["released"]["pod"]["name"] == "leaky",
        "{released:#}"
    );
    // Not ours: refused, naming the node.
    let (ok, _, err) = ctl(&control, &["release", "--ip", "10.244.200.1"])?;
    ensure!(!ok && err.contains("not allocated on node node1"), "{err}");

    // Remove the other plants: the check is clean again.
    k.kubectl_ok(&["delete", "ipreservation.starling.dev", "late"])?;
    k.kubectl_ok(&[
        "delete",
        "blockaffinity.starling.dev",
        &wide.to_string().replace(['.', '/'], "-"),
    ])?;
    k.kubectl_ok(&[
        "delete",
        "blockaffinity.starling.dev",
        "10-244-200-0-26",
        "--ignore-not-found",
    ])?;
    starling_tests::wait_for(
        "a clean ipam check",
        std::time::Duration::from_secs(30),
        || {
            let (ok, out, _) = ctl(&control, &["check", "-o", "json"])?;
            report = serde_json::from_str(&out)?;
            Ok(ok)
        },
    )
    .with_context(|| format!("last report: {report:#}"))?;
    ensure!(addresses(&report, "leaks").is_empty(), "{report:#}");

    // Utilisation in the metrics: node1's block holds the lab pod and alive.
    let want = [
        format!(
            "starling_ipam_block_addresses{{block=\"{block}\",node=\"node1\",pool=\"10.244.0.0/16\",state=\"allocated\"}} 2"
        ),
        format!(
            "starling_ipam_block_addresses{{block=\"{block}\",node=\"node1\",pool=\"10.244.0.0/16\",state=\"capacity\"}} 64"
        ),
        "starling_ipam_pool_addresses{node=\"node1\",pool=\"10.244.0.0/16\",state=\"allocated\"} 2"
            .to_string(),
        "starling_ipam_pool_addresses{node=\"node1\",pool=\"10.244.0.0/16\",state=\"capacity\"} 64"
            .to_string(),
    ];
    let mut text = String::new();
    let seen = starling_tests::wait_for(
        "pool and block utilisation in the metrics",
        std::time::Duration::from_secs(30),
        || {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &node_ns,
                    "curl",
                    "-sf",
                    "http://127.0.0.1:9091/metrics",
                ])
                .output()?;
            text = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok(want.iter().all(|w| text.lines().any(|l| l == w)))
        },
    );
    if let Err(e) = seen {
        let log =
            std::fs::read_to_string(c.dir().join("node1").join("agent.log")).unwrap_or_default();
        anyhow::bail!("{e}: want {want:#?} in\n{text}\nagent log:\n{log}");
    }
    drop((alive_ns, leaky_ns));
    Ok(())
}

/// An IPAMBlock record written directly (the check and clean-up tests set up
/// their records by hand): `marks` are (address, node, attachment).
pub(super) fn record(block: &str, owner: &str, marks: &[(&str, &str, &str)]) -> String {
    let name = block.replace(['.', '/', ':'], "-");
    let mut y = format!(
        "---\napiVersion: starling.dev/v1\nkind: IPAMBlock\nmetadata: {{name: {name}}}\nspec:\n  cidr: {block}\n  owner: {owner}\n  state: open\n  allocations:\n"
    );
    for (ip, node, attachment) in marks {
        y.push_str(&format!(
            "  - {{ip: '{ip}', node: {node}, attachment: '{attachment}'}}\n"
        ));
    }
    y
}

/// A mark in an IPAMBlock record: (address, node, attachment).
pub(super) type Mark = (String, String, String);

/// The state and the marks of `block`'s IPAMBlock record.
pub(super) fn ipam_record(k: &Cluster, block: &str) -> Result<(String, Vec<Mark>)> {
    let name = starling_agent::ipam::kube::block_name(
        block.parse().with_context(|| format!("block {block:?}"))?,
    );
    let out = k.kubectl_ok(&["get", "ipamblocks.starling.dev", &name, "-o", "json"])?;
    let v: Value = serde_json::from_str(&out)?;
    let marks = v["spec"]["allocations"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let s = |f: &str| m[f].as_str().unwrap_or_default().to_string();
                    (s("ip"), s("node"), s("attachment"))
                })
                .collect()
        })
        .unwrap_or_default();
    let state = v["spec"]["state"].as_str().unwrap_or_default().to_string();
    Ok((state, marks))
}

fn marked(k: &Cluster, block: &str) -> Result<Vec<(String, String)>> {
    let (_, marks) = ipam_record(k, block)?;
    Ok(marks.into_iter().map(|(ip, node, _)| (ip, node)).collect())
}

/// The cidrs of the BlockAffinities naming `node`.
pub(super) fn blocks_of(k: &Cluster, node: &str) -> Result<Vec<String>> {
    let out = k.kubectl_ok(&["get", "blockaffinities.starling.dev", "-o", "json"])?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(v["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter(|i| i["spec"]["node"] == node)
        .filter_map(|i| i["spec"]["cidr"].as_str().map(String::from))
        .collect())
}

fn mark_addresses(report: &Value, list: &str) -> Vec<String> {
    let mut v = addresses(report, list);
    v.sort();
    v
}

/// `ipam check` reads the borrowing records: node1's mark whose pod runs is
/// in use, its marks whose pod is gone (or which no allocation holds) are
/// leaks, a mark of a node not in the cluster is an orphan, an address
/// marked twice and an address node1 allocated outside its own block's
/// record while another node's mark holds it are duplicates, a mark on a
/// reserved address is an overlap; `ipam release` clears a leaked or
/// orphaned mark, refuses one whose pod runs (unless --force), one of
/// another existing node and a doubly-marked address.
#[test]
fn ipam_check_and_release_of_borrowed_addresses() -> Result<()> {
    let k = Cluster::private("ipbor")?;
    k.apply_manifests()?;
    let mut yaml = CHECK_MODEL.to_string();
    yaml.push_str(&pod("default", "alive", &[]));
    yaml.push_str(&pod("default", "leaky", &[]));
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], &yaml))?;

    let (c, _dir) = super::e2e::lab_on(&k, "kbor", 1, |_| {})?;
    let node_ns = format!("{}-node1", c.lab.name);
    let socket = c.dir().join("node1").join("cni.sock");
    let control = c.dir().join("node1").join("agent.sock");
    let alive_ns = Netns::new("kbor-alive")?;
    let leaky_ns = Netns::new("kbor-leaky")?;
    let ip_of = |ns: &Netns, name: &str| -> Result<IpAddr> {
        match add(&node_ns, &socket, ns, "default", name)? {
            Added::Ips(ips) => ips.first().copied().context("no address"),
            Added::Error(code, msg) => anyhow::bail!("{name}: code {code}: {msg}"),
        }
    };
    let alive = ip_of(&alive_ns, "alive")?;
    ip_of(&leaky_ns, "leaky")?;
    let own = match alive {
        IpAddr::V4(v) => {
            let o = v.octets();
            format!("{}.{}.{}.{}/26", o[0], o[1], o[2], o[3] & 0xc0)
        }
        IpAddr::V6(_) => anyhow::bail!("IPv4 expected"),
    };
    let key = |ns: &Netns| format!("starling-ipam-test/{}/eth0", ns.name);
    let (k_alive, k_leaky) = (key(&alive_ns), key(&leaky_ns));

    // Node1 borrowed .1 (alive), .2 (leaky) and .3 (no allocation) of
    // other's block; ghost's .4; .5 marked twice; .6 reserved. In node1's
    // own block, other marked the address node1 gave alive.
    let lent = "10.244.201.0/26";
    // Node other (no agent) joins after the lab is up: the lab waits for
    // every mesh session.
    let mut planted = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: other\n  annotations: {starling.dev/ipv4-address: 192.0.2.99/24}\n".to_string();
    planted.push_str(&affinity(lent, "other"));
    planted.push_str(&record(
        lent,
        "other",
        &[
            ("10.244.201.1", "node1", &k_alive),
            ("10.244.201.2", "node1", &k_leaky),
            ("10.244.201.3", "node1", "starling-ipam-test/gone/eth0"),
            ("10.244.201.4", "ghost", "pods/g/eth0"),
            ("10.244.201.5", "other", "pods/x/eth0"),
            ("10.244.201.5", "other", "pods/y/eth0"),
            ("10.244.201.6", "other", "pods/r/eth0"),
        ],
    ));
    planted.push_str(&record(
        &own,
        "node1",
        &[(&alive.to_string(), "other", "pods/z/eth0")],
    ));
    planted.push_str(
        "---\napiVersion: starling.dev/v1\nkind: IPReservation\nmetadata: {name: lent}\nspec: {reservedCIDRs: [10.244.201.6]}\n",
    );
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], &planted))?;
    k.kubectl_ok(&["delete", "pod", "-n", "default", "leaky", "--wait=false"])?;

    let mut report = Value::Null;
    starling_tests::wait_for(
        "ipam check to judge every planted mark",
        std::time::Duration::from_secs(30),
        || {
            let (ok, out, err) = ctl(&control, &["check", "-o", "json"])?;
            report = serde_json::from_str(&out).with_context(|| format!("{out}\n{err}"))?;
            Ok(!ok
                && mark_addresses(&report, "borrowedLeaks") == ["10.244.201.2", "10.244.201.3"]
                && mark_addresses(&report, "borrowedReserved") == ["10.244.201.6"])
        },
    )
    .with_context(|| format!("last report: {report:#}"))?;
    ensure!(
        mark_addresses(&report, "borrowedOrphans") == ["10.244.201.4"],
        "{report:#}"
    );
    let mut want_dups = vec![alive.to_string(), "10.244.201.5".to_string()];
    want_dups.sort();
    ensure!(
        mark_addresses(&report, "borrowedDuplicates") == want_dups,
        "{report:#}"
    );
    let leak = &report["borrowedLeaks"][0];
    ensure!(
        leak["block"] == lent
            && leak["node"] == "node1"
            && leak["attachment"] == k_leaky.as_str()
            && leak["pod"] == "default/leaky",
        "the leak names block, address, node, attachment and pod: {report:#}"
    );
    // alive's borrowed mark is in use, and its own address (marked by
    // other in node1's record) is a duplicate, not a plain one.
    ensure!(report["records"] == 2 && report["marks"] == 8, "{report:#}");
    let (ok, out, _) = ctl(&control, &["check"])?;
    ensure!(
        !ok && out.contains("Leaked borrowed addresses")
            && out.contains("Orphaned borrowing marks")
            && out.contains(lent),
        "{out}"
    );

    // Release: in use refused; leaked and orphaned cleared; another node's
    // and a doubly-marked address refused, even forced.
    let (ok, _, err) = ctl(&control, &["release", "--ip", "10.244.201.1"])?;
    ensure!(
        !ok && err.contains("in use") && err.contains("default/alive"),
        "{err}"
    );
    for ip in ["10.244.201.2", "10.244.201.4"] {
        let (ok, out, err) = ctl(&control, &["release", "--ip", ip, "-o", "json"])?;
        ensure!(ok, "release of {ip}: {out} {err}");
        let r: Value = serde_json::from_str(&out)?;
        ensure!(
            r["mark"]["block"] == lent && r["mark"]["address"] == ip,
            "{r:#}"
        );
    }
    let (ok, _, err) = ctl(&control, &["release", "--ip", "10.244.201.6", "--force"])?;
    ensure!(!ok && err.contains("by node other"), "{err}");
    let (ok, _, err) = ctl(&control, &["release", "--ip", "10.244.201.5", "--force"])?;
    ensure!(!ok && err.contains("marked 2 times"), "{err}");
    let (ok, out, err) = ctl(&control, &["release", "--ip", "10.244.201.1", "--force"])?;
    ensure!(ok && out.contains("forced"), "{out} {err}");
    let left: Vec<String> = marked(&k, lent)?.into_iter().map(|m| m.0).collect();
    ensure!(
        left == [
            "10.244.201.3",
            "10.244.201.5",
            "10.244.201.5",
            "10.244.201.6"
        ],
        "marks left: {left:?}"
    );
    drop((alive_ns, leaky_ns));
    Ok(())
}
