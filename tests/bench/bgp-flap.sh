#!/bin/bash
# Flap: one iBGP peer re-announces one prefix FLAPS times (default
# 1,000,000) per round, ROUNDS rounds (default 3) on one session, each time
# with the next MED, into a fresh starling-bgpd in a
# private network namespace; prints the daemon's RSS and interned
# attribute-set count before and after (issue 14: 1M flaps must leave both
# flat). Not run by CI.
#
#   tests/bench/bgp-flap.sh
#   FLAPS=100000 tests/bench/bgp-flap.sh
#
# Prints JSON lines {"bench":"bgp-flap","impl":"starling",...}.
set -euo pipefail
cd "$(dirname "$0")/../.."
FLAPS=${FLAPS:-1000000}
ROUNDS=${ROUNDS:-3}
. tests/bench/bgp-bench-lib.sh
bench_setup bgp-flap

conf=$WORK/bgpd.yaml
sock=$WORK/bgpd.sock
cat >"$conf" <<YAML
router_id: 192.0.2.1
asn: 65000
listen: ["127.0.0.2:179"]
control_socket: $sock
hold_time: 90
peers:
  - address: 127.1.0.1
    asn: 65000
    passive: true
YAML
echo "# bgp-flap: $FLAPS flaps; $(nproc) cpus; $(uname -r); load:$(uptime | sed 's/.*load average//')" >&2
start_bgpd "$conf" "$sock"
inns "$LOADGEN" flap --target 127.0.0.2:179 --impl starling --flaps "$FLAPS" --rounds "$ROUNDS" \
    --socket "$sock" --daemon-pid "$DAEMON_PID"
stop_daemon
echo "# load at the end:$(uptime | sed 's/.*load average//')" >&2
