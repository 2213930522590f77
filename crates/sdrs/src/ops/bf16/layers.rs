//! Convolution and linear layers whose weights are packed bf16 pairs, run as candle custom ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{pack_panels, pairs, product, row_pairs, winograd, Bias, Left, Right, NR};
use crate::ops::{f32_slice, unsupported};
use crate::Result;

/// A stride-1 convolution with a 3×3 (padding 1, by Winograd's F(2×2, 3×3)) or 1×1 kernel,
/// weights transformed and packed once.
#[derive(Debug, PartialEq)]
pub struct Bf16Conv {
    /// The 1×1 kernel's weights as the left operand (empty for 3×3).
    panels: Vec<u32>,
    /// The 3×3 kernel's transformed weights.
    winograd: Option<winograd::Weights>,
    out_channels: usize,
    in_channels: usize,
    bias: Option<Vec<f32>>,
}

impl Bf16Conv {
    /// Packs `taps` [Cout, k, k, Cin] (any float dtype) for `k` = 1 or 3; `None` for other
    /// kernel sizes, which the fast mode leaves to the exact kernels.
    pub fn new(taps: &Tensor, bias: Option<&Tensor>) -> Result<Option<Self>> {
        let (out_channels, kernel, kw, in_channels) = taps.dims4()?;
        if kernel != kw || !matches!(kernel, 1 | 3) {
            return Ok(None);
        }
        let w = taps.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bias = bias
            .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()?;
        Ok(Self::from_f32(
            &w,
            [out_channels, kernel, in_channels],
            bias,
        ))
    }

    /// Packs `w`, taps `[Cout, k, k, Cin]` with `dims` = `[Cout, k, Cin]`, for `k` = 1 or 3
    /// (`None` otherwise, or when `w` has another length).
    pub fn from_f32(w: &[f32], dims: [usize; 3], bias: Option<Vec<f32>>) -> Option<Self> {
        let [out_channels, kernel, in_channels] = dims;
        if !matches!(kernel, 1 | 3) || w.len() != out_channels * kernel * kernel * in_channels {
            return None;
        }
        let (panels, winograd) = if kernel == 3 {
            let weights = winograd::Weights::new(w, out_channels, in_channels);
            (Vec::new(), Some(weights))
        } else {
            (
                pack_panels(out_channels, in_channels, |r, i| w[r * in_channels + i]),
                None,
            )
        };
        Some(Bf16Conv {
            panels,
            winograd,
            out_channels,
            in_channels,
            bias,
        })
    }

    /// `(out channels, in channels, kernel size)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        let k = if self.winograd.is_some() { 3 } else { 1 };
        (self.out_channels, self.in_channels, k)
    }

    /// The same convolution with `taps` [Cout, k, k, Cin] (f32) packed instead, and `bias`
    /// when given (else its own).
    pub fn with_taps(&self, taps: &[f32], bias: Option<Vec<f32>>) -> Result<Self> {
        let (out, inp, k) = self.dims();
        let bias = bias.or_else(|| self.bias.clone());
        Self::from_f32(taps, [out, k, inp], bias).ok_or_else(|| {
            crate::Error::InvalidConfig(format!(
                "{} values are no [{out}, {k}, {k}, {inp}] kernel",
                taps.len()
            ))
        })
    }

    /// The convolution of `x` `[B,Cin,H,W]` (f32 on the CPU).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1_no_bwd(self)?)
    }

    fn bias(&self) -> Bias {
        self.bias
            .as_ref()
            .map_or(Bias::None, |b| Bias::PerRow(b.as_ptr()))
    }

    fn conv1x1(&self, x: &[f32], batch: usize, hw: usize) -> Vec<f32> {
        let (cin, cout) = (self.in_channels, self.out_channels);
        let kp = cin.div_ceil(2);
        let mut out = vec![0f32; batch * cout * hw];
        let mut paired = vec![0u32; kp * hw + NR];
        for (xb, ob) in x.chunks(cin * hw).zip(out.chunks_mut(cout * hw)) {
            paired[..kp * hw]
                .par_chunks_mut(hw)
                .enumerate()
                .for_each(|(j, dst)| {
                    let hi = (2 * j + 1 < cin).then(|| &xb[(2 * j + 1) * hw..][..hw]);
                    pairs(&xb[2 * j * hw..][..hw], hi, dst);
                });
            product(
                &Left::Panels {
                    data: &self.panels,
                    rows: cout,
                    k: kp,
                },
                &Right {
                    data: &paired,
                    row: hw,
                    kp,
                    cols: hw,
                },
                ob,
                hw,
                self.bias(),
            );
        }
        out
    }
}

impl CustomOp1 for Bf16Conv {
    fn name(&self) -> &'static str {
        "bf16-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l).ok_or_else(|| unsupported("bf16-conv2d"))?;
        let (batch, cin, h, w) = l.shape().dims4()?;
        if cin != self.in_channels {
            return Err(candle_core::Error::Msg(format!(
                "bf16-conv2d: {cin} input channels, the weights take {}",
                self.in_channels
            )));
        }
        let out = if let Some(weights) = &self.winograd {
            weights.conv(x, batch, h, w, self.bias.as_deref())
        } else {
            self.conv1x1(x, batch, h * w)
        };
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, self.out_channels, h, w)),
        ))
    }
}

/// A linear layer y = x·Wᵀ + b, weights packed once.
#[derive(Debug, PartialEq)]
pub struct Bf16Linear {
    /// `[in/2][out]` pairs along the input dimension, then one tile of slack.
    packed: Vec<u32>,
    in_dim: usize,
    out_dim: usize,
    bias: Option<Vec<f32>>,
}

impl Bf16Linear {
    /// Packs `weight` [out, in] (any float dtype).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let w = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bias = bias
            .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()?;
        Ok(Self::from_f32(&w, out_dim, in_dim, bias))
    }

    /// Packs `w` [out, in] (row-major, `out_dim · in_dim` values).
    fn from_f32(w: &[f32], out_dim: usize, in_dim: usize, bias: Option<Vec<f32>>) -> Self {
        let kp = in_dim.div_ceil(2);
        let mut packed = vec![0u32; kp * out_dim + NR];
        packed[..kp * out_dim]
            .par_chunks_mut(out_dim)
            .enumerate()
            .for_each(|(j, dst)| {
                for (o, d) in dst.iter_mut().enumerate() {
                    let hi = if 2 * j + 1 < in_dim {
                        w[o * in_dim + 2 * j + 1]
                    } else {
                        0.0
                    };
                    *d = super::pair(w[o * in_dim + 2 * j], hi);
                }
            });
        Bf16Linear {
            packed,
            in_dim,
            out_dim,
            bias,
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// The same layer with `weight` [out, in] (f32, row-major) packed instead, and `bias`
    /// when given (else its own).
    pub fn with_weight(&self, weight: &[f32], bias: Option<Vec<f32>>) -> Result<Self> {
        let (out, inp) = self.dims();
        if weight.len() != out * inp {
            return Err(crate::Error::InvalidConfig(format!(
                "{} values are no [{out}, {inp}] weight",
                weight.len()
            )));
        }
        let bias = bias.or_else(|| self.bias.clone());
        Ok(Self::from_f32(weight, out, inp, bias))
    }

    /// `x` [..., in] (f32 on the CPU) → [..., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let rows = x.elem_count() / self.in_dim.max(1);
        let y = x
            .contiguous()?
            .reshape((rows, self.in_dim))?
            .apply_op1_no_bwd(self)?;
        if let Some(last) = dims.last_mut() {
            *last = self.out_dim;
        }
        Ok(y.reshape(dims)?)
    }
}

impl CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l).ok_or_else(|| unsupported("bf16-linear"))?;
        let (rows, in_dim) = l.shape().dims2()?;
        if in_dim != self.in_dim {
            return Err(candle_core::Error::Msg(format!(
                "bf16-linear: {in_dim} inputs, the weights take {}",
                self.in_dim
            )));
        }
        let kp = in_dim.div_ceil(2);
        let mut paired = vec![0u32; rows * kp];
        paired
            .par_chunks_mut(kp)
            .zip(x.par_chunks(in_dim))
            .for_each(|(dst, src)| row_pairs(src, dst));
        let mut y = vec![0f32; rows * self.out_dim];
        product(
            &Left::Rows {
                data: &paired,
                rows,
                k: kp,
                row: kp,
            },
            &Right {
                data: &self.packed,
                row: self.out_dim,
                kp,
                cols: self.out_dim,
            },
            &mut y,
            self.out_dim,
            self.bias
                .as_ref()
                .map_or(Bias::None, |b| Bias::PerColumn(b.as_ptr())),
        );
        Ok((CpuStorage::F32(y), Shape::from((rows, self.out_dim))))
    }
}
