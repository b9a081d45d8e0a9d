#!/usr/bin/env bash
# One student of a sweep on a finished demo's data, through the real trainer service (start one:
# distill-trainer --addr 127.0.0.1:50052 --store /tmp/sweep-store): trains with the demo's recipe
# unless overridden (LR BS GS STEPS ML OBJ LAYERS WARM DS BACKBONE; extra flags go to `distill train`),
# evaluates on the demo's test queries (BM25 top 20) and appends nDCG@10 to $OUT/results.txt.
#   DEMO=distill-demo LR=3e-4 scripts/experiments/student_sweep.sh lr3e4
set -euo pipefail
name=$1; shift
D=${DEMO:-distill-demo}; B=${BIN:-target/release}; DATA=${DATA:-data/debian}; OUT=${OUT:-/tmp/sweep}
mkdir -p "$OUT"
ds=${DS:-$(ls -d "$D"/datasets/train-* | head -1)}
LR=${LR:-1e-4}; BS=${BS:-2}; GS=${GS:-8}; STEPS=${STEPS:-110}; ML=${ML:-48}; OBJ=${OBJ:-infonce}; WARM=${WARM:-$((STEPS/10))}
"$B/distill" train --trainer http://127.0.0.1:50052 --dataset "$ds" --backbone "${BACKBONE:-$D/models/all-MiniLM-L6-v2}" \
  --backbone-layers "${LAYERS:-6}" --freeze-word-embeddings --objective "$OBJ" --lr "$LR" --batch-size "$BS" --group-size "$GS" \
  --max-steps "$STEPS" --warmup-steps "$WARM" --max-query-length 32 --max-length "$ML" --checkpoint-every 100000 \
  --eval-run "$D/runs/bm25.test.trec" --eval-queries "$D/data/queries.test.tsv" \
  --eval-collection "$DATA/collection.tsv.zst" --eval-qrels "$DATA/qrels.test.txt.zst" \
  --top-k 20 --output "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
echo "$name LR=$LR BS=$BS GS=$GS STEPS=$STEPS ML=$ML OBJ=$OBJ LAYERS=${LAYERS:-6} $*: $(grep eval_ndcg "$OUT/$name/metrics.jsonl" | tr '\n' ' ')" >> "$OUT/results.txt"
