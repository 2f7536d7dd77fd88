//! Verified tokens, remembered until they expire, so a client that sends the same token again
//! costs a lookup instead of a signature check.
//!
//! Keyed by the token's signature (its third part, as sent). A hit returns the claims of the
//! token that was verified with that signature, whatever the rest of the presented token says;
//! so presenting another header or payload with a remembered signature gets exactly the
//! identity of the verified token, which only its holder can present anyway (the signature is
//! as secret as the token). Hashing the whole token instead (SHA-256) cost 19,000 instructions
//! per request for an RS256 token of 750 bytes, five times the rest of the guard
//! (`bench/instructions`, docs/benchmarks.md); a signature is uniformly distributed, so its
//! first bytes are the hash. Bounded: [`CAPACITY`] entries over [`SHARDS`] shards, each behind its own short
//! read-mostly lock. A shard that is full first drops what has expired, then an arbitrary entry,
//! so a flood of distinct valid tokens evicts older ones instead of growing the heap. Only
//! verified tokens are stored: an invalid one costs its refusal, never memory. The cache belongs
//! to one compiled guard, so a key rotation (a new guard) forgets every entry of the old keys.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::policy::input::RequestAuth;

/// Most tokens remembered by one guard.
pub const CAPACITY: usize = 10_000;
/// Independent locks; a lookup takes one shard's read lock.
const SHARDS: usize = 16;

/// A token's signature, as sent: the cache key.
pub(crate) type TokenDigest = Box<str>;

/// What a verification proved, remembered.
#[derive(Debug)]
pub(crate) struct Verified {
    pub auth: Arc<RequestAuth>,
    /// The rule (issuer) that verified it.
    pub rule: usize,
    /// Unix seconds after which the entry no longer counts (`exp` plus the clock skew).
    pub valid_until: i64,
}

/// A signature is uniformly distributed: the first 8 bytes of the key are the hash (later
/// writes, such as `str`'s terminator, are ignored).
#[derive(Default)]
struct DigestHasher {
    hash: u64,
    written: bool,
}

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.hash
    }
    fn write(&mut self, bytes: &[u8]) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.hash |= u64::from(*b) << (8 * i);
        }
    }
}

type Shard = HashMap<TokenDigest, Arc<Verified>, BuildHasherDefault<DigestHasher>>;

/// The bounded cache of one guard.
pub(crate) struct TokenCache {
    shards: Box<[RwLock<Shard>]>,
    per_shard: usize,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("len", &self.len()).finish()
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl TokenCache {
    /// A cache of at most `capacity` entries (rounded up to a multiple of the shard count).
    pub fn with_capacity(capacity: usize) -> Self {
        Self::sharded(capacity, SHARDS)
    }

    fn sharded(capacity: usize, shards: usize) -> Self {
        let per_shard = capacity.div_ceil(shards).max(1);
        TokenCache { shards: (0..shards).map(|_| RwLock::new(Shard::default())).collect(), per_shard }
    }

    /// A token's cache key: its signature (empty for a token without one, which is never
    /// remembered, as it never verifies).
    pub fn digest(token: &str) -> &str {
        token.rfind('.').map_or("", |i| &token[i + 1..])
    }

    fn shard(&self, digest: &str) -> &RwLock<Shard> {
        // The signature's first bytes, mixed (they are text: base64 spreads 6 bits over 8).
        let mut h = 0u64;
        for (i, b) in digest.as_bytes().iter().take(8).enumerate() {
            h |= u64::from(*b) << (8 * i);
        }
        let mixed = (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize;
        &self.shards[mixed % self.shards.len()]
    }

    /// The verification of this token, if remembered and still valid at `now`.
    pub fn get(&self, digest: &str, now: i64) -> Option<Arc<Verified>> {
        if digest.is_empty() {
            return None;
        }
        let found = self.shard(digest).read().get(digest).cloned()?;
        if now > found.valid_until {
            self.shard(digest).write().remove(digest);
            return None;
        }
        Some(found)
    }

    /// Remembers a verification; a full shard makes room first.
    pub fn insert(&self, digest: TokenDigest, verified: Arc<Verified>, now: i64) {
        let mut shard = self.shard(&digest).write();
        if shard.len() >= self.per_shard && !shard.contains_key(&digest) {
            shard.retain(|_, v| v.valid_until >= now);
            if shard.len() >= self.per_shard {
                let victim = rand::random_range(0..shard.len());
                if let Some(key) = shard.keys().nth(victim).cloned() {
                    shard.remove(&key);
                }
            }
        }
        if !digest.is_empty() {
            shard.insert(digest, verified);
        }
    }

    /// How many verifications are remembered.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(valid_until: i64) -> Arc<Verified> {
        let auth = RequestAuth::from_claims(serde_json::Map::new());
        Arc::new(Verified { auth: Arc::new(auth), rule: 0, valid_until })
    }

    #[test]
    fn a_flood_of_distinct_tokens_evicts_instead_of_growing() {
        let cache = TokenCache::with_capacity(160);
        // Signatures are uniformly distributed; so are these.
        let token = |i: u64| format!("a.b.{:016x}", i.wrapping_mul(0x2545_F491_4F6C_DD1D));
        for i in 0..10_000 {
            cache.insert(TokenCache::digest(&token(i)).into(), verified(2_000), 1_000);
        }
        assert!(cache.len() <= 160, "{}", cache.len());
        assert!(cache.len() >= 150, "a full cache stays (nearly) full: {}", cache.len());
        // The last token is there; an early one was evicted.
        assert!(cache.get(TokenCache::digest(&token(9_999)), 1_000).is_some());
        let early = (0..100).filter(|i| cache.get(TokenCache::digest(&token(*i)), 1_000).is_some());
        assert!(early.count() < 10);
    }

    #[test]
    fn entries_end_when_the_token_expires_and_expired_ones_go_first() {
        let cache = TokenCache::sharded(4, 1);
        let d = TokenCache::digest("a.b.c");
        cache.insert(d.into(), verified(1_060), 1_000);
        assert!(cache.get(d, 1_060).is_some());
        assert!(cache.get(d, 1_061).is_none(), "past its time");
        assert_eq!(cache.len(), 0, "and forgotten");
        // A full shard drops its expired entries before any live one.
        let live = TokenCache::digest("x.y.live");
        cache.insert(live.into(), verified(5_000), 1_000);
        for i in 0..3 {
            cache.insert(TokenCache::digest(&format!("x.y.old-{i}")).into(), verified(1_500), 1_000);
        }
        assert_eq!(cache.len(), 4);
        cache.insert(TokenCache::digest("x.y.new").into(), verified(5_000), 2_000);
        assert_eq!(cache.len(), 2, "expired entries swept when a shard filled");
        assert!(cache.get(live, 2_000).is_some());
    }

    #[test]
    fn tokens_are_remembered_by_their_signature_and_unsigned_ones_never() {
        assert_ne!(TokenCache::digest("a.b.c"), TokenCache::digest("a.b.d"));
        assert_eq!(TokenCache::digest("a.b.sig"), "sig");
        let cache = TokenCache::sharded(4, 1);
        cache.insert(TokenCache::digest("a.b.").into(), verified(5_000), 1_000);
        assert_eq!(cache.len(), 0, "an empty signature is never a key");
        assert!(cache.get(TokenCache::digest("a.b."), 1_000).is_none());
    }
}
