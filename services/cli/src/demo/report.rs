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
}

pub fn table(rows: &[SystemResult]) -> String {
    let width = rows.iter().map(|r| r.system.len()).max().unwrap_or(6).max(6);
    let mut s = format!("| {:<width$} | nDCG@10 | MRR@10 | made in | what |\n", "system");
    let _ = writeln!(s, "|{}|--------:|-------:|--------:|------|", "-".repeat(width + 2));
    for r in rows {
        let made = if r.seconds > 0.0 { format!("{:.0} s", r.seconds) } else { "-".into() };
        let _ = writeln!(s, "| {:<width$} | {:.4} | {:.4} | {made:>7} | {} |", r.system, r.ndcg_10, r.mrr_10, r.what);
    }
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
        vec![
            SystemResult {
                system: "BM25".into(),
                what: "first stage".into(),
                ndcg_10: 0.5,
                mrr_10: 0.45,
                seconds: 0.0,
            },
            SystemResult { system: "a <b>".into(), what: "x".into(), ndcg_10: 0.75, mrr_10: 1.2, seconds: 61.4 },
        ]
    }

    #[test]
    fn table_has_a_row_per_system() {
        let t = table(&rows());
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("| BM25   | 0.5000 | 0.4500 |       - | first stage |"), "{t}");
        assert!(t.contains("0.7500 | 1.2000 |    61 s |"), "{t}");
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
