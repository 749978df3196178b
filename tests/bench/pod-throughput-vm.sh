#!/bin/bash
# Pod-to-pod TCP throughput plain vs IPIP vs VXLAN, all three in one QEMU VM (tests/vm/ipip-vm.sh:
# Debian's kernel under TCG, because this machine's kernel has no ipip module): a 2-node lab
# per mode inside the guest, iperf3 from node1's pod to node2's pod (tests/vm/throughput-guest.sh).
# TCG emulates every instruction, so the figures measure the emulator: only the ratios between
# the modes mean anything.
#
#   tests/bench/pod-throughput-vm.sh
#   DURATION=5 REPEAT=3 MODES="none ipip vxlan" tests/bench/pod-throughput-vm.sh
#
# Prints JSON lines {"bench":"pod-throughput-vm","impl":"starling-<mode>","metric":
# "tcp_throughput_runN" | "tcp_throughput" (median),"value":...,"unit":"Mbit/s"}.
set -euo pipefail
cd "$(dirname "$0")/../.."
for t in iperf3 qemu-system-x86_64 nft ping strip; do
  command -v $t >/dev/null || { echo "$t missing (see tests/vm/ipip-vm.sh for the packages)" >&2; exit 1; }
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p starling-cni -p starling-agent --bin starling --bin starling-agent --bin starlingctl
T=$CARGO_TARGET_DIR/release
WD=$(mktemp -d /tmp/starling-bench-tpvm.XXXXXX)
trap 'rm -rf "$WD"' EXIT
printf 'MODES="%s"\nDURATION=%s\nREPEAT=%s\n' "${MODES:-none ipip vxlan}" "${DURATION:-5}" "${REPEAT:-3}" > "$WD/throughput.env"
W=$WD/vm EXTRA_BINS="$T/starling-agent $T/starlingctl $T/starling $(command -v nft) $(command -v ping) \
$(command -v iperf3) tests/vm/throughput-guest.sh $WD/throughput.env" \
  EXTRA_MODS="crc32c_generic bridge nft_chain_nat nft_masq vxlan" MEM=${MEM:-1024} TIMEOUT=${TIMEOUT:-1500} \
  GUEST_CMD="sh /bin/throughput-guest.sh" bash tests/vm/ipip-vm.sh > "$WD/console.txt" 2>&1 || {
  grep -v '^\[host[^]]*\] \[ ' "$WD/console.txt" | tail -40 >&2; exit 1; }
grep -E 'TP_VM_(ROUTES|COUNTER)' "$WD/console.txt" | sed 's/^\[host[^]]*\] //' >&2
grep -oE 'TP_VM [a-z-]+ [0-9]+ [0-9.]+' "$WD/console.txt" | python3 -c '
import json, statistics, sys
runs = {}
for line in sys.stdin:
    _, mode, run, mbit = line.split()
    runs.setdefault(mode, []).append(float(mbit))
    print(json.dumps({"bench": "pod-throughput-vm", "impl": "starling-" + mode,
                      "metric": "tcp_throughput_run" + run, "value": float(mbit), "unit": "Mbit/s"}))
for mode, v in runs.items():
    print(json.dumps({"bench": "pod-throughput-vm", "impl": "starling-" + mode,
                      "metric": "tcp_throughput", "value": round(statistics.median(v), 1), "unit": "Mbit/s"}))
'
