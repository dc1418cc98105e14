use serde::{Deserialize, Serialize};

use crate::{
    Cid, Signable,
    error::{ProtocolError, Result},
    types::{Amount, CapabilityRef, RailKind, UnixMillis, Wallets, check_version, check_wallets},
};

/// What a worker sells: one capability at one manifest CID, its floor price, the rails it
/// accepts and where to pay it. Signed by the worker's node key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Body version.
    pub v: u16,
    /// The capability offered.
    pub capability: CapabilityRef,
    /// The exact manifest the worker runs.
    pub manifest_cid: Cid,
    /// The lowest price the worker bids, per task.
    pub price_floor: Amount,
    /// Rails the worker accepts payment on.
    pub rails: Vec<RailKind>,
    /// Payout wallets per chain (addresses only; the worker holds no payer key).
    pub payout: Wallets,
    /// When the offer was made.
    pub issued_at: UnixMillis,
    /// When it lapses unless renewed.
    pub expires_at: UnixMillis,
}

impl Signable for Offer {
    const DOMAIN: &'static str = "d402/offer/1";
    const KIND: &'static str = "offer";
    const MAX_BODY: usize = 8 * 1024;

    fn validate(&self) -> Result<()> {
        check_version(Self::KIND, self.v)?;
        self.capability.validate()?;
        self.price_floor.validate("price_floor")?;
        check_wallets("payout", &self.payout)?;
        if self.rails.is_empty() || self.rails.len() > RailKind::ALL.len() {
            return Err(ProtocolError::field("rails", "must list 1 to 6 rails"));
        }
        for rail in &self.rails {
            if !self.payout.contains_key(&rail.payout_chain()) {
                return Err(ProtocolError::field(
                    "payout",
                    format!("no {} wallet for rail {rail}", rail.payout_chain()),
                ));
            }
        }
        if self.expires_at <= self.issued_at {
            return Err(ProtocolError::field(
                "expires_at",
                "must be after issued_at",
            ));
        }
        Ok(())
    }
}
