//! The whole lab inside a QEMU VM booted with Debian's kernel, for what
//! this machine's kernel cannot do (it has no `ipip` module): `lab up
//! --encapsulation ipip` and `--encapsulation cross-subnet --underlay
//! two-subnets`, with the real agents, CNI plugin, `lab check` and tunl0's
//! counters (tests/vm/lab-guest.sh run through tests/vm/ipip-vm.sh).

use super::*;
use starling_tests::{TempDir, require_vm_tools};
use std::process::Stdio;

/// The checks tests/vm/lab-guest.sh prints as `LAB_VM <check>: ok`.
const GUEST_CHECKS: &[&str] = &[
    "up_ipip",
    "ipip_check_exit_0",
    "ipip_all_pairs",
    "ipip_outside",
    "ipip_route_via_tunl0",
    "ipip_pod_ping",
    "ipip_tunl0_tx_counted",
    "ipip_tunl0_rx_counted",
    "down_ipip",
    "up_cross_subnet",
    "cs_check_exit_0",
    "cs_all_pairs",
    "cs_same_subnet_plain",
    "cs_other_subnet_tunl0",
    "cs_ping_same_subnet",
    "cs_ping_other_subnet",
    "cs_same_subnet_not_encapsulated",
    "cs_other_subnet_encapsulated",
    "cs_router_no_plain_pod_packet",
    "cs_router_forwarded_ipip",
    "down_cross_subnet",
];

/// `lab up --encapsulation ipip` and `cross-subnet` run whole inside the VM:
/// agents with their BGP mesh, pods through the CNI plugin, `lab check`
/// (every pair answers; with ipip the pods reach the outside host through
/// the nodes' nftables masquerade), routes `via <node> dev tunl0 onlink`,
/// pod pings counted on tunl0 (sent on one node, received on the other);
/// with CrossSubnet on two subnets, same-subnet traffic plain (tunl0 flat)
/// and cross-subnet traffic through tunl0, the router forwarding IPIP and no
/// plain pod packet.
#[test]
fn ipip_lab_runs_whole_in_a_vm() -> Result<()> {
    require_vm_tools(&[
        ("strip", "binutils"),
        ("nft", "nftables"),
        ("ping", "iputils-ping"),
    ])?;
    let vm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vm");
    let work = TempDir::new("labvm")?;
    let bins = [bin("starling-agent"), bin("starlingctl"), bin("starling")];
    let mut extra: Vec<String> = bins.iter().map(|b| b.display().to_string()).collect();
    for tool in ["nft", "ping"] {
        extra.push(
            starling_tests::run("sh", &["-c", &format!("command -v {tool}")])?
                .trim()
                .into(),
        );
    }
    extra.push(vm.join("lab-guest.sh").display().to_string());
    let out = Command::new("bash")
        .arg(vm.join("ipip-vm.sh"))
        .env("W", &work.path)
        .env("EXTRA_BINS", extra.join(" "))
        .env("EXTRA_MODS", "crc32c_generic bridge nft_chain_nat nft_masq")
        .env("GUEST_CMD", "sh /bin/lab-guest.sh")
        .env("MEM", "1024")
        .env("TIMEOUT", "900")
        .stdin(Stdio::null())
        .output()?;
    let console = String::from_utf8_lossy(&out.stdout);
    let tail = || {
        let lines: Vec<&str> = console.lines().collect();
        format!(
            "{}\n{}",
            lines[lines.len().saturating_sub(120)..].join("\n"),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    for line in console.lines().filter(|l| l.contains("LAB_VM")) {
        println!("{line}");
    }
    for check in GUEST_CHECKS {
        ensure!(
            console.contains(&format!("LAB_VM {check}: ok")),
            "VM check {check} did not pass:\n{}",
            tail()
        );
    }
    ensure!(
        console.contains("GUEST_CMD_RC=0") && out.status.success(),
        "VM run failed:\n{}",
        tail()
    );
    Ok(())
}
