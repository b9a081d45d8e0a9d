//! `distill sweep` against a real trainer: 2 objectives x 2 seeds trained and evaluated two at a
//! time; the table's means and standard deviations are those of the cells' own evaluations; a
//! second run starts no job; a cell whose evaluation is lost is evaluated again, not retrained.

use distill_e2e::*;
use distill_proto as pb;
use std::process::Command;
use std::time::Duration;

fn sweep(f: &Fixture, trainer: &Service, dataset: &str, out: &str) -> (String, String) {
    let o = Command::new(bin("distill"))
        .args(["--trainer", &trainer.url(), "sweep", "--dataset", dataset, "--backbone", &model_fixture("bert")])
        .args(["--objectives", "bce,margin_mse", "--seeds", "1,2", "--lrs", "2e-3", "--max-steps", "6"])
        .args(["--batch-size", "2", "--max-query-length", "16", "--max-length", "48", "--concurrency", "2"])
        .args(["--eval-run", &f.path("run.trec"), "--eval-queries", &f.path("queries.tsv")])
        .args(["--eval-collection", &f.path("collection.tsv"), "--eval-qrels", &f.path("qrels.txt")])
        .args(["--top-k", "8", "--metrics", "ndcg@10,mrr@10", "--output", out])
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

async fn jobs(trainer: &Service) -> Vec<pb::Job> {
    let mut client = trainer.trainer_client().await;
    client.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_tables_its_cells_and_resumes() {
    let f = Fixture::topical(24, 8);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let teacher = Service::teacher(dir.path().join("teacher"), &[], &[]);
    let dataset = format!("{root}/triples");
    let mut client = teacher.client().await;
    let id = client.start_labeling(tiny_shards_spec(&f, &dataset, 3, "sweep")).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &id, Duration::from_secs(120)).await);
    let trainer = Service::trainer(dir.path().join("trainer"), &[], &[]);
    let out = format!("{root}/sweep");

    let (table, stderr) = sweep(&f, &trainer, &dataset, &out);
    eprintln!("{table}");
    assert!(stderr.contains("4 cells run now, 0 done before, 0 failed"), "{stderr}");
    assert_eq!(jobs(&trainer).await.len(), 8, "a training and an evaluation job per cell");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{out}/results.json")).unwrap()).unwrap();
    assert_eq!(results["cells"].as_array().unwrap().len(), 4);
    for row in results["table"].as_array().unwrap() {
        let objective = row["objective"].as_str().unwrap();
        // Each seed's value is its cell's evaluation (the trainer's metrics.json).
        let seeds: Vec<f64> = [1, 2]
            .iter()
            .map(|s| {
                let path = format!("{out}/cells/{objective}_b0_l0_lr2e-3_s{s}_d0/eval/metrics.json");
                let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                m["metrics"]["ndcg@10"].as_f64().unwrap()
            })
            .collect();
        let got: Vec<f64> = row["seeds"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!(got.iter().zip(&seeds).all(|(a, b)| (a - b).abs() < 1e-9), "{got:?} vs {seeds:?}");
        let mean = (seeds[0] + seeds[1]) / 2.0;
        let std = ((seeds[0] - mean).powi(2) + (seeds[1] - mean).powi(2)).sqrt();
        assert!(
            (row["mean"].as_f64().unwrap() - mean).abs() < 1e-12 && (row["std"].as_f64().unwrap() - std).abs() < 1e-12
        );
        assert!(table.contains(&format!("| {objective} | {mean:.4} ± {std:.4}")), "{table}");
        assert_eq!(row["p_vs_bce"].is_null(), objective == "bce");
    }
    assert!(table.contains("| first stage |") && table.contains("† differs from bce"), "{table}");
    let svg = std::fs::read_to_string(format!("{out}/results.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains(">margin_mse<"), "{svg}");
    assert_eq!(svg.matches("class=\"whisker\"").count(), 2, "a bar with its whisker per objective");
    // One smoothed loss curve per cell: as many points as its metrics.jsonl has loss records.
    let curves = std::fs::read_to_string(format!("{out}/learning_curves.svg")).unwrap();
    assert!(curves.starts_with("<svg") && curves.trim_end().ends_with("</svg>"), "{curves}");
    assert_eq!(curves.matches("<polyline").count(), 4, "{curves}");
    let history = std::fs::read_to_string(format!("{out}/cells/bce_b0_l0_lr2e-3_s1_d0/student/metrics.jsonl")).unwrap();
    let losses = history.lines().filter(|l| l.contains("\"loss\"")).count();
    assert!(losses >= 1, "{history}");
    assert!(curves.contains(">bce_b0_l0_lr2e-3_s1_d0<"), "{curves}");
    let line = curves.lines().find(|l| l.starts_with("<polyline")).unwrap();
    assert_eq!(line.split("points=\"").nth(1).unwrap().split_whitespace().count(), losses, "{line}");

    // Run again: everything is done.
    let (_, stderr) = sweep(&f, &trainer, &dataset, &out);
    assert!(stderr.contains("0 cells run now, 4 done before"), "{stderr}");
    assert_eq!(jobs(&trainer).await.len(), 8);
    // A lost evaluation is made again from the exported student.
    std::fs::remove_file(format!("{out}/cells/margin_mse_b0_l0_lr2e-3_s2_d0/eval/metrics.json")).unwrap();
    let (_, stderr) = sweep(&f, &trainer, &dataset, &out);
    assert!(stderr.contains("1 cells run now, 3 done before"), "{stderr}");
    let kinds: Vec<pb::JobKind> = jobs(&trainer).await.iter().map(|j| j.kind()).collect();
    assert_eq!(kinds.len(), 9);
    assert_eq!(kinds.iter().filter(|k| **k == pb::JobKind::Training).count(), 4, "no cell trained again");
}
