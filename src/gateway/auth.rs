//! Tenants: the `Authorization: Bearer <key>` of every request is checked with the broker (no
//! caching, so a revoked key fails on its next request), and each tenant's requests go through an
//! in-memory token bucket with the rate and burst the broker returns for it. Before the broker is
//! asked, the client address's allowance for requests without an accepted key is checked
//! ([`super::limits::AddressLimiter`]): a flood of bad keys gets 429 without broker calls.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};

use super::AppState;
use super::problem::HttpError;
use crate::proto::AuthenticateRequest;

/// Longest API key accepted before asking the broker.
const MAX_KEY_LEN: usize = 512;

/// The authenticated tenant of a request (an extractor: handlers that take it are authenticated
/// and rate limited).
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    /// Admin tenants may see and drain agents.
    pub admin: bool,
}

impl Tenant {
    /// Refuses tenants that are not admins (403).
    pub fn require_admin(&self) -> Result<(), HttpError> {
        if self.admin {
            Ok(())
        } else {
            Err(HttpError::Forbidden(format!(
                "tenant {} is not an admin tenant; agents and sites are for admins",
                self.name
            )))
        }
    }
}

/// Where the request log finds the tenant once the extractor knows it.
#[derive(Debug, Clone, Default)]
pub struct TenantSlot(pub Arc<OnceLock<String>>);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // In process (tests calling the router directly) there is no peer: one unknown address.
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        let limits = state.limits();
        let client = limits.proxies.client_address(peer, &parts.headers);
        limits.addresses.take(client)?;
        // From here, a missing or refused key spends the token; an accepted key (or a broker that
        // could not say) gives it back.
        let key = bearer_key(&parts.headers)?;
        let info = match state.jobs().authenticate(AuthenticateRequest { key }).await {
            Ok(answer) => {
                limits.addresses.give_back(client);
                answer.into_inner()
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                return Err(HttpError::Unauthenticated("the api key is unknown or revoked".into()));
            }
            Err(status) => {
                limits.addresses.give_back(client);
                return Err(HttpError::from(status));
            }
        };
        if let Some(slot) = parts.extensions.get::<TenantSlot>() {
            let _ = slot.0.set(info.tenant.clone());
        }
        state.limiter().check(&info.tenant, info.requests_per_second, info.burst)?;
        Ok(Tenant { name: info.tenant, admin: info.admin })
    }
}

/// The key of `Authorization: Bearer <key>`.
fn bearer_key(headers: &HeaderMap) -> Result<String, HttpError> {
    let missing =
        || HttpError::Unauthenticated("authorization: give an api key as `Authorization: Bearer <key>`".into());
    let value = headers.get(header::AUTHORIZATION).ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| missing())?;
    let (scheme, key) = value.split_once(' ').ok_or_else(missing)?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
        return Err(missing());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(HttpError::Unauthenticated("the api key is unknown or revoked".into()));
    }
    Ok(key.to_string())
}

/// Per-tenant token buckets.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl RateLimiter {
    /// Takes one token from `tenant`'s bucket (`burst` tokens, refilled at `rate` per second), or
    /// says how many whole seconds (at least 1) until one is there. A rate or burst of 0 (a broker
    /// that sets no limit) lets everything through.
    pub fn check(&self, tenant: &str, rate: f64, burst: u32) -> Result<(), HttpError> {
        self.check_at(tenant, rate, burst, Instant::now())
    }

    fn check_at(&self, tenant: &str, rate: f64, burst: u32, now: Instant) -> Result<(), HttpError> {
        if !(rate.is_finite() && rate > 0.0) || burst == 0 {
            return Ok(());
        }
        let capacity = f64::from(burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(tenant.to_string()).or_insert(Bucket { tokens: capacity, refilled: now });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / rate;
        let retry_after = (wait.ceil() as u64).max(1);
        Err(HttpError::RateLimited { rate, burst, retry_after })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_refills_and_retry_after_is_whole_seconds() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        for _ in 0..10 {
            limiter.check_at("acme", 5.0, 10, t0).unwrap();
        }
        match limiter.check_at("acme", 5.0, 10, t0) {
            Err(HttpError::RateLimited { retry_after, .. }) => assert_eq!(retry_after, 1),
            other => panic!("expected a rate limit, got {other:?}"),
        }
        // Other tenants have their own bucket.
        limiter.check_at("globex", 5.0, 10, t0).unwrap();
        // 200 ms at 5/s refills one token.
        limiter.check_at("acme", 5.0, 10, t0 + Duration::from_millis(200)).unwrap();
        assert!(limiter.check_at("acme", 5.0, 10, t0 + Duration::from_millis(200)).is_err());
        // A slow rate gives a longer wait, rounded up.
        let slow = RateLimiter::default();
        slow.check_at("a", 0.25, 1, t0).unwrap();
        match slow.check_at("a", 0.25, 1, t0 + Duration::from_millis(500)) {
            Err(HttpError::RateLimited { retry_after, .. }) => assert_eq!(retry_after, 4),
            other => panic!("expected a rate limit, got {other:?}"),
        }
    }

    #[test]
    fn bearer_keys_are_parsed_strictly() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            bearer_key(&h)
        };
        assert_eq!(with("Bearer abc").unwrap(), "abc");
        assert_eq!(with("bearer  abc ").unwrap(), "abc");
        assert!(with("Basic abc").is_err());
        assert!(with("Bearer ").is_err());
        assert!(bearer_key(&HeaderMap::new()).is_err());
    }
}
