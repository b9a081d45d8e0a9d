use super::*;
use std::path::Path;

fn fixture(name: &str) -> std::fs::File {
    std::fs::File::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).unwrap()
}

/// Reference values from trec_eval (pytrec_eval via ir_measures), made by
/// scripts/fixtures/eval_reference.py.
#[test]
fn matches_trec_eval_per_query_and_on_average() {
    let run = distill_formats::read_run(std::io::BufReader::new(fixture("run.trec")), "run.trec").unwrap();
    let qrels = distill_formats::read_qrels(std::io::BufReader::new(fixture("qrels.txt")), "qrels.txt").unwrap();
    let expected: serde_json::Value = serde_json::from_reader(fixture("expected.json")).unwrap();
    let names: Vec<String> = expected["means"].as_object().unwrap().keys().cloned().collect();
    let metrics: Vec<Metric> = names.iter().map(|n| n.parse().unwrap()).collect();
    let eval = evaluate(&run, &qrels, &metrics, false);
    assert_eq!(eval.per_query.len() as u64, expected["evaluated_queries"].as_u64().unwrap());
    for (qid, values) in &eval.per_query {
        for (name, v) in names.iter().zip(values) {
            let want = expected["per_query"][qid][name].as_f64().unwrap_or_else(|| panic!("{qid} {name} missing"));
            assert!((v - want).abs() < 1e-9, "{qid} {name}: {v} vs trec_eval {want}");
        }
    }
    for (name, mean) in names.iter().zip(&eval.means) {
        let want = expected["means"][name].as_f64().unwrap();
        assert!((mean - want).abs() < 1e-9, "{name}: {mean} vs trec_eval {want}");
    }
    let complete = evaluate(&run, &qrels, &metrics, true);
    assert!(complete.per_query.len() > eval.per_query.len());
    for (name, mean) in names.iter().zip(&complete.means) {
        let want = expected["means_complete"][name].as_f64().unwrap();
        assert!((mean - want).abs() < 1e-9, "{name} (-c): {mean} vs trec_eval {want}");
    }
}

#[test]
fn small_cases_by_hand() {
    let run = distill_formats::read_run("q Q0 a 1 3 t\nq Q0 b 2 2 t\nq Q0 c 3 2 t\n".as_bytes(), "r").unwrap();
    let qrels = distill_formats::read_qrels("q 0 b 2\nq 0 z 1\n".as_bytes(), "q").unwrap();
    let m = parse_metrics("mrr@10,p@2,recall@3,ndcg@3,map").unwrap();
    let e = evaluate(&run, &qrels, &m, false);
    // Ties by docid descending: a, c, b.
    let v = &e.per_query[0].1;
    assert_eq!(v[0], 1.0 / 3.0);
    assert_eq!(v[1], 0.0);
    assert_eq!(v[2], 0.5);
    let idcg = 2.0 + 1.0 / 3f64.log2();
    assert!((v[3] - (2.0 / 4f64.log2()) / idcg).abs() < 1e-12);
    assert!((v[4] - (1.0 / 3.0) / 2.0).abs() < 1e-12);
}

#[test]
fn metric_names() {
    assert_eq!("nDCG@10".parse::<Metric>().unwrap().measure, Measure::Ndcg(Some(10)));
    assert_eq!("MRR@10".parse::<Metric>().unwrap().measure, Measure::ReciprocalRank(Some(10)));
    let m: Metric = "P(rel=2)@5".parse().unwrap();
    assert_eq!((m.measure, m.rel), (Measure::Precision(5), 2));
    assert!("recall".parse::<Metric>().is_err());
    assert!("ndcg@0".parse::<Metric>().is_err());
    assert_eq!(parse_metrics("ndcg@10,bogus").unwrap_err(), UnknownMetric("bogus".into()));
}
