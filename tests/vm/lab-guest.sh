#!/bin/sh
# Runs inside the IPIP VM (tests/vm/ipip-vm.sh, GUEST_CMD): the whole lab, as a user runs it,
# with the kernel's ipip module: `starlingctl lab up` with real starling-agents (BGP mesh
# between them, no top-of-rack router), pods wired by the real `starling` CNI binary,
# `lab check` (the ping matrix and the outside host through the nodes' masquerade), and
# tunl0's packet counters showing pod traffic encapsulated.
#   1. --encapsulation ipip, flat underlay, 2 nodes: every pod pair answers, node1 routes
#      node2's block `via 192.0.2.12 dev tunl0 onlink`, a pod ping is counted on both tunl0s.
#   2. --encapsulation cross-subnet --underlay two-subnets, 3 nodes: node1 -> node3 (same
#      subnet) plain on eth0, tunl0 counter flat; node1 -> node2 (across the router) through
#      tunl0; the router forwards IPIP (IP protocol 4) and never a plain pod packet.
# Prints "LAB_VM <check>: ok|FAIL" lines; exits non-zero when any check fails.
ip() { /sbin/ip "$@"; }   # busybox would otherwise run its own, limited ip applet
export PATH=/sbin:/bin
FAIL=0
chk() { n=$1; shift; if "$@"; then echo "LAB_VM $n: ok"; else echo "LAB_VM $n: FAIL"; FAIL=1; fi; }
# libcrc32c (under nf_tables) asks the crypto API for crc32c, which busybox's modprobe does
# not load by itself (a softdep); crc32c-intel needs SSE4.2, which TCG's CPU lacks.
for m in crc32c_generic bridge nft_chain_nat nft_masq; do modprobe $m || echo "modprobe $m failed"; done
t0=$(cut -d' ' -f1 /proc/uptime)
stamp() { echo "LAB_VM_TIME $1 $(cut -d' ' -f1 /proc/uptime) (started $t0)"; }

ctl() { /bin/starlingctl lab "$@"; }
# The first address of pod `node-podK` of lab $1, from `lab status`.
pod_ip() { ctl status --name "$1" | awk -v p="$2" '$1 == "pod" && $2 == p { print $4 }'; }
counter() { # lab node dir(tx|rx)
  ip netns exec "$1-$2" cat "/sys/class/net/tunl0/statistics/$3_packets"
}
ping20() { ip netns exec "$1-$2-pod1" ping -q -c 20 -i 0.05 -W 2 "$3" >/dev/null; }
dump() {
  ctl status --name "$1"
  for d in /run/starling-lab/"$1"/node*; do echo "--- $d/agent.log"; tail -n 30 "$d/agent.log"; done
}

# --- 1: IPIP Always, one subnet ------------------------------------------------------------
L=ipip
chk up_ipip ctl up --name $L --nodes 2 --pods-per-node 1 --encapsulation ipip \
  --agent-bin /bin/starling-agent --cni-bin /bin/starling
stamp up_ipip
ctl check --name $L > /tmp/check-$L.txt; rc=$?
cat /tmp/check-$L.txt
chk ipip_check_exit_0 [ $rc = 0 ]
chk ipip_all_pairs grep -q "2 of 2 pairs answer" /tmp/check-$L.txt
chk ipip_outside grep -q "2 of 2 pods reach the outside host" /tmp/check-$L.txt
echo "--- $L-node1: ip route show proto 73"; ip -n $L-node1 route show proto 73
chk ipip_route_via_tunl0 sh -c "/sbin/ip -n $L-node1 route show proto 73 | grep -q 'via 192.0.2.12 dev tunl0 onlink'"
to=$(pod_ip $L node2-pod1)
tx0=$(counter $L node1 tx); rx0=$(counter $L node2 rx)
chk ipip_pod_ping ping20 $L node1 "$to"
tx1=$(counter $L node1 tx); rx1=$(counter $L node2 rx)
echo "LAB_VM ipip tunl0 node1 tx $tx0 -> $tx1, node2 rx $rx0 -> $rx1 (pod1 -> $to)"
chk ipip_tunl0_tx_counted [ $((tx1 - tx0)) -ge 20 ]
chk ipip_tunl0_rx_counted [ $((rx1 - rx0)) -ge 20 ]
[ $FAIL = 0 ] || dump $L
chk down_ipip ctl down --name $L
stamp down_ipip

# --- 2: IPIP CrossSubnet, two subnets joined by a router ----------------------------------
L=ipcs
chk up_cross_subnet ctl up --name $L --nodes 3 --pods-per-node 1 --encapsulation cross-subnet \
  --underlay two-subnets --agent-bin /bin/starling-agent --cni-bin /bin/starling
stamp up_cross_subnet
ctl check --name $L > /tmp/check-$L.txt; rc=$?
cat /tmp/check-$L.txt
chk cs_check_exit_0 [ $rc = 0 ]
chk cs_all_pairs grep -q "6 of 6 pairs answer" /tmp/check-$L.txt
echo "--- $L-node1: ip route show proto 73"; ip -n $L-node1 route show proto 73
chk cs_same_subnet_plain sh -c "/sbin/ip -n $L-node1 route show proto 73 | grep -q 'via 192.0.2.13 dev eth0'"
chk cs_other_subnet_tunl0 sh -c "/sbin/ip -n $L-node1 route show proto 73 | grep -q 'via 198.51.100.12 dev tunl0 onlink'"
tx0=$(counter $L node1 tx)
chk cs_ping_same_subnet ping20 $L node1 "$(pod_ip $L node3-pod1)"
tx1=$(counter $L node1 tx)
chk cs_ping_other_subnet ping20 $L node1 "$(pod_ip $L node2-pod1)"
tx2=$(counter $L node1 tx)
echo "LAB_VM cross-subnet tunl0 node1 tx $tx0 -> $tx1 (to node3) -> $tx2 (to node2)"
chk cs_same_subnet_not_encapsulated [ "$tx1" = "$tx0" ]
chk cs_other_subnet_encapsulated [ $((tx2 - tx1)) -ge 20 ]
ip netns exec $L-rtr nft list table ip starling_lab > /tmp/rtr.txt
cat /tmp/rtr.txt
chk cs_router_no_plain_pod_packet grep -q 'counter packets 0 bytes 0 comment "plain_pod"' /tmp/rtr.txt
ipip_fwd=$(awk '/comment "ipip"/ { for (i = 1; i < NF; i++) if ($i == "packets") print $(i + 1) }' /tmp/rtr.txt)
echo "LAB_VM cross-subnet router forwarded ${ipip_fwd:-?} IPIP packets"
chk cs_router_forwarded_ipip [ "${ipip_fwd:-0}" -ge 40 ]
[ $FAIL = 0 ] || dump $L
chk down_cross_subnet ctl down --name $L
stamp down_cross_subnet
exit $FAIL
