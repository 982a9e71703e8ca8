//! Store-and-forward for messages to the controller: each record waits on disk
//! until the broker has acknowledged it, and goes out in sequence order after a
//! reconnect. Sequence numbers are per stream, start at 1 and survive restarts.
//!
//! Telemetry spools are bounded in bytes: when a new record would exceed the bound,
//! the oldest records are dropped and counted. Event spools are not bounded
//! (install results are never dropped; they are few and small).
//!
//! ```text
//! <data>/spool/<stream>/meta.json              {"next_seq": N, "dropped": D}
//! <data>/spool/<stream>/<seq, 20 digits>.cbor  one encoded message
//! ```

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::write_atomic;

/// The bookkeeping of a spool, without files: which records wait, how many bytes
/// they hold, what the next sequence number is and how many were dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolIndex {
    next_seq: u64,
    waiting: VecDeque<(u64, u64)>,
    bytes: u64,
    max_bytes: Option<u64>,
    dropped: u64,
}

impl SpoolIndex {
    /// An empty spool whose next record gets `next_seq` (at least 1).
    pub fn new(next_seq: u64, dropped: u64, max_bytes: Option<u64>) -> SpoolIndex {
        SpoolIndex {
            next_seq: next_seq.max(1),
            waiting: VecDeque::new(),
            bytes: 0,
            max_bytes,
            dropped,
        }
    }

    /// Takes the next sequence number.
    pub fn allocate(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Adds a waiting record of `len` bytes and returns the records dropped to stay
    /// within the bound (oldest first; never the new one). Records are kept in
    /// sequence order whatever the order of insertion.
    pub fn insert(&mut self, seq: u64, len: u64) -> Vec<u64> {
        let at = self.waiting.partition_point(|(s, _)| *s < seq);
        if self.waiting.get(at).is_some_and(|(s, _)| *s == seq) {
            return Vec::new();
        }
        self.waiting.insert(at, (seq, len));
        self.bytes += len;
        self.next_seq = self.next_seq.max(seq + 1);
        let mut evicted = Vec::new();
        if let Some(max) = self.max_bytes {
            while self.bytes > max && self.waiting.len() > 1 {
                let victim = if self.waiting[0].0 == seq { 1 } else { 0 };
                if let Some((s, l)) = self.waiting.remove(victim) {
                    self.bytes -= l;
                    self.dropped += 1;
                    evicted.push(s);
                }
            }
        }
        evicted
    }

    /// Removes a delivered record; false if it was not waiting.
    pub fn remove(&mut self, seq: u64) -> bool {
        match self.waiting.iter().position(|(s, _)| *s == seq) {
            Some(i) => {
                if let Some((_, l)) = self.waiting.remove(i) {
                    self.bytes -= l;
                }
                true
            }
            None => false,
        }
    }

    /// Waiting records in sequence order.
    pub fn waiting(&self) -> impl Iterator<Item = u64> + '_ {
        self.waiting.iter().map(|(s, _)| *s)
    }

    /// Number of waiting records.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Bytes held by waiting records.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Counts a record that took a sequence number but could not be stored
    /// (a full disk): its number stays a gap, and the gap is counted.
    pub fn lost(&mut self) {
        self.dropped += 1;
    }

    /// Records dropped to stay within the bound or lost to a failed write, ever.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    next_seq: u64,
    dropped: u64,
    /// 0 in a spool from before epochs (or no meta at all): a new one is drawn.
    #[serde(default)]
    epoch: u64,
}

/// A spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    index: SpoolIndex,
    epoch: u64,
}

/// A random non-zero epoch (docs/protocol.md: `epoch`).
fn new_epoch() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(u64::from_le_bytes(bytes).max(1))
}

fn record_name(seq: u64) -> String {
    format!("{seq:020}.cbor")
}

/// Largest record read back from the spool (the largest message, telemetry).
const MAX_RECORD_LEN: u64 = 256 * 1024;

impl Spool {
    /// Opens (creating) the spool in `dir`; `max_bytes` bounds it (None: unbounded).
    /// Files that are not records (leftover temp files) are removed.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: Option<u64>) -> io::Result<Spool> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        let meta: Meta = fs::read(dir.join("meta.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut records = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "meta.json" {
                continue;
            }
            match name
                .strip_suffix(".cbor")
                .and_then(|s| s.parse::<u64>().ok())
            {
                Some(seq) if seq > 0 => records.push((seq, entry.metadata()?.len())),
                _ => fs::remove_file(entry.path())?,
            }
        }
        records.sort_unstable();
        // The bound applies after open too: a smaller bound drops the oldest.
        let mut index = SpoolIndex::new(meta.next_seq, meta.dropped, max_bytes);
        // A counter that starts again (no meta, or an unreadable one) starts a
        // new epoch, so the controller does not take its numbers for old ones.
        let epoch = if meta.epoch == 0 {
            new_epoch()?
        } else {
            meta.epoch
        };
        let mut spool = Spool {
            dir,
            index: SpoolIndex::new(1, 0, None),
            epoch,
        };
        let mut evicted = Vec::new();
        for (seq, len) in records {
            evicted.extend(index.insert(seq, len));
        }
        spool.index = index;
        for seq in evicted {
            spool.delete(seq)?;
        }
        spool.save_meta()?;
        Ok(spool)
    }

    /// The run of this spool's counter its records belong to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The bookkeeping.
    pub fn index(&self) -> &SpoolIndex {
        &self.index
    }

    fn save_meta(&self) -> io::Result<()> {
        let meta = Meta {
            next_seq: self.index.next_seq(),
            dropped: self.index.dropped(),
            epoch: self.epoch,
        };
        write_atomic(
            &self.dir.join("meta.json"),
            &serde_json::to_vec(&meta).map_err(io::Error::other)?,
        )
    }

    fn delete(&self, seq: u64) -> io::Result<()> {
        match fs::remove_file(self.dir.join(record_name(seq))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Stores a record built for its sequence number; returns the number. The
    /// record is on disk (fsynced) when this returns.
    /// A record that cannot be written (a full disk) is counted in
    /// [`SpoolIndex::dropped`] before the error returns.
    pub fn push(&mut self, build: impl FnOnce(u64) -> Vec<u8>) -> io::Result<u64> {
        let seq = self.index.allocate();
        // The counter is saved first: a crash after this never reuses the number.
        let stored = self.save_meta().and_then(|()| {
            let bytes = build(seq);
            write_atomic(&self.dir.join(record_name(seq)), &bytes).map(|()| bytes)
        });
        let bytes = match stored {
            Ok(bytes) => bytes,
            Err(e) => {
                self.index.lost();
                return Err(e);
            }
        };
        let evicted = self.index.insert(seq, bytes.len() as u64);
        for s in &evicted {
            self.delete(*s)?;
        }
        if !evicted.is_empty() {
            self.save_meta()?;
        }
        Ok(seq)
    }

    /// Reads a waiting record.
    pub fn read(&self, seq: u64) -> io::Result<Vec<u8>> {
        let path = self.dir.join(record_name(seq));
        let f = fs::File::open(&path)?;
        let mut out = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(f, MAX_RECORD_LEN + 1), &mut out)?;
        if out.len() as u64 > MAX_RECORD_LEN {
            return Err(io::Error::other(format!(
                "{}: over {MAX_RECORD_LEN} bytes",
                path.display()
            )));
        }
        Ok(out)
    }

    /// Forgets a delivered record.
    pub fn ack(&mut self, seq: u64) -> io::Result<()> {
        if self.index.remove(seq) {
            self.delete(seq)?;
        }
        Ok(())
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sequence_numbers_start_at_one_and_only_grow() {
        let mut i = SpoolIndex::new(0, 0, None);
        assert_eq!(i.allocate(), 1);
        assert_eq!(i.allocate(), 2);
        i.insert(2, 10);
        i.insert(1, 10);
        assert_eq!(i.waiting().collect::<Vec<_>>(), vec![1, 2]);
        assert!(i.remove(1));
        assert!(!i.remove(1));
        assert_eq!(i.allocate(), 3);
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts_them_but_keeps_the_newest() {
        let mut i = SpoolIndex::new(1, 0, Some(100));
        for seq in 1..=3 {
            let s = i.allocate();
            assert_eq!(s, seq);
            assert!(i.insert(s, 30).is_empty());
        }
        let s = i.allocate();
        assert_eq!(i.insert(s, 30), vec![1]);
        assert_eq!(i.dropped(), 1);
        assert_eq!(i.bytes(), 90);
        // One record larger than the whole bound replaces everything but itself.
        let s = i.allocate();
        assert_eq!(i.insert(s, 500), vec![2, 3, 4]);
        assert_eq!(i.waiting().collect::<Vec<_>>(), vec![5]);
        assert_eq!(i.dropped(), 4);
    }

    #[test]
    fn a_counter_keeps_its_epoch_across_restarts_and_a_new_counter_gets_a_new_one() -> io::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let mut s = Spool::open(dir.path(), None)?;
        let epoch = s.epoch();
        assert_ne!(epoch, 0);
        s.push(|_| b"one".to_vec())?;
        drop(s);
        let s = Spool::open(dir.path(), None)?;
        assert_eq!(s.epoch(), epoch, "same counter, same epoch");
        assert_eq!(s.index().next_seq(), 2);
        drop(s);
        // The counter's state lost (a reflash, a damaged meta.json): numbering
        // starts again at 1, in a new epoch.
        std::fs::write(dir.path().join("meta.json"), b"{damaged")?;
        for entry in std::fs::read_dir(dir.path())? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "cbor") {
                std::fs::remove_file(path)?;
            }
        }
        let s = Spool::open(dir.path(), None)?;
        assert_eq!(s.index().next_seq(), 1);
        assert_ne!(s.epoch(), epoch);
        Ok(())
    }

    #[test]
    fn records_survive_a_restart_in_order_and_numbers_are_not_reused() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut s = Spool::open(dir.path(), None)?;
        for n in 0..3u8 {
            s.push(|seq| vec![n, seq as u8])?;
        }
        s.ack(2)?;
        drop(s);
        let mut s = Spool::open(dir.path(), None)?;
        assert_eq!(s.index().waiting().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(s.read(3)?, vec![2, 3]);
        s.ack(1)?;
        s.ack(3)?;
        drop(s);
        let mut s = Spool::open(dir.path(), None)?;
        assert!(s.index().is_empty());
        assert_eq!(s.push(|_| vec![9])?, 4);
        Ok(())
    }

    #[test]
    fn a_bounded_spool_drops_on_disk_too_and_remembers_the_count() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut s = Spool::open(dir.path(), Some(25))?;
        for _ in 0..5 {
            s.push(|_| vec![0; 10])?;
        }
        assert_eq!(s.index().waiting().collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(s.index().dropped(), 3);
        assert!(!dir.path().join(record_name(1)).exists());
        drop(s);
        // Leftover temp files from a crash are cleaned up.
        fs::write(dir.path().join(".00000000000000000009.cbor.tmp"), b"x")?;
        let s = Spool::open(dir.path(), Some(25))?;
        assert_eq!(s.index().dropped(), 3);
        assert_eq!(s.index().len(), 2);
        assert_eq!(fs::read_dir(dir.path())?.count(), 3);
        Ok(())
    }

    proptest! {
        #[test]
        fn the_index_never_exceeds_its_bound_except_by_one_record_and_loses_nothing_silently(
            ops in proptest::collection::vec((any::<bool>(), 1u64..50), 1..200),
        ) {
            let mut i = SpoolIndex::new(1, 0, Some(100));
            let mut pushed = 0u64;
            let mut acked = 0u64;
            for (push, len) in ops {
                if push || i.is_empty() {
                    let s = i.allocate();
                    i.insert(s, len);
                    pushed += 1;
                    prop_assert!(i.bytes() <= 100 || i.len() == 1);
                } else {
                    let first = i.waiting().next();
                    if let Some(first) = first {
                        prop_assert!(i.remove(first));
                        acked += 1;
                    }
                }
                prop_assert_eq!(pushed, acked + i.dropped() + i.len() as u64);
                let w: Vec<u64> = i.waiting().collect();
                prop_assert!(w.windows(2).all(|p| p[0] < p[1]));
            }
        }
    }
}
