"""The test side of a finished `distill demo` for the experiment scripts: its test queries, their
graded qrels, its BM25 run (doc ids in rank order, with scores), the texts of the candidates
re-ranked, and nDCG@10 as trec_eval computes it. DEMO (default distill-demo) is the demo's work
directory, DATA (default data/debian) the bundled collection."""
import io, math, os, zstandard

W = os.environ.get('DEMO', 'distill-demo').rstrip('/') + '/'
D = os.environ.get('DATA', 'data/debian').rstrip('/') + '/'
MODEL = W + 'models/all-MiniLM-L6-v2'


def zlines(name):
    return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(D + name, 'rb')), encoding='utf-8')


def load(depth=20):
    """(queries {qid: text}, qrels {qid: {doc: grade}}, run {qid: [(doc, score)]}, docs {doc: text} of each top `depth`)."""
    qs = dict(l.rstrip('\n').split('\t', 1) for l in open(W + 'data/queries.test.tsv'))
    qrels = {}
    for l in zlines('qrels.test.txt.zst'):
        q, _, d, g = l.split()
        if q in qs:
            qrels.setdefault(q, {})[d] = int(g)
    run = {}
    for l in open(W + 'runs/bm25.test.trec'):
        q, _, d, r, s, _ = l.split()
        run.setdefault(q, []).append((d, float(s)))
    need = {d for ds in run.values() for d, _ in ds[:depth]}
    docs = {}
    for l in zlines('collection.tsv.zst'):
        i, x = l.rstrip('\n').split('\t', 1)
        if i in need:
            docs[i] = x
    return qs, qrels, run, docs


def ndcg10(ranked, rel):
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(rel.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0
