#!/usr/bin/env python3
"""Adds distill's operation counting (src/op_stats.rs) to candle-core's dispatch points.

Run from vendor/candle-core on upstream's sources (after copying src/op_stats.rs in):
    python3 ../patch-candle-op-stats.py
It inserts one `crate::op_stats::record(..)` call at the start of each backend operation in
src/storage.rs, the allocations and host copies in src/device.rs and the device-to-host reads in
src/tensor.rs, and declares the module in src/lib.rs. Each insertion must match exactly once.
"""
import re
import sys

S = "crate::op_stats"


def insert_after_signature(src, fn, line):
    """Inserts `line` as the first statement of `fn` (the body's opening brace ends the signature)."""
    m = re.search(r"\n    pub\(crate\) (?:unsafe )?fn " + re.escape(fn) + r"\b[^{]*\{\n", src)
    if not m:
        sys.exit(f"no fn {fn}")
    if src.count(f"fn {fn}(") + src.count(f"fn {fn}<") != 1:
        sys.exit(f"fn {fn} is not unique")
    return src[: m.end()] + "        " + line + "\n" + src[m.end():]


def patch_storage(src):
    rb, ob = f"{S}::read_bytes", f"{S}::out_bytes"
    calls = {
        "const_set": f'{S}::record("fill", "const_set", {ob}(l, self.dtype()), 0);',
        "affine": f'{S}::record("affine", "affine", {rb}(layout, self.dtype()) + {ob}(layout, self.dtype()), 0);',
        "powf": f'{S}::record("unary", "powf", {rb}(layout, self.dtype()) + {ob}(layout, self.dtype()), 0);',
        "elu": f'{S}::record("unary", "elu", {rb}(layout, self.dtype()) + {ob}(layout, self.dtype()), 0);',
        "cmp": f'{S}::record("cmp", "cmp", {rb}(lhs_layout, self.dtype()) + {rb}(rhs_layout, self.dtype()) + lhs_layout.shape().elem_count(), 0);',
        "reduce_op": f'{S}::record("reduce", op.name(), {rb}(layout, self.dtype()) + {ob}(layout, self.dtype()) / s.iter().map(|d| layout.dims()[*d]).product::<usize>().max(1), 0);',
        "to_dtype": f'{S}::record("cast", dtype.as_str(), {rb}(layout, self.dtype()) + {ob}(layout, dtype), 0);',
        "inplace_op": f'{S}::record("inplace", c.name(), 2 * {ob}(dst_l, self.dtype()) + srcs.iter().map(|(_, l)| {rb}(l, self.dtype())).sum::<usize>(), 0);',
        "unary_impl": f'{S}::record("unary", B::NAME, {rb}(layout, self.dtype()) + {ob}(layout, self.dtype()), 0);',
        "binary_impl": f'{S}::record("binary", B::NAME, {rb}(lhs_layout, self.dtype()) + {rb}(rhs_layout, self.dtype()) + {ob}(lhs_layout, self.dtype()), 0);',
        "where_cond": f'{S}::record("where", "where_cond", {rb}(layout, self.dtype()) + {rb}(layout_t, t.dtype()) + {rb}(layout_f, t.dtype()) + {ob}(layout, t.dtype()), 0);',
        "gather": f'{S}::record("index", "gather", {rb}(indexes_l, indexes.dtype()) + 2 * {ob}(indexes_l, self.dtype()), 0);',
        "scatter_set": f'{S}::record("index", "scatter_set", {rb}(indexes_l, indexes.dtype()) + 2 * {rb}(source_l, source.dtype()), 0);',
        "scatter_add": f'{S}::record("index", "scatter_add", {rb}(indexes_l, indexes.dtype()) + 3 * {rb}(source_l, source.dtype()), 0);',
        "index_add": f'{S}::record("index", "index_add", {rb}(l, self.dtype()) + {ob}(l, self.dtype()) + {rb}(indexes_l, indexes.dtype()) + 2 * {rb}(source_l, source.dtype()), 0);',
        "index_select": f'{S}::record("index", "index_select", {rb}(rhs_l, rhs.dtype()) + 2 * {rb}(rhs_l, rhs.dtype()) / rhs.dtype().size_in_bytes() * self.dtype().size_in_bytes() * lhs_l.dims().iter().enumerate().filter(|(i, _)| *i != d).map(|(_, x)| *x).product::<usize>(), 0);',
        "matmul": f'{S}::record("matmul", {S}::matmul_name(self.dtype(), bmnk), (bmnk.0 * (bmnk.1 * bmnk.3 + bmnk.3 * bmnk.2 + bmnk.1 * bmnk.2)) * self.dtype().size_in_bytes(), 2 * bmnk.0 * bmnk.1 * bmnk.2 * bmnk.3);',
        "copy_strided_src": f'{S}::record("copy", "strided", {rb}(src_l, self.dtype()) + {ob}(src_l, self.dtype()), 0);',
        "copy2d": f'{S}::record("copy", "2d", 2 * d1 * d2 * self.dtype().size_in_bytes(), 0);',
    }
    for fn, line in calls.items():
        src = insert_after_signature(src, fn, line)
    # Custom ops: counted with their output, known once they have run.
    for n, args in (("1", "l"), ("2", "l1, t2, l2"), ("3", "l1, t2, l2, t3, l3")):
        old = f"    pub(crate) fn apply_op{n}("
        new = f"    pub(crate) fn apply_op{n}("
        assert src.count(old) == 1, old
        ins = {
            "1": f"{S}::read_bytes(l, self.dtype())",
            "2": f"{S}::read_bytes(l1, self.dtype()) + {S}::read_bytes(l2, t2.dtype())",
            "3": f"{S}::read_bytes(l1, self.dtype()) + {S}::read_bytes(l2, t2.dtype()) + {S}::read_bytes(l3, t3.dtype())",
        }[n]
        # rename the dispatching body and wrap it
        src = src.replace(old, f"    fn apply_op{n}_dispatch(", 1)
        sig = {
            "1": "(&self, l: &Layout, c: &dyn CustomOp1)",
            "2": "(&self, l1: &Layout, t2: &Self, l2: &Layout, c: &dyn CustomOp2)",
            "3": "(&self, l1: &Layout, t2: &Self, l2: &Layout, t3: &Self, l3: &Layout, c: &dyn CustomOp3)",
        }[n]
        wrapper = (
            f"    pub(crate) fn apply_op{n}{sig} -> Result<(Self, Shape)> {{\n"
            f"        let (s, shape) = self.apply_op{n}_dispatch({args}, c)?;\n"
            f"        {S}::record(\"custom\", c.name(), {ins} + shape.elem_count() * s.dtype().size_in_bytes(), 0);\n"
            f"        Ok((s, shape))\n"
            f"    }}\n\n"
        )
        src = src.replace(f"    fn apply_op{n}_dispatch(", wrapper + f"    fn apply_op{n}_dispatch(", 1)
    return src


def patch_device(src):
    calls = {
        "zeros": f'{S}::record("alloc", "zeros", shape.elem_count() * dtype.size_in_bytes(), 0);',
        "storage_from_slice": f'{S}::record("transfer", "host-to-device", std::mem::size_of_val(data), 0);',
        "storage_owned": f'{S}::record("transfer", "host-to-device", data.len() * S::DTYPE.size_in_bytes(), 0);',
    }
    for fn, line in calls.items():
        src = insert_after_signature(src, fn, line)
    return src


def patch_tensor(src):
    old = "        match &*self.storage() {\n            Storage::Cpu(cpu_storage) => from_cpu_storage(cpu_storage),\n"
    assert src.count(old) == 1
    line = f'        {S}::record("transfer", "device-to-host", self.dtype().size_in_bytes(), 0);\n'
    src = src.replace(old, line + old)
    old = "        match &*self.storage() {\n            Storage::Cpu(storage) => from_cpu_storage(storage),\n"
    assert src.count(old) == 3, src.count(old)
    line = f'        {S}::record("transfer", "device-to-host", self.elem_count() * self.dtype().size_in_bytes(), 0);\n'
    return src.replace(old, line + old)


def patch_lib(src):
    old = "pub mod npy;\n"
    assert src.count(old) == 1
    return src.replace(old, old + "pub mod op_stats;\n")


for path, f in (("src/storage.rs", patch_storage), ("src/device.rs", patch_device), ("src/tensor.rs", patch_tensor), ("src/lib.rs", patch_lib)):
    with open(path) as fh:
        text = fh.read()
    if "op_stats" in text:
        sys.exit(f"{path} already patched")
    with open(path, "w") as fh:
        fh.write(f(text))
print("patched")
