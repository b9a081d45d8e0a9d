#!/usr/bin/env bash
# The services on a device, end to end on the bundled tiny collection: distill-teacher and
# distill-trainer started with --device $DEVICE (default cuda), the collection labelled by a
# cross-encoder teacher (the tiny BERT fixture) on the device, a student
# (the tiny BERT fixture) trained with margin_mse in bf16 mixed precision and in fp32, evaluated
# by the trainer, and the student scored by `distill score` on the device and on the CPU: the two
# must agree (fp32, within 1e-3 of the largest |score|). Exits non-zero on any failure.
#
# On the GPU machine, with binaries built with `--features cuda` (scripts/cuda-toolkit.sh; CI builds
# them in target/cuda/release), stripped and carried:
#   BIN_DIR=.device-bench/bin bash scripts/bench/gpu-services.sh
# Here, as a check of the script itself: BIN_DIR=target/debug DEVICE=cpu bash scripts/bench/gpu-services.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN_DIR="${BIN_DIR:-.device-bench/bin}"
DEVICE="${DEVICE:-cuda}"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
for b in distill-teacher distill-trainer distill; do
  if [ ! -x "$BIN_DIR/$b" ] && [ -f "$BIN_DIR/$b.xz" ]; then
    python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$BIN_DIR/$b.xz" "$BIN_DIR/$b"
    chmod +x "$BIN_DIR/$b"
  fi
done
# The kernel families gpu-bench.sh found correct on this GPU (its $OUT/kernels-ok.txt), if it ran.
if [ -z "${DISTILL_FUSED_KERNELS:-}" ] && [ -f "${OUT:-bench-out}/kernels-ok.txt" ]; then
  DISTILL_FUSED_KERNELS="$(grep -v '^auto$' "${OUT:-bench-out}/kernels-ok.txt" || true)"
  export DISTILL_FUSED_KERNELS
  echo "kernels not yet proven on a GPU turned on: ${DISTILL_FUSED_KERNELS:-none}"
fi
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
for svc in teacher trainer; do
  RUST_LOG=${RUST_LOG:-warn} "$BIN_DIR/distill-$svc" --addr 127.0.0.1:0 --store "$work/$svc" --device "$DEVICE" >"$work/$svc.addr" 2>"$work/$svc.log" &
done
for svc in teacher trainer; do
  for _ in $(seq 300); do grep -q listening "$work/$svc.addr" 2>/dev/null && break; sleep 0.1; done
  grep -q listening "$work/$svc.addr" || { echo "distill-$svc did not start on $DEVICE:"; cat "$work/$svc.log"; exit 1; }
done
export DISTILL_TEACHER_ADDR="http://$(sed -n 's/listening on //p' "$work/teacher.addr")"
export DISTILL_TRAINER_ADDR="http://$(sed -n 's/listening on //p' "$work/trainer.addr")"
D="$BIN_DIR/distill"
ex=examples/tiny
files=(--run $ex/run.trec --queries $ex/queries.tsv --collection $ex/collection.tsv --qrels $ex/qrels.txt)
backbone=shared/models/tests/fixtures/bert
echo "== labelling with a cross-encoder teacher on $DEVICE"
"$D" label "${files[@]}" --negatives 2 --teacher-kind cross-encoders --teacher-model "$backbone" --output "$work/triples"
evalargs=(--eval-run $ex/run.trec --eval-queries $ex/queries.tsv --eval-collection $ex/collection.tsv --eval-qrels $ex/qrels.txt)
for precision in bf16 fp32; do
  echo "== training on $DEVICE, $precision"
  "$D" train --dataset "$work/triples" --backbone "$backbone" --objective margin_mse --lr 1e-3 --precision $precision \
    --batch-size 2 --epochs 3 --max-length 48 "${evalargs[@]}" --eval-every 4 --output "$work/student-$precision"
  test -f "$work/student-$precision/final/model.safetensors"
done
echo "== distill score: the fp32 student on $DEVICE and on the CPU"
printf '%s\n' '{"query":"linux kernel","passage":"the linux kernel and its modules"}' \
  '{"query":"graphics","passage":"a library for drawing vector graphics"}' \
  '{"query":"tiny","passage":"a small collection bundled for examples and tests"}' > "$work/pairs.jsonl"
"$D" score --model "$work/student-fp32/final" --input "$work/pairs.jsonl" --device "$DEVICE" --max-length 48 > "$work/dev.jsonl"
"$D" score --model "$work/student-fp32/final" --input "$work/pairs.jsonl" --device cpu --max-length 48 > "$work/cpu.jsonl"
python3 - "$work/dev.jsonl" "$work/cpu.jsonl" <<'PY'
import json, sys
a, b = ([json.loads(l)["score"] for l in open(p) if l.strip()] for p in sys.argv[1:])
assert len(a) == len(b) == 3, (a, b)
scale = max(max(abs(x) for x in b), 1e-6)
err = max(abs(x - y) for x, y in zip(a, b)) / scale
print(f"scores on the device {a}, on the CPU {b}: {err:.2e} of max |score|")
assert err < 1e-3, err
PY
"$D" jobs --service trainer list
echo "services on $DEVICE: ok"
