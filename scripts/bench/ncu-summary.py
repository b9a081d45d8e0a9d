"""Where a GPU run's time goes, from Nsight Compute's per-kernel durations.

Usage: ncu --csv --metrics gpu__time_duration.sum PROGRAM ... > kernels.csv
       python3 scripts/bench/ncu-summary.py kernels.csv [TOP]
Prints the total kernel time, then kernels grouped by name (total ms, share, launches, mean us),
largest first. Kernel time is GPU time only: compare it with the program's wall time to see how much
is host overhead (launches, allocation, synchronisation) rather than kernels.
"""
import collections
import csv
import io
import sys

text = open(sys.argv[1], errors="replace").read()
top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
start = text.find('"ID"')
if start < 0:
    sys.exit(f"{sys.argv[1]}: no ncu CSV table in it")
rows = csv.DictReader(io.StringIO(text[start:]))
total = collections.Counter()
count = collections.Counter()
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    try:
        v = float(r["Metric Value"].replace(",", ""))
    except ValueError:
        continue
    unit = r.get("Metric Unit", "nsecond")
    ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1)
    name = r["Kernel Name"].split("(")[0].strip()
    total[name] += ns
    count[name] += 1
all_ns = sum(total.values())
print(f"{sum(count.values())} kernel launches, {all_ns / 1e6:.1f} ms of kernel time")
print(f"{'kernel':<60} {'ms':>9} {'share':>6} {'calls':>6} {'mean us':>8}")
for name, ns in total.most_common(top):
    print(f"{name[:60]:<60} {ns / 1e6:9.2f} {100 * ns / all_ns:5.1f}% {count[name]:6d} {ns / count[name] / 1e3:8.1f}")
