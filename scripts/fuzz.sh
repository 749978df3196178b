#!/usr/bin/env bash
# Run the BGP fuzz targets, SECONDS each (default 60, what CI runs; give
# 3600 or more for a long run by hand), optionally only the TARGETs named.
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
# Needs the nightly toolchain (cargo fuzz uses sanitizer flags); installs
# cargo-fuzz if missing. Each run starts from the working corpus
# (fuzz/corpus/<target>/, not in git, where new inputs are kept), the seed
# corpus captured from BIRD, FRR and GoBGP (fuzz/seeds/<target>/, see
# docs/bgp.md "Fuzzing") and past crashes (fuzz/regressions/<target>/).
# A crash lands in fuzz/artifacts/<target>/ and fails this script; turn it
# into a regression test in bgp/ (the byte vector) before fixing it.
set -euo pipefail
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode session)
case $secs in
  '' | *[!0-9]*) echo "fuzz.sh: SECONDS must be a number, not '$secs'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
# cargo fuzz passes -Z flags (sanitizer coverage). Prefer the nightly
# toolchain; without one, stable accepts them with RUSTC_BOOTSTRAP=1.
if rustup toolchain list | grep -q '^nightly'; then
  tc=+nightly
else
  echo "fuzz.sh: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1" >&2
  tc=+stable
  export RUSTC_BOOTSTRAP=1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  dirs=("corpus/$t")
  for d in "seeds/$t" "regressions/$t"; do
    [ -d "$d" ] && dirs+=("$d")
  done
  echo "fuzz.sh: $t for ${secs}s from ${dirs[*]}"
  # The last lines: libFuzzer's final status (executions, coverage,
  # corpus) and -print_final_stats' figures.
  cargo "$tc" fuzz run -O "$t" "${dirs[@]}" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
    grep -E '^(#[0-9]+|stat::|Done|==[0-9]+==|SUMMARY|artifact_prefix|Test unit|thread .* panicked)' | tail -n 12
  # pipefail carries cargo fuzz's exit status (a crash) through the pipe.
done
