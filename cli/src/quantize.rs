//! `lacuna quantize`: SmoothQuant + GPTQ to INT8 weights (and, for `w8a8`, dynamic per-token INT8
//! activations), keeping the sparsity mask, from a recipe file and/or flags (flags win);
//! checkpointed after every block and resumable; written in the compressed-tensors
//! `int-quantized` layout (and, for a sparse input, also as `sparse-bitmask` over the int8 codes).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lacuna_api::{CalibrationSpec, QuantScheme, QuantizeRecipe, WeightRounding};
use lacuna_model::hf::{self, Int8Config, Int8Sparsity, SaveOptions};
use lacuna_model::int8::InputQuant;
use lacuna_model::weights::Weight;
use lacuna_prune::quantize::{self, QuantProgress};

use crate::bench::peak_rss_bytes;
use crate::commands::print_json;
use crate::resolve::spinner;

/// How many of the kurtosis ranking's entries the summary line prints.
const RANKING_SHOWN: usize = 8;

#[derive(Args)]
pub struct QuantizeArgs {
    /// Model: a GGUF file, a Hugging Face directory, or a known name.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Recipe (YAML, `QuantizeRecipe`); flags below override its fields.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// w8a8 (INT8 weights and per-token INT8 activations) or w8a16 (INT8 weights only).
    #[arg(long)]
    pub scheme: Option<String>,
    /// SmoothQuant migration strength α in [0, 1]; 0 disables smoothing.
    #[arg(long)]
    pub smoothquant_alpha: Option<f64>,
    /// Keep the N linear layers whose inputs have the highest kurtosis in floating point.
    #[arg(long)]
    pub skip_by_kurtosis: Option<usize>,
    /// gptq or nearest (round-to-nearest, no error compensation).
    #[arg(long)]
    pub rounding: Option<String>,
    /// GPTQ activation order (columns by decreasing Hessian diagonal).
    #[arg(long)]
    pub actorder: bool,
    /// DATASET[+DATASET]:SAMPLESxSEQ_LEN, e.g. wiki+python:128x512.
    #[arg(long)]
    pub calibration: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// GPTQ dampening, a fraction of the mean Hessian diagonal.
    #[arg(long)]
    pub dampening: Option<f64>,
    /// GPTQ columns per lazy-update block.
    #[arg(long)]
    pub block_size: Option<usize>,
    #[command(flatten)]
    pub stage: crate::stage::BlockStageArgs,
}

/// The recipe: the file's (or the defaults), with every flag given applied on top.
pub fn recipe(a: &QuantizeArgs) -> Result<QuantizeRecipe> {
    let mut r: QuantizeRecipe = match &a.recipe {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            lacuna_api::from_yaml(&text).with_context(|| format!("recipe {}", p.display()))?
        }
        None => lacuna_api::from_yaml("{}")?,
    };
    if let Some(s) = &a.scheme {
        r.scheme = s.parse::<QuantScheme>()?;
    }
    if let Some(v) = a.smoothquant_alpha {
        r.smoothquant_alpha = v;
    }
    if let Some(v) = a.skip_by_kurtosis {
        r.skip_by_kurtosis = v;
    }
    if let Some(v) = &a.rounding {
        r.rounding = v.parse::<WeightRounding>()?;
    }
    if a.actorder {
        r.actorder = true;
    }
    if let Some(c) = &a.calibration {
        r.calibration = c.parse::<CalibrationSpec>()?;
    }
    if let Some(s) = a.seed {
        r.seed = s;
    }
    if let Some(d) = a.dampening {
        r.dampening = d;
    }
    if let Some(b) = a.block_size {
        r.block_size = b;
    }
    r.validate()?;
    Ok(r)
}

pub fn run(mut a: QuantizeArgs) -> Result<()> {
    let recipe = recipe(&a)?;
    let places = a.stage.prepare()?;
    let (output, bitmask_out, ckpt_dir) = (places.output, places.bitmask_out, places.checkpoint_dir);
    let mut ck = crate::stage::open_input_model(&a.model)?;
    if let Some((name, _)) = ck.model.tensors().into_iter().find(|(_, w)| w.int8().is_some()) {
        bail!(
            "{}: the input is already quantized ({name} is int8); quantize its floating-point source instead",
            ck.path.display()
        );
    }
    quantize::preflight(&ck.model, &recipe)?;
    // Dequantized or bitmask weights are multiplied in f32 here: work on plain dense ones.
    ck.model.densify();
    let calib = crate::prune::calibration_windows(&ck, &recipe.calibration, recipe.seed)?;

    let pb = ProgressBar::new(ck.model.num_layers() as u64);
    pb.set_style(ProgressStyle::with_template("{msg:>10} {bar:30} {pos}/{len} blocks  {elapsed} (eta {eta})")?);
    let opts = places.run;
    let rounding = format!("{:?}", recipe.rounding).to_lowercase();
    let outcome = quantize::quantize_model(&mut ck.model, &recipe, &calib, &opts, &mut |p| match p {
        QuantProgress::Kurtosis { block, .. } => {
            pb.set_message("kurtosis");
            pb.set_position(block as u64);
        }
        QuantProgress::Block { block, .. } => {
            pb.set_message(rounding.clone());
            pb.set_position(block as u64);
        }
    })?;
    pb.finish_and_clear();
    let summary = &outcome.summary;

    // The int8 layers replace their dequantized f32 forms; the rest is saved as it is.
    let input_quant = match recipe.scheme {
        QuantScheme::W8a8 => InputQuant::Int8PerToken,
        QuantScheme::W8a16 => InputQuant::None,
    };
    let mut int8 = std::collections::BTreeMap::new();
    for (name, layer) in outcome.int8_layers(&ck.model)? {
        let w = Weight::from_int8(layer.rows, layer.cols, layer.codes, layer.scales)
            .and_then(|w| w.with_input_quant(input_quant))
            .with_context(|| format!("{name}: int8 weight"))?;
        int8.insert(format!("{name}.weight"), w);
    }
    let tensors: Vec<(String, &Weight)> = ck
        .model
        .tensors()
        .into_iter()
        .map(|(n, w)| {
            let w = int8.get(&n).unwrap_or(w);
            (n, w)
        })
        .collect();

    let total: usize = summary.layers.iter().map(|l| l.rows * l.cols).sum();
    let sparsity = summary.zeros_after as f64 / total.max(1) as f64;
    let mut ignore: Vec<String> = vec!["lm_head".to_owned()];
    ignore.extend(summary.skipped.iter().cloned());
    let metadata = serde_json::json!({
        "recipe": recipe,
        "smoothquant_mappings": [
            {"balance": ["q_proj", "k_proj", "v_proj"], "smooth": "input_layernorm"},
            {"balance": ["gate_proj", "up_proj"], "smooth": "post_attention_layernorm"},
        ],
        "kurtosis_ranking": summary.kurtosis_ranking,
        "skipped_by_kurtosis": summary.skipped,
        "sparsity": sparsity,
    });
    let config = |sparse: Option<Int8Sparsity>| {
        hf::int8_quantization_config(&Int8Config {
            scheme: recipe.scheme,
            ignore: ignore.clone(),
            sparsity: sparse,
            metadata: metadata.clone(),
        })
    };

    let pb = spinner(&format!("writing {}", a.stage.out.display()));
    let opts = SaveOptions {
        overwrite: a.stage.overwrite,
        extra_config: [("quantization_config".to_owned(), config(None))].into(),
        ..Default::default()
    };
    hf::save_dir(&a.stage.out, ck.model.config(), &tensors, Some(&ck.tokenizer), &opts)
        .with_context(|| format!("writing {}", a.stage.out.display()))?;
    // A sparse input also gets the bitmask-over-int8 form (what compressed-tensors writes for a
    // sparse and quantized model).
    let sparse = summary.zeros_before > 0 && sparsity >= 0.1;
    if sparse {
        pb.set_message(format!("writing {}", bitmask_out.display()));
        let targets: Vec<String> = int8.keys().cloned().collect();
        let sp = Int8Sparsity { global_sparsity: sparsity, structure: "unstructured".into(), targets: targets.clone() };
        let opts = SaveOptions {
            overwrite: a.stage.overwrite,
            bitmask: Some(hf::BitmaskOptions { targets }),
            extra_config: [("quantization_config".to_owned(), config(Some(sp)))].into(),
            ..Default::default()
        };
        hf::save_dir(&bitmask_out, ck.model.config(), &tensors, Some(&ck.tokenizer), &opts)
            .with_context(|| format!("writing {}", bitmask_out.display()))?;
    }
    pb.finish_and_clear();

    let report = serde_json::json!({
        "model": ck.path,
        "recipe": recipe,
        "summary": summary,
        "calibration_tokens": calib.iter().map(Vec::len).sum::<usize>(),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    std::fs::write(a.stage.out.join("lacuna_quantize.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::remove_dir_all(&ckpt_dir).with_context(|| format!("removing {}", ckpt_dir.display()))?;
    let scheme = format!("{:?}", recipe.scheme).to_lowercase();
    let mut outputs = vec![a.stage.out.as_path()];
    if sparse {
        outputs.push(&bitmask_out);
    }
    crate::lineage::report_run(&crate::lineage::StageRun {
        kind: lacuna_lineage::ExecutionKind::Quantize,
        model: &ck.path,
        recipe_file: a.recipe.as_deref(),
        recipe: serde_json::to_value(&recipe)?,
        outputs,
        sparsity: Some(sparsity),
        quantization: Some(scheme.clone()),
        metrics: Default::default(),
        message: format!(
            "{scheme} ({rounding}, smoothquant α {}, {} layers kept in float) at {:.2}% sparsity",
            recipe.smoothquant_alpha,
            summary.skipped.len(),
            100.0 * sparsity
        ),
    });
    output.publish(sparse.then_some(bitmask_out.as_path()))?;
    crate::stage::report_success(&output, Some(sparsity), Default::default())?;
    if a.stage.json {
        return print_json(&report);
    }
    let quantized = summary.layers.iter().filter(|l| l.quantized).count();
    println!(
        "quantized {quantized} of {} layers to {scheme} ({rounding}, α {}) in {:.1}s{}; mask {} ({} zeros before, {} after) → {}{}",
        summary.layers.len(),
        recipe.smoothquant_alpha,
        summary.seconds,
        summary.resumed_at_block.map(|b| format!(" (resumed at block {b})")).unwrap_or_default(),
        if summary.zeros_after >= summary.zeros_before { "kept" } else { "CHANGED" },
        summary.zeros_before,
        summary.zeros_after,
        a.stage.out.display(),
        if sparse { format!(" (and {})", bitmask_out.display()) } else { String::new() },
    );
    if !summary.kurtosis_ranking.is_empty() {
        println!("input kurtosis, highest first (the first {} stay in floating point):", summary.skipped.len());
        for k in summary.kurtosis_ranking.iter().take(RANKING_SHOWN.max(summary.skipped.len())) {
            println!("  {:>10.1}  {}", k.kurtosis, k.name);
        }
    }
    Ok(())
}
