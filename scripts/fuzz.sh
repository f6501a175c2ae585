#!/usr/bin/env bash
# Fuzzes everything edgeferry parses from outside: payload decoders, topic templates, the
# configuration loader, upstream frames (both sides), journal and outbox recovery and the checkpoint.
#
#   scripts/fuzz.sh            # every target for 60 s
#   scripts/fuzz.sh 600        # every target for 10 min
#   scripts/fuzz.sh 60 config  # one target
#
# Needs a nightly toolchain (cargo-fuzz builds with sanitizers) and installs cargo-fuzz if
# missing. Without nightly it says so and skips (exit 0), loudly: the properties are also
# checked as proptest no-panic tests in `cargo test`. Inputs found interesting are added to
# fuzz/corpus/<target>/ (the corpus in the repository); a crash is saved in fuzz/artifacts/
# and fails the run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz.sh: SKIPPED: no nightly toolchain (rustup toolchain install nightly); the proptest no-panic tests still ran" >&2
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "fuzz.sh: $t for ${secs} s"
  log=$(mktemp)
  status=0
  cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done)' "$log" || true
  if [ "$status" -ne 0 ]; then
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" >&2 || tail -40 "$log" >&2
    echo "fuzz.sh: $t FAILED (the input is in fuzz/artifacts/$t/)" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
done
echo "fuzz.sh: ${#targets[@]} target(s), ${secs} s each, no crash"
