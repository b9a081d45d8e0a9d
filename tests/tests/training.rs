//! Training end to end: the real teacher labels a small collection, the real trainer trains a tiny
//! student on its shards over gRPC (margin_mse on triples, infonce on lists), evaluates it, and the
//! exported Hugging Face checkpoint scores the same through `distill score`. Also: SIGKILL and
//! resume reach the same weights as an uninterrupted run, and a dataset lacking the objective's
//! fields is refused with a clear message.

use distill_e2e::*;
use distill_proto as pb;
use std::collections::HashMap;
use std::time::Duration;

const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// Triples take the teacher's top candidate as the positive (so every row has both teacher
/// scores); lists carry the qrels as labels.
fn labeling_spec(f: &Fixture, layout: pb::OutputLayout, output: &str) -> pb::LabelingSpec {
    pb::LabelingSpec {
        source: Some(f.trec_source(true)),
        sampling: Some(pb::Sampling {
            depth: 8,
            negatives_per_query: 4,
            positives_from_qrels: false,
            seed: 3,
            ..Default::default()
        }),
        layout: layout as i32,
        teacher: Some(pb::TeacherSpec {
            teacher: Some(pb::teacher_spec::Teacher::FirstStage(pb::FirstStageTeacher {})),
        }),
        output_uri: output.to_string(),
        shards: Some(pb::ShardOptions { rows_per_shard: 20, bytes_per_shard: 0 }),
        name: String::new(),
        partition: None,
    }
}

async fn label(teacher: &Service, spec: pb::LabelingSpec) {
    let mut client = teacher.client().await;
    let job = client.start_labeling(spec).await.expect("start labelling").into_inner();
    assert_succeeded(&wait_job(&mut client, &job.id, JOB_TIMEOUT).await);
}

fn evaluation(f: &Fixture) -> pb::EvaluationSpec {
    pb::EvaluationSpec {
        run: f.path("run.trec"),
        queries: f.path("queries.tsv"),
        collection: f.path("collection.tsv"),
        qrels: f.path("qrels.txt"),
        top_k: 8,
        metrics: vec!["ndcg@10".into(), "mrr@10".into()],
        max_length: 48,
        ..Default::default()
    }
}

fn training_spec(dataset: &str, objective: &str, output: &str, steps: u64, f: Option<&Fixture>) -> pb::TrainingSpec {
    pb::TrainingSpec {
        datasets: if dataset.is_empty() { vec![] } else { vec![dataset.to_string()] },
        backbone: model_fixture("bert"),
        objective: objective.to_string(),
        hyperparameters: Some(pb::Hyperparameters {
            learning_rate: 2e-3,
            batch_size: 4,
            group_size: 4,
            max_steps: steps,
            warmup_steps: 2,
            seed: 11,
            max_query_length: 16,
            max_length: 48,
            shuffle_buffer: 16,
            ..Default::default()
        }),
        evaluation: f.map(evaluation),
        eval_every_steps: 10,
        checkpoint_every_steps: 10,
        output_uri: output.to_string(),
        ..Default::default()
    }
}

fn history(output: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(format!("{output}/metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Loss of the first and last `n` logged steps.
fn loss_ends(h: &[serde_json::Value], n: usize) -> (f64, f64) {
    let losses: Vec<f64> = h.iter().filter_map(|r| r["loss"].as_f64()).collect();
    assert!(losses.len() >= 2 * n, "too few loss records: {losses:?}");
    (mean(&losses[..n]), mean(&losses[losses.len() - n..]))
}

/// `distill score` over the pairs of an evaluation run, by (qid, docid).
fn score_with_cli(f: &Fixture, model: &str, dir: &std::path::Path) -> HashMap<(String, String), f64> {
    let texts = |name: &str| -> HashMap<String, String> {
        std::fs::read_to_string(f.path(name))
            .unwrap()
            .lines()
            .map(|l| {
                let (a, b) = l.split_once('\t').unwrap();
                (a.to_string(), b.to_string())
            })
            .collect()
    };
    let (queries, docs) = (texts("queries.tsv"), texts("collection.tsv"));
    let mut keys = Vec::new();
    let mut input = String::new();
    for line in std::fs::read_to_string(f.path("run.trec")).unwrap().lines() {
        let c: Vec<&str> = line.split_whitespace().collect();
        keys.push((c[0].to_string(), c[2].to_string()));
        input.push_str(&serde_json::json!({"query": queries[c[0]], "passage": docs[c[2]]}).to_string());
        input.push('\n');
    }
    let (pairs, out) = (dir.join("pairs.jsonl"), dir.join("scores.jsonl"));
    std::fs::write(&pairs, input).unwrap();
    let status = std::process::Command::new(bin("distill"))
        .args(["score", "--model", model, "--input"])
        .arg(&pairs)
        .arg("--output")
        .arg(&out)
        .args(["--max-length", "48"])
        .status()
        .unwrap();
    assert!(status.success());
    let scores: Vec<f64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["score"].as_f64().unwrap())
        .collect();
    keys.into_iter().zip(scores).collect()
}

fn read_run(path: &str) -> HashMap<(String, String), f64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            ((c[0].to_string(), c[2].to_string()), c[4].parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teacher_labels_trainer_trains_evaluates_and_exports() {
    let f = Fixture::topical(32, 8);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let teacher = Service::teacher(dir.path().join("teacher"), &[], &[]);
    let (triples, lists) = (format!("{root}/triples"), format!("{root}/lists"));
    label(&teacher, labeling_spec(&f, pb::OutputLayout::Triples, &triples)).await;
    label(&teacher, labeling_spec(&f, pb::OutputLayout::Lists, &lists)).await;

    let trainer = Service::trainer(dir.path().join("trainer"), &[], &[]);
    let mut client = trainer.trainer_client().await;
    for (dataset, objective) in [(&triples, "margin_mse"), (&lists, "infonce")] {
        let output = format!("{root}/out-{objective}");
        let job =
            client.start_training(training_spec(dataset, objective, &output, 40, Some(&f))).await.unwrap().into_inner();
        let job = wait_job(&mut client, &job.id, JOB_TIMEOUT).await;
        assert_succeeded(&job);
        assert_eq!(job.progress.as_ref().unwrap().done, 40);
        let h = history(&output);
        let (first, last) = loss_ends(&h, 5);
        let losses: Vec<String> = h.iter().filter_map(|r| r["loss"].as_f64()).map(|l| format!("{l:.3}")).collect();
        assert!(last < first, "{objective}: loss did not decrease ({first} -> {last}): {}", losses.join(" "));
        assert!(h.iter().any(|r| r["eval_ndcg@10"].is_number()), "{objective}: no evaluation in the history");
        assert!(std::fs::read_to_string(format!("{output}/loss.svg")).unwrap().contains("<polyline"));
        for export in ["final", "best"] {
            for file in ["config.json", "model.safetensors", "tokenizer.json"] {
                assert!(
                    std::path::Path::new(&format!("{output}/{export}/{file}")).is_file(),
                    "{objective}: {export}/{file} missing"
                );
            }
        }

        // An evaluation job with the exported model, and `distill score` on the same pairs.
        let eval_out = format!("{root}/eval-{objective}");
        let spec =
            pb::EvaluationSpec { model: format!("{output}/final"), output_uri: eval_out.clone(), ..evaluation(&f) };
        let job = client.start_evaluation(spec).await.unwrap().into_inner();
        assert_succeeded(&wait_job(&mut client, &job.id, JOB_TIMEOUT).await);
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{eval_out}/metrics.json")).unwrap()).unwrap();
        let ndcg = metrics["metrics"]["ndcg@10"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&ndcg));
        let served = read_run(&format!("{eval_out}/run.trec"));
        let cli = score_with_cli(&f, &format!("{output}/final"), dir.path());
        assert_eq!(served.len(), cli.len());
        for (k, v) in &cli {
            let s = served[k];
            assert!((s - v).abs() <= 1e-5 * v.abs().max(1.0), "{objective} {k:?}: evaluation {s} vs distill score {v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_without_the_objectives_fields_is_refused() {
    let f = Fixture::new(8, 8);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let teacher = Service::teacher(dir.path().join("teacher"), &[], &[]);
    let triples = format!("{root}/triples");
    label(&teacher, labeling_spec(&f, pb::OutputLayout::Triples, &triples)).await;
    let trainer = Service::trainer(dir.path().join("trainer"), &[], &[]);
    let mut client = trainer.trainer_client().await;
    let err = client
        .start_training(training_spec(&triples, "distill_ranknet", &format!("{root}/out"), 10, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("distill_ranknet needs lists with teacher ranks"), "{}", err.message());
    assert!(err.message().contains("the dataset has triples"), "{}", err.message());

    // A learning rate that blows the weights up: the job stops at the first non-finite loss,
    // naming the objective and the step, instead of exporting a broken model.
    let mut spec = training_spec(&triples, "margin_mse", &format!("{root}/diverged"), 10, None);
    spec.hyperparameters.as_mut().unwrap().learning_rate = 1e30;
    spec.hyperparameters.as_mut().unwrap().warmup_steps = 0;
    let job = client.start_training(spec).await.unwrap().into_inner();
    let job = wait_job(&mut client, &job.id, JOB_TIMEOUT).await;
    assert_eq!(job.state(), pb::JobState::Failed);
    assert!(job.error.contains("margin_mse loss became") && job.error.contains("at step"), "{}", job.error);
    assert!(!std::path::Path::new(&format!("{root}/diverged/final")).exists());

    // A student cut to the backbone's first layer trains and exports a one-layer checkpoint; more
    // layers than the backbone has are refused.
    let mut spec = training_spec(&triples, "margin_mse", &format!("{root}/one-layer"), 4, None);
    spec.backbone_layers = 1;
    let job = client.start_training(spec).await.unwrap().into_inner();
    assert_succeeded(&wait_job(&mut client, &job.id, JOB_TIMEOUT).await);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{root}/one-layer/final/config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 1);
    let mut spec = training_spec(&triples, "margin_mse", &format!("{root}/too-deep"), 4, None);
    spec.backbone_layers = 9;
    let err = client.start_training(spec).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("backbone_layers: 9 but the backbone has 2 layers"), "{}", err.message());

    let err =
        client.start_training(training_spec(&triples, "listmle", &format!("{root}/out"), 10, None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("unknown objective 'listmle'"), "{}", err.message());

    let err = client
        .start_training(training_spec(&format!("{root}/nothing-here"), "margin_mse", &format!("{root}/out"), 10, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("nothing-here"), "{}", err.message());
}

/// Every tensor of two safetensors files, compared exactly.
/// `freeze_word_embeddings`: the exported word-embedding table is the backbone's, bit for bit, while
/// the rest of the model trained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_word_embeddings_stay_as_the_backbone_has_them() {
    let f = Fixture::topical(16, 8);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let teacher = Service::teacher(dir.path().join("teacher"), &[], &[]);
    let lists = format!("{root}/lists");
    label(&teacher, labeling_spec(&f, pb::OutputLayout::Lists, &lists)).await;
    let trainer = Service::trainer(dir.path().join("trainer"), &[], &[]);
    let mut client = trainer.trainer_client().await;
    let output = format!("{root}/frozen");
    let spec = pb::TrainingSpec {
        freeze_word_embeddings: true,
        evaluation: None,
        ..training_spec(&lists, "infonce", &output, 6, None)
    };
    let job = client.start_training(spec).await.unwrap().into_inner();
    assert_succeeded(&wait_job(&mut client, &job.id, JOB_TIMEOUT).await);
    let dev = candle_core::Device::Cpu;
    let before = candle_core::safetensors::load(format!("{}/model.safetensors", model_fixture("bert")), &dev).unwrap();
    let after = candle_core::safetensors::load(format!("{output}/final/model.safetensors"), &dev).unwrap();
    let diff = |name: &str| {
        let (x, y) = (&before[name], &after[name]);
        (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    let words: Vec<&String> = before.keys().filter(|n| n.ends_with("word_embeddings.weight")).collect();
    assert_eq!(words.len(), 1, "{:?}", before.keys().collect::<Vec<_>>());
    assert_eq!(diff(words[0]), 0.0, "the frozen table moved");
    let moved =
        before.keys().filter(|n| after.contains_key(*n) && !n.contains("word_embeddings")).filter(|n| diff(n) > 0.0);
    assert!(moved.count() > 5, "the rest of the model did not train");
}

/// Mixed precision through the service (on the CPU here: the same code path as on a GPU): the
/// job trains, the loss goes down, the exported weights are f32 masters that moved, and an
/// unknown precision is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_mixed_precision_trains_f32_master_weights() {
    let f = Fixture::topical(24, 8);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let teacher = Service::teacher(dir.path().join("teacher"), &["--device", "cpu"], &[]);
    let lists = format!("{root}/lists");
    label(&teacher, labeling_spec(&f, pb::OutputLayout::Lists, &lists)).await;
    let trainer = Service::trainer(dir.path().join("trainer"), &["--device", "cpu"], &[]);
    let mut client = trainer.trainer_client().await;

    let output = format!("{root}/bf16");
    let mut spec = pb::TrainingSpec { evaluation: None, ..training_spec(&lists, "infonce", &output, 30, None) };
    spec.hyperparameters.as_mut().unwrap().precision = "bf16".into();
    let job = client.start_training(spec.clone()).await.unwrap().into_inner();
    assert_succeeded(&wait_job(&mut client, &job.id, JOB_TIMEOUT).await);
    let (first, last) = loss_ends(&history(&output), 5);
    assert!(last < first, "bf16: loss did not decrease ({first} -> {last})");
    let dev = candle_core::Device::Cpu;
    let before = candle_core::safetensors::load(format!("{}/model.safetensors", model_fixture("bert")), &dev).unwrap();
    let after = candle_core::safetensors::load(format!("{output}/final/model.safetensors"), &dev).unwrap();
    assert!(after.values().all(|t| t.dtype() == candle_core::DType::F32), "exported weights are not f32");
    let moved = before
        .iter()
        .filter(|(n, t)| {
            after
                .get(*n)
                .is_some_and(|a| (a - *t).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
        })
        .count();
    assert!(moved > 10, "only {moved} tensors moved");

    // The job left no mode behind on the thread that ran it: an evaluation on this trainer now
    // scores as one on a fresh trainer does (f32), to the byte. (It fails without the reset only
    // when the evaluation lands on the training job's pooled thread, in about a quarter of runs
    // here; `layers::tests::training_modes_end_with_their_guard` checks the reset itself.)
    let evaluate = async |trainer: &Service, out: &str| {
        let mut client = trainer.trainer_client().await;
        let spec = pb::EvaluationSpec { model: model_fixture("bert"), output_uri: out.into(), ..evaluation(&f) };
        let job = client.start_evaluation(spec).await.unwrap().into_inner();
        assert_succeeded(&wait_job(&mut client, &job.id, JOB_TIMEOUT).await);
        std::fs::read_to_string(format!("{out}/run.trec")).unwrap()
    };
    let after_bf16 = evaluate(&trainer, &format!("{root}/eval-after-bf16")).await;
    let fresh = Service::trainer(dir.path().join("fresh-trainer"), &["--device", "cpu"], &[]);
    assert_eq!(after_bf16, evaluate(&fresh, &format!("{root}/eval-fresh")).await, "scored under the job's bf16");

    spec.hyperparameters.as_mut().unwrap().precision = "fp8".into();
    spec.output_uri = format!("{root}/fp8");
    let err = client.start_training(spec).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hyperparameters.precision"), "{}", err.message());
}

/// A CUDA device asked of a binary built without CUDA: the service does not start, and says why.
#[test]
fn services_refuse_a_device_they_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    for bin_name in ["distill-trainer", "distill-teacher"] {
        for (device, want) in [("cuda:0", "built without CUDA"), ("tpu", "expected cpu, cuda or cuda:N")] {
            if device.starts_with("cuda") && candle_core::utils::cuda_is_available() {
                continue;
            }
            let out = std::process::Command::new(bin(bin_name))
                .args(["--addr", "127.0.0.1:0", "--store"])
                .arg(dir.path())
                .args(["--device", device])
                .output()
                .unwrap();
            assert!(!out.status.success(), "{bin_name} --device {device} started");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("--device") && err.contains(want), "{bin_name} --device {device}: {err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_trainer_resumes_to_the_same_weights() {
    let f = Fixture::topical(32, 8);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let teacher = Service::teacher(dir.path().join("teacher"), &[], &[]);
    let triples = format!("{root}/triples");
    label(&teacher, labeling_spec(&f, pb::OutputLayout::Triples, &triples)).await;
    let steps = 120;

    // Uninterrupted.
    let store = dir.path().join("trainer");
    let trainer = Service::trainer(&store, &[], &[]);
    let mut client = trainer.trainer_client().await;
    let straight = format!("{root}/straight");
    let job = client
        .start_training(training_spec(&triples, "margin_mse", &straight, steps, None))
        .await
        .unwrap()
        .into_inner();
    assert_succeeded(&wait_job(&mut client, &job.id, JOB_TIMEOUT).await);

    // Killed after its first checkpoints, restarted on the same store.
    let resumed = format!("{root}/resumed");
    let job =
        client.start_training(training_spec(&triples, "margin_mse", &resumed, steps, None)).await.unwrap().into_inner();
    let deadline = std::time::Instant::now() + JOB_TIMEOUT;
    loop {
        let j = client.get_job(pb::GetJobRequest { id: job.id.clone() }).await.unwrap().into_inner();
        let done = j.progress.as_ref().map_or(0, |p| p.done);
        assert!(!j.state().is_terminal(), "the job ended before it could be killed (step {done}): make it longer");
        if done >= 25 {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    trainer.kill();
    assert!(std::path::Path::new(&format!("{resumed}/checkpoints/latest.json")).is_file());
    assert!(!std::path::Path::new(&format!("{resumed}/final")).exists());

    let trainer = Service::trainer(&store, &[], &[]);
    let mut client = trainer.trainer_client().await;
    let j = wait_job(&mut client, &job.id, JOB_TIMEOUT).await;
    assert_succeeded(&j);
    assert_eq!(j.resumes, 1);
    assert_eq!(j.progress.as_ref().unwrap().done, steps);
    assert_same_weights(format!("{straight}/final/model.safetensors"), format!("{resumed}/final/model.safetensors"));
    // The second attempt wrote checkpoints of its own (`-a1`) and removed the first attempt's.
    let kept: Vec<String> = std::fs::read_dir(format!("{resumed}/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(kept, vec![format!("step-{:08}-a1", steps - 10)]);
    // The history was carried over: one record per logged step, none twice.
    let h: Vec<u64> =
        history(&resumed).iter().filter(|&r| r["loss"].is_number()).map(|r| r["step"].as_u64().unwrap()).collect();
    let mut dedup = h.clone();
    dedup.dedup();
    assert_eq!(h, dedup);
    assert_eq!(h.last(), Some(&steps));

    // Cancelled after its first checkpoints, then resumed with ResumeJob: the same weights again.
    let reopened = format!("{root}/reopened");
    let job = client
        .start_training(training_spec(&triples, "margin_mse", &reopened, steps, None))
        .await
        .unwrap()
        .into_inner();
    while client.job(&job.id).await.progress.as_ref().map_or(0, |p| p.done) < 25 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.cancel_job(pb::CancelJobRequest { id: job.id.clone() }).await.unwrap();
    assert_eq!(wait_job(&mut client, &job.id, JOB_TIMEOUT).await.state(), pb::JobState::Cancelled);
    client.resume_job(pb::ResumeJobRequest { id: job.id.clone() }).await.unwrap();
    let j = wait_job(&mut client, &job.id, JOB_TIMEOUT).await;
    assert_succeeded(&j);
    assert_eq!(j.resumes, 1);
    assert_same_weights(format!("{straight}/final/model.safetensors"), format!("{reopened}/final/model.safetensors"));
}

/// `distill label`, `distill train` and `distill evaluate` drive the same jobs from the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_labels_trains_and_evaluates() {
    let f = Fixture::topical(16, 6);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let teacher = Service::teacher(dir.path().join("teacher"), &[], &[]);
    let trainer = Service::trainer(dir.path().join("trainer"), &[], &[]);
    let distill = |args: &[&str]| {
        let out = std::process::Command::new(bin("distill"))
            .args(["--teacher", &teacher.url(), "--trainer", &trainer.url()])
            .args(args)
            .output()
            .unwrap();
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
        assert!(out.status.success(), "distill {args:?} failed: {stderr}");
        stdout
    };
    let dataset = format!("{root}/triples");
    let mut label: Vec<String> = vec!["label".into()];
    label.extend(f.cli_source_args(false));
    label.extend(["--negatives", "3", "--output", &dataset].map(String::from));
    distill(&label.iter().map(String::as_str).collect::<Vec<_>>());
    let (out, model, backbone, eval_out) =
        (format!("{root}/student"), format!("{root}/student/final"), model_fixture("bert"), format!("{root}/eval"));
    let eval = [
        "--eval-run",
        &f.path("run.trec"),
        "--eval-queries",
        &f.path("queries.tsv"),
        "--eval-collection",
        &f.path("collection.tsv"),
        "--eval-qrels",
        &f.path("qrels.txt"),
        "--top-k",
        "6",
    ];
    let mut train = vec![
        "train",
        "--dataset",
        &dataset,
        "--backbone",
        &backbone,
        "--objective",
        "margin_mse",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--max-steps",
        "12",
        "--max-length",
        "48",
        "--max-query-length",
        "16",
        "--eval-every",
        "6",
        "--output",
        &out,
    ];
    train.extend(eval);
    let stdout = distill(&train);
    assert!(stdout.contains("succeeded: 12 steps"), "{stdout}");
    let mut evaluate = vec!["evaluate", "--model", &model, "--max-length", "48", "--output", &eval_out];
    evaluate.extend(eval);
    let stdout = distill(&evaluate);
    assert!(stdout.lines().any(|l| l.starts_with("ndcg@10\t")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("mrr@10\t")), "{stdout}");
    let listed = distill(&["jobs", "--service", "trainer", "list"]);
    assert_eq!(listed.lines().filter(|l| l.contains("succeeded")).count(), 2, "{listed}");
}

/// A training job that follows a running labelling job starts on its first shards and trains
/// while the teacher is still writing (labelling and training overlap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_follows_a_running_teacher_job() {
    let f = Fixture::topical(1500, 8);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let teacher = Service::teacher(dir.path().join("teacher"), &[], &[]);
    let trainer = Service::trainer(dir.path().join("trainer"), &["--allow-teacher", &teacher.url()], &[]);
    let mut labels = teacher.client().await;
    let mut spec = labeling_spec(&f, pb::OutputLayout::Triples, &format!("{root}/triples"));
    // Tiny shards: a long job whose shards close one by one.
    spec.shards = Some(pb::ShardOptions { rows_per_shard: 4, bytes_per_shard: 0 });
    let label_job = labels.start_labeling(spec).await.unwrap().into_inner();

    let mut client = trainer.trainer_client().await;
    let follow = |steps: u64| pb::TrainingSpec {
        datasets: vec![],
        teacher_job: Some(pb::TeacherJobRef { address: teacher.url(), job_id: label_job.id.clone() }),
        ..training_spec("", "margin_mse", &format!("{root}/student-{steps}"), steps, None)
    };
    let err = client.start_training(follow(0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("needs hyperparameters.max_steps"), "{}", err.message());

    let job = client.start_training(follow(30)).await.unwrap().into_inner();
    let trained = wait_job(&mut client, &job.id, JOB_TIMEOUT).await;
    assert_succeeded(&trained);
    let labelled = labels.get_job(pb::GetJobRequest { id: label_job.id.clone() }).await.unwrap().into_inner();
    assert!(
        !labelled.state().is_terminal() || labelled.finished_at_ms > trained.finished_at_ms,
        "the teacher finished before the student: nothing overlapped (make the labelling job longer)"
    );
    assert!(std::path::Path::new(&format!("{root}/student-30/final/model.safetensors")).is_file());
    assert_succeeded(&wait_job(&mut labels, &label_job.id, JOB_TIMEOUT).await);
}

/// CancelJob ends an evaluation within a query of re-ranking, not at the end of the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_evaluation_stops_within_a_query() {
    let f = Fixture::new(3000, 25);
    let dir = tempfile::tempdir().unwrap();
    let trainer = Service::trainer(dir.path().join("trainer"), &[], &[]);
    let mut client = trainer.trainer_client().await;
    let output = dir.path().join("eval").to_str().unwrap().to_string();
    let spec = pb::EvaluationSpec { model: model_fixture("bert"), output_uri: output, top_k: 25, ..evaluation(&f) };
    let job = client.start_evaluation(spec).await.unwrap().into_inner();
    while client.job(&job.id).await.progress.as_ref().map_or(0, |p| p.done) < 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let asked = std::time::Instant::now();
    client.cancel_job(pb::CancelJobRequest { id: job.id.clone() }).await.unwrap();
    let ended = wait_job(&mut client, &job.id, JOB_TIMEOUT).await;
    assert_eq!(ended.state(), pb::JobState::Cancelled);
    assert!(ended.progress.unwrap().done < 3000, "it re-ranked everything first");
    assert!(asked.elapsed() < Duration::from_secs(5), "cancelled after {:?}", asked.elapsed());
}
