//! The cache root, checksums, atomic writes and per-item locks.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Where fetched models and data live, plus the environment given to registry clients.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    client_env: Vec<(OsString, OsString)>,
}

impl Cache {
    /// `$LACUNA_CACHE`, else `$XDG_CACHE_HOME/lacuna`, else `$HOME/.cache/lacuna` (empty values
    /// count as unset).
    pub fn from_env() -> Result<Cache> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let root = var("LACUNA_CACHE")
            .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("lacuna")))
            .or_else(|| var("HOME").map(|p| p.join(".cache").join("lacuna")))
            .ok_or(Error::NoCacheRoot)?;
        Ok(Cache::at(root))
    }

    /// A cache rooted at `root` (created on first write).
    pub fn at(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into(), client_env: Vec::new() }
    }

    /// Adds an environment variable for the registry clients (`pip`, `npm`) this cache runs, e.g.
    /// `PIP_INDEX_URL` or `npm_config_registry` to use a mirror.
    pub fn with_client_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Cache {
        self.client_env.push((key.into(), value.into()));
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn client_env(&self) -> &[(OsString, OsString)] {
        &self.client_env
    }

    pub(crate) fn downloads_dir(&self) -> PathBuf {
        self.root.join("downloads")
    }

    pub(crate) fn model_dir(&self, name: &str) -> PathBuf {
        self.root.join("models").join(name)
    }

    pub(crate) fn dataset_dir(&self, name: &str) -> PathBuf {
        self.root.join("data").join(name)
    }

    /// Holds an exclusive lock on `<root>/locks/<kind>-<name>.lock` until the guard drops, so two
    /// processes fetching the same item wait for each other instead of duplicating the work.
    pub(crate) fn lock(&self, kind: &str, name: &str) -> Result<FileLock> {
        let dir = self.root.join("locks");
        create_dir_all(&dir)?;
        let path = dir.join(format!("{kind}-{name}.lock"));
        let file =
            File::options().create(true).truncate(false).write(true).open(&path).map_err(|e| io_err(&path, e))?;
        file.lock().map_err(|e| io_err(&path, e))?;
        Ok(FileLock { file })
    }
}

/// Unlocks on drop.
pub(crate) struct FileLock {
    file: File,
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the lock too; unlocking explicitly just makes it prompt.
        let _ = self.file.unlock();
    }
}

pub(crate) fn io_err(path: &Path, source: io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

pub(crate) fn create_dir_all(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 and length of a file's contents.
pub(crate) fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), len))
}

/// `Ok(())` when `path` exists and hashes to `expected`; a `Checksum` error when it differs; an
/// `Io` error when it cannot be read.
pub(crate) fn verify_file(path: &Path, expected: &str) -> Result<()> {
    let (actual, _) = sha256_file(path)?;
    if actual == expected {
        Ok(())
    } else {
        Err(Error::Checksum { file: path.to_path_buf(), expected: expected.to_string(), actual })
    }
}

/// Whether `path` exists and hashes to `expected` (unreadable counts as no).
pub(crate) fn file_matches(path: &Path, expected: &str) -> bool {
    verify_file(path, expected).is_ok()
}

/// What an atomic write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Written {
    pub sha256: String,
    pub bytes: u64,
}

/// A writer that hashes what passes through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `path` atomically: `fill` writes into a temporary file in the same directory, which is
/// synced and then renamed over `path`. If `expected_sha256` is given and the contents differ, the
/// temporary file is discarded and a `Checksum` error names `path`. On any error `path` is left
/// as it was.
pub(crate) fn atomic_write(
    path: &Path,
    expected_sha256: Option<&str>,
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<Written> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir_all(dir)?;
    let tmp = tempfile::Builder::new().prefix(".partial-").tempfile_in(dir).map_err(|e| io_err(dir, e))?;
    let written = {
        let mut w = HashingWriter { inner: BufWriter::new(tmp.as_file()), hasher: Sha256::new(), bytes: 0 };
        fill(&mut w)?;
        w.flush().map_err(|e| io_err(tmp.path(), e))?;
        Written { sha256: hex::encode(w.hasher.finalize()), bytes: w.bytes }
    };
    if let Some(expected) = expected_sha256
        && expected != written.sha256
    {
        return Err(Error::Checksum {
            file: path.to_path_buf(),
            expected: expected.to_string(),
            actual: written.sha256,
        });
    }
    tmp.as_file().sync_all().map_err(|e| io_err(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| io_err(path, e.error))?;
    sync_dir(dir);
    Ok(written)
}

/// Moves a finished file into place with a rename (same filesystem), after syncing it.
pub(crate) fn persist_file(from: &Path, to: &Path) -> Result<()> {
    File::open(from).and_then(|f| f.sync_all()).map_err(|e| io_err(from, e))?;
    fs::rename(from, to).map_err(|e| io_err(to, e))?;
    if let Some(dir) = to.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Makes a rename durable. Best effort: not every platform can open a directory for syncing.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_reports_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/out.txt");
        let w = atomic_write(&p, None, |w| w.write_all(b"hello").map_err(|e| io_err(&p, e))).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello");
        assert_eq!(w.bytes, 5);
        assert_eq!(w.sha256, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(sha256_file(&p).unwrap(), (w.sha256.clone(), 5));
        assert!(file_matches(&p, &w.sha256));
    }

    #[test]
    fn failed_atomic_write_leaves_old_file_and_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.txt");
        fs::write(&p, b"old").unwrap();
        let err = atomic_write(&p, None, |w| {
            w.write_all(b"half of the new").unwrap();
            Err(Error::Parse { file: "x".into(), message: "boom".into() })
        })
        .unwrap_err();
        assert!(matches!(err, Error::Parse { .. }));
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![OsString::from("out.txt")]);
    }

    #[test]
    fn atomic_write_with_wrong_expected_hash_errors_and_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        fs::write(&p, b"old").unwrap();
        let err =
            atomic_write(&p, Some(&"0".repeat(64)), |w| w.write_all(b"new").map_err(|e| io_err(&p, e))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("out.bin") && msg.contains(&"0".repeat(64)), "{msg}");
        assert!(msg.contains(&sha256_hex(b"new")), "{msg}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn corrupted_file_fails_verification_naming_file_and_both_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        fs::write(&p, b"{\"id\":\"a\"}\n").unwrap();
        let good = sha256_file(&p).unwrap().0;
        verify_file(&p, &good).unwrap();
        fs::write(&p, b"{\"id\":\"b\"}\n").unwrap();
        let msg = verify_file(&p, &good).unwrap_err().to_string();
        assert!(msg.contains("a.jsonl") && msg.contains(&good), "{msg}");
        assert!(msg.contains(&sha256_hex(b"{\"id\":\"b\"}\n")), "{msg}");
        assert!(!file_matches(&dir.path().join("missing"), &good));
    }

    #[test]
    fn cache_paths_follow_layout() {
        let c = Cache::at("/r");
        assert_eq!(c.downloads_dir(), Path::new("/r/downloads"));
        assert_eq!(c.model_dir("m"), Path::new("/r/models/m"));
        assert_eq!(c.dataset_dir("wiki"), Path::new("/r/data/wiki"));
    }

    #[test]
    fn lock_is_exclusive_between_handles() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::at(dir.path());
        let g = c.lock("data", "x").unwrap();
        let f = File::options().write(true).open(dir.path().join("locks/data-x.lock")).unwrap();
        assert!(matches!(f.try_lock(), Err(fs::TryLockError::WouldBlock)));
        drop(g);
        f.try_lock().unwrap();
    }
}
