#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine, as root: install what is missing
# (Debian packages, and Rust through rustup when there is no cargo), build,
# then bring up a 3-node lab (real agents, pods and BGP in network
# namespaces), print its status and its pod-to-pod ping matrix. Exits 0 only
# when every pod reaches every other. The lab stays up for you to explore:
# `starlingctl lab status|check|down`, `starlingctl status --socket ...`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
start=$(date +%s)
bash "$here/scripts/setup.sh"
if ! command -v cargo >/dev/null 2>&1; then
  echo "quickstart: no cargo; installing Rust with rustup (stable, minimal profile)"
  command -v curl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq curl ca-certificates >/dev/null; }
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
  export PATH="$HOME/.cargo/bin:$PATH"
fi
echo "quickstart: building (release)"
cargo build --release --manifest-path "$here/Cargo.toml" -p starling-agent -p starling-cni --bins
target="${CARGO_TARGET_DIR:-$here/target}"
ctl="$target/release/starlingctl"
"$ctl" lab up --nodes 3 --topology mesh --pods-per-node 2
"$ctl" lab status
"$ctl" lab check
echo "quickstart: done in $(( $(date +%s) - start )) s; the lab is up (remove it with: $ctl lab down)"
