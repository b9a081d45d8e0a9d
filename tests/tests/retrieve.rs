//! `distill retrieve` (tantivy BM25) on the bundled Debian collection, then `distill eval` on its run.

use distill_e2e::*;
use std::collections::HashMap;
use std::process::Command;

#[test]
fn bm25_runs_over_the_debian_collection() {
    let root = workspace_root().join("data/debian");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("bm25.trec");
    let index = dir.path().join("index");
    let retrieve = |max: &str| {
        let out = Command::new(bin("distill"))
            .arg("retrieve")
            .arg("--collection")
            .arg(root.join("collection.tsv.zst"))
            .arg("--queries")
            .arg(root.join("queries.test.tsv.zst"))
            .args(["--max-queries", max, "-k", "100", "--output"])
            .arg(&run)
            .arg("--index")
            .arg(&index)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let first = retrieve("300");
    assert!(first.contains("300 queries over 60031 documents"), "{first}");
    // The run: at most 100 documents per query, ranks 1.., scores not increasing.
    let text = std::fs::read_to_string(&run).unwrap();
    let mut by_q: HashMap<&str, Vec<(u32, f64)>> = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 6, "{line}");
        assert_eq!((f[1], f[5]), ("Q0", "bm25"));
        by_q.entry(f[0]).or_default().push((f[3].parse().unwrap(), f[4].parse().unwrap()));
    }
    assert_eq!(by_q.len(), 300);
    for (q, hits) in &by_q {
        assert!(hits.len() <= 100);
        assert!(hits.iter().enumerate().all(|(i, h)| h.0 == i as u32 + 1), "{q}: ranks");
        assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1), "{q}: scores");
    }
    // The persisted index is opened, not rebuilt, and gives the same run.
    let meta = || std::fs::metadata(index.join("meta.json")).unwrap().modified().unwrap();
    let built = meta();
    retrieve("300");
    assert_eq!(meta(), built, "the index was rebuilt");
    assert_eq!(std::fs::read_to_string(&run).unwrap(), text);
    let out = Command::new(bin("distill"))
        .arg("eval")
        .arg("--qrels")
        .arg(root.join("qrels.test.txt.zst"))
        .arg("--run")
        .arg(&run)
        .args(["--metrics", "ndcg@10,recall@100"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics: HashMap<String, f64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('\t').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    // A real first stage on real text: most known items are found (whole test split: nDCG@10 0.679,
    // R@100 0.877).
    assert!(metrics["ndcg@10"] > 0.5 && metrics["recall@100"] > 0.75, "{metrics:?}");
}
