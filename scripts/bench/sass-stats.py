"""The machine code of the CUDA kernels, read without a GPU: per kernel its registers, shared memory
and spills (ptxas -v), its SASS instruction count, the size of each loop (a backward branch's
span) and what the loops do: generic loads (LD.E: a load whose state space the compiler lost),
ldmatrix (LDSM), shared-memory loads and stores (and how many are 16-byte), global 16-byte loads
and stores, tensor-core products (HMMA) and calls (division and sqrt slow paths).

Usage: python3 scripts/bench/sass-stats.py [--ptx PATH] [--filter flash] [--loops 4]

Reads the CUDA build's kernels.ptx (newest under target/cuda, or --ptx), assembles it for sm_90
with the toolkit's ptxas (scripts/cuda-toolkit.sh's CUDA_ROOT, or target/cuda-toolkit/root) and
disassembles it with cuobjdump + nvdisasm, which PyPI ships (nvidia-cuda-cuobjdump,
nvidia-cuda-nvdisasm): fetched once into target/sass-tools if missing. Commit e096da8 (2026-11-28) used this reading
to find the flash kernels' generic operand loads and the elementwise kernels' per-element 64-bit
modulo (docs/perf.md).
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import zipfile

root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
p = argparse.ArgumentParser()
p.add_argument("--ptx")
p.add_argument("--arch", default="sm_90")
p.add_argument("--filter", default="", help="only kernels whose name contains this")
p.add_argument("--loops", type=int, default=4, help="the largest loops shown per kernel")
a = p.parse_args()

cuda_root = os.environ.get("CUDA_ROOT") or os.path.join(root, "target", "cuda-toolkit", "root")
ptxas = os.path.join(cuda_root, "bin", "ptxas")
ptx = a.ptx or max(glob.glob(os.path.join(root, "target", "cuda", "release", "build", "distill-models-*", "out", "kernels.ptx")),
                   key=os.path.getmtime, default=None)
if not ptx or not os.path.exists(ptxas):
    sys.exit("needs the CUDA build's kernels.ptx and the toolkit's ptxas (source scripts/cuda-toolkit.sh; build with --features cuda)")

tools = os.path.join(root, "target", "sass-tools")


def tool(name, package):
    path = os.path.join(tools, package, "nvidia", "cu13", "bin", name)
    if not os.path.exists(path):
        os.makedirs(tools, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tools, package], check=True)
        wheel = max(glob.glob(os.path.join(tools, package.replace("-", "_") + "-*.whl")), key=os.path.getmtime)
        zipfile.ZipFile(wheel).extractall(os.path.join(tools, package))
        os.chmod(path, 0o755)
    return path


cuobjdump = tool("cuobjdump", "nvidia-cuda-cuobjdump")
nvdisasm = tool("nvdisasm", "nvidia-cuda-nvdisasm")
cubin = os.path.join(tools, "kernels.cubin")
info = subprocess.run([ptxas, f"-arch={a.arch}", "-v", ptx, "-o", cubin], capture_output=True, text=True, check=True).stderr
env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True, env=env).stdout

resources = {}
name = None
for line in info.splitlines():
    m = re.search(r"Compiling entry function '(\w+)'", line)
    if m:
        name = m.group(1)
        continue
    m = re.search(r"(\d+) bytes spill stores", line)
    if m and name:
        resources.setdefault(name, {})["spill"] = int(m.group(1))
    m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?$", line.strip())
    if m and name:
        resources.setdefault(name, {}).update(regs=int(m.group(1)), smem=int(m.group(2) or 0))

KINDS = [("LD.E", r"\bLD\.E"), ("LDSM", r"\bLDSM"), ("LDS", r"\bLDS\b|\bLDS\.(?!128)"), ("LDS.128", r"\bLDS\.128"),
         ("STS", r"\bSTS\b|\bSTS\.(?!128)"), ("STS.128", r"\bSTS\.128"), ("LDG.128", r"\bLDG\.E\.128"),
         ("STG.128", r"\bSTG\.E\.128"), ("HMMA", r"\bHMMA"), ("CALL", r"\bCALL")]


def counts(body):
    return {k: sum(1 for x in body if re.search(rx, x)) for k, rx in KINDS}


print(f"{os.path.relpath(ptx, root)} for {a.arch}")
for f in re.split(r"\n\s*Function : ", sass)[1:]:
    name = f.split("\n")[0].strip()
    if a.filter not in name:
        continue
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,6})\*/\s+([^;]+);", f)]
    r = resources.get(name, {})
    total = counts([x for _, x in ins])
    print(f"\n{name}: {len(ins)} instructions, {r.get('regs', '?')} registers, {r.get('smem', 0)} B shared, "
          f"{r.get('spill', 0)} B spilled; " + ", ".join(f"{k} {v}" for k, v in total.items() if v))
    loops = []
    for addr, x in ins:
        m = re.search(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", x)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            loops.append((start, addr, [y for (b, y) in ins if start <= b <= addr]))
    for start, end, body in sorted(loops, key=lambda l: -len(l[2]))[: a.loops]:
        c = counts(body)
        print(f"  loop 0x{start:x}-0x{end:x}: {len(body)} instructions; " + ", ".join(f"{k} {v}" for k, v in c.items() if v))
