#!/bin/sh
# Runs inside the IPIP VM (tests/vm/ipip-vm.sh, GUEST_CMD) for tests/bench/pod-throughput-vm.sh:
# a 2-node lab per mode (MODES, default "none ipip vxlan"), iperf3 TCP from node1's pod to
# node2's pod, DURATION seconds, REPEAT runs; prints one line per run:
#   TP_VM <mode> <run> <Mbit/s received>
ip() { /sbin/ip "$@"; }
export PATH=/sbin:/bin
for m in crc32c_generic bridge nft_chain_nat nft_masq vxlan; do modprobe $m || echo "modprobe $m failed"; done
. /bin/throughput.env 2>/dev/null
FAIL=0
for mode in ${MODES:-none ipip vxlan}; do
  L=tp$mode
  if ! /bin/starlingctl lab up --name $L --nodes 2 --pods-per-node 1 --encapsulation $mode \
      --agent-bin /bin/starling-agent --cni-bin /bin/starling >/tmp/up.log 2>&1; then
    echo "TP_VM $mode: lab up failed"; cat /tmp/up.log; FAIL=1; continue
  fi
  dst=$(/bin/starlingctl lab status --name $L | awk '$1 == "pod" && $2 == "node2-pod1" { print $4 }')
  echo "TP_VM_ROUTES $mode: $(ip -n $L-node1 route show proto 73 | grep -v blackhole | tr '\n' ';')"
  for run in $(seq ${REPEAT:-3}); do
    ip netns exec $L-node2-pod1 iperf3 -s -1 -D
    got=""
    for i in $(seq 50); do
      if ip netns exec $L-node1-pod1 iperf3 -c "$dst" -t ${DURATION:-5} -f m >/tmp/tp.txt 2>&1; then
        got=$(awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i + 1) == "Mbits/sec") print $i }' /tmp/tp.txt)
        break
      fi
      sleep 0.2   # the server daemonising: retry the connection
    done
    if [ -n "$got" ]; then echo "TP_VM $mode $run $got"; else echo "TP_VM $mode $run failed"; cat /tmp/tp.txt; FAIL=1; fi
  done
  for dev in tunl0 vxlan.starling; do
    c=$(ip netns exec $L-node2 cat /sys/class/net/$dev/statistics/rx_packets 2>/dev/null) && echo "TP_VM_COUNTER $mode node2 $dev rx_packets $c"
  done
  /bin/starlingctl lab down --name $L >/dev/null 2>&1
done
exit $FAIL
