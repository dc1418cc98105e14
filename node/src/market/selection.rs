//! Choosing which bids to lease.
//!
//! Bids are ranked by effective price, the asked price divided by the worker's reputation
//! score (so a worker with half the score must ask half the price to rank equal), then by
//! price, then by worker key for a deterministic order. Bids above the per-worker share of
//! the budget, from banned workers, or from workers below the minimum score are not chosen.
//! The first `fanout` of the rest are; each bid not chosen gets a reason ("why idle").

use serde::Serialize;

use super::reputation::{FULL_SCORE, Ineligible};

/// A bid as selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<W> {
    /// The worker.
    pub worker: W,
    /// Asked price, smallest units.
    pub price: u64,
    /// The worker's reputation score (ppm).
    pub score: u32,
    /// Why the worker may not be leased, from its reputation.
    pub ineligible: Option<Ineligible>,
}

/// Why a bid was not chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum NotChosen {
    /// The price is above the per-worker share of the budget.
    OverBudget {
        /// Asked.
        price: u64,
        /// The most the gateway pays one worker.
        max: u64,
    },
    /// Not eligible by reputation.
    Reputation(Ineligible),
    /// Enough better-ranked bids were chosen.
    Outranked,
}

/// The outcome of a selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection<W> {
    /// Chosen bids, best first (the first is the primary: it takes the snapshot).
    pub chosen: Vec<Candidate<W>>,
    /// Bids passed over, each with the reason; still usable as replacements, best first,
    /// when the reason is [`NotChosen::Outranked`].
    pub passed: Vec<(Candidate<W>, NotChosen)>,
}

/// The most one worker may be paid so that `fanout` workers fit in `budget`.
pub fn per_worker_max(budget: u64, fanout: usize) -> u64 {
    budget / (fanout.max(1) as u64)
}

fn rank_key<W: Ord + Clone>(c: &Candidate<W>) -> (u128, u64, W) {
    let score = u128::from(c.score.max(1));
    let effective = u128::from(c.price) * u128::from(FULL_SCORE) / score;
    (effective, c.price, c.worker.clone())
}

/// Chooses up to `fanout` bids whose price is at most `max_price`.
pub fn select<W: Ord + Clone>(
    mut candidates: Vec<Candidate<W>>,
    fanout: usize,
    max_price: u64,
) -> Selection<W> {
    candidates.sort_by_key(rank_key);
    let mut chosen = Vec::new();
    let mut passed = Vec::new();
    for c in candidates {
        if c.price > max_price {
            let reason = NotChosen::OverBudget {
                price: c.price,
                max: max_price,
            };
            passed.push((c, reason));
        } else if let Some(why) = c.ineligible {
            passed.push((c, NotChosen::Reputation(why)));
        } else if chosen.len() < fanout {
            chosen.push(c);
        } else {
            passed.push((c, NotChosen::Outranked));
        }
    }
    Selection { chosen, passed }
}

impl NotChosen {
    /// A stable code first, then details: what the gateway records for the bidder.
    pub fn describe(&self) -> String {
        match self {
            NotChosen::OverBudget { price, max } => {
                format!("over_budget: asks {price}, at most {max} per worker")
            }
            NotChosen::Reputation(Ineligible::Banned { until }) => {
                format!("banned: until {until} (Unix ms)")
            }
            NotChosen::Reputation(Ineligible::LowScore { score, min }) => {
                format!("low_score: {score} ppm, below {min}")
            }
            NotChosen::Outranked => "outranked: enough better-ranked bids".into(),
        }
    }
}

impl<W> Selection<W> {
    /// Replacement bids for leases that fail, best first.
    pub fn replacements(&self) -> impl Iterator<Item = &Candidate<W>> {
        self.passed
            .iter()
            .filter(|(_, why)| *why == NotChosen::Outranked)
            .map(|(c, _)| c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(worker: u8, price: u64, score: u32) -> Candidate<u8> {
        Candidate {
            worker,
            price,
            score,
            ineligible: None,
        }
    }

    #[test]
    fn cheapest_trusted_first_within_budget() {
        let sel = select(
            vec![
                c(1, 300, FULL_SCORE),
                c(2, 100, FULL_SCORE),
                c(3, 200, FULL_SCORE),
                c(4, 900, FULL_SCORE),
            ],
            2,
            500,
        );
        let chosen: Vec<u8> = sel.chosen.iter().map(|c| c.worker).collect();
        assert_eq!(chosen, vec![2, 3]);
        assert_eq!(sel.passed[0].1, NotChosen::Outranked);
        assert_eq!(
            sel.passed[1].1,
            NotChosen::OverBudget {
                price: 900,
                max: 500
            }
        );
        assert_eq!(
            sel.replacements().map(|c| c.worker).collect::<Vec<_>>(),
            vec![1]
        );
    }

    #[test]
    fn reputation_weighs_price() {
        // Worker 1 is cheaper but half as trusted: effective 300 vs 200.
        let sel = select(
            vec![c(1, 150, FULL_SCORE / 2), c(2, 200, FULL_SCORE)],
            1,
            1000,
        );
        assert_eq!(sel.chosen[0].worker, 2);
    }

    #[test]
    fn banned_workers_are_passed_with_reason() {
        let mut banned = c(1, 1, FULL_SCORE);
        banned.ineligible = Some(Ineligible::Banned { until: 99 });
        let sel = select(vec![banned, c(2, 5, FULL_SCORE)], 3, 10);
        assert_eq!(sel.chosen.len(), 1);
        assert_eq!(
            sel.passed[0].1,
            NotChosen::Reputation(Ineligible::Banned { until: 99 })
        );
    }

    #[test]
    fn budget_share() {
        assert_eq!(per_worker_max(10_000, 3), 3_333);
        assert_eq!(per_worker_max(10_000, 0), 10_000);
    }

    #[test]
    fn order_is_deterministic_on_ties() {
        let sel = select(vec![c(9, 100, FULL_SCORE), c(3, 100, FULL_SCORE)], 1, 100);
        assert_eq!(sel.chosen[0].worker, 3);
    }
}
