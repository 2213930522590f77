//! 3×3 convolutions (stride 1, padding 1) by Winograd's F(2×2, 3×3): each 2×2 block of
//! outputs comes from a 4×4 block of inputs through 16 products of transformed values
//! instead of 36, so the work is 16 matrix products of [Cout × Cin] by [Cin × blocks], 4/9
//! of the direct convolution's. The transforms use only ±1 and ½, computed in f32; the
//! transformed inputs and weights are what is rounded to bf16.

use std::ops::Range;

use rayon::prelude::*;

use super::{pack_panels, pairs, product, Bias, Left, Right, MR, NR};

/// Output blocks per pass: bounds the transformed input and the 16 products' outputs
/// (16·Cout·4096 floats: 21 MB at 320 channels) however large the image.
const BLOCKS_PER_PASS: usize = 4096;

/// The 16 transformed weight matrices U_ξ = G·g·Gᵀ, each packed as the left operand.
#[derive(Debug, PartialEq)]
pub(super) struct Weights {
    panels: Vec<u32>,
    out_channels: usize,
    in_channels: usize,
}

impl Weights {
    /// From `taps` `[Cout][3][3][Cin]` in f32.
    pub(super) fn new(taps: &[f32], out_channels: usize, in_channels: usize) -> Self {
        let (cout, cin) = (out_channels, in_channels);
        // u[co][ξ][ci]: G = [[1,0,0],[½,½,½],[½,−½,½],[0,0,1]] on both sides of each 3×3 g.
        let mut u = vec![0f32; 16 * cout * cin];
        let g_rows = |g: [f32; 3]| {
            [
                g[0],
                0.5 * (g[0] + g[1] + g[2]),
                0.5 * (g[0] - g[1] + g[2]),
                g[2],
            ]
        };
        u.par_chunks_mut(16 * cin).enumerate().for_each(|(co, u)| {
            for ci in 0..cin {
                let g = |y: usize, x: usize| taps[((co * 3 + y) * 3 + x) * cin + ci];
                // Columns first: for each kernel row, the row's four transformed values.
                let rows: [[f32; 4]; 3] =
                    std::array::from_fn(|y| g_rows([g(y, 0), g(y, 1), g(y, 2)]));
                for j in 0..4 {
                    let col = g_rows([rows[0][j], rows[1][j], rows[2][j]]);
                    for (i, value) in col.into_iter().enumerate() {
                        u[(i * 4 + j) * cin + ci] = value;
                    }
                }
            }
        });
        let per = cout.div_ceil(MR) * cin.div_ceil(2) * MR;
        let mut panels = Vec::with_capacity(16 * per);
        for xi in 0..16 {
            panels.extend(pack_panels(cout, cin, |r, i| u[(r * 16 + xi) * cin + i]));
        }
        Weights {
            panels,
            out_channels,
            in_channels,
        }
    }

    /// The convolution of `x` `[batch][Cin][h][w]` (+ `bias` per output channel).
    pub(super) fn conv(
        &self,
        x: &[f32],
        batch: usize,
        h: usize,
        w: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let (cin, cout) = (self.in_channels, self.out_channels);
        let kp = cin.div_ceil(2);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let per = cout.div_ceil(MR) * kp * MR;
        let mut out = vec![0f32; batch * cout * h * w];
        let geometry = Geometry { cin, cout, h, w };
        // Passes over block rows, counted across the batch (row g is image g / th's row
        // g % th), so small images share one pass and large ones take several.
        let rows_per_pass = (BLOCKS_PER_PASS / tw).clamp(1, batch * th);
        // Sized for the largest pass once: every pass overwrites what it reads.
        let mut transformed = vec![0u32; 16 * kp * rows_per_pass * tw + NR];
        let mut products = vec![0f32; 16 * cout * rows_per_pass * tw];
        for g0 in (0..batch * th).step_by(rows_per_pass) {
            let rows = g0..(g0 + rows_per_pass).min(batch * th);
            let blocks = rows.len() * tw;
            transform_input(x, &geometry, rows.clone(), &mut transformed);
            for xi in 0..16 {
                product(
                    &Left::Panels {
                        data: &self.panels[xi * per..][..per],
                        rows: cout,
                        k: kp,
                    },
                    &Right {
                        data: &transformed[xi * blocks..],
                        row: 16 * blocks,
                        kp,
                        cols: blocks,
                    },
                    &mut products[xi * cout * blocks..][..cout * blocks],
                    blocks,
                    Bias::None,
                );
            }
            transform_output(&products, &geometry, rows, bias, &mut out);
        }
        out
    }
}

/// The shapes a pass works on: channels in and out, the image's height and width.
struct Geometry {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
}

/// Bᵀ·d·B for the 4×4 input blocks of block rows `ty0..ty0+rows` of one image, into
/// `dst[channel pair][ξ][block]` as bf16 pairs (so each pair's rows are one chunk).
///
/// `Bᵀ = [[1,0,−1,0],[0,1,1,0],[0,−1,1,0],[0,1,0,−1]]`. The loops run along a block row with
/// the even and odd input columns split apart, so every step is a contiguous vector operation.
fn transform_input(x: &[f32], geo: &Geometry, rows: Range<usize>, dst: &mut [u32]) {
    let Geometry { cin, h, w, .. } = *geo;
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let blocks = rows.len() * tw;
    let kp = cin.div_ceil(2);
    dst[..kp * 16 * blocks]
        .par_chunks_mut(16 * blocks)
        .enumerate()
        .for_each_init(
            || Scratch::new(tw),
            |scratch, (j, out)| {
                for g in rows.clone() {
                    let (bi, ty) = (g / th, g % th);
                    for c in 0..2 {
                        let ch = 2 * j + c;
                        for r in 0..4 {
                            // Input row 2·ty + r − 1 (padding 1 above), zero outside the image.
                            let y = (2 * ty + r).wrapping_sub(1);
                            let line = (ch < cin && y < h)
                                .then(|| &x[((bi * cin + ch) * h + y) * w..][..w]);
                            scratch.row_transform(line, r);
                        }
                        scratch.column_transform(c);
                    }
                    let at = (g - rows.start) * tw;
                    for xi in 0..16 {
                        pairs(
                            scratch.value(0, xi),
                            Some(scratch.value(1, xi)),
                            &mut out[xi * blocks + at..][..tw],
                        );
                    }
                }
            },
        );
}

/// One task's working rows for [`transform_input`].
struct Scratch {
    tw: usize,
    /// A padded input row's even and odd columns (padded column x is input column x − 1).
    even: Vec<f32>,
    odd: Vec<f32>,
    /// (Bᵀ-transformed along the row) `[row r][component k][block]`.
    rows: Vec<f32>,
    /// The transformed values `[channel of the pair][ξ][block]`.
    values: Vec<f32>,
}

impl Scratch {
    fn new(tw: usize) -> Self {
        Scratch {
            tw,
            even: vec![0.0; tw + 1],
            odd: vec![0.0; tw + 1],
            rows: vec![0.0; 16 * tw],
            values: vec![0.0; 32 * tw],
        }
    }

    /// The row transform of input row `line` (zeros if `None`) as padded row `r` of the block.
    fn row_transform(&mut self, line: Option<&[f32]>, r: usize) {
        let tw = self.tw;
        self.even.fill(0.0);
        self.odd.fill(0.0);
        if let Some(line) = line {
            // Padded column 2t is input column 2t − 1, padded 2t + 1 is input 2t.
            let pairs = line.chunks_exact(2);
            if let Some(&last) = pairs.remainder().first() {
                self.odd[line.len() / 2] = last;
            }
            for ((pair, odd), even) in pairs.zip(&mut self.odd).zip(&mut self.even[1..]) {
                *odd = pair[0];
                *even = pair[1];
            }
        }
        let (e, o) = (&self.even, &self.odd);
        let out = &mut self.rows[r * 4 * tw..][..4 * tw];
        let (r0, rest) = out.split_at_mut(tw);
        let (r1, rest) = rest.split_at_mut(tw);
        let (r2, r3) = rest.split_at_mut(tw);
        // Padded columns 2t, 2t+1, 2t+2, 2t+3 of the block at t.
        let columns = e.iter().zip(o).zip(e[1..].iter().zip(&o[1..]));
        let outs = r0
            .iter_mut()
            .zip(r1.iter_mut())
            .zip(r2.iter_mut().zip(r3.iter_mut()));
        for (((d0, d1), (d2, d3)), ((r0, r1), (r2, r3))) in columns.zip(outs) {
            *r0 = d0 - d2;
            *r1 = d1 + d2;
            *r2 = d2 - d1;
            *r3 = d1 - d3;
        }
    }

    /// The column transform of the four row-transformed rows into channel `c`'s values.
    fn column_transform(&mut self, c: usize) {
        let tw = self.tw;
        let row = |r: usize, k: usize| &self.rows[(r * 4 + k) * tw..][..tw];
        let values = &mut self.values[c * 16 * tw..][..16 * tw];
        for k in 0..4 {
            let (a, b, cc, d) = (row(0, k), row(1, k), row(2, k), row(3, k));
            let (v0, rest) = values[k * tw..].split_at_mut(tw);
            let (v1, rest) = rest[3 * tw..].split_at_mut(tw);
            let (v2, rest) = rest[3 * tw..].split_at_mut(tw);
            let v3 = &mut rest[3 * tw..][..tw];
            let ins = a.iter().zip(b).zip(cc.iter().zip(d));
            let outs = v0
                .iter_mut()
                .zip(v1.iter_mut())
                .zip(v2.iter_mut().zip(v3.iter_mut()));
            for (((a, b), (c, d)), ((v0, v1), (v2, v3))) in ins.zip(outs) {
                *v0 = a - c;
                *v1 = b + c;
                *v2 = c - b;
                *v3 = b - d;
            }
        }
    }

    /// Channel `c`'s transformed values at ξ along the block row.
    fn value(&self, c: usize, xi: usize) -> &[f32] {
        &self.values[(c * 16 + xi) * self.tw..][..self.tw]
    }
}

/// Aᵀ·m·A of the 16 products for each block of block rows `rows`, plus the bias, into
/// the output `[batch][Cout][h][w]` (`Aᵀ = [[1,1,1,0],[0,1,−1,−1]]`).
fn transform_output(
    products: &[f32],
    geo: &Geometry,
    rows: Range<usize>,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let Geometry { cout, h, w, .. } = *geo;
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let blocks = rows.len() * tw;
    // The output planes (image, channel) of the images this pass touches.
    let images = rows.start / th..(rows.end - 1) / th + 1;
    out[images.start * cout * h * w..images.end * cout * h * w]
        .par_chunks_mut(h * w)
        .enumerate()
        .for_each_init(
            || vec![0f32; 8 * tw],
            |s, (slot, plane)| {
                let (bi, co) = (images.start + slot / cout, slot % cout);
                let bv = bias.map_or(0.0, |b| b[co]);
                let image_rows = bi * th..(bi + 1) * th;
                for g in rows.start.max(image_rows.start)..rows.end.min(image_rows.end) {
                    let ty = g - bi * th;
                    let at = (g - rows.start) * tw;
                    let m = |xi: usize| &products[(xi * cout + co) * blocks + at..][..tw];
                    // Columns first: s[a][k] = (Aᵀ·m)[a][k] along the block row.
                    for k in 0..4 {
                        let (m0, m1, m2, m3) = (m(k), m(4 + k), m(8 + k), m(12 + k));
                        let (s0, rest) = s[k * tw..].split_at_mut(tw);
                        let s1 = &mut rest[3 * tw..][..tw];
                        let ins = m0.iter().zip(m1).zip(m2.iter().zip(m3));
                        for (((m0, m1), (m2, m3)), (s0, s1)) in ins.zip(s0.iter_mut().zip(s1)) {
                            *s0 = m0 + m1 + m2;
                            *s1 = m1 - m2 - m3;
                        }
                    }
                    for a in 0..2 {
                        let y = 2 * ty + a;
                        if y >= h {
                            continue;
                        }
                        let sa = |k: usize| &s[(a * 4 + k) * tw..][..tw];
                        let (s0, s1, s2, s3) = (sa(0), sa(1), sa(2), sa(3));
                        let line = &mut plane[y * w..][..w];
                        let (pairs, last) = line.split_at_mut(w - w % 2);
                        let ins = s0.iter().zip(s1).zip(s2.iter().zip(s3));
                        for (((s0, s1), (s2, s3)), out) in ins.zip(pairs.chunks_exact_mut(2)) {
                            out[0] = s0 + s1 + s2 + bv;
                            out[1] = s1 - s2 - s3 + bv;
                        }
                        if let Some(out) = last.first_mut() {
                            let t = tw - 1;
                            *out = s0[t] + s1[t] + s2[t] + bv;
                        }
                    }
                }
            },
        );
}
