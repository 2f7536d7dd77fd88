//! Verified tokens, remembered until they expire, so a client that sends the same token again
//! costs a lookup instead of a signature check.
//!
//! Keyed by the whole token, so a hit needs exactly the token that was verified: the same
//! signature under another header or payload is a miss, verified (and refused) afresh. (An
//! earlier version keyed by the signature alone and answered such a token with the claims of
//! the verified one; with `forwardOriginalToken` the app then got a payload nobody had signed.)
//! The key's hash is the token's last 8 bytes, mixed: the end of the signature, uniformly
//! distributed and chosen by the issuer, not the caller (only verified tokens are stored).
//! Hashing the whole token (SHA-256) cost 19,000 instructions per request for an RS256 token of
//! 750 bytes, five times the rest of the guard (`bench/instructions`, docs/benchmarks.md); a
//! hit now costs the hash of 8 bytes and one compare of the token.
//!
//! Bounded: [`CAPACITY`] entries and [`CAPACITY_BYTES`] of tokens over [`SHARDS`] shards, each
//! behind its own short read-mostly lock. A shard that is full first drops what has expired,
//! then arbitrary entries, so a flood of distinct valid tokens evicts older ones instead of
//! growing the heap. Only verified tokens are stored: an invalid one costs its refusal, never
//! memory. The cache belongs to one compiled guard, so a key rotation (a new guard) forgets
//! every entry of the old keys.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::policy::input::RequestAuth;

/// Most tokens remembered by one guard.
pub const CAPACITY: usize = 10_000;
/// Most bytes of tokens remembered by one guard (tokens are at most 8 KiB; most are under 1).
pub const CAPACITY_BYTES: usize = 16 << 20;
/// Independent locks; a lookup takes one shard's read lock.
const SHARDS: usize = 16;

/// What a verification proved, remembered.
#[derive(Debug)]
pub(crate) struct Verified {
    pub auth: Arc<RequestAuth>,
    /// The rule (issuer) that verified it.
    pub rule: usize,
    /// Unix seconds after which the entry no longer counts (`exp` plus the clock skew).
    pub valid_until: i64,
}

/// The last 8 bytes of a token, mixed (they are text: base64url spreads 6 bits over 8).
fn tail_hash(token: &[u8]) -> u64 {
    let tail = &token[token.len().saturating_sub(8)..];
    let mut h = 0u64;
    for (i, b) in tail.iter().enumerate() {
        h |= u64::from(*b) << (8 * i);
    }
    h.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Hashes a token key by its tail (the first write of bytes is the token; the slice's length
/// prefix is ignored).
#[derive(Default)]
struct TailHasher {
    hash: u64,
    written: bool,
}

impl Hasher for TailHasher {
    fn finish(&self) -> u64 {
        self.hash
    }
    fn write(&mut self, bytes: &[u8]) {
        if !std::mem::replace(&mut self.written, true) {
            self.hash = tail_hash(bytes);
        }
    }
    fn write_usize(&mut self, _length_prefix: usize) {}
}

/// One shard: tokens and how many bytes they hold.
#[derive(Default)]
struct Shard {
    map: HashMap<Box<[u8]>, Arc<Verified>, BuildHasherDefault<TailHasher>>,
    bytes: usize,
}

impl Shard {
    fn remove(&mut self, token: &[u8]) {
        if self.map.remove(token).is_some() {
            self.bytes -= token.len();
        }
    }
}

/// The bounded cache of one guard.
pub(crate) struct TokenCache {
    shards: Box<[RwLock<Shard>]>,
    per_shard: usize,
    bytes_per_shard: usize,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("len", &self.len()).finish()
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::sharded(CAPACITY, CAPACITY_BYTES, SHARDS)
    }
}

impl TokenCache {
    fn sharded(capacity: usize, bytes: usize, shards: usize) -> Self {
        TokenCache {
            shards: (0..shards).map(|_| RwLock::new(Shard::default())).collect(),
            per_shard: capacity.div_ceil(shards).max(1),
            bytes_per_shard: bytes.div_ceil(shards).max(1),
        }
    }

    /// A cache of at most `capacity` entries (rounded up to a multiple of the shard count).
    #[cfg(test)]
    pub fn with_capacity(capacity: usize) -> Self {
        Self::sharded(capacity, CAPACITY_BYTES, SHARDS)
    }

    fn shard(&self, token: &[u8]) -> &RwLock<Shard> {
        // The hash's high half: the map's own buckets and tags use other bits.
        let mixed = (tail_hash(token) >> 32) as usize;
        &self.shards[mixed % self.shards.len()]
    }

    /// The verification of exactly this token, if remembered and still valid at `now`.
    pub fn get(&self, token: &[u8], now: i64) -> Option<Arc<Verified>> {
        let found = self.shard(token).read().map.get(token).cloned()?;
        if now > found.valid_until {
            self.shard(token).write().remove(token);
            return None;
        }
        Some(found)
    }

    /// Remembers a verification; a full shard makes room first. A token larger than a shard's
    /// share of [`CAPACITY_BYTES`] is never remembered.
    pub fn insert(&self, token: &[u8], verified: Arc<Verified>, now: i64) {
        if token.is_empty() || token.len() > self.bytes_per_shard {
            return;
        }
        let mut shard = self.shard(token).write();
        shard.remove(token);
        let full = |s: &Shard| s.map.len() >= self.per_shard || s.bytes + token.len() > self.bytes_per_shard;
        if full(&shard) {
            shard.map.retain(|_, v| v.valid_until >= now);
            shard.bytes = shard.map.keys().map(|k| k.len()).sum();
        }
        while full(&shard) {
            let victim = rand::random_range(0..shard.map.len());
            let Some(key) = shard.map.keys().nth(victim).cloned() else { break };
            shard.remove(&key);
        }
        shard.bytes += token.len();
        shard.map.insert(token.into(), verified);
    }

    /// How many verifications are remembered.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().map.len()).sum()
    }

    /// How many bytes of tokens are remembered.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.read().bytes).sum()
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
        let token = |i: u64| format!("a.b.{:016x}", i.wrapping_mul(0x2545_F491_4F6C_DD1D)).into_bytes();
        for i in 0..10_000 {
            cache.insert(&token(i), verified(2_000), 1_000);
        }
        assert!(cache.len() <= 160, "{}", cache.len());
        assert!(cache.len() >= 150, "a full cache stays (nearly) full: {}", cache.len());
        // The last token is there; an early one was evicted.
        assert!(cache.get(&token(9_999), 1_000).is_some());
        let early = (0..100).filter(|i| cache.get(&token(*i), 1_000).is_some());
        assert!(early.count() < 10);
    }

    #[test]
    fn large_tokens_are_bounded_by_bytes_too() {
        let cache = TokenCache::sharded(10_000, 64 * 1024, 1);
        let token =
            |i: u64| format!("{}.{:016x}", "p".repeat(4_000), i.wrapping_mul(0x2545_F491_4F6C_DD1D)).into_bytes();
        for i in 0..1_000 {
            cache.insert(&token(i), verified(2_000), 1_000);
        }
        assert!(cache.bytes() <= 64 * 1024, "{}", cache.bytes());
        let fit = 64 * 1024 / token(0).len();
        assert_eq!(cache.len(), fit, "as many as fit");
        assert_eq!(cache.bytes(), fit * token(0).len(), "the byte count follows removals");
        assert!(cache.get(&token(999), 1_000).is_some());
        cache.insert(&b"x".repeat(65 * 1024), verified(2_000), 1_000);
        assert!(cache.get(&b"x".repeat(65 * 1024), 1_000).is_none(), "larger than the budget: not kept");
    }

    #[test]
    fn entries_end_when_the_token_expires_and_expired_ones_go_first() {
        let cache = TokenCache::sharded(4, CAPACITY_BYTES, 1);
        cache.insert(b"a.b.c", verified(1_060), 1_000);
        assert!(cache.get(b"a.b.c", 1_060).is_some());
        assert!(cache.get(b"a.b.c", 1_061).is_none(), "past its time");
        assert_eq!(cache.len(), 0, "and forgotten");
        assert_eq!(cache.bytes(), 0);
        // A full shard drops its expired entries before any live one.
        cache.insert(b"x.y.live", verified(5_000), 1_000);
        for i in 0..3 {
            cache.insert(format!("x.y.old-{i}").as_bytes(), verified(1_500), 1_000);
        }
        assert_eq!(cache.len(), 4);
        cache.insert(b"x.y.new", verified(5_000), 2_000);
        assert_eq!(cache.len(), 2, "expired entries swept when a shard filled");
        assert!(cache.get(b"x.y.live", 2_000).is_some());
    }

    #[test]
    fn a_hit_needs_the_whole_token_not_just_its_signature() {
        let cache = TokenCache::sharded(4, CAPACITY_BYTES, 1);
        cache.insert(b"head.alice.sig", verified(5_000), 1_000);
        assert!(cache.get(b"head.alice.sig", 1_000).is_some());
        assert!(cache.get(b"head.admin.sig", 1_000).is_none(), "another payload, same signature");
        assert!(cache.get(b"other.alice.sig", 1_000).is_none(), "another header, same signature");
        cache.insert(b"", verified(5_000), 1_000);
        assert_eq!(cache.len(), 1, "an empty token is never a key");
    }
}
