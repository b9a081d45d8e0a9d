#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: NVIDIA's compute-sanitizer over distill-bench's kernel checks,
# on the card itself: memcheck (accesses out of bounds or misaligned, in global and shared memory),
# racecheck (shared-memory hazards between a block's threads) and synccheck (barriers misused).
# What the emulator's AddressSanitizer and ThreadSanitizer runs (scripts/test.sh) approximate on a
# CPU. The sanitizer comes from the PyPI wheel nvidia-cuda-sanitizer-api 13.0 (no toolkit on the
# card's machine), packed by scripts/bench/bundle.sh as $BENCH_DIR/sanitizer.tar.xz; the binary as
# gpu-bench.sh takes it. Each run has its own timeout (T_SANITIZE, seconds); reports in $OUT.
# Knobs: TOOLS (memcheck racecheck synccheck), RACE_GROUPS (the check groups racecheck runs; it is
# the slowest).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
BENCH_DIR="${BENCH_DIR:-.device-bench}"
BIN="${BENCH_BIN:-$BENCH_DIR/distill-bench}"
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$BIN.xz" "$BIN"
  chmod +x "$BIN"
fi
SAN="$BENCH_DIR/sanitizer"
if [ ! -x "$SAN/bin/compute-sanitizer" ]; then
  [ -f "$BENCH_DIR/sanitizer.tar.xz" ] || { echo "gpu-sanitize: no $BENCH_DIR/sanitizer.tar.xz (scripts/bench/bundle.sh)"; exit 1; }
  mkdir -p "$SAN" && tar -C "$SAN" -xJf "$BENCH_DIR/sanitizer.tar.xz"
fi
export LD_LIBRARY_PATH="$SAN/lib:$SAN/bin:$LD_LIBRARY_PATH"
"$SAN/bin/compute-sanitizer" --version | tail -1
status=0
for tool in ${TOOLS:-memcheck racecheck synccheck}; do
  if [ "$tool" = racecheck ]; then groups="${RACE_GROUPS:-attention_scoring attention_training scoring_epilogues layer_norm}"; else groups=all; fi
  for g in $groups; do
    only=(); [ "$g" = all ] || only=(--check-only "$g")
    log="$OUT/sanitize-$tool-$g.log"
    timeout "${T_SANITIZE:-120}" "$SAN/bin/compute-sanitizer" --tool "$tool" --error-exitcode 9 --print-limit 20 \
      "$BIN" --device cuda --check-kernels "${only[@]}" > "$log" 2>&1
    rc=$?
    case $rc in
      0) verdict="clean" ;;
      9) verdict="ERRORS"; status=1 ;;
      124) verdict="timed out (${T_SANITIZE:-120} s)" ;;
      *) verdict="failed (exit $rc)"; status=1 ;;
    esac
    echo "-- $tool, check group $g: $verdict; $(grep -m1 'ERROR SUMMARY\|RACECHECK SUMMARY' "$log")"
    [ "$verdict" = clean ] || grep -m8 "^========= [A-Z]\|Invalid\|Race\|hazard\|at .*kernels.cu\|in distill_" "$log" | cut -c1-200
  done
done
exit $status
