//! BGP from the Kubernetes datastore: a BGPFilter and a BGPPeer naming it,
//! applied through a real API server to running agents with a BIRD
//! top-of-rack, and what BIRD receives as the filter is created, edited and
//! deleted. And the node address each agent autodetects, published in its
//! Node's annotation and read, with its prefix length, by the others.

use super::cluster::{Cluster, checked, log};
use anyhow::{Context, Result, ensure};
use ipnet::IpNet;
use starling_agent::lab::{LabOptions, Tor};
use starling_agent::model::kube::{
    ANNOTATION_DETECTED_IPV4, KubeDatastore, KubeOptions, client as kube_client,
};
use starling_agent::model::{Datastore, Snapshot};
use starling_tests::cluster::{self as lab};
use starling_tests::{require_tool, wait_for};
use std::time::{Duration, Instant};

/// The deadline of each expected change (a bound, not a speed target).
const DEADLINE: Duration = Duration::from_secs(30);

fn apply(k: &Cluster, yaml: &str) -> Result<()> {
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], yaml))?;
    Ok(())
}

/// A lab of two agents reading the private API server `k`, converged,
/// with the directory of its kubeconfig.
fn lab_on(
    k: &Cluster,
    tag: &str,
    opts: impl FnOnce(&mut LabOptions),
) -> Result<(lab::Cluster, starling_tests::TempDir)> {
    let (c, dir) = super::e2e::lab_on(k, tag, 2, opts)?;
    c.converged(Duration::from_secs(60))?;
    Ok((c, dir))
}

/// The prefixes BIRD holds, first column of `birdc show route`.
fn at_tor(c: &lab::Cluster, block: &IpNet) -> Result<bool> {
    let routes = c.lab.tor_routes()?;
    Ok(routes
        .lines()
        .any(|l| l.split_whitespace().next() == Some(&block.to_string())))
}

/// Wait until BIRD holds exactly the `want`ed blocks of `blocks`.
fn expect(c: &lab::Cluster, what: &str, blocks: &[IpNet; 2], want: [bool; 2]) -> Result<()> {
    let t = Instant::now();
    let mut last = [false; 2];
    wait_for(&format!("BIRD: {what}"), DEADLINE, || {
        last = [at_tor(c, &blocks[0])?, at_tor(c, &blocks[1])?];
        Ok(last == want)
    })
    .with_context(|| {
        format!(
            "{what}: BIRD holds node1's {} {}, node2's {} {}",
            blocks[0], last[0], blocks[1], last[1]
        )
    })?;
    log(&format!(
        "figure: {what}: API write to BIRD {} ms",
        t.elapsed().as_millis()
    ));
    Ok(())
}

fn filter(reject: &IpNet) -> String {
    format!(
        "apiVersion: starling.dev/v1\nkind: BGPFilter\nmetadata: {{name: tor-out}}\nspec:\n  exportV4:\n  \
         - {{action: Reject, matchOperator: Equal, cidr: {reject}}}\n"
    )
}

#[test]
fn bgp_filters_from_the_api_server_shape_what_the_top_of_rack_receives() -> Result<()> {
    require_tool("birdc", "bird2");
    let k = Cluster::private("bgpf")?;
    k.apply_manifests()?;
    let peer = |filters: &str| {
        format!(
            "apiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {{name: tor}}\n\
             spec: {{peerIP: 192.0.2.254, asNumber: 65000, filters: [{filters}]}}\n"
        )
    };
    let mut yaml = format!(
        "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {{name: pods}}\nspec: {{cidr: 10.244.0.0/16, blockSize: 26}}\n\
         ---\napiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {{name: default}}\nspec: {{asNumber: 64512}}\n---\n{}",
        peer("")
    );
    for i in 1..=2 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node{i}\n  annotations:\n    \
             starling.dev/ipv4-address: 192.0.2.{}/24\n",
            10 + i
        ));
    }
    apply(&k, &yaml)?;
    let (c, _dir) = lab_on(&k, "kbf", |o| o.tor = Some(Tor::Bird))?;
    let blocks = [c.status("node1")?.blocks[0], c.status("node2")?.blocks[0]];
    // No filter named: both blocks.
    expect(&c, "no filter", &blocks, [true, true])?;

    // The filter, then the peer naming it: node1's block stays home.
    apply(&k, &filter(&blocks[0]))?;
    apply(&k, &peer("tor-out"))?;
    expect(
        &c,
        "the filter rejects node1's block",
        &blocks,
        [false, true],
    )?;
    // Edited: node2's block instead.
    apply(&k, &filter(&blocks[1]))?;
    expect(
        &c,
        "the filter edited to node2's block",
        &blocks,
        [true, false],
    )?;
    // Deleted: a peer naming a missing filter gets no session, so nothing.
    k.kubectl_ok(&["delete", "bgpfilter.starling.dev", "tor-out"])?;
    expect(
        &c,
        "the filter deleted (no session)",
        &blocks,
        [false, false],
    )?;
    let st = c.status("node1")?;
    ensure!(
        st.warnings
            .iter()
            .any(|w| w.contains("BGPFilter `tor-out` is not in the model")),
        "node1's status does not say why the ToR session went: {:?}",
        st.warnings
    );
    // Created again: the session comes back, filtered.
    apply(&k, &filter(&blocks[0]))?;
    expect(&c, "the filter created again", &blocks, [false, true])?;
    Ok(())
}

fn annotation(k: &Cluster, node: &str) -> Result<String> {
    let path = format!(
        "jsonpath={{.metadata.annotations.{}}}",
        ANNOTATION_DETECTED_IPV4.replace('.', "\\.")
    );
    k.kubectl_ok(&["get", "node", node, "-o", &path])
}

#[test]
fn agents_publish_their_autodetected_address_and_read_each_others_subnet() -> Result<()> {
    let k = Cluster::private("addr")?;
    k.apply_manifests()?;
    let mut yaml = "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.244.0.0/16, blockSize: 26}\n\
         ---\napiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 64512}\n"
        .to_string();
    for i in 1..=2 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node{i}}}\n"
        ));
    }
    apply(&k, &yaml)?;
    // What a kubelet reports: an InternalIP, with no subnet.
    for i in 1..=2 {
        let status = format!(
            "{{\"status\":{{\"addresses\":[{{\"type\":\"InternalIP\",\"address\":\"192.0.2.{}\"}}]}}}}",
            10 + i
        );
        k.kubectl_ok(&[
            "patch",
            "node",
            &format!("node{i}"),
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ])?;
    }
    // Before any agent: the datastore guesses host routes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = rt.block_on(kube_client(Some(&k.kubeconfig)))?;
    let _in = rt.enter();
    let ds = KubeDatastore::start(
        client,
        KubeOptions {
            own_node: Some("node2".into()),
            ..Default::default()
        },
    );
    rt.block_on(ds.wait_ready(DEADLINE))
        .map_err(anyhow::Error::msg)?;
    let addr = |s: &Snapshot, n: &str| {
        s.node(n)
            .and_then(|n| n.ipv4_address)
            .map(|a| a.to_string())
    };
    ensure!(
        addr(&ds.snapshot(), "node1").as_deref() == Some("192.0.2.11/32"),
        "{:?}",
        ds.snapshot().nodes
    );

    let (c, _dir) = lab_on(&k, "kad", |o| {
        o.autodetect = Some("cidr=192.0.2.0/24".into())
    })?;
    // Each agent autodetects over the InternalIP guess and publishes it.
    for i in 1..=2 {
        let node = format!("node{i}");
        let want = format!("192.0.2.{}/24", 10 + i);
        let mut last = String::new();
        wait_for(&format!("{node}'s annotation"), DEADLINE, || {
            last = annotation(&k, &node)?;
            Ok(last == want)
        })
        .with_context(|| format!("{node}: {ANNOTATION_DETECTED_IPV4} is `{last}`"))?;
        let st = c.status(&node)?;
        ensure!(
            st.addresses.iter().any(|a| a.to_string() == want)
                && st.address_source.starts_with("autodetection"),
            "{node}: status addresses {:?} from {}",
            st.addresses,
            st.address_source
        );
    }
    // Another node's view (node2's datastore): node1 with its subnet.
    wait_for("node1's /24 in node2's model", DEADLINE, || {
        Ok(addr(&ds.snapshot(), "node1").as_deref() == Some("192.0.2.11/24"))
    })?;
    let snap = ds.snapshot();
    ensure!(
        snap.guessed.contains("node2") && !snap.guessed.contains("node1"),
        "node2 reads its own published address (it must autodetect again): {:?}",
        snap.guessed
    );
    // Removed or edited by someone else: the agent writes it back.
    k.kubectl_ok(&[
        "annotate",
        "node",
        "node1",
        &format!("{ANNOTATION_DETECTED_IPV4}-"),
    ])?;
    wait_for("node1's annotation written back", DEADLINE, || {
        Ok(annotation(&k, "node1")? == "192.0.2.11/24")
    })?;
    k.kubectl_ok(&[
        "annotate",
        "--overwrite",
        "node",
        "node1",
        &format!("{ANNOTATION_DETECTED_IPV4}=192.0.2.99/30"),
    ])?;
    wait_for("node1's annotation repaired", DEADLINE, || {
        Ok(annotation(&k, "node1")? == "192.0.2.11/24")
    })?;
    drop(ds);
    drop(c);
    Ok(())
}
