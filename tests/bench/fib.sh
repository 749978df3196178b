#!/bin/bash
# FIB programming throughput: the reconciler against `ip -batch`, same run,
# same namespace set-up (a veth uplink 192.0.2.1/24 with 100 neighbours'
# next hops, 100k remote /26 blocks).
#
#   tests/bench/fib.sh            # 100000 routes
#   ROUTES=20000 tests/bench/fib.sh
#   LISTENER=1 tests/bench/fib.sh          # `ip monitor route` subscribed in the namespace
#   LISTENER=filtered tests/bench/fib.sh   # a subscriber whose socket filter drops everything
#
# Prints JSON lines {"bench":"fib","impl":"starling"|"ip-batch",...}.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUTES=${ROUTES:-100000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p starling-tests --bin fib-bench
BENCH=$CARGO_TARGET_DIR/release/fib-bench

NS=stbench-fib-$$
TMP=$(mktemp -d)
MONITOR=
cleanup() {
    [ -n "$MONITOR" ] && { kill "$MONITOR" 2>/dev/null || true; }
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add up0 type veth peer name up0p
ip -n "$NS" link set up0p up
ip -n "$NS" addr add 192.0.2.1/24 dev up0
ip -n "$NS" link set up0 up

# LISTENER=1: a route-notification subscriber in the namespace, as the
# agent's own event socket is; the kernel then queues a copy of every
# notification it builds for every add and delete. LISTENER=filtered: one
# whose socket filter drops them all (what the agent's filter does to its
# own writes' echoes).
if [ -n "${LISTENER:-}" ]; then
    case $LISTENER in
        1) ip -n "$NS" monitor route >/dev/null & ;;
        filtered) ip netns exec "$NS" python3 tests/bench/route-listener.py & ;;
        *) echo "fib.sh: LISTENER is 1 or filtered, not $LISTENER" >&2; exit 1 ;;
    esac
    MONITOR=$!
fi

ms_since() { echo "$(( ($(date +%s%N) - $1) / 1000000 ))"; }
line() { printf '{"bench":"fib","impl":"%s","metric":"%s","value":%s,"unit":"%s"}\n' "$@"; }

# Ours: install, unchanged resync, remove.
ip netns exec "$NS" "$BENCH" --uplink up0 --routes "$ROUTES"

# ip -batch with the same routes (another protocol number, table emptied in between).
"$BENCH" --uplink up0 --routes "$ROUTES" --write-batch "$TMP"
t=$(date +%s%N); ip -n "$NS" -batch "$TMP/add.batch"; add_ms=$(ms_since "$t")
n=$(ip -n "$NS" route show proto 74 | wc -l)
[ "$n" = "$ROUTES" ] || { echo "ip -batch installed $n of $ROUTES routes" >&2; exit 1; }
t=$(date +%s%N); ip -n "$NS" route show proto 74 >/dev/null; dump_ms=$(ms_since "$t")
t=$(date +%s%N); ip -n "$NS" -batch "$TMP/del.batch"; del_ms=$(ms_since "$t")
line ip-batch install_routes_per_s "$(( ROUTES * 1000 / (add_ms > 0 ? add_ms : 1) ))" routes/s
line ip-batch dump_ms "$dump_ms" ms
line ip-batch remove_routes_per_s "$(( ROUTES * 1000 / (del_ms > 0 ? del_ms : 1) ))" routes/s
