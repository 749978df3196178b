#!/bin/sh
# Runs inside the IPIP VM (tests/vm/ipip-vm.sh, GUEST_CMD): two namespace "nodes" x and y on
# one veth link, a pod on each, our reconciler (fib-node) in each node installing IPIP routes
# `block via nodeIP dev tunl0 onlink`; then a pod-to-pod ping that must cross tunl0.
# Prints "FIB_VM <check>: ok|FAIL" lines; exits non-zero when any check fails.
ip() { /sbin/ip "$@"; }   # busybox would otherwise run its own, limited ip applet
FAIL=0
chk() { n=$1; shift; if "$@"; then echo "FIB_VM $n: ok"; else echo "FIB_VM $n: FAIL"; FAIL=1; fi; }

for n in x y px py; do ip netns add $n; ip -n $n link set lo up; done
ip link add hx netns x type veth peer name hy netns y
ip -n x addr add 198.51.100.1/24 dev hx; ip -n x link set hx up
ip -n y addr add 198.51.100.2/24 dev hy; ip -n y link set hy up
# proxy_arp answers only for routable gateways: give each node a default route.
ip -n x route add default via 198.51.100.2
ip -n y route add default via 198.51.100.1
pod() { # node pod hostif addr
  ip link add "$3" netns "$1" type veth peer name eth0 netns "$2"
  ip -n "$1" link set "$3" up
  ip -n "$2" addr add "$4/32" dev eth0; ip -n "$2" link set eth0 up
  ip -n "$2" route add 169.254.1.1 dev eth0 scope link
  ip -n "$2" route add default via 169.254.1.1 dev eth0
}
pod x px cx 10.1.1.5
pod y py cy 10.1.2.5

start() { # node tunnel-address routes-json
  echo "$3" | ip netns exec "$1" /bin/fib-node --uplink "h$1" --tunnel-address "$2" --status "/tmp/$1.json" \
    2>"/tmp/$1.log" &
}
start x 10.1.1.1 '[{"dst":"10.1.1.0/26","target":"blackhole"},{"dst":"10.1.1.5/32","target":{"device":"cx"}},{"dst":"10.1.2.0/26","target":{"via":[{"gateway":"198.51.100.2","encap":"Ipip"}]}},{"dst":"10.1.3.0/26","target":{"via":[{"gateway":"203.0.113.2","encap":"CrossSubnet"}]}},{"dst":"10.1.4.0/26","target":{"via":[{"gateway":"198.51.100.2","encap":"CrossSubnet"}]}}]'
start y 10.1.2.1 '[{"dst":"10.1.2.0/26","target":"blackhole"},{"dst":"10.1.2.5/32","target":{"device":"cy"}},{"dst":"10.1.1.0/26","target":{"via":[{"gateway":"198.51.100.1","encap":"Ipip"}]}}]'

applied() { grep -q '"generation": 1' "/tmp/$1.json" 2>/dev/null; }
i=0; while ! { applied x && applied y; } && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
chk reconcilers_applied applied x
chk reconcilers_applied_y applied y
echo "--- x: ip route show proto 73"; ip -n x route show proto 73
chk route_via_tunl0_onlink sh -c 'ip() { /sbin/ip "$@"; }; ip -n x route show proto 73 | grep -q "^10.1.2.0/26 via 198.51.100.2 dev tunl0 onlink"'
chk cross_subnet_other_subnet_via_tunl0 sh -c '/sbin/ip -n x route show proto 73 | grep -q "^10.1.3.0/26 via 203.0.113.2 dev tunl0 onlink"'
chk cross_subnet_same_subnet_plain sh -c '/sbin/ip -n x route show proto 73 | grep -q "^10.1.4.0/26 via 198.51.100.2 dev hx"'
chk tunl0_up sh -c '/sbin/ip -n x link show tunl0 | grep -q "UP"'
chk tunl0_mtu_1480 sh -c '/sbin/ip -n x link show tunl0 | grep -q "mtu 1480"'
chk tunl0_address sh -c '/sbin/ip -n x addr show tunl0 | grep -q "inet 10.1.1.1/32"'
chk ipip_ready_in_status grep -q '"state": "ready"' /tmp/x.json
chk rp_filter_loose_on_tunl0 sh -c '[ "$(/sbin/ip netns exec x cat /proc/sys/net/ipv4/conf/tunl0/rp_filter)" = 2 ]'

rx() { ip netns exec y cat /sys/class/net/tunl0/statistics/rx_packets; }
before=$(rx)
chk pod_ping_across_tunnel ip netns exec px ping -c 5 -W 2 10.1.2.5
after=$(rx)
echo "FIB_VM tunl0_rx_packets_in_y before=$before after=$after"
chk ping_crossed_tunl0 [ $((after - before)) -ge 5 ]
if [ $FAIL != 0 ]; then
  for n in x y; do echo "--- $n: status"; cat /tmp/$n.json; echo "--- $n: log"; cat /tmp/$n.log; done
  ip -n x addr show tunl0
fi
exit $FAIL
