//! Transposing f32 matrices between the layouts of the products: activations `[tokens, cols]`
//! into columns of tokens (the prefill panels, the sampled product's `xᵀ` and `dyᵀ`) and the
//! transposed outputs back.
//!
//! One safe entry point over strided source and destination, in blocks held in registers:
//! 16 × 16 on AVX-512 (16 loads, 64 shuffles, 16 stores per 256 values) and 8 × 8 on AVX2;
//! the edges and other CPUs take the scalar loop, which is also the reference. A scalar
//! transpose writes one value per store to lines far apart; in the sampled product it took
//! a fifth of the time.

use crate::cpu::Isa;

/// `dst[c · dst_stride + i] = src[i · src_stride + c]` for `i < n`, `c < cols`, and zeros for
/// `i` in `n..n_pad`: `src` is `n` rows of `cols` values `src_stride` apart, `dst` gets `cols`
/// rows of `n_pad` values `dst_stride` apart.
///
/// # Panics
/// Where the slices are too short for the shapes, or `n > n_pad`, or a stride is shorter than
/// its rows (callers size their buffers from the same shapes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn transpose(
    isa: Isa,
    src: &[f32],
    n: usize,
    cols: usize,
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
    n_pad: usize,
) {
    assert!(n <= n_pad && cols <= src_stride && n_pad <= dst_stride, "transpose: shapes");
    if cols == 0 || n_pad == 0 {
        return;
    }
    assert!(n == 0 || src.len() >= (n - 1) * src_stride + cols, "transpose: source of {n} rows");
    assert!(dst.len() >= (cols - 1) * dst_stride + n_pad, "transpose: destination of {cols} rows");
    let b = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if crate::cpu::supports(isa) => 16,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if crate::cpu::supports(isa) => 8,
        _ => 0,
    };
    let whole = |len: usize| len.checked_div(b).map_or(0, |q| q * b);
    let (full_i, full_c) = (whole(n_pad), whole(cols));
    #[cfg(target_arch = "x86_64")]
    if b > 0 {
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        for c0 in (0..full_c).step_by(b) {
            for i0 in (0..full_i).step_by(b) {
                // Source rows of this block that exist (the others are zero padding).
                let valid = n.saturating_sub(i0).min(b);
                // SAFETY: the instruction set is available (checked above); rows i0 .. i0 +
                // valid of the source hold columns c0 .. c0 + b (i0 + valid <= n, c0 + b <=
                // cols, the asserted source length); destination rows c0 .. c0 + b hold
                // columns i0 .. i0 + b (i0 + b <= n_pad, c0 + b <= cols, the asserted length).
                unsafe {
                    let s = sp.add(i0 * src_stride + c0);
                    let d = dp.add(c0 * dst_stride + i0);
                    if b == 16 {
                        simd::block16(s, src_stride, valid, d, dst_stride)
                    } else {
                        simd::block8(s, src_stride, valid, d, dst_stride)
                    }
                }
            }
        }
    }
    // The edges: columns past the last whole block (all rows), and rows past it (whole blocks
    // of columns).
    let at = |i: usize, c: usize| if i < n { src[i * src_stride + c] } else { 0.0 };
    for c in full_c..cols {
        for i in 0..n_pad {
            dst[c * dst_stride + i] = at(i, c);
        }
    }
    for c in 0..full_c {
        for i in full_i..n_pad {
            dst[c * dst_stride + i] = at(i, c);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// One 16 × 16 block: `d[c · ds + i] = s[i · ss + c]`, rows `i >= valid` zero.
    ///
    /// # Safety
    /// AVX-512F is available; rows `0..valid` of `s` (`ss` apart) hold 16 values, and rows
    /// `0..16` of `d` (`ds` apart) have room for 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block16(s: *const f32, ss: usize, valid: usize, d: *mut f32, ds: usize) {
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, v) in r.iter_mut().enumerate().take(valid) {
            // SAFETY: row i < valid holds 16 values (contract).
            *v = unsafe { _mm512_loadu_ps(s.add(i * ss)) };
        }
        // Within each 128-bit lane: 4 × 4 transposes of rows (4g .. 4g + 4).
        let mut t = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a, b, c, e) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
            let (ab_lo, ab_hi) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let (ce_lo, ce_hi) = (_mm512_unpacklo_ps(c, e), _mm512_unpackhi_ps(c, e));
            // t[4g + k]: lane l holds column 4l + k of rows 4g .. 4g + 4.
            t[4 * g] = _mm512_shuffle_ps::<0x44>(ab_lo, ce_lo);
            t[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(ab_lo, ce_lo);
            t[4 * g + 2] = _mm512_shuffle_ps::<0x44>(ab_hi, ce_hi);
            t[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(ab_hi, ce_hi);
        }
        // Across lanes: column 4l + k is lane l of t[k], t[4 + k], t[8 + k], t[12 + k].
        for k in 0..4 {
            let u0 = _mm512_shuffle_f32x4::<0x88>(t[k], t[4 + k]); // lanes 0, 2 of each
            let u1 = _mm512_shuffle_f32x4::<0x88>(t[8 + k], t[12 + k]);
            let v0 = _mm512_shuffle_f32x4::<0xDD>(t[k], t[4 + k]); // lanes 1, 3 of each
            let v1 = _mm512_shuffle_f32x4::<0xDD>(t[8 + k], t[12 + k]);
            let cols = [
                (k, _mm512_shuffle_f32x4::<0x88>(u0, u1)),
                (8 + k, _mm512_shuffle_f32x4::<0xDD>(u0, u1)),
                (4 + k, _mm512_shuffle_f32x4::<0x88>(v0, v1)),
                (12 + k, _mm512_shuffle_f32x4::<0xDD>(v0, v1)),
            ];
            for (c, v) in cols {
                // SAFETY: row c < 16 of d has room for 16 values (contract).
                unsafe { _mm512_storeu_ps(d.add(c * ds), v) };
            }
        }
    }

    /// One 8 × 8 block, as [`block16`].
    ///
    /// # Safety
    /// AVX is available; rows `0..valid` of `s` hold 8 values, rows `0..8` of `d` room for 8.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn block8(s: *const f32, ss: usize, valid: usize, d: *mut f32, ds: usize) {
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, v) in r.iter_mut().enumerate().take(valid) {
            // SAFETY: row i < valid holds 8 values (contract).
            *v = unsafe { _mm256_loadu_ps(s.add(i * ss)) };
        }
        let mut t = [_mm256_setzero_ps(); 8];
        for g in 0..2 {
            let (a, b, c, e) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
            let (ab_lo, ab_hi) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            let (ce_lo, ce_hi) = (_mm256_unpacklo_ps(c, e), _mm256_unpackhi_ps(c, e));
            t[4 * g] = _mm256_shuffle_ps::<0x44>(ab_lo, ce_lo);
            t[4 * g + 1] = _mm256_shuffle_ps::<0xEE>(ab_lo, ce_lo);
            t[4 * g + 2] = _mm256_shuffle_ps::<0x44>(ab_hi, ce_hi);
            t[4 * g + 3] = _mm256_shuffle_ps::<0xEE>(ab_hi, ce_hi);
        }
        for k in 0..4 {
            // SAFETY: rows k and 4 + k < 8 of d have room for 8 values (contract).
            unsafe {
                _mm256_storeu_ps(d.add(k * ds), _mm256_permute2f128_ps::<0x20>(t[k], t[4 + k]));
                _mm256_storeu_ps(d.add((4 + k) * ds), _mm256_permute2f128_ps::<0x31>(t[k], t[4 + k]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_equal_the_scalar_loop_over_shapes_and_strides() {
        for &(n, cols, n_pad) in
            &[(1, 1, 1), (16, 16, 16), (8, 8, 8), (17, 33, 32), (5, 40, 16), (100, 70, 112), (0, 9, 16), (31, 16, 31)]
        {
            let (ss, ds) = (cols + 3, n_pad + 5);
            let src: Vec<f32> = (0..n * ss).map(|k| k as f32 * 0.5 - 7.0).collect();
            let mut want = vec![f32::NAN; cols * ds];
            transpose(Isa::Scalar, &src, n, cols, ss, &mut want, ds, n_pad);
            for c in 0..cols {
                for i in 0..n_pad {
                    let v = if i < n { src[i * ss + c] } else { 0.0 };
                    assert_eq!(want[c * ds + i].to_bits(), v.to_bits(), "scalar ({i}, {c})");
                }
            }
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; cols * ds];
                transpose(isa, &src, n, cols, ss, &mut got, ds, n_pad);
                for c in 0..cols {
                    assert_eq!(
                        got[c * ds..c * ds + n_pad].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want[c * ds..c * ds + n_pad].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{} n {n} cols {cols} row {c}",
                        isa.name()
                    );
                }
            }
        }
    }
}
