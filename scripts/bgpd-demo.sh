#!/usr/bin/env bash
# The standalone speaker's demo: install what is missing, build, and show
# starling-bgpd peering with a real BIRD in network namespaces, printing both
# sides' view. Cleans up after itself, also on failure.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
bash "$here/scripts/setup.sh"
echo "bgpd-demo: building (release)"
cargo build --release --manifest-path "$here/Cargo.toml" -p starling-bgpd
[ -n "${CARGO_TARGET_DIR:-}" ] && here_target=$CARGO_TARGET_DIR || here_target="$here/target"
bgpd="$here_target/release/starling-bgpd"
P=stqs$$-
W=$(mktemp -d /tmp/starling-bgpd-demo.XXXX)
cleanup() {
  [ -f "$W/bgpd.pid" ] && kill "$(cat "$W/bgpd.pid")" 2>/dev/null || true
  [ -f "$W/bird.pid" ] && kill "$(cat "$W/bird.pid")" 2>/dev/null || true
  ip netns del ${P}tor 2>/dev/null || true
  ip netns del ${P}node 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
echo "bgpd-demo: namespaces ${P}tor (BIRD, AS 65000) and ${P}node (starling-bgpd, AS 65010)"
ip netns add ${P}tor; ip netns add ${P}node
ip link add eth0 netns ${P}tor type veth peer name eth0 netns ${P}node
for n in tor node; do ip -n $P$n link set lo up; done
ip -n ${P}tor addr add 192.0.2.1/24 dev eth0; ip -n ${P}tor addr add 2001:db8::1/64 dev eth0 nodad
ip -n ${P}node addr add 192.0.2.2/24 dev eth0; ip -n ${P}node addr add 2001:db8::2/64 dev eth0 nodad
ip -n ${P}tor link set eth0 up; ip -n ${P}node link set eth0 up
cat > "$W/bird.conf" <<EOB
router id 192.0.2.1;
protocol device {}
protocol static tor4 { ipv4; route 10.10.0.0/24 blackhole; }
protocol static tor6 { ipv6; route 2001:db8:10::/48 blackhole; }
template bgp node { hold time 9; keepalive time 3; connect retry time 2; connect delay time 0; }
protocol bgp node4 from node { local 192.0.2.1 as 65000; neighbor 192.0.2.2 as 65010; ipv4 { import all; export all; }; }
protocol bgp node6 from node { local 2001:db8::1 as 65000; neighbor 2001:db8::2 as 65010; ipv6 { import all; export all; }; }
EOB
cat > "$W/bgpd.yaml" <<EOB
router_id: 192.0.2.2
asn: 65010
control_socket: $W/bgpd.sock
hold_time: 9
connect_retry: 2
prefixes: [10.20.0.0/24, "2001:db8:20::/48"]
peers:
  # eBGP needs a policy both ways (RFC 8212): accept the ToR's routes, send our own.
  - address: 192.0.2.1
    asn: 65000
    description: "BIRD top-of-rack (IPv4)"
    import: [{prefix: 10.0.0.0/8, le: 32, action: accept}]
    export: [{prefix: 10.20.0.0/16, le: 32, action: accept}]
  - address: "2001:db8::1"
    asn: 65000
    description: "BIRD top-of-rack (IPv6)"
    import: [{prefix: "2001:db8::/32", le: 128, action: accept}]
    export: [{prefix: "2001:db8:20::/48", action: accept}]
EOB
ip netns exec ${P}tor bird -c "$W/bird.conf" -s "$W/bird.ctl" -P "$W/bird.pid"
"$bgpd" --config "$W/bgpd.yaml" --check
ip netns exec ${P}node "$bgpd" --config "$W/bgpd.yaml" > "$W/bgpd.log" 2>&1 &
echo $! > "$W/bgpd.pid"
echo -n "bgpd-demo: waiting for both sessions to reach Established and exchange routes"
for i in $(seq 100); do
  n=$("$bgpd" show sessions --socket "$W/bgpd.sock" -o json 2>/dev/null | grep -c '"Established"' || true)
  r=$("$bgpd" show routes --socket "$W/bgpd.sock" -o json 2>/dev/null | grep -c '"best": true' || true)
  [ "$n" = 2 ] && [ "$r" = 4 ] && break
  echo -n .; sleep 0.2
done
echo
echo "=== starling-bgpd: sessions"
"$bgpd" show sessions --socket "$W/bgpd.sock"
echo "=== starling-bgpd: routes"
"$bgpd" show routes --socket "$W/bgpd.sock"
echo "=== BIRD (the peer's own view)"
birdc -s "$W/bird.ctl" show route
[ "$n" = 2 ] && [ "$r" = 4 ] || { echo "bgpd-demo: FAILED: sessions not Established or routes missing; log:"; cat "$W/bgpd.log"; exit 1; }
echo "bgpd-demo: ok"
