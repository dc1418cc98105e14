//! Waiting out busy workers.
//!
//! A worker refuses a lease (`no_capacity`) or declines a bid request
//! ([`DeclineReason::NoCapacity`](d402_protocol::messages::DeclineReason)) when all its
//! execution slots are taken. That is a moment's saturation, not a fault: the gateway asks
//! again after a backoff instead of failing (and refunding) the task, until the task's
//! deadline. The backoff doubles from [`FIRST`] to [`CAP`] with jitter, so that the tasks a
//! burst left waiting do not all come back in the same millisecond.

use std::{
    hash::{BuildHasher, Hasher},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use super::tasks::TaskRecord;

/// The first wait after a busy refusal.
pub const FIRST: Duration = Duration::from_millis(10);

/// The longest wait between two attempts.
pub const CAP: Duration = Duration::from_millis(500);

/// How often a coordinator backed off from busy workers, since it started.
#[derive(Debug, Default)]
pub struct Backoffs {
    leases: AtomicU64,
    bid_rounds: AtomicU64,
}

/// A reading of [`Backoffs`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackoffCounts {
    /// Leases refused `no_capacity`, each leased again later (or given up at the deadline).
    pub leases: u64,
    /// Bid rounds that too many busy workers declined, each asked again later.
    pub bid_rounds: u64,
}

impl Backoffs {
    /// Counts `n` leases refused for want of a free slot.
    pub fn lease(&self, n: u64) {
        self.leases.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a bid round asked again.
    pub fn bid_round(&self) {
        self.bid_rounds.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> BackoffCounts {
        BackoffCounts {
            leases: self.leases.load(Ordering::Relaxed),
            bid_rounds: self.bid_rounds.load(Ordering::Relaxed),
        }
    }
}

/// How long to wait after the `attempts`-th busy refusal in a row (1 for the first): from
/// [`FIRST`], doubling, at most [`CAP`], then plus up to half of that at random.
pub fn backoff(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    let base = FIRST.saturating_mul(1 << doublings).min(CAP);
    let half = base.as_micros() as u64 / 2;
    base + Duration::from_micros(random() % half.max(1))
}

/// A random number from the standard library's per-process hash keys (enough for jitter;
/// no cryptographic use).
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(super::now_ms());
    h.finish()
}

/// When the earliest bid of `r` set aside after a busy refusal may be leased again (at
/// `now` or later), if one may be before the task's deadline and before the bid lapses.
pub fn next_retry(r: &TaskRecord, now: u64) -> Option<u64> {
    r.bids
        .iter()
        .filter(|b| {
            !b.used
                && b.retry_at != 0
                && b.retry_at < r.spec.deadline
                && b.retry_at < b.bid.body.expires_at
                && now < b.bid.body.expires_at
        })
        .map(|b| b.retry_at)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_at_most_half_again_of_jitter() {
        for (attempts, base_ms) in [(0, 10), (1, 10), (2, 20), (3, 40), (6, 320), (7, 500)] {
            for _ in 0..50 {
                let d = backoff(attempts);
                let base = Duration::from_millis(base_ms);
                assert!(d >= base && d < base + base / 2, "{attempts}: {d:?}");
            }
        }
        assert!(backoff(u32::MAX) < CAP + CAP / 2);
    }

    #[test]
    fn jitter_varies() {
        let seen: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(5)).collect();
        assert!(seen.len() > 1);
    }
}
