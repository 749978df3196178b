#!/bin/bash
# Agent at scale: one real starling-agent (file datastore, FIB on) with PEERS
# node-to-node mesh peers that send ROUTES routes in all (default 100 peers,
# 10,000 routes), from bgp-loadgen in a second namespace on the same L2 link,
# so every route is installed in the agent's kernel (host-gw, via the peer).
#
#   tests/bench/agent-scale.sh
#   PEERS=100 ROUTES=10000 tests/bench/agent-scale.sh
#   AGENT_LOG=warn,starling_agent::fib=info KEEP_LOG=/tmp/agent.log ...
#       (the agent's RUST_LOG, default warn; KEEP_LOG: keep its log there,
#       e.g. to read each FIB pass's dump/write times)
#
# Reports, as JSON lines {"bench":"agent-scale",...}: time from the first
# UPDATE until the speaker holds every route (bgp-loadgen's figure) and until
# the kernel holds them all (first_update_to_kernel, polled every ~20 ms, see
# below), the agent's CPU time over the load, and its peak and settled RSS
# (target: at most 30 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS=${PEERS:-100}
ROUTES=${ROUTES:-10000}
. tests/bench/bgp-bench-lib.sh
bench_setup agent-scale
[ -z "${SKIP_BUILD:-}" ] && cargo build --release -q -p starling-agent --bin starling-agent
AGENT=$CARGO_TARGET_DIR/release/starling-agent
PEERNS=$NS-peers
trap 'ip netns del "$PEERNS" 2>/dev/null; bench_cleanup' EXIT
ip netns add "$PEERNS"
ip -n "$PEERNS" link set lo up
ip link add eth0 netns "$NS" type veth peer name eth0 netns "$PEERNS"
ip -n "$NS" addr add 198.51.100.254/24 dev eth0
ip -n "$NS" link set eth0 up
for i in $(seq 1 "$PEERS"); do ip -n "$PEERNS" addr add "198.51.100.$i/24" dev eth0; done
ip -n "$PEERNS" link set eth0 up

json() { printf '{"bench":"agent-scale","impl":"%s","metric":"%s","value":%s,"unit":"%s"}\n' "$@"; }

model=$WORK/model.yaml
{
    printf 'apiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 65000}\n'
    printf -- '---\napiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.244.0.0/16}\n'
    printf -- '---\napiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata: {name: bench}\nspec: {ipv4Address: 198.51.100.254/24}\n'
    for i in $(seq 1 "$PEERS"); do
        printf -- '---\napiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata: {name: peer%d}\nspec: {ipv4Address: 198.51.100.%d/24}\n' "$i" "$i"
    done
} >"$model"
cat >"$WORK/agent.yaml" <<EOC
nodeName: bench
stateDir: $WORK/state
socketPath: $WORK/cni.sock
controlSocket: $WORK/agent.sock
uplink: eth0
datastore: {type: file, path: $model}
EOC
RUST_LOG=${AGENT_LOG:-warn} ip netns exec "$NS" "$AGENT" run --config "$WORK/agent.yaml" 2>"$WORK/agent.log" &
DAEMON_PID=$!
for _ in $(seq 200); do [ -S "$WORK/agent.sock" ] && break; sleep 0.05; done
[ -S "$WORK/agent.sock" ] || { echo "agent-scale: the agent did not start:" >&2; tail "$WORK/agent.log" >&2; exit 1; }
echo "# agent-scale: $PEERS peers x $((ROUTES / PEERS)) routes; $(nproc) cpus; $(uname -r); load:$(uptime | sed 's/.*load average//'); poll: ${POLL:-trie}" >&2
want=$(( (ROUTES / PEERS) * PEERS ))
# The kernel side, timed by a poller that runs while the load goes in: it
# notes the wall-clock time the agent's table first holds every route and
# then releases bgp-loadgen, which holds its sessions (and so the routes)
# until then. Each poll reads the kernel's count of prefixes in the main
# table (/proc/net/fib_triestat, a walk of the trie in the kernel, ~20 ms
# at 100k; a dump through `ip route` costs 0.1-0.6 s at 100k, which the
# figure used to include once or twice); the time is taken when the count
# first reaches what was there before the load plus every route, and a
# filtered dump of the agent's routes then checks they are all ours (else
# polling goes on). `POLL=dump` polls with that dump alone, as before.
count_routes() { ip -n "$NS" route show proto 73 | grep -c ' via ' || true; }
main_prefixes() { ip netns exec "$NS" awk '/^Main:/ {m = 1} m && /Prefixes:/ {print $2; exit}' /proc/net/fib_triestat; }
base=$(main_prefixes)
(
    for _ in $(seq 6000); do
        if [ "${POLL:-trie}" = dump ]; then
            c=$(count_routes)
            [ "$c" -ge "$want" ] && { date +%s%N >"$WORK/kernel_done.tmp"; echo "$c" >"$WORK/kernel_count"; break; }
        elif [ "$(main_prefixes)" -ge $((base + want)) ]; then
            t=$(date +%s%N)
            c=$(count_routes)
            [ "$c" -ge "$want" ] && { echo "$t" >"$WORK/kernel_done.tmp"; echo "$c" >"$WORK/kernel_count"; break; }
        fi
        sleep 0.02
    done
    mv "$WORK/kernel_done.tmp" "$WORK/kernel_done" 2>/dev/null || touch "$WORK/kernel_done"
) &
POLLER=$!
ip netns exec "$PEERNS" "$LOADGEN" ingest --peers "$PEERS" --prefixes $((ROUTES / PEERS)) --asn 65000 \
    --source-base 198.51.100.1 --target 198.51.100.254:179 --impl starling-agent \
    --watch "starling:$WORK/agent.sock" --daemon-pid "$DAEMON_PID" --hold-until "$WORK/kernel_done" \
    | sed 's/"bench":"bgp-ingest"/"bench":"agent-scale"/' | tee "$WORK/loadgen.out"
wait "$POLLER"
# The poller's own count: once it releases bgp-loadgen the routes go.
n=$(cat "$WORK/kernel_count" 2>/dev/null || echo 0)
json starling-agent kernel_routes "$n" routes
first=$(sed -n 's/.*"first_update_unix","unit":"ms","value":\([0-9.]*\).*/\1/p' "$WORK/loadgen.out")
if [ -s "$WORK/kernel_done" ] && [ -n "$first" ]; then
    done_ns=$(cat "$WORK/kernel_done")
    json starling-agent first_update_to_kernel "$(awk -v d="$done_ns" -v f="$first" 'BEGIN {printf "%.1f", d / 1e6 - f}')" ms
fi
hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$DAEMON_PID/status")
rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$DAEMON_PID/status")
json starling-agent peak_rss "$(awk -v k="$hwm" 'BEGIN {printf "%.1f", k / 1024}')" MiB
json starling-agent rss_after_load "$(awk -v k="$rss" 'BEGIN {printf "%.1f", k / 1024}')" MiB
ticks=$(awk '{print $14 + $15}' "/proc/$DAEMON_PID/stat")
json starling-agent cpu_total "$(( ticks * 1000 / $(getconf CLK_TCK) ))" ms
[ -n "${KEEP_LOG:-}" ] && cp "$WORK/agent.log" "$KEEP_LOG"
[ "$n" -ge "$want" ] || { echo "agent-scale: only $n of $want routes reached the kernel" >&2; tail "$WORK/agent.log" >&2; exit 1; }
# No check of the trie count here: bgp-loadgen drops its sessions once the
# poller has released it, so the agent is already withdrawing. The poller's
# dump of the agent's routes, taken after the count reached its mark,
# is what says every route counted was ours.
