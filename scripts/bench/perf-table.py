"""Ratio table of distill-bench (candle) against ../shared/bench/pytorch_baseline.py on the same card.

Usage: python3 scripts/bench/perf-table.py gpu_baseline.json candle_*.json
Prints a Markdown table: per model and mode, PyTorch pairs/s, distill pairs/s, their ratio, and
distill's achieved TFLOP/s (counted as 2 x parameters x tokens, so a cross-encoder's last layer run
for the first token only counts as full work). Rows with "(full last layer)" ran with
--first-token-only false. Scoring compares with PyTorch's bf16 scoring; training with its
bf16-autocast training step.
"""
import json
import sys

torch = json.load(open(sys.argv[1]))
ours = [json.load(open(p)) for p in sys.argv[2:]]
base = {}
for r in torch["rows"]:
    kind = "score" if r["mode"].startswith("score") else "train"
    base[(r["model"], kind)] = r
print(f"Card: {torch.get('device', '?')} (PyTorch {torch.get('torch', '?')}); distill on {', '.join(o.get('device', '?') for o in ours)}\n")
print("| model | distill mode | kernels | batch x seq | PyTorch pairs/s | distill pairs/s | ratio | distill TFLOP/s | step: forward / backward / optimizer ms |")
print("|---|---|---|---|---:|---:|---:|---:|---|")
for o in ours:
    for r in o["rows"]:
        kind = "score" if r["mode"].startswith("score") else "train"
        b = base.get((r["model"], kind))
        ref = f"{b['pairs_per_s']:.0f} ({b['mode']})" if b else "n/a"
        ratio = f"{r['pairs_per_s'] / b['pairs_per_s']:.2f}x" if b else "n/a"
        split = " / ".join(f"{1000 * r[k]:.0f}" for k in ("forward_s", "backward_s", "optimizer_s")) if r.get("forward_s") is not None else ""
        kernels = r.get("kernels", "") + (" (full last layer)" if r.get("first_token_only") is False else "")
        print(f"| {r['model']} | {r['mode']} | {kernels} | {r['batch']}x{r['seq']} | {ref} | {r['pairs_per_s']:.0f} | {ratio} | {r['tflops']:.1f} | {split} |")
