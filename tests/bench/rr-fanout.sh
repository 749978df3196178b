#!/bin/bash
# Route-reflector fan-out: one reflector and CLIENTS (default 500) iBGP
# clients on loopback addresses, each announcing one /26. starling-bgpd and
# BIRD 2 as the reflector, one after the other in the same run, each a fresh
# daemon inside a private network namespace.
#
#   tests/bench/rr-fanout.sh
#   CLIENTS=500 REPS=1 tests/bench/rr-fanout.sh
#
# Every client session is Established before the clock starts; then all
# clients send their UPDATE and End-of-RIB at once, and the clock stops when
# every client has received every other client's /26 (bgp-loadgen decodes
# what each session receives). Prints JSON lines
# {"bench":"rr-fanout","impl":"starling"|"bird"|"loadgen",...}, the daemons'
# peak RSS (VmHWM) among them.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLIENTS=${CLIENTS:-500}
REPS=${REPS:-1}
. tests/bench/bgp-bench-lib.sh
bench_setup rr-fanout

# The clients: 127.1.0.1, 127.1.0.2, ..., skipping .0 and .255 like bgp-loadgen.
client_addrs() {
    local a=$(( (127 << 24) + (1 << 16) + 1 )) n=0
    while [ $n -lt "$CLIENTS" ]; do
        local last=$(( a & 255 ))
        if [ $last -ne 0 ] && [ $last -ne 255 ]; then
            echo "$(( a >> 24 & 255 )).$(( a >> 16 & 255 )).$(( a >> 8 & 255 )).$last"
            n=$((n + 1))
        fi
        a=$((a + 1))
    done
}

run_starling() {
    local conf=$WORK/bgpd.yaml sock=$WORK/bgpd.sock
    {
        echo "router_id: 192.0.2.1"
        echo "asn: 65000"
        echo "cluster_id: 192.0.2.1"
        echo "listen: [\"127.0.0.2:179\"]"
        echo "control_socket: $sock"
        echo "hold_time: 90"
        echo "peers:"
        for a in $(client_addrs); do
            echo "  - address: $a"
            echo "    asn: 65000"
            echo "    passive: true"
            echo "    route_reflector_client: true"
        done
    } >"$conf"
    # Called as `run_starling || status=1`, where errexit is off: check by hand.
    start_bgpd "$conf" "$sock" || return 1
    local rc=0
    inns "$LOADGEN" fanout --clients "$CLIENTS" --target 127.0.0.2:179 --impl starling \
        --daemon-pid "$DAEMON_PID" || rc=1
    [ $rc -eq 0 ] && rss_json rr-fanout starling "$DAEMON_PID"
    [ $rc -eq 0 ] || { echo "rr-fanout: starling run failed; its log:" >&2; tail -20 "$WORK/starling.log" >&2; }
    stop_daemon
    return $rc
}

run_bird() {
    local conf=$WORK/bird.conf sock=$WORK/bird.ctl i=0
    {
        echo "log \"$WORK/bird.log\" { warning, error, fatal, bug };"
        echo "router id 192.0.2.1;"
        for a in $(client_addrs); do
            echo "protocol bgp c$i {"
            echo "  local 127.0.0.3 as 65000;"
            echo "  neighbor $a as 65000;"
            echo "  passive on;"
            echo "  hold time 90;"
            echo "  rr client;"
            echo "  rr cluster id 192.0.2.1;"
            echo "  ipv4 { import all; export all; };"
            echo "}"
            i=$((i + 1))
        done
    } >"$conf"
    bird -p -c "$conf"
    ip netns exec "$NS" bird -f -c "$conf" -s "$sock" 2>"$WORK/bird.out" &
    DAEMON_PID=$!
    wait_ready bird birdc -s "$sock" show status
    inns "$LOADGEN" fanout --clients "$CLIENTS" --target 127.0.0.3:179 --impl bird --daemon-pid "$DAEMON_PID"
    rss_json rr-fanout bird "$DAEMON_PID"
    stop_daemon
}

echo "# rr-fanout: $CLIENTS clients; $(nproc) cpus; $(uname -r); load:$(uptime | sed 's/.*load average//')" >&2
status=0
for _ in $(seq "$REPS"); do
    run_starling || status=1
    run_bird
done
echo "# load at the end:$(uptime | sed 's/.*load average//')" >&2
exit $status
