//! Assets and decimal amounts: `--gateway-price '$0.01'` to integer smallest units, by hand.
//!
//! Money is never a float. A decimal text such as `0.01` (optionally prefixed by `$`) is
//! parsed digit by digit into a count of the asset's smallest unit (`10_000` for USDC with 6
//! decimals). Refused: an empty text, a sign (`-1`, `+1`), an exponent (`1e-2`), more
//! fraction digits than the asset has (`0.0000001` for 6 decimals, even `0.0100000`), a bare
//! dot (`.5`, `5.`), separators (`1,000`, `1_000`), whitespace inside, and anything that
//! overflows `u64`.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use d402_protocol::types::MAX_ASSET;

/// Most decimals an asset may have: `10^19` no longer fits in a `u64`.
pub const MAX_DECIMALS: u8 = 19;

/// Longest amount text accepted.
pub const MAX_AMOUNT_TEXT: usize = 64;

/// Why an amount text was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AmountError {
    /// Nothing but (perhaps) a `$`.
    #[error("the amount is empty")]
    Empty,
    /// Longer than [`MAX_AMOUNT_TEXT`].
    #[error("the amount is longer than {MAX_AMOUNT_TEXT} characters")]
    TooLong,
    /// A leading `-` (or `+`): amounts are non-negative and unsigned.
    #[error("{0:?}: amounts cannot carry a sign")]
    Signed(String),
    /// Scientific notation.
    #[error("{0:?}: exponent forms are not accepted; write the decimal out, e.g. 0.01")]
    Exponent(String),
    /// Not `digits[.digits]`.
    #[error("{0:?} is not a decimal amount like 0.01 or $0.01")]
    Malformed(String),
    /// More fraction digits than the asset's decimals.
    #[error("{input:?} has {found} decimal places; the asset has {decimals}")]
    TooManyDecimals {
        /// The text.
        input: String,
        /// Fraction digits given.
        found: usize,
        /// The asset's decimals.
        decimals: u8,
    },
    /// The value does not fit in a `u64` of smallest units.
    #[error("{0:?} is too large")]
    Overflow(String),
    /// The asset's decimals are above [`MAX_DECIMALS`].
    #[error("an asset with {0} decimals is not supported (at most {MAX_DECIMALS})")]
    UnsupportedDecimals(u8),
}

/// An asset a rail settles in: its id on the rail, display symbol and decimals.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Asset {
    /// The id used in x402 terms and receipts: `local:USDC`, an SPL mint, an ERC-20 address.
    pub id: String,
    /// Display symbol, e.g. `USDC`.
    pub symbol: String,
    /// Decimals: one whole unit is `10^decimals` smallest units.
    pub decimals: u8,
}

impl Asset {
    /// The `local` rail's dollar: id `local:USDC`, 6 decimals.
    pub fn local_usdc() -> Asset {
        Asset {
            id: "local:USDC".to_string(),
            symbol: "USDC".to_string(),
            decimals: 6,
        }
    }

    /// Checks the id and the decimals.
    pub fn validate(&self) -> Result<(), AmountError> {
        if self.decimals > MAX_DECIMALS {
            return Err(AmountError::UnsupportedDecimals(self.decimals));
        }
        if self.id.is_empty() || self.id.len() > MAX_ASSET {
            return Err(AmountError::Malformed(self.id.clone()));
        }
        Ok(())
    }

    /// Parses a decimal text in this asset to smallest units.
    pub fn parse(&self, text: &str) -> Result<u64, AmountError> {
        parse_decimal(text, self.decimals)
    }

    /// Formats smallest units as a decimal text (see [`format_decimal`]).
    pub fn format(&self, units: u64) -> String {
        format_decimal(units, self.decimals)
    }

    /// `units` as a [`d402_protocol::Amount`] of this asset.
    pub fn amount(&self, units: u64) -> d402_protocol::Amount {
        d402_protocol::Amount {
            asset: self.id.clone(),
            units,
        }
    }
}

impl fmt::Display for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {} decimals)",
            self.symbol, self.id, self.decimals
        )
    }
}

/// Parses `[$]digits[.digits]` into smallest units of an asset with `decimals` decimals.
///
/// Surrounding whitespace is ignored; see the module docs for what is refused.
pub fn parse_decimal(input: &str, decimals: u8) -> Result<u64, AmountError> {
    if decimals > MAX_DECIMALS {
        return Err(AmountError::UnsupportedDecimals(decimals));
    }
    if input.len() > MAX_AMOUNT_TEXT {
        return Err(AmountError::TooLong);
    }
    let text = input.trim();
    let body = text.strip_prefix('$').unwrap_or(text);
    if body.is_empty() {
        return Err(AmountError::Empty);
    }
    if body.starts_with(['-', '+']) || text.starts_with(['-', '+']) {
        return Err(AmountError::Signed(input.to_string()));
    }
    if body.contains(['e', 'E']) {
        return Err(AmountError::Exponent(input.to_string()));
    }
    let (whole, frac) = match body.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (body, None),
    };
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || frac.is_some_and(|f| !all_digits(f)) {
        return Err(AmountError::Malformed(input.to_string()));
    }
    let frac = frac.unwrap_or("");
    if frac.len() > usize::from(decimals) {
        return Err(AmountError::TooManyDecimals {
            input: input.to_string(),
            found: frac.len(),
            decimals,
        });
    }
    let overflow = || AmountError::Overflow(input.to_string());
    let mut units: u64 = 0;
    // Whole digits, then the fraction digits, then zeros up to `decimals`: one base-10
    // number of smallest units, built with checked arithmetic.
    let padding = usize::from(decimals) - frac.len();
    for b in whole
        .bytes()
        .chain(frac.bytes())
        .chain(std::iter::repeat_n(b'0', padding))
    {
        units = units
            .checked_mul(10)
            .and_then(|u| u.checked_add(u64::from(b - b'0')))
            .ok_or_else(overflow)?;
    }
    Ok(units)
}

/// Formats `units` of an asset with `decimals` decimals, without trailing fraction zeros:
/// `10_000` with 6 decimals is `0.01`, `1_000_000` is `1`.
pub fn format_decimal(units: u64, decimals: u8) -> String {
    let digits = units.to_string();
    let d = usize::from(decimals);
    if d == 0 {
        return digits;
    }
    let padded = if digits.len() <= d {
        format!("{}{digits}", "0".repeat(d + 1 - digits.len()))
    } else {
        digits
    };
    let (whole, frac) = padded.split_at(padded.len() - d);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        whole.to_string()
    } else {
        format!("{whole}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prices_and_budgets_parse() {
        assert_eq!(parse_decimal("$0.01", 6), Ok(10_000));
        assert_eq!(parse_decimal("0.01", 6), Ok(10_000));
        assert_eq!(parse_decimal(" $1 ", 6), Ok(1_000_000));
        assert_eq!(parse_decimal("1.5", 6), Ok(1_500_000));
        assert_eq!(parse_decimal("0.000001", 6), Ok(1));
        assert_eq!(parse_decimal("0", 6), Ok(0));
        assert_eq!(parse_decimal("007", 0), Ok(7));
        assert_eq!(parse_decimal("18446744073709.551615", 6), Ok(u64::MAX));
        assert_eq!(parse_decimal("18446744073709551615", 0), Ok(u64::MAX));
        assert_eq!(parse_decimal("1.8446744073709551615", 19), Ok(u64::MAX));
        assert_eq!(Asset::local_usdc().parse("$0.25"), Ok(250_000));
    }

    #[test]
    fn bad_amounts_are_refused_with_reasons() {
        use AmountError::*;
        type Check = fn(&AmountError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, Empty)),
            ("$", |e| matches!(e, Empty)),
            ("-0.01", |e| matches!(e, Signed(_))),
            ("$-0.01", |e| matches!(e, Signed(_))),
            ("+1", |e| matches!(e, Signed(_))),
            ("1e-2", |e| matches!(e, Exponent(_))),
            ("1E6", |e| matches!(e, Exponent(_))),
            ("0.0000001", |e| {
                matches!(e, TooManyDecimals { found: 7, .. })
            }),
            ("0.0100000", |e| {
                matches!(e, TooManyDecimals { found: 7, .. })
            }),
            (".5", |e| matches!(e, Malformed(_))),
            ("5.", |e| matches!(e, Malformed(_))),
            ("1,000", |e| matches!(e, Malformed(_))),
            ("1_000", |e| matches!(e, Malformed(_))),
            ("1 000", |e| matches!(e, Malformed(_))),
            ("0x10", |e| matches!(e, Malformed(_))),
            ("1.2.3", |e| matches!(e, Malformed(_))),
            ("$$1", |e| matches!(e, Malformed(_))),
            ("NaN", |e| matches!(e, Malformed(_))),
            ("inf", |e| matches!(e, Malformed(_))),
            ("١", |e| matches!(e, Malformed(_))),
            ("18446744073709.551616", |e| matches!(e, Overflow(_))),
            ("99999999999999999999", |e| matches!(e, Overflow(_))),
        ];
        for (text, want) in cases {
            let err = parse_decimal(text, 6).expect_err(text);
            assert!(want(&err), "{text:?} gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
        assert_eq!(parse_decimal(&"1".repeat(65), 6), Err(TooLong));
        assert_eq!(parse_decimal("1", 20), Err(UnsupportedDecimals(20)));
        assert_eq!(
            parse_decimal("1.5", 0).unwrap_err().to_string(),
            "\"1.5\" has 1 decimal places; the asset has 0"
        );
    }

    #[test]
    fn formats_without_trailing_zeros() {
        assert_eq!(format_decimal(10_000, 6), "0.01");
        assert_eq!(format_decimal(1_000_000, 6), "1");
        assert_eq!(format_decimal(1_500_001, 6), "1.500001");
        assert_eq!(format_decimal(0, 6), "0");
        assert_eq!(format_decimal(7, 0), "7");
        assert_eq!(format_decimal(u64::MAX, 19), "1.8446744073709551615");
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(units in any::<u64>(), decimals in 0u8..=19) {
            let text = format_decimal(units, decimals);
            prop_assert_eq!(parse_decimal(&text, decimals), Ok(units));
            prop_assert_eq!(parse_decimal(&format!("${text}"), decimals), Ok(units));
        }

        #[test]
        fn never_panics(text in "\\PC{0,40}", decimals in 0u8..=25) {
            let _ = parse_decimal(&text, decimals);
        }
    }
}
