#!/bin/bash
# Two route reflectors and CLIENTS (default 5,000) simulated nodes, each
# with a session to both reflectors (10,000 sessions) from its own loopback
# address, announcing its /26 block and POD_ROUTES (default 2) /32s.
# starling-bgpd (configured as the agent configures a reflector: cluster ID,
# every node a reflector client, graceful restart) and BIRD 2, one pair after
# the other in the same run, each pair fresh in a private namespace.
#
#   tests/bench/scale-rr.sh
#   CLIENTS=1000 tests/bench/scale-rr.sh
#   IMPLS=starling tests/bench/scale-rr.sh    # one implementation only
#
# Phases (bgp-loadgen scale, tests/bench/bgp_loadgen_scale.rs): converge
# (all sessions up, then every node announces at once; until every node
# holds every other node's routes from both reflectors), a node joining and
# leaving, and a restart of the first reflector (SIGTERM, started again):
# no session with the second may drop, a node joining meanwhile reaches
# everyone through the second, and the clock runs until the restarted one
# has sent every node everything again. JSON lines {"bench":"scale-rr",...}.
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$0")/../.."
CLIENTS=${CLIENTS:-5000}
POD_ROUTES=${POD_ROUTES:-2}
IMPLS=${IMPLS:-starling bird}
. tests/bench/bgp-bench-lib.sh

# Base clients, the joiner and the node that joins during the restart.
client_addrs() {
    local a=$(( (127 << 24) + (1 << 16) + 1 )) n=0 want=$((CLIENTS + 2))
    while [ $n -lt $want ]; do
        local last=$(( a & 255 ))
        if [ $last -ne 0 ] && [ $last -ne 255 ]; then
            echo "$(( a >> 24 & 255 )).$(( a >> 16 & 255 )).$(( a >> 8 & 255 )).$last"
            n=$((n + 1))
        fi
        a=$((a + 1))
    done
}

starling_conf() { # listen-address control-socket
    echo "router_id: $1"
    echo "asn: 65000"
    echo "cluster_id: 192.0.2.100"
    echo "listen: [\"$1:179\"]"
    echo "control_socket: $2"
    echo "hold_time: 90"
    echo "graceful_restart: {restart_time: 120}"
    echo "peers:"
    while read -r a; do
        echo "  - address: $a"
        echo "    asn: 65000"
        echo "    passive: true"
        echo "    route_reflector_client: true"
    done <"$WORK/clients"
}

bird_conf() { # address
    echo "log \"$WORK/bird-$1.log\" { warning, error, fatal, bug };"
    echo "router id $1;"
    local i=0
    while read -r a; do
        echo "protocol bgp c$i {"
        echo "  local $1 as 65000;"
        echo "  neighbor $a as 65000;"
        echo "  passive on;"
        echo "  strict bind on;"
        echo "  hold time 90;"
        echo "  graceful restart on;"
        echo "  rr client;"
        echo "  rr cluster id 192.0.2.100;"
        echo "  ipv4 { import all; export all; };"
        echo "}"
        i=$((i + 1))
    done <"$WORK/clients"
}

# start_starling N ADDR: starts reflector N, writes its PID to $WORK/rN.pid.
start_starling() {
    local n=$1 addr=$2
    [ -f "$WORK/r$n.yaml" ] || starling_conf "$addr" "$WORK/r$n.sock" >"$WORK/r$n.yaml"
    RUST_LOG=warn ip netns exec "$NS" "$BGPD" --config "$WORK/r$n.yaml" >/dev/null 2>>"$WORK/r$n.log" &
    echo $! >"$WORK/r$n.pid"
    wait_ready "starling-bgpd $n" "$BGPD" show summary --socket "$WORK/r$n.sock" -o json
}

start_bird() {
    local n=$1 addr=$2
    [ -f "$WORK/r$n.conf" ] || { bird_conf "$addr" >"$WORK/r$n.conf"; bird -p -c "$WORK/r$n.conf"; }
    ip netns exec "$NS" bird -f -c "$WORK/r$n.conf" -s "$WORK/r$n.ctl" >/dev/null 2>>"$WORK/r$n.log" &
    echo $! >"$WORK/r$n.pid"
    wait_ready "bird $n" birdc -s "$WORK/r$n.ctl" show status
}

# Stop a reflector: SIGTERM (or the signal given), SIGKILL after 10 s.
stop_reflector() { # N [SIGNAL]
    local pid
    pid=$(cat "$WORK/r$1.pid")
    kill "-${2:-TERM}" "$pid" 2>/dev/null || true
    # Gone or a zombie (the daemon is this script's child only in the main run).
    for _ in $(seq 200); do
        grep -qv '^[^)]*) Z' "/proc/$pid/stat" 2>/dev/null || return 0
        sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
}

# Restart mode: bgp-loadgen runs this script again, inside the namespace, to
# stop reflector 1 (SIGKILL: an abrupt end, no Cease, so the clients'
# graceful-restart helper keeps its routes) and to start it again.
if [ -n "${SCALE_RR_RESTART:-}" ]; then
    IFS=: read -r impl action addr <<<"$SCALE_RR_RESTART"
    BENCH_NAME=scale-rr
    case $action in
        stop) stop_reflector 1 KILL ;;
        start) "start_$impl" 1 "$addr" ;;
        *) echo "scale-rr: unknown restart action $action" >&2; exit 1 ;;
    esac
    exit 0
fi

bench_setup scale-rr
# 2 x CLIENTS sockets for the generator, CLIENTS+ for each reflector. The
# hard limit is what we can get without CAP_SYS_RESOURCE.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((2 * CLIENTS + 256)) ]; then
    echo "scale-rr: $CLIENTS clients need $((2 * CLIENTS + 256)) open files; the limit is $(ulimit -n)" >&2
    exit 1
fi
client_addrs >"$WORK/clients"

run_impl() { # starling|bird
    local impl=$1 a1 a2
    if [ "$impl" = starling ]; then a1=127.0.0.2; a2=127.0.0.4; else a1=127.0.0.3; a2=127.0.0.5; fi
    rm -f "$WORK"/r*.yaml "$WORK"/r*.conf
    "start_$impl" 1 $a1
    "start_$impl" 2 $a2
    # The restart commands run inside bgp-loadgen: this script again, in
    # restart mode, stops reflector 1 and starts it again.
    local env="WORK=$WORK NS=$NS BGPD=$BGPD" rc=0
    inns "$LOADGEN" scale --clients "$CLIENTS" --pod-routes "$POD_ROUTES" \
        --target $a1:179 --second-target $a2:179 --impl "$impl" \
        --daemon-pid "$(cat "$WORK/r1.pid")" --second-pid "$(cat "$WORK/r2.pid")" \
        --connect-timeout 600 --timeout 1200 \
        --stop-first "$env SCALE_RR_RESTART=$impl:stop:$a1 bash $SELF" \
        --start-first "$env SCALE_RR_RESTART=$impl:start:$a1 bash $SELF" \
        --first-pid-file "$WORK/r1.pid" || rc=1
    [ $rc -eq 0 ] || { echo "scale-rr: $impl run failed; logs:" >&2; tail -n 5 "$WORK"/r*.log >&2 || true; }
    stop_reflector 1
    stop_reflector 2
    return $rc
}

echo "# scale-rr: $CLIENTS clients x 2 reflectors, $POD_ROUTES pod routes each; $(nproc) cpus; $(uname -r); load:$(uptime | sed 's/.*load average//')" >&2
status=0
for impl in $IMPLS; do
    run_impl "$impl" || status=1
done
echo "# load at the end:$(uptime | sed 's/.*load average//')" >&2
exit $status
