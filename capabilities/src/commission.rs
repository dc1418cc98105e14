//! Creator commission math, shared by registrations, policy and settlement.
//!
//! For a gross worker payout `W` (in the asset's smallest unit) and a commission of `b`
//! basis points, the creator receives `floor(W * b / 10000)` and the worker the rest. The
//! product is computed in `u128`, so no `u64` payout can overflow. Rounding always favours
//! the worker, and the two parts always add up to `W` exactly.

use crate::error::{CapabilityError, Result};

/// Basis points in one whole (100%).
pub const BPS_DENOMINATOR: u16 = 10_000;

/// A payout split into the creator's commission and the worker's net.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// `floor(gross * bps / 10000)`.
    pub creator: u64,
    /// `gross - creator`.
    pub worker_net: u64,
}

/// Checks that `bps` is at most 10000.
pub fn check_bps(bps: u16) -> Result<()> {
    if bps > BPS_DENOMINATOR {
        return Err(CapabilityError::invalid(
            "creator_commission_bps",
            format!("{bps} is above {BPS_DENOMINATOR} (100%)"),
        ));
    }
    Ok(())
}

/// Splits a gross worker payout by a commission in basis points.
pub fn split(gross: u64, bps: u16) -> Result<Split> {
    check_bps(bps)?;
    let creator = (u128::from(gross) * u128::from(bps) / u128::from(BPS_DENOMINATOR)) as u64;
    Ok(Split {
        creator,
        worker_net: gross - creator,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(
            split(10_000, 1000).unwrap(),
            Split {
                creator: 1000,
                worker_net: 9000
            }
        );
        assert_eq!(
            split(9, 1000).unwrap(),
            Split {
                creator: 0,
                worker_net: 9
            }
        );
        assert_eq!(
            split(u64::MAX, 10_000).unwrap(),
            Split {
                creator: u64::MAX,
                worker_net: 0
            }
        );
        assert_eq!(
            split(u64::MAX, 0).unwrap(),
            Split {
                creator: 0,
                worker_net: u64::MAX
            }
        );
        assert!(split(1, 10_001).is_err());
    }

    proptest! {
        #[test]
        fn parts_add_up_and_floor(gross in any::<u64>(), bps in 0u16..=10_000) {
            let s = split(gross, bps).unwrap();
            prop_assert_eq!(u128::from(s.creator) + u128::from(s.worker_net), u128::from(gross));
            let exact = u128::from(gross) * u128::from(bps);
            prop_assert!(u128::from(s.creator) * 10_000 <= exact);
            prop_assert!(exact < (u128::from(s.creator) + 1) * 10_000);
        }

        #[test]
        fn monotonic_in_bps(gross in any::<u64>(), a in 0u16..=10_000, b in 0u16..=10_000) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(split(gross, lo).unwrap().creator <= split(gross, hi).unwrap().creator);
        }
    }
}
