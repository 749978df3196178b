#!/bin/bash
# Run IPIP checks in a throw-away QEMU VM booted with the Debian kernel, because the host
# kernel here has no CONFIG_NET_IPIP.  Adapted from the team's shared recipe; the FIB system
# test (tests/tests/fib.rs, ipip_*_in_a_vm) runs its guest script through it.  Needs (Debian 12):
#   apt-get install -y --no-install-recommends qemu-system-x86 linux-image-amd64 busybox-static \
#       kmod cpio xz-utils bc iproute2 iputils-ping
#
#   ./ipip-vm.sh                 # build initramfs + boot under TCG emulation (default)
#   ACCEL=kvm ./ipip-vm.sh       # try KVM (fails on hosts that only offer nested PVM)
#   EXTRA_BINS="/path/to/test-binary ..." GUEST_CMD="/bin/test-binary --nocapture" ./ipip-vm.sh
#        -> copies binaries (+ their ldd libraries) into the initramfs and runs GUEST_CMD
#           after the built-in checks; its exit code is reported as GUEST_CMD_RC=<n>.
#           ELF binaries are copied stripped (the agent is ~120 MB with line tables, ~19 MB
#           without: the initramfs lives in the guest's RAM).
#   EXTRA_MODS="bridge nft_masq ..."   # more kernel modules (with their dependencies) for
#           modprobe in GUEST_CMD; MEM (MiB) and TIMEOUT (s) for bigger guest work.
# Exit status: 0 if every guest check passed (guest prints IPIP_VM_RESULT=PASS).
set -euo pipefail
W=${W:-/tmp/ipip-vm-$$}
KVER=${KVER:-$(ls /lib/modules | grep -- '-amd64$' | sort -V | tail -1)}
BZIMAGE=/boot/vmlinuz-$KVER
# BOOT=pvh (default): boot the *uncompressed* ELF vmlinux via QEMU's PVH entry
# (Debian has CONFIG_PVH=y).  Skips SeaBIOS real-mode loading + in-guest xz decompression,
# which under TCG costs ~6-7 s.  BOOT=bzimage: classic -kernel /boot/vmlinuz-*.
BOOT=${BOOT:-pvh}
ACCEL=${ACCEL:-tcg}   # kvm: see note below (this host only offers PVM-nested KVM)
MEM=${MEM:-512}
TIMEOUT=${TIMEOUT:-120}
MODS="ipip veth ${EXTRA_MODS:-}"
EXTRA_BINS=${EXTRA_BINS:-}
GUEST_CMD=${GUEST_CMD:-}
QEMU_EXTRA=${QEMU_EXTRA:-}   # e.g. "-M microvm" or "-bios /usr/share/qemu/qboot.rom"

R=$W/root
trap 'rm -rf "$R" "$W/initramfs.cpio"' EXIT
[ -e "$BZIMAGE" ] || { echo "no $BZIMAGE: install the Debian package linux-image-amd64" >&2; exit 2; }
rm -rf "$R"; mkdir -p "$R"/{bin,sbin,proc,sys,dev,run,tmp,etc,lib64,usr/lib} "$R/lib/modules/$KVER"
mkdir -p "$R/var"; ln -s ../run "$R/var/run"   # /var/run/netns: where CNI callers name pod namespaces

# --- userspace: busybox (static) + real iproute2 'ip' with its shared libs ---------------
cp /bin/busybox "$R/bin/busybox"
copy_bin() { # copy a dynamically linked binary and the libraries ldd reports
  local b=$1 dst=$2
  cp -L "$b" "$R$dst"
  if head -c 4 "$R$dst" | grep -q ELF; then strip "$R$dst" 2>/dev/null || true; fi
  for l in $(ldd "$b" 2>/dev/null | grep -o '/[^ ]*'); do
    mkdir -p "$R$(dirname "$l")"; cp -Ln "$l" "$R$l" 2>/dev/null || true
  done
}
copy_bin /usr/sbin/ip /sbin/ip
for b in $EXTRA_BINS; do copy_bin "$b" "/bin/$(basename "$b")"; done

# --- kernel modules: ipip (+ tunnel4, ip_tunnel) and veth, then depmod for modprobe -------
for m in $(modprobe -a -S "$KVER" --show-depends $MODS | awk '$1=="insmod"{print $2}'); do
  mkdir -p "$R$(dirname "$m")"; cp "$m" "$R$m"
done
cp /lib/modules/$KVER/modules.{order,builtin,builtin.modinfo} "$R/lib/modules/$KVER/" 2>/dev/null || true
depmod -b "$R" "$KVER"

# --- /init ----------------------------------------------------------------------------
cat > "$R/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
# Debian's busybox-static prefers its own applets over $PATH (FEATURE_SH_STANDALONE), so
# bare 'ip' would be busybox's limited ip: route every 'ip' call to real iproute2.
ip() { /sbin/ip "$@"; }
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /run; mount -t tmpfs tmp /tmp
# devtmpfs has no /dev/fd or /dev/stdin (udev makes them); nft -f /dev/stdin needs them.
ln -s /proc/self/fd /dev/fd; ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr
echo "GUEST_INIT_START uptime=$(cut -d' ' -f1 /proc/uptime)s kernel=$(uname -r)"
FAIL=0
chk() { local name=$1; shift; if "$@"; then echo "CHECK $name: ok"; else echo "CHECK $name: FAIL"; FAIL=1; fi; }

ip link set lo up
chk modprobe_ipip modprobe ipip
chk tunl0_exists ip link show tunl0
modprobe veth

if [ -f /guest_cmd ]; then
  sh /guest_cmd; rc=$?; echo "GUEST_CMD_RC=$rc"; [ $rc = 0 ] || FAIL=1
fi
[ $FAIL = 0 ] && echo "IPIP_VM_RESULT=PASS" || echo "IPIP_VM_RESULT=FAIL"
echo "GUEST_INIT_END uptime=$(cut -d' ' -f1 /proc/uptime)s"
poweroff -f
EOF
chmod +x "$R/init"
[ -n "$GUEST_CMD" ] && printf '%s\n' "$GUEST_CMD" > "$R/guest_cmd"

# --- kernel image ---------------------------------------------------------------------------
if [ "$BOOT" = pvh ]; then
  # The extracted kernel is shared between runs (KCACHE); written under a temporary name
  # and renamed, so parallel runs never boot a half-written one.
  KCACHE=${KCACHE:-/tmp/ipip-vm-kernel}
  mkdir -p "$KCACHE"
  KERNEL=$KCACHE/vmlinux-$KVER
  if [ ! -s "$KERNEL" ]; then   # Debian bzImage payload is xz (CONFIG_KERNEL_XZ=y)
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$BZIMAGE" | head -1 | cut -d: -f1)
    tail -c +$((off + 1)) "$BZIMAGE" | xz -dc > "$KERNEL.$$" 2>/dev/null || true  # trailing junk -> xz rc!=0
    head -c 4 "$KERNEL.$$" | grep -q ELF || { rm -f "$KERNEL.$$"; echo "vmlinux extraction failed" >&2; exit 2; }
    mv "$KERNEL.$$" "$KERNEL"
  fi
else
  KERNEL=$BZIMAGE
fi

# --- pack (uncompressed cpio: fastest to unpack) -----------------------------------------
(cd "$R" && find . | cpio -o -H newc --quiet) > "$W/initramfs.cpio"

# --- boot ---------------------------------------------------------------------------------
# NOTE on KVM here: /dev/kvm is backed by kvm_pvm (nested_pvm=1, "PVM" pagetable-based
# virtualization), which only runs PVM-enabled guest kernels.  With the stock Debian kernel:
#   -enable-kvm -cpu host  -> "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"
#                             + assertion `ret == cpu->kvm_msr_buf->nmsrs' failed (abort)
#   -enable-kvm [-cpu qemu64|host,-arch-capabilities] -> guest hangs silently right after
#                             the boot loader (no earlyprintk output), both bzImage and PVH.
# So TCG is the default and is fast enough (~3 s to /init with PVH).
case $ACCEL in
  kvm) ACC=(-enable-kvm -cpu host,-arch-capabilities) ;;
  tcg) ACC=(-accel tcg) ;;
esac
t0=$(date +%s.%N)
set +e
timeout "$TIMEOUT" qemu-system-x86_64 "${ACC[@]}" -M q35 -m "$MEM" -smp 1 -nographic -no-reboot -nic none $QEMU_EXTRA \
  -kernel "$KERNEL" -initrd "$W/initramfs.cpio" \
  -append 'console=ttyS0 quiet panic=-1 loglevel=3' </dev/null 2>&1 |
  while IFS= read -r line; do
    printf '[host +%6.2fs] %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$line"
  done | tee "$W/console-$ACCEL.log"
set -e
t1=$(date +%s.%N)
echo "TOTAL_WALL_${ACCEL}=$(echo "$t1 - $t0" | bc)s"
grep -q 'IPIP_VM_RESULT=PASS' "$W/console-$ACCEL.log"
