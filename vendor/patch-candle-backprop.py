"""The rewrite applied to candle-core's src/backprop.rs (vendor/README.md): every
`let V = grads.or_insert(A)?; ... *V = V.add(EXPR)?;` becomes `grads.accumulate(A, EXPR)?;`,
where V is not used in between, and `GradStore::accumulate` is added; the uses of the removed
variable inside EXPR (in 0.11.1: `sum_grad.dims()`, three places) become `arg.dims()`. The
backward of `narrow` adds its gradient into the slice it came from (`GradStore::accumulate_narrow`)
instead of padding it with zeros to the full shape and adding that. Prints how many places
changed; places it cannot rewrite keep upstream's code.

Usage: python3 vendor/patch-candle-backprop.py path/to/candle-core/src/backprop.rs
(on 0.11.1's file it gives vendor/candle-core/src/backprop.rs)
"""
import re
import sys

path = sys.argv[1]
lines = open(path).read().split("\n")
drop, done = set(), 0
for i, line in enumerate(lines):
    m = re.match(r"^(\s*)let (\w+) = grads\.or_insert\((\w+)\)\?;$", line)
    if not m:
        continue
    _, var, arg = m.groups()
    for j in range(i + 1, min(i + 12, len(lines))):
        m2 = re.match(r"^(\s*)\*%s = %s\.add\((.*)\)\?(;?)$" % (var, var), lines[j])
        if m2:
            if re.search(r"\b%s\b" % var, "\n".join(lines[i + 1:j])):
                break
            lines[j] = "%sgrads.accumulate(%s, %s)?%s" % (m2.group(1), arg, m2.group(2), m2.group(3))
            drop.add(i)
            done += 1
            break
        if re.search(r"\b%s\b" % var, lines[j]):
            break
text = "\n".join(l for k, l in enumerate(lines) if k not in drop)
n = text.count("sum_grad.dims()")
text = text.replace("sum_grad.dims()", "arg.dims()")
print(f"{path}: {n} uses of sum_grad.dims() -> arg.dims()")

# The narrow's backward: from upstream's padding to accumulate_narrow.
narrow_start = "                    &Op::Narrow(ref arg, dim, start_idx, len) => {"
narrow_end = "                        grads.accumulate(arg, &arg_grad)?\n                    }\n"
a = text.index(narrow_start)
b = text.index(narrow_end, a) + len(narrow_end)
assert "Tensor::cat(&[&l, &grad, &r], dim)?" in text[a:b], "the narrow's backward is not upstream's"
text = text[:a] + """                    &Op::Narrow(ref arg, dim, start_idx, _) => {
                        grads.accumulate_narrow(arg, dim, start_idx, &grad)?
                    }
""" + text[b:]

# The store remembers which of its gradients it holds alone (fresh results of its own adds),
# which accumulate_narrow may then update in place.
old = "pub struct GradStore(HashMap<TensorId, Tensor>);"
assert old in text
text = text.replace(old, """/// (distill's patch: the second field holds the ids whose gradient the store made itself and
/// holds alone, which `accumulate_narrow` may update in place.)
pub struct GradStore(HashMap<TensorId, Tensor>, HashSet<TensorId>);""")
text = text.replace("use std::collections::{hash_map::Entry, HashMap};", "use std::collections::{hash_map::Entry, HashMap, HashSet};")
for sig, body in (
    ("    pub fn remove(&mut self, tensor: &Tensor) -> Option<Tensor> {\n", "        self.1.remove(&tensor.id());\n"),
    ("    pub fn insert(&mut self, tensor: &Tensor, grad: Tensor) -> Option<Tensor> {\n", "        self.1.remove(&tensor.id());\n"),
    ("    pub fn insert_id(&mut self, id: TensorId, grad: Tensor) -> Option<Tensor> {\n", "        self.1.remove(&id);\n"),
    ("    fn or_insert(&mut self, tensor: &Tensor) -> Result<&mut Tensor> {\n", "        self.1.remove(&tensor.id());\n"),
    ("    pub fn extend(&mut self, other: Self) -> Result<()> {\n", "        for id in other.0.keys() {\n            self.1.remove(id);\n        }\n"),
):
    assert text.count(sig) == 1, sig
    text = text.replace(sig, sig + body)

anchor = "    /// Get the gradient tensor associated with the given tensor, or, if it does not exist,"
accumulate = '''    /// Adds `grad` to the gradient of `tensor`; the first contribution is stored as it is.
    /// (distill's patch: upstream materialises zeros and adds, a memset and a full extra pass
    /// over every gradient of the backward pass.)
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => {
                let sum = entry.into_mut();
                *sum = sum.add(grad)?;
                self.1.insert(tensor.id());
            }
            Entry::Vacant(entry) => {
                // Contiguous as upstream's `zeros + grad` made it (a broadcast or transposed view
                // would reach later matmuls, which want contiguous operands on CUDA): a copy only
                // for views, where upstream's add was one too. (It may share its storage with
                // another gradient: not held alone.)
                entry.insert(grad.contiguous()?);
                self.1.remove(&tensor.id());
            }
        }
        Ok(())
    }

    /// Adds `grad`, the gradient of `tensor.narrow(dim, start, grad.dim(dim))`, into the gradient
    /// of `tensor`. (distill's patch: upstream pads `grad` with zeros to `tensor`'s shape, a
    /// memset and a copy of the whole, then adds the whole; a split into query, key and value
    /// paid that three times over the joined product.) The first contribution starts from
    /// zeros with `grad` written into its slice; later ones add into the slice in place where
    /// the store holds the gradient alone.
    fn accumulate_narrow(&mut self, tensor: &Tensor, dim: usize, start: usize, grad: &Tensor) -> Result<()> {
        if grad.dims() == tensor.dims() {
            return self.accumulate(tensor, grad);
        }
        let id = tensor.id();
        let alone = self.1.contains(&id);
        match self.0.entry(id) {
            Entry::Vacant(entry) => {
                let sum = Tensor::zeros(tensor.dims(), grad.dtype(), grad.device())?;
                sum.slice_set(&grad.contiguous()?, dim, start)?;
                entry.insert(sum);
                self.1.insert(id);
            }
            Entry::Occupied(entry) => {
                let sum = entry.into_mut();
                if alone && sum.is_contiguous() && sum.dtype() == grad.dtype() {
                    let slice = (sum.narrow(dim, start, grad.dim(dim)?)? + grad)?;
                    sum.slice_set(&slice, dim, start)?;
                } else {
                    let padded = Tensor::zeros(tensor.dims(), grad.dtype(), grad.device())?;
                    padded.slice_set(&grad.contiguous()?, dim, start)?;
                    *sum = sum.add(&padded)?;
                    self.1.insert(id);
                }
            }
        }
        Ok(())
    }

'''
assert anchor in text, "GradStore::or_insert not found"
text = text.replace(anchor, accumulate + anchor, 1)
open(path, "w").write(text)
print(f"{path}: {done} places rewritten")
