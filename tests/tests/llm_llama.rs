//! Opt-in (`DISTILL_LLAMA_TESTS=1`): the LLM teachers against a real OpenAI-compatible server,
//! llama-cpp-python's, running SmolLM2-135M-Instruct (GGUF) on 127.0.0.1. Set up once with
//! `bash scripts/llm-server.sh setup` (compiles llama.cpp, ~13 min on 2 cores); not part of the
//! default CI run. What it checks: the real server's answers go through the same parsing, repair,
//! counters and shards as the scripted server's (tests/llm.rs).

use distill_e2e::*;
use distill_proto as pb;
use distill_shards::{DatasetReader, ListRow};
use futures::TryStreamExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct LlamaServer {
    child: Child,
    base_url: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_llama() -> LlamaServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("bash")
        .arg(workspace_root().join("scripts/llm-server.sh"))
        .args(["serve", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("scripts/llm-server.sh serve");
    let server = LlamaServer { child, base_url: format!("http://127.0.0.1:{port}/v1") };
    let deadline = Instant::now() + Duration::from_secs(120);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "llama server not up after 120 s (run scripts/llm-server.sh setup)");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    server
}

const QUERIES: [(&str, &str, [&str; 6]); 3] = [
    (
        "q1",
        "what is the capital of france",
        [
            "Paris is the capital and largest city of France.",
            "The cat sat on the mat and purred quietly.",
            "Rust is a systems programming language focused on safety.",
            "Berlin is the capital of Germany.",
            "Bananas are rich in potassium.",
            "The Eiffel Tower stands in Paris, the French capital.",
        ],
    ),
    (
        "q2",
        "how do plants make food",
        [
            "Photosynthesis lets plants turn light, water and carbon dioxide into sugar.",
            "The stock market fell sharply on Monday.",
            "Chlorophyll in leaves absorbs sunlight for photosynthesis.",
            "A violin has four strings.",
            "Plants take up water through their roots.",
            "Football is played by two teams of eleven.",
        ],
    ),
    (
        "q3",
        "boiling point of water",
        [
            "Water boils at 100 degrees Celsius at sea level.",
            "Mount Everest is the highest mountain on Earth.",
            "At high altitude water boils at a lower temperature.",
            "Ice melts at zero degrees Celsius.",
            "Jupiter is the largest planet.",
            "Coffee is brewed with hot water.",
        ],
    ),
];

fn candidates(dir: &std::path::Path) -> String {
    let lines: Vec<String> = QUERIES
        .iter()
        .map(|(qid, q, ps)| {
            let c: Vec<_> = ps
                .iter()
                .enumerate()
                .map(
                    |(i, p)| serde_json::json!({"docid": format!("{qid}-d{i}"), "text": p, "label": i32::from(i == 0)}),
                )
                .collect();
            serde_json::json!({"qid": qid, "query": q, "candidates": c}).to_string()
        })
        .collect();
    let path = dir.join("candidates.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path.to_str().unwrap().to_string()
}

fn spec(candidates: &str, llm: pb::LlmReranker, output: String) -> pb::LabelingSpec {
    pb::LabelingSpec {
        source: Some(pb::CandidateSource {
            source: Some(pb::candidate_source::Source::Jsonl(pb::JsonlCandidates { path: candidates.into() })),
        }),
        sampling: Some(pb::Sampling::default()),
        layout: pb::OutputLayout::Lists as i32,
        teacher: Some(pb::TeacherSpec { teacher: Some(pb::teacher_spec::Teacher::Llm(llm)) }),
        output_uri: output,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn smollm2_behind_llama_cpp_server_labels_lists() {
    if std::env::var("DISTILL_LLAMA_TESTS").ok().as_deref() != Some("1") {
        eprintln!("skipped: set DISTILL_LLAMA_TESTS=1 after `bash scripts/llm-server.sh setup`");
        return;
    }
    let llama = start_llama().await;
    let dir = tempfile::tempdir().unwrap();
    let candidates = candidates(dir.path());
    let endpoint = format!("llama={}", llama.base_url);
    let svc = Service::teacher(dir.path().join("store"), &["--llm-endpoint", &endpoint], &[]);
    let base = pb::LlmReranker {
        endpoint: Some(pb::LlmEndpoint {
            base_url: llama.base_url.clone(),
            model: "smollm2-135m-instruct".into(),
            ..Default::default()
        }),
        concurrency: 2,
        max_retries: 1,
        request_timeout_ms: 120_000,
        no_cache: true,
        ..Default::default()
    };
    for (mode, api) in [
        (pb::LlmMode::Listwise, pb::LlmApi::Chat),
        (pb::LlmMode::Pointwise, pb::LlmApi::Chat),
        (pb::LlmMode::Pointwise, pb::LlmApi::Completions),
    ] {
        let out = dir.path().join(format!("{mode:?}-{api:?}")).to_str().unwrap().to_string();
        let llm = pb::LlmReranker { mode: mode as i32, api: api as i32, ..base.clone() };
        let mut client = svc.client().await;
        let id = client.start_labeling(spec(&candidates, llm, out.clone())).await.unwrap().into_inner().id;
        let job = wait_job(&mut client, &id, Duration::from_secs(600)).await;
        assert_succeeded(&job);
        let counters = job.progress.clone().unwrap().counters;
        eprintln!("{mode:?}/{api:?}: {counters:?}");
        assert!(counters["requests"] >= 3.0 && counters["prompt_tokens"] > 0.0, "{counters:?}");
        let r = DatasetReader::open_uri(&out).await.unwrap();
        let b: Vec<_> = r.batches(100).try_collect().await.unwrap();
        let rows: Vec<ListRow> = b.iter().flat_map(|b| ListRow::from_batch(b).unwrap()).collect();
        assert!(!rows.is_empty());
        for row in &rows {
            let mut ranks: Vec<i32> = row.items.iter().map(|i| i.teacher_rank).collect();
            ranks.sort();
            assert_eq!(ranks, (1..=row.items.len() as i32).collect::<Vec<_>>(), "{}", row.query_id);
            if mode == pb::LlmMode::Pointwise {
                assert!(row.items.iter().all(|i| (0.0..=1.0).contains(&i.teacher_score)), "P(yes) in [0, 1]");
            }
            let order: Vec<&str> = {
                let mut items: Vec<_> = row.items.iter().collect();
                items.sort_by_key(|i| i.teacher_rank);
                items.iter().map(|i| i.doc_id.as_str()).collect()
            };
            eprintln!("{mode:?}/{api:?} {}: {order:?}", row.query_id);
        }
    }
}
