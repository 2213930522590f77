//! The fast mode's products: convolutions and linear layers multiplied in bf16 with AVX512-BF16
//! (`vdpbf16ps`), accumulated in f32. Weights are packed once, at construction, into the
//! layout the kernel reads (half the memory of f32); activations are rounded to bf16 per call.
//!
//! Operands are pairs: a `u32` holds two bf16 values adjacent along the summed dimension, and
//! `vdpbf16ps` multiplies 16 pairs of one operand with a broadcast pair of the other. 3×3
//! convolutions go through Winograd's F(2×2, 3×3) (see `winograd`), 4/9 of the products.

mod attention;
#[cfg(target_arch = "x86_64")]
mod kernel;
mod layers;
mod winograd;

pub use attention::attention;
pub use layers::{Bf16Conv, Bf16Linear};

use rayon::prelude::*;

use super::SharedMut;

/// Rows of a tile: one broadcast pair each.
const MR: usize = 8;
/// Columns of a tile: three vectors of 16.
const NR: usize = 48;

/// Whether this CPU runs the fast mode's kernels (x86-64 with AVX512F and AVX512-BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The pair (bf16(lo), bf16(hi)) as the kernel reads it, rounded to nearest even.
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// `half::bf16::from_f32(v).to_bits()` (round to nearest even, NaN kept quiet) without its
/// branches, so that packing loops vectorise: packing a full-size UNet is dominated by it.
#[inline(always)]
fn bf16_bits(v: f32) -> u32 {
    let x = v.to_bits();
    if x & 0x7fff_ffff > 0x7f80_0000 {
        (x >> 16) | 0x40
    } else {
        (x + 0x7fff + ((x >> 16) & 1)) >> 16
    }
}

/// What the kernel adds to each stored sum.
#[derive(Clone, Copy)]
enum Bias {
    None,
    /// One value per output row (a convolution's output channels).
    PerRow(*const f32),
    /// One value per output column (a linear layer's output features).
    PerColumn(*const f32),
}

// SAFETY: the pointers are only read, from a bias that outlives the product using it.
unsafe impl Send for Bias {}
unsafe impl Sync for Bias {}

impl Bias {
    fn offset(self, rows: usize, cols: usize) -> Self {
        // SAFETY: callers offset by a tile origin inside the bias they passed.
        unsafe {
            match self {
                Bias::None => Bias::None,
                Bias::PerRow(p) => Bias::PerRow(p.add(rows)),
                Bias::PerColumn(p) => Bias::PerColumn(p.add(cols)),
            }
        }
    }
}

/// The left operand: `rows` rows of `k` pairs along the summed dimension.
enum Left<'a> {
    /// Packed in panels of [`MR`] rows, the panel's rows side by side for each pair
    /// (`[k][MR]`); rows past `rows` are zero. Weights, packed once.
    Panels {
        data: &'a [u32],
        rows: usize,
        k: usize,
    },
    /// Row-major, `row` pairs apart. Activations, as they come.
    Rows {
        data: &'a [u32],
        rows: usize,
        k: usize,
        row: usize,
    },
}

impl Left<'_> {
    fn rows(&self) -> usize {
        match *self {
            Left::Panels { rows, .. } | Left::Rows { rows, .. } => rows,
        }
    }

    fn k(&self) -> usize {
        match *self {
            Left::Panels { k, .. } | Left::Rows { k, .. } => k,
        }
    }

    fn in_bounds(&self) -> bool {
        match *self {
            Left::Panels { data, rows, k } => data.len() >= rows.div_ceil(MR) * k * MR,
            Left::Rows { data, rows, k, row } => {
                rows == 0 || (k <= row && data.len() >= (rows - 1) * row + k)
            }
        }
    }

    /// The kernel's row pointers and step for panel `p` (rows past the end repeat the last).
    fn panel(&self, p: usize) -> ([*const u32; MR], usize) {
        match *self {
            Left::Panels { data, k, .. } => {
                // SAFETY: in bounds by `in_bounds`: panel p spans k·MR pairs.
                let base = unsafe { data.as_ptr().add(p * k * MR) };
                (std::array::from_fn(|i| base.wrapping_add(i)), MR)
            }
            Left::Rows {
                data, rows, row, ..
            } => (
                std::array::from_fn(|i| {
                    data.as_ptr().wrapping_add((p * MR + i).min(rows - 1) * row)
                }),
                1,
            ),
        }
    }
}

/// The right operand: for pair k, the columns start at `k·row`.
struct Right<'a> {
    data: &'a [u32],
    row: usize,
    kp: usize,
    cols: usize,
}

/// Where a product's rows go: `row` floats apart from `ptr`, `len` floats writable there.
#[derive(Clone, Copy)]
struct Out {
    ptr: SharedMut,
    len: usize,
    row: usize,
}

/// c = a · b (+ bias), with c row-major at `c_row` floats per row, on all threads.
fn product(a: &Left, b: &Right, c: &mut [f32], c_row: usize, bias: Bias) {
    let out = Out {
        ptr: SharedMut(c.as_mut_ptr()),
        len: c.len(),
        row: c_row,
    };
    // SAFETY: `c` is borrowed mutably for the call, so nothing else writes it.
    unsafe { product_into(a, b, out, bias, true) }
}

/// a · b (+ bias) into `out`, on all threads when `parallel`, else on the caller's.
///
/// # Safety
/// `out.ptr` must be writable for `out.len` floats, and nothing else may read or write the
/// elements the product stores (rows < a's rows at `out.row` apart, columns < b's) meanwhile.
unsafe fn product_into(a: &Left, b: &Right, out: Out, bias: Bias, parallel: bool) {
    let rows = a.rows();
    let panels = rows.div_ceil(MR);
    let tiles = b.cols.div_ceil(NR);
    // The kernel's reads and writes, checked once here so the tiles can run unchecked.
    assert_eq!(a.k(), b.kp, "bf16 product: summed lengths differ");
    assert!(a.in_bounds(), "bf16 product: left operand too short");
    assert!(
        b.kp == 0 || b.data.len() >= (b.kp - 1) * b.row + tiles * NR,
        "bf16 product: right operand too short"
    );
    assert!(
        rows == 0 || b.cols == 0 || out.len >= (rows - 1) * out.row + b.cols,
        "bf16 product: output too short"
    );
    if rows == 0 || b.cols == 0 {
        return;
    }
    // Columns in blocks whose right-operand rows stay in L2 while every panel passes over
    // them; rows split further when there are too few blocks to keep all threads busy.
    const BLOCK_TILES: usize = 4;
    let blocks = tiles.div_ceil(BLOCK_TILES);
    let want = if parallel {
        4 * rayon::current_num_threads()
    } else {
        1
    };
    let row_groups = want.div_ceil(blocks).clamp(1, panels);
    let per_group = panels.div_ceil(row_groups);
    let task = |task: usize| {
        let (block, group) = (task / row_groups, task % row_groups);
        let tile_range = block * BLOCK_TILES..((block + 1) * BLOCK_TILES).min(tiles);
        for p in group * per_group..((group + 1) * per_group).min(panels) {
            let (a_rows, a_step) = a.panel(p);
            let tile_rows = (rows - p * MR).min(MR);
            for t in tile_range.clone() {
                let cols = (b.cols - t * NR).min(NR);
                // SAFETY: bounds asserted above; each (panel, tile) pair writes its own
                // rows × cols block of the output, and the tasks cover disjoint pairs.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    kernel::tile(
                        a_rows,
                        a_step,
                        b.data.as_ptr().add(t * NR),
                        b.kp,
                        b.row,
                        out.ptr.add(p * MR * out.row + t * NR),
                        out.row,
                        tile_rows,
                        cols,
                        bias.offset(p * MR, t * NR),
                    );
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("bf16 products are only built where available() is true");
            }
        }
    };
    if parallel {
        (0..blocks * row_groups).into_par_iter().for_each(task);
    } else {
        (0..blocks * row_groups).for_each(task);
    }
}

/// `dst[j]` = `pair(lo[j], hi[j])` (hi zero when missing), vectorised where available.
fn pairs(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
    assert!(lo.len() >= dst.len() && hi.is_none_or(|h| h.len() >= dst.len()));
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU features were just checked; lengths asserted above.
        unsafe { kernel::pairs(lo, hi, dst) };
        return;
    }
    for (j, d) in dst.iter_mut().enumerate() {
        *d = pair(lo[j], hi.map_or(0.0, |h| h[j]));
    }
}

/// `dst` = the pairs of `src` along itself (see [`kernel::row_pairs`]), vectorised where available.
fn row_pairs(src: &[f32], dst: &mut [u32]) {
    assert!(src.len().div_ceil(2) == dst.len());
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU features were just checked; lengths asserted above.
        unsafe { kernel::row_pairs(src, dst) };
        return;
    }
    for (j, d) in dst.iter_mut().enumerate() {
        *d = pair(src[2 * j], src.get(2 * j + 1).copied().unwrap_or(0.0));
    }
}

/// `rows` rows of `k` values (`value(r, i)`), packed as [`Left::Panels`] (an odd row ends
/// with a zero).
fn pack_panels(rows: usize, k: usize, value: impl Fn(usize, usize) -> f32 + Sync) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut data = vec![0u32; rows.div_ceil(MR) * kp * MR];
    data.par_chunks_mut(kp * MR)
        .enumerate()
        .for_each(|(p, panel)| {
            for r in p * MR..(p * MR + MR).min(rows) {
                for j in 0..kp {
                    let hi = if 2 * j + 1 < k {
                        value(r, 2 * j + 1)
                    } else {
                        0.0
                    };
                    panel[j * MR + r - p * MR] = pair(value(r, 2 * j), hi);
                }
            }
        });
    data
}

#[cfg(test)]
mod rounding_tests {
    #[test]
    fn bf16_bits_rounds_as_half_does() {
        // Every sign, exponent and the bits around the rounding point, NaNs and infinities.
        let mut x: u32 = 0x9e37_79b9;
        let check = |bits: u32| {
            let v = f32::from_bits(bits);
            assert_eq!(
                super::bf16_bits(v),
                u32::from(half::bf16::from_f32(v).to_bits()),
                "{bits:#010x}"
            );
        };
        for special in [
            0,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001,
        ] {
            check(special);
        }
        for top in 0..=0xffffu32 {
            for low in [0, 0x7fff, 0x8000, 0x8001, 0xffff] {
                check(top << 16 | low);
            }
        }
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            check(x);
        }
    }
}
