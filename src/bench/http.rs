//! `starling bench --http URL`: a load generator against a running server.
//!
//! `concurrency` workers send streaming `POST /v1/generate` requests (greedy, a fixed number
//! of tokens, prompts that differ per request) until `requests` have been sent, and time
//! every token frame as it arrives. The report gives time to first token and inter-token
//! latency percentiles, end-to-end latency, generated tokens per second over the wall time,
//! and the failures by kind. A failed request is counted, never retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use super::common::{BenchError, bench_text};
use crate::protocol::sse::{SseEvents, event_name};

/// What the load generator sends, and where.
#[derive(Clone, Debug)]
pub struct HttpLoad {
    /// `http://host:port` of the server.
    pub url: String,
    /// Simultaneous streams (one connection each).
    pub concurrency: usize,
    /// Requests in total.
    pub requests: usize,
    /// Tokens each request generates (`ignore_eos`, so every request runs to the end).
    pub max_tokens: u32,
    /// Bearer key, if the server wants one.
    pub api_key: Option<String>,
    /// Model id to route to (the server's first model when `None`).
    pub model: Option<String>,
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (seconds); all zero for none.
    pub fn of(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let i = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            samples[i.clamp(1, samples.len()) - 1] * 1e3
        };
        Percentiles { p50_ms: rank(50.0), p95_ms: rank(95.0), p99_ms: rank(99.0), max_ms: rank(100.0) }
    }
}

/// What one run of the load generator measured.
#[derive(Clone, Debug, Serialize)]
pub struct HttpReport {
    pub url: String,
    pub concurrency: usize,
    pub requests: usize,
    pub completed: usize,
    /// Failed requests: HTTP status ≥ 400, a connection error, an `error` event, or a stream
    /// that ended without `done`.
    pub errors: usize,
    /// The first few failure messages (status and body, or the transport error).
    pub error_samples: Vec<String>,
    pub generated_tokens: u64,
    pub wall_s: f64,
    /// Generated tokens per second over the wall time.
    pub throughput_tok_s: f64,
    pub ttft: Percentiles,
    pub inter_token: Percentiles,
    pub e2e: Percentiles,
}

/// One request's timings.
#[derive(Default)]
struct Sample {
    ttft: Option<f64>,
    gaps: Vec<f64>,
    e2e: f64,
    tokens: u64,
}

/// Runs the load and reports; fails only on bad settings or an unparsable URL.
pub fn run(load: &HttpLoad) -> Result<HttpReport, BenchError> {
    if load.concurrency == 0 || load.requests == 0 || load.max_tokens == 0 {
        return Err(BenchError::Http("--concurrency, --requests and --max-tokens must be at least 1".into()));
    }
    let authority = authority(&load.url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Http(format!("cannot start the client runtime: {e}")))?;
    runtime.block_on(drive(load, authority))
}

/// `host:port` of an `http://` URL (no path; https is not spoken).
fn authority(url: &str) -> Result<String, BenchError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| BenchError::Http(format!("--http must be an http:// URL, got `{url}`")))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(BenchError::Http(format!("--http takes the server's base URL (http://host:port), got `{url}`")));
    }
    Ok(if host.contains(':') { host.to_string() } else { format!("{host}:80") })
}

async fn drive(load: &HttpLoad, authority: String) -> Result<HttpReport, BenchError> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency.min(load.requests) {
        let (next, load, authority) = (next.clone(), load.clone(), authority.clone());
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= load.requests {
                    break;
                }
                results.push(one_request(&load, &authority, i).await);
            }
            results
        }));
    }
    let mut results = Vec::with_capacity(load.requests);
    for w in workers {
        results.extend(w.await.map_err(|e| BenchError::Http(format!("worker failed: {e}")))?);
    }
    Ok(summarize(load, results, start.elapsed()))
}

fn summarize(load: &HttpLoad, results: Vec<Result<Sample, String>>, wall: Duration) -> HttpReport {
    let (mut ttft, mut gaps, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let (mut completed, mut tokens, mut errors) = (0, 0, Vec::new());
    for r in results {
        match r {
            Ok(s) => {
                completed += 1;
                tokens += s.tokens;
                ttft.extend(s.ttft);
                gaps.extend(s.gaps);
                e2e.push(s.e2e);
            }
            Err(e) => errors.push(e),
        }
    }
    let wall_s = wall.as_secs_f64();
    HttpReport {
        url: load.url.clone(),
        concurrency: load.concurrency,
        requests: load.requests,
        completed,
        errors: errors.len(),
        error_samples: errors.into_iter().take(5).collect(),
        generated_tokens: tokens,
        wall_s,
        throughput_tok_s: if wall_s > 0.0 { tokens as f64 / wall_s } else { 0.0 },
        ttft: Percentiles::of(&mut ttft),
        inter_token: Percentiles::of(&mut gaps),
        e2e: Percentiles::of(&mut e2e),
    }
}

/// The JSON body of request `i`: a prompt cut from the bench text at a different word each time.
fn body(load: &HttpLoad, i: usize) -> serde_json::Value {
    let text = bench_text();
    let words: Vec<&str> = text.split(' ').collect();
    let from = (i * 7) % (words.len() / 2);
    let prompt = words[from..from + 24].join(" ");
    let mut body = serde_json::json!({
        "prompt": prompt,
        "max_tokens": load.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
    });
    if let Some(m) = &load.model {
        body["model"] = m.clone().into();
    }
    body
}

async fn one_request(load: &HttpLoad, authority: &str, i: usize) -> Result<Sample, String> {
    let stream = TcpStream::connect(authority).await.map_err(|e| format!("connect {authority}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::post("/v1/generate")
        .header("host", authority)
        .header("content-type", "application/json")
        .header("x-request-id", format!("bench-{i}"));
    if let Some(key) = &load.api_key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = req.body(Full::new(Bytes::from(body(load, i).to_string()))).map_err(|e| format!("request: {e}"))?;
    let sent = Instant::now();
    let response = sender.send_request(req).await.map_err(|e| format!("send: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        let bytes = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(format!("HTTP {}: {}", status.as_u16(), String::from_utf8_lossy(&bytes)));
    }
    read_stream(response.into_body(), sent).await
}

/// Reads SSE frames, timing each `token` event, until `done` (or an error).
async fn read_stream(mut body: Incoming, sent: Instant) -> Result<Sample, String> {
    let mut sample = Sample::default();
    let mut events = SseEvents::default();
    let mut last = sent;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("stream: {e}"))?;
        let Some(data) = frame.data_ref() else { continue };
        for event in events.push(data) {
            let now = Instant::now();
            match event_name(&event) {
                Some("token") => {
                    match sample.ttft {
                        None => sample.ttft = Some((now - sent).as_secs_f64()),
                        Some(_) => sample.gaps.push((now - last).as_secs_f64()),
                    }
                    last = now;
                    sample.tokens += 1;
                }
                Some("done") => {
                    sample.e2e = (now - sent).as_secs_f64();
                    return Ok(sample);
                }
                Some("error") => return Err(format!("error event: {}", event.trim())),
                _ => {}
            }
        }
    }
    Err(format!("stream ended without a done event after {} tokens", sample.tokens))
}

impl std::fmt::Display for HttpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} · {} concurrent · {} requests", self.url, self.concurrency, self.requests)?;
        writeln!(f, "completed {} · errors {} · wall {:.1} s", self.completed, self.errors, self.wall_s)?;
        writeln!(f, "throughput {:.1} generated tok/s ({} tokens)", self.throughput_tok_s, self.generated_tokens)?;
        writeln!(f, "{:<24} {:>9} {:>9} {:>9} {:>9}", "latency (ms)", "p50", "p95", "p99", "max")?;
        for (name, p) in
            [("time to first token", &self.ttft), ("inter-token", &self.inter_token), ("end to end", &self.e2e)]
        {
            writeln!(f, "{name:<24} {:>9.1} {:>9.1} {:>9.1} {:>9.1}", p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms)?;
        }
        for e in &self.error_samples {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(|i| i as f64 / 1e3).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms), (50.0, 95.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
        let mut one = vec![0.25];
        assert_eq!(Percentiles::of(&mut one).p99_ms, 250.0);
    }

    #[test]
    fn only_plain_http_base_urls_are_accepted() {
        assert_eq!(authority("http://127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(authority("http://localhost/").unwrap(), "localhost:80");
        assert!(authority("https://x:1").unwrap_err().to_string().contains("http://"));
        assert!(authority("http://x:1/v1/generate").unwrap_err().to_string().contains("base URL"));
    }
}
