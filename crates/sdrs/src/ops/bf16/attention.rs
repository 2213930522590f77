//! Blocked multi-head attention with both products in bf16: the exact kernel's shape (one
//! block of queries at a time, exact softmax in f32 over the whole key range), with keys and
//! values packed as bf16 pairs once per head.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{pair, product_into, row_pairs, Bias, Left, Out, Right, NR};
use crate::ops::{f32_slice, math, unsupported, SharedMut};
use crate::Result;

/// Queries per task, as in the exact kernel: a 128 × 4096 score block is 2 MiB.
const QUERY_BLOCK: usize = 128;

/// Below this many keys (cross-attention on 77 text tokens) packing costs more than bf16
/// saves: 24 ms against the exact kernel's 17 ms for 4096 queries × 77 keys, 320 channels.
const MIN_KEYS: usize = 256;

/// softmax(q·kᵀ·scale)·v per head, as [`crate::ops::attention()`], with bf16 products; other
/// dtypes and devices, and short key ranges, go to the exact kernel.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let long = k.dim(1)? >= MIN_KEYS;
    if !(long && super::available() && f32_cpu(q) && f32_cpu(k) && f32_cpu(v)) {
        return crate::ops::attention(q, k, v, heads, scale);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(q.apply_op3_no_bwd(&k, &v, &Bf16Attention { heads, scale })?)
}

struct Bf16Attention {
    heads: usize,
    scale: f64,
}

/// One head's keys as the right operand of q·kᵀ: [d/2][m] pairs along the head's channels.
fn keys(k: &[f32], m: usize, c: usize, at: usize, d: usize) -> Vec<u32> {
    let dp = d.div_ceil(2);
    let mut out = vec![0u32; dp * m + NR];
    for j in 0..m {
        let row = &k[at + j * c..][..d];
        for e in 0..dp {
            out[e * m + j] = pair(row[2 * e], row.get(2 * e + 1).copied().unwrap_or(0.0));
        }
    }
    out
}

/// One head's values as the right operand of p·v: [m/2][d] pairs along the keys.
fn values(v: &[f32], m: usize, c: usize, at: usize, d: usize) -> Vec<u32> {
    let mp = m.div_ceil(2);
    let mut out = vec![0u32; mp * d + NR];
    for (j, dst) in out.chunks_mut(d).take(mp).enumerate() {
        let lo = &v[at + 2 * j * c..][..d];
        let hi = (2 * j + 1 < m).then(|| &v[at + (2 * j + 1) * c..][..d]);
        super::pairs(lo, hi, dst);
    }
    out
}

impl CustomOp3 for Bf16Attention {
    fn name(&self) -> &'static str {
        "bf16-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let err = || unsupported("bf16-attention");
        let (q, k, v) = (
            f32_slice(qs, ql).ok_or_else(err)?,
            f32_slice(ks, kl).ok_or_else(err)?,
            f32_slice(vs, vl).ok_or_else(err)?,
        );
        let (b, n, c) = ql.shape().dims3()?;
        let (_, m, _) = kl.shape().dims3()?;
        let heads = self.heads;
        if heads == 0 || c % heads != 0 {
            return Err(candle_core::Error::Msg(format!(
                "bf16-attention: {c} channels do not split into {heads} heads"
            )));
        }
        let d = c / heads;
        let (dp, mp) = (d.div_ceil(2), m.div_ceil(2));
        let scale = self.scale as f32;
        let packed: Vec<(Vec<u32>, Vec<u32>)> = (0..b * heads)
            .into_par_iter()
            .map(|bh| {
                let at = (bh / heads) * m * c + (bh % heads) * d;
                (keys(k, m, c, at, d), values(v, m, c, at, d))
            })
            .collect();
        let mut out = vec![0f32; b * n * c];
        let dst = SharedMut(out.as_mut_ptr());
        let total = out.len();
        let blocks = n.div_ceil(QUERY_BLOCK);
        (0..b * heads * blocks).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new(), vec![0f32; d], Vec::new()),
            |(queries, scores, scaled, probs): &mut (Vec<u32>, Vec<f32>, Vec<f32>, Vec<u32>),
             task| {
                let (bh, blk) = (task / blocks, task % blocks);
                let (bi, h) = (bh / heads, bh % heads);
                let (keys, values) = &packed[bh];
                let q0 = blk * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(n - q0);
                let q_at = (bi * n + q0) * c + h * d;
                queries.resize(rows * dp, 0);
                for (i, dst) in queries.chunks_mut(dp).enumerate() {
                    for (s, x) in scaled.iter_mut().zip(&q[q_at + i * c..][..d]) {
                        *s = x * scale;
                    }
                    row_pairs(scaled, dst);
                }
                scores.resize(rows * m, 0.0);
                let scores_out = Out {
                    ptr: SharedMut(scores.as_mut_ptr()),
                    len: scores.len(),
                    row: m,
                };
                let left = Left::Rows {
                    data: queries,
                    rows,
                    k: dp,
                    row: dp,
                };
                let right = Right {
                    data: keys,
                    row: m,
                    kp: dp,
                    cols: m,
                };
                // SAFETY: `scores` is this task's own buffer.
                unsafe { product_into(&left, &right, scores_out, Bias::None, false) };
                probs.resize(rows * mp, 0);
                for (row, dst) in scores.chunks_mut(m).zip(probs.chunks_mut(mp)) {
                    math::softmax_row(row);
                    row_pairs(row, dst);
                }
                let left = Left::Rows {
                    data: probs,
                    rows,
                    k: mp,
                    row: mp,
                };
                let right = Right {
                    data: values,
                    row: d,
                    kp: mp,
                    cols: d,
                };
                // SAFETY: the output holds b·n·c floats from q_at's origin on; this task
                // writes rows × d at row stride c, its own queries' window of head h.
                unsafe {
                    let window = Out {
                        ptr: SharedMut(dst.add(q_at)),
                        len: total - q_at,
                        row: c,
                    };
                    product_into(&left, &right, window, Bias::None, false);
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }
}
