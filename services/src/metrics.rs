//! Prometheus metrics in vLLM's names with a `lacuna:` prefix (so dashboards carry over), every
//! series labelled `model_name`, rendered in the text exposition format 0.0.4.
//!
//! A small hand-written registry: the set of metrics is fixed, colon names need no escaping
//! gymnastics, and counters keep the `_total` name Prometheus shows.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use lacuna_model::generate::FinishReason;

/// vLLM's buckets for time to first token (seconds).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
/// vLLM's buckets for the gap between two output tokens (seconds).
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's buckets for a request's end-to-end latency (seconds).
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];

pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Default)]
struct HistogramState {
    /// Per bucket (not cumulative); the last entry is +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, state: Mutex::new(HistogramState { counts: vec![0; bounds.len() + 1], sum: 0.0 }) }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.counts[i] += 1;
        s.sum += v;
    }

    pub fn count(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).counts.iter().sum()
    }
}

/// The service's metrics; one instance per server, shared by handlers and the scheduler.
pub struct Metrics {
    model_label: String,
    pub requests_running: AtomicI64,
    pub requests_waiting: AtomicI64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    success_stop: AtomicU64,
    success_length: AtomicU64,
}

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        Self {
            model_label: escape_label(model_name),
            requests_running: AtomicI64::new(0),
            requests_waiting: AtomicI64::new(0),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            e2e_request_latency: Histogram::new(E2E_BUCKETS),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            success_stop: AtomicU64::new(0),
            success_length: AtomicU64::new(0),
        }
    }

    pub fn request_succeeded(&self, reason: FinishReason) {
        match reason {
            FinishReason::Stop => &self.success_stop,
            FinishReason::Length => &self.success_length,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text (`text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        let m = &self.model_label;
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{m}\"}} {v}");
        };
        gauge(&mut out, "lacuna:num_requests_running", "Requests in the decode batch.", self.running());
        gauge(&mut out, "lacuna:num_requests_waiting", "Requests waiting for a batch slot.", self.waiting());
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{model_name=\"{m}\"}} {v}");
        };
        counter(
            &mut out,
            "lacuna:prompt_tokens_total",
            "Prompt tokens prefilled.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "lacuna:generation_tokens_total",
            "Tokens generated.",
            self.generation_tokens.load(Ordering::Relaxed),
        );
        let name = "lacuna:request_success_total";
        let _ = writeln!(out, "# HELP {name} Requests finished, by finish reason.\n# TYPE {name} counter");
        for (reason, c) in [("stop", &self.success_stop), ("length", &self.success_length)] {
            let _ = writeln!(
                out,
                "{name}{{finished_reason=\"{reason}\",model_name=\"{m}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        self.render_histogram(
            &mut out,
            "lacuna:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            &self.time_to_first_token,
        );
        self.render_histogram(
            &mut out,
            "lacuna:inter_token_latency_seconds",
            "Time between two generated tokens of a sequence.",
            &self.inter_token_latency,
        );
        self.render_histogram(
            &mut out,
            "lacuna:e2e_request_latency_seconds",
            "Time from arrival to the last token of a request.",
            &self.e2e_request_latency,
        );
        out
    }

    pub fn running(&self) -> i64 {
        self.requests_running.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> i64 {
        self.requests_waiting.load(Ordering::Relaxed)
    }

    fn render_histogram(&self, out: &mut String, name: &str, help: &str, h: &Histogram) {
        let m = &self.model_label;
        let (counts, sum) = {
            let s = h.state.lock().unwrap_or_else(|p| p.into_inner());
            (s.counts.clone(), s.sum)
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0u64;
        for (i, c) in counts.iter().enumerate() {
            cum += c;
            let le = h.bounds.get(i).map_or_else(|| "+Inf".to_owned(), |b| format!("{b:?}"));
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\",model_name=\"{m}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_sum{{model_name=\"{m}\"}} {sum:?}");
        let _ = writeln!(out, "{name}_count{{model_name=\"{m}\"}} {cum}");
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_names_labels_and_cumulative_buckets() {
        let m = Metrics::new("smol\"lm");
        m.time_to_first_token.observe(0.003);
        m.time_to_first_token.observe(0.5);
        m.time_to_first_token.observe(1e6);
        m.request_succeeded(FinishReason::Length);
        m.prompt_tokens.fetch_add(7, Ordering::Relaxed);
        let text = m.render();
        let line = |prefix: &str| {
            text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}")).to_owned()
        };
        assert_eq!(line("lacuna:prompt_tokens_total{"), "lacuna:prompt_tokens_total{model_name=\"smol\\\"lm\"} 7");
        assert!(line("lacuna:request_success_total{finished_reason=\"length\"").ends_with(" 1"));
        assert!(line("lacuna:time_to_first_token_seconds_bucket{le=\"0.001\"").ends_with(" 0"));
        assert!(line("lacuna:time_to_first_token_seconds_bucket{le=\"0.005\"").ends_with(" 1"));
        assert!(line("lacuna:time_to_first_token_seconds_bucket{le=\"2560.0\"").ends_with(" 2"));
        assert!(line("lacuna:time_to_first_token_seconds_bucket{le=\"+Inf\"").ends_with(" 3"));
        assert!(line("lacuna:time_to_first_token_seconds_count").ends_with(" 3"));
        assert_eq!(m.time_to_first_token.count(), 3);
    }
}
