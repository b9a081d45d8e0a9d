//! Bad input gets a clear error: INVALID_ARGUMENT for a request that is wrong as sent, and a FAILED
//! job whose message names the file and line (or field) for inputs that are malformed inside.

use distill_e2e::*;
use distill_proto as pb;
use std::time::Duration;

fn first_stage() -> Option<pb::TeacherSpec> {
    Some(pb::TeacherSpec { teacher: Some(pb::teacher_spec::Teacher::FirstStage(pb::FirstStageTeacher {})) })
}

fn spec(f: &Fixture, out: &str) -> pb::LabelingSpec {
    pb::LabelingSpec {
        source: Some(f.trec_source(true)),
        sampling: Some(pb::Sampling { depth: 5, negatives_per_query: 1, ..Default::default() }),
        layout: pb::OutputLayout::Lists as i32,
        teacher: first_stage(),
        output_uri: out.to_string(),
        ..Default::default()
    }
}

/// Runs a job that must fail and returns its error message.
async fn failure(svc: &Service, spec: pb::LabelingSpec) -> String {
    let mut client = svc.client().await;
    let id = client.start_labeling(spec).await.expect("the request itself is valid").into_inner().id;
    let job = wait_job(&mut client, &id, Duration::from_secs(60)).await;
    assert_eq!(job.state(), pb::JobState::Failed, "expected a failure");
    job.error
}

fn rewrite(f: &Fixture, name: &str, edit: impl FnOnce(String) -> String) {
    let p = f.path(name);
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, edit(text)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_inputs_fail_the_job_naming_file_and_line() {
    let state = tempfile::tempdir().unwrap();
    let svc = Service::teacher(state.path(), &[], &[]);
    let out = tempfile::tempdir().unwrap();
    let o = |n: &str| out.path().join(n).to_str().unwrap().to_string();

    // A run line with a column missing.
    let f = Fixture::new(5, 8);
    rewrite(&f, "run.trec", |t| t.replacen(" bm25\n", "\n", 3).replacen("\n", " bm25\n", 2));
    let e = failure(&svc, spec(&f, &o("a"))).await;
    assert!(e.ends_with("run.trec:3: expected 6 columns `qid Q0 docid rank score tag`, found 5"), "{e}");

    // A score that is not a number.
    let f = Fixture::new(5, 8);
    rewrite(&f, "run.trec", |t| {
        let mut lines: Vec<String> = t.lines().map(String::from).collect();
        lines[4] = lines[4].replace(" bm25", "").rsplit_once(' ').unwrap().0.to_string() + " high bm25";
        lines.join("\n") + "\n"
    });
    let e = failure(&svc, spec(&f, &o("b"))).await;
    assert!(e.ends_with("run.trec:5: score 'high' is not a number"), "{e}");

    // A document the collection does not have.
    let f = Fixture::new(5, 8);
    rewrite(&f, "run.trec", |t| t.replacen("Q0 D", "Q0 NOPE", 1));
    let e = failure(&svc, spec(&f, &o("c"))).await;
    assert!(
        e.contains("run.trec:1: document 'NOPE") && e.contains("is not in") && e.ends_with("collection.tsv"),
        "{e}"
    );

    // A collection line without a tab (wrong columns).
    let f = Fixture::new(5, 8);
    rewrite(&f, "collection.tsv", |t| t.replacen('\t', " ", 1));
    let e = failure(&svc, spec(&f, &o("d"))).await;
    assert!(e.ends_with("collection.tsv:1: expected `id<TAB>text`: no tab on this line"), "{e}");

    // A query of the run without text.
    let f = Fixture::new(5, 8);
    rewrite(&f, "queries.tsv", |t| t.lines().skip(1).map(|l| format!("{l}\n")).collect());
    let e = failure(&svc, spec(&f, &o("e"))).await;
    assert!(e.contains("run.trec:1: query 'Q0' has no text in") && e.ends_with("queries.tsv"), "{e}");

    // qrels with a bad grade.
    let f = Fixture::new(5, 8);
    rewrite(&f, "qrels.txt", |t| t.replacen(" 2\n", " yes\n", 1));
    let e = failure(&svc, spec(&f, &o("f"))).await;
    assert!(e.contains("qrels.txt:") && e.ends_with("relevance 'yes' is not an integer"), "{e}");

    // Malformed JSONL candidates.
    let f = Fixture::new(5, 8);
    std::fs::write(f.path("c.jsonl"), "{\"qid\":\"q1\",\"query\":\"x\",\"candidates\":[]}\n{\"qid\": 5}\n").unwrap();
    let mut s = spec(&f, &o("g"));
    s.source = Some(pb::CandidateSource {
        source: Some(pb::candidate_source::Source::Jsonl(pb::JsonlCandidates { path: f.path("c.jsonl") })),
    });
    let e = failure(&svc, s).await;
    assert!(e.contains("c.jsonl:2: invalid query line"), "{e}");

    // A malformed precomputed teacher file.
    let f = Fixture::new(5, 8);
    std::fs::write(f.path("teacher.tsv"), "1.5\t0.5\tQ0\tD1\tD2\n1.5\t0.5\tQ0\tD1\n").unwrap();
    let mut s = spec(&f, &o("h"));
    s.teacher = Some(pb::TeacherSpec {
        teacher: Some(pb::teacher_spec::Teacher::Precomputed(pb::PrecomputedTeacher {
            path: f.path("teacher.tsv"),
            format: pb::PrecomputedFormat::HofstatterTsv as i32,
            name: String::new(),
        })),
    });
    let e = failure(&svc, s).await;
    assert!(e.ends_with("teacher.tsv:2: expected 5 columns `pos_score neg_score qid pos_pid neg_pid`, found 4"), "{e}");

    // The service is still there and well after all of this.
    let f = Fixture::new(5, 8);
    let mut client = svc.client().await;
    let id = client.start_labeling(spec(&f, &o("ok"))).await.unwrap().into_inner().id;
    assert_succeeded(&wait_job(&mut client, &id, Duration::from_secs(60)).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_invalid_argument() {
    let state = tempfile::tempdir().unwrap();
    let svc = Service::teacher(state.path(), &[], &[]);
    let mut client = svc.client().await;
    let f = Fixture::new(3, 5);
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("x").to_str().unwrap().to_string();

    let cases: Vec<(pb::LabelingSpec, &str)> = vec![
        (pb::LabelingSpec { layout: 0, ..spec(&f, &o) }, "layout: unspecified"),
        (pb::LabelingSpec { teacher: None, ..spec(&f, &o) }, "teacher: no teacher given"),
        (pb::LabelingSpec { source: None, ..spec(&f, &o) }, "source: no candidate source given"),
        (
            pb::LabelingSpec { output_uri: "ftp://x/y".into(), ..spec(&f, &o) },
            "output_uri: invalid location 'ftp://x/y'",
        ),
        (
            {
                let mut s = spec(&f, &o);
                if let Some(pb::candidate_source::Source::Trec(t)) = s.source.as_mut().and_then(|s| s.source.as_mut()) {
                    t.collection = f.path("missing.tsv");
                }
                s
            },
            "source.trec.collection: ",
        ),
        (
            pb::LabelingSpec {
                teacher: Some(pb::TeacherSpec {
                    teacher: Some(pb::teacher_spec::Teacher::Precomputed(pb::PrecomputedTeacher {
                        path: f.path("run.trec"),
                        format: 0,
                        name: String::new(),
                    })),
                }),
                ..spec(&f, &o)
            },
            "teacher.precomputed.format: unspecified",
        ),
    ];
    for (s, want) in cases {
        let err = client.start_labeling(s).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{want}: {err:?}");
        assert!(err.message().contains(want), "{want} not in {}", err.message());
    }
    let missing = client.start_labeling({
        let mut s = spec(&f, &o);
        if let Some(pb::candidate_source::Source::Trec(t)) = s.source.as_mut().and_then(|s| s.source.as_mut()) {
            t.run = f.path("nothere.trec");
        }
        s
    });
    let err = missing.await.unwrap_err();
    assert!(err.message().contains("nothere.trec: no such file"), "{}", err.message());
    assert!(
        client.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs.is_empty(),
        "no job was created"
    );
}
