//! The gateway's book of standing bids.
//!
//! A bid round costs a round trip to every candidate, a signature per bid and a check per
//! bid on the critical path of every task. A gateway asks instead for standing bids (a
//! count of leases in [`BidRequest::standing`](d402_protocol::messages::BidRequest)): a
//! worker that grants one (`Bid::uses` above 1) accepts leases for other tasks of the same
//! manifest, rail and price citing it until it expires or its uses run out. The book keeps
//! those bids in memory, one per worker, manifest and rail; a new task whose book holds
//! enough eligible bids is leased at once, without asking anyone. Each use is reserved here
//! before its lease is signed, so concurrent tasks do not overdraw a bid; a bid whose lease
//! is refused (other than for want of a free slot) or not delivered is dropped, and the next
//! task asks again.
//!
//! Nothing here is persisted: a task record holds the signed bids it was leased on, so a
//! restarted gateway resumes its tasks, and its first new task asks for bids again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use d402_protocol::{Cid, RailKind, Signed, UnixMillis, messages::Bid};
use libp2p::PeerId;

/// A standing bid and what is left of it.
#[derive(Debug, Clone)]
struct Entry {
    peer: PeerId,
    bid: Arc<Signed<Bid>>,
    uses_left: u32,
}

/// What a task asks of the book.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// The exact manifest.
    pub manifest: &'a Cid,
    /// The rail the task pays on.
    pub rail: RailKind,
    /// The asset of the task's budget.
    pub asset: &'a str,
    /// The most the task pays each worker.
    pub max_each: u64,
    /// Bids lapsing before this time are of no use.
    pub valid_until: UnixMillis,
}

/// A usable standing bid: the bidder, the signed bid and its CID.
pub type Usable = (PeerId, Arc<Signed<Bid>>, Cid);

/// Standing bids by bid CID. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct StandingBids {
    book: Mutex<HashMap<Cid, Entry>>,
}

impl StandingBids {
    fn book(&self) -> std::sync::MutexGuard<'_, HashMap<Cid, Entry>> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `bid` (received from `peer`, signature and match already checked) if it is a
    /// standing one, in place of that worker's earlier bid for the same manifest and rail.
    /// The lease of the task that asked for it is already counted: `used` uses are gone.
    pub fn keep(&self, peer: PeerId, bid: &Signed<Bid>, cid: Cid, used: u32, now: UnixMillis) {
        let uses_left = bid.body.uses.saturating_sub(used);
        if bid.body.uses <= 1 || uses_left == 0 || bid.body.expires_at <= now {
            return;
        }
        let mut book = self.book();
        book.retain(|_, e| {
            e.bid.body.expires_at > now
                && !(e.bid.signer == bid.signer
                    && e.bid.body.manifest_cid == bid.body.manifest_cid
                    && e.bid.body.rail == bid.body.rail)
        });
        book.insert(
            cid,
            Entry {
                peer,
                bid: Arc::new(bid.clone()),
                uses_left,
            },
        );
    }

    /// The standing bids that suit `want`, at most one per worker, in no particular order.
    pub fn usable(&self, want: Wanted<'_>) -> Vec<Usable> {
        let book = self.book();
        let mut out: Vec<Usable> = Vec::new();
        for (cid, e) in book.iter() {
            let b = &e.bid.body;
            if e.uses_left == 0
                || b.manifest_cid != *want.manifest
                || b.rail != want.rail
                || b.price.asset != want.asset
                || b.price.units > want.max_each
                || b.expires_at <= want.valid_until
                || out.iter().any(|(_, o, _)| o.signer == e.bid.signer)
            {
                continue;
            }
            out.push((e.peer, e.bid.clone(), *cid));
        }
        out
    }

    /// Takes one use of each bid in `cids`, all or none: false when one has run out or gone
    /// since [`StandingBids::usable`] listed it.
    pub fn reserve(&self, cids: &[Cid]) -> bool {
        let mut book = self.book();
        if !cids
            .iter()
            .all(|c| book.get(c).is_some_and(|e| e.uses_left > 0))
        {
            return false;
        }
        for c in cids {
            if let Some(e) = book.get_mut(c) {
                e.uses_left -= 1;
                if e.uses_left == 0 {
                    book.remove(c);
                }
            }
        }
        true
    }

    /// Drops a bid (its lease was refused or not delivered: the worker may have restarted,
    /// be full, or have let it lapse).
    pub fn forget(&self, cid: &Cid) -> bool {
        self.book().remove(cid).is_some()
    }

    /// How many standing bids the book holds.
    pub fn len(&self) -> usize {
        self.book().len()
    }

    /// Whether the book is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use d402_protocol::{Amount, SigningKey, TaskId, Wallets, types::MESSAGE_VERSION};

    use super::*;

    fn bid(key: u8, manifest: &Cid, price: u64, uses: u32, expires_at: u64) -> Signed<Bid> {
        let mut payout = Wallets::new();
        payout.insert(RailKind::Local.payout_chain(), "w".repeat(8));
        Signed::sign(
            Bid {
                v: MESSAGE_VERSION,
                task_id: TaskId([key; 16]),
                request_cid: Cid::raw(b"request"),
                manifest_cid: *manifest,
                price: Amount {
                    asset: "usdc".into(),
                    units: price,
                },
                rail: RailKind::Local,
                payout,
                expires_at,
                uses,
            },
            &SigningKey::from_bytes(&[key; 32]),
        )
        .unwrap()
    }

    fn want(manifest: &Cid, max_each: u64, valid_until: u64) -> Wanted<'_> {
        Wanted {
            manifest,
            rail: RailKind::Local,
            asset: "usdc",
            max_each,
            valid_until,
        }
    }

    fn keep(book: &StandingBids, b: &Signed<Bid>, used: u32) -> Cid {
        let cid = b.cid().unwrap();
        book.keep(PeerId::random(), b, cid, used, 1_000);
        cid
    }

    #[test]
    fn single_use_and_used_up_bids_are_not_kept() {
        let m = Cid::raw(b"manifest");
        let book = StandingBids::default();
        keep(&book, &bid(1, &m, 10, 1, 9_000), 0);
        keep(&book, &bid(2, &m, 10, 2, 9_000), 2);
        keep(&book, &bid(3, &m, 10, 5, 900), 0);
        assert!(book.is_empty());
        keep(&book, &bid(4, &m, 10, 5, 9_000), 1);
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn usable_filters_on_terms_and_lists_a_worker_once() {
        let m = Cid::raw(b"manifest");
        let other = Cid::raw(b"other");
        let book = StandingBids::default();
        keep(&book, &bid(1, &m, 10, 5, 9_000), 0);
        keep(&book, &bid(2, &m, 50, 5, 9_000), 0);
        keep(&book, &bid(3, &other, 10, 5, 9_000), 0);
        keep(&book, &bid(4, &m, 10, 5, 3_000), 0);
        let got = book.usable(want(&m, 20, 5_000));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.body.price.units, 10);
        // A newer bid of the same worker replaces its older one.
        keep(&book, &bid(1, &m, 12, 5, 9_500), 0);
        let got = book.usable(want(&m, 20, 5_000));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.body.price.units, 12);
    }

    #[test]
    fn reserve_takes_all_or_nothing_and_uses_run_out() {
        let m = Cid::raw(b"manifest");
        let book = StandingBids::default();
        let a = keep(&book, &bid(1, &m, 10, 3, 9_000), 0);
        let b = keep(&book, &bid(2, &m, 10, 2, 9_000), 0);
        assert!(book.reserve(&[a, b]));
        assert!(book.reserve(&[a, b]));
        // b is used up (and gone); a keeps its last use.
        assert!(!book.reserve(&[a, b]));
        assert!(book.reserve(&[a]));
        assert!(!book.reserve(&[a]));
        assert!(book.is_empty());
    }

    #[test]
    fn forgotten_bids_are_not_offered() {
        let m = Cid::raw(b"manifest");
        let book = StandingBids::default();
        let a = keep(&book, &bid(1, &m, 10, 3, 9_000), 0);
        assert!(book.forget(&a));
        assert!(book.usable(want(&m, 20, 5_000)).is_empty());
        assert!(!book.forget(&a));
    }
}
