#!/bin/bash
# Time from process start to Established against a BIRD peer: starling-bgpd
# and a second BIRD (the reference) in the same run, alternating, each
# against a freshly started BIRD in network namespaces.
#
#   tests/bench/bgp-establish.sh          # 10 repetitions each
#   REPS=30 tests/bench/bgp-establish.sh
#
# Prints JSON lines {"bench":"bgp-establish","impl":"starling"|"bird",...}.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${REPS:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p starling-bgpd
cargo build --release -q -p starling-tests --bin bgp-establish-bench
exec "$CARGO_TARGET_DIR/release/bgp-establish-bench" --reps "$REPS" \
    --bgpd "$CARGO_TARGET_DIR/release/starling-bgpd"
