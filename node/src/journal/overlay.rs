//! The bytes written to the database but not yet to its file.
//!
//! [`super::Journaled`] keeps redb's writes here instead of writing each to the database
//! file at once (one `pwrite` per page, on the committing thread): a commit is durable
//! through the journal, and the checkpointer writes what the overlay holds to the file
//! before it syncs the file. A page rewritten by many commits between two checkpoints is
//! written to the file once, and adjacent pages in one write.
//!
//! The overlay is a set of non-overlapping byte ranges keyed by their offset; a write
//! replaces whatever it overlaps (a range it covers in part keeps the rest, copied). Reads
//! take the covered bytes from here and the gaps from the file.

use std::{collections::BTreeMap, ops::Bound, sync::Arc};

/// Byte ranges written since the checkpoint that last wrote them to the file.
#[derive(Debug, Default)]
pub(super) struct Overlay {
    ranges: BTreeMap<u64, Arc<[u8]>>,
    bytes: u64,
}

/// A range: its offset and bytes.
pub(super) type Range = (u64, Arc<[u8]>);

/// The ranges a checkpoint writes to the file, in offset order.
pub(super) type Snapshot = Vec<Range>;

fn end_of(offset: u64, data: &[u8]) -> u64 {
    offset + data.len() as u64
}

impl Overlay {
    /// How many bytes it holds.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Where the last range ends (0 when empty).
    pub(super) fn end(&self) -> u64 {
        self.ranges
            .last_key_value()
            .map_or(0, |(o, d)| end_of(*o, d))
    }

    /// Takes out every range that overlaps `[from, to)`, returning the parts of them
    /// outside it to the map.
    fn cut(&mut self, from: u64, to: u64) {
        // The range that starts before `from` may reach into it; the others overlapping
        // start inside.
        let first = self
            .ranges
            .range(..from)
            .next_back()
            .filter(|(o, d)| end_of(**o, d) > from)
            .map(|(o, _)| *o);
        let inside: Vec<u64> = self
            .ranges
            .range((Bound::Included(from), Bound::Excluded(to)))
            .map(|(o, _)| *o)
            .collect();
        for o in first.into_iter().chain(inside) {
            let Some(d) = self.ranges.remove(&o) else {
                continue;
            };
            self.bytes -= d.len() as u64;
            let end = end_of(o, &d);
            if o < from {
                let head: Arc<[u8]> = d[..(from - o) as usize].into();
                self.bytes += head.len() as u64;
                self.ranges.insert(o, head);
            }
            if end > to {
                let tail: Arc<[u8]> = d[(to - o) as usize..].into();
                self.bytes += tail.len() as u64;
                self.ranges.insert(to, tail);
            }
        }
    }

    /// Records `data` written at `offset` (it replaces what it overlaps).
    pub(super) fn write(&mut self, offset: u64, data: Arc<[u8]>) {
        if data.is_empty() {
            return;
        }
        self.cut(offset, end_of(offset, &data));
        self.bytes += data.len() as u64;
        self.ranges.insert(offset, data);
    }

    /// Drops whatever lies at or after `len` (the file was cut there).
    pub(super) fn set_len(&mut self, len: u64) {
        self.cut(len, u64::MAX);
    }

    /// Copies into `out` (the bytes at `offset`) what the overlay holds of them; returns
    /// the gaps, as (offset, length), which are to be read from the file.
    pub(super) fn read(&self, offset: u64, out: &mut [u8]) -> Vec<(u64, usize)> {
        let to = end_of(offset, out);
        let mut gaps = Vec::new();
        let mut at = offset;
        let before = self
            .ranges
            .range(..offset)
            .next_back()
            .filter(|(o, d)| end_of(**o, d) > offset);
        let inside = self
            .ranges
            .range((Bound::Included(offset), Bound::Excluded(to)));
        for (&o, d) in before.into_iter().chain(inside) {
            if o > at {
                gaps.push((at, (o - at) as usize));
            }
            let from = o.max(offset);
            let until = end_of(o, d).min(to);
            out[(from - offset) as usize..(until - offset) as usize]
                .copy_from_slice(&d[(from - o) as usize..(until - o) as usize]);
            at = until;
        }
        if at < to {
            gaps.push((at, (to - at) as usize));
        }
        gaps
    }

    /// Every range, for a checkpoint to write to the file.
    pub(super) fn snapshot(&self) -> Snapshot {
        self.ranges.iter().map(|(o, d)| (*o, d.clone())).collect()
    }

    /// Forgets the ranges of `written` (now durable in the file) that were not replaced
    /// since: a range written again, or cut, stays.
    pub(super) fn forget(&mut self, written: &Snapshot) {
        for (o, d) in written {
            if self.ranges.get(o).is_some_and(|now| Arc::ptr_eq(now, d)) {
                self.ranges.remove(o);
                self.bytes -= d.len() as u64;
            }
        }
    }
}

/// Groups a snapshot's ranges into runs of adjacent ones, each at most `max` bytes (a
/// single range may be larger), so that a checkpoint writes each run at once.
pub(super) fn runs(snapshot: &Snapshot, max: usize) -> Vec<&[Range]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0usize;
    for i in 0..snapshot.len() {
        let (o, d) = &snapshot[i];
        let joins = i > start && {
            let (po, pd) = &snapshot[i - 1];
            end_of(*po, pd) == *o && size + d.len() <= max
        };
        if i > start && !joins {
            out.push(&snapshot[start..i]);
            start = i;
            size = 0;
        }
        size += d.len();
    }
    if start < snapshot.len() {
        out.push(&snapshot[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::tests::Rng;

    /// Reads `[offset, offset + n)` as the backend does: the overlay, then the gaps from
    /// `file` (zeros past its end).
    fn read(o: &Overlay, file: &[u8], offset: u64, n: usize) -> Vec<u8> {
        let mut out = vec![0xAA; n];
        for (at, len) in o.read(offset, &mut out) {
            for i in 0..len {
                let p = at as usize + i;
                out[(at - offset) as usize + i] = file.get(p).copied().unwrap_or(0);
            }
        }
        out
    }

    fn put(file: &mut Vec<u8>, offset: u64, data: &[u8]) {
        let end = offset as usize + data.len();
        if file.len() < end {
            file.resize(end, 0);
        }
        file[offset as usize..end].copy_from_slice(data);
    }

    fn check_invariants(o: &Overlay) {
        let mut last_end = 0;
        let mut bytes = 0;
        for (off, d) in &o.ranges {
            assert!(*off >= last_end, "ranges overlap at {off}");
            assert!(!d.is_empty());
            last_end = end_of(*off, d);
            bytes += d.len() as u64;
        }
        assert_eq!(bytes, o.bytes());
    }

    /// Random writes, cuts and checkpoints (a snapshot written to the file while more
    /// writes come, then forgotten) against a flat model of the database's bytes: every
    /// read of overlay plus file gives the model's bytes.
    #[test]
    fn reads_through_the_overlay_match_a_flat_model() {
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut model: Vec<u8> = Vec::new();
            let mut file: Vec<u8> = Vec::new();
            let mut o = Overlay::default();
            let mut taken: Option<Snapshot> = None;
            for step in 0..400u64 {
                match rng.below(10) {
                    0..=5 => {
                        let offset = rng.below(64) * 512 + if rng.below(4) == 0 { 7 } else { 0 };
                        let n = 1 + rng.below(6000) as usize;
                        let data: Vec<u8> = (0..n).map(|i| (step as usize + i) as u8).collect();
                        put(&mut model, offset, &data);
                        o.write(offset, data.into());
                    }
                    6 if rng.below(4) == 0 => {
                        let len = rng.below(40_000);
                        model.truncate(len as usize);
                        file.truncate(len as usize);
                        o.set_len(len);
                        // A cut file: what a checkpoint in flight would write is refused
                        // (the journal holds its lock over both).
                        taken = None;
                    }
                    7 => {
                        // A checkpoint starts: it writes what the overlay holds now.
                        let s = o.snapshot();
                        for (off, d) in &s {
                            put(&mut file, *off, d);
                        }
                        taken = Some(s);
                    }
                    8 => {
                        // ... and, synced, forgets what was not replaced since.
                        if let Some(s) = taken.take() {
                            o.forget(&s);
                        }
                    }
                    _ => {}
                }
                check_invariants(&o);
                let offset = rng.below(50_000);
                let n = 1 + rng.below(9000) as usize;
                let want: Vec<u8> = (0..n)
                    .map(|i| model.get(offset as usize + i).copied().unwrap_or(0))
                    .collect();
                assert_eq!(
                    read(&o, &file, offset, n),
                    want,
                    "seed {seed} step {step}: read at {offset} (+{n})"
                );
            }
        }
    }

    #[test]
    fn a_write_replaces_what_it_overlaps_and_keeps_the_rest() {
        let mut o = Overlay::default();
        o.write(0, vec![1u8; 100].into());
        o.write(50, vec![2u8; 10].into());
        assert_eq!(o.bytes(), 100);
        assert_eq!(o.ranges.len(), 3);
        let mut out = vec![0u8; 100];
        assert!(o.read(0, &mut out).is_empty());
        assert_eq!(
            &out[45..65],
            &[[1u8; 5], [2; 5], [2; 5], [1; 5]].concat()[..]
        );
        o.set_len(55);
        assert_eq!(o.end(), 55);
        assert_eq!(o.bytes(), 55);
        let mut out = vec![9u8; 10];
        assert_eq!(o.read(50, &mut out), vec![(55, 5)]);
        assert_eq!(&out[..5], &[2; 5]);
    }

    #[test]
    fn a_range_written_again_during_a_checkpoint_is_not_forgotten() {
        let mut o = Overlay::default();
        o.write(0, vec![1u8; 10].into());
        o.write(10, vec![1u8; 10].into());
        let s = o.snapshot();
        o.write(0, vec![2u8; 10].into());
        o.forget(&s);
        assert_eq!(o.ranges.len(), 1);
        assert_eq!(o.bytes(), 10);
        let mut out = [0u8; 10];
        assert!(o.read(0, &mut out).is_empty());
        assert_eq!(out, [2; 10]);
    }

    #[test]
    fn adjacent_ranges_are_written_in_runs_of_bounded_size() {
        let r = |o: u64, n: usize| (o, Arc::<[u8]>::from(vec![0u8; n]));
        let s = vec![r(0, 4), r(4, 4), r(8, 4), r(20, 4), r(24, 10), r(34, 1)];
        let lens: Vec<usize> = runs(&s, 8).iter().map(|x| x.len()).collect();
        assert_eq!(lens, vec![2, 1, 1, 1, 1]);
        let lens: Vec<usize> = runs(&s, 100).iter().map(|x| x.len()).collect();
        assert_eq!(lens, vec![3, 3]);
        assert!(runs(&Vec::new(), 8).is_empty());
    }
}
