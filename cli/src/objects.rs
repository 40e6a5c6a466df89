//! Models in object stores: `s3://bucket/prefix` as a stage's `--model` or `--out` (and as
//! `lacuna serve --model`), through the `object_store` crate.
//!
//! An input prefix is downloaded into the cache (`<cache>/s3/<bucket>/<prefix>`: every object,
//! written to a temporary directory, fsynced and renamed into place) and read from there; an
//! output is written to a staging directory (`<cache>/s3-out/<bucket>/<prefix>`) and uploaded once
//! it is complete, with a `lacuna.complete` marker object last, so a reader never takes a half-
//! uploaded model for a finished one. Credentials and endpoint come from the standard AWS
//! environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for
//! S3-compatible stores, `AWS_ALLOW_HTTP=true` for plain HTTP).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;

/// Written last by an upload: a prefix without it is not a finished model.
pub const COMPLETE_MARKER: &str = "lacuna.complete";

/// A parsed `s3://bucket/prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Uri {
    pub bucket: String,
    pub prefix: String,
}

impl S3Uri {
    /// `None` when `arg` is not an `s3://` URI.
    pub fn parse(arg: &str) -> Option<Result<S3Uri>> {
        let rest = arg.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        Some(if bucket.is_empty() || prefix.is_empty() || prefix.split('/').any(|c| c == ".." || c.is_empty()) {
            Err(anyhow::anyhow!("{arg}: expected s3://<bucket>/<prefix> (no empty or `..` components)"))
        } else {
            Ok(S3Uri { bucket: bucket.to_owned(), prefix: prefix.to_owned() })
        })
    }

    /// The same prefix with `suffix` appended to its last component (`…/m` → `…/m-bitmask`).
    pub fn with_suffix(&self, suffix: &str) -> S3Uri {
        S3Uri { bucket: self.bucket.clone(), prefix: format!("{}{suffix}", self.prefix) }
    }

    fn local(&self, root: &Path) -> PathBuf {
        root.join(&self.bucket).join(&self.prefix)
    }
}

impl std::fmt::Display for S3Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

fn store(uri: &S3Uri) -> Result<Arc<dyn ObjectStore>> {
    let s3 = AmazonS3Builder::from_env()
        .with_bucket_name(&uri.bucket)
        .build()
        .with_context(|| format!("{uri}: configuring the S3 client (AWS_* environment)"))?;
    Ok(Arc::new(s3))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

fn cache_root(dir: &str) -> Result<PathBuf> {
    Ok(lacuna_data::Cache::from_env()?.root().join(dir))
}

/// Downloads the model at `uri` into the cache and returns its directory.
pub fn fetch(uri: &S3Uri) -> Result<PathBuf> {
    let dest = uri.local(&cache_root("s3")?);
    runtime()?.block_on(download(uri, &dest)).with_context(|| format!("downloading {uri}"))?;
    Ok(dest)
}

async fn download(uri: &S3Uri, dest: &Path) -> Result<()> {
    let store = store(uri)?;
    let prefix = ObjectPath::from(uri.prefix.as_str());
    let mut objects = Vec::new();
    let mut listing = store.list(Some(&prefix));
    while let Some(meta) = listing.next().await {
        objects.push(meta?);
    }
    let marker = prefix.clone().join(COMPLETE_MARKER);
    if !objects.iter().any(|m| m.location == marker) {
        bail!("no finished model there ({} objects, no {COMPLETE_MARKER} marker)", objects.len());
    }
    let parent = dest.parent().context("download directory")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dest.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    for meta in objects.iter().filter(|m| m.location != marker) {
        let rel: Vec<String> = meta
            .location
            .prefix_match(&prefix)
            .context("object outside the prefix")?
            .map(|p| p.as_ref().to_owned())
            .collect();
        if rel.is_empty() || rel.iter().any(|c| c == "..") {
            continue;
        }
        let path = rel.iter().fold(tmp.clone(), |p, c| p.join(c));
        std::fs::create_dir_all(path.parent().context("object path")?)?;
        let mut file = tokio::fs::File::create(&path).await.with_context(|| format!("writing {}", path.display()))?;
        let mut body = store.get(&meta.location).await?.into_stream();
        while let Some(chunk) = body.next().await {
            file.write_all(&chunk?).await?;
        }
        file.sync_all().await?;
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("replacing {}", dest.display()))?;
    }
    std::fs::rename(&tmp, dest).with_context(|| format!("moving the download to {}", dest.display()))?;
    Ok(())
}

/// Where a stage writes its output: `--out` itself, or for `s3://` a staging directory in the
/// cache that [`Output::publish`] uploads once the stage has written everything.
#[derive(Clone, Debug)]
pub struct Output {
    pub local: PathBuf,
    pub remote: Option<S3Uri>,
}

impl Output {
    pub fn new(out: &Path) -> Result<Output> {
        match out.to_str().and_then(S3Uri::parse) {
            None => Ok(Output { local: out.to_path_buf(), remote: None }),
            Some(uri) => {
                let uri = uri?;
                Ok(Output { local: uri.local(&cache_root("s3-out")?), remote: Some(uri) })
            }
        }
    }

    /// The URI the output is known by.
    pub fn uri(&self) -> String {
        match &self.remote {
            Some(r) => r.to_string(),
            None => lacuna_lineage::file_uri(&self.local),
        }
    }

    /// Uploads the output (and its `-bitmask` sibling, when written) to its object store; nothing
    /// to do for a local output.
    pub fn publish(&self, bitmask: Option<&Path>) -> Result<()> {
        let Some(uri) = &self.remote else { return Ok(()) };
        let rt = runtime()?;
        rt.block_on(upload(&self.local, uri)).with_context(|| format!("uploading {}", uri))?;
        if let Some(b) = bitmask.filter(|b| b.exists()) {
            let sibling = uri.with_suffix("-bitmask");
            rt.block_on(upload(b, &sibling)).with_context(|| format!("uploading {sibling}"))?;
        }
        Ok(())
    }
}

/// Uploads every file under `dir` to `uri`, removes objects of an earlier upload that `dir` does
/// not have, and writes the completion marker last.
async fn upload(dir: &Path, uri: &S3Uri) -> Result<()> {
    let store = store(uri)?;
    let prefix = ObjectPath::from(uri.prefix.as_str());
    let marker = prefix.clone().join(COMPLETE_MARKER);
    // A reader must not take a half-replaced model for a finished one.
    match store.delete(&marker).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let mut written = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(dir)?;
            let location =
                rel.components().fold(prefix.clone(), |p, c| p.join(c.as_os_str().to_string_lossy().as_ref()));
            let mut writer = BufWriter::new(store.clone(), location.clone());
            let mut file = tokio::fs::File::open(&path).await.with_context(|| format!("reading {}", path.display()))?;
            tokio::io::copy(&mut file, &mut writer).await?;
            writer.shutdown().await?;
            written.push(location);
        }
    }
    let mut listing = store.list(Some(&prefix));
    let mut stale = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        if !written.contains(&meta.location) && meta.location != marker {
            stale.push(meta.location);
        }
    }
    for location in stale {
        store.delete(&location).await?;
    }
    store.put(&marker, "complete\n".into()).await?;
    Ok(())
}
