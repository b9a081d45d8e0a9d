"""Linear probes on the untrained cross-encoder (all-MiniLM-L6-v2 reading `[CLS] q [SEP] p [SEP]`):
logistic regression from frozen features of the demo's training groups (positive vs its negatives)
to the test queries' re-ranking of BM25's top 20. Features per layer: the [CLS] state, the mean over
all tokens, and [q_mean * p_mean, |q_mean - p_mean|] (segment means); plus the pooler output.
DEMO=distill-demo DATA=data/debian python probe_features.py [max_length]; needs torch, transformers,
scikit-learn, pyarrow, zstandard."""
# linear probe on the untrained cross-encoder's features: does the joint encoding carry relevance linearly?
import pyarrow.parquet as pq, glob, io, zstandard, math, statistics, torch, numpy as np, sys
from transformers import AutoTokenizer, AutoModel
torch.set_num_threads(2)
from demo_test import W, MODEL as M, load, ndcg10 as ndcg
ML=int(sys.argv[1]) if len(sys.argv)>1 else 48
tok=AutoTokenizer.from_pretrained(M); tok._tokenizer.no_padding()
model=AutoModel.from_pretrained(M).eval()
def feats(q, ps):
    enc=tok([q]*len(ps), ps, truncation='only_second', max_length=ML, padding=True, return_tensors='pt')
    with torch.no_grad(): out=model(**enc, output_hidden_states=True)
    m=enc['attention_mask'].unsqueeze(-1).float(); tt=enc['token_type_ids'].unsqueeze(-1).float()
    hs=out.hidden_states
    F={}
    for L in (3,4,5,6):
        h=hs[L]
        F[f'cls{L}']=h[:,0]
        F[f'mean{L}']=(h*m).sum(1)/m.sum(1)
        qm=(h*m*(1-tt)).sum(1)/(m*(1-tt)).sum(1); pm=(h*m*tt).sum(1)/(m*tt).sum(1)
        F[f'qp{L}']=torch.cat([qm*pm, (qm-pm).abs()],-1)
    F['pooler']=out.pooler_output
    return {k:v.numpy() for k,v in F.items()}
rows=pq.read_table(glob.glob(W+'datasets/train-*/*.parquet')[0]).to_pylist()
X={};Y=[];G=[]
for gi,r in enumerate(rows):
    items=sorted(zip(r['teacher_ranks'],r['labels'],r['doc_texts'],r['teacher_scores']))
    pos=[i for i in items if (i[1] or 0)>0]
    if not pos: continue
    p=max(pos,key=lambda i:i[1]); negs=[i for i in items if not i[1]][:7]
    grp=[p]+negs
    f=feats(r['query'],[i[2] for i in grp])
    for k,v in f.items(): X.setdefault(k,[]).append(v)
    Y+= [1.0]+[0.0]*len(negs); G+=[gi]*len(grp)
X={k:np.concatenate(v) for k,v in X.items()}; Y=np.array(Y)
print('train pairs',len(Y),flush=True)
qs, qrels, ranked, docs = load(20)
run = {q: [d for d, _ in ds] for q, ds in ranked.items()}
TF={}
for q in run:
    f=feats(qs[q],[docs[d] for d in run[q][:20]])
    for k,v in f.items(): TF.setdefault(k,[]).append(v)
from sklearn.linear_model import LogisticRegression
for k in X:
    for C in (0.1,1.0):
        clf=LogisticRegression(C=C,max_iter=2000).fit(X[k],Y)
        res=[]
        for qi,q in enumerate(run):
            s=clf.decision_function(TF[k][qi]); top=run[q][:20]
            rr=[d for _,d in sorted(zip(s,top),key=lambda x:-x[0])]+run[q][20:]
            res.append(ndcg(rr,qrels.get(q,{})))
        print(k,'C',C,'test nDCG@10 %.4f'%statistics.mean(res),flush=True)
