//! The subcommands (except `bench`): thin layers over the library crates.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lacuna_data::{Cache, DatasetName, Split};
use lacuna_model::chat::{ChatMessage, ChatTemplate};
use lacuna_model::generate::{GenerateParams, generate as run_generate};
use lacuna_model::hf::SaveOptions;
use lacuna_model::sampling::SamplingParams;
use lacuna_model::weights::Dtype;
use lacuna_model::{Checkpoint, eval, inspect as inspect_mod};

use crate::JsonFlag;
use crate::resolve::{model_path, spinner, text};

pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn open_model(arg: &str) -> Result<Checkpoint> {
    load_model(&model_path(arg)?)
}

/// How the CPU engine runs a loaded model (`generate`, `eval perplexity`, `bench`; `serve` has
/// the same flag among its settings).
#[derive(Args, Clone, Debug, Default)]
pub struct EngineArgs {
    /// Run the logits on a W8A8 copy of the LM head (the tied embedding or `lm_head`, rows
    /// rounded to INT8 at load, hidden states quantized per token): a quarter of the head's
    /// bytes per token; the logits move a little. CPU only.
    #[arg(long)]
    pub int8_lm_head: bool,
}

impl EngineArgs {
    /// Applies the options to a loaded checkpoint.
    pub fn apply(&self, ck: &mut Checkpoint) -> Result<()> {
        if self.int8_lm_head {
            ck.model.quantize_lm_head().context("quantizing the LM head to INT8")?;
        }
        Ok(())
    }

    /// An error when an option the CPU engine alone has is asked of another device.
    pub fn check_device(&self, device: &lacuna_gpu::DeviceSpec) -> Result<()> {
        if self.int8_lm_head && !matches!(device, lacuna_gpu::DeviceSpec::Cpu) {
            bail!("--int8-lm-head runs on the CPU engine only (device {device:?})");
        }
        Ok(())
    }
}

/// [`open_model`] with the engine options applied.
pub fn open_engine_model(arg: &str, engine: &EngineArgs) -> Result<Checkpoint> {
    let mut ck = open_model(arg)?;
    engine.apply(&mut ck)?;
    Ok(ck)
}

/// Loads the checkpoint at `path` (a spinner while it reads).
pub fn load_model(path: &std::path::Path) -> Result<Checkpoint> {
    let pb = spinner(&format!("loading {}", path.display()));
    let ck = Checkpoint::open(path).with_context(|| format!("loading model {}", path.display()))?;
    pb.finish_and_clear();
    Ok(ck)
}

#[derive(Args)]
pub struct ModelFetchArgs {
    /// Model name (see `lacuna model list`).
    pub name: String,
    /// Also write it as a Hugging Face directory here.
    #[arg(long)]
    pub hf_out: Option<PathBuf>,
    #[command(flatten)]
    pub json: JsonFlag,
}

pub fn model_fetch(a: ModelFetchArgs) -> Result<()> {
    let cache = Cache::from_env()?;
    let pb = spinner(&format!("fetching {}", a.name));
    let m = lacuna_data::fetch_model(&cache, &a.name, &|s| pb.set_message(s.to_owned()))
        .with_context(|| format!("fetching model {}", a.name))?;
    pb.finish_and_clear();
    if let Some(out) = &a.hf_out {
        convert(ConvertArgs {
            model: m.path.display().to_string(),
            out: out.clone(),
            dtype: None,
            max_shard_size: "5GB".into(),
            overwrite: false,
        })?;
    }
    if a.json.json {
        let mut v = serde_json::to_value(&m)?;
        v["path"] = serde_json::json!(m.path);
        return print_json(&v);
    }
    println!("{}  {}  sha256 {}  from {} ({})", m.name, m.path.display(), m.sha256, m.source, m.licence);
    Ok(())
}

pub fn model_list(a: JsonFlag) -> Result<()> {
    let names = lacuna_data::known_models();
    if a.json {
        return print_json(&names);
    }
    names.iter().for_each(|n| println!("{n}"));
    Ok(())
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Model: a GGUF file, a Hugging Face directory, or a known name.
    pub model: String,
    /// Output directory (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Store tensors as f32, bf16 or f16 (default: as loaded; GGUF block formats load as f32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Shard the safetensors above this size (e.g. 5GB, 500MB).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.to_ascii_uppercase() {
        u if u.ends_with("GB") => (&s[..s.len() - 2], 1_000_000_000u64),
        u if u.ends_with("MB") => (&s[..s.len() - 2], 1_000_000),
        u if u.ends_with("KB") => (&s[..s.len() - 2], 1_000),
        _ => (s, 1),
    };
    let n: f64 = num.trim().parse().with_context(|| format!("invalid size {s:?} (e.g. 5GB, 500MB)"))?;
    if n.is_nan() || n <= 0.0 {
        bail!("size must be positive, got {s:?}");
    }
    Ok((n * mult as f64) as u64)
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let ck = open_model(&a.model)?;
    let dtype = a.dtype.as_deref().map(str::parse::<Dtype>).transpose()?;
    let opts = SaveOptions {
        dtype,
        max_shard_bytes: parse_size(&a.max_shard_size)?,
        overwrite: a.overwrite,
        ..Default::default()
    };
    let pb = spinner(&format!("writing {}", a.out.display()));
    lacuna_model::hf::save_dir(&a.out, ck.model.config(), &ck.model.tensors(), Some(&ck.tokenizer), &opts)
        .with_context(|| format!("writing {}", a.out.display()))?;
    pb.finish_and_clear();
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

#[derive(Args)]
pub struct DataFetchArgs {
    /// wiki, sotu, python, humaneval, or all.
    pub name: String,
    #[command(flatten)]
    pub json: JsonFlag,
}

pub fn data_fetch(a: DataFetchArgs) -> Result<()> {
    let names: Vec<DatasetName> = if a.name == "all" {
        DatasetName::ALL.to_vec()
    } else {
        vec![a.name.parse().map_err(|e| anyhow::anyhow!("{e}"))?]
    };
    let cache = Cache::from_env()?;
    let mut out = Vec::new();
    for name in names {
        let pb = spinner(&format!("fetching {name}"));
        let d = lacuna_data::fetch_dataset(&cache, name, &|s| pb.set_message(s.to_owned()))
            .with_context(|| format!("fetching dataset {name}"))?;
        pb.finish_and_clear();
        if !a.json.json {
            let count = |s: Split| d.manifest.split(s).map(|i| i.documents).unwrap_or(0);
            println!(
                "{name}: {} documents (train {}, calibration {}, heldout {}) in {}{}",
                d.manifest.documents,
                count(Split::Train),
                count(Split::Calibration),
                count(Split::Heldout),
                d.dir.display(),
                if d.fresh { "" } else { " (cached)" }
            );
        }
        out.push(d.manifest);
    }
    if a.json.json {
        return print_json(&out);
    }
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// Model: a GGUF file, a Hugging Face directory, or a known name.
    pub model: String,
    /// List every tensor, not just the layers.
    #[arg(long)]
    pub tensors: bool,
    #[command(flatten)]
    pub json: JsonFlag,
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let path = model_path(&a.model)?;
    let pb = spinner(&format!("reading {}", path.display()));
    let r = inspect_mod::inspect(&path).with_context(|| format!("inspecting {}", path.display()))?;
    pb.finish_and_clear();
    if a.json.json {
        return print_json(&r);
    }
    println!("{} ({}), {} parameters", path.display(), r.format, r.parameters);
    println!(
        "sparsity: decoder linear weights {:.2}%, all parameters {:.2}%",
        100.0 * r.decoder_linear_sparsity,
        100.0 * r.global_sparsity
    );
    if a.tensors {
        println!("{:<52} {:>6} {:>12} {:>16} {:>9}", "tensor", "dtype", "format", "shape", "sparsity");
        for t in &r.tensors {
            let shape = format!("{:?}", t.shape);
            println!("{:<52} {:>6} {:>12} {:>16} {:>8.2}%", t.name, t.dtype, t.format, shape, 100.0 * t.sparsity);
        }
    } else {
        println!("{:>5} {:>12} {:>9}  format", "layer", "params", "sparsity");
        for l in &r.layers {
            println!("{:>5} {:>12} {:>8.2}%  {}", l.layer, l.numel, 100.0 * l.sparsity, l.format);
        }
    }
    Ok(())
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> GenerateParams {
        GenerateParams {
            max_new_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            ignore_eos: false,
            ..Default::default()
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model: a GGUF file, a Hugging Face directory, or a known name.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Where the model runs: `cpu`, or CUDA device `cuda[:N]` (docs/gpu.md).
    #[arg(long, default_value = "cpu")]
    pub device: lacuna_gpu::DeviceSpec,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub json: JsonFlag,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    a.engine.check_device(&a.device)?;
    let ck = open_engine_model(&a.model, &a.engine)?;
    let ids = if a.chat {
        let tpl = ChatTemplate::from_tokenizer(&ck.tokenizer)?;
        let text = tpl.render(&[ChatMessage::new("user", a.prompt.clone())], true)?;
        ck.tokenizer.encode(&text, false)?
    } else {
        ck.tokenizer.encode(&a.prompt, true)?
    };
    let params = a.sampling.params();
    let mut stdout = std::io::stdout();
    let mut on_text = |t: &str| {
        if !a.json.json {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    };
    let g = match a.device {
        lacuna_gpu::DeviceSpec::Cpu => run_generate(&ck.model, &ck.tokenizer, &ids, &params, &mut on_text)?,
        lacuna_gpu::DeviceSpec::Cuda(ordinal) => {
            let capacity = (ids.len() + params.max_new_tokens + 1).min(ck.model.config().max_position_embeddings);
            let gpu = lacuna_gpu::Gpu::new(ordinal)?;
            let mut m = lacuna_gpu::GpuLlama::load(gpu, &ck.model, 1, capacity)?;
            m.generate(&ck.tokenizer, &ids, &params, &mut on_text)?
        }
    };
    if a.json.json {
        return print_json(&g);
    }
    println!();
    let _ = std::io::stdout().flush();
    eprintln!(
        "[{} prompt tokens, {} generated, finish: {:?}; prefill {:.1} tok/s, decode {:.1} tok/s]",
        g.prompt_tokens,
        g.ids.len(),
        g.finish_reason,
        g.prompt_tokens as f64 / g.prefill_seconds.max(1e-9),
        g.ids.len() as f64 / g.decode_seconds.max(1e-9)
    );
    Ok(())
}

#[derive(Args)]
pub struct ChatArgs {
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// System prompt (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let ck = open_model(&a.model)?;
    let tpl = ChatTemplate::from_tokenizer(&ck.tokenizer)?;
    let mut messages: Vec<ChatMessage> = a.system.iter().map(|s| ChatMessage::new("system", s.clone())).collect();
    let base = messages.clone();
    let params = a.sampling.params();
    eprintln!("chatting with {} — /reset clears the conversation, /exit or end of input quits", ck.path.display());
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = base.clone();
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", line));
        let ids = ck.tokenizer.encode(&tpl.render(&messages, true)?, false)?;
        let g = run_generate(&ck.model, &ck.tokenizer, &ids, &params, |t| {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        })?;
        println!();
        messages.push(ChatMessage::new("assistant", g.text));
    }
    Ok(())
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// A corpus (wiki, sotu, python, humaneval: its held-out split) or a text file.
    #[arg(long, default_value = "wiki")]
    pub data: String,
    /// Which split of a corpus.
    #[arg(long, default_value = "heldout")]
    pub split: String,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Evaluate at most this many segments.
    #[arg(long)]
    pub max_segments: Option<usize>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub json: JsonFlag,
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let split: Split = a.split.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let ck = open_engine_model(&a.model, &a.engine)?;
    let (txt, docs) = text(&a.data, split)?;
    let ids = ck.tokenizer.encode(&txt, false)?;
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} segments  {elapsed} (eta {eta})").expect("static template"),
    );
    let r = eval::perplexity(&ck.model, &ids, a.seq_len, a.max_segments, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    if a.json.json {
        let v = serde_json::json!({
            "model": ck.path, "data": a.data, "split": a.split, "documents": docs,
            "text_tokens": ids.len(), "report": r,
        });
        return print_json(&v);
    }
    println!(
        "perplexity {:.4} (mean NLL {:.4}) over {} tokens in {} segments of {}; {:.1}s",
        r.perplexity, r.mean_nll, r.tokens_evaluated, r.segments, r.seq_len, r.seconds
    );
    Ok(())
}

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    #[arg(long, default_value = "What is the capital of France? Answer in one sentence.")]
    pub prompt: String,
    /// Perplexity segments of 512 tokens on held-out Wikipedia extracts.
    #[arg(long, default_value_t = 16)]
    pub segments: usize,
}

/// Fetch → generate → evaluate, each step through the same code as its own subcommand.
pub fn demo(a: DemoArgs) -> Result<()> {
    eprintln!("== fetch");
    let path = model_path(&a.model)?;
    println!("model: {}", path.display());
    data_fetch(DataFetchArgs { name: "wiki".into(), json: JsonFlag { json: false } })?;
    eprintln!("== generate (chat template, greedy)");
    println!("user: {}", a.prompt);
    print!("assistant: ");
    let sampling = SamplingArgs { max_tokens: 64, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, stop: vec![] };
    let model = path.display().to_string();
    generate(GenerateArgs {
        model: model.clone(),
        prompt: a.prompt,
        chat: true,
        sampling,
        device: lacuna_gpu::DeviceSpec::Cpu,
        engine: EngineArgs::default(),
        json: JsonFlag { json: false },
    })?;
    eprintln!("== perplexity (wiki held-out, {} × 512 tokens)", a.segments);
    perplexity(PerplexityArgs {
        model,
        data: "wiki".into(),
        split: "heldout".into(),
        seq_len: 512,
        max_segments: Some(a.segments),
        engine: EngineArgs::default(),
        json: JsonFlag { json: false },
    })
}
