#!/bin/bash
# CNI ADD/DEL latency through a real kube-apiserver (issue 18), p50 and p99,
# in one run: plain pods (the agent still reads the pod's and namespace's
# metadata), a namespace annotation, a pod annotation, and borrowing (node2's
# only pool is one block node1 holds). Two lab agents with the Kubernetes
# datastore; the real `starling` plugin with the runtime's CNI_ARGS.
# Needs the control plane built by tests/k8s/control-plane.sh build.
#
#   tests/bench/cni-k8s.sh
#   PODS=100 tests/bench/cni-k8s.sh      # pods per case, 1-120 (default 50)
#
# Prints JSON lines {"bench":"cni-k8s","impl":"starling",
# "metric":"add_p99_plain"|..._ns_annotation|..._pod_annotation|..._borrow,
# "value":..,"unit":"ms"} (also del_p50_*, del_p99_*).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q --bins
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if ! STARLING_BENCH_PODS=${PODS:-50} cargo test --release -q -p starling-tests --test k8s -- \
    --ignored --exact add_bench::add_latency_plain_annotated_and_borrowing \
    --nocapture --test-threads 1 >"$out" 2>&1; then
    cat "$out" >&2
    exit 1
fi
grep '^{"bench"' "$out"
