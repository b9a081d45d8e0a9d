//! Whether a run's per-query values differ from a baseline's by more than chance: the paired
//! two-sided t-test (as `scipy.stats.ttest_rel`) and Fisher's randomization test (each query's
//! pair of values swapped at random, i.e. the sign of its difference flipped, as
//! `scipy.stats.permutation_test` with `permutation_type="samples"`), and the Bonferroni and Holm
//! corrections for several comparisons. Checked against scipy in `tests.rs`.

use rand::{Rng, SeedableRng};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Largest sample whose 2^n sign flips the randomization test enumerates instead of drawing.
const EXACT_UP_TO: usize = 20;

/// The paired two-sided t-test of `b` against `a` (same queries, same order): the t statistic of
/// the mean difference `b - a` and its p-value. With every difference equal the test is undefined
/// (scipy answers NaN): p is 1 when they are all zero (no difference), 0 otherwise.
pub fn paired_t(a: &[f64], b: &[f64]) -> (f64, f64) {
    let d = differences(a, b);
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    if d.len() < 2 || var == 0.0 {
        return if mean == 0.0 { (0.0, 1.0) } else { (mean.signum() * f64::INFINITY, 0.0) };
    }
    let t = mean / (var / n).sqrt();
    let dist = StudentsT::new(0.0, 1.0, n - 1.0).expect("n - 1 > 0 degrees of freedom");
    (t, (2.0 * dist.cdf(-t.abs())).min(1.0))
}

/// Fisher's randomization test of `b` against `a`: the share of sign flips of the differences
/// whose mean is at least as far from zero as the observed one. Up to 20 queries every flip is
/// counted (exact); beyond, `permutations` flips are drawn from a generator seeded with `seed`
/// and the observed one is counted in (p = (k + 1) / (permutations + 1), never 0).
pub fn randomization(a: &[f64], b: &[f64], permutations: u32, seed: u64) -> f64 {
    let d = differences(a, b);
    let observed = d.iter().sum::<f64>().abs();
    // Sums equal to the observed one up to rounding count as reaching it.
    let reaches = |sum: f64| sum.abs() >= observed - 1e-9 * observed.max(1.0);
    if d.len() <= EXACT_UP_TO && (1u64 << d.len()) <= u64::from(permutations).max(1) {
        let flips = 1u64 << d.len();
        let k = (0..flips).filter(|bits| reaches(signed_sum(&d, |i| bits >> i & 1 == 1))).count();
        return k as f64 / flips as f64;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut k = 0u64;
    for _ in 0..permutations {
        if reaches(signed_sum(&d, |_| rng.random::<bool>())) {
            k += 1;
        }
    }
    (k + 1) as f64 / (f64::from(permutations) + 1.0)
}

/// The values of the queries both runs have, paired as (baseline's, other's), in the baseline's
/// order: what the tests above take. Queries only one run has are left out.
pub fn on_common_queries<'a>(
    baseline: impl IntoIterator<Item = (&'a str, f64)>,
    other: impl IntoIterator<Item = (&'a str, f64)>,
) -> (Vec<f64>, Vec<f64>) {
    let theirs: std::collections::HashMap<&str, f64> = other.into_iter().collect();
    baseline.into_iter().filter_map(|(q, v)| theirs.get(q).map(|x| (v, *x))).unzip()
}

fn differences(a: &[f64], b: &[f64]) -> Vec<f64> {
    assert_eq!(a.len(), b.len(), "paired samples of different sizes");
    a.iter().zip(b).map(|(x, y)| y - x).collect()
}

fn signed_sum(d: &[f64], mut flip: impl FnMut(usize) -> bool) -> f64 {
    d.iter().enumerate().map(|(i, x)| if flip(i) { -x } else { *x }).sum()
}

/// How the p-values of several comparisons are corrected for their number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correction {
    None,
    /// Each p-value times the number of comparisons.
    Bonferroni,
    /// Holm's step-down: the i-th smallest times (m - i), kept non-decreasing.
    Holm,
}

/// `p` corrected for being `p.len()` comparisons (capped at 1), in the same order.
pub fn correct(p: &[f64], correction: Correction) -> Vec<f64> {
    let m = p.len() as f64;
    match correction {
        Correction::None => p.to_vec(),
        Correction::Bonferroni => p.iter().map(|x| (x * m).min(1.0)).collect(),
        Correction::Holm => {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
            let mut out = vec![0.0; p.len()];
            let mut running: f64 = 0.0;
            for (rank, &i) in order.iter().enumerate() {
                running = running.max((p[i] * (m - rank as f64)).min(1.0));
                out[i] = running;
            }
            out
        }
    }
}
