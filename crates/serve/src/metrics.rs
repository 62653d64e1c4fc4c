//! `GET /metrics`: Prometheus text exposition (format 0.0.4).
//!
//! Request counts and latency histograms are kept here, on the HTTP side;
//! token totals, queue depth, batch sizes and busy time come from the
//! scheduler's [`SchedulerStats`] at scrape time.
//!
//! Cost: `minnow_estimated_cost_usd_total` is `--price-per-hour` × the time
//! the scheduler spent computing (`busy_secs`) / 3600 — the machine's price
//! charged only for the time it worked, so it is the marginal cost of the
//! tokens served, not the idle rent. Dividing by the tokens processed gives
//! `minnow_cost_per_million_tokens_usd{tokens="completion"|"all"}`.
//!
//! Speculative decoding, when the server runs with `--draft`/`--lookup`:
//! `minnow_spec_*` — acceptance rate, tokens per target forward pass and the
//! estimated speed-up over plain decoding (see the engine's
//! `scheduler::speculate` for when the scheduler speculates).
//!
//! Per-token latency: each finished request contributes its mean time
//! between output tokens, `(total - time to first token) / (tokens per
//! choice - 1)`, once for each of those gaps, so the histogram is over
//! tokens rather than requests (a long answer weighs more than a short one).

use minnow_engine::scheduler::{SchedulerStats, SpecTotals, Usage};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Time to first token, seconds: from tens of milliseconds (short prompt,
/// idle server) to a minute (long prompt behind a full queue).
const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Seconds between output tokens: a small model alone decodes in a few
/// milliseconds per token, a large batch on two cores in hundreds.
const TOKEN_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Whole-request latency, seconds.
const REQUEST_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    /// Records `times` observations of `v`.
    pub fn observe_n(&mut self, v: f64, times: u64) {
        if !v.is_finite() || times == 0 {
            return;
        }
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.counts[i] += times;
        self.sum += v * times as f64;
        self.count += times;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        write_header(out, name, "histogram", help);
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}", num(self.sum));
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// A sample value: Prometheus takes Go float syntax; Rust's `Display` of a
/// finite f64 is a valid one (no exponent surprises like `1e-7` are invalid
/// either), and the non-finite ones are spelled out.
fn num(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_string()
    } else if x == f64::INFINITY {
        "+Inf".to_string()
    } else if x == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        format!("{x}")
    }
}

struct Hists {
    ttft: Histogram,
    per_token: Histogram,
    request: Histogram,
}

pub struct Metrics {
    /// (endpoint, status) → count.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Per model the requests answered: the base id or an adapter's name →
    /// (generations, completion tokens). Names come only from the server's
    /// own list, so the label set is bounded.
    per_model: Mutex<BTreeMap<String, (u64, u64)>>,
    hists: Mutex<Hists>,
    /// HTTP requests being handled (including streams being sent).
    pub in_flight: AtomicI64,
    /// Open HTTP connections.
    pub connections_open: AtomicI64,
    /// Connections closed at once because `--max-connections` were open.
    pub connections_refused: AtomicU64,
    /// Connections closed by the header, idle or stalled-reader timeouts.
    pub connections_timed_out: AtomicU64,
    /// Completions recorded in the store (`--store`).
    pub store_written: AtomicU64,
    /// Answers that should have been stored but were not (store full, I/O error).
    pub store_failed: AtomicU64,
}

/// The label for a path: the known routes, or "other" so that clients
/// probing random paths cannot grow the label set without bound.
pub fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/metrics" => "/metrics",
        "/health" => "/health",
        "/tokenize" => "/tokenize",
        "/detokenize" => "/detokenize",
        "/" => "/",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            per_model: Mutex::new(BTreeMap::new()),
            hists: Mutex::new(Hists {
                ttft: Histogram::new(TTFT_BUCKETS),
                per_token: Histogram::new(TOKEN_BUCKETS),
                request: Histogram::new(REQUEST_BUCKETS),
            }),
            in_flight: AtomicI64::new(0),
            connections_open: AtomicI64::new(0),
            connections_refused: AtomicU64::new(0),
            connections_timed_out: AtomicU64::new(0),
            store_written: AtomicU64::new(0),
            store_failed: AtomicU64::new(0),
        }
    }

    pub fn count_request(&self, endpoint: &'static str, status: u16) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry((endpoint, status)).or_default() += 1;
    }

    /// A generation of `model` (the base id or an adapter) finished: its
    /// timings go into the histograms, it and its tokens into the model's counts.
    pub fn observe_generation(&self, model: &str, usage: &Usage, ttft_secs: f64, total_secs: f64, n: usize) {
        {
            let mut m = self.per_model.lock().unwrap_or_else(|e| e.into_inner());
            let e = m.entry(model.to_string()).or_default();
            e.0 += 1;
            e.1 += usage.completion_tokens as u64;
        }
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        h.ttft.observe_n(ttft_secs, 1);
        h.request.observe_n(total_secs, 1);
        let per_choice = usage.completion_tokens / n.max(1);
        if per_choice >= 2 {
            let gaps = (per_choice - 1) as u64;
            let mean = (total_secs - ttft_secs).max(0.0) / gaps as f64;
            h.per_token.observe_n(mean, gaps * n.max(1) as u64);
        }
    }

    /// The exposition text.
    pub fn render(&self, s: &SchedulerStats, price_per_hour: f64) -> String {
        let mut out = String::with_capacity(4096);
        let mean_batch = if s.steps_total > 0 { s.batch_size_sum as f64 / s.steps_total as f64 } else { 0.0 };
        let cost = price_per_hour * s.busy_secs / 3600.0;
        let in_flight = self.in_flight.load(Ordering::Relaxed) as f64;
        // (name, type, help, value); one line each, as the exposition reads.
        #[rustfmt::skip]
        let scheduler: [(&str, &str, &str, f64); 22] = [
            ("minnow_prompt_tokens_total", "counter", "Prompt tokens of finished and running requests (cached ones included).", s.prompt_tokens_total as f64),
            ("minnow_cached_prompt_tokens_total", "counter", "Prompt tokens reused from the prefix cache instead of computed.", s.cached_prompt_tokens_total as f64),
            ("minnow_completion_tokens_total", "counter", "Tokens generated.", s.completion_tokens_total as f64),
            ("minnow_scheduler_requests_total", "counter", "Requests the scheduler accepted.", s.requests_total as f64),
            ("minnow_queue_depth", "gauge", "Requests waiting for a slot.", s.queue_depth as f64),
            ("minnow_active_requests", "gauge", "Requests being computed (prefill or decode).", s.active as f64),
            ("minnow_batch_size", "gauge", "Sequences in the last batched forward step.", s.last_batch_size as f64),
            ("minnow_batch_size_mean", "gauge", "Mean sequences per forward step since start.", mean_batch),
            ("minnow_steps_total", "counter", "Batched forward steps.", s.steps_total as f64),
            ("minnow_busy_seconds_total", "counter", "Seconds the scheduler spent computing.", s.busy_secs),
            ("minnow_prefix_cache_bytes", "gauge", "Bytes of KV held by the prefix cache.", s.prefix_cache_bytes as f64),
            ("minnow_prefix_cache_entries", "gauge", "Sequences held by the prefix cache.", s.prefix_cache_entries as f64),
            ("minnow_http_in_flight", "gauge", "HTTP requests being handled, streams included.", in_flight),
            ("minnow_http_connections_open", "gauge", "Open HTTP connections.", self.connections_open.load(Ordering::Relaxed) as f64),
            ("minnow_http_connections_refused_total", "counter", "Connections closed on arrival because --max-connections were open.", self.connections_refused.load(Ordering::Relaxed) as f64),
            ("minnow_http_connections_timed_out_total", "counter", "Connections closed by the header, idle or stalled-reader timeout.", self.connections_timed_out.load(Ordering::Relaxed) as f64),
            ("minnow_store_written_total", "counter", "Completions recorded in the store (--store).", self.store_written.load(Ordering::Relaxed) as f64),
            ("minnow_store_failed_total", "counter", "Answers that should have been stored but were not (store full or I/O error; see the log).", self.store_failed.load(Ordering::Relaxed) as f64),
            ("minnow_price_per_hour_usd", "gauge", "The machine price given with --price-per-hour.", price_per_hour),
            ("minnow_constrained_requests_total", "counter", "Requests with structured output (response_format, structured_outputs).", s.constrained_requests_total as f64),
            ("minnow_forced_tokens_total", "counter", "Tokens a constraint forced, taken without sampling (jump-forward).", s.forced_tokens_total as f64),
            ("minnow_mask_seconds_total", "counter", "Seconds spent computing constraint token masks and forced tokens.", s.mask_secs),
        ];
        write_metrics(&mut out, &scheduler);
        write_metrics(
            &mut out,
            &[("minnow_estimated_cost_usd_total", "counter", "price_per_hour x busy seconds / 3600.", cost)],
        );
        let per_million = |tokens: u64| if tokens > 0 { cost / tokens as f64 * 1e6 } else { 0.0 };
        let processed = s.prompt_tokens_total.saturating_sub(s.cached_prompt_tokens_total) + s.completion_tokens_total;
        write_header(
            &mut out,
            "minnow_cost_per_million_tokens_usd",
            "gauge",
            "Estimated cost per million tokens: generated ones, or all processed (prompt + generated).",
        );
        let completion = num(per_million(s.completion_tokens_total));
        let _ = writeln!(out, "minnow_cost_per_million_tokens_usd{{tokens=\"completion\"}} {completion}");
        let _ = writeln!(out, "minnow_cost_per_million_tokens_usd{{tokens=\"all\"}} {}", num(per_million(processed)));

        if let Some(sp) = &s.speculation {
            write_speculation(&mut out, sp);
        }
        write_header(
            &mut out,
            "minnow_requests_total",
            "counter",
            "HTTP requests by endpoint and status (499: client left before the response).",
        );
        for ((ep, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "minnow_requests_total{{endpoint=\"{ep}\",status=\"{status}\"}} {n}");
        }
        let per_model = self.per_model.lock().unwrap_or_else(|e| e.into_inner());
        write_header(
            &mut out,
            "minnow_model_requests_total",
            "counter",
            "Generations answered, by model (the base id or a LoRA adapter's name).",
        );
        for (m, (n, _)) in per_model.iter() {
            let _ = writeln!(out, "minnow_model_requests_total{{model=\"{m}\"}} {n}");
        }
        write_header(
            &mut out,
            "minnow_model_completion_tokens_total",
            "counter",
            "Tokens generated, by model (the base id or a LoRA adapter's name).",
        );
        for (m, (_, t)) in per_model.iter() {
            let _ = writeln!(out, "minnow_model_completion_tokens_total{{model=\"{m}\"}} {t}");
        }
        drop(per_model);
        let h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        h.ttft.write(&mut out, "minnow_time_to_first_token_seconds", "Time from arrival to the first generated token.");
        h.per_token.write(
            &mut out,
            "minnow_time_per_output_token_seconds",
            "Time between generated tokens (per token).",
        );
        h.request.write(&mut out, "minnow_request_duration_seconds", "Time from arrival to the last generated token.");
        out
    }
}

/// The `# HELP` and `# TYPE` lines of a metric.
fn write_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Unlabelled metrics, each given as (name, type, help, value).
fn write_metrics(out: &mut String, metrics: &[(&str, &str, &str, f64)]) {
    for &(name, kind, help, value) in metrics {
        write_header(out, name, kind, help);
        let _ = writeln!(out, "{name} {}", num(value));
    }
}

/// Speculative decoding (`--draft`/`--lookup`): only present when configured.
fn write_speculation(out: &mut String, sp: &SpecTotals) {
    #[rustfmt::skip]
    let metrics = [
        ("minnow_spec_rounds_total", "counter", "Speculative rounds (one target pass each) while a single sequence decoded.", sp.steps as f64),
        ("minnow_spec_drafted_tokens_total", "counter", "Draft tokens proposed.", sp.drafted as f64),
        ("minnow_spec_accepted_tokens_total", "counter", "Draft tokens accepted by the target.", sp.accepted as f64),
        ("minnow_spec_memory_drafted_tokens_total", "counter", "Of the drafted tokens (--lookup): those from earlier answers to similar prompts.", sp.memory_drafted as f64),
        ("minnow_spec_memory_accepted_tokens_total", "counter", "Of the accepted tokens: those from earlier answers.", sp.memory_accepted as f64),
        ("minnow_spec_acceptance_rate", "gauge", "Accepted / drafted tokens since start.", sp.acceptance_rate()),
        ("minnow_spec_tokens_total", "counter", "Tokens generated in speculative rounds.", sp.tokens as f64),
        ("minnow_spec_target_forwards_total", "counter", "Target forward passes in speculative rounds.", sp.target_forwards as f64),
        ("minnow_spec_tokens_per_target_forward", "gauge", "Tokens per target forward pass while speculating (plain decoding: 1).", sp.tokens_per_target_forward()),
        ("minnow_spec_speedup", "gauge", "Estimated speed-up of speculation over plain single-sequence decoding (measured plain step time x tokens / time taken; 0 until measured).", sp.speedup()),
    ];
    write_metrics(out, &metrics);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        h.observe_n(0.5, 1);
        h.observe_n(1.5, 2);
        h.observe_n(9.0, 1);
        h.observe_n(f64::NAN, 1);
        let mut s = String::new();
        h.write(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"1\"} 1\n"));
        assert!(s.contains("x_bucket{le=\"2\"} 3\n"));
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"));
        assert!(s.contains("x_sum 12.5\n"));
        assert!(s.contains("x_count 4\n"));
    }
}
