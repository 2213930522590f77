//! f16/bf16 → f32 for resident half-precision weights, converted a slice at a time (the
//! `half` crate's F16C/AVX path) rather than element by element as `to_dtype` does.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::slice::HalfFloatSliceExt;

use crate::Result;

/// `t` as f32: the slice conversion for contiguous f16/bf16 CPU tensors, `to_dtype` otherwise.
pub fn to_f32(t: &Tensor) -> Result<Tensor> {
    let half = matches!(t.dtype(), DType::F16 | DType::BF16);
    if t.device().is_cpu() && half && t.is_contiguous() {
        Ok(t.apply_op1_no_bwd(&Widen)?)
    } else {
        Ok(t.to_dtype(DType::F32)?)
    }
}

struct Widen;

impl CustomOp1 for Widen {
    fn name(&self) -> &'static str {
        "widen-to-f32"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let err = || super::unsupported("widen-to-f32");
        let (start, end) = l.contiguous_offsets().ok_or_else(err)?;
        let mut out = vec![0f32; end - start];
        match s {
            CpuStorage::F16(data) => data
                .get(start..end)
                .ok_or_else(err)?
                .convert_to_f32_slice(&mut out),
            CpuStorage::BF16(data) => data
                .get(start..end)
                .ok_or_else(err)?
                .convert_to_f32_slice(&mut out),
            _ => return Err(err()),
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
