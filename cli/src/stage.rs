//! The contract between a stage process (`lacuna prune`, `lacuna train pretrain|finetune`) and
//! whoever runs it: a `batch/v1` Job the operator created, or `lacuna apply` on one machine.
//!
//! - `LACUNA_INPUT_SHA256`: the SHA-256 (`lacuna_lineage::sha256_of_path`) the input model must
//!   have, as its producer reported it. The stage checks it before it loads a weight; on a mismatch
//!   it reports `ChecksumMismatch` and exits with [`EXIT_CHECKSUM_MISMATCH`] (the Job's pod-failure
//!   policy fails the Job at once on that code, without retries).
//! - `LACUNA_REPORT_PATH`: where the stage writes its [`PodReport`] as JSON when it ends (the
//!   pod's termination message, `/dev/termination-log`): the output artifact (uri, sha256, sparsity,
//!   metrics) or the failure's reason and message.
//! - `LACUNA_OUTPUT_URI`: the URI the output is known by (`pvc://claim/path`); without it, the
//!   `file://` URI of `--out`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use lacuna_api::crd::common::{INPUT_SHA256_ENV, REPORT_PATH_ENV, conditions};
use lacuna_api::crd::{OutputArtifact, PodReport};
use lacuna_model::checkpoint::Checkpoint;

use crate::commands::load_model;
use crate::objects::Output;
use crate::resolve::model_path;

/// Exit code of a stage whose input does not have the checksum it was given (`EX_DATAERR`).
pub const EXIT_CHECKSUM_MISMATCH: u8 = 65;
/// Environment variable with the URI of the stage's output.
pub const OUTPUT_URI_ENV: &str = "LACUNA_OUTPUT_URI";
/// A termination message longer than this is truncated by the kubelet (4096 bytes); failure
/// messages are cut to fit.
const MAX_REPORT_MESSAGE: usize = 3072;

/// The input's content is not what its producer recorded.
#[derive(Debug, thiserror::Error)]
#[error(
    "input {}: its SHA-256 is {actual} but its producer recorded {expected}; refusing to run on weights that changed",
    path.display()
)]
pub struct ChecksumMismatch {
    pub path: PathBuf,
    pub expected: String,
    pub actual: String,
}

/// Resolves the stage's input model, checks it against `LACUNA_INPUT_SHA256` when that is set,
/// then loads it.
pub fn open_input_model(arg: &str) -> Result<Checkpoint> {
    let path = model_path(arg)?;
    verify_input(&path)?;
    load_model(&path)
}

/// Checks `path` against `LACUNA_INPUT_SHA256` (nothing to check when it is unset or empty).
pub fn verify_input(path: &Path) -> Result<()> {
    let expected = match std::env::var(INPUT_SHA256_ENV) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_ascii_lowercase(),
        _ => return Ok(()),
    };
    let actual = lacuna_lineage::sha256_of_path(path).with_context(|| format!("hashing input {}", path.display()))?;
    if actual != expected {
        return Err(ChecksumMismatch { path: path.to_path_buf(), expected, actual }.into());
    }
    Ok(())
}

/// Writes the success report (when `LACUNA_REPORT_PATH` is set): the output's URI and SHA-256,
/// the sparsity and the metrics.
pub fn report_success(out: &Output, sparsity: Option<f64>, metrics: BTreeMap<String, f64>) -> Result<()> {
    let Some(report_path) = report_path() else {
        return Ok(());
    };
    let uri = std::env::var(OUTPUT_URI_ENV).ok().filter(|u| !u.is_empty()).unwrap_or_else(|| out.uri());
    let sha256 = lacuna_lineage::sha256_of_path(&out.local)
        .with_context(|| format!("hashing output {}", out.local.display()))?;
    let metrics = metrics.into_iter().filter(|(_, v)| v.is_finite()).collect();
    let output = OutputArtifact { uri, sha256: Some(sha256), sparsity: sparsity.map(|s| s.clamp(0.0, 1.0)), metrics };
    write_report(&report_path, &PodReport::Succeeded { output })
}

/// Reports a failed stage (when `LACUNA_REPORT_PATH` is set) and picks the exit code: 65 for a
/// checksum mismatch, 1 otherwise.
pub fn report_failure(e: &anyhow::Error) -> ExitCode {
    let (reason, code) = match e.downcast_ref::<ChecksumMismatch>() {
        Some(_) => (conditions::REASON_CHECKSUM_MISMATCH, EXIT_CHECKSUM_MISMATCH),
        None => (conditions::REASON_STAGE_FAILED, 1),
    };
    if let Some(path) = report_path() {
        let mut message = format!("{e:#}");
        if message.len() > MAX_REPORT_MESSAGE {
            let mut cut = MAX_REPORT_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        if let Err(w) = write_report(&path, &PodReport::Failed { reason: reason.to_owned(), message }) {
            eprintln!("warning: could not write the stage report: {w:#}");
        }
    }
    ExitCode::from(code)
}

fn report_path() -> Option<PathBuf> {
    std::env::var_os(REPORT_PATH_ENV).filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// The report in one write (a termination log is a plain file the kubelet reads after exit).
fn write_report(path: &Path, report: &PodReport) -> Result<()> {
    std::fs::write(path, serde_json::to_vec(report)?)
        .with_context(|| format!("writing the report to {}", path.display()))
}

/// When this process began (the first call, made first thing in `main`): a stage's lineage
/// execution spans its whole run although it is reported at the end.
pub fn started() -> std::time::SystemTime {
    static STARTED: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();
    *STARTED.get_or_init(std::time::SystemTime::now)
}

/// Where a block-by-block stage (`lacuna prune`, `lacuna quantize`) writes and how it resumes:
/// the flags both share.
#[derive(clap::Args, Clone, Debug)]
pub struct BlockStageArgs {
    /// Output directory (Hugging Face layout; `s3://…` is written to a staging directory and
    /// uploaded when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// The same model in the compressed-tensors `sparse-bitmask` layout (default:
    /// `<out>-bitmask`; `lacuna quantize` writes it for a sparse input).
    #[arg(long)]
    pub bitmask_out: Option<PathBuf>,
    /// Checkpoint directory (default: `<out>.checkpoint`); a run there is resumed.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Replace the output directories if they exist.
    #[arg(long)]
    pub overwrite: bool,
    /// Stop after this many blocks (the checkpoint is kept; run again to resume).
    #[arg(long, hide = true)]
    pub stop_after_blocks: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

/// A block stage's resolved places ([`BlockStageArgs::prepare`]).
pub struct BlockStagePlaces {
    /// The output as the stage publishes it (staged locally for an object-store URI).
    pub output: crate::objects::Output,
    pub bitmask_out: PathBuf,
    pub checkpoint_dir: PathBuf,
    /// Checkpointing and interruption for the block driver.
    pub run: lacuna_prune::pipeline::RunOptions,
}

impl BlockStageArgs {
    /// Resolves the defaults (`out` becomes the local directory the stage writes) and refuses
    /// to start when an output exists without `--overwrite`, before any weight is read.
    pub fn prepare(&mut self) -> Result<BlockStagePlaces> {
        let output = crate::objects::Output::new(&self.out)?;
        self.out = output.local.clone();
        let bitmask_out = self.bitmask_out.clone().unwrap_or_else(|| crate::resolve::sibling(&self.out, "-bitmask"));
        for out in [&self.out, &bitmask_out] {
            if out.exists() && !self.overwrite {
                anyhow::bail!("{} already exists (pass --overwrite to replace it)", out.display());
            }
        }
        let checkpoint_dir =
            self.checkpoint_dir.clone().unwrap_or_else(|| crate::resolve::sibling(&self.out, ".checkpoint"));
        let run = lacuna_prune::pipeline::RunOptions {
            checkpoint_dir: Some(checkpoint_dir.clone()),
            stop_after_blocks: self.stop_after_blocks,
        };
        Ok(BlockStagePlaces { output, bitmask_out, checkpoint_dir, run })
    }
}
