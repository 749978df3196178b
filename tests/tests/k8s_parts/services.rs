//! Service advertisement through a real API server and a BIRD top-of-rack:
//! BGPConfiguration `serviceClusterIPs`, `serviceExternalIPs` and
//! `serviceLoadBalancerIPs`; a `externalTrafficPolicy: Local` Service and
//! its EndpointSlices written by the test (no kubelet, no controllers), and
//! what BIRD holds as endpoints come, move, turn unready and go.

use super::cluster::{Cluster, checked, log};
use super::e2e::lab_on;
use anyhow::{Context, Result, ensure};
use starling_agent::lab::Tor;
use starling_tests::{require_tool, wait_for};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

const CLUSTER_CIDR: &str = "10.96.0.0/16";
const EXTERNAL_CIDR: &str = "198.51.100.0/24";
const LB_CIDR: &str = "203.0.113.0/24";
const CLUSTER_IP: &str = "10.96.50.10";
const EXTERNAL_IP: &str = "198.51.100.10";
const LB_IP: &str = "203.0.113.10";
/// An external IP outside every configured CIDR: never advertised.
const STRAY_IP: &str = "100.64.0.5";
/// The deadline of each expected change (a convergence bound, not a
/// speed target: the figures are logged).
const DEADLINE: Duration = Duration::from_secs(20);

/// The nodes (BIRD protocol names) BIRD has a route for exactly `prefix`
/// from, and the next hops of those routes.
fn tor_routes(sock: &str, prefix: &str) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let out = Command::new("birdc")
        .args(["-s", sock, "show", "route", prefix, "all"])
        .output()
        .context("running birdc")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // No route for the prefix: BIRD answers "Network not found" and
    // birdc exits non-zero.
    ensure!(
        out.status.success() || text.contains("Network not found"),
        "birdc show route {prefix}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut from = BTreeSet::new();
    let mut via = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.split("unicast [").nth(1) {
            from.extend(rest.split_whitespace().next().map(str::to_string));
        }
        if let Some(rest) = line.trim().strip_prefix("via ") {
            via.extend(rest.split_whitespace().next().map(str::to_string));
        }
    }
    Ok((from, via))
}

/// Wait until BIRD has `prefix` from exactly `nodes`, with their addresses
/// as next hops; returns how long it took.
fn expect(sock: &str, prefix: &str, nodes: &[usize]) -> Result<Duration> {
    let want: BTreeSet<String> = nodes.iter().map(|i| format!("node{i}")).collect();
    let hops: BTreeSet<String> = nodes
        .iter()
        .map(|i| format!("192.0.2.{}", 10 + i))
        .collect();
    let mut last = (BTreeSet::new(), BTreeSet::new());
    let took = wait_for(&format!("BIRD: {prefix} from {want:?}"), DEADLINE, || {
        last = tor_routes(sock, prefix)?;
        Ok(last.0 == want && last.1 == hops)
    })
    .with_context(|| format!("{prefix}: BIRD has it from {:?} via {:?}", last.0, last.1))?;
    log(&format!(
        "figure: BIRD has {prefix} from {want:?} after {} ms",
        took.as_millis()
    ));
    Ok(took)
}

/// Log how long a step took from the API write to BIRD showing all of it.
fn step_took(what: &str, since: Instant) {
    log(&format!(
        "figure: {what}: API write to BIRD {} ms",
        since.elapsed().as_millis()
    ));
}

fn apply(k: &Cluster, yaml: &str) -> Result<()> {
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], yaml))?;
    Ok(())
}

/// The EndpointSlice of `web` named `name`: endpoints as (node, ready).
fn slice(name: &str, endpoints: &[(usize, bool)]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{port: 80, protocol: TCP}}]\nendpoints:\n"
    );
    if endpoints.is_empty() {
        y = y.replace("endpoints:\n", "endpoints: []\n");
    }
    for (node, ready) in endpoints {
        y.push_str(&format!(
            "- addresses: [10.244.{node}.5]\n  nodeName: node{node}\n  conditions: {{ready: {ready}}}\n"
        ));
    }
    y
}

#[test]
fn services_are_advertised_to_the_top_of_rack_as_endpoints_come_move_and_go() -> Result<()> {
    require_tool("birdc", "bird2");
    let k = Cluster::private("svc")?;
    k.apply_manifests()?;
    let mut yaml = format!(
        "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {{name: pods}}\nspec: {{cidr: 10.244.0.0/16, blockSize: 26}}\n\
         ---\napiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {{name: default}}\nspec:\n  asNumber: 64512\n  \
         serviceClusterIPs: [{{cidr: {CLUSTER_CIDR}}}]\n  serviceExternalIPs: [{{cidr: {EXTERNAL_CIDR}}}]\n  \
         serviceLoadBalancerIPs: [{{cidr: {LB_CIDR}}}]\n\
         ---\napiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {{name: tor}}\nspec: {{peerIP: 192.0.2.254, asNumber: 65000}}\n"
    );
    for i in 1..=3 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node{i}\n  annotations:\n    \
             starling.dev/ipv4-address: 192.0.2.{}/24\nspec:\n  podCIDR: 10.244.{i}.0/26\n  podCIDRs: [10.244.{i}.0/26]\n",
            10 + i
        ));
    }
    apply(&k, &yaml)?;

    let (c, _dir) = lab_on(&k, "ksv", 3, |o| o.tor = Some(Tor::Bird))?;
    c.converged(Duration::from_secs(60))?;
    let tor = c.lab.tor.as_ref().context("the lab has no top-of-rack")?;
    let sock = tor.socket.to_str().context("socket path")?.to_string();

    // Every node advertises every configured CIDR: three routes each.
    for cidr in [CLUSTER_CIDR, EXTERNAL_CIDR, LB_CIDR] {
        expect(&sock, cidr, &[1, 2, 3])?;
    }

    // A Local Service with an endpoint on node1; a Cluster Service; an
    // external IP outside every configured CIDR.
    let t = Instant::now();
    apply(
        &k,
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  \
             clusterIP: {CLUSTER_IP}\n  externalTrafficPolicy: Local\n  externalIPs: [{EXTERNAL_IP}, {STRAY_IP}]\n  \
             ports: [{{port: 80, protocol: TCP}}]\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: spread, namespace: default}}\nspec:\n  \
             clusterIP: 10.96.50.20\n  externalIPs: [198.51.100.20]\n  ports: [{{port: 80, protocol: TCP}}]\n\
             ---\n{}---\n{}",
            slice("web-a", &[(1, true)]),
            slice("spread-a", &[(1, true), (2, true)])
                .replace("service-name: web", "service-name: spread"),
        ),
    )?;
    let status =
        format!("{{\"status\":{{\"loadBalancer\":{{\"ingress\":[{{\"ip\":\"{LB_IP}\"}}]}}}}}}");
    k.kubectl_ok(&[
        "patch",
        "service",
        "web",
        "-n",
        "default",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status,
    ])?;
    let hosts = [
        format!("{CLUSTER_IP}/32"),
        format!("{EXTERNAL_IP}/32"),
        format!("{LB_IP}/32"),
    ];
    for h in &hosts {
        expect(&sock, h, &[1])?;
    }
    step_took(
        "the Service, its slice and its load-balancer status are written",
        t,
    );
    // Never: outside the CIDRs, or a Cluster Service's addresses.
    for never in [
        format!("{STRAY_IP}/32"),
        "10.96.50.20/32".into(),
        "198.51.100.20/32".into(),
    ] {
        let (from, _) = tor_routes(&sock, &never)?;
        ensure!(from.is_empty(), "{never} advertised by {from:?}");
    }
    let st = c.status("node1")?;
    ensure!(
        st.services.iter().any(|p| p.to_string() == hosts[0]),
        "starlingctl status of node1 lacks {}: {:?}",
        hosts[0],
        st.services
    );
    // The other nodes' Service routes stay out of the kernels.
    let routes2 = c.kernel_routes("node2")?;
    ensure!(
        !routes2.contains(CLUSTER_IP) && !routes2.contains("10.96.0.0/16"),
        "node2 installed a Service route:\n{routes2}"
    );

    // A second ready endpoint on node2 (another slice): ECMP at the ToR.
    let t = Instant::now();
    apply(&k, &slice("web-b", &[(2, true)]))?;
    for h in &hosts {
        expect(&sock, h, &[1, 2])?;
    }
    step_took("a second endpoint on node2", t);
    // The endpoint moves from node1 to node3.
    let t = Instant::now();
    apply(&k, &slice("web-a", &[(3, true)]))?;
    for h in &hosts {
        expect(&sock, h, &[2, 3])?;
    }
    step_took("the endpoint moves from node1 to node3", t);
    // node2's endpoint turns unready.
    let t = Instant::now();
    apply(&k, &slice("web-b", &[(2, false)]))?;
    for h in &hosts {
        expect(&sock, h, &[3])?;
    }
    step_took("node2's endpoint turns unready", t);
    // The Service goes: every host route goes; the CIDRs stay.
    let t = Instant::now();
    k.kubectl_ok(&["delete", "service", "web", "-n", "default"])?;
    for h in &hosts {
        expect(&sock, h, &[])?;
    }
    step_took("the Service is deleted", t);
    for cidr in [CLUSTER_CIDR, EXTERNAL_CIDR, LB_CIDR] {
        expect(&sock, cidr, &[1, 2, 3])?;
    }
    Ok(())
}
