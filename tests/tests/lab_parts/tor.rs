//! `--tor frr`: FRR as the top-of-rack router, with TCP-MD5, learning every
//! node's block with the node as next hop, also of a node added later.

use super::*;
use starling_agent::lab::Tor;
use starling_tests::require_tool;

fn tor_has(c: &Cluster, block: &str, via: &str) -> Result<bool> {
    let table = c.lab.tor_routes()?;
    Ok(table.lines().any(|l| l.contains(block) && l.contains(via)))
}

/// Lab `ns` of two nodes with `tor` (TCP-MD5) as the router, a third node
/// and a pod added: the router learns every node's block with the node as
/// next hop (and, with `session_shown`, each node shows its session with
/// it), and every pod pair answers.
fn tor_learns_every_block(ns: &str, tor: Tor, router: &str, session_shown: bool) -> Result<()> {
    let mut o = options(ns, 2, Topology::Mesh);
    o.tor = Some(tor);
    o.tor_password = Some("s3cret-tor".into());
    let mut c = Cluster::up(o)?;
    c.converged(CONVERGE)?;
    let name = c.lab.add_node(3)?;
    c.lab.add_pod(&name, "pod1")?;
    c.converged(CONVERGE)?;
    for n in ["node1", "node2", "node3"] {
        let addr = c.lab.node(n)?.ipv4.addr().to_string();
        let block = c.status(n)?.blocks[0].to_string();
        wait_for(
            &format!("{router} route {block} via {addr}"),
            CONVERGE,
            || tor_has(&c, &block, &addr),
        )
        .with_context(|| c.lab.tor_routes().unwrap_or_default())?;
        if session_shown {
            ensure!(
                c.established(n)?
                    .iter()
                    .any(|p| p.to_string() == "192.0.2.254"),
                "{n}: no session with the {router} router"
            );
        }
    }
    c.all_pairs_answer()?;
    Ok(())
}

#[test]
fn frr_top_of_rack_learns_every_block() -> Result<()> {
    require_tool("/usr/lib/frr/bgpd", "frr");
    require_tool("vtysh", "frr");
    tor_learns_every_block("tfrr", Tor::Frr, "FRR", true)
}

#[test]
fn gobgp_top_of_rack_learns_every_block() -> Result<()> {
    require_tool("gobgpd", "gobgpd");
    require_tool("gobgp", "gobgpd");
    tor_learns_every_block("tgob", Tor::Gobgp, "GoBGP", false)
}
