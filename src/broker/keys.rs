//! Tenants' API keys. A key is `hbk_<key id>_<secret>`; only the SHA-256 of the secret is stored
//! (the secret is 32 random bytes, so a fast hash suffices). The key ring lives in memory for the
//! gateway's per-request checks; the core writes every change to the store before it is applied.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::RwLock;
use std::sync::atomic::{AtomicI64, Ordering};

use ring::rand::{SecureRandom, SystemRandom};

use crate::model::UnixMillis;
use crate::store::KeyRecord;

const PREFIX: &str = "hbk_";

/// A key as the ring keeps it.
#[derive(Debug)]
struct Entry {
    tenant: String,
    secret_sha256: String,
    created_at: UnixMillis,
    last_used: AtomicI64,
    /// `last_used` as last written to the store.
    persisted_last_used: AtomicI64,
    revoked: bool,
}

/// What `tenants list` shows of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyView {
    pub key_id: String,
    pub tenant: String,
    pub created_at: UnixMillis,
    pub last_used: UnixMillis,
    pub revoked: bool,
}

#[derive(Debug, Default)]
pub struct KeyRing {
    keys: RwLock<HashMap<String, Entry>>,
}

/// A new key: the stored record and the secret key, shown once.
pub fn generate(tenant: &str, now: UnixMillis) -> (KeyRecord, String) {
    let rng = SystemRandom::new();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill(&mut id).expect("the system random source works");
    rng.fill(&mut secret).expect("the system random source works");
    let (key_id, secret) = (hex(&id), hex(&secret));
    let record = KeyRecord {
        key_id: key_id.clone(),
        tenant: tenant.to_string(),
        secret_sha256: sha256_hex(secret.as_bytes()),
        created_at: now,
        last_used: 0,
        revoked_at: None,
    };
    (record, format!("{PREFIX}{key_id}_{secret}"))
}

/// `bytes` in lowercase hex.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

impl KeyRing {
    pub fn load(records: Vec<KeyRecord>) -> Self {
        let ring = KeyRing::default();
        for r in records {
            ring.insert(r);
        }
        ring
    }

    pub fn insert(&self, r: KeyRecord) {
        let entry = Entry {
            tenant: r.tenant,
            secret_sha256: r.secret_sha256,
            created_at: r.created_at,
            last_used: AtomicI64::new(r.last_used),
            persisted_last_used: AtomicI64::new(r.last_used),
            revoked: r.revoked_at.is_some(),
        };
        self.keys.write().expect("key ring lock").insert(r.key_id, entry);
    }

    pub fn revoke(&self, key_id: &str) {
        if let Some(e) = self.keys.write().expect("key ring lock").get_mut(key_id) {
            e.revoked = true;
        }
    }

    /// The key's id and tenant, if the key is valid and not revoked; records its use.
    pub fn verify(&self, key: &str, now: UnixMillis) -> Option<(String, String)> {
        let (key_id, secret) = key.strip_prefix(PREFIX)?.split_once('_')?;
        let keys = self.keys.read().expect("key ring lock");
        let entry = keys.get(key_id).filter(|e| !e.revoked)?;
        // Digests of a 256-bit secret: comparing them leaks nothing useful about the secret.
        if sha256_hex(secret.as_bytes()) != entry.secret_sha256 {
            return None;
        }
        entry.last_used.fetch_max(now, Ordering::Relaxed);
        Some((key_id.to_string(), entry.tenant.clone()))
    }

    pub fn view(&self, key_id: &str) -> Option<KeyView> {
        let keys = self.keys.read().expect("key ring lock");
        keys.get(key_id).map(|e| view(key_id, e))
    }

    /// Keys of one tenant (or all), by id.
    pub fn list(&self, tenant: Option<&str>) -> Vec<KeyView> {
        let keys = self.keys.read().expect("key ring lock");
        let mut views: Vec<KeyView> =
            keys.iter().filter(|(_, e)| tenant.is_none_or(|t| e.tenant == t)).map(|(id, e)| view(id, e)).collect();
        views.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        views
    }

    /// Uses not yet written to the store (key id, last use), marked as written.
    pub fn take_unpersisted_uses(&self) -> Vec<(String, UnixMillis)> {
        let keys = self.keys.read().expect("key ring lock");
        keys.iter()
            .filter_map(|(id, e)| {
                let used = e.last_used.load(Ordering::Relaxed);
                (e.persisted_last_used.swap(used, Ordering::Relaxed) < used).then(|| (id.clone(), used))
            })
            .collect()
    }
}

fn view(key_id: &str, e: &Entry) -> KeyView {
    KeyView {
        key_id: key_id.to_string(),
        tenant: e.tenant.clone(),
        created_at: e.created_at,
        last_used: e.last_used.load(Ordering::Relaxed),
        revoked: e.revoked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_whole_key_verifies_and_revocation_is_immediate() {
        let ring = KeyRing::default();
        let (record, key) = generate("acme", 1);
        assert!(!record.secret_sha256.contains(key.rsplit('_').next().unwrap()), "the secret is not stored");
        ring.insert(record.clone());
        assert_eq!(ring.verify(&key, 5), Some((record.key_id.clone(), "acme".into())));
        assert_eq!(ring.view(&record.key_id).unwrap().last_used, 5);
        let mut tampered = key.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == '0' { '1' } else { '0' });
        assert_eq!(ring.verify(&tampered, 6), None);
        assert_eq!(ring.verify("hbk_nope", 6), None);
        assert_eq!(ring.take_unpersisted_uses(), vec![(record.key_id.clone(), 5)]);
        assert!(ring.take_unpersisted_uses().is_empty());
        ring.revoke(&record.key_id);
        assert_eq!(ring.verify(&key, 7), None);
        assert!(ring.list(Some("acme"))[0].revoked);
    }
}
