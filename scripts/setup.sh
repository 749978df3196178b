#!/usr/bin/env bash
# Install everything Starling's tests and lab need on a Debian 12 machine.
# Idempotent; run as root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages and creates network namespaces)" >&2
  exit 1
fi
mapfile -t pkgs < <(grep -v '^\s*#' "$here/.ci/packages" | sed '/^\s*$/d' | sort -u)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts packaged daemons where it can; the tests run their own.
for svc in bird frr; do
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
done
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  echo "setup.sh: note: cargo is in $HOME/.cargo/bin; add it to PATH" >&2
fi
# Debian's containerd package starts its daemon where systemd runs; the
# kubelet tests run one containerd per node of their own.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now containerd >/dev/null 2>&1 || true; fi
# --tests: also the Kubernetes the `k8s` and `kubelet` tests run
# (kube-apiserver, kubectl, kube-controller-manager, kube-scheduler, kubelet
# and cnitool built with Go; the pause and busybox images), cached in
# /var/cache/starling-k8s, so only the first run takes minutes.
if [ "${1:-}" = "--tests" ]; then
  export PATH="$PATH:/usr/local/go/bin"
  command -v go >/dev/null 2>&1 || { echo "setup.sh: the k8s tests build kube-apiserver with Go; install Go (https://go.dev/dl) into /usr/local/go" >&2; exit 1; }
  bash "$here/tests/k8s/control-plane.sh" build
  bash "$here/tests/k8s/cluster.sh" images
fi
echo "setup.sh: ready"
