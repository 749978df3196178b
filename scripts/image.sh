#!/usr/bin/env bash
# The Starling image, built with no registry and no container engine: the
# release binaries plus the shared libraries they link (nothing else: the
# agent execs no program), written as a docker-archive tar that
# `ctr images import`, `podman load` and `docker load` accept.
#
#   image.sh build [--tag REF] [--out FILE]   stage the rootfs and write the archive
#            (default tag localhost/starling:<workspace version>,
#             default file target/image/starling.tar)
#   image.sh rootfs DIR        only stage the image's files into DIR (the
#                              Containerfile at the repository root copies it:
#                              `podman build -f Containerfile -t REF DIR`)
#   image.sh archive ROOTFS TAG OUT CMD...   any directory as a one-layer
#                              image (the tests' pause and busybox images)
#
# Binaries come from target/release (built with `cargo build --release` when
# STARLING_BIN_DIR is unset) or from $STARLING_BIN_DIR as they are.
# File times are fixed ($SOURCE_DATE_EPOCH, default: the last commit's time),
# owners are root, entries sorted: the same binaries give the same image ID.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "image.sh: $*" >&2; exit 1; }

# Where install-cni copies the plugin from (agent/src/install.rs,
# DEFAULT_CNI_BINARY); the DaemonSet runs `starling-agent` from PATH.
PLUGIN_PATH=/opt/starling/bin/starling
BIN_DIR_IN_IMAGE=/usr/local/bin
IMAGE_PATH_ENV="PATH=/usr/local/bin:/usr/bin:/bin:/opt/starling/bin"

epoch() {
    if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
        echo "$SOURCE_DATE_EPOCH"
    else
        git -C "$here" log -1 --format=%ct 2>/dev/null || echo 0
    fi
}

binaries() { # -> dir holding starling-agent, starlingctl, starling
    local dir=${STARLING_BIN_DIR:-}
    if [ -z "$dir" ]; then
        command -v cargo >/dev/null || die "needs \`cargo\` to build the release binaries (or set STARLING_BIN_DIR)"
        (cd "$here" && cargo build --release -p starling-agent -p starling-cni --bins) >&2 ||
            die "cargo build --release failed"
        dir="$here/target/release"
    fi
    for b in starling-agent starlingctl starling; do
        [ -x "$dir/$b" ] || die "$dir/$b is missing (cargo build --release builds it)"
    done
    echo "$dir"
}

cmd_rootfs() {
    local root=${1:?usage: image.sh rootfs DIR} bins
    command -v ldd >/dev/null || die "needs \`ldd\` (Debian package libc-bin)"
    command -v strip >/dev/null || die "needs \`strip\` (Debian package binutils)"
    bins=$(binaries)
    rm -rf "$root"
    mkdir -p "$root$BIN_DIR_IN_IMAGE" "$root$(dirname "$PLUGIN_PATH")" "$root/tmp"
    chmod 1777 "$root/tmp"
    # The release profile keeps line tables for backtraces on the build
    # machine; the image drops them (symbols stay, so panics still name
    # functions).
    strip --strip-debug -o "$root$BIN_DIR_IN_IMAGE/starling-agent" "$bins/starling-agent"
    strip --strip-debug -o "$root$BIN_DIR_IN_IMAGE/starlingctl" "$bins/starlingctl"
    strip --strip-debug -o "$root$PLUGIN_PATH" "$bins/starling"
    # natOutgoing runs `nft` (docs/nat.md): the build machine's, with its
    # libraries below.
    local nft
    nft=$(command -v nft) || die "needs \`nft\` for natOutgoing in the image (Debian package nftables)"
    cp "$nft" "$root$BIN_DIR_IN_IMAGE/nft"
    # Every library the three binaries and nft link, at the path the loader looks
    # for it, with the symlinks on the way (/lib -> usr/lib on Debian 12).
    local libs
    libs=$(for b in "$bins/starling-agent" "$bins/starlingctl" "$bins/starling" "$nft"; do
        ldd "$b" | awk '/=> \// {print $3} /^[ \t]*\// {print $1}'
    done | sort -u)
    [ -n "$libs" ] || die "ldd found no libraries: are the binaries dynamically linked?"
    python3 - "$root" $libs <<'PY'
import os, shutil, sys
root, paths = sys.argv[1], sys.argv[2:]
def place(path, depth=0):
    """Copy `path` into root as the host resolves it: each symlink met on the
    way becomes the same symlink in root, the final file a copy."""
    if depth > 40:
        sys.exit(f"image.sh: symlink loop at {path}")
    parts, cur = path.strip("/").split("/"), ""
    for i, part in enumerate(parts):
        cur = f"{cur}/{part}"
        dest = root + cur
        if os.path.islink(cur):
            target = os.readlink(cur)
            if not os.path.lexists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.symlink(target, dest)
            resolved = os.path.normpath(os.path.join(os.path.dirname(cur), target))
            rest = "/".join(parts[i + 1:])
            return place(resolved + ("/" + rest if rest else ""), depth + 1)
        if i == len(parts) - 1:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(cur, dest)
for p in paths:
    place(p)
PY
    echo "$root"
}

# One-layer docker-archive (manifest.json + config + layer.tar), as
# `docker save` writes it. Deterministic: sorted entries, root-owned, fixed
# mtimes, no PAX extras.
cmd_archive() {
    local rootfs=${1:?usage: image.sh archive ROOTFS TAG OUT CMD...} tag=${2:?tag} out=${3:?out}
    shift 3
    [ $# -gt 0 ] || die "archive: give the image's command"
    [ -d "$rootfs" ] || die "archive: $rootfs is not a directory"
    command -v python3 >/dev/null || die "needs \`python3\` (Debian package python3)"
    mkdir -p "$(dirname "$out")"
    python3 - "$rootfs" "$tag" "$out" "$(epoch)" "$IMAGE_PATH_ENV" "$@" <<'PY'
import hashlib, io, json, os, stat, sys, tarfile, time
rootfs, tag, out, epoch, path_env, cmd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6:]

def layer_tar():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        entries = []
        for d, dirs, files in os.walk(rootfs):
            dirs.sort()
            for n in sorted(dirs + files):
                entries.append(os.path.join(d, n))
        for full in sorted(entries, key=lambda p: os.path.relpath(p, rootfs)):
            rel = os.path.relpath(full, rootfs)
            ti = t.gettarinfo(full, arcname=rel)
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            ti.mtime = epoch
            if ti.isreg():
                with open(full, "rb") as f:
                    t.addfile(ti, f)
            else:
                t.addfile(ti)
    return buf.getvalue()

layer = layer_tar()
layer_id = hashlib.sha256(layer).hexdigest()
created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
config = json.dumps({
    "architecture": "amd64",
    "os": "linux",
    "created": created,
    "config": {"Env": [path_env], "Cmd": cmd, "WorkingDir": "/",
               "Labels": {"org.opencontainers.image.title": tag.rsplit("/", 1)[-1].split(":")[0]}},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + layer_id]},
    "history": [{"created": created, "created_by": "scripts/image.sh archive"}],
}, sort_keys=True, separators=(",", ":")).encode()
config_id = hashlib.sha256(config).hexdigest()
manifest = json.dumps([{"Config": config_id + ".json", "RepoTags": [tag],
                        "Layers": [layer_id + "/layer.tar"]}], separators=(",", ":")).encode()
repositories = json.dumps({tag.rsplit(":", 1)[0]: {tag.rsplit(":", 1)[1]: layer_id}}).encode()

tmp = out + ".tmp"
with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as t:
    def add(name, data, mode=0o644, kind=tarfile.REGTYPE):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime = kind, mode, epoch
        ti.size = len(data) if kind == tarfile.REGTYPE else 0
        t.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    add(layer_id, b"", 0o755, tarfile.DIRTYPE)
    add(layer_id + "/layer.tar", layer)
    add(config_id + ".json", config)
    add("manifest.json", manifest)
    add("repositories", repositories)
os.replace(tmp, out)
print(f"{tag} {out} image-id sha256:{config_id} layer {len(layer)} bytes")
PY
}

cmd_build() {
    local tag="" out="" version root said size
    while [ $# -gt 0 ]; do
        case "$1" in
            --tag) tag=${2:?--tag REF}; shift 2 ;;
            --out) out=${2:?--out FILE}; shift 2 ;;
            *) die "build: unknown option $1" ;;
        esac
    done
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -1)
    tag=${tag:-localhost/starling:$version}
    out=${out:-$here/target/image/starling.tar}
    root="$(dirname "$out")/rootfs"
    cmd_rootfs "$root" >/dev/null
    said=$(cmd_archive "$root" "$tag" "$out" starling-agent run --config /etc/starling/agent.yaml)
    size=$(du -sb --apparent-size "$root" | cut -f1)
    echo "$said"
    echo "image $tag: $(( size / 1024 / 1024 )) MiB uncompressed ($size bytes in $(find "$root" -type f | wc -l) files)"
}

case "${1:-}" in
    build) shift; cmd_build "$@" ;;
    rootfs) shift; cmd_rootfs "$@" ;;
    archive) shift; cmd_archive "$@" ;;
    *) sed -n '2,19p' "$0" >&2; exit 2 ;;
esac
