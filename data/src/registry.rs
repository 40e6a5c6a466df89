//! Downloading pinned artifacts with the registries' own clients, run as subprocesses.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{Cache, create_dir_all, file_matches, io_err, persist_file, sha256_file};
use crate::{Error, Result};

/// A package registry and the client used to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registry {
    /// `python3 -m pip download --no-deps --only-binary=:all:`
    PyPI,
    /// `npm pack`
    Npm,
}

impl Registry {
    pub fn as_str(self) -> &'static str {
        match self {
            Registry::PyPI => "PyPI",
            Registry::Npm => "npm",
        }
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One exact artifact of one exact package version.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pin {
    pub registry: Registry,
    pub package: &'static str,
    pub version: &'static str,
    /// Name under `<cache>/downloads/` (what the client names it).
    pub file: &'static str,
    pub sha256: &'static str,
}

impl Pin {
    pub fn spec(&self) -> String {
        match self.registry {
            Registry::PyPI => format!("{}=={}", self.package, self.version),
            Registry::Npm => format!("{}@{}", self.package, self.version),
        }
    }
}

/// Path of the verified artifact in `<cache>/downloads/`, downloading it if it is absent or its
/// checksum does not match (a corrupted download is replaced). Returns whether it was downloaded.
pub(crate) fn ensure_artifact(cache: &Cache, pin: &Pin, progress: &dyn Fn(&str)) -> Result<(PathBuf, bool)> {
    let dir = cache.downloads_dir();
    let dest = dir.join(pin.file);
    if file_matches(&dest, pin.sha256) {
        return Ok((dest, false));
    }
    create_dir_all(&dir)?;
    progress(&format!("downloading {} from {}", pin.spec(), pin.registry));
    // In the downloads dir so that the final rename stays on one filesystem.
    let tmp = tempfile::Builder::new().prefix(".download-").tempdir_in(&dir).map_err(|e| io_err(&dir, e))?;
    run_client(cache, pin, tmp.path())?;
    let got = find_artifact(pin, tmp.path())?;
    let (actual, _) = sha256_file(&got)?;
    if actual != pin.sha256 {
        return Err(Error::Checksum { file: got, expected: pin.sha256.to_string(), actual });
    }
    persist_file(&got, &dest)?;
    Ok((dest, true))
}

fn run_client(cache: &Cache, pin: &Pin, into: &Path) -> Result<()> {
    let (program, args): (&str, Vec<OsString>) = match pin.registry {
        Registry::PyPI => (
            "python3",
            vec![
                "-m".into(),
                "pip".into(),
                "download".into(),
                "--no-deps".into(),
                "--only-binary=:all:".into(),
                "--disable-pip-version-check".into(),
                "-d".into(),
                into.as_os_str().to_owned(),
                pin.spec().into(),
            ],
        ),
        Registry::Npm => {
            ("npm", vec!["pack".into(), pin.spec().into(), "--pack-destination".into(), into.as_os_str().to_owned()])
        }
    };
    let mut cmd = Command::new(program);
    // The temp dir as working directory keeps npm away from any package.json around the caller.
    cmd.args(&args).current_dir(into);
    for (k, v) in cache.client_env() {
        cmd.env(k, v);
    }
    let command = format!("{program} {}", args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::ClientMissing {
                registry: pin.registry.as_str(),
                package: pin.spec(),
                client: program.to_string(),
                detail: format!("`{program}` not found on PATH"),
            });
        }
        Err(e) => {
            return Err(Error::ClientMissing {
                registry: pin.registry.as_str(),
                package: pin.spec(),
                client: program.to_string(),
                detail: e.to_string(),
            });
        }
    };
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if pin.registry == Registry::PyPI && stderr.contains("No module named pip") {
        return Err(Error::ClientMissing {
            registry: pin.registry.as_str(),
            package: pin.spec(),
            client: "python3 -m pip".into(),
            detail: tail(&stderr, 5),
        });
    }
    let stderr =
        if stderr.trim().is_empty() { String::from_utf8_lossy(&out.stdout).into_owned() } else { stderr.into_owned() };
    Err(Error::Registry {
        registry: pin.registry.as_str(),
        package: pin.spec(),
        command,
        status: out.status.to_string(),
        stderr_tail: error_summary(&stderr),
    })
}

/// The client's last lines, preceded by its first error line when that scrolled out of them
/// (npm prints the cause first and a stack trace after it).
fn error_summary(stderr: &str) -> String {
    let t = tail(stderr, 12);
    match stderr.lines().find(|l| l.to_ascii_lowercase().contains("error")).map(str::trim) {
        Some(first) if !t.contains(first) => format!("{first}\n...\n{t}"),
        _ => t,
    }
}

/// The pinned file name if the client produced it, else the only file it produced (the checksum
/// decides whether it is the right one).
fn find_artifact(pin: &Pin, dir: &Path) -> Result<PathBuf> {
    let expected = dir.join(pin.file);
    if expected.is_file() {
        return Ok(expected);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    if found.len() == 1 {
        return Ok(found.remove(0));
    }
    Err(Error::ArtifactMissing {
        registry: pin.registry.as_str(),
        package: pin.spec(),
        dir: dir.to_path_buf(),
        expected: pin.file.to_string(),
        found: found
            .iter()
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The last `n` non-empty lines of `s`, at most 4000 bytes.
pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let t = lines[lines.len().saturating_sub(n)..].join("\n");
    if t.len() > 4000 {
        let mut cut = t.len() - 4000;
        while !t.is_char_boundary(cut) {
            cut += 1;
        }
        t[cut..].to_string()
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_nonempty_lines() {
        assert_eq!(tail("a\n\nb\nc\n\n", 2), "b\nc");
        assert_eq!(tail("", 3), "");
        let long = "é".repeat(3000);
        let t = tail(&long, 1);
        assert!(t.len() <= 4000 && t.chars().all(|c| c == 'é'));
    }

    #[test]
    fn error_summary_keeps_first_error_line() {
        let mut s = String::from("npm error code ECONNREFUSED\n");
        for i in 0..30 {
            s += &format!("npm error     at frame {i}\n");
        }
        let e = error_summary(&s);
        assert!(e.starts_with("npm error code ECONNREFUSED\n...\n"), "{e}");
        assert!(e.ends_with("frame 29"), "{e}");
        assert_eq!(error_summary("a\nERROR: x\n"), "a\nERROR: x");
    }

    #[test]
    fn corrupted_download_is_not_accepted_from_cache() {
        // A file under the pinned name with other contents must not be taken as the artifact;
        // with an unreachable client the fetch then fails instead of using it.
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path())
            .with_client_env("PIP_CONFIG_FILE", "/dev/null")
            .with_client_env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
            .with_client_env("PIP_RETRIES", "0");
        let pin = Pin {
            registry: Registry::PyPI,
            package: "lacuna-no-such-package",
            version: "0.0.1",
            file: "lacuna_no_such_package-0.0.1-py3-none-any.whl",
            sha256: "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        };
        std::fs::create_dir_all(cache.downloads_dir()).unwrap();
        std::fs::write(cache.downloads_dir().join(pin.file), b"corrupt").unwrap();
        let err = ensure_artifact(&cache, &pin, &|_| {}).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Registry { .. }), "expected a registry error, got {msg}");
        assert!(msg.contains("PyPI") && msg.contains("lacuna-no-such-package==0.0.1"), "{msg}");
        // The failed download left nothing behind but the old file.
        let names: Vec<_> = std::fs::read_dir(cache.downloads_dir()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
