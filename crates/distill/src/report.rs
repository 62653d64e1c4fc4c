//! The evaluation report: `report.json` (every figure), `report.md` (a
//! table per question: quality, speed, cost) and `chart.svg` (quality
//! against cost and against speed, one point per model; hand-written SVG,
//! no plotting dependency).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// How often a model agrees with the teacher's answers (scored with the
/// same scorer, the teacher's answer taking the gold's place).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agreement {
    /// Cases the teacher had answered.
    pub cases: usize,
    pub field_accuracy: f64,
    pub exact: f64,
}

/// One row: a model, how it was prompted, and what it scored and cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelResult {
    pub label: String,
    pub model: String,
    /// Worked examples in the prompt (0: zero-shot).
    pub shots: usize,
    pub cases: usize,
    pub field_accuracy: f64,
    pub exact: f64,
    pub teacher_agreement: Option<Agreement>,
    pub prompt_tokens_per_case: f64,
    pub completion_tokens_per_case: f64,
    /// Single stream, on this machine.
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Generated tokens per wall-second over the whole batched run.
    pub batch_gen_tok_s: f64,
    /// Wall time of the batched run over every case.
    pub wall_secs: f64,
    pub usd_per_1k_cases: f64,
    pub usd_per_1m_gen_tokens: f64,
    pub model_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub data: String,
    pub scorer: String,
    pub cases: usize,
    /// Worked examples left out of the cases.
    pub excluded_examples: usize,
    pub price_per_hour: f64,
    pub machine: String,
    pub date_unix: f64,
    pub models: Vec<ModelResult>,
}

/// One report from several `report.json` files of the same data and
/// scorer (rows evaluated at different times, e.g. the teacher while the
/// student trains): rows in the order given.
pub fn merge(paths: &[std::path::PathBuf]) -> Result<Report> {
    let mut out: Option<Report> = None;
    for p in paths {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let r: Report = serde_json::from_str(&text).with_context(|| format!("{}: not a report.json", p.display()))?;
        match &mut out {
            None => out = Some(r),
            Some(o) => {
                if (o.data.as_str(), o.scorer.as_str(), o.cases) != (r.data.as_str(), r.scorer.as_str(), r.cases) {
                    anyhow::bail!(
                        "{}: evaluated {} cases of {} with {}, the first report {} cases of {} with {}; only reports of the same cases merge",
                        p.display(), r.cases, r.data, r.scorer, o.cases, o.data, o.scorer
                    );
                }
                o.models.extend(r.models);
                o.machine = format!("{}; {}", o.machine, r.machine);
            }
        }
    }
    out.ok_or_else(|| anyhow::anyhow!("nothing to merge"))
}

/// Writes report.json, report.md and chart.svg into `dir`.
pub fn write(r: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let put = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    };
    put("report.json", serde_json::to_string_pretty(r)? + "\n")?;
    put("report.md", markdown(r))?;
    put("chart.svg", chart(r))?;
    Ok(())
}

/// The quality / speed / cost table (Markdown), also printed by `eval`.
pub fn summary_table(r: &Report) -> String {
    let mut s = String::new();
    s += "| model and prompting | field accuracy | exact | teacher agreement (fields / exact) | prompt tokens per case | prefill tok/s | decode tok/s | $ per 1,000 cases | $ per 1M generated tokens |\n";
    s += "|---|---|---|---|---|---|---|---|---|\n";
    for m in &r.models {
        let agree = m
            .teacher_agreement
            .as_ref()
            .map_or("–".to_string(), |a| format!("{:.3} / {:.3}", a.field_accuracy, a.exact));
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.3} | {} | {:.0} | {:.1} | {:.1} | {:.4} | {:.2} |",
            m.label,
            m.field_accuracy,
            m.exact,
            agree,
            m.prompt_tokens_per_case,
            m.prefill_tok_s,
            m.decode_tok_s,
            m.usd_per_1k_cases,
            m.usd_per_1m_gen_tokens
        );
    }
    s
}

fn markdown(r: &Report) -> String {
    let mut s = String::from("# minnow distill eval\n\n");
    let _ = writeln!(
        s,
        "Data: `{}` ({} cases{}); scorer `{}`; machine: {}; price ${:.2}/hour.\n",
        r.data,
        r.cases,
        if r.excluded_examples > 0 {
            format!(", the {} worked examples left out", r.excluded_examples)
        } else {
            String::new()
        },
        r.scorer,
        r.machine,
        r.price_per_hour
    );
    s += &summary_table(r);
    s += "\n- field accuracy / exact: against the gold answers; teacher agreement: the same scorer with the teacher's answer as the gold.\n";
    s += "- prefill / decode tok/s: one stream, measured on this machine (best of two runs on one case's prompt, 32 decoded tokens).\n";
    s += "- $ per 1,000 cases and per 1M generated tokens: the machine's price times the wall time of answering every case batched (continuous batching), prompts included.\n";
    if let Some(slowest) = r.models.iter().min_by(|a, b| a.decode_tok_s.total_cmp(&b.decode_tok_s)) {
        let _ = writeln!(s, "\nDecode speed (one stream) relative to the slowest row ({}):\n", slowest.label);
        for m in &r.models {
            let _ = writeln!(s, "- {}: {:.2}×", m.label, m.decode_tok_s / slowest.decode_tok_s.max(1e-9));
        }
    }
    s += "\nChart: `chart.svg`.\n";
    s
}

/// Two panels sharing the y axis (field accuracy, 0..1): x = $ per 1,000
/// cases (log scale), and x = decode tok/s (log scale).
pub fn chart(r: &Report) -> String {
    // Room for the legend: two names per line.
    let (w, h) = (960.0, 400.0 + 16.0 * r.models.len().div_ceil(2) as f64);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let costs: Vec<f64> = r.models.iter().map(|m| m.usd_per_1k_cases).collect();
    let speeds: Vec<f64> = r.models.iter().map(|m| m.decode_tok_s).collect();
    panel(&mut s, r, 60.0, "$ per 1,000 cases (log) — left is cheaper", &costs);
    panel(&mut s, r, 540.0, "decode tok/s, one stream (log) — right is faster", &speeds);
    legend(&mut s, r, 386.0);
    s += "</svg>\n";
    s
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

fn panel(s: &mut String, r: &Report, x0: f64, title: &str, xs: &[f64]) {
    let (pw, ph, y0) = (380.0, 300.0, 50.0);
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"30\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>",
        x0 + pw / 2.0,
        esc(title)
    );
    let _ = writeln!(s, "<rect x=\"{x0}\" y=\"{y0}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>");
    for i in 0..=4 {
        let acc = i as f64 / 4.0;
        let y = y0 + ph * (1.0 - acc);
        let _ = writeln!(s, "<line x1=\"{x0}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/>", x0 + pw);
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{acc:.2}</text>", x0 - 6.0, y + 4.0);
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 {} {})\">field accuracy</text>",
        x0 - 40.0,
        y0 + ph / 2.0,
        x0 - 40.0,
        y0 + ph / 2.0
    );
    let pos: Vec<f64> = xs.iter().copied().filter(|x| *x > 0.0 && x.is_finite()).collect();
    if pos.is_empty() {
        return;
    }
    // Log axis padded by a factor of 2 each side so points sit inside.
    let lo = pos.iter().copied().fold(f64::INFINITY, f64::min).log10() - 0.3;
    let hi = pos.iter().copied().fold(f64::NEG_INFINITY, f64::max).log10() + 0.3;
    let px = |x: f64| x0 + pw * (x.log10() - lo) / (hi - lo);
    for d in (lo.floor() as i32)..=(hi.ceil() as i32) {
        let v = 10f64.powi(d);
        if v.log10() < lo || v.log10() > hi {
            continue;
        }
        let x = px(v);
        let _ = writeln!(s, "<line x1=\"{x}\" y1=\"{y0}\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/>", y0 + ph);
        let _ = writeln!(s, "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>", y0 + ph + 16.0, fmt_num(v));
    }
    for (i, (m, &x)) in r.models.iter().zip(xs).enumerate() {
        if !(x > 0.0 && x.is_finite()) {
            continue;
        }
        let (cx, cy) = (px(x), y0 + ph * (1.0 - m.field_accuracy.clamp(0.0, 1.0)));
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"6\" fill=\"{c}\"><title>{}</title></circle>",
            esc(&m.label)
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\">{} ({})</text>",
            cx + 8.0,
            cy - 8.0,
            i + 1,
            fmt_num(x)
        );
    }
}

/// Numbered model names under both panels (the points carry the numbers).
fn legend(s: &mut String, r: &Report, y: f64) {
    for (i, m) in r.models.iter().enumerate() {
        let (x, y) = (60.0 + (i % 2) as f64 * 480.0, y + (i / 2) as f64 * 16.0);
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(s, "<text x=\"{x}\" y=\"{y}\" fill=\"{c}\">{}. {}</text>", i + 1, esc(&m.label));
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2e}").replace("e-", "e−")
    }
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
