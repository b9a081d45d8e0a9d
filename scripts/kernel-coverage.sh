#!/usr/bin/env bash
# Which lines of shared/models/src/kernels/kernels.cu the emulated kernel tests never run: the
# emulator (shared/cuda-emu) built with gcov counts (DISTILL_EMU_COVERAGE=1), the tests of
# kernels::emulated, then per kernel (or device function) the lines with code that ran zero times.
# A line never run is a path no test checks against its CPU twin; on a GPU it is untested code.
# With --all (scripts/test.sh), any such line fails.
set -euo pipefail
all="${1:-}"
cd "$(dirname "$0")/.."
find target/debug/build -path '*distill-cuda-emu-*' -name '*.gcda' -delete 2>/dev/null || true
DISTILL_EMU_COVERAGE=1 cargo test -p distill-models --lib kernels::emulated -- --test-threads 2
gcda=$(ls -t target/debug/build/distill-cuda-emu-*/out/*emu.gcda | head -1)
dir=$(dirname "$gcda")
(cd "$dir" && gcov --json-format --stdout "$(basename "$gcda")" 2>/dev/null) > target/kernel-coverage.json
python3 - target/kernel-coverage.json shared/models/src/kernels/kernels.cu "$all" <<'PY'
import json, re, sys
cov_path, src_path, require_all = sys.argv[1:]
src = open(src_path).read().split("\n")
counts = {}
for doc in open(cov_path).read().splitlines():
    doc = doc.strip()
    if not doc:
        continue
    for f in json.loads(doc)["files"]:
        if f["file"].endswith("kernels/kernels.cu"):
            for line in f["lines"]:
                n = line["line_number"]
                counts[n] = counts.get(n, 0) + line["count"]
if not counts:
    sys.exit("kernel-coverage: no counts for kernels.cu (was the emulator built with DISTILL_EMU_COVERAGE=1?)")
# The enclosing function of each line: the last definition line above it.
owner, name = {}, "(top)"
for i, text in enumerate(src, 1):
    m = re.match(r'^(?:extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?|(?:__device__ )+(?:__forceinline__ )?[\w:<>, ]+?[ *&]+)(\w+)\(', text)
    if m:
        name = m.group(1)
    owner[i] = name
run = sum(1 for c in counts.values() if c > 0)
print(f"kernels.cu: {run} of {len(counts)} lines with code ran in the emulated tests")
missed = {}
for n, c in sorted(counts.items()):
    if c == 0:
        missed.setdefault(owner.get(n, "?"), []).append(n)
for fn, lines in missed.items():
    print(f"  {fn}: never ran lines {', '.join(map(str, lines))}")
if missed and require_all == "--all":
    sys.exit("kernel-coverage: every line of kernels.cu must run in the emulated tests (shared/models/src/kernels/emulated.rs)")
PY
