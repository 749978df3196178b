//! `starlingctl`: the operator's command line for Starling.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use starling_agent::model::{crd, file};
use starling_agent::node::control;
use starling_agent::{lab, manifests};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "starlingctl", version, about = "Operate a Starling cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions of the model (manifests/crds.yaml
    /// is this output: `starlingctl crds > manifests/crds.yaml`).
    Crds,
    /// Write the manifests users apply (crds.yaml, rbac.yaml,
    /// daemonset.yaml) with the DaemonSet running IMAGE; the repository's
    /// manifests/ is `starlingctl manifests --out manifests`.
    Manifests {
        /// The Starling image the DaemonSet runs (scripts/image.sh builds it).
        #[arg(long, default_value = manifests::DEFAULT_IMAGE)]
        image: String,
        /// Directory to write the files into (created if missing); without
        /// it, one YAML stream on stdout, in the order to apply.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The conflist's cniVersion (install-cni's `--cni-version`; 1.0.0
        /// when absent). 1.1.0 for runtimes that speak it, such as
        /// containerd 2.x, which then calls the plugin's STATUS.
        #[arg(long)]
        cni_version: Option<String>,
    },
    /// Check a YAML stream (Starling's kinds, or Calico YAML as calicoctl
    /// or kubectl export it) as the agent would load it. Problems exit 1;
    /// warnings (fields Starling accepts but does not act on) are printed
    /// and exit 0.
    Validate {
        /// The YAML file (several `---` separated documents, Lists).
        file: PathBuf,
        /// Check for the Kubernetes datastore (password secretKeyRefs stay
        /// references) rather than the file datastore.
        #[arg(long, value_enum, default_value_t = Datastore::File)]
        datastore: Datastore,
    },
    /// Turn Calico YAML (`calicoctl get -o yaml`, `kubectl get -o yaml` of
    /// Calico's CRDs or Nodes) into Starling's kinds for the Kubernetes
    /// datastore; what is not carried over is printed as warnings.
    ImportCalico {
        /// The Calico YAML file.
        file: PathBuf,
        /// Write the result here instead of stdout.
        #[arg(short = 'o', long)]
        out: Option<PathBuf>,
    },
    /// The node's BGP sessions, as `calicoctl node status` shows them.
    Status {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// The routes in the speaker's RIB and the kernel routes the agent wants.
    Routes {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// IPAM on this node.
    Ipam {
        #[command(subcommand)]
        command: IpamCommand,
    },
    /// A cluster of network namespaces on this machine, with real agents,
    /// pods and an optional top-of-rack router.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab (removing an earlier one of the same name first).
    Up {
        #[command(flatten)]
        options: lab::LabOptions,
    },
    /// Sessions, routes and pods per node.
    Status {
        #[command(flatten)]
        which: LabWhich,
    },
    /// Ping every pod from every pod; exit 0 only when every pair answers.
    Check {
        #[command(flatten)]
        which: LabWhich,
    },
    /// Remove everything the lab made, also after a crash.
    Down {
        #[command(flatten)]
        which: LabWhich,
    },
}

#[derive(clap::Args)]
struct LabWhich {
    #[arg(long, default_value = "lab")]
    name: String,
    #[arg(long, default_value = lab::DEFAULT_DIR)]
    dir: PathBuf,
}

#[derive(Subcommand)]
enum IpamCommand {
    /// Pools, blocks and addresses in use on this node.
    Show {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Look for leaked addresses (their pod or container is gone), orphaned
    /// blocks (their node is gone), duplicates, strays and addresses inside
    /// reservations. This node's addresses, every node's blocks. Exits 1
    /// when anything is found.
    Check {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Release one address of this node (with the other addresses of its
    /// attachment). Refused while its pod exists in the API server (or its
    /// container's network namespace exists) unless --force.
    Release {
        #[command(flatten)]
        agent: AgentArgs,
        /// The address to release.
        #[arg(long)]
        ip: std::net::IpAddr,
        /// Release even though its owner looks alive (or cannot be checked).
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// The agent's control socket.
    #[arg(long, default_value = control::DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Datastore {
    File,
    Kubernetes,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<ExitCode> {
    let mut out = serde_json::to_string_pretty(v)?;
    out.push('\n');
    std::io::stdout().lock().write_all(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// Columns padded to their widest cell.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("starlingctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Crds => {
            let yaml = crd::crds_yaml()?;
            std::io::stdout().lock().write_all(yaml.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Manifests {
            image,
            out,
            cni_version,
        } => write_manifests(&image, out.as_deref(), cni_version.as_deref()),
        Command::Validate {
            file: path,
            datastore,
        } => validate(&path, datastore),
        Command::ImportCalico { file: path, out } => import_calico(&path, out.as_deref()),
        Command::Lab { command } => lab_command(command),
        Command::Status { agent } => status(&agent),
        Command::Routes { agent } => routes(&agent),
        Command::Ipam { command } => match command {
            IpamCommand::Show { agent } => ipam_show(&agent),
            IpamCommand::Check { agent } => ipam_check(&agent),
            IpamCommand::Release { agent, ip, force } => ipam_release(&agent, ip, force),
        },
    }
}

/// `starlingctl manifests`.
fn write_manifests(image: &str, out: Option<&Path>, cni_version: Option<&str>) -> Result<ExitCode> {
    let files = manifests::render(image, cni_version)?;
    let Some(dir) = out else {
        let stream: Vec<&str> = files.iter().map(|m| m.text.as_str()).collect();
        std::io::stdout()
            .lock()
            .write_all(stream.join("---\n").as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for m in &files {
        let path = dir.join(m.file);
        std::fs::write(&path, &m.text).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_warnings(warnings: &[file::Problem]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// `starlingctl validate FILE`.
fn validate(path: &Path, datastore: Datastore) -> Result<ExitCode> {
    let mode = match datastore {
        Datastore::File => file::Mode::File,
        Datastore::Kubernetes => file::Mode::Kubernetes,
    };
    let (result, warnings) = file::check_file(path, mode);
    print_warnings(&warnings);
    match result {
        Ok(l) => {
            let s = &l.snapshot;
            println!(
                "{}: ok: {} IPPool, {} BGPConfiguration, {} BGPPeer, {} StarlingNode, {} BlockAffinity{}{}",
                path.display(),
                s.pools.len(),
                usize::from(s.bgp_configuration.is_some()),
                s.peers.len(),
                s.nodes.len(),
                s.affinities.len(),
                match s.filters.len() {
                    0 => String::new(),
                    n => format!(", {n} BGPFilter"),
                },
                match warnings.len() {
                    0 => String::new(),
                    n => format!("; {n} warning(s)"),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!("{} problem(s); nothing was loaded", e.problems.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `starlingctl import-calico FILE [-o OUT]`.
fn import_calico(path: &Path, out: Option<&Path>) -> Result<ExitCode> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (result, warnings) = file::import_str(path, &text);
    print_warnings(&warnings);
    match result {
        Ok(yaml) => {
            match out {
                Some(o) => {
                    let tmp = o.with_extension("tmp");
                    std::fs::write(&tmp, &yaml)
                        .with_context(|| format!("writing {}", tmp.display()))?;
                    std::fs::rename(&tmp, o).with_context(|| format!("writing {}", o.display()))?;
                    eprintln!(
                        "{}: written; {} warning(s) (what was not carried over is above)",
                        o.display(),
                        warnings.len()
                    );
                }
                None => std::io::stdout().lock().write_all(yaml.as_bytes())?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!("{} problem(s); nothing was imported", e.problems.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `starlingctl status`.
fn status(agent: &AgentArgs) -> Result<ExitCode> {
    let st = control::status(&agent.socket)?;
    if agent.output == Output::Json {
        return print_json(&st);
    }
    let addrs: Vec<String> = st.addresses.iter().map(|a| a.to_string()).collect();
    println!("Starling agent {} on node {}", st.version, st.node);
    println!(
        "  addresses {} (from {}), AS {}, router ID {}{}",
        addrs.join(", "),
        st.address_source,
        st.asn,
        st.router_id.map_or("-".into(), |r| r.to_string()),
        st.cluster_id
            .map_or(String::new(), |c| format!(", route reflector cluster {c}"))
    );
    println!(
        "  datastore {}{}; other nodes' blocks from {}",
        st.datastore,
        st.datastore_error
            .as_deref()
            .map_or(String::new(), |e| format!(" (newest version refused: {e})")),
        if st.route_source == "datastore" {
            "the datastore (BGP off)"
        } else {
            "BGP"
        }
    );
    println!(
        "  FIB: {} routes of ours installed, {} unreachable, {} conflicts, {} errors; \
         {} blocks, {} pods; initial sync {}",
        st.fib.installed,
        st.fib.unreachable.len(),
        st.fib.conflicts.len(),
        st.fib.errors.len(),
        st.blocks.len(),
        st.pods,
        if st.synced {
            "done"
        } else {
            "waiting for End-of-RIB"
        }
    );
    println!("  {}", nat_line(&st.nat));
    if !st.services.is_empty() {
        let list: Vec<String> = st.services.iter().map(|p| p.to_string()).collect();
        println!("  Service prefixes advertised: {}", list.join(", "));
    }
    println!();
    println!("IPv4 and IPv6 BGP status");
    print!(
        "{}",
        starling_bgp::control::session_table(&control::with_plan_types(&st.sessions))
    );
    for d in &st.draining {
        println!("draining {d}: kept until its routes are learned another way");
    }
    for w in &st.warnings {
        println!("warning: {w}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `starlingctl routes`.
fn routes(agent: &AgentArgs) -> Result<ExitCode> {
    let r = control::routes(&agent.socket)?;
    if agent.output == Output::Json {
        return print_json(&r);
    }
    let mut rows = vec![vec![
        "PREFIX".to_string(),
        "FROM".into(),
        "NEXT HOP".into(),
        "AS PATH".into(),
        "BEST".into(),
    ]];
    for e in &r.bgp {
        rows.push(vec![
            e.prefix.to_string(),
            e.peer.clone(),
            e.next_hop.map_or("-".into(), |h| h.to_string()),
            e.as_path
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            match (e.best, e.stale) {
                (true, false) => "*".into(),
                (true, true) => "* stale".into(),
                (false, true) => "stale".into(),
                (false, false) => String::new(),
            },
        ]);
    }
    println!("BGP");
    print!("{}", table(&rows));
    println!();
    println!("Kernel (desired)");
    let mut rows = vec![vec!["DESTINATION".to_string(), "TARGET".into()]];
    for route in &r.fib {
        let target = match &route.target {
            starling_agent::fib::RouteTarget::Blackhole => "blackhole".to_string(),
            starling_agent::fib::RouteTarget::Device(d) => format!("dev {d}"),
            starling_agent::fib::RouteTarget::Via(hops) => hops
                .iter()
                .map(|h| format!("via {} ({})", h.gateway, h.encap))
                .collect::<Vec<_>>()
                .join(", "),
        };
        rows.push(vec![route.dst.to_string(), target]);
    }
    print!("{}", table(&rows));
    if !r.refused.is_empty() {
        println!();
        println!("Refused (learned, kept out of the kernel)");
        let mut rows = vec![vec!["PREFIX".to_string(), "REASON".into()]];
        for x in &r.refused {
            rows.push(vec![
                x.prefix.to_string(),
                x.reason.label().replace('_', " "),
            ]);
        }
        print!("{}", table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// `starlingctl ipam show`.
fn ipam_show(agent: &AgentArgs) -> Result<ExitCode> {
    let r = control::ipam(&agent.socket)?;
    if agent.output == Output::Json {
        return print_json(&r);
    }
    println!("IPAM on node {}", r.node);
    let mut rows = vec![vec![
        "IP POOL".to_string(),
        "BLOCK SIZE".into(),
        "BLOCKS HERE".into(),
        "IPS HERE".into(),
        "IPS IN USE".into(),
        "IPS FREE".into(),
    ]];
    for p in &r.pools {
        rows.push(vec![
            p.cidr.to_string(),
            format!("/{}", p.block_size),
            p.blocks.to_string(),
            p.addresses.to_string(),
            p.in_use.to_string(),
            p.addresses.saturating_sub(p.in_use as u128).to_string(),
        ]);
    }
    print!("{}", table(&rows));
    println!();
    let mut rows = vec![vec!["BLOCK".to_string(), "IPS".into(), "IN USE".into()]];
    for b in &r.blocks {
        rows.push(vec![
            b.cidr.to_string(),
            b.addresses.to_string(),
            b.in_use.to_string(),
        ]);
    }
    print!("{}", table(&rows));
    println!();
    let mut rows = vec![vec![
        "POD".to_string(),
        "ADDRESS".into(),
        "HOST INTERFACE".into(),
    ]];
    for p in &r.pods {
        rows.push(vec![
            p.pod.as_ref().map_or("-".into(), ToString::to_string),
            p.destination.to_string(),
            p.device.clone(),
        ]);
    }
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

/// `starlingctl ipam check`: exit 1 when a problem is found.
fn ipam_check(agent: &AgentArgs) -> Result<ExitCode> {
    let r = control::ipam_check(&agent.socket)?;
    let code = if r.problems() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if agent.output == Output::Json {
        print_json(&r)?;
        return Ok(code);
    }
    println!(
        "IPAM check on node {} ({}): {} addresses of this node, {} block claims of the cluster, {} borrowing marks in {} records",
        r.node, r.datastore, r.addresses, r.blocks, r.marks, r.records
    );
    let sections = [
        ("Leaked addresses (owner gone)", &r.leaks),
        ("Duplicates (inside another node's block)", &r.duplicates),
        ("Strays (in no block this node holds)", &r.strays),
        ("Inside IP reservations", &r.reserved),
        ("Not checked", &r.unchecked),
    ];
    for (title, list) in sections {
        if list.is_empty() {
            continue;
        }
        println!();
        println!("{title}");
        let mut rows = vec![vec![
            "ADDRESS".to_string(),
            "POD".into(),
            "ATTACHMENT".into(),
            "WHY".into(),
        ]];
        for f in list {
            rows.push(vec![
                f.address.to_string(),
                f.pod.clone().unwrap_or_else(|| "-".into()),
                f.attachment.clone(),
                f.reason.clone(),
            ]);
        }
        print!("{}", table(&rows));
    }
    let marks = [
        (
            "Leaked borrowed addresses (this node's marks, pod gone)",
            &r.borrowed_leaks,
        ),
        (
            "Orphaned borrowing marks (their node is not in the cluster)",
            &r.borrowed_orphans,
        ),
        ("Duplicate borrowing marks", &r.borrowed_duplicates),
        (
            "Borrowing marks inside IP reservations",
            &r.borrowed_reserved,
        ),
        ("Borrowing marks not checked", &r.borrowed_unchecked),
    ];
    for (title, list) in marks {
        if list.is_empty() {
            continue;
        }
        println!();
        println!("{title}");
        let mut rows = vec![
            ["BLOCK", "ADDRESS", "NODE", "ATTACHMENT", "POD", "WHY"]
                .map(String::from)
                .to_vec(),
        ];
        for f in list {
            rows.push(vec![
                f.block.to_string(),
                f.address.to_string(),
                f.node.clone(),
                f.attachment.clone(),
                f.pod.clone().unwrap_or_else(|| "-".into()),
                f.reason.clone(),
            ]);
        }
        print!("{}", table(&rows));
    }
    if !r.orphans.is_empty() {
        println!();
        println!("Orphaned blocks (their node is not in the cluster)");
        let mut rows = vec![vec!["BLOCK".to_string(), "NODE".into()]];
        for o in &r.orphans {
            rows.push(vec![o.block.to_string(), o.node.clone()]);
        }
        print!("{}", table(&rows));
    }
    if !r.overlapping_blocks.is_empty() {
        println!();
        println!("Overlapping block claims");
        let mut rows = vec![vec!["BLOCKS".to_string(), "NODES".into()]];
        for o in &r.overlapping_blocks {
            let b: Vec<String> = o.blocks.iter().map(ToString::to_string).collect();
            rows.push(vec![b.join(" and "), o.nodes.join(" and ")]);
        }
        print!("{}", table(&rows));
    }
    println!();
    match r.problems() {
        0 => println!("No problems found."),
        n => println!("{n} problem(s) found."),
    }
    Ok(code)
}

/// `starlingctl ipam release`.
fn ipam_release(agent: &AgentArgs, ip: std::net::IpAddr, force: bool) -> Result<ExitCode> {
    let r = control::ipam_release(&agent.socket, ip, force)?;
    if agent.output == Output::Json {
        return print_json(&r);
    }
    if let Some(m) = &r.mark {
        println!(
            "released {} on node {}: cleared the mark of node {} (attachment {}) in the borrowing record of block {}{}: {}",
            m.address,
            r.node,
            m.node,
            m.attachment,
            m.block,
            if r.forced { ", forced" } else { "" },
            r.owner
        );
    }
    if let Some(a) = &r.released {
        let ips: Vec<String> = a.ips.iter().map(|n| n.addr().to_string()).collect();
        println!(
            "released {} on node {} (attachment {}{}){}: {}",
            ips.join(", "),
            r.node,
            a.key,
            a.pod
                .as_ref()
                .map_or(String::new(), |p| format!(", pod {p}")),
            if r.forced { ", forced" } else { "" },
            r.owner
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn say(msg: &str) {
    eprintln!("lab: {msg}");
}

fn lab_command(cmd: LabCommand) -> Result<ExitCode> {
    match cmd {
        LabCommand::Up { options } => {
            let (name, dir) = (options.name.clone(), options.dir.clone());
            match lab::up(options, &mut say) {
                Ok(l) => {
                    say(&format!(
                        "lab {} is up: {} nodes, {} pods; try `starlingctl lab status` and `starlingctl lab check`",
                        l.name,
                        l.nodes.len(),
                        l.pods.len()
                    ));
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("lab: up failed: {e:#}");
                    eprintln!(
                        "lab: the partial lab is left for inspection (logs in {}); remove it with `starlingctl lab down --name {name}`",
                        dir.join(&name).display()
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        LabCommand::Status { which } => {
            let l = lab::LabState::load(&which.dir, &which.name)?;
            for n in &l.nodes {
                println!("== {} ({}, {})", n.name, n.netns, n.ipv4);
                match l.status_of(&n.name) {
                    Ok(st) => {
                        print!(
                            "{}",
                            starling_bgp::control::session_table(&control::with_plan_types(
                                &st.sessions
                            ))
                        );
                        let blocks: Vec<String> = st.blocks.iter().map(|b| b.to_string()).collect();
                        println!(
                            "blocks {}; {} routes of ours in the kernel; initial sync {}",
                            blocks.join(", "),
                            st.fib.installed,
                            if st.synced { "done" } else { "waiting" }
                        );
                        println!("{}", nat_line(&st.nat));
                    }
                    Err(e) => println!("agent not answering: {e:#}"),
                }
                for p in l.pods.iter().filter(|p| p.node == n.name) {
                    let ips: Vec<String> = p.ips.iter().map(|i| i.to_string()).collect();
                    println!("pod {} ({}) {}", p.name, p.netns, ips.join(", "));
                }
                println!();
            }
            if let Some(t) = &l.tor {
                println!("== top-of-rack {:?} ({}, {})", t.kind, t.netns, t.ipv4);
                match l.tor_routes() {
                    Ok(o) => print!("{o}"),
                    Err(e) => println!("{e:#}"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Check { which } => {
            let l = lab::LabState::load(&which.dir, &which.name)?;
            let results = l.check();
            print!("{}", lab::matrix(&l, &results));
            let failed: Vec<_> = results.iter().filter(|r| !r.3).collect();
            for f in &failed {
                println!("no answer: {} -> {} ({})", f.0, f.1, f.2);
            }
            println!(
                "{} of {} pairs answer",
                results.len() - failed.len(),
                results.len()
            );
            // Pods to the outside host: through the node's masquerade.
            let outside = l.check_outside();
            for (pod, addr, ok) in &outside {
                println!(
                    "{pod} -> outside {addr}: {}",
                    if *ok { "ok" } else { "no answer" }
                );
            }
            let out_failed = outside.iter().filter(|r| !r.2).count();
            if !outside.is_empty() {
                println!(
                    "{} of {} pods reach the outside host{}",
                    outside.len() - out_failed,
                    outside.len(),
                    if l.nat_outgoing {
                        ""
                    } else {
                        " (natOutgoing is off: no answer is expected)"
                    }
                );
            }
            let out_ok = out_failed == 0 || !l.nat_outgoing;
            Ok(if failed.is_empty() && out_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCommand::Down { which } => {
            lab::down(&which.dir, &which.name, &mut say)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// natOutgoing in one line: the table in place, absent, or why not.
fn nat_line(nat: &starling_agent::nat::NatStatus) -> String {
    match (&nat.error, nat.generation, nat.table_present) {
        (Some(e), _, _) => format!("natOutgoing: NOT APPLIED: {e}"),
        (None, 0, _) => "natOutgoing: not yet applied".into(),
        (None, _, true) => format!(
            "natOutgoing: nftables table {} in place ({} writes, {} passes found it right)",
            starling_agent::nat::TABLE,
            nat.writes,
            nat.adopted
        ),
        (None, _, false) => "natOutgoing: no pool has it (no table)".into(),
    }
}
