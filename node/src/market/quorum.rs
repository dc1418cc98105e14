//! Quorum over claims.
//!
//! Claims are compared over the deterministic step: every leased worker ran the same Wasm
//! on the same pinned snapshot, so honest claims carry the same output CID. A result is
//! accepted when `quorum` claims agree on one output CID (and, when one is pinned, on the
//! snapshot CID). Claims that disagree with the accepted output are rejected.

use d402_protocol::Cid;

/// One claim's vote, as the coordinator recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote<W> {
    /// Who claimed.
    pub worker: W,
    /// The output CID claimed.
    pub output_cid: Cid,
    /// The snapshot the output was computed from.
    pub snapshot_cid: Option<Cid>,
}

/// Where the vote stands. Short-lived, so the size of `Accepted` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<W> {
    /// Not decided yet: the best group has `best` of `needed` agreeing claims.
    Pending {
        /// Size of the largest agreeing group.
        best: usize,
        /// The quorum.
        needed: usize,
    },
    /// Accepted: `quorum` claims agree.
    Accepted {
        /// The accepted output.
        output_cid: Cid,
        /// The snapshot it was computed from.
        snapshot_cid: Option<Cid>,
        /// Workers whose claims agree (paid).
        agreeing: Vec<W>,
        /// Workers whose claims disagree (rejected).
        dissenting: Vec<W>,
    },
    /// No group can reach the quorum, even if every outstanding lease answers.
    Impossible {
        /// Size of the largest agreeing group.
        best: usize,
        /// The quorum.
        needed: usize,
    },
}

/// Claims grouped by (output CID, snapshot CID), with the workers that made them.
type Group<W> = ((Cid, Option<Cid>), Vec<W>);

/// Decides over the votes so far, given how many leased claims may still arrive.
///
/// `quorum` must be at least 1. The first group (in vote order) to reach the quorum wins;
/// ties are impossible because a group wins as soon as it reaches the quorum.
pub fn decide<W: Clone + PartialEq>(
    votes: &[Vote<W>],
    quorum: usize,
    outstanding: usize,
) -> Decision<W> {
    let quorum = quorum.max(1);
    // Groups keyed by (output, snapshot) in order of first appearance.
    let mut groups: Vec<Group<W>> = Vec::new();
    for v in votes {
        let key = (v.output_cid, v.snapshot_cid);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, ws)) => {
                if !ws.contains(&v.worker) {
                    ws.push(v.worker.clone());
                }
            }
            None => groups.push((key, vec![v.worker.clone()])),
        }
    }
    let best = groups.iter().map(|(_, ws)| ws.len()).max().unwrap_or(0);
    if let Some(((output_cid, snapshot_cid), agreeing)) =
        groups.iter().find(|(_, ws)| ws.len() >= quorum)
    {
        let dissenting = votes
            .iter()
            .filter(|v| (v.output_cid, v.snapshot_cid) != (*output_cid, *snapshot_cid))
            .map(|v| v.worker.clone())
            .fold(Vec::new(), |mut acc, w| {
                if !acc.contains(&w) && !agreeing.contains(&w) {
                    acc.push(w);
                }
                acc
            });
        return Decision::Accepted {
            output_cid: *output_cid,
            snapshot_cid: *snapshot_cid,
            agreeing: agreeing.clone(),
            dissenting,
        };
    }
    if best + outstanding < quorum {
        Decision::Impossible {
            best,
            needed: quorum,
        }
    } else {
        Decision::Pending {
            best,
            needed: quorum,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(w: u8, out: &[u8]) -> Vote<u8> {
        Vote {
            worker: w,
            output_cid: Cid::raw(out),
            snapshot_cid: Some(Cid::raw(b"snap")),
        }
    }

    #[test]
    fn two_of_three_agree() {
        let votes = [vote(1, b"a"), vote(2, b"b"), vote(3, b"a")];
        match decide(&votes, 2, 0) {
            Decision::Accepted {
                output_cid,
                agreeing,
                dissenting,
                ..
            } => {
                assert_eq!(output_cid, Cid::raw(b"a"));
                assert_eq!(agreeing, vec![1, 3]);
                assert_eq!(dissenting, vec![2]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pending_then_impossible() {
        let votes = [vote(1, b"a"), vote(2, b"b")];
        assert_eq!(
            decide(&votes, 2, 1),
            Decision::Pending { best: 1, needed: 2 }
        );
        assert_eq!(
            decide(&votes, 2, 0),
            Decision::Impossible { best: 1, needed: 2 }
        );
    }

    #[test]
    fn different_snapshots_do_not_agree() {
        let mut other = vote(2, b"a");
        other.snapshot_cid = Some(Cid::raw(b"other snap"));
        assert_eq!(
            decide(&[vote(1, b"a"), other], 2, 0),
            Decision::Impossible { best: 1, needed: 2 }
        );
    }

    #[test]
    fn a_worker_counts_once() {
        let votes = [vote(1, b"a"), vote(1, b"a")];
        assert_eq!(
            decide(&votes, 2, 0),
            Decision::Impossible { best: 1, needed: 2 }
        );
    }

    #[test]
    fn quorum_one_accepts_first() {
        assert!(matches!(
            decide(&[vote(7, b"x")], 1, 2),
            Decision::Accepted { .. }
        ));
    }
}
