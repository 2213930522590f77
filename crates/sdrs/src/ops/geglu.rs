//! GEGLU, the UNet feed-forward's gate: `a · gelu(b)` for the two halves of each row, in one
//! pass (candle's narrow, erf GELU and product make three passes over strided views, and its
//! erf is a scalar libm call).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{f32_slice, math, unsupported};
use crate::Result;

/// `h[.., :n] · gelu_erf(h[.., n:])` for `h` [.., 2n]; candle's ops on other devices or dtypes.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if !(h.device().is_cpu() && h.dtype() == candle_core::DType::F32) {
        return geglu_reference(h);
    }
    Ok(h.contiguous()?.apply_op1_no_bwd(&Geglu)?)
}

/// candle's narrow, GELU (erf) and product: other devices, and the tests' reference.
pub fn geglu_reference(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(D::Minus1)? / 2;
    let gate = h.narrow(D::Minus1, half, half)?.gelu_erf()?;
    Ok((h.narrow(D::Minus1, 0, half)? * gate)?)
}

struct Geglu;

/// Rows per parallel task: enough work to outweigh the scheduling.
const ROWS_PER_TASK: usize = 16;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = f32_slice(s, l).ok_or_else(|| unsupported("geglu"))?;
        let mut dims = l.shape().dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            return Err(candle_core::Error::Msg(format!(
                "geglu: the last dimension ({width}) must be even"
            )));
        }
        let half = width / 2;
        if let Some(last) = dims.last_mut() {
            *last = half;
        }
        let mut out = vec![0f32; h.len() / 2];
        if half > 0 {
            out.par_chunks_mut(half * ROWS_PER_TASK)
                .zip(h.par_chunks(width * ROWS_PER_TASK))
                .for_each(|(out, h)| {
                    for (out, row) in out.chunks_mut(half).zip(h.chunks(width)) {
                        let (a, b) = row.split_at(half);
                        math::gated_gelu(a, b, out);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}
