#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: distill-bench (built with `--features cuda`, see
# scripts/cuda-toolkit.sh) and ../shared/bench/pytorch_baseline.py on the same card, then the ratio
# table (scripts/bench/perf-table.py). Expects the stripped binary at $BENCH_BIN (default
# $BENCH_DIR/distill-bench, or that path + .xz) and the baseline at $BENCH_DIR/pytorch_baseline.py
# (BENCH_DIR defaults to .device-bench, a git-ignored folder the device tool carries).
# Results go to $OUT (default ./bench-out).
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
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
SHAPES="${SHAPES:-minilm-l6,bert-base,electra-base,deberta-v3-base,modernbert-base}"
F=shared/models/tests/fixtures
echo "== bf16 and f32 scores on the GPU against transformers fp32 (parity fixtures)"
for dt in bf16 f32; do
  "$BIN" --device cuda --parity "$F/bert,$F/electra,$F/roberta,$F/xlm-roberta,$F/deberta,$F/modernbert" --score-dtype $dt 2>&1 | grep -v "^ *[0-9]*:\|^ *at " | tee -a "$OUT/parity.txt"
done
echo "== distill-bench: scoring bf16"
timeout "${T_SCORE:-180}" "$BIN" --device cuda --shapes "$SHAPES" --modes score --score-dtype bf16 --json "$OUT/candle_score_bf16.json" 2>&1 | tail -8
if [ ! -s "$OUT/candle_score_bf16.json" ]; then
  echo "== distill-bench: scoring f32 (bf16 failed)"
  timeout "${T_SCORE:-180}" "$BIN" --device cuda --shapes "$SHAPES" --modes score --json "$OUT/candle_score_f32.json" 2>&1 | tail -8
fi
echo "== distill-bench: training bf16 mixed precision (f32 master weights; differentiable ops)"
timeout "${T_TRAIN:-180}" "$BIN" --device cuda --shapes "$SHAPES" --modes train --train-precision bf16 --json "$OUT/candle_train_bf16.json" 2>&1 | tail -8
echo "== distill-bench: training fp32"
timeout "${T_TRAIN:-180}" "$BIN" --device cuda --shapes "$SHAPES" --modes train --json "$OUT/candle_train_f32.json" 2>&1 | tail -8
echo "== PyTorch baseline"
OUT="$OUT" PYTHONUNBUFFERED=1 timeout "${T_TORCH:-240}" python3 "$BENCH_DIR/pytorch_baseline.py" 2>&1 | tail -14
echo "== ratios"
python3 scripts/bench/perf-table.py "$OUT/gpu_baseline.json" "$OUT"/candle_*.json | tee "$OUT/ratios.md"
