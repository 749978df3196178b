//! The node agent, driven the way an operator drives it: `starlingctl`
//! generating the CRDs and checking a file datastore.

use anyhow::{Context, Result, ensure};
use starling_tests::{TempDir, bin};
use std::path::Path;
use std::process::Command;

const REGENERATE: &str =
    "cargo run -p starling-agent --bin starlingctl -- crds > manifests/crds.yaml";

/// manifests/crds.yaml is exactly what the Rust types generate.
#[test]
fn manifests_are_current() -> Result<()> {
    let out = Command::new(bin("starlingctl"))
        .arg("crds")
        .output()
        .context("running starlingctl crds")?;
    ensure!(
        out.status.success(),
        "starlingctl crds failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout)?;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds.yaml");
    let committed = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: missing; generate it with `{REGENERATE}`",
            path.display()
        )
    })?;
    ensure!(
        committed == generated,
        "manifests/crds.yaml is stale (the model's Rust types changed): regenerate it with `{REGENERATE}`"
    );
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
