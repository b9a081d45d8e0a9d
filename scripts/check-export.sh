#!/usr/bin/env bash
# The export round trip of the backbones issue, by hand (needs a Python with torch, transformers and
# sentence-transformers in $TORCH_PYTHON): start both services, label the tiny example collection,
# train the tiny BERT fixture a few steps, score pairs with `distill score` on the exported
# checkpoint, and check that transformers and sentence-transformers load it and agree within 1e-4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${TORCH_PYTHON:-python3}"
BACKBONE="${BACKBONE:-shared/models/tests/fixtures/bert}"
MAXLEN="${MAXLEN:-48}"
cargo build -q --bins
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
RUST_LOG=warn target/debug/distill-teacher --addr 127.0.0.1:0 --store "$work/t" --allow-location "$work,$PWD" > "$work/t.log" &
RUST_LOG=warn target/debug/distill-trainer --addr 127.0.0.1:0 --store "$work/s" --allow-location "$work,$PWD" > "$work/s.log" &
for f in t s; do until grep -q "listening on" "$work/$f.log"; do sleep 0.2; done; done
T="http://$(sed -n 's/listening on //p' "$work/t.log")"
S="http://$(sed -n 's/listening on //p' "$work/s.log")"
ex=examples/tiny
target/debug/distill --teacher "$T" label --run $ex/run.trec --queries $ex/queries.tsv --collection $ex/collection.tsv \
  --negatives 2 --output "$work/data" > /dev/null
target/debug/distill --trainer "$S" train --dataset "$work/data" --backbone "$BACKBONE" --objective margin_mse \
  --lr 1e-3 --batch-size 2 --max-steps 6 --max-length "$MAXLEN" --max-query-length 16 --output "$work/student"
"$PY" - "$ex" "$work/pairs.jsonl" <<'PYEOF'
import json, sys
ex, out = sys.argv[1:3]
q = dict(l.rstrip("\n").split("\t", 1) for l in open(f"{ex}/queries.tsv"))
d = dict(l.rstrip("\n").split("\t", 1) for l in open(f"{ex}/collection.tsv"))
with open(out, "w") as f:
    for l in open(f"{ex}/run.trec"):
        c = l.split()
        f.write(json.dumps({"query": q[c[0]], "passage": d[c[2]]}) + "\n")
PYEOF
target/debug/distill score --model "$work/student/final" --input "$work/pairs.jsonl" --output "$work/scores.jsonl" --max-length "$MAXLEN"
"$PY" scripts/fixtures/check_export.py "$work/student/final" "$work/pairs.jsonl" "$work/scores.jsonl" "$MAXLEN"
