//! The merged weight of one layer on the CPU, in one pass over its values: the checkpoint's
//! weight widened to f32 (and put in the layer's own layout) straight into the output, then
//! each plain LoRA's `scale · up · down` accumulated there by one matrix product, other kinds
//! added. This is what keeps merging a full-size LoRA near the cost of reading the weights
//! once.

use candle_core::{DType, Device, Storage, Tensor};
use gemm::Parallelism;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::{delta, Network, Patches};
use crate::{Error, Result};

/// How a layer keeps its weight: as the file does (`[out, in]`, `[out, in, k, k]`) or as our
/// convolutions do (`[out, k, k, in]`, "taps").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    File,
    Taps,
}

/// A stored weight's values.
enum Source<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

/// A layer's weight as the checkpoint stores it.
pub(crate) enum Base<'a> {
    /// Its bytes in the mapped file (read without a copy).
    Bytes(DType, &'a [u8]),
    /// Read into a tensor (pickles, other devices).
    Tensor(&'a Tensor),
}

impl<'a> Source<'a> {
    /// `bytes` (little-endian, as safetensors stores them) as values of `dtype`, when they
    /// are aligned for them and this machine is little-endian.
    fn of_bytes(dtype: DType, bytes: &'a [u8]) -> Option<Self> {
        use half::slice::HalfBitsSliceExt;
        if cfg!(target_endian = "big") {
            return None;
        }
        Some(match dtype {
            DType::F32 => Source::F32(bytemuck::try_cast_slice(bytes).ok()?),
            DType::F16 => Source::F16(
                bytemuck::try_cast_slice::<u8, u16>(bytes)
                    .ok()?
                    .reinterpret_cast(),
            ),
            DType::BF16 => Source::Bf16(
                bytemuck::try_cast_slice::<u8, u16>(bytes)
                    .ok()?
                    .reinterpret_cast(),
            ),
            _ => return None,
        })
    }

    fn len(&self) -> usize {
        match self {
            Source::F32(s) => s.len(),
            Source::F16(s) => s.len(),
            Source::Bf16(s) => s.len(),
        }
    }
}

impl Source<'_> {
    /// Values `start..start + dst.len()` into `dst`, by the vectorised slice conversions.
    fn copy(&self, start: usize, dst: &mut [f32]) {
        let range = start..start + dst.len();
        match self {
            Source::F32(s) => dst.copy_from_slice(&s[range]),
            Source::F16(s) => s[range].convert_to_f32_slice(dst),
            Source::Bf16(s) => s[range].convert_to_f32_slice(dst),
        }
    }
}

fn threads() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads())
}

impl Patches {
    /// The weight of `layer` of `network`: `base` (as the checkpoint stores it, `shape` in
    /// the file's layout) plus this set's change, as f32 on the CPU in `layout`. `None` when
    /// the base is not a contiguous float tensor on the CPU (the caller then goes the slow
    /// way).
    pub(crate) fn merged_weight(
        &self,
        network: Network,
        layer: &str,
        base: Base<'_>,
        shape: &[usize],
        layout: Layout,
    ) -> Result<Option<Tensor>> {
        let n: usize = shape.iter().product();
        let (out_dim, in_dim, taps) = match *shape {
            [o, i, kh, kw] if layout == Layout::Taps => (o, i, kh * kw),
            [o, ..] => (o, n / o.max(1), 1),
            _ => return Ok(None),
        };
        let row = in_dim * taps;
        let mut out = vec![0f32; n];
        let fill = |out: &mut [f32], source: &Source<'_>| {
            out.par_chunks_mut(row.max(1)).enumerate().for_each_init(
                Vec::new,
                |file_row, (o, dst)| {
                    if taps == 1 {
                        source.copy(o * row, dst);
                    } else {
                        // File [in][tap] → ours [tap][in].
                        file_row.resize(row, 0.0);
                        source.copy(o * row, file_row);
                        for (i, taps_of_i) in file_row.chunks_exact(taps).enumerate() {
                            for (t, v) in taps_of_i.iter().enumerate() {
                                dst[t * in_dim + i] = *v;
                            }
                        }
                    }
                },
            );
        };
        match base {
            Base::Bytes(dtype, bytes) => {
                let Some(source) = Source::of_bytes(dtype, bytes).filter(|s| s.len() == n) else {
                    return Ok(None);
                };
                fill(&mut out, &source);
            }
            Base::Tensor(base) => {
                if base.elem_count() != n || !base.is_contiguous() || !base.device().is_cpu() {
                    return Ok(None);
                }
                let (storage, l) = base.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    return Ok(None);
                };
                let Some((start, end)) = l.contiguous_offsets() else {
                    return Ok(None);
                };
                let source = match cpu {
                    candle_core::CpuStorage::F32(v) => Source::F32(&v[start..end]),
                    candle_core::CpuStorage::F16(v) => Source::F16(&v[start..end]),
                    candle_core::CpuStorage::BF16(v) => Source::Bf16(&v[start..end]),
                    _ => return Ok(None),
                };
                fill(&mut out, &source);
            }
        }
        // The largest |change| any value can get: when the changes cannot reach f32's range,
        // the sum with a finite weight stays finite and the scan after them is not needed.
        let mut reach = 0f64;
        for (parts, multiplier, dyn_dim, unfit) in self.parts_of(network, layer)? {
            let m = multiplier as f64;
            if let Some((up, down, scale)) =
                delta::factors(parts, shape, dyn_dim).map_err(&unfit)?
            {
                let rank = down.dim(0)?;
                let down = if taps > 1 {
                    down.reshape((rank, in_dim, taps))?
                        .transpose(1, 2)?
                        .contiguous()?
                } else {
                    down
                };
                let up = up.flatten_all()?.to_vec1::<f32>()?;
                let down = down.flatten_all()?.to_vec1::<f32>()?;
                let largest = |v: &[f32]| v.iter().fold(0f64, |a, x| a.max(x.abs() as f64));
                reach += (scale * m).abs() * rank as f64 * largest(&up) * largest(&down);
                if up.len() != out_dim * rank || down.len() != rank * row {
                    return Err(unfit(Error::InvalidRequest(
                        "factors of another size".into(),
                    )));
                }
                // SAFETY: dst is out_dim×row row-major (n values); lhs is out_dim×rank and
                // rhs rank×row, both row-major, each of exactly that many values (checked).
                unsafe {
                    gemm::gemm(
                        out_dim,
                        row,
                        rank,
                        out.as_mut_ptr(),
                        1,
                        row as isize,
                        true,
                        up.as_ptr(),
                        1,
                        rank as isize,
                        down.as_ptr(),
                        1,
                        row as isize,
                        1.0,
                        (scale * m) as f32,
                        false,
                        false,
                        false,
                        threads(),
                    );
                }
                continue;
            }
            let Some(d) = delta::delta(parts, shape, dyn_dim).map_err(&unfit)? else {
                continue;
            };
            let d = if taps > 1 {
                d.permute((0, 2, 3, 1))?.contiguous()?
            } else {
                d.contiguous()?
            };
            let d = d.flatten_all()?.to_vec1::<f32>()?;
            let m = multiplier;
            reach += (m as f64).abs()
                * d.par_iter()
                    .map(|x| x.abs() as f64)
                    .reduce(|| 0.0, f64::max);
            out.par_iter_mut()
                .zip(d.par_iter())
                .for_each(|(o, d)| *o += m * d);
        }
        // Finite changes can still overflow f32 (a huge alpha, scale or multiplier).
        let safe = reach < 1e30;
        if !safe && !out.par_iter().all(|v| v.is_finite()) {
            return Err(self.not_finite(network, layer, "weight"));
        }
        let dims: Vec<usize> = match layout {
            Layout::Taps => vec![out_dim, shape[2], shape[3], in_dim],
            Layout::File => shape.to_vec(),
        };
        Ok(Some(Tensor::from_vec(out, dims, &Device::Cpu)?))
    }

    /// An error when this set changes the bias of `layer`, which has none.
    pub(crate) fn refuse_bias(&self, network: Network, layer: &str) -> Result<()> {
        for (parts, _, _, unfit) in self.parts_of(network, layer)? {
            if delta::bias_delta(parts, usize::MAX).is_err() {
                return Err(unfit(Error::InvalidRequest("the layer has no bias".into())));
            }
        }
        Ok(())
    }

    /// The bias of `layer` of `network`: `base` (f32) plus this set's `diff_b` changes.
    pub(crate) fn merged_bias(
        &self,
        network: Network,
        layer: &str,
        base: Tensor,
    ) -> Result<Tensor> {
        let len = base.elem_count();
        let mut bias = base.to_dtype(DType::F32)?;
        for (parts, multiplier, _, unfit) in self.parts_of(network, layer)? {
            if let Some(b) = delta::bias_delta(parts, len).map_err(&unfit)? {
                bias = (bias + (b * multiplier as f64)?)?;
            }
        }
        if !super::file::all_finite(&bias)? {
            return Err(self.not_finite(network, layer, "bias"));
        }
        Ok(bias)
    }
}
