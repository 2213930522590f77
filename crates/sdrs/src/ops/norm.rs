//! GroupNorm with an optional SiLU fused in: one read for the statistics, one pass that
//! normalises, applies the affine and the activation in place.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, math, unsupported};
use crate::Result;

/// GroupNorm of `x` [B,C,...] over `groups` groups with per-channel `weight` and `bias`,
/// followed by SiLU when `silu` is set; candle's ops on other devices or dtypes.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        return group_norm_reference(x, weight, bias, groups, eps, silu);
    }
    let x = x.contiguous()?;
    let op = FusedGroupNorm { groups, eps, silu };
    Ok(x.apply_op3_no_bwd(
        &weight.to_dtype(candle_core::DType::F32)?.contiguous()?,
        &bias.to_dtype(candle_core::DType::F32)?.contiguous()?,
        &op,
    )?)
}

/// candle_nn's GroupNorm, then SiLU: other devices, and the tests' reference.
pub fn group_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let channels = x.dim(1)?;
    let norm = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    let y = candle_core::Module::forward(&norm, x)?;
    Ok(if silu { y.silu()? } else { y })
}

struct FusedGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let err = || unsupported("fused-group-norm");
        let x = f32_slice(xs, xl).ok_or_else(err)?;
        let w = f32_slice(ws, wl).ok_or_else(err)?;
        let b = f32_slice(bs, bl).ok_or_else(err)?;
        let dims = xl.shape().dims();
        let channels = *dims.get(1).ok_or_else(err)?;
        if self.groups == 0 || channels % self.groups != 0 || w.len() != channels {
            return Err(candle_core::Error::Msg(
                "fused-group-norm: channels must split evenly into groups".into(),
            ));
        }
        let spatial: usize = dims[2..].iter().product();
        let per_group = channels / self.groups * spatial;
        let mut out = x.to_vec();
        out.par_chunks_mut(per_group)
            .enumerate()
            .for_each(|(i, group)| {
                let n = group.len() as f64;
                let mean = math::centered_sums(group, 0.0).0 / n;
                // The second pass around the mean keeps the variance accurate for large means.
                let (offset, squares) = math::centered_sums(group, mean);
                let var = (squares - offset * offset / n) / n;
                let inv = 1.0 / (var + self.eps).sqrt();
                let c0 = (i % self.groups) * (channels / self.groups);
                for (j, chan) in group.chunks_mut(spatial).enumerate() {
                    let scale = inv * w[c0 + j] as f64;
                    let shift = b[c0 + j] as f64 - mean * scale;
                    math::scale_shift(chan, scale as f32, shift as f32);
                    if self.silu {
                        math::silu(chan);
                    }
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}
