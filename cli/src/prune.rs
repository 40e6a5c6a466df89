//! `lacuna prune`: one-shot pruning from a recipe file and/or flags (flags win), checkpointed
//! after every block and resumable, writing a Hugging Face directory with the zeros in place.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lacuna_api::{CalibrationSpec, PruneMethod, PruneRecipe, SparsityProfile, SparsityStructure};
use lacuna_data::{Cache, DatasetName, Split};
use lacuna_model::hf::{self, SaveOptions};
use lacuna_prune::pipeline::{self, Progress};

use crate::bench::peak_rss_bytes;
use crate::commands::print_json;
use crate::resolve::spinner;

#[derive(Args)]
pub struct PruneArgs {
    /// Model: a GGUF file, a Hugging Face directory, or a known name.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Recipe (YAML); flags below override its fields.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// sparsegpt, wanda or magnitude.
    #[arg(long)]
    pub method: Option<String>,
    /// Target sparsity in [0, 1).
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// uniform or owl.
    #[arg(long)]
    pub profile: Option<String>,
    #[arg(long)]
    pub owl_m: Option<f64>,
    #[arg(long)]
    pub owl_lambda: Option<f64>,
    /// unstructured or N:M (e.g. 2:4 — N zeros in every M inputs).
    #[arg(long)]
    pub structure: Option<String>,
    /// DATASET:SAMPLESxSEQ_LEN, e.g. wiki:128x512.
    #[arg(long)]
    pub calibration: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Regex over layer names to prune (repeatable; replaces the recipe's).
    #[arg(long)]
    pub targets: Vec<String>,
    /// Regex over layer names to leave dense (repeatable; replaces the recipe's).
    #[arg(long)]
    pub ignore: Vec<String>,
    #[command(flatten)]
    pub stage: crate::stage::BlockStageArgs,
}

/// The recipe: the file's, with every flag given applied on top.
pub fn recipe(a: &PruneArgs) -> Result<PruneRecipe> {
    let mut r: PruneRecipe = match &a.recipe {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            lacuna_api::from_yaml(&text).with_context(|| format!("recipe {}", p.display()))?
        }
        None => {
            let method: PruneMethod = a.method.as_deref().context("--method or --recipe is required")?.parse()?;
            lacuna_api::from_yaml(&format!("method: {}", serde_json::to_string(&method)?))?
        }
    };
    if let Some(m) = &a.method {
        r.method = m.parse()?;
    }
    if let Some(s) = a.sparsity {
        r.sparsity = Some(s);
    }
    if let Some(p) = &a.profile {
        r.profile = p.parse::<SparsityProfile>()?;
    }
    if let Some(m) = a.owl_m {
        r.owl.m = m;
    }
    if let Some(l) = a.owl_lambda {
        r.owl.lambda = l;
    }
    if let Some(s) = &a.structure {
        r.structure = s.parse::<SparsityStructure>()?;
    }
    if let Some(c) = &a.calibration {
        r.calibration = c.parse::<CalibrationSpec>()?;
    }
    if let Some(s) = a.seed {
        r.seed = s;
    }
    if !a.targets.is_empty() {
        r.targets = a.targets.clone();
    }
    if !a.ignore.is_empty() {
        r.ignore = a.ignore.clone();
    }
    r.validate()?;
    Ok(r)
}

/// The calibration windows of `spec` for `ck`: each corpus's calibration split, documents
/// tokenized and joined by EOS into one stream, corpus `i` drawn with seed `seed + i`. Shared by
/// `lacuna prune` and `lacuna quantize`.
pub fn calibration_windows(
    ck: &lacuna_model::checkpoint::Checkpoint,
    spec: &CalibrationSpec,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let mut calib = Vec::new();
    for (i, (corpus, samples)) in spec.datasets().into_iter().zip(spec.samples_per_dataset()).enumerate() {
        let pb = spinner(&format!("fetching {corpus}"));
        // A local text file (`file://…`, documents separated by blank lines or JSONL `text`)
        // gives its training documents; a known corpus its calibration split.
        let docs: Vec<String> = if corpus.starts_with("file://") {
            lacuna_train::data::load_source(None, corpus, &|_| {}).context("calibration.dataset")?.train
        } else {
            let name: DatasetName = corpus.parse().context("calibration.dataset")?;
            let cache = Cache::from_env()?;
            lacuna_data::fetch_dataset(&cache, name, &|s| pb.set_message(s.to_owned()))?;
            pb.set_message(format!("tokenizing the {name} calibration split"));
            lacuna_data::load_split(&cache, name, Split::Calibration)?.into_iter().map(|d| d.text).collect()
        };
        let name = corpus;
        // Documents joined by EOS into one stream, as pretraining data is packed.
        let sep = ck.tokenizer.eos_ids().first().copied();
        let mut stream = Vec::new();
        for d in docs {
            stream.extend(ck.tokenizer.encode(&d, false)?);
            stream.extend(sep);
        }
        pb.finish_and_clear();
        // Each corpus gets its own seeded stream of windows.
        let seed = seed.wrapping_add(i as u64);
        calib.extend(
            pipeline::calibration_windows(&stream, samples, spec.seq_len, seed)
                .with_context(|| format!("calibration.seqLen: the {name} calibration split"))?,
        );
    }
    Ok(calib)
}

pub fn run(mut a: PruneArgs) -> Result<()> {
    let recipe = recipe(&a)?;
    // An `s3://` output is written to a staging directory and uploaded when complete.
    let places = a.stage.prepare()?;
    let (output, bitmask_out, ckpt_dir) = (places.output, places.bitmask_out, places.checkpoint_dir);
    let mut ck = crate::stage::open_input_model(&a.model)?;
    pipeline::preflight(&ck.model, &recipe)?;

    let calib = if recipe.method == PruneMethod::Magnitude {
        Vec::new()
    } else {
        calibration_windows(&ck, &recipe.calibration, recipe.seed)?
    };

    let pb = ProgressBar::new(ck.model.num_layers() as u64);
    pb.set_style(ProgressStyle::with_template("{msg:>10} {bar:30} {pos}/{len} blocks  {elapsed} (eta {eta})")?);
    let opts = places.run;
    let summary = pipeline::prune_model(&mut ck.model, &recipe, &calib, &opts, &mut |p| match p {
        Progress::Owl { block, .. } => {
            pb.set_message("OWL");
            pb.set_position(block as u64);
        }
        Progress::Block { block, .. } => {
            pb.set_message(format!("{:?}", recipe.method).to_lowercase());
            pb.set_position(block as u64);
        }
    })?;
    pb.finish_and_clear();

    let pb = spinner(&format!("writing {}", a.stage.out.display()));
    let opts = SaveOptions { overwrite: a.stage.overwrite, ..Default::default() };
    let tensors = ck.model.tensors();
    hf::save_dir(&a.stage.out, ck.model.config(), &tensors, Some(&ck.tokenizer), &opts)
        .with_context(|| format!("writing {}", a.stage.out.display()))?;
    pb.set_message(format!("writing {}", bitmask_out.display()));
    let targets: Vec<String> = summary.layers.iter().map(|l| format!("{}.weight", l.name)).collect();
    // compressed-tensors counts kept weights (`2:4`: two of every four survive); recipes count pruned ones.
    let structure = match recipe.structure {
        SparsityStructure::NM { n, m } => format!("{}:{m}", m.saturating_sub(n)),
        SparsityStructure::Unstructured => "unstructured".to_owned(),
    };
    let quantization_config =
        hf::sparse_bitmask_quantization_config(summary.sparsity, &structure, &recipe.targets, &recipe.ignore);
    let opts = SaveOptions {
        overwrite: a.stage.overwrite,
        bitmask: Some(hf::BitmaskOptions { targets }),
        extra_config: [("quantization_config".to_owned(), quantization_config)].into(),
        ..Default::default()
    };
    hf::save_dir(&bitmask_out, ck.model.config(), &tensors, Some(&ck.tokenizer), &opts)
        .with_context(|| format!("writing {}", bitmask_out.display()))?;
    pb.finish_and_clear();
    let report = serde_json::json!({
        "model": ck.path,
        "recipe": recipe,
        "summary": summary,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    std::fs::write(a.stage.out.join("lacuna_prune.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::remove_dir_all(&ckpt_dir).with_context(|| format!("removing {}", ckpt_dir.display()))?;
    let perplexity = report.get("perplexity").or_else(|| report["summary"].get("perplexity")).filter(|p| p.is_number());
    crate::lineage::report_run(&crate::lineage::StageRun {
        kind: lacuna_lineage::ExecutionKind::Prune,
        model: &ck.path,
        recipe_file: a.recipe.as_deref(),
        recipe: serde_json::to_value(&recipe)?,
        outputs: vec![&a.stage.out, &bitmask_out],
        sparsity: Some(summary.sparsity),
        quantization: None,
        metrics: perplexity.map(|p| [("perplexity".to_owned(), p.clone())].into_iter().collect()).unwrap_or_default(),
        message: format!("{:?} to {:.2}% sparsity", recipe.method, 100.0 * summary.sparsity).to_lowercase(),
    });
    let metrics =
        perplexity.and_then(|p| p.as_f64()).map(|p| [("perplexity".to_owned(), p)].into()).unwrap_or_default();
    output.publish(Some(&bitmask_out))?;
    crate::stage::report_success(&output, Some(summary.sparsity), metrics)?;
    if a.stage.json {
        return print_json(&report);
    }
    println!(
        "pruned {} layers with {:?} to {:.2}% sparsity in {:.1}s{} → {} (and {})",
        summary.layers.len(),
        recipe.method,
        100.0 * summary.sparsity,
        summary.seconds,
        summary.resumed_at_block.map(|b| format!(" (resumed at block {b})")).unwrap_or_default(),
        a.stage.out.display(),
        bitmask_out.display()
    );
    Ok(())
}
