//! `lacuna lineage show`: the chain of executions and artifacts behind a model or a job; and the
//! best-effort lineage report of a local `lacuna prune` run.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lacuna_lineage::{
    Artifact, ArtifactKind, ChainLink, ExecutionKind, ExecutionState, LineageOptions, LineageStore, NewArtifact,
    NewExecution, file_uri, format_timestamp, kubernetes_resource, local_resource, sha256_of_path,
};
use sha2::{Digest, Sha256};

use crate::commands::print_json;

/// Environment variable with the lineage database URL; `off` disables recording by local runs.
const URL_ENV: &str = "LACUNA_LINEAGE_URL";

#[derive(Subcommand)]
pub enum LineageCmd {
    /// The chain that led to an artifact or job: base → pruned → pretrained → … → served.
    Show(ShowArgs),
}

#[derive(Args)]
pub struct ShowArgs {
    /// An artifact uri or local path, a sha256 prefix (8+ hex digits), or a job name
    /// (`name`, `namespace/name`, or a local run's output directory).
    pub target: String,
    /// Lineage database URL (`postgres://…` or `sqlite://path?mode=rwc`); default: SQLite at
    /// `lineage.db` in the cache (`$LACUNA_CACHE`, default `~/.cache/lacuna`).
    #[arg(long, env = URL_ENV)]
    pub db: Option<String>,
    /// Machine-readable output on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: LineageCmd) -> Result<()> {
    match cmd {
        LineageCmd::Show(a) => show(a),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

/// The store at `url` (or the default), spooling under the cache unless `LACUNA_LINEAGE_SPOOL` says.
async fn open(url: Option<&str>) -> Result<LineageStore> {
    let cache = lacuna_data::Cache::from_env()?;
    let url = match url {
        Some(u) => u.to_owned(),
        None => lacuna_lineage::sqlite_url(&cache.root().join("lineage.db")),
    };
    let mut options = LineageOptions::default();
    if std::env::var_os(lacuna_lineage::SPOOL_DIR_ENV).is_none_or(|v| v.is_empty()) {
        options.spool_dir = Some(cache.root().join("lineage-spool"));
    }
    Ok(LineageStore::connect_with(&url, options).await?)
}

fn show(a: ShowArgs) -> Result<()> {
    let chain = runtime()?.block_on(async {
        let store = open(a.db.as_deref()).await?;
        let chain = store.chain(&a.target).await?;
        anyhow::Ok((store.url().to_owned(), chain))
    })?;
    let (database, chain) = chain;
    if a.json {
        return print_json(&serde_json::json!({ "query": a.target, "database": database, "chain": chain }));
    }
    for (i, link) in chain.iter().enumerate() {
        println!("{}", human_line(link, i == 0));
    }
    Ok(())
}

/// One line per link: `  → prune succeeded (resource, time) → uri [model sha256:… sparsity …]`.
fn human_line(link: &ChainLink, first: bool) -> String {
    let mut line = String::new();
    if let Some(e) = &link.execution {
        line.push_str(&format!("{}→ {} {} ({}", if first { "" } else { "  " }, e.kind, e.state, e.resource));
        match e.finished_at {
            Some(t) => {
                line.push_str(&format!(", {:.1}s until {}", (t - e.started_at) as f64 / 1000.0, format_timestamp(t)))
            }
            None => line.push_str(&format!(", since {}", format_timestamp(e.started_at))),
        }
        if let Some(t) = e.resource_deleted_at {
            line.push_str(&format!(", deleted {}", format_timestamp(t)));
        }
        line.push(')');
        if let Some(m) = e.message.as_deref().filter(|m| !m.is_empty()) {
            line.push_str(&format!(" \"{m}\""));
        }
        if !link.side_inputs.is_empty() {
            let with: Vec<String> = link.side_inputs.iter().map(|a| format!("{} {}", a.kind, a.uri)).collect();
            line.push_str(&format!(" with {}", with.join(", ")));
        }
        if link.artifact.is_some() {
            line.push_str(" → ");
        }
    }
    if let Some(a) = &link.artifact {
        line.push_str(&describe(a));
    }
    if !link.other_outputs.is_empty() {
        let also: Vec<&str> = link.other_outputs.iter().map(|a| a.uri.as_str()).collect();
        line.push_str(&format!(" (also {})", also.join(", ")));
    }
    line
}

fn describe(a: &Artifact) -> String {
    let mut s = format!("{} [{} sha256:{}", a.uri, a.kind, &a.sha256[..a.sha256.len().min(12)]);
    if let Some(sp) = a.sparsity {
        s.push_str(&format!(" sparsity {:.1}%", 100.0 * sp));
    }
    if let Some(q) = &a.quantization {
        s.push_str(&format!(" {q}"));
    }
    for (k, v) in &a.metrics {
        match v.as_f64() {
            Some(x) => s.push_str(&format!(" {k} {x:.4}")),
            None => s.push_str(&format!(" {k} {v}")),
        }
    }
    s.push(']');
    s
}

/// What a stage (`lacuna prune`, `lacuna train …`) produced, for its lineage report.
pub struct StageRun<'a> {
    pub kind: ExecutionKind,
    pub model: &'a Path,
    pub recipe_file: Option<&'a Path>,
    /// The effective recipe (file plus flags), hashed into the execution's spec.
    pub recipe: serde_json::Value,
    /// The outputs: the dense directory, and the bitmask form when one was written.
    pub outputs: Vec<&'a Path>,
    pub sparsity: Option<f64>,
    /// The outputs' quantization (`w8a8`), when the stage quantized.
    pub quantization: Option<String>,
    /// Measurements attached to the outputs (`perplexity`, …).
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// One line on what it did (`sparsegpt to 50.00% sparsity`).
    pub message: String,
}

/// Records a finished stage (input model, recipe, outputs) in the lineage database. Never fails
/// the run: an unreachable database spools the records, anything else is a warning.
pub fn report_run(run: &StageRun) {
    best_effort(|store| record_run(store, run));
}

/// Records that `lacuna apply` serves `model` as the service `namespace/name` (an execution of kind
/// serve with the model as input, so the chain ends at the service), under the same resource
/// identity the operator records. Never fails the run.
pub fn report_serving(model: &Path, namespace: &str, name: &str, spec_hash: &str) {
    best_effort(|store| async move {
        let input = NewArtifact::new(ArtifactKind::Model, file_uri(model), sha256_of_path(model)?);
        let input = store.record_artifact(&input).await?;
        let resource = kubernetes_resource(namespace, name, lacuna_lineage::LOCAL_UID);
        let execution = NewExecution::new(ExecutionKind::Serve, spec_hash, resource);
        store.start_execution(&execution, &[input]).await?;
        Ok(())
    });
}

/// A lineage write that never fails the run: skipped when `LACUNA_LINEAGE_URL=off`; an error is a
/// warning, and so are records left in the spool because the database is unreachable.
fn best_effort<F: std::future::Future<Output = Result<()>>>(write: impl FnOnce(Arc<LineageStore>) -> F) {
    if std::env::var(URL_ENV).is_ok_and(|v| v == "off") {
        return;
    }
    let url = std::env::var(URL_ENV).ok().filter(|v| !v.is_empty());
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let store = Arc::new(open(url.as_deref()).await?);
            write(store.clone()).await?;
            anyhow::Ok((store.pending().await?, store.spool_dir().to_path_buf()))
        })
    });
    match result {
        Ok((0, _)) => {}
        Ok((pending, dir)) => eprintln!(
            "warning: lineage database unreachable; {pending} record(s) spooled in {} and replayed on the next \
             successful connection",
            dir.display()
        ),
        Err(e) => eprintln!("warning: lineage not recorded: {e:#}"),
    }
}

async fn record_run(store: Arc<LineageStore>, run: &StageRun<'_>) -> Result<()> {
    let model_sha = sha256_of_path(run.model)?;
    let model = store.record_artifact(&NewArtifact::new(ArtifactKind::Model, file_uri(run.model), &model_sha)).await?;
    let mut inputs = vec![model];
    if let Some(r) = run.recipe_file {
        let recipe = NewArtifact::new(ArtifactKind::Recipe, file_uri(r), sha256_of_path(r)?);
        inputs.push(store.record_artifact(&recipe).await?);
    }
    // The spec: the effective recipe applied to this input.
    let spec = serde_json::json!({ "kind": run.kind, "recipe": run.recipe, "model_sha256": model_sha });
    let spec_hash = hex::encode(Sha256::digest(serde_json::to_vec(&spec)?));
    let Some(first) = run.outputs.first() else { anyhow::bail!("a stage run without outputs") };
    // The job's identity when a job runs this stage (`lacuna apply`, a pod), else its output path.
    let resource = std::env::var(lacuna_lineage::RESOURCE_ENV)
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| local_resource(first));
    let execution = NewExecution::new(run.kind, spec_hash, resource);
    // The execution spans the stage's whole run (this process), not the moment it is reported.
    let started = crate::stage::started().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let id = store.start_execution_at(&execution, &inputs, started).await?;

    let mut outputs = Vec::new();
    for dir in &run.outputs {
        let mut a = NewArtifact::new(ArtifactKind::Model, file_uri(dir), sha256_of_path(dir)?);
        a.sparsity = run.sparsity.map(|s| s.clamp(0.0, 1.0));
        a.quantization = run.quantization.clone();
        a.metrics = run.metrics.clone();
        outputs.push(store.record_artifact(&a).await?);
    }
    store.finish_execution(&id, ExecutionState::Succeeded, &outputs, Some(&run.message)).await?;
    Ok(())
}
