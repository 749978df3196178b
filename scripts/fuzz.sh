#!/usr/bin/env bash
# Run the BGP fuzz targets for N seconds each (default 60). Needs the nightly
# toolchain (cargo fuzz uses sanitizer flags); installs cargo-fuzz if missing.
# Crashes land in fuzz/artifacts/<target>/ and fail this script.
set -euo pipefail
secs=${1:-60}
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
for t in decode session; do
  mkdir -p "corpus/$t"
  # Seed with the regression inputs kept in the repo.
  cp -n regressions/"$t"/* "corpus/$t/" 2>/dev/null || true
  echo "fuzz.sh: $t for ${secs}s"
  cargo "$tc" fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3
done
