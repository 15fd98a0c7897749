//! Per-tenant rate limits: a requests-per-minute and a tokens-per-minute token bucket.
//!
//! A request needs one request credit and a token bucket that is not in debt. Tokens are
//! charged as they are used (the prompt on admission, each generated token as it is
//! streamed, whatever ends the stream), so the token bucket may go negative; the tenant
//! then waits until it refills. Time is passed in, so
//! the arithmetic is tested exactly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::header::{HeaderMap, HeaderValue, RETRY_AFTER};

use crate::config::Config;
use crate::error::{ApiError, ErrorKind};
use crate::types::TenantId;

/// A bucket refilling `limit` credits per minute, holding at most `limit`.
#[derive(Clone, Debug)]
struct Bucket {
    limit: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(limit: u32, now: Instant) -> Self {
        Bucket { limit: f64::from(limit), level: f64::from(limit), at: now }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * self.limit / 60.0).min(self.limit);
        self.at = now;
    }

    /// Time until the level reaches `need` (zero if it already has).
    fn wait_for(&self, need: f64) -> Duration {
        let missing = need - self.level;
        if missing <= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(missing * 60.0 / self.limit) }
    }
}

/// A tenant's two buckets; `None` where the tenant is unlimited.
#[derive(Debug)]
struct TenantBuckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// What the client is told about its limits (`x-ratelimit-*` headers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateInfo {
    /// (limit, remaining, reset) of the request bucket.
    pub requests: Option<(u32, u64, Duration)>,
    /// (limit, remaining, reset) of the token bucket.
    pub tokens: Option<(u32, u64, Duration)>,
}

/// A refused request: the error, its headers, and when to retry.
#[derive(Debug)]
pub struct Refusal {
    pub error: ApiError,
    pub info: RateInfo,
}

/// Every tenant's buckets, behind one short-held lock.
pub struct Quotas {
    limits: HashMap<TenantId, (Option<u32>, Option<u32>)>,
    buckets: Mutex<HashMap<TenantId, TenantBuckets>>,
}

impl Quotas {
    pub fn new(config: &Config) -> Self {
        let limits =
            config.tenants.iter().map(|t| (t.name.clone(), (t.requests_per_minute, t.tokens_per_minute))).collect();
        Quotas { limits, buckets: Mutex::new(HashMap::new()) }
    }

    fn with<T>(&self, tenant: &TenantId, now: Instant, f: impl FnOnce(&mut TenantBuckets) -> T) -> T {
        let (rpm, tpm) = self.limits.get(tenant).copied().unwrap_or((None, None));
        let mut all = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Only a tenant's first call allocates its key.
        if !all.contains_key(tenant) {
            let fresh =
                TenantBuckets { requests: rpm.map(|l| Bucket::new(l, now)), tokens: tpm.map(|l| Bucket::new(l, now)) };
            all.insert(tenant.clone(), fresh);
        }
        let b = all.get_mut(tenant).expect("inserted above");
        for bucket in [&mut b.requests, &mut b.tokens].into_iter().flatten() {
            bucket.refill(now);
        }
        f(b)
    }

    /// Takes one request credit, or refuses with 429 when either bucket is empty.
    pub fn admit(&self, tenant: &TenantId, now: Instant) -> Result<RateInfo, Box<Refusal>> {
        self.with(tenant, now, |b| {
            let wait = [b.requests.as_ref().map(|r| r.wait_for(1.0)), b.tokens.as_ref().map(|t| t.wait_for(0.0))]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(Duration::ZERO);
            if wait > Duration::ZERO {
                let which = if b.requests.as_ref().is_some_and(|r| r.level < 1.0) { "requests" } else { "tokens" };
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                let error = ApiError::new(
                    ErrorKind::RateLimited,
                    format!("tenant `{tenant}` is over its {which}-per-minute limit; retry in {secs} s"),
                )
                .with_code("rate_limit_exceeded")
                .with_retry_after(secs);
                return Err(Box::new(Refusal { error, info: info(b) }));
            }
            if let Some(r) = b.requests.as_mut() {
                r.level -= 1.0;
            }
            Ok(info(b))
        })
    }

    /// Charges tokens a request used.
    pub fn charge(&self, tenant: &TenantId, tokens: usize, now: Instant) {
        // Called for every streamed token: a tenant without a token limit costs no lock.
        if self.limits.get(tenant).is_none_or(|&(_, tpm)| tpm.is_none()) {
            return;
        }
        self.with(tenant, now, |b| {
            if let Some(t) = b.tokens.as_mut() {
                t.level -= tokens as f64;
            }
        });
    }
}

fn info(b: &TenantBuckets) -> RateInfo {
    let one = |bucket: &Bucket| {
        let remaining = bucket.level.max(0.0).floor() as u64;
        (bucket.limit as u32, remaining, bucket.wait_for(bucket.limit))
    };
    RateInfo { requests: b.requests.as_ref().map(one), tokens: b.tokens.as_ref().map(one) }
}

impl RateInfo {
    /// Writes OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers.
    pub fn write(&self, headers: &mut HeaderMap) {
        for (what, value) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some((limit, remaining, reset)) = value else { continue };
            let reset = format!("{:.3}s", reset.as_secs_f64());
            for (name, v) in [("limit", limit.to_string()), ("remaining", remaining.to_string()), ("reset", reset)] {
                if let (Ok(n), Ok(v)) = (
                    hyper::header::HeaderName::from_bytes(format!("x-ratelimit-{name}-{what}").as_bytes()),
                    HeaderValue::from_str(&v),
                ) {
                    headers.insert(n, v);
                }
            }
        }
    }
}

impl Refusal {
    /// Adds `Retry-After` and the rate-limit headers to a response's headers.
    pub fn write(&self, headers: &mut HeaderMap) {
        self.info.write(headers);
        if let Some(secs) = self.error.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Format;

    fn quotas(rpm: Option<u32>, tpm: Option<u32>) -> (Quotas, TenantId) {
        let mut config = Config::from_str("{}", Format::Json).unwrap();
        let t = &mut config.tenants[0];
        (t.requests_per_minute, t.tokens_per_minute) = (rpm, tpm);
        let name = t.name.clone();
        (Quotas::new(&config), name)
    }

    #[test]
    fn requests_per_minute_refuse_then_refill() {
        let (q, t) = quotas(Some(2), None);
        let t0 = Instant::now();
        assert_eq!(q.admit(&t, t0).unwrap().requests, Some((2, 1, Duration::from_secs(30))));
        q.admit(&t, t0).unwrap();
        let refused = q.admit(&t, t0).unwrap_err();
        assert_eq!(refused.error.status(), 429);
        assert_eq!(refused.error.retry_after, Some(30));
        assert!(q.admit(&t, t0 + Duration::from_secs(30)).is_ok(), "half a minute refills one of two");
    }

    #[test]
    fn tokens_are_charged_after_the_fact_and_debt_blocks_until_repaid() {
        let (q, t) = quotas(None, Some(600));
        let t0 = Instant::now();
        q.admit(&t, t0).unwrap();
        q.charge(&t, 660, t0);
        let refused = q.admit(&t, t0).unwrap_err();
        assert_eq!(refused.error.retry_after, Some(6), "60 tokens of debt at 10 tokens/s");
        assert!(refused.error.message.contains("tokens-per-minute"));
        assert!(q.admit(&t, t0 + Duration::from_secs(6)).is_ok());
    }

    #[test]
    fn unlimited_tenants_are_never_refused_and_get_no_headers() {
        let (q, t) = quotas(None, None);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(q.admit(&t, t0).unwrap(), RateInfo::default());
        }
        let mut h = HeaderMap::new();
        RateInfo::default().write(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn headers_use_openai_names() {
        let (q, t) = quotas(Some(10), Some(1000));
        let mut h = HeaderMap::new();
        q.admit(&t, Instant::now()).unwrap().write(&mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], "10");
        assert_eq!(h["x-ratelimit-remaining-requests"], "9");
        assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "1000");
    }
}
