#!/bin/bash
# CNI ADD/DEL latency, p50 and p99: `starling` (with its agent) against the
# reference `bridge` + `host-local` chain (Debian containernetworking-plugins),
# same run, same load: 500 pods one after another, then 100 at once.
#
#   tests/bench/cni.sh
#   SEQUENTIAL=100 CONCURRENT=20 tests/bench/cni.sh
#   TMPFS=/dev/shm tests/bench/cni.sh   # also "starling-tmpfs": agent state on tmpfs
#
# Prints JSON lines {"bench":"cni","impl":"starling"|"bridge-host-local",
# "metric":"add_p99_sequential500",...,"unit":"ms"}.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p starling-cni -p starling-agent -p starling-tests \
    --bin starling --bin starling-agent --bin cni-bench
T=$CARGO_TARGET_DIR/release
exec "$T/cni-bench" --plugin "$T/starling" --agent "$T/starling-agent" \
    --ref-dir /usr/lib/cni \
    --sequential "${SEQUENTIAL:-500}" --concurrent "${CONCURRENT:-100}" \
    ${TMPFS:+--tmpfs "$TMPFS"}
