#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each) and prints, per target, the
# executions, the coverage reached and whether it found a crash. Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`). Usage: fuzz/run-all.sh [SECONDS_PER_TARGET]
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
status=0
targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build -O >/dev/null || exit 1
printf '%-16s %12s %8s %s\n' target executions cov result
for t in $targets; do
  log=$(mktemp)
  if cargo +nightly fuzz run -O "$t" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result="CRASH (see $log)"; status=1
  fi
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+')
  printf '%-16s %12s %8s %s\n' "$t" "${execs:-?}" "${cov:-?}" "$result"
  [ "$result" = ok ] && rm -f "$log"
done
exit $status
