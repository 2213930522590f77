//! The AVX512-BF16 inner loops: one 8×48 tile of a product of bf16 pairs (`vdpbf16ps`, 32
//! multiply-adds per instruction, twice the f32 FMA rate) and the f32 → bf16-pair conversion
//! that feeds it.

use std::arch::x86_64::*;

use super::{Bias, MR, NR};

/// `c[i][j] = Σ_k a[i][k·a_step] · b[k·b_row + j]` for i < `rows`, j < `cols` (each term a
/// pair of bf16 products), plus `bias`, stored at `c + i·c_row + j`.
///
/// # Safety
/// The CPU must have AVX512F and AVX512-BF16. Each `a[i]` must be readable at every
/// `k·a_step`, `b` at every `k·b_row + j` for k < kp, j < NR (whatever
/// `cols` is), `c` writable at every stored element, and the bias readable where used.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile(
    a: [*const u32; MR],
    a_step: usize,
    b: *const u32,
    kp: usize,
    b_row: usize,
    c: *mut f32,
    c_row: usize,
    rows: usize,
    cols: usize,
    bias: Bias,
) {
    let mut acc = [[_mm512_setzero_ps(); NR / 16]; MR];
    let (mut at, mut bp) = (0, b);
    for _ in 0..kp {
        let bv: [__m512bh; NR / 16] =
            std::array::from_fn(|v| as_bh(_mm512_loadu_si512(bp.add(16 * v).cast())));
        for (i, row) in acc.iter_mut().enumerate() {
            let av = as_bh(_mm512_set1_epi32(*a[i].add(at) as i32));
            for (sum, &bv) in row.iter_mut().zip(&bv) {
                *sum = _mm512_dpbf16_ps(*sum, av, bv);
            }
        }
        at += a_step;
        bp = bp.add(b_row);
    }
    for (i, row) in acc.iter().enumerate().take(rows) {
        for (v, &sum) in row.iter().enumerate() {
            let col = 16 * v;
            if col >= cols {
                break;
            }
            let mask: __mmask16 = if cols - col >= 16 {
                0xffff
            } else {
                (1u16 << (cols - col)) - 1
            };
            let sum = match bias {
                Bias::None => sum,
                Bias::PerRow(values) => _mm512_add_ps(sum, _mm512_set1_ps(*values.add(i))),
                Bias::PerColumn(values) => {
                    _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, values.add(col)))
                }
            };
            _mm512_mask_storeu_ps(c.add(i * c_row + col), mask, sum);
        }
    }
}

/// `dst[j]` = the pair `(bf16(lo[j]), bf16(hi[j]))`, rounded to nearest even; a missing `hi`
/// pairs with zero.
///
/// # Safety
/// The CPU must have AVX512F and AVX512-BF16; `lo` and `hi` at least as long as `dst`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn pairs(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
    let n = dst.len();
    let full = n - n % 16;
    for j in (0..full).step_by(16) {
        let l = widen_bf16(_mm512_loadu_ps(lo.as_ptr().add(j)));
        let h = match hi {
            Some(hi) => widen_bf16(_mm512_loadu_ps(hi.as_ptr().add(j))),
            None => _mm512_setzero_si512(),
        };
        let p = _mm512_or_si512(l, _mm512_slli_epi32::<16>(h));
        _mm512_storeu_si512(dst.as_mut_ptr().add(j).cast(), p);
    }
    for j in full..n {
        dst[j] = super::pair(lo[j], hi.map_or(0.0, |h| h[j]));
    }
}

/// The 16 floats of `x` rounded to bf16, each in the low half of a 32-bit lane.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn widen_bf16(x: __m512) -> __m512i {
    _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
        _mm512_cvtneps_pbh(x),
    ))
}

#[target_feature(enable = "avx512f")]
unsafe fn as_bh(x: __m512i) -> __m512bh {
    std::mem::transmute(x)
}

/// `dst[j]` = the pair `(bf16(src[2j]), bf16(src[2j+1]))`: a row already paired along itself.
///
/// # Safety
/// The CPU must have AVX512F and AVX512-BF16; `src` holds `2·dst.len()` or `2·dst.len() − 1`
/// values (an odd row pairs its last value with zero).
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn row_pairs(src: &[f32], dst: &mut [u32]) {
    let full = src.len() / 32;
    for q in 0..full {
        let lo = _mm512_loadu_ps(src.as_ptr().add(32 * q));
        let hi = _mm512_loadu_ps(src.as_ptr().add(32 * q + 16));
        let p = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(
            dst.as_mut_ptr().add(16 * q).cast(),
            std::mem::transmute::<__m512bh, __m512i>(p),
        );
    }
    for j in 16 * full..dst.len() {
        dst[j] = super::pair(src[2 * j], src.get(2 * j + 1).copied().unwrap_or(0.0));
    }
}
