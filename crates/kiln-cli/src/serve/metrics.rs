//! Counters and histograms of the server, written in the Prometheus text format (`GET /metrics`).
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A histogram with fixed upper bounds (`le`), cumulative in the output.
pub struct Histogram {
    bounds: Vec<f64>,
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            g.0[i] += 1;
        }
        g.1 += v;
        g.2 += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&g.0) {
            acc += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.2);
        let _ = writeln!(out, "{name}_sum {}", g.1);
        let _ = writeln!(out, "{name}_count {}", g.2);
    }
}

/// Everything `/metrics` reports.
pub struct Metrics {
    /// Requests answered, by endpoint and status code.
    pub requests: Mutex<std::collections::BTreeMap<(String, u16), u64>>,
    pub tokens_in: AtomicU64,
    pub tokens_out: AtomicU64,
    /// Sequences waiting to be admitted.
    pub queue: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    pub batch_size: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
}

const SECONDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(Default::default()),
            tokens_in: AtomicU64::new(0),
            tokens_out: AtomicU64::new(0),
            queue: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            batch_size: Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            ttft: Histogram::new(&SECONDS),
            itl: Histogram::new(&SECONDS),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut g = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *g.entry((endpoint.to_string(), status)).or_insert(0) += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP kiln_requests_total HTTP requests answered, by endpoint and status.\n\
             # TYPE kiln_requests_total counter"
        );
        for ((ep, code), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kiln_requests_total{{endpoint=\"{ep}\",status=\"{code}\"}} {n}"
            );
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "kiln_prompt_tokens_total",
            "Prompt tokens of admitted requests.",
            self.tokens_in.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_generation_tokens_total",
            "Tokens generated.",
            self.tokens_out.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "kiln_queue_length",
            "Sequences waiting to join the batch.",
            self.queue.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "kiln_running_sequences",
            "Sequences in the running batch.",
            self.running.load(Ordering::Relaxed),
        );
        self.batch_size.write(
            &mut out,
            "kiln_batch_size",
            "Sequences per batched decode step.",
        );
        self.ttft.write(
            &mut out,
            "kiln_time_to_first_token_seconds",
            "From a sequence's arrival to its first token.",
        );
        self.itl.write(
            &mut out,
            "kiln_inter_token_latency_seconds",
            "Between two tokens of a sequence.",
        );
        out
    }
}
