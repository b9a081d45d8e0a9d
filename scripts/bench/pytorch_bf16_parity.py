"""How far transformers' own bf16 scores are from its fp32 reference logits on the parity fixtures
(shared/models/tests/fixtures/*/reference.json), for comparison with `distill-bench --parity
--score-dtype bf16` on the same card: the fixtures use large random weights on purpose (a wrong
layer shows in the logits), which also makes bf16 rounding show more than on trained weights.

Usage: python3 scripts/bench/pytorch_bf16_parity.py [FIXTURE_DIR...]   (cuda if present, else cpu)
Prints per fixture: max |logits - reference| / max |reference| for fp32, bf16 weights, and fp32
weights under bf16 autocast.
"""
import glob
import inspect
import json
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dirs = sys.argv[1:] or sorted(d for d in glob.glob(os.path.join(os.path.dirname(__file__), "../../shared/models/tests/fixtures/*"))
                              if os.path.isfile(os.path.join(d, "config.json")) and os.path.isfile(os.path.join(d, "reference.json")))
print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
for d in dirs:
    ref = json.load(open(os.path.join(d, "reference.json")))
    cfg = AutoConfig.from_pretrained(d)
    model = AutoModelForSequenceClassification.from_pretrained(d).to(dev).eval()
    ids = ref["input_ids"]
    width = max(len(i) for i in ids)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    pad = lambda rows, v: [r + [v] * (width - len(r)) for r in rows]
    kwargs = dict(input_ids=torch.tensor(pad(ids, pad_id), device=dev),
                  attention_mask=torch.tensor(pad([[1] * len(i) for i in ids], 0), device=dev))
    if "token_type_ids" in inspect.signature(model.forward).parameters and ref.get("token_type_ids"):
        kwargs["token_type_ids"] = torch.tensor(pad(ref["token_type_ids"], 0), device=dev)
    want = torch.tensor(ref["logits"], dtype=torch.float64)
    scale = want.abs().max().clamp_min(1e-6)
    err = lambda got: ((got.double().cpu().view(-1) - want).abs().max() / scale).item()
    with torch.no_grad():
        fp32 = model(**kwargs).logits
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            amp = model(**kwargs).logits
        bf16 = model.to(torch.bfloat16)(**kwargs).logits
    print(f"{os.path.basename(os.path.normpath(d))}: fp32 {err(fp32):.2e}, bf16 weights {err(bf16):.2e}, bf16 autocast {err(amp):.2e}", flush=True)
