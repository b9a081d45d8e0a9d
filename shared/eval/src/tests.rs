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

/// The significance tests against scipy (scripts/fixtures/significance_reference.py): per-query
/// nDCG@10 and RR@10 of three runs from trec_eval, and small synthetic samples.
mod significance_against_scipy {
    use super::fixture;
    use crate::significance::*;

    fn reference() -> serde_json::Value {
        serde_json::from_reader(fixture("significance.json")).unwrap()
    }

    fn floats(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    }

    /// Every (a, b, scipy's result) of the fixture: the runs' comparisons and the samples.
    fn cases() -> Vec<(Vec<f64>, Vec<f64>, serde_json::Value)> {
        let r = reference();
        let mut out = Vec::new();
        for c in r["comparisons"].as_array().unwrap() {
            let values = |run: &str| &r["per_query"][run][c["metric"].as_str().unwrap()];
            let (base, other) = (values("run.trec"), values(c["run"].as_str().unwrap()));
            let mut qids: Vec<&String> = base.as_object().unwrap().keys().collect();
            qids.sort();
            let pick = |v: &serde_json::Value| qids.iter().map(|q| v[q.as_str()].as_f64().unwrap()).collect();
            out.push((pick(base), pick(other), c.clone()));
        }
        for s in r["samples"].as_array().unwrap() {
            out.push((floats(&s["a"]), floats(&s["b"]), s.clone()));
        }
        out
    }

    #[test]
    fn the_paired_t_test_equals_scipys_ttest_rel() {
        for (a, b, want) in cases() {
            let (t, p) = paired_t(&a, &b);
            assert!((t - want["t"].as_f64().unwrap()).abs() < 1e-9, "t {t} vs {}", want["t"]);
            assert!((p - want["t_p"].as_f64().unwrap()).abs() < 1e-9, "p {p} vs {}", want["t_p"]);
        }
        assert_eq!(paired_t(&[0.5, 0.2, 0.1], &[0.5, 0.2, 0.1]), (0.0, 1.0), "no difference at all");
    }

    /// Monte-Carlo p-values agree within their error (4 standard errors of both estimates, scipy's
    /// from 1,000,000 resamples); up to 20 queries the test is exact, as scipy's is.
    #[test]
    fn the_randomization_test_agrees_with_scipys_permutation_test() {
        let n = 100_000;
        let scipy_n = reference()["resamples"].as_f64().unwrap();
        for (a, b, want) in cases() {
            let p = randomization(&a, &b, n, 3);
            let reference = want["randomization_p"].as_f64().unwrap();
            let tolerance = if a.len() <= 16 {
                1e-12
            } else {
                4.0 * (reference * (1.0 - reference) * (1.0 / n as f64 + 1.0 / scipy_n)).sqrt()
            };
            assert!((p - reference).abs() <= tolerance, "{} queries: {p} vs scipy {reference}", a.len());
        }
    }

    #[test]
    fn corrections_for_several_comparisons() {
        let p = [0.01, 0.04, 0.03, 0.005];
        let near = |x: &[f64], y: &[f64]| x.iter().zip(y).all(|(a, b)| (a - b).abs() < 1e-12);
        assert!(near(&correct(&p, Correction::Bonferroni), &[0.04, 0.16, 0.12, 0.02]));
        // Holm (statsmodels' multipletests(method="holm") gives the same).
        assert!(near(&correct(&p, Correction::Holm), &[0.03, 0.06, 0.06, 0.02]));
        assert_eq!(correct(&[0.6, 0.7], Correction::Bonferroni), vec![1.0, 1.0]);
    }
}
