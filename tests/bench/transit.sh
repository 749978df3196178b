#!/bin/bash
# Full-table transit and churn (issue 16): one eBGP feeder sends PREFIXES
# (default 1,000,000) IPv4 /24s in PREFIXES/PER_SET attribute sets (AS paths
# of 2-8 hops, a community); the speaker re-advertises them to RECEIVERS
# (default 10) eBGP peers. starling-bgpd and BIRD 2 as the speaker, one after
# the other in the same run, each a fresh daemon inside a private network
# namespace.
#
#   tests/bench/transit.sh
#   PREFIXES=1000000 PER_SET=10 RECEIVERS=10 CHURN_SECS=60 CHURN_PERCENT=1 REPS=1 tests/bench/transit.sh
#
# Phases (bgp-loadgen transit): load (time until every receiver holds the
# table), churn (CHURN_SECS seconds, CHURN_PERCENT of the table withdrawn
# and re-announced each second; speaker CPU and RSS sampled every second;
# 0 skips it), withdraw (the feeder leaves with a Cease; time until every
# receiver holds nothing). Prints JSON lines
# {"bench":"bgp-transit"|"bgp-churn","impl":"starling"|"bird"|"loadgen",...};
# the churn's per-second samples carry a "t" field (seconds).
# Plot: tests/bench/plot.py transit OUT.json
set -euo pipefail
cd "$(dirname "$0")/../.."
PREFIXES=${PREFIXES:-1000000}
PER_SET=${PER_SET:-10}
RECEIVERS=${RECEIVERS:-10}
CHURN_SECS=${CHURN_SECS:-60}
CHURN_PERCENT=${CHURN_PERCENT:-1}
REPS=${REPS:-1}
IMPLS=${IMPLS:-"starling bird"}
TIMEOUT=${TIMEOUT:-900}
. tests/bench/bgp-bench-lib.sh
bench_setup transit


loadgen() { # impl target pid
    inns "$LOADGEN" transit --target "$2" --impl "$1" --daemon-pid "$3" \
        --asn 65000 --prefixes "$PREFIXES" --prefixes-per-set "$PER_SET" \
        --receivers "$RECEIVERS" --churn-secs "$CHURN_SECS" --churn-percent "$CHURN_PERCENT" \
        --timeout "$TIMEOUT"
}

run_starling() {
    local conf=$WORK/bgpd.yaml sock=$WORK/bgpd.sock
    {
        echo "router_id: 192.0.2.1"
        echo "asn: 65000"
        echo "listen: [\"127.0.0.2:179\"]"
        echo "control_socket: $sock"
        echo "hold_time: 90"
        echo "peers:"
        echo "  - address: $(peer_addr 0)"
        echo "    asn: 65100"
        echo "    passive: true"
        echo "    import: [{action: accept}]"
        echo "    export: [{action: reject}]"
        for i in $(seq 1 "$RECEIVERS"); do
            echo "  - address: $(peer_addr "$i")"
            echo "    asn: $((65200 + i))"
            echo "    passive: true"
            echo "    import: [{action: reject}]"
            echo "    export: [{action: accept}]"
        done
    } >"$conf"
    start_bgpd "$conf" "$sock" || return 1
    local rc=0
    loadgen starling 127.0.0.2:179 "$DAEMON_PID" || rc=1
    [ $rc -eq 0 ] || { echo "transit: starling run failed; its log:" >&2; tail -20 "$WORK/starling.log" >&2; }
    stop_daemon
    return $rc
}

run_bird() {
    local conf=$WORK/bird.conf sock=$WORK/bird.ctl
    {
        echo "log \"$WORK/bird.log\" { warning, error, fatal, bug };"
        echo "router id 192.0.2.1;"
        # BIRD takes no eBGP neighbour on a host-scope (loopback) address as
        # directly connected: the sessions are multihop, and their next hops
        # resolve recursively through this device route (never exported).
        echo "protocol device { scan time 60; }"
        echo "protocol static lo_route { ipv4; route 127.0.0.0/8 via \"lo\"; }"
        echo "protocol bgp feeder {"
        echo "  local 127.0.0.3 as 65000; neighbor $(peer_addr 0) as 65100;"
        echo "  passive on; hold time 90; multihop 2;"
        echo "  ipv4 { import all; export none; };"
        echo "}"
        for i in $(seq 1 "$RECEIVERS"); do
            echo "protocol bgp r$i {"
            echo "  local 127.0.0.3 as 65000; neighbor $(peer_addr "$i") as $((65200 + i));"
            echo "  passive on; hold time 90; multihop 2;"
            echo "  ipv4 { import none; export where source = RTS_BGP; };"
            echo "}"
        done
    } >"$conf"
    bird -p -c "$conf"
    ip netns exec "$NS" bird -f -c "$conf" -s "$sock" 2>"$WORK/bird.out" &
    DAEMON_PID=$!
    wait_ready bird birdc -s "$sock" show status
    local rc=0
    loadgen bird 127.0.0.3:179 "$DAEMON_PID" || rc=1
    [ $rc -eq 0 ] || { echo "transit: BIRD run failed; its log:" >&2; tail -20 "$WORK/bird.log" >&2; }
    stop_daemon
    return $rc
}

echo "# transit: $PREFIXES prefixes, $PER_SET per set, $RECEIVERS receivers, churn ${CHURN_SECS}s x ${CHURN_PERCENT}%; $(nproc) cpus; $(uname -r); load:$(uptime | sed 's/.*load average//')" >&2
status=0
for _ in $(seq "$REPS"); do
    for impl in $IMPLS; do
        "run_$impl" || status=1
    done
done
echo "# load at the end:$(uptime | sed 's/.*load average//')" >&2
exit $status
