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

/// `distill compare` on three runs of the fixture (scripts/fixtures/significance_reference.py):
/// means and p-values as trec_eval and scipy have them (paired t-test within 1e-6, the
/// randomization test within its Monte-Carlo error), Holm's correction, and the table's marks.
#[test]
fn distill_compare_matches_scipy() {
    let fx = workspace_root().join("shared/eval/tests/fixtures");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.join("significance.json")).unwrap()).unwrap();
    let compare = |extra: &[&str]| {
        let out = Command::new(bin("distill"))
            .current_dir(&fx)
            .args(["compare", "--qrels", "qrels.txt", "--run", "run.trec", "--run", "run_b.trec", "--run"])
            .args(["run_c.trec", "--metrics", "ndcg@10,rr@10"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let json = |extra: &[&str]| -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(&compare(&[&["--format", "json"], extra].concat())).unwrap();
        v["comparisons"].as_array().unwrap().clone()
    };
    let want = reference["comparisons"].as_array().unwrap();
    let t = json(&["--test", "t"]);
    assert_eq!(t.len(), want.len());
    for (got, want) in t.iter().zip(want) {
        for key in ["metric", "baseline", "run", "queries"] {
            assert_eq!(got[key], want[key], "{key}");
        }
        let close = |k: &str, w: &str, tol: f64| (got[k].as_f64().unwrap() - want[w].as_f64().unwrap()).abs() < tol;
        assert!(close("mean_baseline", "mean_baseline", 1e-9) && close("mean_run", "mean_run", 1e-9), "{got}");
        assert!(close("p_value", "t_p", 1e-6), "{got} vs scipy {}", want["t_p"]);
        assert_eq!(got["significant"], got["p_value"].as_f64().unwrap() < 0.05);
    }
    let n = 200_000.0;
    for (got, want) in json(&["--test", "randomization", "--permutations", "200000"]).iter().zip(want) {
        let (p, scipy) = (got["p_value"].as_f64().unwrap(), want["randomization_p"].as_f64().unwrap());
        assert!((p - scipy).abs() <= 4.0 * (scipy * (1.0 - scipy) * (1.0 / n + 1e-6)).sqrt(), "{p} vs scipy {scipy}");
        assert_eq!(got["test"], "randomization");
    }
    // Holm over the two runs of each metric.
    for (got, raw) in json(&["--correction", "holm"]).iter().zip(&t) {
        let p = raw["p_value"].as_f64().unwrap();
        let other = t.iter().find(|c| c["metric"] == raw["metric"] && c["run"] != raw["run"]).unwrap();
        let q = other["p_value"].as_f64().unwrap();
        let holm = if p <= q { (2.0 * p).min(1.0) } else { (2.0 * q).min(1.0).max(p.min(1.0)) };
        assert!((got["p_value"].as_f64().unwrap() - holm).abs() < 1e-12, "{got} vs {holm}");
    }
    let table = compare(&["--alpha", "0.5"]);
    assert!(table.contains("baseline: run.trec") && table.contains("run_c.trec"), "{table}");
    let below = want.iter().filter(|w| w["t_p"].as_f64().unwrap() < 0.5).count();
    assert_eq!(table.lines().filter(|l| l.trim_end().ends_with('*')).count(), below, "{table}");
}
