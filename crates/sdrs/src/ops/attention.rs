//! Multi-head attention that works one block of queries at a time: the scores held at once
//! are [block × keys] per task, never [queries × keys] (4096² per head at the 64² latent
//! level). Each block's softmax is exact (the whole key range is in the block's row), and
//! heads are read and written through strides, so no head split or merge copies are made.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{f32_slice, math, unsupported, SharedMut};
use crate::Result;

/// Queries per task: a 128 × 4096 score block is 2 MiB, about an L2 cache.
const QUERY_BLOCK: usize = 128;

/// softmax(q·kᵀ·scale)·v per head for `q` `[B,N,C]`, `k` and `v` `[B,M,C]`, heads of C/heads
/// channels; returns `[B,N,C]` with the heads side by side, as diffusers' attention does.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !(f32_cpu(q) && f32_cpu(k) && f32_cpu(v)) {
        return attention_reference(q, k, v, heads, scale);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(q.apply_op3_no_bwd(&k, &v, &BlockedAttention { heads, scale })?)
}

/// The plain formulation (full score matrix), for other devices and as the tests' reference.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let split = |x: &Tensor| -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        Ok(x.reshape((b, n, heads, c / heads))?
            .transpose(1, 2)?
            .reshape((b * heads, n, c / heads))?)
    };
    let (b, n, c) = q.dims3()?;
    let probs = candle_nn::ops::softmax_last_dim(&(split(q)? * scale)?.matmul(&split(k)?.t()?)?)?;
    let out = probs.matmul(&split(v)?)?;
    let d = out.dim(D::Minus1)?;
    Ok(out
        .reshape((b, heads, n, d))?
        .transpose(1, 2)?
        .reshape((b, n, c))?)
}

struct BlockedAttention {
    heads: usize,
    scale: f64,
}

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "blocked-attention"
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
        let err = || unsupported("blocked-attention");
        let (q, k, v) = (
            f32_slice(qs, ql).ok_or_else(err)?,
            f32_slice(ks, kl).ok_or_else(err)?,
            f32_slice(vs, vl).ok_or_else(err)?,
        );
        let (b, n, c) = ql.shape().dims3()?;
        let (_, m, _) = kl.shape().dims3()?;
        let d = c / self.heads;
        let scale = self.scale as f32;
        let mut out = vec![0f32; b * n * c];
        let dst = SharedMut(out.as_mut_ptr());
        let blocks = n.div_ceil(QUERY_BLOCK);
        (0..b * self.heads * blocks).into_par_iter().for_each_init(
            Vec::new,
            |scores: &mut Vec<f32>, task| {
                let (bh, blk) = (task / blocks, task % blocks);
                let (bi, h) = (bh / self.heads, bh % self.heads);
                let q0 = blk * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(n - q0);
                scores.resize(rows * m, 0.0);
                let q_at = (bi * n + q0) * c + h * d;
                let kv_at = bi * m * c + h * d;
                // SAFETY: q block rows×d (row stride c), kᵀ d×m (k read with column
                // stride c), v m×d (row stride c), all inside their buffers; scores is
                // rows×m; each task writes its own rows×d window of `out`.
                unsafe {
                    gemm::gemm(
                        rows,
                        m,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        m as isize,
                        false,
                        q.as_ptr().add(q_at),
                        1,
                        c as isize,
                        k.as_ptr().add(kv_at),
                        c as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                for row in scores.chunks_mut(m) {
                    math::softmax_row(row);
                }
                unsafe {
                    gemm::gemm(
                        rows,
                        d,
                        m,
                        dst.add(q_at),
                        1,
                        c as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        m as isize,
                        v.as_ptr().add(kv_at),
                        1,
                        c as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }
}
