//! The demo's results: a table on the terminal and in `results.md`, the numbers in `results.json`,
//! and a bar chart in `results.svg`.

use serde::Serialize;
use std::fmt::Write;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct SystemResult {
    pub system: String,
    /// How it was made, in a few words.
    pub what: String,
    pub ndcg_10: f64,
    pub mrr_10: f64,
    /// Wall-clock seconds it took to make (labelling or training), 0 for BM25.
    pub seconds: f64,
    /// Each test query's nDCG@10 (query id, value), for the significance tests.
    #[serde(skip)]
    pub per_query: Vec<(String, f64)>,
    /// Where nDCG@10 differs significantly from another row's: `+NAME` above, `-NAME` below.
    pub significance: Vec<String>,
    /// The p-value of each comparison made (other row's name, p), whether significant or not.
    pub p_values: Vec<(String, f64)>,
}

/// The level at which a difference is marked.
pub const ALPHA: f64 = 0.05;

/// Marks each row whose nDCG@10 differs from the first row's (the first stage) or from row
/// `reference`'s (the BCE student) by a paired two-sided t-test over the queries both have, p < 0.05.
pub fn mark_significance(rows: &mut [SystemResult], reference: Option<usize>) {
    let bases: Vec<usize> = std::iter::once(0).chain(reference).collect();
    for i in 0..rows.len() {
        for &b in &bases {
            if i == b || (b != 0 && i == 0) {
                continue;
            }
            let (a, x) = distill_eval::significance::on_common_queries(per_query(&rows[b]), per_query(&rows[i]));
            if a.len() < 2 {
                continue;
            }
            let p = distill_eval::significance::paired_t(&a, &x).1;
            let name = short_name(&rows[b].system).to_string();
            if p < ALPHA {
                let above = x.iter().sum::<f64>() > a.iter().sum::<f64>();
                rows[i].significance.push(format!("{}{name}", if above { '+' } else { '-' }));
            }
            rows[i].p_values.push((name, p));
        }
    }
}

/// A row's (query, nDCG@10) pairs.
fn per_query(row: &SystemResult) -> impl Iterator<Item = (&str, f64)> {
    row.per_query.iter().map(|(q, v)| (q.as_str(), *v))
}

/// "student bce" -> "bce".
fn short_name(system: &str) -> &str {
    system.strip_prefix("student ").unwrap_or(system)
}

pub fn table(rows: &[SystemResult]) -> String {
    let width = rows.iter().map(|r| r.system.len()).max().unwrap_or(6).max(6);
    let mut s = format!("| {:<width$} | nDCG@10 | MRR@10 | sig. | made in | what |\n", "system");
    let _ = writeln!(s, "|{}|--------:|-------:|------|--------:|------|", "-".repeat(width + 2));
    for r in rows {
        let made = if r.seconds > 0.0 { format!("{:.0} s", r.seconds) } else { "-".into() };
        let sig = r.significance.join(" ");
        let _ = writeln!(
            s,
            "| {:<width$} | {:.4} | {:.4} | {sig} | {made:>7} | {} |",
            r.system, r.ndcg_10, r.mrr_10, r.what
        );
    }
    let _ = writeln!(
        s,
        "\nsig.: +X / -X: nDCG@10 significantly above / below row X (paired t-test over the test queries, p < {ALPHA})"
    );
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Horizontal bars, two per system (nDCG@10, MRR@10), on a 0..1 axis with a dashed line at BM25's
/// nDCG@10 (the first row).
pub fn svg(rows: &[SystemResult], title: &str) -> String {
    let (left, bar_w, bar_h, gap, top) = (190.0, 520.0, 14.0, 12.0, 50.0);
    let group = 2.0 * bar_h + gap;
    let height = top + group * rows.len() as f64 + 50.0;
    let width = left + bar_w + 80.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        escape(title)
    );
    let axis_y = top + group * rows.len() as f64;
    for i in 0..=10 {
        let x = left + bar_w * i as f64 / 10.0;
        let _ = writeln!(s, "<line x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{axis_y}\" stroke=\"#ddd\"/>");
        let _ =
            writeln!(s, "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{:.1}</text>", axis_y + 16.0, i as f64 / 10.0);
    }
    for (i, r) in rows.iter().enumerate() {
        let y = top + group * i as f64;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 8.0,
            y + bar_h + 4.0,
            escape(&r.system)
        );
        for (k, (v, color)) in [(r.ndcg_10, "#3b6ea8"), (r.mrr_10, "#e08a2c")].into_iter().enumerate() {
            let by = y + k as f64 * bar_h;
            let w = bar_w * v.clamp(0.0, 1.0);
            let _ = writeln!(
                s,
                "<rect x=\"{left}\" y=\"{by}\" width=\"{w:.1}\" height=\"{}\" fill=\"{color}\"/>",
                bar_h - 2.0
            );
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\">{v:.4}</text>", left + w + 4.0, by + bar_h - 4.0);
        }
    }
    if let Some(base) = rows.first() {
        let x = left + bar_w * base.ndcg_10.clamp(0.0, 1.0);
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{axis_y}\" stroke=\"#333\" stroke-dasharray=\"4 3\"/>",
            top - 6.0
        );
    }
    let ly = axis_y + 34.0;
    let _ = writeln!(s, "<rect x=\"{left}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"#3b6ea8\"/>", ly - 10.0);
    let _ = writeln!(s, "<text x=\"{}\" y=\"{ly}\">nDCG@10</text>", left + 16.0);
    let _ =
        writeln!(s, "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"#e08a2c\"/>", left + 90.0, ly - 10.0);
    let _ = writeln!(s, "<text x=\"{}\" y=\"{ly}\">MRR@10</text>", left + 106.0);
    let _ = writeln!(s, "<text x=\"{}\" y=\"{ly}\">dashed: first row's nDCG@10</text>", left + 180.0);
    s.push_str("</svg>\n");
    s
}

pub fn write(dir: &Path, rows: &[SystemResult], title: &str, settings: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(dir.join("results.md"), format!("# {title}\n\n{}", table(rows)))?;
    let json = serde_json::json!({ "title": title, "settings": settings, "systems": rows });
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&json)?)?;
    std::fs::write(dir.join("results.svg"), svg(rows, title))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<SystemResult> {
        vec![row("BM25", "first stage", 0.5, 0.45, 0.0), row("a <b>", "x", 0.75, 1.2, 61.4)]
    }

    fn row(system: &str, what: &str, ndcg_10: f64, mrr_10: f64, seconds: f64) -> SystemResult {
        let (system, what) = (system.into(), what.into());
        SystemResult {
            system,
            what,
            ndcg_10,
            mrr_10,
            seconds,
            per_query: vec![],
            significance: vec![],
            p_values: vec![],
        }
    }

    #[test]
    fn table_has_a_row_per_system() {
        let t = table(&rows());
        assert_eq!(t.lines().count(), 6);
        assert!(t.contains("| BM25   | 0.5000 | 0.4500 |  |       - | first stage |"), "{t}");
        assert!(t.contains("0.7500 | 1.2000 |  |    61 s |"), "{t}");
    }

    /// Marks as the paired t-test has them: a student far above the first stage and one level with
    /// the BCE student.
    #[test]
    fn rows_are_marked_where_they_differ_significantly() {
        let q = |vals: &[f64]| vals.iter().enumerate().map(|(i, v)| (format!("q{i}"), *v)).collect::<Vec<_>>();
        let mut rows = vec![row("BM25", "", 0.2, 0.0, 0.0), row("student bce", "", 0.6, 0.0, 1.0)];
        rows.push(row("student infonce", "", 0.61, 0.0, 1.0));
        rows[0].per_query = q(&[0.1, 0.2, 0.3, 0.2, 0.1, 0.3]);
        rows[1].per_query = q(&[0.6, 0.7, 0.5, 0.6, 0.55, 0.65]);
        rows[2].per_query = q(&[0.62, 0.68, 0.52, 0.61, 0.54, 0.66]);
        mark_significance(&mut rows, Some(1));
        assert_eq!(rows[0].significance, Vec::<String>::new());
        assert_eq!(rows[1].significance, vec!["+BM25"]);
        assert_eq!(rows[2].significance, vec!["+BM25"], "level with bce: {:?}", rows[2].p_values);
        assert_eq!(rows[2].p_values.len(), 2);
        assert!(table(&rows).contains("| +BM25 |"));
    }

    #[test]
    fn svg_bars_scale_with_the_values_and_escape_names() {
        let s = svg(&rows(), "t");
        // 0.5 and 0.75 of the 520-pixel axis; 1.2 is clamped to the axis.
        assert!(s.contains("width=\"260.0\""), "{s}");
        assert!(s.contains("width=\"390.0\""), "{s}");
        assert!(s.contains("width=\"520.0\""), "{s}");
        assert!(s.contains("a &lt;b&gt;"));
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }
}
