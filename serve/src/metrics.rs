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
    pub(crate) fn new(bounds: &'static [f64]) -> Self {
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

    /// One histogram family, a series per model.
    pub(crate) fn render_models(out: &mut String, name: &str, help: &str, models: &[(&str, &Histogram)]) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (model, h) in models {
            let model = escape(model);
            let mut cumulative = 0;
            for (b, c) in h.bounds.iter().zip(&h.counts) {
                cumulative += c.load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"{b}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {}", h.count());
            let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", h.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
            let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {}", h.count());
        }
    }
}

/// A label value as Prometheus' text format needs it (model names come from file names).
pub(crate) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Seconds a model load may take, for `llama_model_load_seconds`.
pub(crate) const LOAD_BOUNDS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
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
    /// An embedding request answered.
    Embedded,
}

impl Outcome {
    const ALL: [Outcome; 7] = [Outcome::Stop, Outcome::Length, Outcome::Cancelled, Outcome::Timeout, Outcome::Rejected, Outcome::Error, Outcome::Embedded];
    fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Cancelled => "cancelled",
            Outcome::Timeout => "timeout",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
            Outcome::Embedded => "embedded",
        }
    }
}

/// Everything the engine measures. Shared (`Arc`) between the engine and readers.
pub struct Metrics {
    outcomes: [AtomicU64; 7],
    pub queue_depth: AtomicI64,
    pub active_sequences: AtomicI64,
    pub kv_tokens: AtomicI64,
    pub kv_capacity: AtomicI64,
    pub prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Inputs embedded (each input of an embedding request).
    pub embedded_inputs: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Speculative decoding: drafted tokens verified, and of those accepted.
    pub spec_draft_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
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
            embedded_inputs: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            spec_draft_tokens: AtomicU64::new(0),
            spec_accepted_tokens: AtomicU64::new(0),
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

    /// The metrics of several models in Prometheus' text exposition format: each family's
    /// HELP and TYPE once, a series per model with its `model` label.
    pub fn render_models(models: &[(&str, &Metrics)]) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP llama_requests_total Requests by outcome.\n# TYPE llama_requests_total counter");
        for (model, m) in models {
            for o in Outcome::ALL {
                let _ = writeln!(out, "llama_requests_total{{model=\"{}\",outcome=\"{}\"}} {}", escape(model), o.label(), m.outcome(o));
            }
        }
        type Read = fn(&Metrics) -> f64;
        let families: [(&str, &str, &str, Read); 13] = [
            ("llama_queue_depth", "gauge", "Requests waiting for a slot.", |m| m.queue_depth.load(Ordering::Relaxed) as f64),
            ("llama_active_sequences", "gauge", "Requests holding a slot.", |m| m.active_sequences.load(Ordering::Relaxed) as f64),
            ("llama_kv_tokens", "gauge", "Tokens held in the KV cache.", |m| m.kv_tokens.load(Ordering::Relaxed) as f64),
            ("llama_kv_capacity_tokens", "gauge", "KV cache capacity in tokens.", |m| m.kv_capacity.load(Ordering::Relaxed) as f64),
            ("llama_prompt_tokens_total", "counter", "Prompt tokens received (embedding inputs included).", |m| m.prompt_tokens.load(Ordering::Relaxed) as f64),
            ("llama_prompt_tokens_cached_total", "counter", "Prompt tokens served from the KV cache.", |m| m.cached_prompt_tokens.load(Ordering::Relaxed) as f64),
            ("llama_generated_tokens_total", "counter", "Tokens generated.", |m| m.generated_tokens.load(Ordering::Relaxed) as f64),
            ("llama_embedded_inputs_total", "counter", "Inputs embedded.", |m| m.embedded_inputs.load(Ordering::Relaxed) as f64),
            ("llama_decode_steps_total", "counter", "Batched decode steps (embedding batches included).", |m| m.decode_steps.load(Ordering::Relaxed) as f64),
            ("llama_spec_draft_tokens_total", "counter", "Drafted tokens verified (speculative decoding).", |m| m.spec_draft_tokens.load(Ordering::Relaxed) as f64),
            ("llama_spec_accepted_tokens_total", "counter", "Drafted tokens accepted (speculative decoding).", |m| m.spec_accepted_tokens.load(Ordering::Relaxed) as f64),
            ("llama_busy_seconds_total", "counter", "Time spent decoding.", |m| m.busy_us.load(Ordering::Relaxed) as f64 / 1e6),
            ("llama_requests_in_flight", "gauge", "Requests queued or running.", |m| (m.queue_depth.load(Ordering::Relaxed) + m.active_sequences.load(Ordering::Relaxed)) as f64),
        ];
        for (name, kind, help, read) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (model, m) in models {
                let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", escape(model), read(m));
            }
        }
        let hist = |out: &mut String, name: &str, help: &str, pick: fn(&Metrics) -> &Histogram| {
            let hs: Vec<(&str, &Histogram)> = models.iter().map(|(n, m)| (*n, pick(m))).collect();
            Histogram::render_models(out, name, help, &hs);
        };
        hist(&mut out, "llama_time_to_first_token_seconds", "Time from submission to the first token.", |m| &m.time_to_first_token);
        hist(&mut out, "llama_inter_token_latency_seconds", "Time between tokens of one request.", |m| &m.inter_token_latency);
        hist(&mut out, "llama_queue_wait_seconds", "Time a request waited for a slot.", |m| &m.queue_wait);
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
        let text = Metrics::render_models(&[("a", &m), ("b\"\n", &Metrics::default())]);
        assert!(text.contains("llama_time_to_first_token_seconds_bucket{model=\"a\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("llama_time_to_first_token_seconds_bucket{model=\"a\",le=\"0.25\"} 2"));
        assert!(text.contains("llama_time_to_first_token_seconds_bucket{model=\"a\",le=\"+Inf\"} 3"));
        assert!(text.contains("llama_time_to_first_token_seconds_count{model=\"a\"} 3"));
        assert!(text.contains("llama_requests_total{model=\"a\",outcome=\"stop\"} 1"));
        // A name with a quote and a newline stays one well-formed label.
        assert!(text.contains("llama_requests_total{model=\"b\\\"\\n\",outcome=\"stop\"} 0"), "{text}");
        assert_eq!(text.matches("# TYPE llama_kv_tokens gauge").count(), 1);
    }
}
