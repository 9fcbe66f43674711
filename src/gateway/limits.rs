//! Limits that protect the broker and the gateway from one client or one tenant:
//!
//! - [`AddressLimiter`]: requests not yet authenticated, per client address, before any broker
//!   call. Each request takes a token from its address's bucket while its key is checked; a key
//!   the broker accepts gives the token back, so only refused (or missing) keys spend the
//!   address's allowance, and a flood of bad keys from one address gets 429 without costing a
//!   broker RPC. Memory is bounded: at most `max_addresses` buckets, full ones dropped first,
//!   then the least recently used.
//! - [`StreamSlots`]: concurrent event streams and followed logs per tenant; a [`StreamSlot`]
//!   is held for as long as its stream is open and frees itself when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::client_address::rate_key;
use super::problem::HttpError;

/// Per-address token buckets for requests whose key is not (yet) accepted.
#[derive(Debug)]
pub struct AddressLimiter {
    rate: f64,
    burst: u32,
    max_addresses: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, rate: f64, capacity: f64) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.refilled = now;
    }
}

impl AddressLimiter {
    /// `burst` unauthenticated requests per address at once, refilled at `rate` per second; at
    /// most `max_addresses` addresses remembered.
    pub fn new(rate: f64, burst: u32, max_addresses: usize) -> Self {
        Self { rate, burst, max_addresses: max_addresses.max(1), buckets: Mutex::default() }
    }

    /// Takes a token for a request from `client`, or says how long to wait (429).
    pub fn take(&self, client: IpAddr) -> Result<(), HttpError> {
        self.take_at(client, Instant::now())
    }

    /// Gives the token of a request whose key was accepted back.
    pub fn give_back(&self, client: IpAddr) {
        self.give_back_at(client, Instant::now());
    }

    /// How many addresses are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_at(&self, client: IpAddr, now: Instant) -> Result<(), HttpError> {
        let (key, capacity) = (rate_key(client), f64::from(self.burst));
        let mut buckets = self.lock();
        if !buckets.contains_key(&key) && buckets.len() >= self.max_addresses {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket { tokens: capacity, refilled: now });
        bucket.refill(now, self.rate, capacity);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let retry_after = (((1.0 - bucket.tokens) / self.rate).ceil() as u64).max(1);
        Err(HttpError::TooManyUnauthenticated { client, rate: self.rate, burst: self.burst, retry_after })
    }

    fn give_back_at(&self, client: IpAddr, now: Instant) {
        let capacity = f64::from(self.burst);
        if let Some(bucket) = self.lock().get_mut(&rate_key(client)) {
            bucket.refill(now, self.rate, capacity);
            bucket.tokens = (bucket.tokens + 1.0).min(capacity);
        }
    }

    /// Makes room for more addresses: drops every bucket that has refilled to full (it holds
    /// nothing a fresh one would not), then, if still more than 7/8 full, the least recently used
    /// down to 7/8. One pass over the map frees room for many new addresses, so a flood of fresh
    /// addresses costs O(1) per request on average.
    fn evict(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        let (rate, capacity) = (self.rate, f64::from(self.burst));
        buckets.retain(|_, b| {
            let mut b = *b;
            b.refill(now, rate, capacity);
            b.tokens < capacity
        });
        let keep = self.max_addresses - self.max_addresses / 8 - 1;
        if buckets.len() > keep {
            let mut ages: Vec<Instant> = buckets.values().map(|b| b.refilled).collect();
            let drop = ages.len() - keep;
            let (_, cutoff, _) = ages.select_nth_unstable(drop - 1);
            let cutoff = *cutoff;
            let mut dropped = 0;
            buckets.retain(|_, b| {
                let old = b.refilled <= cutoff && dropped < drop;
                dropped += usize::from(old);
                !old
            });
        }
    }
}

/// Open event streams and followed logs per tenant, at most `max_per_tenant` each.
#[derive(Debug, Clone)]
pub struct StreamSlots {
    max_per_tenant: u32,
    open: Arc<Mutex<HashMap<String, u32>>>,
}

/// One open stream of a tenant; dropping it frees the slot.
#[derive(Debug)]
pub struct StreamSlot {
    tenant: String,
    open: Arc<Mutex<HashMap<String, u32>>>,
}

impl StreamSlots {
    pub fn new(max_per_tenant: u32) -> Self {
        Self { max_per_tenant, open: Arc::default() }
    }

    /// A slot for one more stream of `tenant`, or 429 when it has `max_per_tenant` open.
    pub fn acquire(&self, tenant: &str) -> Result<StreamSlot, HttpError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(tenant.to_string()).or_default();
        if *count >= self.max_per_tenant {
            return Err(HttpError::TooManyStreams { tenant: tenant.to_string(), limit: self.max_per_tenant });
        }
        *count += 1;
        Ok(StreamSlot { tenant: tenant.to_string(), open: self.open.clone() })
    }

    /// Streams `tenant` has open.
    #[cfg(test)]
    fn open(&self, tenant: &str) -> u32 {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).get(tenant).copied().unwrap_or(0)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refused_keys_spend_an_addresses_allowance_and_accepted_ones_give_it_back() {
        let limiter = AddressLimiter::new(1.0, 3, 100);
        let (t0, bad, good) = (Instant::now(), ip("192.0.2.1"), ip("192.0.2.2"));
        // Accepted keys: taken and given back, so any number passes.
        for _ in 0..10 {
            limiter.take_at(good, t0).unwrap();
            limiter.give_back_at(good, t0);
        }
        for _ in 0..3 {
            limiter.take_at(bad, t0).unwrap();
        }
        match limiter.take_at(bad, t0) {
            Err(HttpError::TooManyUnauthenticated { client, retry_after, .. }) => {
                assert_eq!((client, retry_after), (bad, 1));
            }
            other => panic!("expected 429, got {other:?}"),
        }
        limiter.take_at(good, t0).unwrap();
        // One second refills one request.
        limiter.take_at(bad, t0 + Duration::from_secs(1)).unwrap();
        assert!(limiter.take_at(bad, t0 + Duration::from_secs(1)).is_err());
        // One IPv6 host is one /64.
        let v6 = AddressLimiter::new(1.0, 1, 100);
        v6.take_at(ip("2001:db8::1"), t0).unwrap();
        assert!(v6.take_at(ip("2001:db8::2"), t0).is_err());
        v6.take_at(ip("2001:db8:0:1::1"), t0).unwrap();
    }

    #[test]
    fn memory_stays_bounded_and_full_buckets_go_first() {
        let limiter = AddressLimiter::new(1.0, 2, 3);
        let t0 = Instant::now();
        // An address that spent everything, and two that have refilled by the time a fourth comes.
        limiter.take_at(ip("192.0.2.1"), t0).unwrap();
        limiter.take_at(ip("192.0.2.1"), t0).unwrap();
        limiter.take_at(ip("192.0.2.2"), t0).unwrap();
        limiter.take_at(ip("192.0.2.3"), t0).unwrap();
        let later = t0 + Duration::from_millis(1500);
        limiter.take_at(ip("192.0.2.4"), later).unwrap();
        assert_eq!(limiter.len(), 2, "the refilled buckets were dropped");
        assert!(limiter.take_at(ip("192.0.2.1"), later).is_ok(), "1.5 s refilled one token");
        assert!(limiter.take_at(ip("192.0.2.1"), later).is_err(), "the spent bucket was kept");
        // A flood of fresh addresses never grows the map past its bound.
        for i in 0..1000u32 {
            let _ = limiter.take_at(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), later);
            let _ = limiter.take_at(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), later);
        }
        assert!(limiter.len() <= 3, "{}", limiter.len());
    }

    #[test]
    fn the_least_recently_seen_addresses_are_forgotten_first() {
        // Burst 1, slow refill: every address below has spent its allowance.
        let limiter = AddressLimiter::new(0.001, 1, 8);
        let t0 = Instant::now();
        let addr = |i: u8| IpAddr::from([192, 0, 2, i]);
        for i in 0..8 {
            limiter.take_at(addr(i), t0 + Duration::from_millis(u64::from(i))).unwrap();
        }
        // A ninth address makes room down to 7/8 of the bound: the two oldest go.
        limiter.take_at(addr(8), t0 + Duration::from_millis(8)).unwrap();
        assert_eq!(limiter.len(), 7);
        let now = t0 + Duration::from_millis(9);
        assert!(limiter.take_at(addr(2), now).is_err(), "still remembered, still spent");
        assert!(limiter.take_at(addr(0), now).is_ok(), "forgotten: a fresh allowance");
    }

    #[test]
    fn stream_slots_cap_each_tenant_and_free_on_drop() {
        let slots = StreamSlots::new(2);
        let a1 = slots.acquire("acme").unwrap();
        let _a2 = slots.acquire("acme").unwrap();
        match slots.acquire("acme") {
            Err(HttpError::TooManyStreams { tenant, limit }) => assert_eq!((tenant.as_str(), limit), ("acme", 2)),
            other => panic!("expected 429, got {other:?}"),
        }
        let _g = slots.acquire("globex").unwrap();
        drop(a1);
        assert_eq!(slots.open("acme"), 1);
        let _a3 = slots.acquire("acme").unwrap();
        assert_eq!((slots.open("acme"), slots.open("globex")), (2, 1));
    }
}
