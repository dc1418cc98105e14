//! Worker reputation: counters per worker, a score that drives selection, and bans.
//!
//! Counters: accepted (agreed with the quorum), rejected (disagreed with it), timed out
//! (leased and never claimed in time) and declined (answered a bid request with a decline).
//! The score is an integer in parts per million so that it is exact and stable:
//!
//! ```text
//! score = 1_000_000 * (accepted + 1) / (accepted + 1 + 4 * rejected + 2 * timed_out)
//! ```
//!
//! A new worker starts at 1,000,000 (full trust, since its first leases are checked by the
//! quorum anyway); a disagreement costs four times what an agreement earns, a time-out twice.
//! Declines are honest answers and do not lower the score. A worker whose last
//! [`Policy::ban_after`] claims in a row were rejected is banned for [`Policy::ban_for_ms`],
//! doubled for each further ban. The table is persisted in the node's redb (`reputation`).

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::state::{State, StateError, decode, encode};

/// Reputation rows: worker public key (32 bytes) → CBOR of [`Record`].
pub const REPUTATION: TableDefinition<&[u8], &[u8]> = TableDefinition::new("reputation");

/// Largest encoded [`Record`].
const MAX_RECORD: usize = 256;

/// Score of a worker with a perfect (or empty) record.
pub const FULL_SCORE: u32 = 1_000_000;

/// What happened in one interaction with a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its claim agreed with the accepted result.
    Accepted,
    /// Its claim disagreed with the accepted result.
    Rejected,
    /// It was leased and did not claim in time.
    TimedOut,
    /// It declined a bid request.
    Declined,
}

/// Thresholds of the reputation system.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Workers scoring below this are not leased.
    pub min_score: u32,
    /// Consecutive rejected claims that get a worker banned.
    pub ban_after: u32,
    /// First ban length in milliseconds; each further ban doubles it (capped at 30 days).
    pub ban_for_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_score: 300_000,
            ban_after: 3,
            ban_for_ms: 60 * 60 * 1000,
        }
    }
}

/// One worker's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Claims that agreed with the quorum.
    pub accepted: u64,
    /// Claims that disagreed with it.
    pub rejected: u64,
    /// Leases that expired without a claim.
    pub timed_out: u64,
    /// Bid requests declined.
    pub declined: u64,
    /// Rejections in a row (reset by an accepted claim).
    pub reject_streak: u32,
    /// How many times it has been banned.
    pub bans: u32,
    /// Banned until this time (Unix ms); 0 when not banned.
    pub banned_until: u64,
    /// Last update (Unix ms).
    pub updated_at: u64,
}

impl Record {
    /// The score in parts per million.
    pub fn score(&self) -> u32 {
        let good = u128::from(self.accepted) + 1;
        let total = good + 4 * u128::from(self.rejected) + 2 * u128::from(self.timed_out);
        (u128::from(FULL_SCORE) * good / total) as u32
    }

    /// Whether the worker is banned at `now`.
    pub fn banned_at(&self, now: u64) -> bool {
        now < self.banned_until
    }

    /// Applies an outcome at `now` under `policy`.
    pub fn apply(&mut self, outcome: Outcome, now: u64, policy: &Policy) {
        match outcome {
            Outcome::Accepted => {
                self.accepted = self.accepted.saturating_add(1);
                self.reject_streak = 0;
            }
            Outcome::Rejected => {
                self.rejected = self.rejected.saturating_add(1);
                self.reject_streak = self.reject_streak.saturating_add(1);
                if self.reject_streak >= policy.ban_after.max(1) {
                    let factor = 1u64 << self.bans.min(10);
                    let length = policy
                        .ban_for_ms
                        .saturating_mul(factor)
                        .min(30 * 24 * 60 * 60 * 1000);
                    self.banned_until = now.saturating_add(length);
                    self.bans = self.bans.saturating_add(1);
                    self.reject_streak = 0;
                }
            }
            Outcome::TimedOut => self.timed_out = self.timed_out.saturating_add(1),
            Outcome::Declined => self.declined = self.declined.saturating_add(1),
        }
        self.updated_at = now;
    }

    /// Why this worker may not be leased at `now`, if it may not.
    pub fn ineligible(&self, now: u64, policy: &Policy) -> Option<Ineligible> {
        if self.banned_at(now) {
            Some(Ineligible::Banned {
                until: self.banned_until,
            })
        } else if self.score() < policy.min_score {
            Some(Ineligible::LowScore {
                score: self.score(),
                min: policy.min_score,
            })
        } else {
            None
        }
    }
}

/// Why a worker is not eligible for a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Ineligible {
    /// Banned until the given time (Unix ms).
    Banned {
        /// End of the ban.
        until: u64,
    },
    /// Score below the minimum.
    LowScore {
        /// Its score.
        score: u32,
        /// The minimum.
        min: u32,
    },
}

/// The persisted reputation table.
#[derive(Debug, Clone)]
pub struct Reputation {
    state: State,
    policy: Policy,
}

impl Reputation {
    /// The table in `state`, with `policy`.
    pub fn new(state: State, policy: Policy) -> Reputation {
        Reputation { state, policy }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A worker's record (default when unknown).
    pub fn get(&self, worker: &[u8; 32]) -> Result<Record, StateError> {
        self.state.read(|txn| {
            let table = match txn.open_table(REPUTATION) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Record::default()),
                Err(e) => return Err(e.into()),
            };
            match table.get(&worker[..])? {
                Some(v) => decode("reputation", v.value(), MAX_RECORD),
                None => Ok(Record::default()),
            }
        })
    }

    /// Records an outcome and commits it before returning the new record.
    pub fn record(
        &self,
        worker: &[u8; 32],
        outcome: Outcome,
        now: u64,
    ) -> Result<Record, StateError> {
        self.state
            .write(|txn| self.record_in(txn, worker, outcome, now))
    }

    /// The database the table lives in.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Records an outcome inside `txn`, a write transaction of [`Reputation::state`]'s
    /// database: it commits with whatever else `txn` writes (a task's decision and the
    /// workers' outcomes in one commit).
    pub fn record_in(
        &self,
        txn: &WriteTransaction,
        worker: &[u8; 32],
        outcome: Outcome,
        now: u64,
    ) -> Result<Record, StateError> {
        let mut table = txn.open_table(REPUTATION)?;
        let mut rec: Record = match table.get(&worker[..])? {
            Some(v) => decode("reputation", v.value(), MAX_RECORD)?,
            None => Record::default(),
        };
        rec.apply(outcome, now, &self.policy);
        let bytes = encode("reputation", &rec)?;
        table.insert(&worker[..], bytes.as_slice())?;
        Ok(rec)
    }

    /// Every record, for `ops-monitor` and the admin endpoint.
    pub fn all(&self) -> Result<Vec<([u8; 32], Record)>, StateError> {
        self.state.read(|txn| {
            let table = match txn.open_table(REPUTATION) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let Ok(key) = <[u8; 32]>::try_from(k.value()) else {
                    continue;
                };
                out.push((key, decode("reputation", v.value(), MAX_RECORD)?));
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_moves_with_outcomes() {
        let p = Policy::default();
        let mut r = Record::default();
        assert_eq!(r.score(), FULL_SCORE);
        r.apply(Outcome::Accepted, 1, &p);
        assert_eq!(r.score(), FULL_SCORE);
        r.apply(Outcome::Rejected, 2, &p);
        assert_eq!(r.score(), 333_333);
        r.apply(Outcome::Declined, 3, &p);
        assert_eq!(r.score(), 333_333);
        r.apply(Outcome::TimedOut, 4, &p);
        assert_eq!(r.score(), 250_000);
        assert!(matches!(
            r.ineligible(5, &p),
            Some(Ineligible::LowScore { .. })
        ));
    }

    #[test]
    fn repeated_disagreement_bans_and_bans_grow() {
        let p = Policy {
            min_score: 0,
            ban_after: 3,
            ban_for_ms: 1000,
        };
        let mut r = Record::default();
        for t in 0..3 {
            r.apply(Outcome::Rejected, t, &p);
        }
        assert_eq!(r.banned_until, 2 + 1000);
        assert!(r.banned_at(500));
        assert!(!r.banned_at(2000));
        for t in 0..3 {
            r.apply(Outcome::Rejected, 5000 + t, &p);
        }
        assert_eq!(r.banned_until, 5002 + 2000, "second ban is twice as long");
    }

    #[test]
    fn agreement_resets_the_streak() {
        let p = Policy::default();
        let mut r = Record::default();
        r.apply(Outcome::Rejected, 0, &p);
        r.apply(Outcome::Rejected, 0, &p);
        r.apply(Outcome::Accepted, 0, &p);
        r.apply(Outcome::Rejected, 0, &p);
        assert_eq!(r.banned_until, 0);
    }

    #[test]
    fn persisted_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let w = [7u8; 32];
        {
            let rep = Reputation::new(State::open(dir.path()).unwrap(), Policy::default());
            rep.record(&w, Outcome::Accepted, 10).unwrap();
            rep.record(&w, Outcome::Rejected, 11).unwrap();
        }
        let rep = Reputation::new(State::open(dir.path()).unwrap(), Policy::default());
        let r = rep.get(&w).unwrap();
        assert_eq!((r.accepted, r.rejected, r.updated_at), (1, 1, 11));
        assert_eq!(rep.all().unwrap().len(), 1);
        assert_eq!(rep.get(&[1; 32]).unwrap(), Record::default());
    }
}
