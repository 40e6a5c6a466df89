//! `lacuna serve`: the OpenAI-compatible inference service (also the inference pod's entrypoint).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lacuna_services::{Application, Backend, Settings};

use crate::resolve;

/// Every flag overrides the config file and the `LACUNA_*` environment (see docs/serving.md).
#[derive(Args)]
pub struct ServeArgs {
    /// GGUF file, Hugging Face directory, or known model name.
    #[arg(long)]
    model: Option<String>,
    /// The name clients send as `model` (default: the model file's stem or directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long)]
    backend: Option<Backend>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// File holding the API key that `/v1/*` requests must send as `Authorization: Bearer KEY`.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Most sequences in the decode batch.
    #[arg(long)]
    max_batch: Option<usize>,
    /// Most requests waiting for a batch slot (more get 429).
    #[arg(long)]
    max_queue: Option<usize>,
    /// Most tokens, prompt plus completion, of one sequence (default: the model's context).
    #[arg(long)]
    max_context: Option<usize>,
    /// KV cache values: f16 (default) or f32.
    #[arg(long)]
    kv_cache: Option<lacuna_model::KvDtype>,
    /// Most prompt tokens prefilled between two decode steps.
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Run the logits on a W8A8 (INT8) copy of the LM head.
    #[arg(long)]
    int8_lm_head: bool,
    /// Largest request body in bytes (larger: 413).
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long)]
    grace_seconds: Option<u64>,
    /// HTTP worker threads.
    #[arg(long)]
    http_workers: Option<usize>,
    /// YAML file with any of the settings (keys as the flags, with underscores).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(a: ServeArgs, verbose: u8) -> Result<()> {
    let _telemetry = lacuna_services::telemetry::init(if verbose > 0 { "debug" } else { "info" })?;
    let mut s = Settings::layered(a.config.as_deref())?;
    let model = a.model.or_else(|| s.model.as_ref().map(|p| p.to_string_lossy().into_owned()));
    if let Some(m) = model {
        let path = resolve::model_path(&m)?;
        // An inference pod given its input's checksum refuses a model that changed.
        crate::stage::verify_input(&path)?;
        s.model = Some(path);
    }
    macro_rules! flag {
        ($($f:ident),*) => { $(if let Some(v) = a.$f { s.$f = v; })* };
    }
    flag!(
        backend,
        host,
        port,
        max_batch,
        max_queue,
        kv_cache,
        prefill_chunk,
        max_body_bytes,
        grace_seconds,
        http_workers
    );
    if a.served_model_name.is_some() {
        s.served_model_name = a.served_model_name;
    }
    if a.api_key_file.is_some() {
        s.api_key_file = a.api_key_file;
    }
    if a.int8_lm_head {
        s.int8_lm_head = true;
    }
    if a.max_context.is_some() {
        s.max_context = a.max_context;
    }
    let app = Application::build(s)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(app.run_until_stopped())
}
