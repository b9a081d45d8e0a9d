use super::*;

fn run(text: &str) -> Result<Vec<RankedList>> {
    read_run(text.as_bytes(), "run.txt")
}

#[test]
fn run_sorted_as_trec_eval_with_ties_by_docid_descending() {
    let lists = run("q1 Q0 a 1 2.0 bm25\nq2 Q0 z 1 1 bm25\n\nq1 Q0 c 2 3.5 bm25\nq1 Q0 b 3 2.0 bm25\n").unwrap();
    assert_eq!(lists.len(), 2);
    assert_eq!(lists[0].qid, "q1");
    let ids: Vec<_> = lists[0].entries.iter().map(|e| e.docid.as_str()).collect();
    assert_eq!(ids, ["c", "b", "a"]);
    assert_eq!(lists[0].entries[0].score, 3.5);
    assert_eq!(lists[1].entries[0].rank, 1);
}

#[test]
fn run_errors_name_file_line_and_field() {
    let e = run("q1 Q0 a 1 2.0 bm25\nq1 Q0 b 2 2.0\n").unwrap_err().to_string();
    assert_eq!(e, "run.txt:2: expected 6 columns `qid Q0 docid rank score tag`, found 5");
    let e = run("q1 Q0 a 1 high bm25\n").unwrap_err().to_string();
    assert_eq!(e, "run.txt:1: score 'high' is not a number");
    let e = run("q1 Q0 a x 1 bm25\n").unwrap_err().to_string();
    assert_eq!(e, "run.txt:1: rank 'x' is not an integer");
    let e = run("q1 Q0 a 1 1 t\nq1 Q0 a 2 0.5 t\n").unwrap_err().to_string();
    assert_eq!(e, "run.txt:2: document 'a' listed twice for query 'q1'");
    let e = run("q1 Q0 a 1 NaN t\n").unwrap_err().to_string();
    assert_eq!(e, "run.txt:1: score 'NaN' is not finite");
}

#[test]
fn invalid_utf8_is_named() {
    let e = read_run(&b"q1 Q0 \xff 1 1 t\n"[..], "run.txt").unwrap_err().to_string();
    assert!(e.starts_with("run.txt:1: not valid UTF-8"), "{e}");
}

#[test]
fn qrels_read_and_errors() {
    let q = read_qrels("q1 0 a 2\nq1 0 b 0\r\nq2 Q0 c 1\n".as_bytes(), "qrels.txt").unwrap();
    assert_eq!(q["q1"]["a"], 2);
    assert_eq!(q["q1"]["b"], 0);
    assert_eq!(q["q2"]["c"], 1);
    let e = read_qrels("q1 0 a\n".as_bytes(), "qrels.txt").unwrap_err().to_string();
    assert_eq!(e, "qrels.txt:1: expected 4 columns `qid 0 docid rel`, found 3");
    let e = read_qrels("q1 0 a yes\n".as_bytes(), "qrels.txt").unwrap_err().to_string();
    assert_eq!(e, "qrels.txt:1: relevance 'yes' is not an integer");
}

#[test]
fn tsv_reads_keeps_filters_and_errors() {
    let t = read_tsv_texts("1\tfirst passage\n2\tsecond\twith tab\n".as_bytes(), "c.tsv", None).unwrap();
    assert_eq!(t["1"], "first passage");
    assert_eq!(t["2"], "second\twith tab");
    let keep: HashSet<String> = ["2".to_string()].into();
    let t = read_tsv_texts("1\tfirst\n2\tsecond\n".as_bytes(), "c.tsv", Some(&keep)).unwrap();
    assert_eq!(t.len(), 1);
    let e = read_tsv_texts("1\tok\nq1 Q0 a 1 1 t\n".as_bytes(), "c.tsv", None).unwrap_err().to_string();
    assert_eq!(e, "c.tsv:2: expected `id<TAB>text`: no tab on this line");
    let e = read_tsv_texts("1\ta\n1\tb\n".as_bytes(), "c.tsv", None).unwrap_err().to_string();
    assert_eq!(e, "c.tsv:2: id '1' appears twice");
    let e = read_tsv_texts("\ta\n".as_bytes(), "c.tsv", None).unwrap_err().to_string();
    assert_eq!(e, "c.tsv:1: empty id");
}

#[test]
fn jsonl_reads_and_errors() {
    let text = r#"{"qid":"q1","query":"what","candidates":[{"docid":"a","text":"A","score":1.5,"label":1},{"docid":"b","text":"B"}]}"#;
    let q = read_candidates_jsonl(text.as_bytes(), "c.jsonl").unwrap();
    assert_eq!(q[0].candidates[0].label, Some(1));
    assert_eq!(q[0].candidates[1].score, None);
    let e = read_candidates_jsonl("{\"qid\":\"q1\"}\n".as_bytes(), "c.jsonl").unwrap_err().to_string();
    assert!(e.starts_with("c.jsonl:1: invalid query line: missing field `query`"), "{e}");
    let e = read_candidates_jsonl("not json\n".as_bytes(), "c.jsonl").unwrap_err().to_string();
    assert!(e.starts_with("c.jsonl:1: invalid query line"), "{e}");
    let dup = format!("{text}\n{text}\n");
    let e = read_candidates_jsonl(dup.as_bytes(), "c.jsonl").unwrap_err().to_string();
    assert_eq!(e, "c.jsonl:2: query 'q1' appears twice");
    let e = read_candidates_jsonl(
        r#"{"qid":"q","query":"x","candidates":[{"docid":"a","text":"A","extra":1}]}"#.as_bytes(),
        "c.jsonl",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown field `extra`"), "{e}");
}

#[test]
fn hofstatter_triples_read_and_errors() {
    let mut rows = Vec::new();
    for_each_scored_triple("10.5\t-2.25\tq1\tp1\tn1\n".as_bytes(), "t.tsv", |r| rows.push(r)).unwrap();
    assert_eq!(
        rows,
        [ScoredTriple {
            pos_score: 10.5,
            neg_score: -2.25,
            qid: "q1".into(),
            pos_id: "p1".into(),
            neg_id: "n1".into()
        }]
    );
    let e = for_each_scored_triple("1\t2\tq1\tp1\n".as_bytes(), "t.tsv", |_| {}).unwrap_err().to_string();
    assert_eq!(e, "t.tsv:1: expected 5 columns `pos_score neg_score qid pos_pid neg_pid`, found 4");
    let e = for_each_scored_triple("x\t2\tq1\tp1\tn1\n".as_bytes(), "t.tsv", |_| {}).unwrap_err().to_string();
    assert_eq!(e, "t.tsv:1: pos_score 'x' is not a number");
}
