//! Counters for `GET /metrics` (Prometheus' text format).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the batch-size histogram's buckets (sequences per step).
const BATCH_BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// How far back the tokens/s and steps/s gauges look.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// What the server counts.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Requests waiting for a place in the batch.
    pub queue_depth: AtomicUsize,
    /// Sequences in the running batch.
    pub active: AtomicUsize,
    text_tokens: AtomicU64,
    image_steps: AtomicU64,
    steps: AtomicU64,
    batch: Mutex<Batches>,
    recent: Mutex<VecDeque<(Instant, u64, u64)>>,
}

#[derive(Debug, Default)]
struct Batches {
    buckets: [u64; BATCH_BUCKETS.len()],
    sum: u64,
    count: u64,
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// Counts a decoding step over `sequences` sequences that produced `text_tokens` answer
    /// tokens and `image_steps` image-token steps (one per image).
    pub fn step(&self, sequences: usize, text_tokens: u64, image_steps: u64) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.text_tokens.fetch_add(text_tokens, Ordering::Relaxed);
        self.image_steps.fetch_add(image_steps, Ordering::Relaxed);
        {
            let mut b = self.batch.lock().unwrap_or_else(|e| e.into_inner());
            for (i, &le) in BATCH_BUCKETS.iter().enumerate() {
                if sequences <= le {
                    b.buckets[i] += 1;
                }
            }
            b.sum += sequences as u64;
            b.count += 1;
        }
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_back((now, text_tokens, image_steps));
        while recent
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            recent.pop_front();
        }
    }

    /// Answer tokens and image steps per second over the last few seconds.
    fn rates(&self) -> (f64, f64) {
        let now = Instant::now();
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let Some((first, _, _)) = recent
            .iter()
            .find(|(t, _, _)| now.duration_since(*t) <= RATE_WINDOW)
        else {
            return (0.0, 0.0);
        };
        let span = now.duration_since(*first).as_secs_f64().max(1.0);
        let (tokens, steps) = recent
            .iter()
            .filter(|(t, _, _)| now.duration_since(*t) <= RATE_WINDOW)
            .fold((0, 0), |(a, b), (_, t, s)| (a + t, b + s));
        (tokens as f64 / span, steps as f64 / span)
    }

    /// The Prometheus exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "# HELP janus_requests_total Requests answered, by endpoint and status."
        );
        let _ = writeln!(w, "# TYPE janus_requests_total counter");
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                w,
                "janus_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let gauge = |w: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(w, "# HELP {name} {help}");
            let _ = writeln!(w, "# TYPE {name} gauge");
            let _ = writeln!(w, "{name} {v}");
        };
        let counter = |w: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(w, "# HELP {name} {help}");
            let _ = writeln!(w, "# TYPE {name} counter");
            let _ = writeln!(w, "{name} {v}");
        };
        gauge(
            w,
            "janus_queue_depth",
            "Requests waiting for a place in the batch.",
            self.queue_depth.load(Ordering::Relaxed) as f64,
        );
        gauge(
            w,
            "janus_active_sequences",
            "Sequences in the running batch.",
            self.active.load(Ordering::Relaxed) as f64,
        );
        counter(
            w,
            "janus_text_tokens_total",
            "Answer tokens produced.",
            self.text_tokens.load(Ordering::Relaxed),
        );
        counter(
            w,
            "janus_image_steps_total",
            "Image-token steps produced (one per image and step).",
            self.image_steps.load(Ordering::Relaxed),
        );
        counter(
            w,
            "janus_decode_steps_total",
            "Batched decoding steps run.",
            self.steps.load(Ordering::Relaxed),
        );
        let (tps, sps) = self.rates();
        gauge(
            w,
            "janus_text_tokens_per_second",
            "Answer tokens per second over the last 10 s.",
            tps,
        );
        gauge(
            w,
            "janus_image_steps_per_second",
            "Image-token steps per second over the last 10 s.",
            sps,
        );
        let b = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            w,
            "# HELP janus_batch_sequences Sequences per decoding step."
        );
        let _ = writeln!(w, "# TYPE janus_batch_sequences histogram");
        for (le, n) in BATCH_BUCKETS.iter().zip(b.buckets) {
            let _ = writeln!(w, "janus_batch_sequences_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(w, "janus_batch_sequences_bucket{{le=\"+Inf\"}} {}", b.count);
        let _ = writeln!(w, "janus_batch_sequences_sum {}", b.sum);
        let _ = writeln!(w, "janus_batch_sequences_count {}", b.count);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_what_happened() {
        let m = Metrics::default();
        m.request("/v1/chat/completions", 200);
        m.request("/v1/chat/completions", 200);
        m.request("/v1/images/generations", 400);
        m.step(3, 2, 1);
        m.step(1, 1, 0);
        let text = m.render();
        assert!(
            text.contains(
                "janus_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2"
            )
        );
        assert!(text.contains(
            "janus_requests_total{endpoint=\"/v1/images/generations\",status=\"400\"} 1"
        ));
        assert!(text.contains("janus_text_tokens_total 3"));
        assert!(text.contains("janus_image_steps_total 1"));
        assert!(text.contains("janus_batch_sequences_bucket{le=\"1\"} 1"));
        assert!(text.contains("janus_batch_sequences_bucket{le=\"4\"} 2"));
        assert!(text.contains("janus_batch_sequences_sum 4"));
    }
}
