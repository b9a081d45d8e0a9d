#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one go: the fused kernels checked against candle's composite
# ops, bf16 scores against transformers' fp32 logits (parity fixtures; transformers' own bf16 on the
# same fixtures for comparison), ../shared/bench/pytorch_baseline.py, distill-bench scoring and
# training on the same card (each shape its own process, so one failure loses nothing else), an
# optional Nsight Compute kernel profile of a training step and a scoring batch, and the ratio table
# (scripts/bench/perf-table.py).
#
# Expects the stripped binary (built with `--features cuda`, see scripts/cuda-toolkit.sh) at
# $BENCH_BIN (default $BENCH_DIR/distill-bench, or that path + .xz) and the baseline at
# $BENCH_DIR/pytorch_baseline.py (BENCH_DIR defaults to .device-bench, a git-ignored folder the device
# tool carries); a bf16 all-MiniLM-L6-v2 directory at $BENCH_DIR/minilm-bf16 adds the real-weights
# parity check. Results go to $OUT (default ./bench-out): the JSON rows, ratios.md, kernels.csv.
# Knobs: SHAPES, WARMUP, ITERS, T_* timeouts, PARITY_DTYPES ("bf16 f32"), TORCH_PARITY=1, COMPOSITE=1 (bert-base with candle's composite ops),
# TRAIN_KERNELS / SCORE_KERNELS (default: the defaults plus every family of kernels not yet proven on a GPU that passed its check
# in this run; fused: all; auto: the defaults), AUTO=1 (rows with the defaults too),
# FULL_LAST_LAYER=1 (scoring rows with the full last layer, --first-token-only false), FP32=1 (fp32 training too), PROFILE=1 (ncu on one bert-base bf16 training step and one minilm-l6 bf16 scoring batch),
# OP_STATS=0 (skip counting the operations and bytes of the timed runs on the GPU, timing each kind (--op-times), and the bound at the card's peaks, scripts/bench/op-stats.py),
# BASELINE=0 (no PyTorch baseline: ratios n/a).
# A dry run of the whole script on a machine without a GPU (its shell and Python steps; numbers
# meaningless): DEVICE=cpu BASELINE=0 TORCH_PARITY=0 BENCH_BIN=target/release/distill-bench
# BENCH_ARGS="--seq 32 --score-batch 4 --train-batch 2" bash scripts/bench/gpu-bench.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
TMP="$(mktemp -d)"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
BENCH_DIR="${BENCH_DIR:-.device-bench}"
BIN="${BENCH_BIN:-$BENCH_DIR/distill-bench}"
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$BIN.xz" "$BIN"
  chmod +x "$BIN"
fi
DEVICE="${DEVICE:-cuda}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
else
  echo "no nvidia-smi here (device $DEVICE)"
fi
SHAPES="${SHAPES:-minilm-l6,bert-base,electra-base,deberta-v3-base,modernbert-base}"
F=shared/models/tests/fixtures
W="--warmup ${WARMUP:-2} --iters ${ITERS:-8} ${BENCH_ARGS:-}"

echo "== fused kernels (kernels.cu) against the composite ops on the GPU: values, gradients, dropout, AdamW"
# One group per process: a kernel that faults (and poisons the CUDA context) loses only its own
# verdict. The families of kernels not yet proven on a GPU that pass are the ones the timed runs
# below turn on (KERNELS_OK), unless SCORE_KERNELS / TRAIN_KERNELS say otherwise.
KERNELS_OK=""
for g in core embedding layer_norm bias_add rotary attention_scoring attention_training scoring_epilogues matmul_epilogues backbones optimizer; do
  if timeout 60 "$BIN" --device "$DEVICE" --check-kernels --check-only "$g" 2>&1 | grep -v "^ *[0-9]*:\|^ *at "; then
    echo "-- $g: pass"
    case "$g" in core|backbones) ;; *) KERNELS_OK="${KERNELS_OK:+$KERNELS_OK,}$g" ;; esac
  else
    echo "-- $g: FAIL"
  fi
done
KERNELS_OK="${KERNELS_OK:-auto}"
echo "kernel families that passed on this GPU: $KERNELS_OK"
echo "$KERNELS_OK" > "$OUT/kernels-ok.txt"
SCORE_KERNELS="${SCORE_KERNELS:-$KERNELS_OK}"
TRAIN_KERNELS="${TRAIN_KERNELS:-$KERNELS_OK}"

echo "== bf16 and f32 scores on the GPU against transformers fp32 (parity fixtures; kernels: the defaults, then $SCORE_KERNELS)"
for dt in ${PARITY_DTYPES:-bf16 f32}; do
  for k in auto "$SCORE_KERNELS"; do
    if [ "$k" = auto ] || [ "$SCORE_KERNELS" != auto ]; then
      echo "-- $dt, kernels $k"
      timeout 60 "$BIN" --device "$DEVICE" --parity "$F/bert,$F/electra,$F/roberta,$F/xlm-roberta,$F/deberta,$F/modernbert" --score-dtype $dt --kernels "$k" 2>&1 | grep -v "^ *[0-9]*:\|^ *at "
    fi
  done
done
if [ -d "$BENCH_DIR/minilm-bf16" ]; then
  echo "== real weights: all-MiniLM-L6-v2 (+ the fixture's head), bf16 on the GPU against transformers fp32 (kernels $SCORE_KERNELS)"
  timeout 60 "$BIN" --device "$DEVICE" --parity "$F/minilm" --parity-base "$BENCH_DIR/minilm-bf16" --score-dtype bf16 --kernels "$SCORE_KERNELS" 2>&1 | grep -v "^ *[0-9]*:\|^ *at "
fi
if [ "${TORCH_PARITY:-1}" = 1 ]; then
  echo "== transformers' own bf16 on the same fixtures"
  PYTHONUNBUFFERED=1 timeout 90 python3 scripts/bench/pytorch_bf16_parity.py 2>&1 | grep -v "Loading weights\|Warning\|warn"
fi

if [ "${BASELINE:-1}" = 1 ]; then
  echo "== PyTorch baseline"
  OUT="$OUT" PYTHONUNBUFFERED=1 timeout "${T_TORCH:-240}" python3 "$BENCH_DIR/pytorch_baseline.py" 2>&1 | tail -12
fi

IFS=, read -ra shapes <<< "$SHAPES"
for s in "${shapes[@]}"; do
  echo "== distill-bench $s: scoring bf16 (kernels: $SCORE_KERNELS)"
  timeout "${T_SCORE:-60}" "$BIN" --device "$DEVICE" --shapes "$s" --modes score --score-dtype bf16 --kernels "$SCORE_KERNELS" $W --json "$TMP/score_bf16_$s.json" 2>&1 | grep -v "^ *[0-9]*:\|^ *at " | tail -12
done
if [ "${AUTO:-1}" = 1 ]; then
  echo "== distill-bench minilm-l6, bert-base: scoring bf16 with the default kernels (no flash attention until proven)"
  timeout "${T_SCORE:-60}" "$BIN" --device "$DEVICE" --shapes minilm-l6,bert-base --modes score --score-dtype bf16 --kernels auto $W --json "$TMP/score_bf16_auto.json" 2>&1 | grep -v "^ *[0-9]*:\|^ *at " | tail -6
fi
if [ "${FULL_LAST_LAYER:-1}" = 1 ]; then
  echo "== distill-bench minilm-l6, bert-base: scoring bf16 with the full last layer (what running it for the first token only saves)"
  timeout "${T_SCORE:-60}" "$BIN" --device "$DEVICE" --shapes minilm-l6,bert-base --modes score --score-dtype bf16 --kernels "$SCORE_KERNELS" --first-token-only false $W --json "$TMP/score_bf16_fulllast.json" 2>&1 | grep -v "^ *[0-9]*:\|^ *at " | tail -6
fi
for s in "${shapes[@]}"; do
  echo "== distill-bench $s: training bf16 mixed precision (f32 master weights, kernels: $TRAIN_KERNELS)"
  timeout "${T_TRAIN:-120}" "$BIN" --device "$DEVICE" --shapes "$s" --modes train --train-precision bf16 --kernels "$TRAIN_KERNELS" $W --json "$TMP/train_bf16_$s.json" 2>&1 | grep -v "^ *[0-9]*:\|^ *at " | tail -12
done
if [ "${AUTO:-1}" = 1 ]; then
  echo "== distill-bench bert-base: training bf16 with the default kernels (those proven on a GPU; the rest composite)"
  timeout "${T_TRAIN:-120}" "$BIN" --device "$DEVICE" --shapes bert-base --modes train --train-precision bf16 --kernels auto $W --json "$TMP/train_bf16_auto_bert-base.json" 2>&1 | grep -v "^ *[0-9]*:\|^ *at " | tail -6
fi
if [ "${COMPOSITE:-1}" = 1 ]; then
  echo "== distill-bench bert-base: training bf16 with candle's composite ops instead of the fused kernels"
  timeout "${T_TRAIN:-120}" "$BIN" --device "$DEVICE" --shapes bert-base --modes train --train-precision bf16 --kernels composite $W --json "$TMP/train_bf16_composite_bert-base.json" 2>&1 | grep -v "^ *[0-9]*:\|^ *at " | tail -6
fi
if [ "${FP32:-0}" = 1 ]; then
  for s in "${shapes[@]}"; do
    echo "== distill-bench $s: training fp32"
    timeout "${T_TRAIN:-120}" "$BIN" --device "$DEVICE" --shapes "$s" --modes train $W --json "$TMP/train_f32_$s.json" 2>&1 | grep -v "^ *[0-9]*:\|^ *at " | tail -6
  done
fi
if [ "${OP_STATS:-1}" = 1 ]; then
  echo "== what the timed runs dispatch, counted and each operation timed on the GPU at their batch (distill-bench --op-stats --op-times), and the bound at the card's peaks"
  timeout "${T_SCORE:-60}" "$BIN" --device "$DEVICE" --op-stats --op-times ${BENCH_ARGS:-} --shapes "$SHAPES" --modes score --score-dtype bf16 --kernels "$SCORE_KERNELS" \
    --json "$TMP/opstats_score.json" 2>&1 | grep -v "^ *[0-9]*:\|^ *at \|^{" | tail -7
  timeout "${T_TRAIN:-120}" "$BIN" --device "$DEVICE" --op-stats --op-times ${BENCH_ARGS:-} --shapes "$SHAPES" --modes train --train-precision bf16 --kernels "$TRAIN_KERNELS" \
    --json "$TMP/opstats_train.json" 2>&1 | grep -v "^ *[0-9]*:\|^ *at \|^{" | tail -7
  for k in score train; do
    [ -f "$TMP/opstats_$k.json" ] && cp "$TMP/opstats_$k.json" "$OUT/op-stats-cuda-$k.json" && rm "$TMP/opstats_$k.json" &&
      python3 scripts/bench/op-stats.py --counted "$OUT/op-stats-cuda-$k.json" --top 8 --measured "$TMP"/${k}_bf16_*.json > "$OUT/op-stats-$k.md" &&
      grep -v "^$" "$OUT/op-stats-$k.md" | grep -v "^| [a-z]*:[a-z]" | head -40
    # The four slowest operations per phase against their traffic (the whole tables: $OUT/op-stats-$k.md).
    [ -f "$OUT/op-stats-$k.md" ] && awk '/^## /{m=$2} /: largest traffic/{t=0} /: timed, each/{t=1; n=0; print m, $0; next} t && n<4 && /^\| [a-z]+:/{print; n++}' "$OUT/op-stats-$k.md"
  done
fi
if [ "${PROFILE:-0}" = 1 ]; then
  NCU="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
  echo "== Nsight Compute ($NCU): kernel time of one bert-base bf16 training step, batch ${PROFILE_BATCH:-16} x 256"
  timeout "${T_PROFILE:-120}" "$NCU" --csv --metrics gpu__time_duration.sum "$BIN" --device "$DEVICE" --shapes bert-base --modes train \
    --train-precision bf16 --kernels "$TRAIN_KERNELS" --train-batch "${PROFILE_BATCH:-16}" --warmup 1 --iters 1 --breakdown false > "$OUT/kernels.csv" 2> "$TMP/ncu.err"
  tail -3 "$TMP/ncu.err"
  python3 scripts/bench/ncu-summary.py "$OUT/kernels.csv" 40
  echo "== Nsight Compute: kernel time of one minilm-l6 bf16 scoring batch, ${PROFILE_SCORE_BATCH:-64} x 256"
  timeout "${T_PROFILE:-120}" "$NCU" --csv --metrics gpu__time_duration.sum "$BIN" --device "$DEVICE" --shapes minilm-l6 --modes score \
    --score-dtype bf16 --kernels "$SCORE_KERNELS" --score-batch "${PROFILE_SCORE_BATCH:-64}" --warmup 1 --iters 1 > "$OUT/kernels-score.csv" 2> "$TMP/ncu-score.err"
  tail -3 "$TMP/ncu-score.err"
  python3 scripts/bench/ncu-summary.py "$OUT/kernels-score.csv" 30
fi

# One JSON per kind of run, as perf-table.py reads them.
python3 - "$TMP" "$OUT" <<'PY'
import glob, json, os, sys
tmp, out = sys.argv[1:]
groups = {}
for p in sorted(glob.glob(os.path.join(tmp, "*.json"))):
    kind = os.path.basename(p).rsplit("_", 1)[0]
    d = json.load(open(p))
    g = groups.setdefault(kind, {"device": d.get("device"), "rows": []})
    g["rows"] += d["rows"]
for kind, g in groups.items():
    json.dump(g, open(os.path.join(out, f"candle_{kind}.json"), "w"), indent=1)
PY
echo "== ratios"
[ -f "$OUT/gpu_baseline.json" ] || echo '{"rows": [], "device": "no baseline"}' > "$TMP/no_baseline.json"
python3 scripts/bench/perf-table.py "$( [ -f "$OUT/gpu_baseline.json" ] && echo "$OUT/gpu_baseline.json" || echo "$TMP/no_baseline.json")" \
  "$OUT"/candle_*.json | tee "$OUT/ratios.md"
