# Shared set-up for the BGP benchmarks against BIRD (sourced, not run):
# checks BIRD is there, builds starling-bgpd and bgp-loadgen (unless
# SKIP_BUILD=1), and makes a private namespace and scratch directory that an
# exit trap removes together with any daemon left in them.
#
#   bench_setup NAME      # sets BGPD, LOADGEN, NS, WORK, DAEMON_PID
#   inns, start_bgpd, stop_daemon, wait_ready, rss_json, peer_addr   # helpers for the scripts

bench_setup() {
    local name=$1
    BENCH_NAME=$name
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
    # An error is a one-line message, not a backtrace.
    export RUST_LIB_BACKTRACE=0
    for tool in bird birdc; do
        command -v "$tool" >/dev/null || { echo "$name: needs \`$tool\` (Debian package bird2)" >&2; exit 1; }
    done
    # SKIP_BUILD=1: use the binaries already in $CARGO_TARGET_DIR/release.
    if [ -z "${SKIP_BUILD:-}" ]; then
        cargo build --release -q -p starling-bgpd
        cargo build --release -q -p starling-tests --bin bgp-loadgen
    fi
    BGPD=${BGPD_BIN:-$CARGO_TARGET_DIR/release/starling-bgpd}
    LOADGEN=$CARGO_TARGET_DIR/release/bgp-loadgen
    NS=stbench-$name-$$
    WORK=$(mktemp -d "/tmp/starling-$name.XXXXXX")
    DAEMON_PID=
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    ip netns add "$NS"
    ip -n "$NS" link set lo up
}

bench_cleanup() {
    [ -n "$DAEMON_PID" ] && { kill -9 "$DAEMON_PID" 2>/dev/null || true; }
    if ip netns list | grep -qw "$NS"; then
        for p in $(ip netns pids "$NS"); do kill -9 "$p" 2>/dev/null || true; done
        ip netns del "$NS"
    fi
    rm -rf "$WORK"
}

inns() { ip netns exec "$NS" "$@"; }

# Check CONF, then start starling-bgpd with it in the namespace (DAEMON_PID)
# and wait until its control socket SOCK answers: start_bgpd CONF SOCK.
# RUST_LOG=warn: at info the daemon logs every best-path change, which is
# the operator's log, not the speaker's work (BIRD logs no routes either).
# A configuration the daemon refuses returns 1 with its reason.
start_bgpd() {
    if ! "$BGPD" --config "$1" --check >"$WORK/check.out" 2>&1; then
        echo "$BENCH_NAME: starling-bgpd rejects $1:" >&2
        cat "$WORK/check.out" >&2
        return 1
    fi
    # Not through inns(): $! must be the daemon (ip netns exec execs it).
    RUST_LOG=warn ip netns exec "$NS" "$BGPD" --config "$1" 2>"$WORK/starling.log" &
    DAEMON_PID=$!
    wait_ready starling-bgpd "$BGPD" show summary --socket "$2" -o json
}

# Stop the daemon under test: SIGTERM, then SIGKILL after 5 s.
stop_daemon() {
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=
}

# Poll a command until it succeeds (15 s), or fail with the daemons' logs.
wait_ready() { # what, command...
    local what=$1; shift
    for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done
    echo "$BENCH_NAME: $what did not come up; its log:" >&2
    tail -20 "$WORK"/*.log >&2 || true
    exit 1
}

# The daemon's peak RSS (VmHWM) as a JSON line: rss_json BENCH IMPL PID.
rss_json() {
    local kb
    kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$3/status")
    printf '{"bench":"%s","impl":"%s","metric":"peak_rss","value":%s,"unit":"MiB"}\n' \
        "$1" "$2" "$(awk -v k="$kb" 'BEGIN {printf "%.1f", k / 1024}')"
}

# The n-th source address of bgp-loadgen's sessions (n from 0): 127.1.0.1,
# 127.1.0.2, ..., skipping .0 and .255 as bgp-loadgen does.
peer_addr() {
    local a=$(( (127 << 24) + (1 << 16) + 1 )) left=$1
    while :; do
        local last=$(( a & 255 ))
        if [ $last -ne 0 ] && [ $last -ne 255 ]; then
            [ "$left" -eq 0 ] && break
            left=$((left - 1))
        fi
        a=$((a + 1))
    done
    echo "$(( a >> 24 & 255 )).$(( a >> 16 & 255 )).$(( a >> 8 & 255 )).$(( a & 255 ))"
}
