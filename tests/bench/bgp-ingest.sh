#!/bin/bash
# Ingest: PEERS iBGP peers × PREFIXES unique IPv4 prefixes each (default
# 10 × 100,000 = 1M paths) into starling-bgpd and into BIRD 2, one after the
# other in the same run, each in a fresh daemon inside a private network
# namespace (so port 179 and 127.0.0.0/8 are ours alone).
#
#   tests/bench/bgp-ingest.sh
#   PEERS=10 PREFIXES=100000 PER_SET=0 REPS=1 tests/bench/bgp-ingest.sh
#
# PER_SET: prefixes per distinct attribute set (AS_PATH); 0 = one set per
# peer (maximal UPDATE packing). The time runs from the first UPDATE written
# until the daemon's own count of its Loc-RIB reaches PEERS×PREFIXES
# (starling: control-socket summary; BIRD: the import counters of
# `show protocols all`, cross-checked with `show route count`), polled every
# POLL_MS ms over one control connection. Peak RSS is VmHWM of the daemon.
# iBGP with export none / no other peers, so nothing is re-advertised.
# IMPORT_POLICY=1: every peer gets the same three-rule import policy in
# both daemons (reject a prefix range, reject a community, accept with
# LOCAL_PREF 150), the cost an eBGP peer's policy adds.
# EBGP=1: the peers are eBGP (peer i in AS 64600+i, the first AS of its
# paths; no LOCAL_PREF sent). starling-bgpd needs an import list for them
# (RFC 8212): accept all, or the three rules with IMPORT_POLICY=1. BIRD's
# sessions are multihop (it takes no eBGP neighbour on a loopback address as
# directly connected) with the next hops resolved through a static
# 127.0.0.0/8 device route, so its routes are reachable as on a real link.
#
# SKIP_BIRD=1: starling-bgpd alone (comparing builds; BGPD_BIN=PATH runs
# another starling-bgpd binary, e.g. one built at an older commit).
#
# Prints JSON lines {"bench":"bgp-ingest","impl":"starling"|"bird"|"loadgen",...}.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS=${PEERS:-10}
PREFIXES=${PREFIXES:-100000}
PER_SET=${PER_SET:-0}
REPS=${REPS:-1}
POLL_MS=${POLL_MS:-10}
IMPORT_POLICY=${IMPORT_POLICY:-0}
EBGP=${EBGP:-0}
. tests/bench/bgp-bench-lib.sh
bench_setup bgp-ingest


json() { printf '{"bench":"bgp-ingest","impl":"%s","metric":"%s","value":%s,"unit":"%s"}\n' "$@"; }

# peak and current RSS of a process, in MiB
rss_lines() { # impl pid
    local hwm rss
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$2/status")
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$2/status")
    json "$1" peak_rss "$(awk -v k="$hwm" 'BEGIN {printf "%.1f", k / 1024}')" MiB
    json "$1" rss_after_load "$(awk -v k="$rss" 'BEGIN {printf "%.1f", k / 1024}')" MiB
    json "$1" bytes_per_path "$(awk -v k="$hwm" -v n="$((PEERS * PREFIXES))" 'BEGIN {printf "%.0f", k * 1024 / n}')" bytes
}

LOAD=(--peers "$PEERS" --prefixes "$PREFIXES" --prefixes-per-set "$PER_SET" --asn 65000)
[ "$EBGP" = 1 ] && LOAD+=(--ebgp)
peer_asn() { if [ "$EBGP" = 1 ]; then echo $((64600 + $1)); else echo 65000; fi; }

run_starling() {
    local conf=$WORK/bgpd.yaml sock=$WORK/bgpd.sock
    {
        echo "router_id: 192.0.2.1"
        echo "asn: 65000"
        echo "listen: [\"127.0.0.2:179\"]"
        echo "control_socket: $sock"
        echo "hold_time: 90"
        echo "peers:"
        for i in $(seq 0 $((PEERS - 1))); do
            echo "  - address: $(peer_addr "$i")"
            echo "    asn: $(peer_asn "$i")"
            echo "    passive: true"
            if [ "$IMPORT_POLICY" = 1 ]; then
                echo "    import:"
                echo "      - {prefix: 192.0.2.0/24, le: 32, action: reject}"
                echo "      - {community: \"65000:666\", action: reject}"
                echo "      - {action: accept, set: {local_pref: 150}}"
            elif [ "$EBGP" = 1 ]; then
                echo "    import: [{action: accept}]"
            fi
        done
    } >"$conf"
    # Called as `run_starling || status=1`, where errexit is off: check by hand.
    start_bgpd "$conf" "$sock" || return 1
    local rc=0
    inns "$LOADGEN" ingest "${LOAD[@]}" --target 127.0.0.2:179 --impl starling \
        --watch "starling:$sock" --poll-ms "$POLL_MS" --daemon-pid "$DAEMON_PID" || rc=1
    if [ $rc -eq 0 ]; then
        rss_lines starling "$DAEMON_PID"
    else
        echo "bgp-ingest: starling run failed; its log:" >&2
        tail -20 "$WORK/starling.log" >&2
    fi
    stop_daemon
    return $rc
}

run_bird() {
    local conf=$WORK/bird.conf sock=$WORK/bird.ctl
    {
        echo "log \"$WORK/bird.log\" { warning, error, fatal, bug };"
        echo "router id 192.0.2.1;"
        local import="import all;"
        if [ "$IMPORT_POLICY" = 1 ]; then
            echo "filter imp {"
            echo "  if net ~ [ 192.0.2.0/24+ ] then reject;"
            echo "  if (65000,666) ~ bgp_community then reject;"
            echo "  bgp_local_pref = 150;"
            echo "  accept;"
            echo "}"
            import="import filter imp;"
        fi
        if [ "$EBGP" = 1 ]; then
            echo "protocol device { scan time 60; }"
            echo "protocol static lo_route { ipv4; route 127.0.0.0/8 via \"lo\"; }"
        fi
        for i in $(seq 0 $((PEERS - 1))); do
            echo "protocol bgp g$i {"
            echo "  local 127.0.0.3 as 65000;"
            echo "  neighbor $(peer_addr "$i") as $(peer_asn "$i");"
            [ "$EBGP" = 1 ] && echo "  multihop 2;"
            echo "  passive on;"
            echo "  hold time 90;"
            echo "  ipv4 { $import export none; };"
            echo "}"
        done
    } >"$conf"
    bird -p -c "$conf"
    ip netns exec "$NS" bird -f -c "$conf" -s "$sock" 2>"$WORK/bird.out" &
    DAEMON_PID=$!
    wait_ready bird birdc -s "$sock" show status
    inns "$LOADGEN" ingest "${LOAD[@]}" --target 127.0.0.3:179 --impl bird \
        --watch "bird:$sock" --poll-ms "$POLL_MS" --daemon-pid "$DAEMON_PID"
    rss_lines bird "$DAEMON_PID"
    stop_daemon
}

echo "# bgp-ingest: $PEERS peers x $PREFIXES prefixes, per_set=$PER_SET, import_policy=$IMPORT_POLICY, ebgp=$EBGP; $(nproc) cpus; $(uname -r); load:$(uptime | sed 's/.*load average//')" >&2
status=0
for _ in $(seq "$REPS"); do
    inns "$LOADGEN" ingest "${LOAD[@]}" --target sink
    run_starling || status=1
    [ -n "${SKIP_BIRD:-}" ] || run_bird
done
echo "# load at the end:$(uptime | sed 's/.*load average//')" >&2
exit $status
