#!/usr/bin/env bash
# A real multi-node Kubernetes cluster on this machine, for the `kubelet`
# system tests (see docs/testing.md, "Real nodes"):
#
#   control plane   network namespace TAG-cp: etcd, kube-apiserver (from
#                   control-plane.sh), kube-controller-manager (allocates
#                   podCIDRs), kube-scheduler; the underlay bridge br0 with
#                   192.0.2.1/24, where the apiserver listens (port 6443).
#   node i          network namespace TAG-nI (eth0 192.0.2.(10+i)/24 on br0,
#                   default route via 192.0.2.1) and a persistent mount
#                   namespace of its own, in which containerd and kubelet run:
#                   /run, /var/lib and /var/log are the node's own directories,
#                   /etc and /opt are copy-on-write overlays of the host's, so
#                   the DaemonSet's hostPaths (/opt/cni/bin, /etc/cni/net.d,
#                   /run/starling, /var/lib/starling) are per node; cgroup root
#                   /TAG-nI under every v1 controller.
#
#   cluster.sh images            build the pause and busybox image archives (cached)
#   cluster.sh env               tool and image paths (KEY=value), builds nothing
#   cluster.sh up DIR [NODES]    start a cluster (3 nodes by default) in DIR; TAG
#                                (env, <= 8 chars, default from the pid) names its
#                                namespaces and cgroups
#   cluster.sh import DIR TAR... load image archives into every node's containerd
#   cluster.sh kubectl DIR ARGS  kubectl as the admin, from the control plane's namespace
#   cluster.sh exec DIR NODE CMD run CMD on a node (its network and mount namespaces)
#   cluster.sh stop-node DIR NODE  power a node off: kill its kubelet, containerd and
#                                containers, remove its namespaces (the Node object stays)
#   cluster.sh down DIR          stop and remove everything `up DIR` made; idempotent,
#                                also after a crash (finds processes by namespace and cgroup)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Tool paths, the cache, cert and process helpers.
# shellcheck source=control-plane.sh
source "$here/control-plane.sh"
die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }

KUBELET="$KUBE_DIR/kubelet"
KUBE_CONTROLLER_MANAGER="$KUBE_DIR/kube-controller-manager"
KUBE_SCHEDULER="$KUBE_DIR/kube-scheduler"
# containerd 2.x from the cache (control-plane.sh build): it calls the CNI
# STATUS verb. CONTAINERD_DIR=/usr/bin runs Debian's 1.6 instead (no STATUS;
# then generate the manifests without `--cni-version 1.1.0`).
CONTAINERD="$CONTAINERD_DIR/containerd"
CTR="$CONTAINERD_DIR/ctr"
RUNC="${RUNC:-/usr/sbin/runc}"
IMAGES_DIR="$CACHE/images-$K8S_VERSION"
PAUSE_TAR="$IMAGES_DIR/pause.tar"
BUSYBOX_TAR="$IMAGES_DIR/busybox.tar"
# Names that say where they come from: built here, never pulled.
PAUSE_IMAGE="localhost/starling-test/pause:$K8S_VERSION"
BUSYBOX_IMAGE="localhost/starling-test/busybox:$K8S_VERSION"

API_ADDRESS=192.0.2.1
API_PORT=6443
CLUSTER_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
CONTROLLERS="systemd cpu cpuacct cpuset memory pids blkio devices freezer"
# Where a node's cgroups end up: the v1 controllers, and the v2 hierarchy the
# hybrid layout also mounts (runc creates the node's paths there too).
HIERARCHIES="$CONTROLLERS unified"

cmd_env() {
    echo "KUBECTL=$KUBECTL"
    echo "KUBELET=$KUBELET"
    echo "KUBE_CONTROLLER_MANAGER=$KUBE_CONTROLLER_MANAGER"
    echo "KUBE_SCHEDULER=$KUBE_SCHEDULER"
    echo "KUBE_APISERVER=$KUBE_APISERVER"
    echo "CONTAINERD=$CONTAINERD"
    echo "CTR=$CTR"
    echo "RUNC=$RUNC"
    echo "PAUSE_TAR=$PAUSE_TAR"
    echo "PAUSE_IMAGE=$PAUSE_IMAGE"
    echo "BUSYBOX_TAR=$BUSYBOX_TAR"
    echo "BUSYBOX_IMAGE=$BUSYBOX_IMAGE"
    echo "K8S_VERSION=$K8S_VERSION"
}

# The pause image from the Kubernetes module's own C source (gcc -static, as
# its build/pause Makefile does), and a test-pod image of Debian's
# busybox-static. Both one-layer archives written by scripts/image.sh.
cmd_images() {
    local src w t
    if [ -f "$PAUSE_TAR" ] && [ -f "$BUSYBOX_TAR" ]; then
        log "images: cached ($IMAGES_DIR)"
        return 0
    fi
    command -v gcc >/dev/null || die "needs \`gcc\` (Debian packages gcc, libc6-dev) to build the pause image"
    [ -x /bin/busybox ] || die "needs /bin/busybox (Debian package busybox-static) for the test-pod image"
    src="$(cd "$here/kube" && go env GOMODCACHE 2>/dev/null)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
    if [ ! -f "$src" ]; then
        (cd "$here/kube" && GOFLAGS=-mod=mod go mod download "k8s.io/kubernetes@$K8S_VERSION") ||
            die "cannot download the k8s.io/kubernetes module for build/pause"
    fi
    [ -f "$src" ] || die "no $src"
    t=$(date +%s)
    mkdir -p "$IMAGES_DIR"
    w=$(mktemp -d)
    mkdir -p "$w/pause" "$w/busybox/bin"
    gcc -Os -static -Wall -DVERSION="$K8S_VERSION" -o "$w/pause/pause" "$src" ||
        { rm -rf "$w"; die "gcc -static pause.c failed (is libc6-dev installed?)"; }
    strip "$w/pause/pause"
    cp /bin/busybox "$w/busybox/bin/busybox"
    # The applets the tests run, as links (busybox picks the applet by argv[0]).
    for a in sh sleep ping ip cat ls hostname wget nc echo true; do ln -s busybox "$w/busybox/bin/$a"; done
    SOURCE_DATE_EPOCH=0 bash "$here/../../scripts/image.sh" archive "$w/pause" "$PAUSE_IMAGE" "$PAUSE_TAR.tmp" /pause >/dev/null
    SOURCE_DATE_EPOCH=0 bash "$here/../../scripts/image.sh" archive "$w/busybox" "$BUSYBOX_IMAGE" "$BUSYBOX_TAR.tmp" /bin/sh >/dev/null
    mv -f "$PAUSE_TAR.tmp" "$PAUSE_TAR"
    mv -f "$BUSYBOX_TAR.tmp" "$BUSYBOX_TAR"
    rm -rf "$w"
    log "images: built $PAUSE_IMAGE, $BUSYBOX_IMAGE in $(( $(date +%s) - t ))s ($IMAGES_DIR)"
}

kubeconfig() { # file ca cert key
    cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: starling-test
  cluster:
    server: https://$API_ADDRESS:$API_PORT
    certificate-authority: $2
users:
- name: user
  user:
    client-certificate: $3
    client-key: $4
contexts:
- name: starling-test
  context:
    cluster: starling-test
    user: user
current-context: starling-test
KC
}

tag_of() { cat "$1/tag" 2>/dev/null || true; }
nodes_of() { cat "$1/node-names" 2>/dev/null || true; }
cp_netns() { echo "$(tag_of "$1")-cp"; }
node_netns() { echo "$(tag_of "$1")-n${2#node}"; }   # dir node
node_dir() { echo "$1/nodes/$2"; }

# Run a command on a node: its network namespace and its mount namespace.
on_node() { # dir node cmd...
    local dir=$1 node=$2; shift 2
    nsenter --mount="$(node_dir "$dir" "$node")/mnt" --net="/var/run/netns/$(node_netns "$dir" "$node")" "$@"
}

require_tools() {
    local t
    for t in "$KUBE_APISERVER" "$KUBECTL" "$KUBELET" "$KUBE_CONTROLLER_MANAGER" "$KUBE_SCHEDULER" "$ETCD"; do
        [ -x "$t" ] || die "missing $t; run: bash tests/k8s/control-plane.sh build"
    done
    [ -x "$CONTAINERD" ] || die "missing $CONTAINERD; run: bash tests/k8s/control-plane.sh build"
    [ -x "$CTR" ] || die "missing $CTR; run: bash tests/k8s/control-plane.sh build"
    for t in loopback portmap; do
        [ -x "$PLUGINS_DIR/$t" ] || die "missing $PLUGINS_DIR/$t; run: bash tests/k8s/control-plane.sh build"
    done
    [ -x "$CONTAINERD_DIR/containerd-shim-runc-v2" ] || die "missing $CONTAINERD_DIR/containerd-shim-runc-v2; run: bash tests/k8s/control-plane.sh build"
    [ -x "$RUNC" ] || die "missing $RUNC (Debian package runc)"
    [ -e /usr/lib/cni/loopback ] || die "missing /usr/lib/cni/loopback (Debian package containernetworking-plugins)"
    for t in openssl nsenter unshare ip; do
        command -v "$t" >/dev/null || die "needs \`$t\`"
    done
    [ -f "$PAUSE_TAR" ] && [ -f "$BUSYBOX_TAR" ] || die "missing the pause/busybox images; run: bash tests/k8s/cluster.sh images"
}

# The control plane's namespace: the underlay bridge and the apiserver on it.
start_control_plane() { # dir
    local dir=$1 ns cpd
    ns=$(cp_netns "$dir"); cpd="$dir/cp"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" addr add "$API_ADDRESS/24" dev br0
    ip -n "$ns" link set br0 up
    mkdir -p "$cpd"
    APISERVER_ADDRESS=$API_ADDRESS APISERVER_PORT=$API_PORT WITH_NODES=1 \
        ip netns exec "$ns" bash "$here/control-plane.sh" up "$cpd" >&2
    issue_cert "$cpd" kcm "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
    issue_cert "$cpd" scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
    kubeconfig "$cpd/kcm.kubeconfig" "$cpd/ca.crt" "$cpd/kcm.crt" "$cpd/kcm.key"
    kubeconfig "$cpd/scheduler.kubeconfig" "$cpd/ca.crt" "$cpd/scheduler.crt" "$cpd/scheduler.key"
    # Controllers under their own ServiceAccounts (as kubeadm runs it); node
    # podCIDRs from the cluster CIDR (/24 each, kubeadm's default).
    setsid ip netns exec "$ns" "$KUBE_CONTROLLER_MANAGER" \
        --kubeconfig "$cpd/kcm.kubeconfig" \
        --authentication-kubeconfig "$cpd/kcm.kubeconfig" --authorization-kubeconfig "$cpd/kcm.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port 10257 \
        --leader-elect=false --use-service-account-credentials \
        --service-account-private-key-file "$cpd/sa.key" --root-ca-file "$cpd/ca.crt" \
        --allocate-node-cidrs --cluster-cidr "$CLUSTER_CIDR" --node-cidr-mask-size 24 \
        --service-cluster-ip-range "$SERVICE_CIDR" \
        --v 1 >"$cpd/kube-controller-manager.log" 2>&1 </dev/null &
    echo $! >"$cpd/kube-controller-manager.pid"
    setsid ip netns exec "$ns" "$KUBE_SCHEDULER" \
        --kubeconfig "$cpd/scheduler.kubeconfig" \
        --authentication-kubeconfig "$cpd/scheduler.kubeconfig" --authorization-kubeconfig "$cpd/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false \
        --v 1 >"$cpd/kube-scheduler.log" 2>&1 </dev/null &
    echo $! >"$cpd/kube-scheduler.pid"
}

# One node: network namespace on the bridge, mount namespace, containerd, kubelet.
start_node() { # dir index
    local dir=$1 i=$2 node ns d r ip cg cpd
    node="node$i"; ns=$(node_netns "$dir" "$node"); d=$(node_dir "$dir" "$node"); r="$d/root"
    ip="192.0.2.$((10 + i))"; cg="/$ns"; cpd="$dir/cp"
    mkdir -p "$r/run" "$r/var-lib" "$r/var-log" "$r/etc.upper" "$r/etc.work" "$r/opt.upper" "$r/opt.work"
    echo "$node" >>"$dir/node-names"

    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add eth0 netns "$ns" type veth peer name "v$i" netns "$(cp_netns "$dir")"
    ip -n "$(cp_netns "$dir")" link set "v$i" master br0 up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$API_ADDRESS"
    # kubeadm's preflight wants forwarding on; a node routes for its pods.
    ip netns exec "$ns" sysctl -q -w net.ipv4.ip_forward=1

    # The node's file system view, kept alive by the bind of its ns file.
    touch "$d/mnt"
    unshare --mount="$d/mnt" --propagation private bash -euc '
        r=$1
        mount --bind "$r/run" /run
        mount --bind "$r/var-lib" /var/lib
        mount --bind "$r/var-log" /var/log
        mount -t overlay overlay -o "lowerdir=/etc,upperdir=$r/etc.upper,workdir=$r/etc.work" /etc
        mount -t overlay overlay -o "lowerdir=/opt,upperdir=$r/opt.upper,workdir=$r/opt.work" /opt
        mkdir -p /etc/cni/net.d /opt/cni/bin /run/netns
        # The CRI always calls `loopback` from the CNI bin directory of the node:
        # the reference plugins sit next to what the node installs
        # (install-cni adds `starling`), as on a kubeadm node; portmap and
        # loopback at a release that speaks CNI 1.1.0.
        for p in /usr/lib/cni/* "$2"/*; do ln -sf "$p" /opt/cni/bin/; done
    ' bash "$r" "$PLUGINS_DIR"

    for c in $CONTROLLERS; do mkdir -p "/sys/fs/cgroup/$c$cg"; done
    cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset$cg/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset$cg/cpuset.mems"

    # Standard paths inside the node: /run/containerd, /var/lib/containerd.
    cat >"$d/containerd.toml" <<EOF
version = 3
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  # This sandbox's root lacks CAP_SYS_RESOURCE: runc cannot set the pause
  # container's oom_score_adj of -998 below our own.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
EOF
    # The shim is looked up on PATH: the one built with this containerd first.
    PATH="$CONTAINERD_DIR:$PATH" setsid nsenter --mount="$d/mnt" --net="/var/run/netns/$ns" "$CONTAINERD" --config "$d/containerd.toml" \
        >"$d/containerd.log" 2>&1 </dev/null &
    echo $! >"$d/containerd.pid"

    issue_cert "$cpd" "kubelet-$node" "/O=system:nodes/CN=system:node:$node" "extendedKeyUsage=clientAuth"
    issue_cert "$cpd" "kubelet-$node-serving" "/CN=system:node:$node" \
        "subjectAltName=IP:$ip,DNS:$node\nextendedKeyUsage=serverAuth"
    kubeconfig "$d/kubelet.kubeconfig" "$cpd/ca.crt" "$cpd/kubelet-$node.crt" "$cpd/kubelet-$node.key"
    cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 without systemd here: cgroupfs, each node under its own root.
cgroupDriver: cgroupfs
cgroupRoot: $cg
failCgroupV1: false
failSwapOn: false
enforceNodeAllocatable: []
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: $ip
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: $cpd/kubelet-$node-serving.crt
tlsPrivateKeyFile: $cpd/kubelet-$node-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $cpd/ca.crt}
authorization: {mode: Webhook}
localStorageCapacityIsolation: false
# The host's disk is shared by every node and the builds: no evictions.
evictionHard: {}
imageGCHighThresholdPercent: 100
resolvConf: ""
EOF
    wait_socket "$r/run/containerd/containerd.sock" "$d/containerd.log" "$node: containerd"
    import_images "$r/run/containerd/containerd.sock" "$PAUSE_TAR" "$BUSYBOX_TAR"
    setsid nsenter --mount="$d/mnt" --net="/var/run/netns/$ns" "$KUBELET" --config "$d/kubelet.yaml" \
        --kubeconfig "$d/kubelet.kubeconfig" --hostname-override "$node" --node-ip "$ip" \
        --v 1 >"$d/kubelet.log" 2>&1 </dev/null &
    echo $! >"$d/kubelet.pid"
}

wait_socket() { # path log what
    local deadline=$(( $(date +%s) + 30 ))
    until [ -S "$1" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { tail -n 20 "$2" >&2; die "$3 did not create $1 within 30s (log: $2)"; }
        sleep 0.1
    done
}

import_images() { # socket tar...
    local sock=$1 tar; shift
    for tar in "$@"; do
        [ -f "$tar" ] || die "no image archive $tar"
        "$CTR" -a "$sock" -n k8s.io images import "$tar" >/dev/null ||
            die "ctr images import $tar into $sock failed"
    done
}

cmd_import() {
    local dir=${1:?usage: cluster.sh import DIR TAR...} node; shift
    for node in $(nodes_of "$dir"); do
        import_images "$(node_dir "$dir" "$node")/root/run/containerd/containerd.sock" "$@"
    done
}

admin_kubectl() { # dir args...
    local dir=$1; shift
    ip netns exec "$(cp_netns "$dir")" "$KUBECTL" --kubeconfig "$dir/cp/admin.kubeconfig" "$@"
}

cmd_up() {
    local dir=${1:?usage: cluster.sh up DIR [NODES]} n=${2:-3} i tag deadline got
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 100 ] || die "NODES must be 1..100, not $n"
    require_tools
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    cmd_down "$dir"
    tag=${TAG:-sk$(( $$ % 100000 ))}
    [[ "$tag" =~ ^[a-z0-9]{1,8}$ ]] || die "TAG must be 1-8 lowercase letters or digits, not $tag"
    [ ! -e "/var/run/netns/$tag-cp" ] || die "network namespace $tag-cp exists: another cluster uses TAG=$tag"
    echo "$tag" >"$dir/tag"
    : >"$dir/node-names"
    # Whatever fails below (die exits), take down what was started; the
    # logs stay in DIR.
    UP_DIR=$dir
    trap '[ -z "${UP_DIR:-}" ] || { log "up failed; stopping what started (logs in $UP_DIR)"; cmd_down "$UP_DIR"; }' EXIT
    start_control_plane "$dir"
    for i in $(seq 1 "$n"); do start_node "$dir" "$i"; done
    # Up means: every node registered, with the podCIDR the controller-manager
    # gave it. (Nodes stay NotReady until a CNI network is installed.)
    deadline=$(( $(date +%s) + 120 ))
    while :; do
        got=$(admin_kubectl "$dir" get nodes -o jsonpath='{range .items[*]}{.metadata.name}={.spec.podCIDR}{"\n"}{end}' 2>/dev/null |
            grep -c '=[0-9]' || true)
        [ "$got" -ge "$n" ] && break
        for i in $(seq 1 "$n"); do
            kill -0 "$(cat "$dir/nodes/node$i/kubelet.pid")" 2>/dev/null ||
                { tail -n 30 "$dir/nodes/node$i/kubelet.log" >&2; die "node$i: kubelet exited (log: $dir/nodes/node$i/kubelet.log)"; }
        done
        [ "$(date +%s)" -lt "$deadline" ] || die "only $got of $n nodes registered with a podCIDR after 120s"
        sleep 0.5
    done
    UP_DIR=
    admin_kubectl "$dir" get nodes -o wide >&2
    echo "cluster $tag up: $n nodes; kubectl: bash $here/cluster.sh kubectl $dir ..."
}

# Every process of a node, found without pid files: in its mount namespace
# (containerd, shims, kubelet), in its network namespace (hostNetwork
# containers) or in its cgroup subtree (every container).
node_pids() { # dir node
    local d mnt net p c
    d=$(node_dir "$1" "$2")
    mnt=$(stat -L -c %i "$d/mnt" 2>/dev/null || true)
    net=$(stat -L -c %i "/var/run/netns/$(node_netns "$1" "$2")" 2>/dev/null || true)
    # One stat over every process (a fork per process makes `down` take tens
    # of seconds): "inode /proc/PID/ns/KIND" lines.
    if [ -n "$mnt" ] || [ -n "$net" ]; then
        stat -L -c '%i %n' /proc/[0-9]*/ns/mnt /proc/[0-9]*/ns/net 2>/dev/null |
            awk -v m="${mnt:-x}" -v n="${net:-x}" '
                ($2 ~ /\/mnt$/ && $1 == m) || ($2 ~ /\/net$/ && $1 == n) { split($2, p, "/"); print p[3] }'
    fi
    for c in $HIERARCHIES; do
        [ -d "/sys/fs/cgroup/$c/$(node_netns "$1" "$2")" ] || continue
        find "/sys/fs/cgroup/$c/$(node_netns "$1" "$2")" -name cgroup.procs -exec cat {} + 2>/dev/null
    done
}

stop_node() { # dir node
    local dir=$1 node=$2 d ns pids c
    d=$(node_dir "$dir" "$node"); ns=$(node_netns "$dir" "$node")
    # Nothing on a node needs a graceful stop: the kubelet first (so it
    # restarts no container), then everything else of the node.
    [ -f "$d/kubelet.pid" ] && kill -KILL "$(cat "$d/kubelet.pid")" 2>/dev/null || true
    rm -f "$d/kubelet.pid"
    for _ in $(seq 1 50); do
        pids=$(node_pids "$dir" "$node" | sort -u)
        [ -n "$pids" ] || break
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    rm -f "$d/containerd.pid"
    # No process is left in the mount namespace: dropping its last reference
    # tears down every mount made inside (containers' rootfs, volumes, pod
    # network namespace binds).
    if [ -e "$d/mnt" ]; then umount "$d/mnt" 2>/dev/null || umount -l "$d/mnt" 2>/dev/null || true; fi
    for c in $HIERARCHIES; do
        [ -d "/sys/fs/cgroup/$c/$ns" ] || continue
        for _ in $(seq 1 50); do
            find "/sys/fs/cgroup/$c/$ns" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [ -d "/sys/fs/cgroup/$c/$ns" ] || break
            sleep 0.1
        done
    done
    [ -e "/var/run/netns/$ns" ] && ip netns del "$ns" 2>/dev/null || true
}

cmd_down() {
    local dir=${1:?usage: cluster.sh down DIR} node ns pids
    [ -d "$dir" ] || return 0
    dir="$(cd "$dir" && pwd)"
    [ -n "$(tag_of "$dir")" ] || return 0
    for node in $(nodes_of "$dir"); do stop_node "$dir" "$node"; done
    stop_pidfile "$dir/cp/kube-scheduler.pid"
    stop_pidfile "$dir/cp/kube-controller-manager.pid"
    [ -d "$dir/cp" ] && bash "$here/control-plane.sh" down "$dir/cp"
    ns=$(cp_netns "$dir")
    if [ -e "/var/run/netns/$ns" ]; then
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    fi
    rm -f "$dir/tag" "$dir/node-names"
}

case "${1:-}" in
    images) cmd_images ;;
    env) cmd_env ;;
    up) shift; cmd_up "$@" ;;
    import) shift; cmd_import "$@" ;;
    kubectl) shift; d=${1:?usage: cluster.sh kubectl DIR ARGS}; shift; admin_kubectl "$d" "$@" ;;
    exec) shift; d=${1:?usage: cluster.sh exec DIR NODE CMD}; n=${2:?node}; shift 2; on_node "$d" "$n" "$@" ;;
    down) shift; cmd_down "$@" ;;
    stop-node) shift; d=${1:?usage: cluster.sh stop-node DIR NODE}; n=${2:?node}; d="$(cd "$d" && pwd)"; stop_node "$d" "$n" ;;
    *) sed -n '2,28p' "$0" >&2; exit 2 ;;
esac
