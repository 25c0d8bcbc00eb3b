//! A small metrics registry: counters, gauges and fixed-bucket histograms on atomics,
//! updated by the engine without locks and rendered in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Histogram with fixed upper bounds (seconds), Prometheus-style cumulative on render.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in microseconds (atomics hold integers).
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_us: AtomicU64::new(0), count: AtomicU64::new(0) }
    }

    pub fn observe(&self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

const LATENCY_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const ITL_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28];

/// How a request ended, for the outcome counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Stop,
    Length,
    Cancelled,
    Timeout,
    Rejected,
    Error,
}

impl Outcome {
    const ALL: [Outcome; 6] = [Outcome::Stop, Outcome::Length, Outcome::Cancelled, Outcome::Timeout, Outcome::Rejected, Outcome::Error];
    fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Cancelled => "cancelled",
            Outcome::Timeout => "timeout",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        }
    }
}

/// Everything the engine measures. Shared (`Arc`) between the engine and readers.
pub struct Metrics {
    outcomes: [AtomicU64; 6],
    pub queue_depth: AtomicI64,
    pub active_sequences: AtomicI64,
    pub kv_tokens: AtomicI64,
    pub kv_capacity: AtomicI64,
    pub prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Busy time of the engine (decoding), microseconds: tokens/s = tokens / busy time.
    pub busy_us: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub queue_wait: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            outcomes: Default::default(),
            queue_depth: AtomicI64::new(0),
            active_sequences: AtomicI64::new(0),
            kv_tokens: AtomicI64::new(0),
            kv_capacity: AtomicI64::new(0),
            prompt_tokens: AtomicU64::new(0),
            cached_prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            busy_us: AtomicU64::new(0),
            time_to_first_token: Histogram::new(LATENCY_BOUNDS),
            inter_token_latency: Histogram::new(ITL_BOUNDS),
            queue_wait: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

impl Metrics {
    pub fn count(&self, o: Outcome) {
        self.outcomes[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn outcome(&self, o: Outcome) -> u64 {
        self.outcomes[o as usize].load(Ordering::Relaxed)
    }

    /// The registry in Prometheus' text exposition format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP llama_requests_total Requests by outcome.\n# TYPE llama_requests_total counter");
        for o in Outcome::ALL {
            let _ = writeln!(out, "llama_requests_total{{outcome=\"{}\"}} {}", o.label(), self.outcome(o));
        }
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        gauge(&mut out, "llama_queue_depth", "Requests waiting for a slot.", self.queue_depth.load(Ordering::Relaxed));
        gauge(&mut out, "llama_active_sequences", "Requests holding a slot.", self.active_sequences.load(Ordering::Relaxed));
        gauge(&mut out, "llama_kv_tokens", "Tokens held in the KV cache.", self.kv_tokens.load(Ordering::Relaxed));
        gauge(&mut out, "llama_kv_capacity_tokens", "KV cache capacity in tokens.", self.kv_capacity.load(Ordering::Relaxed));
        counter(&mut out, "llama_prompt_tokens_total", "Prompt tokens received.", self.prompt_tokens.load(Ordering::Relaxed));
        counter(&mut out, "llama_prompt_tokens_cached_total", "Prompt tokens served from the KV cache.", self.cached_prompt_tokens.load(Ordering::Relaxed));
        counter(&mut out, "llama_generated_tokens_total", "Tokens generated.", self.generated_tokens.load(Ordering::Relaxed));
        counter(&mut out, "llama_decode_steps_total", "Batched decode steps.", self.decode_steps.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP llama_busy_seconds_total Time spent decoding.\n# TYPE llama_busy_seconds_total counter\nllama_busy_seconds_total {}",
            self.busy_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        self.time_to_first_token.render(&mut out, "llama_time_to_first_token_seconds", "Time from submission to the first token.");
        self.inter_token_latency.render(&mut out, "llama_inter_token_latency_seconds", "Time between tokens of one request.");
        self.queue_wait.render(&mut out, "llama_queue_wait_seconds", "Time a request waited for a slot.");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_in_prometheus_text() {
        let m = Metrics::default();
        m.time_to_first_token.observe(0.003);
        m.time_to_first_token.observe(0.2);
        m.time_to_first_token.observe(100.0);
        m.count(Outcome::Stop);
        let text = m.render_prometheus();
        assert!(text.contains("llama_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("llama_time_to_first_token_seconds_bucket{le=\"0.25\"} 2"));
        assert!(text.contains("llama_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("llama_time_to_first_token_seconds_count 3"));
        assert!(text.contains("llama_requests_total{outcome=\"stop\"} 1"));
    }
}
