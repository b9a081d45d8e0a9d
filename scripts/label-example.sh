#!/usr/bin/env bash
# The main job today: build, start the teacher service on a local store, label the bundled tiny
# collection into triples and lists, and print what was written. (The full demo — real text,
# a real teacher, trained students — is `distill demo`, coming with the trainer.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bins
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
RUST_LOG=${RUST_LOG:-warn} ./target/debug/distill-teacher --addr 127.0.0.1:0 --store "$work/store" >"$work/addr" &
pid=$!
for _ in $(seq 100); do grep -q listening "$work/addr" 2>/dev/null && break; sleep 0.1; done
export DISTILL_TEACHER_ADDR="http://$(sed -n 's/listening on //p' "$work/addr")"
ex=examples/tiny
./target/debug/distill label --run $ex/run.trec --queries $ex/queries.tsv --collection $ex/collection.tsv \
  --qrels $ex/qrels.txt --positives-from-qrels --negatives 2 --output "$work/triples"
./target/debug/distill label --run $ex/run.trec --queries $ex/queries.tsv --collection $ex/collection.tsv \
  --qrels $ex/qrels.txt --layout lists --output "$work/lists"
./target/debug/distill jobs list
./target/debug/distill shards inspect "$work/triples" --rows 4
./target/debug/distill shards inspect "$work/lists" --rows 2
