use serde::{Deserialize, Serialize};

use crate::{
    Cid, Signable,
    error::{ProtocolError, Result},
    types::{Amount, RailKind, TaskId, UnixMillis, check_len, check_version},
};

/// Who a transfer pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayeeRole {
    /// An accepted worker, net of creator commission.
    Worker,
    /// The capability's creator, by its signed registration.
    Creator,
    /// The gateway's margin.
    Gateway,
    /// Back to the payer (refund or unspent budget).
    Refund,
}

/// One transfer made by settlement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Who is paid.
    pub role: PayeeRole,
    /// The recipient's address on the rail's chain.
    pub to: String,
    /// Units of the receipt's asset.
    pub units: u64,
    /// The claim the payment is for (workers and creators).
    pub claim_cid: Option<Cid>,
    /// The registration whose terms set a creator commission.
    pub registration_cid: Option<Cid>,
}

/// The gateway's signed account of how a task's payment was settled; returned to the
/// client in `PAYMENT-RESPONSE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettlementReceipt {
    /// Body version.
    pub v: u16,
    /// The task.
    pub task_id: TaskId,
    /// The rail used.
    pub rail: RailKind,
    /// The payer's address on the rail.
    pub payer: String,
    /// What the payer paid in. A refund is a [`PayeeRole::Refund`] transfer.
    pub charged: Amount,
    /// Every transfer, in order. Their sum equals `charged.units`.
    pub transfers: Vec<Transfer>,
    /// On-chain transaction ids or ledger entry ids.
    pub tx_refs: Vec<String>,
    /// When settlement completed.
    pub settled_at: UnixMillis,
}

impl Signable for SettlementReceipt {
    const DOMAIN: &'static str = "d402/receipt/1";
    const KIND: &'static str = "settlement receipt";
    const MAX_BODY: usize = 32 * 1024;

    fn validate(&self) -> Result<()> {
        check_version(Self::KIND, self.v)?;
        self.charged.validate("charged")?;
        check_len("payer", &self.payer, crate::types::MAX_WALLET)?;
        if self.transfers.len() > 64 || self.tx_refs.len() > 64 {
            return Err(ProtocolError::field("transfers", "at most 64 entries"));
        }
        let mut total: u64 = 0;
        for t in &self.transfers {
            check_len("transfers.to", &t.to, crate::types::MAX_WALLET)?;
            total = total
                .checked_add(t.units)
                .ok_or_else(|| ProtocolError::field("transfers", "sum overflows"))?;
        }
        if total != self.charged.units {
            return Err(ProtocolError::field(
                "transfers",
                format!(
                    "sum {total} differs from the {} units charged",
                    self.charged.units
                ),
            ));
        }
        for r in &self.tx_refs {
            check_len("tx_refs", r, 128)?;
        }
        Ok(())
    }
}
