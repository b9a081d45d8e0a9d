"""What a scoring batch and a training step dispatch to the GPU, counted on any machine.

Usage: python3 scripts/bench/op-stats.py [--bench target/release/distill-bench] [--shapes minilm-l6,bert-base]
           [--seq 256] [--score-batch 512] [--train-batch 64] [--kernels fused] [--json out.json]

Runs `distill-bench --op-stats` (candle's backend dispatch counted by the vendored candle-core's
`op_stats`: one count per operation, the bytes its layouts address, a matmul's flops) at two small
batch sizes on the CPU, in bf16, with the given kernels, and extrapolates each operation's bytes and
flops linearly to the benchmark's batch (operation counts do not depend on the batch; bytes and
flops are affine in it at a fixed sequence length). Prints per model and mode, per phase: the
number of operations (on CUDA about one kernel launch each), the GB they move, the matmul TFLOP,
and the time those take at the card's nominal peaks (memory traffic at --bandwidth, matmuls at
--matmul-tflops, launches at --launch-us each): a lower bound for the GPU time, and where it goes.

On the CPU the fused kernels run as their CPU twins with the same graph as on CUDA, except AdamW:
on CUDA one kernel per parameter tensor updates it in place, on the CPU the composite ops run
(the optimizer phase here overstates CUDA's).

On a GPU machine (scripts/bench/gpu-bench.sh): `--counted op-stats-cuda.json` reads what
`distill-bench --device cuda --op-stats` counted there at the benchmark's batch (no runs, no
extrapolation), and `--measured candle_*.json` adds the timed rows of the same run: the measured
milliseconds next to the bound, and the bound's share of them (how close the kernels come to the
card's peaks). Counted with `--op-times` too, each operation kind's time on the device (a wait
before each operation): its milliseconds, achieved GB/s and TFLOP/s, largest first: which kernels
are far from the card's peaks.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

p = argparse.ArgumentParser()
p.add_argument("--bench", default="target/release/distill-bench")
p.add_argument("--shapes", default="minilm-l6,bert-base")
p.add_argument("--modes", default="score,train")
p.add_argument("--seq", type=int, default=256)
p.add_argument("--score-batch", type=int, default=512)
p.add_argument("--train-batch", type=int, default=64)
p.add_argument("--kernels", default="fused")
p.add_argument("--small", type=int, default=2, help="the smaller of the two counted batches (even)")
p.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s (H100 SXM HBM3: 3.35e12)")
p.add_argument("--matmul-tflops", type=float, default=989.0, help="dense bf16 (H100 SXM: 989)")
p.add_argument("--launch-us", type=float, default=4.0, help="host time per launch, microseconds")
p.add_argument("--top", type=int, default=10)
p.add_argument("--extra", default="", help="more distill-bench arguments, space separated")
p.add_argument("--json")
p.add_argument("--counted", help="distill-bench --op-stats JSON counted at the benchmark's batch (on the GPU)")
p.add_argument("--measured", nargs="*", default=[], help="distill-bench timing JSONs of the same card")
a = p.parse_args()


def run(batch):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ops.json")
        cmd = [a.bench, "--device", "cpu", "--shapes", a.shapes, "--modes", a.modes, "--seq", str(a.seq),
               "--score-batch", str(batch), "--train-batch", str(batch), "--score-dtype", "bf16",
               "--train-precision", "bf16", "--kernels", a.kernels, "--op-stats", "--json", out] + a.extra.split()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.load(open(out))["rows"]


def bound(ops, phase):
    mm_bytes = sum(o["bytes"] for o in ops if o["kind"] == "matmul")
    other = sum(o["bytes"] for o in ops if o["kind"] != "matmul")
    flops = sum(o["flops"] for o in ops)
    calls = sum(o["calls"] for o in ops)
    return {"phase": phase, "calls": calls, "bytes": other + mm_bytes, "flops": flops,
            "memory_ms": 1e3 * other / a.bandwidth, "matmul_ms": 1e3 * max(flops / (a.matmul_tflops * 1e12), mm_bytes / a.bandwidth),
            "launch_ms": 1e-3 * calls * a.launch_us, "ops": sorted(ops, key=lambda o: -o["bytes"])}


report = []
if a.counted:
    for r in json.load(open(a.counted))["rows"]:
        row = {k: r[k] for k in ("model", "mode", "batch", "seq", "kernels")}
        row["phases"] = [bound(p["ops"], p["phase"]) for p in r["phases"]]
        report.append(row)
    rows1 = rows2 = []
else:
    b1, b2 = a.small, 2 * a.small
    rows1, rows2 = run(b1), run(b2)
for r1, r2 in zip(rows1, rows2):
    target = a.score_batch if r1["mode"].startswith("score") else a.train_batch
    row = {"model": r1["model"], "mode": r1["mode"], "batch": target, "seq": a.seq, "kernels": a.kernels, "phases": []}
    for p1, p2 in zip(r1["phases"], r2["phases"]):
        ops2 = {(o["kind"], o["name"]): o for o in p2["ops"]}
        ops = []
        for o in p1["ops"]:
            o2 = ops2.pop((o["kind"], o["name"]), None) or {"calls": o["calls"], "bytes": o["bytes"], "flops": o["flops"]}
            if o2["calls"] != o["calls"]:
                print(f"note: {r1['model']} {r1['mode']} {p1['phase']} {o['kind']}:{o['name']}: {o['calls']} calls at batch {b1}, {o2['calls']} at {b2}", file=sys.stderr)
            ext = lambda k: max(0.0, o[k] + (o2[k] - o[k]) / (b2 - b1) * (target - b1))
            ops.append({"kind": o["kind"], "name": o["name"], "calls": o2["calls"], "bytes": ext("bytes"), "flops": ext("flops")})
        for o in ops2.values():
            print(f"note: {r1['model']} {r1['mode']} {o['kind']}:{o['name']} only at batch {b2}", file=sys.stderr)
        row["phases"].append(bound(ops, p1["phase"]))
    report.append(row)

measured = {}
for path in a.measured:
    for r in json.load(open(path)).get("rows", []):
        if "s" in r and r.get("first_token_only", True):
            measured[(r["model"], r["mode"], r["batch"], r.get("kernels"))] = r

for row in report:
    print(f"\n## {row['model']} {row['mode']}, batch {row['batch']} x {row['seq']}, kernels {row['kernels']}")
    print(f"(at nominal peaks: {a.bandwidth / 1e12:.2f} TB/s, {a.matmul_tflops:.0f} TFLOP/s, {a.launch_us:.0f} us per launch)\n")
    print("| phase | operations | GB moved | matmul TFLOP | memory-bound ms | matmul ms | launches ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for ph in row["phases"]:
        print(f"| {ph['phase']} | {ph['calls']} | {ph['bytes'] / 1e9:.2f} | {ph['flops'] / 1e12:.3f} | {ph['memory_ms']:.1f} | {ph['matmul_ms']:.1f} | {ph['launch_ms']:.1f} |")
    m = measured.get((row["model"], row["mode"], row["batch"], row["kernels"]))
    if m:
        lower = sum(ph["memory_ms"] + ph["matmul_ms"] for ph in row["phases"])
        print(f"\nmeasured: {1e3 * m['s']:.1f} ms per batch ({m.get('kernels', '')}); the bound (memory + matmul) {lower:.1f} ms is {100 * lower / (1e3 * m['s']):.0f}% of it")
    for ph in row["phases"]:
        total = sum(o["bytes"] for o in ph["ops"]) or 1
        print(f"\n{ph['phase']}: largest traffic")
        print("| operation | calls | GB | share |")
        print("|---|---:|---:|---:|")
        for o in ph["ops"][: a.top]:
            print(f"| {o['kind']}:{o['name']} | {o['calls']} | {o['bytes'] / 1e9:.3f} | {100 * o['bytes'] / total:.0f}% |")
        # distill-bench --op-times: each operation timed on the device (a wait before each).
        ns = sum(o.get("ns", 0) for o in ph["ops"])
        if ns:
            bound_ms = ph["memory_ms"] + ph["matmul_ms"]
            print(f"\n{ph['phase']}: timed, each operation waited for ({ns / 1e6:.1f} ms in all, the bound {bound_ms:.1f} ms is {100 * bound_ms / (ns / 1e6):.0f}% of it; largest first)")
            print("| operation | calls | ms | share | GB/s | TFLOP/s | us a call |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for o in sorted(ph["ops"], key=lambda o: -o.get("ns", 0))[: a.top]:
                t = o.get("ns", 0)
                if not t:
                    continue
                print(f"| {o['kind']}:{o['name']} | {o['calls']} | {t / 1e6:.2f} | {100 * t / ns:.0f}% | {o['bytes'] / t:.0f} | "
                      f"{o['flops'] / t / 1e3:.1f} | {t / 1e3 / o['calls']:.1f} |")
if a.json:
    json.dump({"bandwidth": a.bandwidth, "matmul_tflops": a.matmul_tflops, "launch_us": a.launch_us, "rows": report}, open(a.json, "w"), indent=1)
