"""all-MiniLM-L6-v2 as a bi-encoder alone (cosine of its own mean-pooled embeddings, no training)
re-ranking BM25's top 20 of a finished demo's test queries, at 48 and 96 tokens.
DEMO=distill-demo DATA=data/debian python bi_encoder_rerank.py; needs sentence-transformers, zstandard."""
import statistics, torch
from sentence_transformers import SentenceTransformer
from demo_test import MODEL, load, ndcg10 as ndcg
torch.set_num_threads(1)
qs, qrels, run, docs = load(20)
need = set(docs)
m=SentenceTransformer(MODEL,device='cpu')
for ml in (48,96):
    m.max_seq_length=ml
    ids=sorted(need); E=dict(zip(ids,m.encode([docs[d] for d in ids],batch_size=64,normalize_embeddings=True)))
    Q=dict(zip(run,m.encode([qs[q] for q in run],normalize_embeddings=True)))
    bi=[]
    for q in run:
        top=[d for d,_ in run[q][:20]]; s={d:float(Q[q]@E[d]) for d in top}
        bi.append(ndcg(sorted(top,key=lambda d:-s[d])+[d for d,_ in run[q][20:]],qrels.get(q,{})))
    print('bi-encoder alone, max',ml,'depth 20: %.4f'%statistics.mean(bi))
