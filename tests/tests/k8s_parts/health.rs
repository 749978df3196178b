//! Liveness and readiness while the API server is out of reach: the agent
//! answers /healthz from its first second (the kubelet must not kill an
//! agent that only waits into CrashLoopBackOff), retries the API with
//! backoff, logging each attempt with its error, and turns ready once the
//! API server is reachable and the first sync is done.

use super::cluster::{Cluster, checked};
use super::e2e::{listen_in, pipe};
use anyhow::{Context, Result, ensure};
use starling_tests::{Daemon, Netns, TempDir, bin, log_line, wait_for};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// `GET path` on the agent's health address inside `ns`: (status, body).
fn probe(ns: &Netns, path: &str) -> Result<(u16, String)> {
    let out = ns.exec_output(
        "curl",
        &[
            "-s",
            "-m",
            "2",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:9099{path}"),
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

#[test]
fn an_agent_waiting_for_the_api_server_is_live_and_turns_ready_when_it_comes() -> Result<()> {
    let k = Cluster::private("apidown")?;
    k.apply_manifests()?;
    let port = k.port()?;
    let yaml = "apiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.244.0.0/16, blockSize: 26}\n\
         ---\napiVersion: v1\nkind: Node\nmetadata:\n  name: apidown\n  annotations:\n    \
         starling.dev/ipv4-address: 192.0.2.10/24\nspec:\n  podCIDR: 10.244.1.0/26\n  podCIDRs: [10.244.1.0/26]\n";
    checked(&["apply"], k.kubectl_stdin(&["apply", "-f", "-"], yaml))?;

    let dir = TempDir::new("apidown")?;
    let kubeconfig = dir.join("agent.kubeconfig");
    let token = k.token_for("kube-system", "starling-agent")?;
    k.kubeconfig_with_token(&token, &kubeconfig)?;
    let ns = Netns::new("apidown")?;
    // An uplink with a default route (no dummy module on every host: a
    // veth pair, both ends in the namespace).
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])?;
    ns.ip(&["addr", "add", "192.0.2.10/24", "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth1", "up"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", "default", "via", "192.0.2.1", "dev", "eth0"])?;
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "nodeName: apidown\nstateDir: {d}/state\nsocketPath: {d}/cni.sock\ncontrolSocket: {d}/agent.sock\n\
             datastore: {{type: kubernetes, kubeconfig: {kc}}}\nendpoints: {{health: 127.0.0.1:9099, metrics: 127.0.0.1:9099}}\n",
            d = dir.path.display(),
            kc = kubeconfig.display()
        ),
    )?;
    let log = dir.join("agent.log");
    let file = std::fs::File::create(&log)?;
    let mut cmd = ns.command(bin("starling-agent").to_str().context("path")?);
    cmd.args(["run", "--config", config.to_str().context("path")?])
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file));
    let started = Instant::now();
    let mut agent = Daemon::spawn("starling-agent", cmd)?;

    // Nothing listens at the API server's address in the namespace yet.
    wait_for(
        "/healthz 200 while the API server is unreachable",
        Duration::from_secs(1),
        || Ok(probe(&ns, "/healthz")?.0 == 200),
    )?;
    let live = started.elapsed();
    log_line(&format!(
        "/healthz answered 200 {:.0} ms after the agent started, API server unreachable",
        live.as_secs_f64() * 1000.0
    ));
    let (code, body) = probe(&ns, "/readyz")?;
    ensure!(
        code == 503 && body.contains("datastore"),
        "/readyz before the API server is reachable: {code} {body}"
    );
    // Each attempt is logged with the reason.
    wait_for(
        "two logged attempts to reach the API server",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&log)?;
            Ok(text
                .lines()
                .filter(|l| l.contains("waiting for the Kubernetes API") && l.contains("attempt"))
                .count()
                >= 2)
        },
    )?;
    agent.check_alive()?;
    ensure!(
        probe(&ns, "/healthz")?.0 == 200,
        "/healthz failed while waiting"
    );

    // The API server comes: a relay inside the namespace to it.
    let listener = listen_in(&ns.name, port)?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let Ok(up) = TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            if let (Ok(a), Ok(b)) = (conn.try_clone(), up.try_clone()) {
                std::thread::spawn(move || pipe(a, up));
                std::thread::spawn(move || pipe(b, conn));
            }
        }
    });
    let mut last = String::new();
    wait_for(
        "/readyz 200 once the API server is reachable",
        Duration::from_secs(60),
        || {
            let (code, body) = probe(&ns, "/readyz")?;
            last = body;
            Ok(code == 200)
        },
    )
    .with_context(|| {
        format!(
            "last /readyz: {last}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;
    agent.check_alive()?;
    agent.kill();
    log_line("agent live while the API server was unreachable, ready once it came");
    Ok(())
}
