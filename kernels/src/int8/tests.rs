use super::*;
use crate::bitmask::BitmaskMatrix;
use rand::{Rng, SeedableRng};

type Rng8 = rand_chacha::ChaCha8Rng;

/// Codes `[rows, cols]`: row 0 all zero, row 1 all stored at the extremes (−128, 127, −127),
/// the rest with about `sparsity` zeros and random non-zero codes over the whole −128..=127.
fn codes(rng: &mut Rng8, rows: usize, cols: usize, sparsity: f64) -> Vec<i8> {
    let mut w = vec![0i8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            w[r * cols + c] = match r {
                0 => 0,
                1 => [-128i8, 127, -127][c % 3],
                _ if rng.random_bool(sparsity) => 0,
                _ => loop {
                    let v: i8 = rng.random();
                    if v != 0 {
                        break v;
                    }
                },
            };
        }
    }
    w
}

/// Activations: row 0 all zero (scale 0), row 1 alternating ±1 (codes ±127, the extremes), the
/// rest random with an occasional large value.
fn acts(rng: &mut Rng8, n: usize, cols: usize) -> Vec<f32> {
    (0..n * cols)
        .map(|k| match (k / cols.max(1), k % cols.max(1)) {
            (0, _) if n > 2 => 0.0,
            (1, c) => {
                if c % 2 == 0 {
                    1.0
                } else {
                    -1.0
                }
            }
            _ => rng.random_range(-1.0f32..1.0) * if rng.random_bool(0.01) { 50.0 } else { 1.0 },
        })
        .collect()
}

/// The independent reference: i64 sums of the quantized codes, the same dequantize.
fn reference(w: &[i8], scales: &[f32], rows: usize, cols: usize, q: &QuantizedActs) -> Vec<f32> {
    let n = q.rows();
    let mut y = vec![0f32; n * rows];
    for i in 0..n {
        for r in 0..rows {
            let s: i64 = (0..cols).map(|c| w[r * cols + c] as i64 * q.codes(i)[c] as i64).sum();
            let s = i32::try_from(s).expect("within the i32 range by MAX_COLS");
            y[i * rows + r] = s as f32 * (q.scale(i) * scales[r]);
        }
    }
    y
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn every_path_is_bit_identical_to_the_reference_over_the_shape_sweep() {
    let mut rng = Rng8::seed_from_u64(19);
    let paths = Int8Isa::available();
    eprintln!("INT8 paths on this CPU: {paths:?}");
    for &cols in &[0usize, 1, 7, 9, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 255, 576, 1000] {
        for &rows in &[1usize, 2, 3, 5, 70] {
            for &s in &[0.0, 0.5, 0.7, 1.0] {
                let w = codes(&mut rng, rows, cols, s);
                let scales: Vec<f32> = (0..rows).map(|_| rng.random_range(0.001f32..0.1)).collect();
                let bm = BitmaskMatrix::from_dense(&w, rows, cols).unwrap();
                assert_eq!(bm.to_dense(), w);
                let dense = Int8Matrix::Dense(Int8Dense::new(&w, &scales, rows, cols).unwrap());
                let sparse = Int8Matrix::Bitmask(Int8Bitmask::new(bm.view(), &scales).unwrap());
                for &n in &[1usize, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 32, 33, 130] {
                    let x = acts(&mut rng, n, cols);
                    let mut q = QuantizedActs::new();
                    q.quantize(&x, n, cols).unwrap();
                    let want = bits(&reference(&w, &scales, rows, cols, &q));
                    for &isa in &paths {
                        for (what, m) in [("dense", &dense), ("bitmask", &sparse)] {
                            let mut y = vec![f32::NAN; n * rows];
                            matmul_on(isa, m, &x, n, &mut y).unwrap();
                            assert_eq!(bits(&y), want, "{what} {isa:?} rows={rows} cols={cols} s={s} n={n}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_256_bit_paths_read_no_further_than_the_last_rows_codes() {
    // The byte expansion reads 8 bytes past a word's codes; the last rows take a padded copy.
    // Codes in an exactly sized allocation at the end of the matrix, every row's last columns
    // stored, so that any over-read would be past the array (caught by the equality or by a
    // sanitizer run).
    let mut rng = Rng8::seed_from_u64(3);
    for &cols in &[5usize, 33, 64, 70] {
        let rows = 9;
        let mut w = codes(&mut rng, rows, cols, 0.3);
        for r in 0..rows {
            w[r * cols + cols - 1] = 77;
        }
        let scales = vec![0.5f32; rows];
        let bm = BitmaskMatrix::from_dense(&w, rows, cols).unwrap();
        let (mask, vals, offs) = bm.clone().into_parts();
        let vals = vals.into_boxed_slice();
        let view = BitmaskView::new(rows, cols, &mask, &vals, &offs).unwrap();
        let m = Int8Matrix::Bitmask(Int8Bitmask::new(view, &scales).unwrap());
        for n in [1usize, 3, 8, 12] {
            let x = acts(&mut rng, n, cols);
            let mut q = QuantizedActs::new();
            q.quantize(&x, n, cols).unwrap();
            let want = bits(&reference(&w, &scales, rows, cols, &q));
            for isa in Int8Isa::available() {
                let mut y = vec![0f32; n * rows];
                matmul_on(isa, &m, &x, n, &mut y).unwrap();
                assert_eq!(bits(&y), want, "{isa:?} cols={cols} n={n}");
            }
        }
    }
}

#[test]
fn extreme_codes_at_full_width_do_not_saturate_or_overflow() {
    // Every weight −128 and every activation code ±127: the largest |Σ| a row can reach at
    // this width, and the case where vpmaddubsw would saturate without the sign trick.
    let cols = 4096 + 63;
    let rows = 3;
    let mut w = vec![-128i8; rows * cols];
    w[cols..2 * cols].fill(127);
    let scales = vec![1.0f32; rows];
    // Two rows for the decode kernels, 40 (the two repeated) for the prefill ones.
    for n in [2usize, 40] {
        let x: Vec<f32> = (0..n * cols)
            .map(|k| {
                if (k / cols) % 2 == 0 {
                    -1.0
                } else if k % 2 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let mut q = QuantizedActs::new();
        q.quantize(&x, n, cols).unwrap();
        assert!(q.codes(0).iter().all(|&c| c == -127));
        let want = reference(&w, &scales, rows, cols, &q);
        assert_eq!(want[0], (128 * 127 * cols) as f32 * q.scale(0));
        let bm = BitmaskMatrix::from_dense(&w, rows, cols).unwrap();
        for isa in Int8Isa::available() {
            for m in [
                Int8Matrix::Dense(Int8Dense::new(&w, &scales, rows, cols).unwrap()),
                Int8Matrix::Bitmask(Int8Bitmask::new(bm.view(), &scales).unwrap()),
            ] {
                let mut y = vec![0f32; n * rows];
                matmul_on(isa, &m, &x, n, &mut y).unwrap();
                assert_eq!(bits(&y), bits(&want), "{isa:?} n={n}");
            }
        }
    }
}

#[test]
fn activation_codes_are_symmetric_rounded_to_even_and_clamped() {
    let mut q = QuantizedActs::new();
    // Max 127 so that the codes are the values: 0.5 and 2.5 round to even, −1.5 to −2.
    q.quantize(&[127.0, 0.5, 2.5, -1.5, -127.0, 1.49], 1, 6).unwrap();
    assert_eq!(q.codes(0), &[127, 0, 2, -2, -127, 1]);
    assert_eq!(q.scale(0), 1.0);
    q.quantize(&[0.0; 4], 1, 4).unwrap();
    assert_eq!((q.codes(0), q.scale(0)), (&[0i8; 4][..], 0.0));
    let e = q.quantize(&[1.0, f32::NAN, 0.0, 0.0, 1.0, 1.0], 2, 3).unwrap_err().to_string();
    assert!(e.contains("row 0"), "{e}");
    let e = q.quantize(&[1.0, 0.0, 0.0, 0.0, f32::INFINITY, 1.0], 2, 3).unwrap_err().to_string();
    assert!(e.contains("row 1"), "{e}");
    // Never −128, whatever the value.
    let x: Vec<f32> = (0..1000).map(|k| (k as f32 - 500.0) * 1e-3).collect();
    q.quantize(&x, 1, 1000).unwrap();
    assert_eq!(q.codes(0).iter().min(), Some(&-127));
    assert_eq!(q.codes(0).iter().max(), Some(&127));
}

#[test]
fn bad_shapes_and_scales_are_errors_naming_them() {
    let w = [1i8, 2, 3, 4, 5, 6];
    let msg = |r: Result<Int8Dense<'_>>| r.unwrap_err().to_string();
    assert!(msg(Int8Dense::new(&w, &[1.0; 2], 2, 4)).contains("codes"));
    assert!(msg(Int8Dense::new(&w, &[1.0; 3], 2, 3)).contains("scales"));
    assert!(msg(Int8Dense::new(&w, &[1.0, f32::NAN], 2, 3)).contains("row 1"));
    let wide = vec![0i8; MAX_COLS + 1];
    assert!(msg(Int8Dense::new(&wide, &[1.0], 1, MAX_COLS + 1)).contains("columns"));
    let m = Int8Matrix::Dense(Int8Dense::new(&w, &[1.0; 2], 2, 3).unwrap());
    let e = matmul(&m, &[1.0; 4], 1, &mut [0.0; 2]).unwrap_err().to_string();
    assert!(e.contains("activations"), "{e}");
    let e = matmul(&m, &[1.0; 3], 1, &mut [0.0; 3]).unwrap_err().to_string();
    assert!(e.contains("output"), "{e}");
    let bm = BitmaskMatrix::from_dense(&w, 2, 3).unwrap();
    assert!(Int8Bitmask::new(bm.view(), &[1.0]).unwrap_err().to_string().contains("scales"));
    // The constructors for scales checked elsewhere still check every shape.
    assert!(msg(Int8Dense::with_checked_scales(&w, &[1.0; 2], 2, 4)).contains("codes"));
    assert!(msg(Int8Dense::with_checked_scales(&w, &[1.0; 3], 2, 3)).contains("scales"));
    assert!(msg(Int8Dense::with_checked_scales(&wide, &[1.0], 1, MAX_COLS + 1)).contains("columns"));
    assert!(Int8Bitmask::with_checked_scales(bm.view(), &[1.0]).unwrap_err().to_string().contains("scales"));
    let mut y = [0f32; 2];
    matmul(&m, &[1.0, 1.0, 1.0], 1, &mut y).unwrap();
    // Codes 127 each; 6 · 127 · (1/127) = 6 and 15.
    assert_eq!(y, [6.0, 15.0]);
}

#[test]
fn the_bitmask_layout_is_shared_with_the_float_formats() {
    // An i8 bitmask matrix is the f32 layout over codes: the f32 product of its view treats the
    // codes as numbers.
    let w = [0i8, 3, 0, -128, 0, 0, 0, 0, 1];
    let m = BitmaskMatrix::from_dense(&w, 1, 9).unwrap();
    assert_eq!(m.bitmask(), &[0b1010, 0b1]);
    assert_eq!(m.values(), &[3, -128, 1]);
    let mut y = [0f32];
    crate::bitmask::matmul(&m.view(), &[1.0; 9], 1, &mut y).unwrap();
    assert_eq!(y, [-124.0]);
}

#[test]
fn activation_quantization_is_the_same_on_every_path() {
    let mut rng = Rng8::seed_from_u64(5);
    for &len in &[1usize, 15, 16, 17, 576, 1000, 1536] {
        for trial in 0..20 {
            let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            match trial {
                0 => x.fill(0.0),
                1 => x[len / 2] = -1e30,
                2 => x[len - 1] = f32::NAN,
                3 => x[0] = f32::NEG_INFINITY,
                4 => x.iter_mut().for_each(|v| *v = (*v * 4.0).round() / 4.0), // ties
                _ => {}
            }
            let mut want = vec![0i8; len];
            let r = quantize_row_on(crate::cpu::Isa::Scalar, &x, &mut want);
            for isa in crate::cpu::Isa::available() {
                let mut got = vec![0i8; len];
                let g = quantize_row_on(isa, &x, &mut got);
                assert_eq!(
                    g.map(|(s, q)| (s.to_bits(), q)),
                    r.map(|(s, q)| (s.to_bits(), q)),
                    "{isa:?} len {len} trial {trial}"
                );
                if r.is_some() {
                    assert_eq!(got, want, "{isa:?} len {len} trial {trial}");
                }
            }
        }
    }
}
