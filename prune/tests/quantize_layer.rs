//! SmoothQuant scales and GPTQ INT8 codes of one small layer against an independent numpy
//! implementation (`fixtures/make_quantize_fixture.py`): one input (outlier channels, a dead
//! channel) shared by two layers, GPTQ on the smoothed dense layer (in input order and with
//! activation order) and on a 50%-sparse copy whose mask must survive.
//!
//! Agreement: both sides run GPTQ in f64 from the same f32 Hessian and smoothed f32 weights, so
//! they differ only by the order of floating-point operations (faer's blocked factorisations vs
//! LAPACK). The codes must be identical except where numpy's `w / s` lies within 1e-6 of a
//! rounding tie (`k + 0.5`), where either side of the tie is accepted; the fixture has none, so in
//! practice every code is equal.

use std::path::PathBuf;

use lacuna_prune::smooth::{ActStats, smoothing_scales};
use lacuna_prune::{GptqConfig, Hessian, Int8Layer, gptq, rtn};
use serde_json::Value;

struct Fixture {
    bytes: Vec<u8>,
    manifest: Value,
}

impl Fixture {
    fn load() -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("quantize_layer.json")).expect("manifest"))
                .expect("valid JSON");
        let bytes = std::fs::read(dir.join("quantize_layer.bin")).expect("quantize_layer.bin");
        Fixture { bytes, manifest }
    }

    fn usize(&self, k: &str) -> usize {
        self.manifest[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize
    }

    fn raw(&self, name: &str, dtype: &str) -> &[u8] {
        let a = &self.manifest["arrays"][name];
        assert_eq!(a["dtype"].as_str(), Some(dtype), "{name}");
        let off = a["offset"].as_u64().expect("offset") as usize;
        let len: usize =
            a["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).product();
        let size = if dtype == "i1" {
            1
        } else if dtype == "<f4" {
            4
        } else {
            8
        };
        &self.bytes[off..off + len * size]
    }

    fn f32(&self, name: &str) -> Vec<f32> {
        self.raw(name, "<f4").chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn f64(&self, name: &str) -> Vec<f64> {
        self.raw(name, "<f8").chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn i8(&self, name: &str) -> Vec<i8> {
        self.raw(name, "i1").iter().map(|&b| b as i8).collect()
    }

    fn hessian(&self) -> Hessian {
        let cols = self.usize("cols");
        let h: Vec<f64> = self.f32("h_smoothed").iter().map(|&v| v as f64).collect();
        Hessian::from_dense(cols, self.usize("tokens") as u64, &h).expect("fixture Hessian")
    }

    fn cfg(&self, actorder: bool) -> GptqConfig {
        GptqConfig {
            blocksize: self.usize("blocksize"),
            percdamp: self.manifest["percdamp"].as_f64().expect("percdamp"),
            actorder,
            keep_zeros: true,
            ..GptqConfig::default()
        }
    }
}

/// Codes equal, except at rounding ties of numpy's pre-rounding value.
fn assert_codes(name: &str, ours: &[i8], numpy: &[i8], pre: &[f64]) {
    let mut ties = 0;
    for (i, ((&a, &b), &z)) in ours.iter().zip(numpy).zip(pre).enumerate() {
        if a != b {
            let tie = ((z - z.trunc()).abs() - 0.5).abs() < 1e-6 && (a as i32 - b as i32).abs() == 1;
            assert!(tie, "{name}: code {i}: ours {a}, numpy {b} (numpy's w/s = {z})");
            ties += 1;
        }
    }
    eprintln!("{name}: {} codes, {ties} differ at rounding ties", ours.len());
}

#[test]
fn smoothquant_scales_and_smoothed_hessian_match_numpy() {
    let f = Fixture::load();
    let (ra, rb, cols, tokens) = (f.usize("rows_a"), f.usize("rows_b"), f.usize("cols"), f.usize("tokens"));
    let x = f.f32("x");
    let mut acts = ActStats::new(cols);
    acts.add(&x).unwrap();
    let (a, b) = (f.f32("a"), f.f32("b"));
    let s = smoothing_scales(&acts.abs_max, &[(&a, ra), (&b, rb)], f.manifest["alpha"].as_f64().unwrap()).unwrap();
    let reference = f.f32("smooth_scales");
    for (j, (ours, np)) in s.iter().zip(&reference).enumerate() {
        // f64 powers (libm vs numpy) rounded to f32: equal, or one ulp apart at a rounding boundary.
        assert!((ours - np).abs() <= np.abs() * 2.0 * f32::EPSILON, "scale {j}: ours {ours}, numpy {np}");
    }
    assert_eq!(s[5], 1.0, "the dead channel is not smoothed");
    // Smoothed weights: the same f32 products.
    let mut a_s = a.clone();
    lacuna_prune::smooth::scale_columns(&mut a_s, &reference);
    assert_eq!(a_s, f.f32("a_smoothed"));
    // The Hessian of the raw inputs, rescaled, is the Hessian of the smoothed inputs.
    let mut h = Hessian::new(cols);
    for batch in x.chunks(128 * cols) {
        h.add_batch(batch, batch.len() / cols).unwrap();
    }
    h.divide_inputs(&reference).unwrap();
    let np_h = f.f32("h_smoothed");
    let scale = np_h.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    for (i, (ours, np)) in h.to_dense().iter().zip(&np_h).enumerate() {
        assert!((ours - *np as f64).abs() <= 2e-6 * scale, "H[{i}]: ours {ours}, numpy {np}");
    }
    assert_eq!(h.tokens(), tokens as u64);
}

#[test]
fn gptq_codes_match_numpy() {
    let f = Fixture::load();
    let (rows, cols) = (f.usize("rows_a"), f.usize("cols"));
    let h = f.hessian();
    for (name, input, actorder) in
        [("dense", "a_smoothed", false), ("dense_actorder", "a_smoothed", true), ("sparse", "a_sparse_smoothed", false)]
    {
        let mut w = f.f32(input);
        let (layer, report) = gptq(&mut w, rows, cols, &h, &f.cfg(actorder)).unwrap();
        assert_eq!(layer.scales, f.f32(&format!("scales_{name}")), "{name}: scales");
        assert_codes(name, &layer.codes, &f.i8(&format!("codes_{name}")), &f.f64(&format!("pre_{name}")));
        // The dequantized weights left in `w` are exactly code · scale.
        assert_eq!(w, layer.dequantize(), "{name}");
        assert_eq!(Int8Layer::from_dequantized(&w, rows, cols, &layer.scales).unwrap(), layer);
        assert!(report.obs_loss > 0.0 && report.damp_used == 0.01);
    }
}

#[test]
fn gptq_keeps_the_mask_and_beats_round_to_nearest() {
    let f = Fixture::load();
    let (rows, cols) = (f.usize("rows_a"), f.usize("cols"));
    let h = f.hessian();
    let input = f.f32("a_sparse_smoothed");
    let mut w = input.clone();
    let cfg = GptqConfig { compute_error: true, ..f.cfg(false) };
    let (_, report) = gptq(&mut w, rows, cols, &h, &cfg).unwrap();
    // Every zero stays zero; a kept weight may round to zero too (the dead input's are zeroed),
    // but no zero gains a value.
    for (i, (a, b)) in input.iter().zip(&w).enumerate() {
        if *a == 0.0 {
            assert_eq!(*b, 0.0, "weight {i} was zero and is now {b}");
        }
    }
    let mut r = input.clone();
    rtn(&mut r, rows, cols).unwrap();
    let rtn_err = lacuna_prune::reconstruction_error(&input, &r, rows, cols, &h).unwrap();
    let gptq_err = report.recon_error.unwrap();
    eprintln!("output error: GPTQ {gptq_err:e}, round-to-nearest {rtn_err:e}");
    assert!(gptq_err < 0.8 * rtn_err, "GPTQ {gptq_err} vs RTN {rtn_err}");
}
