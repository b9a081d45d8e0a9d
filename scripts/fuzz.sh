#!/usr/bin/env bash
# Fuzzes everything that parses untrusted bytes (fuzz/fuzz_targets, docs/security.md) with
# cargo-fuzz (libFuzzer + AddressSanitizer, nightly toolchain): each target SECONDS seconds
# (default 20) from its committed corpus (fuzz/corpus/TARGET), in a scratch copy so the committed
# corpus only changes when you say so (FUZZ_KEEP=1 merges what was found back, minimised).
# Prints executions per target; a crash, a panic, a leak or an input over 2 GB of memory or 10 s
# fails it, leaving the input in fuzz/artifacts/TARGET.
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-20}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(trec_run qrels tsv jsonl hofstatter llm_answer shard spec)
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz@0.13.2 --locked)" >&2; exit 1; }
cargo +nightly fuzz build -O
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "$scratch/$t"
  cp -r "corpus/$t/." "$scratch/$t/"
  log="$scratch/$t.log"
  if ! cargo +nightly fuzz run -O "$t" "$scratch/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $t failed (input in fuzz/artifacts/$t)" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  echo "fuzz: $t: ${runs:-?} executions in ${secs} s, corpus $(ls "$scratch/$t" | wc -l) inputs, no crash"
  if [ "${FUZZ_KEEP:-0}" = "1" ]; then
    cargo +nightly fuzz cmin -O "$t" "$scratch/$t" >/dev/null 2>&1
    rm -rf "corpus/$t" && cp -r "$scratch/$t" "corpus/$t"
  fi
done
