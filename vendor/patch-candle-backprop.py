"""The rewrite applied to candle-core's src/backprop.rs (vendor/README.md): every
`let V = grads.or_insert(A)?; ... *V = V.add(EXPR)?;` becomes `grads.accumulate(A, EXPR)?;`,
where V is not used in between, and `GradStore::accumulate` is added. Prints how many places
changed; places it cannot rewrite keep upstream's code. After running it, replace any use of the
removed variable inside EXPR (in 0.11.1: `sum_grad.dims()` -> `arg.dims()`, three places).

Usage: python3 vendor/patch-candle-backprop.py path/to/candle-core/src/backprop.rs
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
anchor = "    fn or_insert(&mut self, tensor: &Tensor) -> Result<&mut Tensor> {"
accumulate = '''    /// Adds `grad` to the gradient of `tensor`; the first contribution is stored as it is.
    /// (distill's patch: upstream materialises zeros and adds, a memset and a full extra pass
    /// over every gradient of the backward pass.)
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => {
                let sum = entry.into_mut();
                *sum = sum.add(grad)?;
            }
            Entry::Vacant(entry) => {
                // Contiguous as upstream's `zeros + grad` made it (a broadcast or transposed view
                // would reach later matmuls, which want contiguous operands on CUDA): a copy only
                // for views, where upstream's add was one too.
                entry.insert(grad.contiguous()?);
            }
        }
        Ok(())
    }

'''
assert anchor in text, "GradStore::or_insert not found"
text = text.replace(anchor, accumulate + anchor, 1)
open(path, "w").write(text)
print(f"{path}: {done} places rewritten")
