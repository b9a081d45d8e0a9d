//! `distill eval` prints `metric<TAB>value` lines equal to trec_eval's (fixture from
//! scripts/fixtures/eval_reference.py), and refuses bad input clearly.

use distill_e2e::*;
use std::process::Command;

#[test]
fn distill_eval_prints_trec_eval_values() {
    let fx = workspace_root().join("shared/eval/tests/fixtures");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.join("expected.json")).unwrap()).unwrap();
    let out = Command::new(bin("distill"))
        .args(["eval", "--qrels"])
        .arg(fx.join("qrels.txt"))
        .arg("--run")
        .arg(fx.join("run.trec"))
        .args(["--metrics", "ndcg@10,rr@10,map,recall@100,p@10"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<(&str, f64)> = stdout
        .lines()
        .map(|l| {
            let (m, v) = l.split_once('\t').expect("metric<TAB>value");
            (m, v.parse().unwrap())
        })
        .collect();
    assert_eq!(lines.iter().map(|l| l.0).collect::<Vec<_>>(), ["ndcg@10", "rr@10", "map", "recall@100", "p@10"]);
    for (m, v) in lines {
        let want = expected["means"][m].as_f64().unwrap();
        assert!((v - want).abs() <= 0.00005 + 1e-12, "{m}: {v} vs {want}");
    }

    let bad = Command::new(bin("distill"))
        .args(["eval", "--qrels", "x", "--run", "y", "--metrics", "ndcg@10,bleu"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown metric 'bleu'"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("run"), "q1 Q0 d1 1\n").unwrap();
    let bad = Command::new(bin("distill"))
        .args(["eval", "--qrels"])
        .arg(fx.join("qrels.txt"))
        .arg("--run")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("run:1: expected 6 columns"), "{err}");
}
