"""Variants of a finished demo's training lists (for `distill train --dataset`): each list keeps its
judged items and its first N negatives (teacher order), then easier negatives fill the group up to
7: `random` (passages drawn from the whole collection) or `deep` (BM25 ranks 13-100 of the same
query, from the run DEEP_RUN written by `distill retrieve -k 100`). Written with
arrow-rs-compatible list fields and a manifest whose checksum matches.
Usage: DEMO=distill-demo DATA=data/debian python negatives_variant.py random|deep N OUT_DIR."""
# variant datasets of the demo's training lists: mix hard (teacher order) and easy negatives
import pyarrow.parquet as pq, pyarrow as pa, glob, random, io, zstandard, sys, json, shutil, os
mode, nhard, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
W = os.environ.get('DEMO', 'distill-demo').rstrip('/')
src = glob.glob(W + '/datasets/train-*')[0]
t = pq.read_table(glob.glob(src + '/*.parquet')[0])
rows = t.to_pylist()
random.seed(1)
D = os.environ.get('DATA', 'data/debian').rstrip('/') + '/'
coll = []
if mode == 'random':
    for l in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(D+'collection.tsv.zst','rb')), encoding='utf-8'):
        i, x = l.rstrip('\n').split('\t', 1); coll.append((i, x))
deep = {}
qrels = {}
for l in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(D+'qrels.train.txt.zst','rb')), encoding='utf-8'):
    q,_,d,g = l.split(); qrels.setdefault(q,set()).add(d)
if mode == 'deep':
    for l in open(os.environ.get('DEEP_RUN', 'bm25.train100.trec')):
        q,_,d,r,s,_ = l.split(); deep.setdefault(q, []).append(d)
    need = {d for v in deep.values() for d in v}
    docs = {}
    for l in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(D+'collection.tsv.zst','rb')), encoding='utf-8'):
        i, x = l.rstrip('\n').split('\t', 1)
        if i in need: docs[i] = x
for r in rows:
    items = sorted(zip(r['teacher_ranks'], r['labels'], r['doc_ids'], r['doc_texts'], r['teacher_scores']))
    judged = [i for i in items if i[1]]
    negs = [i for i in items if not i[1]]
    hard = negs[:nhard]
    if mode == 'random':
        extra = [(0, None, d, x, -3.0) for d, x in random.sample(coll, 16) if d not in r['doc_ids']]
    else:
        have = set(r['doc_ids'])
        pool = [d for d in deep.get(r['query_id'], [])[12:] if d not in have and d not in qrels.get(r['query_id'], set())]
        extra = [(0, None, d, docs[d], -3.0) for d in random.sample(pool, min(16, len(pool)))]
    new = judged + hard + extra[:7 - len(hard)] + negs[nhard:]
    r['doc_ids'] = [i[2] for i in new]; r['doc_texts'] = [i[3] for i in new]; r['labels'] = [i[1] for i in new]
    r['teacher_scores'] = [i[4] for i in new]; r['teacher_ranks'] = list(range(1, len(new) + 1))
    r['member_scores'] = [[s, s] for s in r['teacher_scores']]
os.makedirs(out, exist_ok=True)
tab = pa.Table.from_pylist(rows, schema=t.schema)
name = os.path.basename(glob.glob(src + '/*.parquet')[0])
pq.write_table(tab, out + '/' + name, use_compliant_nested_type=False, compression='zstd')
m = json.load(open(src + '/_manifest.json'))
import hashlib
b=open(out+'/'+name,'rb').read(); m['shards'][0]['sha256']=hashlib.sha256(b).hexdigest(); m['shards'][0]['bytes']=len(b); m['bytes']=len(b)
json.dump(m, open(out + '/_manifest.json', 'w'), indent=1)
print(json.dumps(m)[:1500])
