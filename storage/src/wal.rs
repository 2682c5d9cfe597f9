//! The write-ahead log of one table.
//!
//! A log is a folder of segment files named by the sequence number of their first entry
//! (`00000000000000000042.wal`). Each entry is
//!
//! ```text
//! [len: u32 LE][crc32: u32 LE][seq: u64 LE][payload: len bytes]   crc covers seq + payload
//! ```
//!
//! and its payload is one Arrow IPC stream (LZ4-compressed buffers) holding the batch of one
//! acknowledged export request. Appends are grouped: the writer appends every entry waiting
//! in its queue, then calls `fdatasync` once, then acknowledges them all (group commit).
//!
//! On start-up [`Wal::replay`] reads every segment in order; a torn or corrupt tail (a crash
//! in the middle of an append that was never acknowledged) is cut off. Segments are removed
//! only after a Parquet file holding all their entries is durable.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use arrow::ipc::CompressionType;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};

const HEADER: usize = 16;
/// The largest entry replay will believe in (a bigger length is corruption).
const MAX_ENTRY: u32 = 1 << 30;

/// Encodes a batch as a WAL payload (Arrow IPC stream, LZ4 buffers).
pub fn encode(batch: &RecordBatch) -> Result<Vec<u8>> {
    let opts = IpcWriteOptions::default().try_with_compression(Some(CompressionType::LZ4_FRAME))?;
    let mut out = Vec::with_capacity(batch.get_array_memory_size() / 4);
    {
        let mut w = StreamWriter::try_new_with_options(&mut out, &batch.schema(), opts)?;
        w.write(batch)?;
        w.finish()?;
    }
    Ok(out)
}

/// Decodes a WAL payload back into its batches.
pub fn decode(payload: &[u8]) -> Result<Vec<RecordBatch>> {
    let reader = StreamReader::try_new(payload, None)?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// One entry read back from the log.
#[derive(Debug)]
pub struct Entry {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// A segment file and the first sequence number it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first_seq: u64,
    pub path: PathBuf,
}

/// The open log: the segment being appended to, and the closed ones still needed.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    current: Segment,
    file: File,
    closed: Vec<Segment>,
    buf: Vec<u8>,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.wal"))
}

/// The segments of a log folder, oldest first.
pub fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().and_then(|e| e.to_str()) != Some("wal") {
            continue;
        }
        if let Ok(first_seq) = stem.parse::<u64>() {
            out.push(Segment { first_seq, path });
        }
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// Reads every valid entry of one segment; cuts a torn or corrupt tail off the file.
fn read_segment(seg: &Segment, out: &mut Vec<Entry>) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg.path)
        .map_err(|e| Error::io(&seg.path, e))?;
    let len = file.metadata().map_err(|e| Error::io(&seg.path, e))?.len();
    let mut r = BufReader::new(&file);
    let mut pos: u64 = 0;
    loop {
        let mut header = [0u8; HEADER];
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(Error::io(&seg.path, e)),
        }
        let n = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&header[8..16]);
        let seq = u64::from_le_bytes(seq_bytes);
        if n > MAX_ENTRY || pos + HEADER as u64 + u64::from(n) > len {
            break;
        }
        let mut payload = vec![0u8; n as usize];
        if r.read_exact(&mut payload).is_err() {
            break;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&seq_bytes);
        h.update(&payload);
        if h.finalize() != crc {
            break;
        }
        pos += HEADER as u64 + u64::from(n);
        out.push(Entry { seq, payload });
    }
    if pos < len {
        tracing::warn!(segment = %seg.path.display(), valid_bytes = pos, file_bytes = len,
            "cutting a torn write-ahead-log tail (an append that was never acknowledged)");
        file.set_len(pos).map_err(|e| Error::io(&seg.path, e))?;
        file.sync_all().map_err(|e| Error::io(&seg.path, e))?;
    }
    Ok(())
}

impl Wal {
    /// Reads back every entry of the log in `dir` (creating it if needed), then opens a new
    /// segment for appends starting at `next_seq`.
    pub fn replay(dir: &Path, next_seq: impl FnOnce(&[Entry]) -> u64) -> Result<(Wal, Vec<Entry>)> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let segments = list_segments(dir)?;
        let mut entries = Vec::new();
        for seg in &segments {
            read_segment(seg, &mut entries)?;
        }
        let first = next_seq(&entries);
        let mut closed = segments;
        // A segment named for `first` can only be an empty leftover: reuse it.
        closed.retain(|s| s.first_seq != first);
        let current = Segment {
            first_seq: first,
            path: segment_path(dir, first),
        };
        let file = open_append(&current.path)?;
        sync_dir(dir)?;
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                current,
                file,
                closed,
                buf: Vec::new(),
            },
            entries,
        ))
    }

    /// Queues one entry in the group being written; nothing reaches the file until [`Wal::commit`].
    pub fn append(&mut self, seq: u64, payload: &[u8]) {
        let mut h = crc32fast::Hasher::new();
        h.update(&seq.to_le_bytes());
        h.update(payload);
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&h.finalize().to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(payload);
    }

    /// Writes the queued group and makes it durable (one `fdatasync`).
    pub fn commit(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let res = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = res {
            // Leave no half-written group behind us: later appends must follow a valid entry.
            let _ = self.truncate_to_valid();
            self.buf.clear();
            return Err(Error::io(&self.current.path, e));
        }
        self.buf.clear();
        Ok(())
    }

    fn truncate_to_valid(&mut self) -> Result<()> {
        let mut entries = Vec::new();
        read_segment(&self.current, &mut entries)?;
        self.file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(&self.current.path, e))?;
        Ok(())
    }

    /// Closes the current segment and starts a new one at `next_seq`. Returns every closed
    /// segment: all their entries are below `next_seq`, and they may be deleted once those
    /// entries are durable elsewhere.
    pub fn rotate(&mut self, next_seq: u64) -> Result<Vec<Segment>> {
        self.commit()?;
        let seg = Segment {
            first_seq: next_seq,
            path: segment_path(&self.dir, next_seq),
        };
        let file = open_append(&seg.path)?;
        sync_dir(&self.dir)?;
        let old = std::mem::replace(&mut self.current, seg);
        self.file = file;
        self.closed.push(old);
        Ok(std::mem::take(&mut self.closed))
    }
}

/// Deletes segments whose entries are all durable in Parquet.
pub fn remove_segments(segments: &[Segment]) -> Result<()> {
    for s in segments {
        match fs::remove_file(&s.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&s.path, e)),
        }
    }
    if let Some(dir) = segments.first().and_then(|s| s.path.parent()) {
        sync_dir(dir)?;
    }
    Ok(())
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Makes a file creation, rename or removal in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use std::sync::Arc;

    fn batch(v: i64) -> RecordBatch {
        RecordBatch::try_from_iter([("v", Arc::new(Int64Array::from(vec![v, v + 1])) as _)])
            .expect("batch")
    }

    #[test]
    fn entries_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut wal, entries) = Wal::replay(dir.path(), |_| 1).expect("open");
        assert!(entries.is_empty());
        for seq in 1..=3 {
            wal.append(seq, &encode(&batch(seq as i64)).expect("enc"));
        }
        wal.commit().expect("commit");
        drop(wal);
        // A crash in the middle of an append leaves half an entry.
        let seg = list_segments(dir.path()).expect("list").remove(0);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&seg.path)
            .expect("open");
        f.write_all(&[0xff; 11]).expect("write");
        drop(f);

        let (mut wal, entries) =
            Wal::replay(dir.path(), |e| e.last().map(|e| e.seq + 1).unwrap_or(1)).expect("reopen");
        assert_eq!(
            entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let decoded = decode(&entries[2].payload).expect("decode");
        assert_eq!(decoded[0], batch(3));
        // Appends after the cut are readable too.
        wal.append(4, &encode(&batch(4)).expect("enc"));
        wal.commit().expect("commit");
        drop(wal);
        let (_, entries) = Wal::replay(dir.path(), |_| 5).expect("reopen");
        assert_eq!(
            entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn corrupt_entry_ends_replay_of_its_segment() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut wal, _) = Wal::replay(dir.path(), |_| 1).expect("open");
        wal.append(1, b"one");
        wal.append(2, b"two");
        wal.commit().expect("commit");
        drop(wal);
        let seg = list_segments(dir.path()).expect("list").remove(0);
        let mut bytes = fs::read(&seg.path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55; // flip a bit in entry 2's payload
        fs::write(&seg.path, bytes).expect("write");
        let (_, entries) = Wal::replay(dir.path(), |_| 3).expect("reopen");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].payload, b"one");
    }

    #[test]
    fn rotate_hands_back_closed_segments() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut wal, _) = Wal::replay(dir.path(), |_| 1).expect("open");
        wal.append(1, b"a");
        let closed = wal.rotate(2).expect("rotate");
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].first_seq, 1);
        wal.append(2, b"b");
        wal.commit().expect("commit");
        remove_segments(&closed).expect("remove");
        drop(wal);
        let (_, entries) = Wal::replay(dir.path(), |_| 3).expect("reopen");
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
    }
}
