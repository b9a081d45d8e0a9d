"""PyTorch CPU scoring throughput of a cross-encoder directory, the reference for distill-bench on CPU.

Usage: python pytorch_cpu_score.py MODEL_DIR [BATCH] [SEQ] [THREADS]
Same inputs as distill-bench: random token ids in [1000, vocab-1), all-ones mask, fp32,
median of 5 timed forward passes after 1 warm-up. Prints one JSON line per attention kernel.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification

model_dir = sys.argv[1]
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
seq = int(sys.argv[3]) if len(sys.argv) > 3 else 256
threads = int(sys.argv[4]) if len(sys.argv) > 4 else torch.get_num_threads()
torch.set_num_threads(threads)
for attn in ["sdpa", "eager"]:
    m = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, attn_implementation=attn).eval()
    ids = torch.randint(1000, m.config.vocab_size - 1, (batch, seq))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        m(input_ids=ids, attention_mask=mask)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            m(input_ids=ids, attention_mask=mask)
            ts.append(time.perf_counter() - t)
    ts.sort()
    print(json.dumps({"impl": f"pytorch {torch.__version__} ({attn})", "threads": threads, "batch": batch, "seq": seq,
                      "pairs_per_s": batch / ts[2]}))
