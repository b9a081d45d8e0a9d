"""Ceiling of a student that reads only the first max_length tokens: a perfect model gives passages
whose truncated inputs are the same the same score (their mean grade), ties broken by docid as
trec_eval does; nDCG@10 when re-ranking BM25's top 10 / 20 of a finished demo's test queries
(DEMO=distill-demo, DATA=data/debian). Needs torch-free transformers tokenizers + zstandard."""
from transformers import AutoTokenizer
from demo_test import MODEL, load, ndcg10 as ndcg
tok = AutoTokenizer.from_pretrained(MODEL); tok._tokenizer.no_padding()
qs, qrels, ranked, docs = load(20)
run = {q: [d for d, _ in ds] for q, ds in ranked.items()}
for ml in (32,48,64,96,128,512):
  for depth in (10,20):
    tot=0;totb=0
    for q in qs:
        r=qrels.get(q,{}); top=run[q][:depth]
        qn=len(tok.tokenize(qs[q]))
        n=max(0,ml-3-min(qn,32))
        key={d:tuple(tok.tokenize(docs[d])[:n]) for d in top}
        # perfect model: score of a text = mean grade of docs with that text (expected-grade)
        grp={}
        for d in top: grp.setdefault(key[d],[]).append(r.get(d,0))
        sc={d:sum(grp[key[d]])/len(grp[key[d]]) for d in top}
        rr=sorted(top,key=lambda d:(sc[d],d),reverse=True)+run[q][depth:]
        tot+=ndcg(rr,r); totb+=ndcg(run[q],r)
    print('max_len',ml,'depth',depth,'oracle %.4f'%(tot/len(qs)),'bm25 %.4f'%(totb/len(qs)))
