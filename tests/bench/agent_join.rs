//! `agent-join-bench`: time from a new node appearing to every node's FIB
//! holding its block, in a lab of N nodes (real agents, file datastore).
//!
//!   cargo run --release -p starling-tests --bin agent-join-bench -- --nodes 10 --reps 3
//!
//! Figures per repetition: the whole join (namespace, model entry, agent
//! start, first pod, every other node's kernel routing to the new block),
//! the agent's start alone, and from the block's claim (the first pod's ADD
//! returning) to every other node's kernel holding the route.

use anyhow::{Result, bail};
use clap::Parser;
use starling_agent::lab::Topology;
use starling_tests::bench_line;
use starling_tests::cluster::{Cluster, options_with_bins};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, value_enum, default_value_t = Topology::Mesh)]
    topology: Topology,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut c = Cluster::up(options_with_bins("jb", a.nodes, a.topology))?;
    c.converged(Duration::from_secs(120))?;
    eprintln!(
        "# agent-join: {} nodes {:?}; {} cpus",
        a.nodes,
        a.topology,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for r in 0..a.reps {
        let i = a.nodes + 1 + r;
        let t = Instant::now();
        let name = c.lab.add_node(i)?;
        let started = t.elapsed();
        c.lab.add_pod(&name, "pod1")?;
        let block = c.status(&name)?.blocks[0].to_string();
        let t_pod = Instant::now();
        let others: Vec<String> = c
            .lab
            .nodes
            .iter()
            .filter(|n| n.name != name)
            .map(|n| n.name.clone())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        for n in &others {
            while !c.kernel_routes(n)?.contains(&block) {
                if Instant::now() > deadline {
                    bail!("{n}: no route to {block} after 60 s");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        bench_line(
            "agent-join",
            "starling",
            "node_added_to_all_fibs",
            t.elapsed().as_secs_f64() * 1000.0,
            "ms",
        );
        bench_line(
            "agent-join",
            "starling",
            "agent_start",
            started.as_secs_f64() * 1000.0,
            "ms",
        );
        bench_line(
            "agent-join",
            "starling",
            "block_claimed_to_all_fibs",
            t_pod.elapsed().as_secs_f64() * 1000.0,
            "ms",
        );
    }
    Ok(())
}
