//! Token buckets as GCRA (the generic cell rate algorithm): a bucket is one `u64`, the
//! theoretical arrival time (TAT) of the next request, so it is updated with one
//! compare-and-swap and needs no refill timer. It is exactly a token bucket of `burst` tokens
//! refilled one every `interval`: a request is admitted when the TAT after it lies no more than
//! `burst` intervals ahead of now. A refused request changes nothing, so load above the limit
//! is admitted at exactly the limit, whatever the load.
//!
//! Times are nanoseconds from an epoch the caller keeps (the guard's compile time), passed in,
//! so the arithmetic is tested with any clock.
//!
//! Keyed buckets live in shards (a mutex each, chosen by a hash seeded at random, so no caller
//! can aim at one), bounded to `max_keys` in all. The hash is foldhash, not SipHash: a shard's
//! map holds at most a few hundred keys, so colliding keys cost a bounded probe, and SipHash's
//! two hashes per request were 500 instructions (`bench/instructions`). A full shard first forgets the buckets that have
//! refilled (they hold nothing: a new bucket is full too), then the one nearest to full. So a
//! flood of new keys forgets the flood's own buckets before those of callers being limited, and
//! the heap never grows past the bound.

use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// A rate: `burst` requests at once, refilled at one per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Nanoseconds per request.
    interval: u64,
    /// How far ahead of now a TAT may run: `burst` intervals.
    tolerance: u64,
}

impl Rate {
    /// `requests` per `per`, up to `burst` at once. `requests` and `burst` are at least 1
    /// (checked when the limit compiles).
    pub fn new(requests: u32, per: Duration, burst: u32) -> Rate {
        let per = u64::try_from(per.as_nanos()).unwrap_or(u64::MAX);
        let interval = (per / u64::from(requests.max(1))).max(1);
        Rate { interval, tolerance: interval.saturating_mul(u64::from(burst.max(1))) }
    }

    /// A request at `now` to a bucket at `tat`: the bucket's next TAT, or how many nanoseconds
    /// until a request would be admitted.
    fn admit(&self, tat: u64, now: u64) -> Result<u64, u64> {
        let next = tat.max(now).saturating_add(self.interval);
        let ahead = next - now;
        if ahead > self.tolerance { Err(ahead - self.tolerance) } else { Ok(next) }
    }
}

/// One bucket shared by every request (a limit of the whole workload): lock-free.
#[derive(Debug, Default)]
pub struct Bucket(AtomicU64);

impl Bucket {
    /// Takes a token at `now`, or says how long until one is there.
    pub fn take(&self, rate: &Rate, now: u64) -> Result<(), u64> {
        let mut tat = self.0.load(Ordering::Relaxed);
        loop {
            let next = rate.admit(tat, now)?;
            match self.0.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }
}

/// Shards are sized to about this many keys: few enough that a full shard's eviction scan is
/// short, many enough that a shard's map is not mostly overhead.
const KEYS_PER_SHARD: usize = 128;
/// More shards than this only add memory; the bound stays exact either way.
const MAX_SHARDS: usize = 4096;

/// One shard's buckets: key → TAT.
type Shard = HashMap<Box<[u8]>, u64, RandomState>;

/// Buckets by key, at most `max_keys` of them.
#[derive(Debug)]
pub struct KeyedBuckets {
    /// Picks a key's shard; independent of the maps' own hashers, so that keys of one shard
    /// do not also cluster inside its map.
    shard_of: RandomState,
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
}

impl KeyedBuckets {
    /// Room for `max_keys` keys (at least 1).
    pub fn new(max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        let count = (max_keys / KEYS_PER_SHARD).clamp(1, MAX_SHARDS);
        KeyedBuckets {
            shard_of: RandomState::default(),
            shards: (0..count).map(|_| Mutex::new(HashMap::default())).collect(),
            per_shard: max_keys / count,
        }
    }

    /// Takes a token from `key`'s bucket at `now`, or says how long until one is there. Only a
    /// key seen for the first time allocates.
    pub fn take(&self, key: &[u8], rate: &Rate, now: u64) -> Result<(), u64> {
        let shard = (self.shard_of.hash_one(key) % self.shards.len() as u64) as usize;
        let mut map = self.shards[shard].lock();
        if let Some(tat) = map.get_mut(key) {
            *tat = rate.admit(*tat, now)?;
            return Ok(());
        }
        let next = rate.admit(0, now)?;
        if map.len() >= self.per_shard {
            evict(&mut map, self.per_shard, now);
        }
        map.insert(key.into(), next);
        Ok(())
    }

    /// How many keys are held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// The most keys ever held at once.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }
}

/// Makes room for one key in a full shard: buckets that have refilled go first, else the one
/// nearest to full (the least to lose: its caller regains the fewest tokens).
fn evict(map: &mut Shard, room: usize, now: u64) {
    map.retain(|_, tat| *tat > now);
    if map.len() < room {
        return;
    }
    if let Some(nearest) = map.values().copied().min() {
        map.extract_if(|_, tat| *tat == nearest).next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_full_bucket_admits_its_burst_then_one_per_interval() {
        let rate = Rate::new(10, Duration::from_secs(1), 3);
        let b = Bucket::default();
        let now = 5 * SEC;
        for _ in 0..3 {
            b.take(&rate, now).unwrap();
        }
        // The fourth waits one interval (100 ms) for a token.
        assert_eq!(b.take(&rate, now), Err(SEC / 10));
        assert_eq!(b.take(&rate, now + SEC / 10 - 1), Err(1));
        b.take(&rate, now + SEC / 10).unwrap();
        assert!(b.take(&rate, now + SEC / 10).is_err());
        // Idle for a long time: the bucket is full again, and no fuller than the burst.
        let later = now + 3600 * SEC;
        for _ in 0..3 {
            b.take(&rate, later).unwrap();
        }
        assert!(b.take(&rate, later).is_err());
    }

    #[test]
    fn load_above_the_limit_is_admitted_at_exactly_the_limit() {
        // 50/s with a burst of 5, offered 1000/s for 10 s: 5 + 10 * 50 admitted.
        let rate = Rate::new(50, Duration::from_secs(1), 5);
        let b = Bucket::default();
        let admitted = (0..10_000u64).filter(|i| b.take(&rate, i * SEC / 1000).is_ok()).count();
        assert_eq!(admitted, 5 + 10 * 50 - 1, "the 500th refill is due at 10 s, just after the load");
    }

    #[test]
    fn per_minute_and_per_hour_rates_wait_their_interval() {
        let rate = Rate::new(2, Duration::from_secs(3600), 1);
        let b = Bucket::default();
        b.take(&rate, 0).unwrap();
        assert_eq!(b.take(&rate, 0), Err(1800 * SEC));
        let rate = Rate::new(u32::MAX, Duration::from_secs(1), u32::MAX);
        assert!(Bucket::default().take(&rate, 0).is_ok(), "no overflow at the extremes");
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let rate = Rate::new(1, Duration::from_secs(1), 1);
        let keyed = KeyedBuckets::new(100);
        keyed.take(b"a", &rate, SEC).unwrap();
        assert!(keyed.take(b"a", &rate, SEC).is_err());
        keyed.take(b"b", &rate, SEC).unwrap();
        assert_eq!(keyed.len(), 2);
    }

    #[test]
    fn a_key_flood_stays_within_the_bound_and_keeps_limited_callers_limited() {
        let rate = Rate::new(1, Duration::from_secs(60), 2);
        let keyed = KeyedBuckets::new(1000);
        assert!(keyed.capacity() <= 1000);
        // A caller spends its burst and is limited.
        keyed.take(b"heavy", &rate, 0).unwrap();
        keyed.take(b"heavy", &rate, 0).unwrap();
        assert!(keyed.take(b"heavy", &rate, 0).is_err());
        // A flood of 100 000 new keys, one request each, within the same second.
        for i in 0..100_000u32 {
            keyed.take(&i.to_be_bytes(), &rate, u64::from(i) * 1000).unwrap();
            assert!(keyed.len() <= 1000, "{} keys after {i}", keyed.len());
        }
        assert!(keyed.len() > 900, "the bound is used, not undershot: {}", keyed.len());
        // The flood's buckets were nearer to full, so they went first.
        assert!(keyed.take(b"heavy", &rate, SEC).is_err(), "the limited caller is still limited");
    }

    #[test]
    fn refilled_buckets_are_forgotten_first() {
        let rate = Rate::new(1, Duration::from_secs(1), 1);
        let keyed = KeyedBuckets::new(2);
        keyed.take(b"old", &rate, 0).unwrap();
        keyed.take(b"busy", &rate, 10 * SEC).unwrap();
        // "old" refilled long ago: making room forgets it, not "busy".
        keyed.take(b"new", &rate, 10 * SEC).unwrap();
        assert_eq!(keyed.len(), 2);
        assert!(keyed.take(b"busy", &rate, 10 * SEC).is_err());
    }
}
