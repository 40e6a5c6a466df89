//! The durable outbox: records the database could not take, appended to a JSONL spool (fsynced
//! before the caller hears back) and replayed in order on the next successful connection or flush.
//!
//! Files in the spool directory:
//! - `outbox.jsonl`: pending records, one JSON object a line, oldest first;
//! - `outbox.lock`: held (advisory `flock`) while appending or replaying, so processes sharing the
//!   directory neither interleave lines nor lose one appended during a replay;
//! - `outbox.rejected.jsonl`: records the database refused on replay, with the reason (kept for a
//!   person to look at; a lineage record is never silently dropped).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::LineageError;
use crate::model::{ArtifactId, ExecutionId, ExecutionState, NewArtifact, NewExecution};

/// One write to the lineage database, with the time it happened (a replay keeps the original times).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Record {
    Artifact {
        artifact: NewArtifact,
        at: i64,
    },
    StartExecution {
        execution: NewExecution,
        inputs: Vec<ArtifactId>,
        at: i64,
    },
    FinishExecution {
        id: ExecutionId,
        state: ExecutionState,
        outputs: Vec<ArtifactId>,
        message: Option<String>,
        at: i64,
    },
    Deletion {
        resource: String,
        at: i64,
    },
}

pub(crate) struct Spool {
    dir: PathBuf,
}

/// Held while appending or replaying; released on drop.
pub(crate) struct SpoolLock {
    file: File,
}

impl Drop for SpoolLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes the release explicit.
        let _ = self.file.unlock();
    }
}

fn spool_err(path: &Path, source: std::io::Error) -> LineageError {
    LineageError::Spool { path: path.to_path_buf(), source }
}

impl Spool {
    pub(crate) fn new(dir: PathBuf) -> Spool {
        Spool { dir }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join("outbox.jsonl")
    }

    pub(crate) fn rejected_path(&self) -> PathBuf {
        self.dir.join("outbox.rejected.jsonl")
    }

    pub(crate) fn lock(&self) -> Result<SpoolLock, LineageError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| spool_err(&self.dir, e))?;
        let path = self.dir.join("outbox.lock");
        let file =
            OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| spool_err(&path, e))?;
        file.lock().map_err(|e| spool_err(&path, e))?;
        Ok(SpoolLock { file })
    }

    /// Whether records are waiting (cheap: a missing or empty file means none).
    pub(crate) fn has_pending(&self) -> bool {
        std::fs::metadata(self.path()).map(|m| m.len() > 0).unwrap_or(false)
    }

    /// Number of records waiting.
    pub(crate) fn pending(&self, lock: &SpoolLock) -> Result<usize, LineageError> {
        Ok(self.read(lock)?.len())
    }

    /// Appends one record and makes it durable (file and directory entry) before returning.
    pub(crate) fn append(&self, record: &Record, _lock: &SpoolLock) -> Result<(), LineageError> {
        append_line(&self.dir, &self.path(), &serde_json::to_string(record).map_err(LineageError::Encode)?)
    }

    /// Sets a refused record aside with the database's reason.
    pub(crate) fn reject(&self, line: &str, reason: &str, _lock: &SpoolLock) -> Result<(), LineageError> {
        let entry = serde_json::json!({ "record": line, "reason": reason });
        append_line(&self.dir, &self.rejected_path(), &entry.to_string())
    }

    /// The waiting records, oldest first, each with its line as written.
    pub(crate) fn read(&self, _lock: &SpoolLock) -> Result<Vec<String>, LineageError> {
        let path = self.path();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(spool_err(&path, e)),
        };
        let mut lines = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| spool_err(&path, e))?;
            if !line.trim().is_empty() {
                lines.push(line);
            }
        }
        Ok(lines)
    }

    /// Replaces the waiting records by `remaining` (atomically: temp file, fsync, rename).
    pub(crate) fn replace(&self, remaining: &[String], _lock: &SpoolLock) -> Result<(), LineageError> {
        let path = self.path();
        if remaining.is_empty() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(spool_err(&path, e)),
            }
            return sync_dir(&self.dir);
        }
        let tmp = self.dir.join("outbox.jsonl.tmp");
        let mut f = File::create(&tmp).map_err(|e| spool_err(&tmp, e))?;
        for line in remaining {
            writeln!(f, "{line}").map_err(|e| spool_err(&tmp, e))?;
        }
        f.sync_all().map_err(|e| spool_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| spool_err(&path, e))?;
        sync_dir(&self.dir)
    }
}

fn append_line(dir: &Path, path: &Path, line: &str) -> Result<(), LineageError> {
    let existed = path.exists();
    let mut f = OpenOptions::new().create(true).append(true).open(path).map_err(|e| spool_err(path, e))?;
    // One write per record: a crash leaves at most a torn last line, never two records interleaved.
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    f.write_all(&buf).map_err(|e| spool_err(path, e))?;
    f.sync_data().map_err(|e| spool_err(path, e))?;
    if !existed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Makes a created, renamed or removed directory entry durable.
fn sync_dir(dir: &Path) -> Result<(), LineageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| spool_err(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ArtifactKind, ExecutionKind};

    #[test]
    fn appends_read_back_in_order_and_replace_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("spool"));
        let lock = spool.lock().unwrap();
        assert!(!spool.has_pending());
        let a =
            Record::Artifact { artifact: NewArtifact::new(ArtifactKind::Model, "file:///m", "a".repeat(64)), at: 1 };
        let s = Record::StartExecution {
            execution: NewExecution::new(ExecutionKind::Prune, "h", "local:/o"),
            inputs: vec![ArtifactId::for_key("file:///m", &"a".repeat(64))],
            at: 2,
        };
        spool.append(&a, &lock).unwrap();
        spool.append(&s, &lock).unwrap();
        assert!(spool.has_pending());
        let lines = spool.read(&lock).unwrap();
        let back: Vec<Record> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(back, vec![a, s.clone()]);
        spool.replace(&lines[1..], &lock).unwrap();
        assert_eq!(spool.read(&lock).unwrap(), lines[1..].to_vec());
        spool.replace(&[], &lock).unwrap();
        assert!(!spool.has_pending());
        assert_eq!(spool.pending(&lock).unwrap(), 0);
    }
}
