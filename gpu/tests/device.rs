//! Every kernel on a CUDA device against a CPU reference, over a sweep of awkward shapes.
//! Without a CUDA driver or device each trial is reported as ignored and the reason printed;
//! `LACUNA_GPU_REQUIRED=1` (scripts/gpu-check.sh) fails instead.
//!
//! Tolerances. Products: the weights are read exactly (f16/bf16 widen to f32 without rounding),
//! so the only error is f32 accumulation order: |gpu − ref| ≤ 1e-5 · Σ|w·x| + 1e-6 for both dtypes
//! (the f64 reference's own error is far below that). RMSNorm, RoPE, SwiGLU, attention: 1e-5
//! relative + 1e-6 absolute (RoPE 1e-5 absolute, attention 1e-4 relative + 1e-5 absolute over up to
//! 2048 positions; f32 against f64 references, `expf`/`sqrtf` differ in the last
//! bit). The KV append rounds to f16 exactly as `half` does: compared bit for bit.

use std::process::ExitCode;
use std::sync::Arc;

use half::{bf16, f16};
use lacuna_gpu::Gpu;
use lacuna_gpu::launch::{PackedWeight, pack};
use lacuna_kernels::bitmask::BitmaskMatrix;
use lacuna_model::weights::{Data, Storage, Weight};
use libtest_mimic::{Arguments, Failed, Trial};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Check = fn(&Gpu) -> Result<(), Failed>;

const CHECKS: &[(&str, Check)] = &[
    ("dense_f16_products", |g| products(g, false, false)),
    ("dense_bf16_products", |g| products(g, false, true)),
    ("bitmask_f16_products", |g| products(g, true, false)),
    ("bitmask_bf16_products", |g| products(g, true, true)),
    ("rms_norm", rms_norm),
    ("rope", rope),
    ("swiglu_and_residual_add", swiglu),
    ("kv_append_rounds_to_f16", kv_append),
    ("decode_attention_gqa", attention),
];

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (7, 7),
    (3, 63),
    (9, 64),
    (5, 65),
    (2, 1023),
    (3, 1025),
    (65, 4096),
    (130, 4104),
    (4096, 65),
    (11, 11008),
];
const BATCHES: &[usize] = &[1, 2, 3, 8, 17, 32, 33];

/// Checkpoints (comma-separated paths) whose GPU logits are compared with the CPU engine's
/// (`scripts/gpu-check.sh` sets it to dense and 70%-sparse SmolLM2).
const LOGITS_MODELS_ENV: &str = "LACUNA_GPU_LOGITS_MODELS";

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let gpu = match lacuna_gpu::device::probe().and_then(|_| Gpu::new(0)) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            eprintln!("device: SKIPPED, {e}");
            if std::env::var_os("LACUNA_GPU_REQUIRED").is_some_and(|v| v != "0") {
                eprintln!("device: LACUNA_GPU_REQUIRED is set: failing instead of skipping");
                return ExitCode::FAILURE;
            }
            let trials = CHECKS.iter().map(|(n, _)| Trial::test(*n, || Ok(())).with_ignored_flag(true)).collect();
            return libtest_mimic::run(&args, trials).exit_code();
        }
    };
    eprintln!("device: {} (kernels for {})", gpu.name(), gpu.target());
    let mut args = args;
    args.test_threads = Some(1); // one context, one stream
    let mut trials: Vec<Trial> = CHECKS
        .iter()
        .map(|(name, check)| {
            let (g, check) = (gpu.clone(), *check);
            Trial::test(*name, move || check(&g))
        })
        .collect();
    match std::env::var(LOGITS_MODELS_ENV) {
        Ok(list) if !list.is_empty() => {
            for path in list.split(',').map(str::to_owned) {
                trials.push(Trial::test(format!("logits_match_the_cpu_engine:{path}"), move || logits(&path)));
            }
        }
        _ => {
            eprintln!("device: logits_match_the_cpu_engine SKIPPED, {LOGITS_MODELS_ENV} names no checkpoints");
            trials.push(Trial::test("logits_match_the_cpu_engine", || Ok(())).with_ignored_flag(true));
        }
    }
    libtest_mimic::run(&args, trials).exit_code()
}

/// The GPU decoder against the CPU engine (f16 KV cache on both) on one checkpoint: greedy
/// decoding from the same prompt gives the same 32 tokens, and every step's logits agree within
/// 2e-2 · max|logit| + 1e-2 (the GPU reads f32 weights rounded to f16, and sums in another order;
/// f16/bf16 checkpoints are uploaded bit for bit).
fn logits(path: &str) -> Result<(), Failed> {
    use lacuna_model::{Checkpoint, KvCache, KvDtype};
    let ck = Checkpoint::open(std::path::Path::new(path)).map_err(err)?;
    let gpu = Gpu::new(0).map_err(err)?;
    let prompt = ck.tokenizer.encode("The capital of France is", true).map_err(err)?;
    let steps = 32;
    let cap = prompt.len() + steps + 1;
    let mut g = lacuna_gpu::GpuLlama::load(gpu, &ck.model, 1, cap).map_err(err)?;
    let mut cache = KvCache::with_dtype(ck.model.config(), cap, KvDtype::F16);
    let mut cpu = ck.model.forward_last_logits(&prompt, &mut cache).map_err(err)?;
    let mut gl = g.prefill(0, &prompt).map_err(err)?;
    let argmax = lacuna_model::sampling::argmax;
    for step in 0..steps {
        let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs()));
        close(&format!("{path}: step {step} logits"), &gl, &cpu, |_| 2e-2 * scale + 1e-2)?;
        let (tc, tg) = (argmax(&cpu) as u32, argmax(&gl) as u32);
        if tc != tg {
            return Err(format!("{path}: step {step}: greedy token {tg} on the GPU, {tc} on the CPU").into());
        }
        cpu = ck.model.forward_last_logits(&[tc], &mut cache).map_err(err)?;
        gl = g.step(&[(0, tg)]).map_err(err)?;
    }
    eprintln!("device: {path}: {steps} greedy tokens identical, logits within tolerance");
    Ok(())
}

fn err(e: impl std::fmt::Display) -> Failed {
    Failed::from(e.to_string())
}

fn close(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f32) -> Result<(), Failed> {
    if got.len() < want.len() {
        return Err(format!("{what}: {} values, want {}", got.len(), want.len()).into());
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d.is_nan() || d > tol(i) {
            return Err(format!("{what} at {i}: gpu {g} vs reference {w} (tolerance {})", tol(i)).into());
        }
    }
    Ok(())
}

fn random_weight(rng: &mut ChaCha8Rng, rows: usize, cols: usize, bitmask: bool, bf: bool) -> Weight {
    let dense: Vec<f32> = (0..rows * cols)
        .map(|_| if bitmask && rng.random::<f64>() < 0.7 { 0.0 } else { rng.random_range(-1.0f32..1.0) })
        .collect();
    let shape = vec![rows, cols];
    match (bitmask, bf) {
        (false, false) => {
            Weight::new(shape, Data::F16(Storage::Owned(dense.iter().map(|v| f16::from_f32(*v)).collect())))
        }
        (false, true) => {
            Weight::new(shape, Data::BF16(Storage::Owned(dense.iter().map(|v| bf16::from_f32(*v)).collect())))
        }
        (true, false) => {
            Weight::new(shape, Data::BitmaskF32(Arc::new(BitmaskMatrix::from_dense(&dense, rows, cols).unwrap())))
        }
        (true, true) => {
            let b: Vec<bf16> = dense.iter().map(|v| bf16::from_f32(*v)).collect();
            Weight::new(shape, Data::BitmaskBF16(Arc::new(BitmaskMatrix::from_dense(&b, rows, cols).unwrap())))
        }
    }
    .unwrap()
}

fn products(g: &Gpu, bitmask: bool, bf: bool) -> Result<(), Failed> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for &(rows, cols) in SHAPES {
        let w = random_weight(&mut rng, rows, cols, bitmask, bf);
        let p: PackedWeight = pack(&w).map_err(err)?;
        assert_eq!(p.is_bitmask(), bitmask);
        let dense = p.to_f32();
        let dm = g.upload_matrix(&p).map_err(err)?;
        for &n in BATCHES {
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let xd = g.upload(&x).map_err(err)?;
            let mut yd = g.zeros(n * rows).map_err(err)?;
            g.matmul(&dm, &xd, n, &mut yd).map_err(err)?;
            let got = g.download(&yd).map_err(err)?;
            let mut want = vec![0f32; n * rows];
            let mut mag = vec![0f32; n * rows];
            for b in 0..n {
                for r in 0..rows {
                    let (mut s, mut m) = (0f64, 0f64);
                    for c in 0..cols {
                        let t = dense[r * cols + c] as f64 * x[b * cols + c] as f64;
                        s += t;
                        m += t.abs();
                    }
                    want[b * rows + r] = s as f32;
                    mag[b * rows + r] = m as f32;
                }
            }
            close(&format!("[{rows}, {cols}] n={n}"), &got, &want, |i| 1e-5 * mag[i] + 1e-6)?;
        }
    }
    Ok(())
}

fn rel(want: &[f32]) -> impl Fn(usize) -> f32 + '_ {
    move |i| 1e-5 * want[i].abs() + 1e-6
}

fn rms_norm(g: &Gpu) -> Result<(), Failed> {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for &(rows, d) in &[(1, 1), (3, 63), (2, 576), (5, 4096), (1, 8192)] {
        let x: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let w: Vec<f32> = (0..d).map(|_| rng.random_range(0.5f32..1.5)).collect();
        let eps = 1e-5f32;
        let want: Vec<f32> = x
            .chunks(d)
            .flat_map(|r| {
                let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                r.iter().zip(&w).map(move |(v, g)| (*v as f64 * inv * *g as f64) as f32).collect::<Vec<_>>()
            })
            .collect();
        let (xd, wd) = (g.upload(&x).map_err(err)?, g.upload(&w).map_err(err)?);
        let mut out = g.zeros(rows * d).map_err(err)?;
        g.rms_norm(&xd, &wd, eps, rows, &mut out).map_err(err)?;
        close(&format!("rms_norm [{rows}, {d}]"), &g.download(&out).map_err(err)?, &want, rel(&want))?;
    }
    Ok(())
}

fn rope(g: &Gpu) -> Result<(), Failed> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for &(n, heads, hd) in &[(1, 1, 2), (3, 9, 64), (2, 32, 128), (4, 3, 64)] {
        let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64) as f32).collect();
        let pos: Vec<i32> = (0..n).map(|_| rng.random_range(0..100_000)).collect();
        let x: Vec<f32> = (0..n * heads * hd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let mut want = x.clone();
        for (b, row) in want.chunks_mut(heads * hd).enumerate() {
            for head in row.chunks_mut(hd) {
                let (a, c) = head.split_at_mut(hd / 2);
                for i in 0..hd / 2 {
                    let ang = pos[b] as f64 * inv[i] as f64;
                    let (cs, sn) = (ang.cos() as f32, ang.sin() as f32);
                    let (x0, x1) = (a[i], c[i]);
                    a[i] = x0 * cs - x1 * sn;
                    c[i] = x1 * cs + x0 * sn;
                }
            }
        }
        let mut xd = g.upload(&x).map_err(err)?;
        let (pd, id) = (g.upload(&pos).map_err(err)?, g.upload(&inv).map_err(err)?);
        g.rope(&mut xd, &pd, &id, n, heads).map_err(err)?;
        close(&format!("rope n={n} heads={heads} hd={hd}"), &g.download(&xd).map_err(err)?, &want, |i| {
            1e-5 * want[i].abs() + 1e-5
        })?;
    }
    Ok(())
}

fn swiglu(g: &Gpu) -> Result<(), Failed> {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for len in [1, 255, 256, 257, 1536 * 3, 11008] {
        let gate: Vec<f32> = (0..len).map(|_| rng.random_range(-8.0f32..8.0)).collect();
        let up: Vec<f32> = (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let want: Vec<f32> =
            gate.iter().zip(&up).map(|(g, u)| ((*g as f64) / (1.0 + (-*g as f64).exp()) * *u as f64) as f32).collect();
        let mut gd = g.upload(&gate).map_err(err)?;
        let ud = g.upload(&up).map_err(err)?;
        g.swiglu(&mut gd, &ud, len).map_err(err)?;
        close(&format!("swiglu {len}"), &g.download(&gd).map_err(err)?, &want, rel(&want))?;
        let sum: Vec<f32> = want.iter().zip(&up).map(|(a, b)| a + b).collect();
        g.add_into(&mut gd, &ud, len).map_err(err)?;
        close(&format!("add_into {len}"), &g.download(&gd).map_err(err)?, &sum, rel(&sum))?;
    }
    Ok(())
}

fn kv_append(g: &Gpu) -> Result<(), Failed> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (slots, cap, kvd, hd) = (3, 5, 192, 64);
    let mut cache = g.kv_layer(slots, cap, kvd, hd).map_err(err)?;
    let n = 2;
    let k: Vec<f32> =
        (0..n * kvd).map(|_| rng.random_range(-60000.0f32..60000.0) * if rng.random() { 1e-4 } else { 1.0 }).collect();
    let v: Vec<f32> = (0..n * kvd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let (slot, pos) = ([2i32, 0], [4i32, 1]);
    let (kd, vd) = (g.upload(&k).map_err(err)?, g.upload(&v).map_err(err)?);
    let (sd, pd) = (g.upload(&slot).map_err(err)?, g.upload(&pos).map_err(err)?);
    g.kv_append(&kd, &vd, &mut cache, &sd, &pd, n).map_err(err)?;
    let (kc, vc) = cache.download(g).map_err(err)?;
    for b in 0..n {
        let at = (slot[b] as usize * cap + pos[b] as usize) * kvd;
        for i in 0..kvd {
            let (wk, wv) = (f16::from_f32(k[b * kvd + i]).to_bits(), f16::from_f32(v[b * kvd + i]).to_bits());
            if kc[at + i] != wk || vc[at + i] != wv {
                return Err(format!(
                    "row {b} element {i}: gpu {:#x}/{:#x}, half {wk:#x}/{wv:#x}",
                    kc[at + i],
                    vc[at + i]
                )
                .into());
            }
        }
    }
    let written: usize = kc.iter().filter(|v| **v != 0).count();
    if written > n * kvd {
        return Err(format!("{written} cache entries written, at most {} expected", n * kvd).into());
    }
    Ok(())
}

fn attention(g: &Gpu) -> Result<(), Failed> {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for &(heads, kv_heads, hd, lens) in
        &[(9, 3, 64, &[1usize, 17, 300][..]), (4, 4, 128, &[5, 1000][..]), (32, 8, 128, &[2048][..])]
    {
        let (slots, cap) = (lens.len() + 1, lens.iter().max().unwrap() + 3);
        let kvd = kv_heads * hd;
        let mut cache = g.kv_layer(slots, cap, kvd, hd).map_err(err)?;
        let n = lens.len();
        // Fill each sequence's positions through kv_append, one position per launch row.
        let slot_of = |b: usize| (b + 1) as i32; // slot 0 stays unused
        let mut kh = vec![vec![]; n];
        let mut vh = vec![vec![]; n];
        for (b, &len) in lens.iter().enumerate() {
            let k: Vec<f32> = (0..len * kvd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let v: Vec<f32> = (0..len * kvd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let (kd, vd) = (g.upload(&k).map_err(err)?, g.upload(&v).map_err(err)?);
            let sd = g.upload(&vec![slot_of(b); len]).map_err(err)?;
            let pd = g.upload(&(0..len as i32).collect::<Vec<_>>()).map_err(err)?;
            g.kv_append(&kd, &vd, &mut cache, &sd, &pd, len).map_err(err)?;
            kh[b] = k.iter().map(|x| f16::from_f32(*x).to_f32()).collect::<Vec<_>>();
            vh[b] = v.iter().map(|x| f16::from_f32(*x).to_f32()).collect::<Vec<_>>();
        }
        let q: Vec<f32> = (0..n * heads * hd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut want = vec![0f32; n * heads * hd];
        let scale = 1.0 / (hd as f64).sqrt();
        for b in 0..n {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let scores: Vec<f64> = (0..lens[b])
                    .map(|t| {
                        (0..hd)
                            .map(|d| q[(b * heads + h) * hd + d] as f64 * kh[b][t * kvd + kvh * hd + d] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let o: f64 = (0..lens[b]).map(|t| e[t] * vh[b][t * kvd + kvh * hd + d] as f64).sum::<f64>() / z;
                    want[(b * heads + h) * hd + d] = o as f32;
                }
            }
        }
        let qd = g.upload(&q).map_err(err)?;
        let sd = g.upload(&(0..n).map(slot_of).collect::<Vec<_>>()).map_err(err)?;
        let ld = g.upload(&lens.iter().map(|l| *l as i32).collect::<Vec<_>>()).map_err(err)?;
        let mut out = g.zeros(n * heads * hd).map_err(err)?;
        let max_len = *lens.iter().max().unwrap();
        g.attention(&qd, &cache, &sd, &ld, n, heads, max_len, &mut out).map_err(err)?;
        close(
            &format!("attention heads={heads}/{kv_heads} hd={hd} lens={lens:?}"),
            &g.download(&out).map_err(err)?,
            &want,
            |i| 1e-4 * want[i].abs() + 1e-5,
        )?;
    }
    Ok(())
}
