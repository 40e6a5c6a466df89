//! Content digests the pods put in `sha256`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::LineageError;

/// Lowercase hex SHA-256 of a file or a directory.
///
/// A file hashes to the SHA-256 of its bytes (what `sha256sum` prints). A directory hashes to the
/// SHA-256 of, for every regular file under it (symbolic links followed, so a Hugging Face cache
/// snapshot hashes like the files it points at) in byte order of the `/`-separated relative path:
/// the relative path, a NUL byte, the content length as a little-endian `u64`, and the content.
/// Names and contents both count: renaming a shard changes the digest, moving the directory does not.
pub fn sha256_of_path(path: &Path) -> Result<String, LineageError> {
    let io = |p: &Path, e: std::io::Error| LineageError::Hash { path: p.to_path_buf(), source: e };
    let meta = std::fs::metadata(path).map_err(|e| io(path, e))?;
    let mut h = Sha256::new();
    if meta.is_file() {
        hash_file(path, &mut h, false)?;
        return Ok(hex::encode(h.finalize()));
    }
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in walkdir::WalkDir::new(path).follow_links(true) {
        let entry = entry.map_err(|e| {
            let p = e.path().unwrap_or(path).to_path_buf();
            io(&p, e.into())
        })?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(path).unwrap_or(entry.path());
        let mut parts = Vec::new();
        for c in rel.components() {
            let s = c.as_os_str().to_str().ok_or_else(|| {
                io(entry.path(), std::io::Error::new(std::io::ErrorKind::InvalidData, "file name is not UTF-8"))
            })?;
            parts.push(s.to_owned());
        }
        files.push((parts.join("/"), entry.path().to_path_buf()));
    }
    files.sort();
    for (rel, full) in &files {
        h.update(rel.as_bytes());
        h.update([0u8]);
        hash_file(full, &mut h, true)?;
    }
    Ok(hex::encode(h.finalize()))
}

fn hash_file(path: &Path, h: &mut Sha256, with_len: bool) -> Result<(), LineageError> {
    let io = |e: std::io::Error| LineageError::Hash { path: path.to_path_buf(), source: e };
    let mut f = File::open(path).map_err(io)?;
    if with_len {
        let len = f.metadata().map_err(io)?.len();
        h.update(len.to_le_bytes());
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn a_file_hashes_to_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.bin");
        std::fs::write(&f, b"abc").unwrap();
        // The FIPS 180-2 test vector for "abc".
        assert_eq!(sha256_of_path(&f).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn a_directory_hashes_sorted_paths_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("m");
        std::fs::create_dir_all(d.join("a")).unwrap();
        // Byte order of full relative paths puts "a.txt" ('.' = 0x2e) before "a/b" ('/' = 0x2f),
        // unlike a per-directory walk.
        std::fs::write(d.join("a/b"), b"xy").unwrap();
        std::fs::write(d.join("a.txt"), b"z").unwrap();
        std::fs::create_dir_all(d.join("empty")).unwrap();
        let mut want = Vec::new();
        for (rel, content) in [("a.txt", &b"z"[..]), ("a/b", &b"xy"[..])] {
            want.extend_from_slice(rel.as_bytes());
            want.push(0);
            want.extend_from_slice(&(content.len() as u64).to_le_bytes());
            want.extend_from_slice(content);
        }
        let got = sha256_of_path(&d).unwrap();
        assert_eq!(got, sha(&want));

        // Moving the directory keeps the digest; renaming or editing a file changes it.
        let moved = dir.path().join("moved");
        std::fs::rename(&d, &moved).unwrap();
        assert_eq!(sha256_of_path(&moved).unwrap(), got);
        std::fs::rename(moved.join("a.txt"), moved.join("c.txt")).unwrap();
        let renamed = sha256_of_path(&moved).unwrap();
        assert_ne!(renamed, got);
        std::fs::write(moved.join("a/b"), b"xz").unwrap();
        assert_ne!(sha256_of_path(&moved).unwrap(), renamed);
    }

    #[test]
    fn a_missing_path_is_an_error_naming_it() {
        let err = sha256_of_path(Path::new("/nonexistent/lacuna-model")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/lacuna-model"), "{err}");
    }
}
