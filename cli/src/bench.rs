//! `lacuna bench`: prefill and decode throughput, weight bytes streamed per token, peak memory.
//! Speed is reported here (and in criterion benches), never asserted in tests.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use lacuna_model::KvCache;
use lacuna_model::sampling::argmax;
use serde::Serialize;

use crate::commands::{open_model, print_json};

#[derive(Args)]
pub struct BenchArgs {
    /// Model: a GGUF file, a Hugging Face directory, or a known name.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Tokens decoded one at a time after the prompt.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct BenchReport {
    model: String,
    format: String,
    threads: usize,
    kernel: &'static str,
    load_seconds: f64,
    prompt_tokens: usize,
    time_to_first_token_seconds: f64,
    prefill_tokens_per_second: f64,
    decode_tokens: usize,
    decode_tokens_per_second: f64,
    /// Bytes of weights a decode step streams from memory (every linear layer as stored, dense or
    /// bitmask, and the LM head).
    weight_bytes_per_token: u64,
    /// weight_bytes_per_token × decode tok/s.
    decode_weight_gb_per_second: f64,
    /// The machine's read bandwidth, measured by this run over a buffer far larger than the LLC.
    memory_read_gb_per_second: f64,
    /// decode_weight_gb_per_second ÷ memory_read_gb_per_second: how close decode is to the bytes limit.
    bandwidth_ratio: f64,
    peak_rss_bytes: Option<u64>,
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(a: BenchArgs) -> Result<()> {
    let t = Instant::now();
    let ck = open_model(&a.model)?;
    let load_seconds = t.elapsed().as_secs_f64();
    let cfg = ck.model.config().clone();
    anyhow::ensure!(a.prompt_len > 0, "--prompt-len must be positive");
    anyhow::ensure!(
        a.prompt_len + a.decode_tokens <= cfg.max_position_embeddings,
        "--prompt-len + --decode-tokens exceed the context of {}",
        cfg.max_position_embeddings
    );
    // A fixed pseudo-random prompt: throughput does not depend on the text, reproducibility does.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let prompt: Vec<u32> = (0..a.prompt_len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % cfg.vocab_size as u64) as u32
        })
        .collect();
    let mut cache = KvCache::new(&cfg, a.prompt_len + a.decode_tokens);
    let t = Instant::now();
    let mut logits = ck.model.forward_last_logits(&prompt, &mut cache)?;
    let ttft = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..a.decode_tokens {
        let next = argmax(&logits) as u32;
        logits = ck.model.forward_last_logits(&[next], &mut cache)?;
    }
    let decode = t.elapsed().as_secs_f64();
    let weight_bytes_per_token = ck.model.weight_bytes_per_token() as u64;
    let dtps = a.decode_tokens as f64 / decode.max(1e-12);
    // Peak RSS of the model's work, before the bandwidth probe's buffer adds to it.
    let peak_rss = peak_rss_bytes();
    // 512 MiB: well past any last-level cache, small enough for every machine this runs on.
    let bandwidth = lacuna_kernels::cpu::measure_read_bandwidth(lacuna_kernels::cpu::beyond_cache_bytes());
    let achieved = weight_bytes_per_token as f64 * dtps / 1e9;
    let r = BenchReport {
        model: ck.path.display().to_string(),
        format: ck.format.name().to_owned(),
        threads: lacuna_kernels::cpu::threads(),
        kernel: lacuna_kernels::cpu::isa().name(),
        load_seconds,
        prompt_tokens: a.prompt_len,
        time_to_first_token_seconds: ttft,
        prefill_tokens_per_second: a.prompt_len as f64 / ttft.max(1e-12),
        decode_tokens: a.decode_tokens,
        decode_tokens_per_second: dtps,
        weight_bytes_per_token,
        decode_weight_gb_per_second: achieved,
        memory_read_gb_per_second: bandwidth,
        bandwidth_ratio: achieved / bandwidth.max(1e-12),
        peak_rss_bytes: peak_rss,
    };
    if a.json {
        return print_json(&r);
    }
    println!("model            {} ({})", r.model, r.format);
    println!("threads          {} ({} kernels)", r.threads, r.kernel);
    println!("load             {:.2} s", r.load_seconds);
    println!(
        "prefill          {} tokens: TTFT {:.3} s, {:.1} tok/s",
        r.prompt_tokens, r.time_to_first_token_seconds, r.prefill_tokens_per_second
    );
    println!("decode           {} tokens: {:.2} tok/s", r.decode_tokens, r.decode_tokens_per_second);
    println!(
        "weights/token    {:.1} MB, streamed at {:.2} GB/s = {:.0}% of the measured {:.1} GB/s read bandwidth",
        r.weight_bytes_per_token as f64 / 1e6,
        r.decode_weight_gb_per_second,
        100.0 * r.bandwidth_ratio,
        r.memory_read_gb_per_second
    );
    if let Some(p) = r.peak_rss_bytes {
        println!("peak RSS         {:.1} MiB", p as f64 / (1024.0 * 1024.0));
    }
    Ok(())
}
