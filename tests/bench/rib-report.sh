#!/bin/bash
# Issue 16's figures in one go: ingest (one attribute set per peer, and 10
# prefixes per set), reflector fan-out, full-table transit with churn, each
# starling-bgpd against BIRD 2 in the same run; the JSON lines go to
# OUT/NAME.json and one SVG per bench is drawn from them by plot.py.
#
#   tests/bench/rib-report.sh docs/img/rib        # OUT defaults to target/rib-report
#   REPS=3 SKIP_BUILD=1 tests/bench/rib-report.sh OUT
#
# Takes about 10 minutes on 2 vCPUs (the transit run alone about 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/rib-report}
REPS=${REPS:-3}
mkdir -p "$OUT"
B=tests/bench
run() { # name script [env...]
    local name=$1 script=$2; shift 2
    echo "# rib-report: $name" >&2
    env "$@" "$B/$script" >"$OUT/$name.json"
}
run ingest bgp-ingest.sh REPS="$REPS"
run ingest-per-set-10 bgp-ingest.sh REPS="$REPS" PER_SET=10 SKIP_BUILD=1
run fanout-500 rr-fanout.sh REPS="$REPS" CLIENTS=500 SKIP_BUILD=1
run transit transit.sh REPS=1 SKIP_BUILD=1
P="python3 $B/plot.py"
$P bars "$OUT/ingest.json" "$OUT/ingest.svg" bgp-ingest time_to_loc_rib,cpu_time,peak_rss \
    "Ingest, 10 iBGP peers x 100,000 prefixes, one attribute set per peer"
$P bars "$OUT/ingest-per-set-10.json" "$OUT/ingest-per-set-10.svg" bgp-ingest time_to_loc_rib,cpu_time,peak_rss \
    "Ingest, 10 iBGP peers x 100,000 prefixes, 10 prefixes per attribute set"
$P bars "$OUT/fanout-500.json" "$OUT/fanout-500.svg" rr-fanout time_all_clients_complete,cpu_time,peak_rss \
    "Route reflector, 500 clients"
$P bars "$OUT/transit.json" "$OUT/transit.svg" bgp-transit \
    time_all_receivers_hold_table,time_all_receivers_withdrawn,peak_rss \
    "Full-table transit: 1M prefixes, 100k attribute sets, 10 eBGP receivers"
$P series "$OUT/transit.json" "$OUT/churn.svg" bgp-churn cpu_per_second,rss \
    "Churn: 1% of 1M prefixes withdrawn and re-announced every second"
echo "# rib-report: JSON and SVG in $OUT" >&2
