//! Precomputed teachers (Hofstätter's ensemble TSV, a Rank-DistiLLM-style TREC run) and the JSONL
//! candidate source, through the service; and the `distill` CLI driving it.

use distill_e2e::*;
use distill_proto as pb;
use distill_shards::{DatasetReader, ListRow, TripleRow};
use futures::TryStreamExt;
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

async fn run_job(svc: &Service, spec: pb::LabelingSpec) -> pb::Job {
    let mut client = svc.client().await;
    let id = client.start_labeling(spec).await.unwrap().into_inner().id;
    let job = wait_job(&mut client, &id, Duration::from_secs(60)).await;
    assert_succeeded(&job);
    job
}

async fn lists(uri: &str) -> (distill_shards::Manifest, Vec<ListRow>) {
    let r = DatasetReader::open_uri(uri).await.unwrap();
    let b: Vec<_> = r.batches(100).try_collect().await.unwrap();
    (r.manifest().clone(), b.iter().flat_map(|b| ListRow::from_batch(b).unwrap()).collect())
}

fn run_lines(f: &Fixture) -> Vec<Vec<String>> {
    std::fs::read_to_string(f.path("run.trec"))
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

fn precomputed(path: String, format: pb::PrecomputedFormat) -> Option<pb::TeacherSpec> {
    Some(pb::TeacherSpec {
        teacher: Some(pb::teacher_spec::Teacher::Precomputed(pb::PrecomputedTeacher {
            path,
            format: format as i32,
            name: "ensemble-v1".into(),
        })),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn precomputed_teachers_and_jsonl_candidates() {
    let f = Fixture::new(12, 10);
    let state = tempfile::tempdir().unwrap();
    let svc = Service::teacher(state.path(), &[], &[]);
    let out = tempfile::tempdir().unwrap();
    let o = |n: &str| out.path().join(n).to_str().unwrap().to_string();

    // Hofstätter TSV: teacher scores for the first 6 candidates of each query (in file order);
    // pairs of (candidate i, candidate i+3).
    let lines = run_lines(&f);
    let mut teacher: HashMap<(String, String), f64> = HashMap::new();
    let mut tsv = String::new();
    let mut by_q: HashMap<String, Vec<String>> = HashMap::new();
    for l in &lines {
        by_q.entry(l[0].clone()).or_default().push(l[2].clone());
    }
    for (q, docs) in &by_q {
        for i in 0..3 {
            let (p, n) = (&docs[i], &docs[i + 3]);
            let (ps, ns) = (10.0 - i as f64 * 0.5, -(i as f64) - 1.25);
            teacher.insert((q.clone(), p.clone()), ps);
            teacher.insert((q.clone(), n.clone()), ns);
            tsv.push_str(&format!("{ps}\t{ns}\t{q}\t{p}\t{n}\n"));
        }
    }
    std::fs::write(f.path("teacher.tsv"), tsv).unwrap();
    let spec = pb::LabelingSpec {
        source: Some(f.trec_source(false)),
        sampling: Some(pb::Sampling::default()),
        layout: pb::OutputLayout::Lists as i32,
        teacher: precomputed(f.path("teacher.tsv"), pb::PrecomputedFormat::HofstatterTsv),
        output_uri: o("hof"),
        ..Default::default()
    };
    let job = run_job(&svc, spec).await;
    let (m, rows) = lists(&o("hof")).await;
    assert_eq!(m.teacher.kind, "precomputed");
    assert_eq!(m.teacher.name, "ensemble-v1");
    assert_eq!(rows.len(), 12);
    for r in &rows {
        assert_eq!(r.items.len(), 6, "only the candidates the teacher scored");
        let mut by_score: Vec<_> = r.items.iter().collect();
        by_score.sort_by(|a, b| b.teacher_score.partial_cmp(&a.teacher_score).unwrap());
        for (rank, item) in by_score.iter().enumerate() {
            assert_eq!(item.teacher_score, teacher[&(r.query_id.clone(), item.doc_id.clone())]);
            assert_eq!(item.teacher_rank, rank as i32 + 1);
        }
    }
    assert_eq!(job.progress.unwrap().counters["unscored_candidates"], (12 * 4) as f64);

    // A TREC-run teacher that reverses the first stage: the teacher ranks are reversed.
    let mut reversed = String::new();
    for q in by_q.keys() {
        // The first stage's order as trec_eval sorts it (score desc, docid desc); the teacher's
        // score grows with the position, so it ranks the list upside down.
        let mut entries: Vec<&Vec<String>> = lines.iter().filter(|l| &l[0] == q).collect();
        entries.sort_by(|a, b| {
            b[4].parse::<f64>()
                .unwrap()
                .partial_cmp(&a[4].parse::<f64>().unwrap())
                .unwrap()
                .then_with(|| b[2].cmp(&a[2]))
        });
        for (pos, l) in entries.iter().enumerate() {
            reversed.push_str(&format!("{q} Q0 {} {} {} rankzephyr\n", l[2], entries.len() - pos, pos as f64 * 0.5));
        }
    }
    std::fs::write(f.path("teacher.trec"), reversed).unwrap();
    let spec = pb::LabelingSpec {
        source: Some(f.trec_source(false)),
        sampling: Some(pb::Sampling { depth: 10, ..Default::default() }),
        layout: pb::OutputLayout::Lists as i32,
        teacher: precomputed(f.path("teacher.trec"), pb::PrecomputedFormat::TrecRun),
        output_uri: o("trec"),
        ..Default::default()
    };
    run_job(&svc, spec).await;
    let (_, rows) = lists(&o("trec")).await;
    for r in &rows {
        let ranks: Vec<i32> = r.items.iter().map(|i| i.teacher_rank).collect();
        assert_eq!(ranks, (1..=10).rev().collect::<Vec<_>>(), "query {}", r.query_id);
    }

    // JSONL candidates with labels, triples with positives from the labels.
    let jsonl: String = (0..4)
        .map(|q| {
            let cands: Vec<_> = (0..5)
                .map(|d| serde_json::json!({"docid": format!("j{q}-{d}"), "text": format!("text {d}"), "score": 5.0 - d as f64, "label": (d == 2) as i32}))
                .collect();
            serde_json::json!({"qid": format!("jq{q}"), "query": format!("query {q}"), "candidates": cands}).to_string() + "\n"
        })
        .collect();
    std::fs::write(f.path("cands.jsonl"), jsonl).unwrap();
    let spec = pb::LabelingSpec {
        source: Some(pb::CandidateSource {
            source: Some(pb::candidate_source::Source::Jsonl(pb::JsonlCandidates { path: f.path("cands.jsonl") })),
        }),
        sampling: Some(pb::Sampling {
            negatives_per_query: 2,
            positives_from_qrels: true,
            seed: 3,
            ..Default::default()
        }),
        layout: pb::OutputLayout::Triples as i32,
        teacher: Some(pb::TeacherSpec {
            teacher: Some(pb::teacher_spec::Teacher::FirstStage(pb::FirstStageTeacher {})),
        }),
        output_uri: o("jsonl"),
        ..Default::default()
    };
    run_job(&svc, spec).await;
    let r = DatasetReader::open_uri(&o("jsonl")).await.unwrap();
    let b: Vec<_> = r.batches(100).try_collect().await.unwrap();
    let rows: Vec<TripleRow> = b.iter().flat_map(|b| TripleRow::from_batch(b).unwrap()).collect();
    assert_eq!(rows.len(), 8);
    for t in &rows {
        assert!(t.pos_id.ends_with("-2") && t.pos_score == Some(3.0) && t.pos_label == Some(1));
        assert_eq!(t.neg_label, Some(0));
        assert_ne!(t.neg_id, t.pos_id);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_labels_lists_jobs_and_inspects_shards() {
    let f = Fixture::new(20, 10);
    let state = tempfile::tempdir().unwrap();
    let svc = Service::teacher(state.path(), &[], &[]);
    let out = tempfile::tempdir().unwrap();
    let uri = out.path().join("cli").to_str().unwrap().to_string();
    let distill = |args: &[&str]| {
        let o = Command::new(bin("distill")).args(["--teacher", &svc.url()]).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let mut label: Vec<String> = vec!["label".into()];
    label.extend(f.cli_source_args(true));
    label.extend(
        ["--positives-from-qrels", "--negatives", "2", "--output", &uri, "--rows-per-shard", "10"].map(String::from),
    );
    let (ok, stdout, stderr) = distill(&label.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{stderr}");
    assert!(stdout.contains("succeeded") && stdout.contains(&uri), "{stdout}");
    let (ok, stdout, _) = distill(&["jobs", "list"]);
    assert!(ok && stdout.contains("succeeded") && stdout.contains("20/20"), "{stdout}");
    let id = stdout.lines().nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let (ok, stdout, _) = distill(&["jobs", "get", &id]);
    assert!(ok && stdout.contains("state:     succeeded"), "{stdout}");
    let (ok, stdout, _) = distill(&["shards", "inspect", &uri, "--rows", "2"]);
    assert!(ok, "{stdout}");
    assert!(
        stdout.contains("layout:   triples") && stdout.contains("pos_score") && stdout.contains("part-00000-"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().filter(|l| l.starts_with("  Q")).count(), 2, "{stdout}");
    let (ok, _, stderr) = distill(&["jobs", "get", "nope"]);
    assert!(!ok && stderr.contains("NotFound"), "{stderr}");
    let (ok, _, stderr) = distill(&["label", "--run", &f.path("nothere"), "--queries", "q", "--collection", "c"]);
    assert!(!ok && stderr.contains("InvalidArgument") && stderr.contains("nothere: no such file"), "{stderr}");
    let (ok, _, stderr) = distill(&["shards", "inspect", out.path().to_str().unwrap()]);
    assert!(!ok && stderr.contains("no committed manifest"), "{stderr}");
}

/// `distill score` of every (query, candidate) of `rows` with one model, in row order.
fn cli_scores(model: &str, rows: &[ListRow], dir: &std::path::Path) -> Vec<Vec<f64>> {
    let mut input = String::new();
    for r in rows {
        for i in &r.items {
            input.push_str(&serde_json::json!({"query": r.query, "passage": i.text}).to_string());
            input.push('\n');
        }
    }
    let (pairs, out) = (dir.join("pairs.jsonl"), dir.join("scores.jsonl"));
    std::fs::write(&pairs, input).unwrap();
    let status = Command::new(bin("distill"))
        .args(["score", "--model", model, "--max-length", "40", "--max-query-length", "16", "--input"])
        .arg(&pairs)
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let flat: Vec<f64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["score"].as_f64().unwrap())
        .collect();
    let mut it = flat.into_iter();
    rows.iter().map(|r| r.items.iter().map(|_| it.next().unwrap()).collect()).collect()
}

/// A `lists` labelling spec with a cross-encoder ensemble teacher.
fn ensemble_lists(source: pb::CandidateSource, ensemble: pb::CrossEncoderEnsemble, out: &str) -> pb::LabelingSpec {
    pb::LabelingSpec {
        source: Some(source),
        sampling: Some(pb::Sampling::default()),
        layout: pb::OutputLayout::Lists as i32,
        teacher: Some(pb::TeacherSpec { teacher: Some(pb::teacher_spec::Teacher::CrossEncoders(ensemble)) }),
        output_uri: out.to_string(),
        ..Default::default()
    }
}

/// A cross-encoder ensemble of two tiny checkpoints (BERT and ELECTRA): the shard's teacher scores
/// are the mean of each model's `distill score` output, or the mean of their per-query z-scores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_encoder_ensemble_scores_are_the_members_mean() {
    // Passages that differ in words (the tiny models' vocabulary has no digits).
    let f = Fixture::topical(6, 5);
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::teacher(dir.path().join("store"), &[], &[]);
    let models = [model_fixture("bert"), model_fixture("electra")];
    for (combination, name) in [(pb::EnsembleCombination::Mean, "mean"), (pb::EnsembleCombination::ZnormMean, "znorm")]
    {
        let out = dir.path().join(name).to_str().unwrap().to_string();
        let ensemble = pb::CrossEncoderEnsemble {
            models: models.to_vec(),
            combination: combination as i32,
            batch_size: 3,
            max_query_length: 16,
            max_length: 40,
            // Small enough for several length-sorted passes per query.
            max_batch_tokens: 64,
            ..Default::default()
        };
        let spec = ensemble_lists(f.trec_source(false), ensemble, &out);
        let job = run_job(&svc, spec).await;
        assert_succeeded(&job);
        let counters = &job.progress.as_ref().unwrap().counters;
        assert!(counters["forward_passes"] >= 12.0, "{counters:?}");
        assert!(counters["tokens"] > 0.0 && counters["padded_tokens"] >= counters["tokens"], "{counters:?}");
        let (manifest, rows) = lists(&out).await;
        assert_eq!(manifest.teacher.kind, "cross_encoder_ensemble");
        assert_eq!(manifest.teacher.name, "bert+electra");
        assert_eq!(rows.len(), 6);
        let members: Vec<Vec<Vec<f64>>> = models.iter().map(|m| cli_scores(m, &rows, dir.path())).collect();
        // The same ensemble behind the Score RPC of a service started with it: same combined and
        // member scores for the same pairs (z-scores over the pairs sharing a query).
        let scorer = Service::teacher(
            dir.path().join(format!("scorer-{name}")),
            &["--score-model", &models.join(","), "--score-combination", name, "--score-max-length", "40"],
            &[],
        );
        let seen = wait_serving(&scorer, "distill.v1.TeacherService", Duration::from_secs(60)).await;
        assert_eq!(seen.last(), Some(&1), "{seen:?}");
        let pairs: Vec<pb::Pair> = rows
            .iter()
            .flat_map(|r| r.items.iter().map(|i| pb::Pair { query: r.query.clone(), passage: i.text.clone() }))
            .collect();
        let scored = scorer.client().await.score(pb::ScoreRequest { pairs }).await.unwrap().into_inner();
        assert_eq!(scored.teacher, "bert+electra");
        let items: Vec<(usize, usize, &distill_shards::ListItem)> = rows
            .iter()
            .enumerate()
            .flat_map(|(qi, r)| r.items.iter().enumerate().map(move |(k, i)| (qi, k, i)))
            .collect();
        assert_eq!(scored.scores.len(), items.len());
        for (n, (qi, k, item)) in items.iter().enumerate() {
            assert!((scored.scores[n] as f64 - item.teacher_score).abs() < 1e-4, "{name} Score pair {n}");
            for (m, member) in members.iter().enumerate().take(2) {
                assert!((scored.members[n].scores[m] as f64 - member[*qi][*k]).abs() < 1e-5, "{name} member {m}");
            }
        }
        drop(scorer);
        for (qi, row) in rows.iter().enumerate() {
            let per_member: Vec<Vec<f64>> = members
                .iter()
                .map(|m| {
                    let s = &m[qi];
                    if combination == pb::EnsembleCombination::Mean {
                        return s.clone();
                    }
                    let n = s.len() as f64;
                    let mean = s.iter().sum::<f64>() / n;
                    let std = (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
                    assert!(std > 0.0, "{name}: a member gives one score to every candidate of a query");
                    s.iter().map(|x| (x - mean) / std).collect()
                })
                .collect();
            for (k, item) in row.items.iter().enumerate() {
                // Each member's raw score is kept beside the combined one.
                let kept = item.member_scores.as_ref().expect("member scores in the shard");
                assert_eq!(kept.len(), 2);
                for (m, got) in kept.iter().enumerate() {
                    assert!(
                        (got - members[m][qi][k]).abs() < 1e-5,
                        "{name} member {m}: {got} vs {}",
                        members[m][qi][k]
                    );
                }
                let want = (per_member[0][k] + per_member[1][k]) / 2.0;
                assert!(
                    (item.teacher_score - want).abs() < 1e-5,
                    "{name} {} {}: {} vs {want}",
                    row.query_id,
                    item.doc_id,
                    item.teacher_score
                );
            }
            // Teacher ranks follow the combined scores.
            let best = row.items.iter().map(|i| i.teacher_score).fold(f64::MIN, f64::max);
            let first = row.items.iter().find(|i| i.teacher_rank == 1).unwrap();
            assert_eq!(first.teacher_score, best, "{name} {}", row.query_id);
        }
    }
    // A hybrid teacher: the first stage's score as a third member, z-normalised with the models'.
    let out = dir.path().join("hybrid").to_str().unwrap().to_string();
    let ensemble = pb::CrossEncoderEnsemble {
        models: models.to_vec(),
        combination: pb::EnsembleCombination::ZnormMean as i32,
        max_length: 40,
        max_query_length: 16,
        include_first_stage: true,
        ..Default::default()
    };
    let spec = ensemble_lists(f.trec_source(false), ensemble, &out);
    assert_succeeded(&run_job(&svc, spec).await);
    let (manifest, rows) = lists(&out).await;
    assert_eq!(manifest.teacher.name, "bert+electra+first_stage");
    let run: HashMap<(String, String), f64> =
        run_lines(&f).into_iter().map(|l| ((l[0].clone(), l[2].clone()), l[4].parse().unwrap())).collect();
    for row in &rows {
        let members: Vec<&Vec<f64>> = row.items.iter().map(|i| i.member_scores.as_ref().unwrap()).collect();
        let z = |m: usize| {
            let xs: Vec<f64> = members.iter().map(|s| s[m]).collect();
            let n = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / n;
            let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
            xs.iter().map(|x| if sd > 0.0 { (x - mean) / sd } else { 0.0 }).collect::<Vec<f64>>()
        };
        let (z0, z1, z2) = (z(0), z(1), z(2));
        for (k, item) in row.items.iter().enumerate() {
            assert_eq!(members[k].len(), 3);
            assert_eq!(members[k][2], run[&(row.query_id.clone(), item.doc_id.clone())], "the first stage's score");
            assert!((item.teacher_score - (z0[k] + z1[k] + z2[k]) / 3.0).abs() < 1e-9);
        }
    }
    // Triples carry the members' scores of the positive and the negative.
    let out = dir.path().join("triples").to_str().unwrap().to_string();
    let spec = pb::LabelingSpec {
        source: Some(f.trec_source(true)),
        sampling: Some(pb::Sampling { positives_from_qrels: true, negatives_per_query: 2, ..Default::default() }),
        layout: pb::OutputLayout::Triples as i32,
        teacher: Some(pb::TeacherSpec {
            teacher: Some(pb::teacher_spec::Teacher::CrossEncoders(pb::CrossEncoderEnsemble {
                models: models.to_vec(),
                max_length: 40,
                ..Default::default()
            })),
        }),
        output_uri: out.clone(),
        ..Default::default()
    };
    assert_succeeded(&run_job(&svc, spec).await);
    let r = DatasetReader::open_uri(&out).await.unwrap();
    let b: Vec<_> = r.batches(100).try_collect().await.unwrap();
    let triples: Vec<TripleRow> = b.iter().flat_map(|b| TripleRow::from_batch(b).unwrap()).collect();
    assert!(!triples.is_empty());
    for t in &triples {
        for (members, score) in [(&t.pos_member_scores, t.pos_score), (&t.neg_member_scores, t.neg_score)] {
            let m = members.as_ref().expect("member scores");
            assert_eq!(m.len(), 2);
            assert!(((m[0] + m[1]) / 2.0 - score.unwrap()).abs() < 1e-9, "{t:?}");
        }
    }
    // A model directory that is no cross-encoder (no head) is refused by the job with its name.
    let spec = pb::LabelingSpec {
        source: Some(f.trec_source(false)),
        sampling: Some(pb::Sampling::default()),
        layout: pb::OutputLayout::Lists as i32,
        teacher: Some(pb::TeacherSpec {
            teacher: Some(pb::teacher_spec::Teacher::CrossEncoders(pb::CrossEncoderEnsemble {
                models: vec![dir.path().join("no-such-model").to_str().unwrap().to_string()],
                ..Default::default()
            })),
        }),
        output_uri: dir.path().join("bad").to_str().unwrap().to_string(),
        ..Default::default()
    };
    let mut client = svc.client().await;
    let id = client.start_labeling(spec).await.unwrap().into_inner().id;
    let job = wait_job(&mut client, &id, Duration::from_secs(60)).await;
    assert_eq!(job.state(), pb::JobState::Failed);
    assert!(
        job.error.contains("teacher.cross_encoders.models[0]") && job.error.contains("no-such-model"),
        "{}",
        job.error
    );
    // A service started without --score-model says how to get one.
    let err = client.score(pb::ScoreRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(err.message().contains("--score-model"), "{}", err.message());
    // One whose scoring model does not load stops, naming it.
    let missing = dir.path().join("no-such-scorer").to_str().unwrap().to_string();
    let mut broken = Service::teacher(dir.path().join("broken"), &["--score-model", &missing], &[]);
    let status = broken.child.wait().unwrap();
    assert!(!status.success());
    let named = |log: &str| log.contains("--score-model") && log.contains("no-such-scorer");
    for _ in 0..100 {
        if named(&broken.log.lock().unwrap()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // the log pipe drains after the exit
    }
    let log = broken.log.lock().unwrap().clone();
    assert!(named(&log), "{log}");
}

/// The real all-MiniLM-L6-v2 (a sentence-transformers bi-encoder) teaches beside a cross-encoder:
/// its member scores are `distill score`'s cosine similarities, the combined score their mean with
/// the cross-encoder's, and on real sentences it puts the relevant passage first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bi_encoder_member_teaches_with_cosine_similarities() {
    let dir = tempfile::tempdir().unwrap();
    let queries = [
        (
            "q1",
            "what is the capital of france",
            [
                "Paris is the capital and largest city of France.",
                "The cat sat on the mat and purred.",
                "Rust is a systems programming language.",
            ],
        ),
        (
            "q2",
            "how do plants make food",
            [
                "A violin has four strings.",
                "Photosynthesis turns light, water and carbon dioxide into sugar in plants.",
                "The stock market fell on Monday.",
            ],
        ),
        (
            "q3",
            "a tool to compress files",
            [
                "Bananas are rich in potassium.",
                "Jupiter is the largest planet.",
                "xz-utils: XZ-format compression utilities for packing files.",
            ],
        ),
    ];
    let lines: Vec<String> = queries
        .iter()
        .map(|(qid, q, ps)| {
            let c: Vec<_> = ps
                .iter()
                .enumerate()
                .map(|(i, p)| serde_json::json!({"docid": format!("{qid}-{i}"), "text": p}))
                .collect();
            serde_json::json!({"qid": qid, "query": q, "candidates": c}).to_string()
        })
        .collect();
    let jsonl = dir.path().join("candidates.jsonl");
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let svc = Service::teacher(dir.path().join("store"), &[], &[]);
    let models = [minilm_dir(), model_fixture("bert")];
    let out = dir.path().join("lists").to_str().unwrap().to_string();
    let spec = pb::LabelingSpec {
        source: Some(pb::CandidateSource {
            source: Some(pb::candidate_source::Source::Jsonl(pb::JsonlCandidates {
                path: jsonl.to_str().unwrap().into(),
            })),
        }),
        sampling: Some(pb::Sampling::default()),
        layout: pb::OutputLayout::Lists as i32,
        teacher: Some(pb::TeacherSpec {
            teacher: Some(pb::teacher_spec::Teacher::CrossEncoders(pb::CrossEncoderEnsemble {
                models: models.to_vec(),
                max_length: 40,
                max_query_length: 16,
                name: "minilm-bi+bert".into(),
                ..Default::default()
            })),
        }),
        output_uri: out.clone(),
        ..Default::default()
    };
    assert_succeeded(&run_job(&svc, spec).await);
    let (manifest, rows) = lists(&out).await;
    assert_eq!(manifest.teacher.details["member_kinds"], serde_json::json!(["bi_encoder", "cross_encoder"]));
    let members: Vec<Vec<Vec<f64>>> = models.iter().map(|m| cli_scores(m, &rows, dir.path())).collect();
    for (qi, row) in rows.iter().enumerate() {
        for (k, item) in row.items.iter().enumerate() {
            let kept = item.member_scores.as_ref().unwrap();
            for m in 0..2 {
                assert!(
                    (kept[m] - members[m][qi][k]).abs() < 1e-5,
                    "{} member {m}: {} vs {}",
                    item.doc_id,
                    kept[m],
                    members[m][qi][k]
                );
            }
            assert!((item.teacher_score - (kept[0] + kept[1]) / 2.0).abs() < 1e-9);
            assert!((-1.0..=1.0).contains(&kept[0]), "a cosine");
        }
        // MiniLM alone ranks the relevant passage first on these.
        let best = row
            .items
            .iter()
            .max_by(|a, b| a.member_scores.as_ref().unwrap()[0].total_cmp(&b.member_scores.as_ref().unwrap()[0]))
            .unwrap();
        let relevant = match row.query_id.as_str() {
            "q1" => "q1-0",
            "q2" => "q2-1",
            _ => "q3-2",
        };
        assert_eq!(best.doc_id, relevant);
    }
}
