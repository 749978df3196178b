#!/bin/bash
# One real starling-agent in a NODES-node cluster (default 5,000), with the
# file datastore and, separately, the Kubernetes datastore (a real
# kube-apiserver holding NODES Node objects and their BlockAffinities). The
# cluster peers through a route reflector (a starling-bgpd in a second
# namespace), as a cluster of this size would; the full mesh is off.
#
#   tests/bench/scale-agent.sh
#   NODES=1000 WINDOW=30 DATASTORES=file tests/bench/scale-agent.sh
#
# Per datastore, JSON lines {"bench":"scale-agent","impl":"file"|"kubernetes",...}:
#   start_to_ready    agent start until /readyz answers 200
#   rss_ready, peak_rss   VmRSS once ready, VmHWM at the end
#   idle_cpu, idle_read_bytes    over WINDOW seconds with no change
#   churn_cpu, churn_read_bytes  over WINDOW seconds with 1% of the nodes
#                     changing per minute (one node leaves or joins at a
#                     time, evenly spread), and cpu_per_change
#   (kubernetes) watch events and LIST requests the API server counted for
#   nodes and blockaffinities over each window, from its own /metrics: a
#   change must arrive as a watch event, never as a new LIST.
# Bytes: for the file datastore /proc/PID/io rchar (what the agent read with
# read(2): the file); for Kubernetes the API server's own size of the watch
# events it sent for nodes and blockaffinities.
set -euo pipefail
cd "$(dirname "$0")/../.."
NODES=${NODES:-5000}
WINDOW=${WINDOW:-60}
DATASTORES=${DATASTORES:-file kubernetes}
. tests/bench/bgp-bench-lib.sh
bench_setup scale-agent
[ -z "${SKIP_BUILD:-}" ] && cargo build --release -q -p starling-agent --bin starling-agent
AGENT=$CARGO_TARGET_DIR/release/starling-agent
PEERNS=$NS-cp
CP=$WORK/cp
cleanup_all() {
    [ -d "$CP" ] && ip netns exec "$PEERNS" tests/k8s/control-plane.sh down "$CP" >/dev/null 2>&1 || true
    ip netns pids "$PEERNS" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$PEERNS" 2>/dev/null || true
    bench_cleanup
}
trap cleanup_all EXIT
ip netns add "$PEERNS"
ip -n "$PEERNS" link set lo up
ip link add eth0 netns "$NS" type veth peer name eth0 netns "$PEERNS"
ip -n "$NS" addr add 198.51.100.254/24 dev eth0
ip -n "$NS" link set eth0 up
ip -n "$PEERNS" addr add 198.51.100.1/24 dev eth0
ip -n "$PEERNS" link set eth0 up

json() { printf '{"bench":"scale-agent","impl":"%s","metric":"%s","value":%s,"unit":"%s"}\n' "$@"; }
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); print ($12 + $13) * 1000 / hz}' "/proc/$1/stat"; }
rchar() { awk '/^rchar:/ {print $2}' "/proc/$1/io"; }
kib() { awk -v f="$2" '$1 == f":" {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }

# The reflector: passive, the agent its only client.
cat >"$WORK/rr.yaml" <<EOC
router_id: 198.51.100.1
asn: 65000
cluster_id: 198.51.100.1
listen: ["198.51.100.1:179"]
control_socket: $WORK/rr.sock
peers:
  - {address: 198.51.100.254, asn: 65000, passive: true, route_reflector_client: true}
EOC
RUST_LOG=warn ip netns exec "$PEERNS" "$BGPD" --config "$WORK/rr.yaml" >/dev/null 2>"$WORK/rr.log" &
wait_ready starling-bgpd "$BGPD" show summary --socket "$WORK/rr.sock" -o json

# Node i's address (node0 is the agent's: 198.51.100.254) and block.
node_addr() { if [ "$1" -eq 0 ]; then echo 198.51.100.254/24; else echo "10.64.$(($1 / 250)).$(($1 % 250 + 1))/16"; fi; }
node_block() { echo "10.$((($1 * 64) >> 16 & 15)).$((($1 * 64) >> 8 & 255)).$((($1 * 64) & 255))/26"; }

common_model() { # the kinds both datastores share
    printf 'apiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 65000, nodeToNodeMeshEnabled: false}\n'
    printf -- '---\napiVersion: starling.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.0.0.0/12, blockSize: 26}\n'
    printf -- '---\napiVersion: starling.dev/v1\nkind: BGPPeer\nmetadata: {name: rr}\nspec: {peerIP: 198.51.100.1, asNumber: 65000}\n'
}

file_nodes() { # FIRST LAST: StarlingNode documents
    local i
    for i in $(seq "$1" "$2"); do
        printf -- '---\napiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata: {name: node%d}\nspec: {ipv4Address: %s}\n' "$i" "$(node_addr "$i")"
    done
}

kube_nodes() { # FIRST LAST: Node and BlockAffinity objects
    local i
    for i in $(seq "$1" "$2"); do
        printf -- '---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node%d\n  annotations: {starling.dev/ipv4-address: "%s"}\n' "$i" "$(node_addr "$i")"
        printf -- '---\napiVersion: starling.dev/v1\nkind: BlockAffinity\nmetadata: {name: node%d-block}\nspec: {node: node%d, cidr: "%s", state: confirmed}\n' "$i" "$i" "$(node_block "$i")"
    done
}

kubectl() { ip netns exec "$PEERNS" "$KUBECTL" --kubeconfig "$CP/admin.kubeconfig" "$@"; }

# Sum of the API server's counters for nodes and blockaffinities.
api_counter() { # METRIC [VERB]
    kubectl get --raw /metrics | awk -v m="$1" -v verb="${2:-}" '
        index($0, m "{") == 1 && ($0 ~ /(resource="nodes"|kind="Node"|resource="blockaffinities"|kind="BlockAffinity")[,}]/) &&
        (verb == "" || index($0, "verb=\"" verb "\"") > 0) { s += $NF } END { printf "%d", s }'
}

start_agent() { # DATASTORE-YAML
    cat >"$WORK/agent.yaml" <<EOC
nodeName: node0
stateDir: $WORK/state
socketPath: $WORK/cni.sock
controlSocket: $WORK/agent.sock
uplink: eth0
endpoints: {health: "127.0.0.1:9099", metrics: "127.0.0.1:9091"}
datastore: $1
EOC
    rm -rf "$WORK/state"
    local t0
    t0=$(date +%s%N)
    RUST_LOG=warn ip netns exec "$NS" "$AGENT" run --config "$WORK/agent.yaml" >/dev/null 2>"$WORK/agent.log" &
    DAEMON_PID=$!
    for _ in $(seq 3000); do
        ip netns exec "$NS" curl -sf -o /dev/null http://127.0.0.1:9099/readyz && break
        kill -0 "$DAEMON_PID" 2>/dev/null || { echo "scale-agent: the agent exited:" >&2; tail "$WORK/agent.log" >&2; exit 1; }
        sleep 0.02
    done
    ip netns exec "$NS" curl -sf -o /dev/null http://127.0.0.1:9099/readyz || {
        echo "scale-agent: the agent is not ready after 60 s:" >&2
        ip netns exec "$NS" curl -s http://127.0.0.1:9099/readyz >&2 || true
        tail "$WORK/agent.log" >&2; exit 1; }
    READY_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
}

# Measure WINDOW seconds, calling CHANGE (a function, or `:`) for 1% of the
# nodes per minute, evenly spread. Prints PREFIX_cpu, PREFIX_read_bytes.
window() { # IMPL PREFIX CHANGE
    local impl=$1 prefix=$2 change=$3 changes=0
    local n_changes=$(( NODES * WINDOW / 6000 ))
    [ "$change" = : ] && n_changes=0
    local cpu0 rd0 ev0 ls0 end
    cpu0=$(cpu_ms "$DAEMON_PID"); rd0=$(rchar "$DAEMON_PID")
    if [ "$impl" = kubernetes ]; then
        ev0=$(api_counter apiserver_watch_events_total); ls0=$(api_counter apiserver_request_total LIST)
        by0=$(api_counter apiserver_watch_events_sizes_sum)
    fi
    end=$(( $(date +%s) + WINDOW ))
    local step_ms=$(( n_changes > 0 ? WINDOW * 1000 / n_changes : 0 ))
    local next
    next=$(date +%s%N)
    while [ "$(date +%s)" -lt "$end" ]; do
        if [ "$n_changes" -gt 0 ] && [ "$changes" -lt "$n_changes" ] && [ "$(date +%s%N)" -ge "$next" ]; then
            "$change" "$changes"
            changes=$((changes + 1))
            next=$(( next + step_ms * 1000000 ))
        fi
        sleep 0.05
    done
    local cpu rd
    cpu=$(awk -v a="$(cpu_ms "$DAEMON_PID")" -v b="$cpu0" 'BEGIN {print a - b}')
    rd=$(( $(rchar "$DAEMON_PID") - rd0 ))
    json "$impl" "${prefix}_cpu" "$cpu" ms
    # rchar counts read(2), not recv(2): the file, not the API server's stream.
    [ "$impl" = file ] && json "$impl" "${prefix}_read_bytes" "$rd" bytes
    json "$impl" "${prefix}_changes" "$changes" changes
    if [ "$impl" = kubernetes ]; then
        # The API server's own count; our kubectl calls are not watches, and
        # the agent is the only client watching these kinds.
        json "$impl" "${prefix}_watch_events" "$(( $(api_counter apiserver_watch_events_total) - ev0 ))" events
        json "$impl" "${prefix}_list_requests" "$(( $(api_counter apiserver_request_total LIST) - ls0 ))" requests
        json "$impl" "${prefix}_watch_bytes" "$(( $(api_counter apiserver_watch_events_sizes_sum) - by0 ))" bytes
    fi
    LAST_CPU=$cpu
    LAST_CHANGES=$changes
}

# One change: even steps remove node N-k, odd steps add it back. The file
# is written whole (as a tool regenerating it would), from a cached copy.
file_change() {
    local k=$(( NODES - 1 - $1 / 2 ))
    if [ $(($1 % 2)) -eq 0 ]; then
        awk -v n="node$k" 'BEGIN {RS = "---\n"; ORS = ""} NR > 1 && index($0, "{name: " n "}") == 0 {print "---\n" $0} NR == 1 {print}' \
            "$WORK/model.full" >"$WORK/model.tmp"
    else
        cp "$WORK/model.full" "$WORK/model.tmp"
    fi
    mv "$WORK/model.tmp" "$WORK/model.yaml"
}

kubernetes_change() {
    local k=$(( NODES - 1 - $1 / 2 ))
    if [ $(($1 % 2)) -eq 0 ]; then
        kubectl delete "node/node$k" "blockaffinity/node$k-block" --wait=false >/dev/null
    else
        kube_nodes "$k" "$k" | kubectl create -f - >/dev/null
    fi
}

report() { # IMPL
    local impl=$1
    json "$impl" start_to_ready "$READY_MS" ms
    json "$impl" rss_ready "$(mib "$(kib "$DAEMON_PID" VmRSS)")" MiB
    window "$impl" idle :
    local idle=$LAST_CPU
    window "$impl" churn "${impl}_change"
    json "$impl" cpu_per_change "$(awk -v c="$LAST_CPU" -v i="$idle" -v n="$LAST_CHANGES" 'BEGIN {printf "%.1f", (c - i) / (n > 0 ? n : 1)}')" ms
    json "$impl" peak_rss "$(mib "$(kib "$DAEMON_PID" VmHWM)")" MiB
    json "$impl" rss_end "$(mib "$(kib "$DAEMON_PID" VmRSS)")" MiB
    stop_daemon
}

echo "# scale-agent: $NODES nodes, ${WINDOW}s windows; $(nproc) cpus; $(uname -r); load:$(uptime | sed 's/.*load average//')" >&2
for ds in $DATASTORES; do
    case $ds in
        file)
            { common_model; file_nodes 0 $((NODES - 1)); } >"$WORK/model.full"
            cp "$WORK/model.full" "$WORK/model.yaml"
            start_agent "{type: file, path: $WORK/model.yaml}"
            report file
            ;;
        kubernetes)
            eval "$(tests/k8s/control-plane.sh env)"
            mkdir -p "$CP"
            APISERVER_ADDRESS=198.51.100.1 ip netns exec "$PEERNS" tests/k8s/control-plane.sh up "$CP" >"$WORK/cp.log" 2>&1 ||
                { echo "scale-agent: the control plane did not start:" >&2; tail "$WORK/cp.log" >&2; exit 1; }
            kubectl apply -f manifests/crds.yaml >/dev/null
            kubectl wait --for condition=Established --timeout=60s crd --all >/dev/null
            t0=$(date +%s%N)
            common_model | kubectl create -f - >/dev/null
            # Four kubectl processes at once: creating is not what is measured.
            q=$(( (NODES + 3) / 4 )) pids=()
            for p in 0 1 2 3; do
                first=$((p * q)); last=$(( (p + 1) * q - 1 < NODES - 1 ? (p + 1) * q - 1 : NODES - 1 ))
                [ $first -le $last ] || continue
                kube_nodes $first $last >"$WORK/objects.$p"
                kubectl create -f "$WORK/objects.$p" >/dev/null &
                pids+=($!)
            done
            # Not a bare `wait`: the reflector is a background job too.
            for p in "${pids[@]}"; do wait "$p"; done
            echo "# created $((NODES * 2 + 3)) objects in $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
            start_agent "{type: kubernetes, kubeconfig: $CP/admin.kubeconfig}"
            kubectl get --raw /metrics | grep -E '^apiserver_(watch_events_total|request_total)\{' |
                grep -E 'nodes|Node|blockaffinit|BlockAffinity' >"$WORK/api-metrics.before" || true
            [ -n "${KEEP_METRICS:-}" ] && cp "$WORK/api-metrics.before" "$KEEP_METRICS"
            stop_daemon
            for v in default 2 1; do
                if [ $v = default ]; then unset MALLOC_ARENA_MAX; else export MALLOC_ARENA_MAX=$v; fi
                start_agent "{type: kubernetes, kubeconfig: $CP/admin.kubeconfig}"
                sleep 15
                echo "arena=$v ready=${READY_MS}ms rss=$(mib "$(kib "$DAEMON_PID" VmRSS)") hwm=$(mib "$(kib "$DAEMON_PID" VmHWM)") threads=$(ls /proc/$DAEMON_PID/task | wc -l)"
                [ -n "${PAUSE:-}" ] && { echo "paused pid $DAEMON_PID"; while [ ! -e /tmp/sa-continue ]; do sleep 1; done; rm -f /tmp/sa-continue; }
                stop_daemon
            done
            unset MALLOC_ARENA_MAX
            ;;
        *) echo "scale-agent: unknown datastore $ds (file, kubernetes)" >&2; exit 1 ;;
    esac
done
echo "# load at the end:$(uptime | sed 's/.*load average//')" >&2
