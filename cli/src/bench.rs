//! `lacuna bench`: prefill and decode throughput (batch 1 and batched), weight bytes streamed per
//! token against the machine's measured read bandwidth, peak memory — for one model or, with
//! `--model` repeated, for a dense baseline and its sparse versions in one run, with the ratios
//! the sparse ones reach over the first, measured in alternating rounds. Speed is reported here (and in criterion benches),
//! never asserted in tests.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use lacuna_gpu::{DeviceSpec, Gpu, GpuLlama};
use lacuna_model::runtime::Runtime;
use lacuna_model::sampling::argmax;
use lacuna_model::{KvCache, KvDtype};
use serde::Serialize;

use crate::commands::{EngineArgs, open_model, print_json};

#[derive(Args)]
pub struct BenchArgs {
    /// Model: a GGUF file, a Hugging Face directory, or a known name. Repeat to compare: the
    /// first is the baseline the others' ratios refer to.
    #[arg(long, default_value = "smollm2-135m", num_args = 1)]
    pub model: Vec<String>,
    /// Prompt tokens for the time-to-first-token measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Decode steps measured (after the prompt).
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Sequences decoded together in the batched measurement (0 skips it).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Prompt tokens of each sequence in the batched measurement.
    #[arg(long, default_value_t = 128)]
    pub batch_prompt_len: usize,
    /// Measurement rounds; they alternate over the models and each model reports its median (on
    /// a machine whose memory bandwidth and cache are shared, five keep one disturbed round from
    /// deciding it).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// KV cache values (f16: the inference service's default; f32: exact).
    #[arg(long, default_value_t = KvDtype::F16)]
    pub kv_cache: KvDtype,
    /// Where decode runs: `cpu`, or CUDA device `cuda[:N]` (weights uploaded as stored, f16 KV
    /// cache; docs/gpu.md).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct ModelReport {
    model: String,
    format: String,
    load_seconds: f64,
    prompt_tokens: usize,
    time_to_first_token_seconds: f64,
    prefill_tokens_per_second: f64,
    decode_tokens: usize,
    /// One sequence, one token per step (median round).
    decode_tokens_per_second: f64,
    decode_tokens_per_second_rounds: Vec<f64>,
    batch: usize,
    /// Tokens per second summed over `batch` sequences decoded together.
    batch_decode_tokens_per_second: Option<f64>,
    /// Bytes of weights a decode step streams from memory (every linear layer as stored, dense
    /// or bitmask, and the LM head).
    weight_bytes_per_token: u64,
    /// Bytes of KV cache batch-1 attention reads per decoded token, on average over the measured
    /// steps (the same for every model of one architecture).
    kv_bytes_per_token: u64,
    /// weight_bytes_per_token × batch-1 decode tok/s.
    decode_weight_gb_per_second: f64,
    /// decode_weight_gb_per_second ÷ the measured read bandwidth.
    bandwidth_ratio: f64,
    /// Resident memory the model added when it was loaded (weights, tokenizer, runtime buffers).
    resident_bytes: Option<u64>,
    /// Whether its logits ran on the W8A8 head (`--int8-lm-head`, W8A8 models only).
    int8_lm_head: bool,
}

/// A model against the first (dense) one.
#[derive(Serialize)]
struct Comparison {
    model: String,
    /// Baseline weight bytes per token ÷ this model's: the decode speed-up the bytes allow.
    byte_ratio: f64,
    /// The same with the KV cache's bytes counted on both sides: the speed-up a decoder that
    /// streams every byte at the same rate would reach.
    byte_ratio_with_kv: f64,
    decode_speedup: f64,
    /// decode_speedup ÷ byte_ratio: how much of the byte saving became speed.
    speedup_over_byte_ratio: f64,
    batch_decode_speedup: Option<f64>,
    /// Prefill tok/s ÷ the baseline's (≥ 1: not slower).
    prefill_ratio: f64,
}

#[derive(Serialize)]
struct BenchReport {
    threads: usize,
    kernel: &'static str,
    /// The path of the INT8 kernels (W8A8 layers, and the LM head with `--int8-lm-head`).
    int8_kernel: &'static str,
    /// Whether the logits ran on a W8A8 copy of the LM head.
    int8_lm_head: bool,
    kv_cache: KvDtype,
    /// The machine's read bandwidth, measured by this run (see `cpu::measure_read_bandwidth`)
    /// after every round; the median of the rounds.
    memory_read_gb_per_second: f64,
    memory_read_gb_per_second_rounds: Vec<f64>,
    rounds: usize,
    /// Peak resident set of the whole run (every model loaded at once), before the bandwidth probe.
    peak_rss_bytes: Option<u64>,
    models: Vec<ModelReport>,
    comparisons: Vec<Comparison>,
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A fixed pseudo-random prompt: throughput does not depend on the text, reproducibility does.
fn prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xA24B_AED4_963E_E407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Current resident set size of this process (Linux `VmRSS`).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A loaded model and its measurements over the rounds.
struct Subject {
    name: String,
    format: String,
    load_seconds: f64,
    weight_bytes_per_token: u64,
    kv_bytes_per_token: u64,
    resident_bytes: Option<u64>,
    int8_lm_head: bool,
    rt: Runtime,
    ttft: Vec<f64>,
    decode: Vec<f64>,
    batch: Vec<f64>,
}

fn load(a: &BenchArgs, name: &str) -> Result<Subject> {
    let before = rss_bytes();
    let t = Instant::now();
    // The INT8 head is an option of the INT8 engine: float models (the baseline of the ratios)
    // keep their float head.
    let mut ck = open_model(name)?;
    if ck.model.has_w8a8_layers() {
        a.engine.apply(&mut ck)?;
    }
    let int8_lm_head = ck.model.has_int8_lm_head();
    let load_seconds = t.elapsed().as_secs_f64();
    let cfg = ck.model.config().clone();
    let need = (a.prompt_len + a.decode_tokens).max(a.batch_prompt_len + a.decode_tokens);
    anyhow::ensure!(
        need <= cfg.max_position_embeddings,
        "prompt + decode tokens ({need}) exceed the context of {}",
        cfg.max_position_embeddings
    );
    let (format, path) = (ck.format.name().to_owned(), ck.path.display().to_string());
    let weight_bytes_per_token = ck.model.weight_bytes_per_token() as u64;
    // Batch-1 decode attends over prompt_len + 1 ..= prompt_len + decode_tokens positions.
    let mean_positions = a.prompt_len + a.decode_tokens.div_ceil(2);
    let kv_bytes_per_token = KvCache::bytes_per_step(&cfg, a.kv_cache, mean_positions) as u64;
    let rt = Runtime::new(Arc::new(ck.model), a.batch.max(1), need, a.kv_cache).context("starting the runtime")?;
    let resident_bytes = rss_bytes().zip(before).map(|(a, b)| a.saturating_sub(b));
    Ok(Subject {
        name: path,
        format,
        load_seconds,
        weight_bytes_per_token,
        kv_bytes_per_token,
        resident_bytes,
        int8_lm_head,
        rt,
        ttft: Vec::new(),
        decode: Vec::new(),
        batch: Vec::new(),
    })
}

/// One round on one model: TTFT of the prompt, batch-1 decode, then the batched decode.
fn round(a: &BenchArgs, s: &mut Subject) -> Result<()> {
    let rt = &mut s.rt;
    let vocab = rt.config().vocab_size;
    let p = prompt(a.prompt_len, vocab, 0);
    let t = Instant::now();
    let mut next = argmax(rt.prefill(0, &p)?) as u32;
    s.ttft.push(t.elapsed().as_secs_f64());
    let t = Instant::now();
    for _ in 0..a.decode_tokens {
        next = argmax(rt.decode(&[(0, next)])?) as u32;
    }
    s.decode.push(a.decode_tokens as f64 / t.elapsed().as_secs_f64().max(1e-12));
    rt.release(0);
    if a.batch > 0 {
        let mut steps: Vec<(u64, u32)> = Vec::with_capacity(a.batch);
        for q in 0..a.batch as u64 {
            let p = prompt(a.batch_prompt_len, vocab, q + 1);
            steps.push((q, argmax(rt.prefill(q, &p)?) as u32));
        }
        let t = Instant::now();
        for _ in 0..a.decode_tokens {
            let logits = rt.decode(&steps)?;
            for (i, st) in steps.iter_mut().enumerate() {
                st.1 = argmax(&logits[i * vocab..(i + 1) * vocab]) as u32;
            }
        }
        s.batch.push((a.batch * a.decode_tokens) as f64 / t.elapsed().as_secs_f64().max(1e-12));
        for (q, _) in steps {
            rt.release(q);
        }
    }
    Ok(())
}

fn report(a: &BenchArgs, mut s: Subject) -> ModelReport {
    let ttft = median(&mut s.ttft);
    let dtps = median(&mut s.decode);
    ModelReport {
        model: s.name,
        format: s.format,
        load_seconds: s.load_seconds,
        prompt_tokens: a.prompt_len,
        time_to_first_token_seconds: ttft,
        prefill_tokens_per_second: a.prompt_len as f64 / ttft.max(1e-12),
        decode_tokens: a.decode_tokens,
        decode_tokens_per_second: dtps,
        decode_tokens_per_second_rounds: s.decode.clone(),
        batch: a.batch,
        batch_decode_tokens_per_second: (!s.batch.is_empty()).then(|| median(&mut s.batch)),
        weight_bytes_per_token: s.weight_bytes_per_token,
        kv_bytes_per_token: s.kv_bytes_per_token,
        decode_weight_gb_per_second: s.weight_bytes_per_token as f64 * dtps / 1e9,
        bandwidth_ratio: 0.0,
        resident_bytes: s.resident_bytes,
        int8_lm_head: s.int8_lm_head,
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.prompt_len > 0 && a.batch_prompt_len > 0, "prompt lengths must be positive");
    anyhow::ensure!(a.decode_tokens > 0, "--decode-tokens must be positive");
    anyhow::ensure!(a.rounds > 0, "--rounds must be positive");
    a.engine.check_device(&a.device)?;
    if let DeviceSpec::Cuda(ordinal) = a.device {
        return run_cuda(&a, ordinal);
    }
    let mut subjects = Vec::with_capacity(a.model.len());
    for name in &a.model {
        subjects.push(load(&a, name).with_context(|| format!("loading {name}"))?);
    }
    // Rounds alternate over the models, so that a slow spell of a shared machine falls on all of
    // them rather than on one; each model reports its median round. The bandwidth is measured
    // after each round too (over 4 × the last-level cache): on a shared host it moves with the
    // neighbours' load as much as decode does, and one probe could catch a quiet moment.
    let mut bandwidths = Vec::with_capacity(a.rounds);
    let mut peak_rss = None;
    for _ in 0..a.rounds {
        for s in &mut subjects {
            let name = s.name.clone();
            round(&a, s).with_context(|| format!("benchmarking {name}"))?;
        }
        // The models' own peak (every buffer exists after one round), before the probe's buffer
        // raises the high-water mark.
        if peak_rss.is_none() {
            peak_rss = peak_rss_bytes();
        }
        bandwidths.push(lacuna_kernels::cpu::measure_read_bandwidth(lacuna_kernels::cpu::beyond_cache_bytes()));
    }
    let mut models: Vec<ModelReport> = subjects.into_iter().map(|s| report(&a, s)).collect();
    let bandwidth = median(&mut bandwidths.clone());
    for m in &mut models {
        m.bandwidth_ratio = m.decode_weight_gb_per_second / bandwidth.max(1e-12);
    }
    let base = &models[0];
    let comparisons = models[1..]
        .iter()
        .map(|m| {
            let byte_ratio = base.weight_bytes_per_token as f64 / m.weight_bytes_per_token.max(1) as f64;
            let with_kv = |r: &ModelReport| (r.weight_bytes_per_token + r.kv_bytes_per_token).max(1) as f64;
            let decode_speedup = m.decode_tokens_per_second / base.decode_tokens_per_second;
            Comparison {
                model: m.model.clone(),
                byte_ratio,
                byte_ratio_with_kv: with_kv(base) / with_kv(m),
                decode_speedup,
                speedup_over_byte_ratio: decode_speedup / byte_ratio,
                batch_decode_speedup: m
                    .batch_decode_tokens_per_second
                    .zip(base.batch_decode_tokens_per_second)
                    .map(|(s, d)| s / d),
                prefill_ratio: m.prefill_tokens_per_second / base.prefill_tokens_per_second,
            }
        })
        .collect();
    let r = BenchReport {
        threads: lacuna_kernels::cpu::threads(),
        kernel: lacuna_kernels::cpu::isa().name(),
        int8_kernel: lacuna_kernels::cpu::int8_isa().name(),
        int8_lm_head: a.engine.int8_lm_head,
        kv_cache: a.kv_cache,
        memory_read_gb_per_second: bandwidth,
        memory_read_gb_per_second_rounds: bandwidths,
        rounds: a.rounds,
        peak_rss_bytes: peak_rss,
        models,
        comparisons,
    };
    if a.json {
        return print_json(&r);
    }
    println!(
        "threads {} ({} kernels, {} INT8, {} KV cache{}), measured read bandwidth {:.1} GB/s (rounds {}), median of {} rounds{}",
        r.threads,
        r.kernel,
        r.int8_kernel,
        r.kv_cache,
        if r.int8_lm_head { ", INT8 LM head for W8A8 models" } else { "" },
        bandwidth,
        r.memory_read_gb_per_second_rounds.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" "),
        r.rounds,
        r.peak_rss_bytes.map(|p| format!(", peak RSS {:.1} MiB", p as f64 / (1024.0 * 1024.0))).unwrap_or_default()
    );
    for m in &r.models {
        println!("\nmodel            {} ({}{})", m.model, m.format, if m.int8_lm_head { ", INT8 LM head" } else { "" });
        println!("load             {:.2} s", m.load_seconds);
        println!(
            "prefill          {} tokens: TTFT {:.3} s, {:.1} tok/s",
            m.prompt_tokens, m.time_to_first_token_seconds, m.prefill_tokens_per_second
        );
        println!(
            "decode           {:.2} tok/s (batch 1, {} steps; rounds {})",
            m.decode_tokens_per_second,
            m.decode_tokens,
            m.decode_tokens_per_second_rounds.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" ")
        );
        if let Some(b) = m.batch_decode_tokens_per_second {
            println!("decode batch {:<3} {:.2} tok/s in all", m.batch, b);
        }
        println!(
            "weights/token    {:.1} MB, streamed at {:.2} GB/s = {:.0}% of the measured bandwidth",
            m.weight_bytes_per_token as f64 / 1e6,
            m.decode_weight_gb_per_second,
            100.0 * m.bandwidth_ratio
        );
        println!(
            "KV cache/token   {:.1} MB read by attention (mean over the decode steps)",
            m.kv_bytes_per_token as f64 / 1e6
        );
        if let Some(p) = m.resident_bytes {
            println!("resident         {:.1} MiB added by loading it", p as f64 / (1024.0 * 1024.0));
        }
    }
    for c in &r.comparisons {
        println!("\nvs the first     {}", c.model);
        println!(
            "                 bytes {:.2}x fewer, decode {:.2}x faster = {:.2} of the byte ratio; prefill {:.2}x{}",
            c.byte_ratio,
            c.decode_speedup,
            c.speedup_over_byte_ratio,
            c.prefill_ratio,
            c.batch_decode_speedup.map(|s| format!("; batched decode {s:.2}x")).unwrap_or_default()
        );
        println!(
            "                 with the KV cache counted: bytes {:.2}x fewer = {:.2} of that ratio",
            c.byte_ratio_with_kv,
            c.decode_speedup / c.byte_ratio_with_kv
        );
    }
    Ok(())
}

/// One model's decode on a CUDA device.
#[derive(Serialize)]
struct CudaModelReport {
    model: String,
    format: String,
    /// Bytes of weights a decode step streams from device memory, as uploaded.
    weight_bytes_per_token: u64,
    /// One sequence, one token per step (median round).
    decode_tokens_per_second: f64,
    batch: usize,
    batch_decode_tokens_per_second: Option<f64>,
    /// weight_bytes_per_token × batch-1 decode tok/s.
    decode_weight_gb_per_second: f64,
}

#[derive(Serialize)]
struct CudaBenchReport {
    device: String,
    rounds: usize,
    models: Vec<CudaModelReport>,
    /// Per model after the first: (model, byte ratio, decode speed-up, speed-up ÷ byte ratio).
    comparisons: Vec<(String, f64, f64, f64)>,
}

/// `lacuna bench --device cuda[:N]`: batch-1 and batched decode of each model on the GPU (the
/// prompt runs through the decode step; prefill speed is not measured there yet).
fn run_cuda(a: &BenchArgs, ordinal: usize) -> Result<()> {
    let mut models = Vec::new();
    let mut device = String::new();
    for name in &a.model {
        let ck = open_model(name).with_context(|| format!("loading {name}"))?;
        let gpu = Gpu::new(ordinal)?;
        device = gpu.name().to_owned();
        let slots = a.batch.max(1);
        let capacity = a.prompt_len.max(a.batch_prompt_len) + a.decode_tokens + 1;
        let mut g = GpuLlama::load(gpu, &ck.model, slots, capacity).with_context(|| format!("uploading {name}"))?;
        let vocab = g.config().vocab_size;
        let (mut decode, mut batched) = (Vec::new(), Vec::new());
        for _ in 0..a.rounds {
            g.reset(0);
            let mut next = argmax(&g.prefill(0, &prompt(a.prompt_len, vocab, 0))?) as u32;
            let t = Instant::now();
            for _ in 0..a.decode_tokens {
                next = argmax(&g.step(&[(0, next)])?) as u32;
            }
            decode.push(a.decode_tokens as f64 / t.elapsed().as_secs_f64());
            if a.batch > 0 {
                let mut tokens = Vec::with_capacity(a.batch);
                for s in 0..a.batch {
                    g.reset(s);
                    let l = g.prefill(s, &prompt(a.batch_prompt_len, vocab, s as u64 + 1))?;
                    tokens.push((s, argmax(&l) as u32));
                }
                let t = Instant::now();
                for _ in 0..a.decode_tokens {
                    let logits = g.step(&tokens)?;
                    for (row, tok) in logits.chunks(vocab).zip(tokens.iter_mut()) {
                        tok.1 = argmax(row) as u32;
                    }
                }
                batched.push((a.batch * a.decode_tokens) as f64 / t.elapsed().as_secs_f64());
            }
        }
        let bytes = g.weight_bytes_per_token() as u64;
        let tps = median(&mut decode);
        models.push(CudaModelReport {
            model: ck.path.display().to_string(),
            format: ck.format.name().to_owned(),
            weight_bytes_per_token: bytes,
            decode_tokens_per_second: tps,
            batch: a.batch,
            batch_decode_tokens_per_second: (!batched.is_empty()).then(|| median(&mut batched)),
            decode_weight_gb_per_second: bytes as f64 * tps / 1e9,
        });
    }
    let base = &models[0];
    let comparisons = models[1..]
        .iter()
        .map(|m| {
            let ratio = base.weight_bytes_per_token as f64 / m.weight_bytes_per_token.max(1) as f64;
            let speedup = m.decode_tokens_per_second / base.decode_tokens_per_second;
            (m.model.clone(), ratio, speedup, speedup / ratio)
        })
        .collect();
    let r = CudaBenchReport { device, rounds: a.rounds, models, comparisons };
    if a.json {
        return print_json(&r);
    }
    println!("device {} (median of {} rounds)", r.device, r.rounds);
    for m in &r.models {
        println!(
            "{} ({}): {:.1} MiB/token, decode {:.1} tok/s ({:.1} GB/s of weights){}",
            m.model,
            m.format,
            m.weight_bytes_per_token as f64 / (1024.0 * 1024.0),
            m.decode_tokens_per_second,
            m.decode_weight_gb_per_second,
            m.batch_decode_tokens_per_second.map(|b| format!(", batch {}: {b:.1} tok/s", m.batch)).unwrap_or_default()
        );
    }
    for (m, ratio, speedup, share) in &r.comparisons {
        println!("{m}: byte ratio {ratio:.2}, decode speed-up {speedup:.2} ({share:.2} of the byte ratio)");
    }
    Ok(())
}
