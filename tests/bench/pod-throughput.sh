#!/bin/bash
# Pod-to-pod TCP throughput in the lab, plain (host-gw) against VXLAN:
# a 2-node lab per mode, iperf3 (Debian package iperf3) from node1's pod to
# node2's pod, DURATION seconds, REPEAT runs each.
#
#   tests/bench/pod-throughput.sh
#   DURATION=5 REPEAT=3 MODES="none vxlan vxlan:two-subnets" tests/bench/pod-throughput.sh
#
# A mode is ENCAPSULATION[:UNDERLAY] as `starlingctl lab up` takes them
# (vxlan:two-subnets needs 3 nodes, node1 -> node2 crosses the router).
# Prints JSON lines {"bench":"pod-throughput","impl":"starling-<mode>",
# "metric":"tcp_throughput","value":...,"unit":"Gbit/s"} and one per run.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v iperf3 >/dev/null || { echo "iperf3 missing (apt-get install iperf3)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p starling-cni -p starling-agent --bin starling --bin starling-agent --bin starlingctl
T=$CARGO_TARGET_DIR/release
DIR=$(mktemp -d /tmp/starling-bench-tp.XXXXXX)
NAME=tp$$
cleanup() { "$T/starlingctl" lab down --name "$NAME" --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT

for mode in ${MODES:-none vxlan vxlan:two-subnets}; do
    encap=${mode%%:*}
    underlay=flat
    [[ $mode == *:* ]] && underlay=${mode#*:}
    nodes=2
    [[ $underlay == two-subnets ]] && nodes=3
    "$T/starlingctl" lab up --name "$NAME" --dir "$DIR" --nodes "$nodes" --pods-per-node 1 \
        --encapsulation "$encap" --underlay "$underlay" >/dev/null 2>"$DIR/up.log" \
        || { cat "$DIR/up.log" >&2; exit 1; }
    read -r src dst < <(python3 -c '
import json,sys
lab=json.load(open(sys.argv[1]))
pods={p["node"]:p for p in lab["pods"]}
print(pods["node1"]["netns"], pods["node2"]["ips"][0])' "$DIR/$NAME/lab.json")
    dstns=${src/node1-/node2-}
    for run in $(seq "${REPEAT:-3}"); do
        ip netns exec "$dstns" iperf3 -s -1 -D
        out=""
        for _ in $(seq 50); do
            if out=$(ip netns exec "$src" iperf3 -c "$dst" -t "${DURATION:-5}" -J 2>/dev/null); then break; fi
            out=""; sleep 0.1
        done
        [[ -n $out ]] || { echo "iperf3 to $dst never connected" >&2; exit 1; }
        python3 -c '
import json,sys
r=json.loads(sys.stdin.read())
g=r["end"]["sum_received"]["bits_per_second"]/1e9
print(json.dumps({"bench":"pod-throughput","impl":"starling-"+sys.argv[1],"metric":"tcp_throughput_run"+sys.argv[2],"value":round(g,2),"unit":"Gbit/s"}))' \
            "${mode/:/-}" "$run" <<<"$out" | tee -a "$DIR/runs.jsonl"
    done
    python3 -c '
import json,sys,statistics
v=[json.loads(l)["value"] for l in open(sys.argv[2]) if json.loads(l)["impl"]=="starling-"+sys.argv[1]]
print(json.dumps({"bench":"pod-throughput","impl":"starling-"+sys.argv[1],"metric":"tcp_throughput","value":round(statistics.median(v),2),"unit":"Gbit/s"}))' \
        "${mode/:/-}" "$DIR/runs.jsonl"
    "$T/starlingctl" lab down --name "$NAME" --dir "$DIR" >/dev/null 2>&1
done
