//! The weighted layers the UNet and the VAE are built from: drop-in replacements for
//! candle_nn's that run the kernels of [`crate::ops`] and accept weights of any float dtype,
//! widening them to the input's dtype per call. Built from a half-precision `VarBuilder`
//! (see [`ModelOptions::half_weights`]) they keep f16 weights resident and compute in f32;
//! built from a bf16 one (see [`ModelOptions::fast`]) convolutions and linear layers pack
//! their weights for the bf16 kernels of [`ops::bf16`].

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::bf16::{Bf16Conv, Bf16Linear};
use crate::{ops, Result};

/// How a model is built: chosen once, at construction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelOptions {
    /// Keep the weights resident as f16 and widen each layer's weights when it runs: half
    /// the memory, results within f16 rounding of the weights (exact if the file is f16).
    pub half_weights: bool,
    /// The fast mode: convolution and linear weights packed as bf16 and multiplied in bf16
    /// (AVX512-BF16), accumulating in f32; other parameters stay f32. Ignored on devices and
    /// CPUs without those kernels (see [`ops::bf16::available`]).
    pub fast: bool,
}

impl ModelOptions {
    /// Whether [`ModelOptions::fast`] applies on `device`.
    pub fn fast_on(&self, device: &candle_core::Device) -> bool {
        self.fast && device.is_cpu() && ops::bf16::available()
    }

    /// The weight builder these options ask for: `vb` itself, a bf16 one (the fast mode's
    /// signal to the layers) or an f16 one.
    pub fn weights<'a>(&self, vb: VarBuilder<'a>) -> VarBuilder<'a> {
        if self.fast_on(vb.device()) {
            vb.set_dtype(DType::BF16)
        } else if self.half_weights {
            vb.set_dtype(DType::F16)
        } else {
            vb
        }
    }
}

/// Whether `vb` asks for the fast mode's bf16 products.
fn packs_bf16(vb: &VarBuilder) -> bool {
    vb.dtype() == DType::BF16
}

/// The builder for parameters outside the bf16 products (biases, norms): f32 in the fast
/// mode, so only the products round; `vb` otherwise.
fn params<'a>(vb: &VarBuilder<'a>) -> VarBuilder<'a> {
    if packs_bf16(vb) {
        vb.clone().set_dtype(DType::F32)
    } else {
        vb.clone()
    }
}

/// `t` in `dtype`, without a copy when it already is.
fn widen(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype {
        t.clone()
    } else if dtype == DType::F32 {
        ops::widen::to_f32(t)?
    } else {
        t.to_dtype(dtype)?
    })
}

/// A 2-D convolution with bias.
#[derive(Debug, Clone)]
pub enum Conv2d {
    /// Weights as loaded (any float dtype), widened to the input's dtype per call.
    Exact {
        /// Stored [Cout, kh, kw, Cin] so each tap's matrix has unit column stride for the
        /// direct kernel.
        taps: Tensor,
        /// One value per output channel.
        bias: Option<Tensor>,
        /// Zeros added on every side of the input.
        padding: usize,
        /// Step between kernel positions, in both directions.
        stride: usize,
    },
    /// The fast mode's packed weights and bias.
    Bf16(Arc<Bf16Conv>),
}

/// A `k`×`k` convolution from `vb` (`weight`, `bias`), like `candle_nn::conv2d`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    if cfg.groups != 1 || cfg.dilation != 1 {
        return Err(crate::Error::InvalidConfig(
            "grouped or dilated convolutions are not supported".into(),
        ));
    }
    let taps = vb
        .get((out_channels, in_channels, k, k), "weight")?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let bias = params(&vb).get(out_channels, "bias")?;
    if packs_bf16(&vb) && cfg.stride == 1 && cfg.padding == k / 2 {
        if let Some(conv) = Bf16Conv::new(&taps, Some(&bias))? {
            return Ok(Conv2d::Bf16(Arc::new(conv)));
        }
    }
    Ok(Conv2d::Exact {
        taps,
        bias: Some(bias),
        padding: cfg.padding,
        stride: cfg.stride,
    })
}

impl Conv2d {
    /// The convolution of `x` `[B,Cin,H,W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Conv2d::Bf16(conv) if x.device().is_cpu() && x.dtype() == DType::F32 => conv.forward(x),
            Conv2d::Bf16(_) => Err(crate::Error::InvalidConfig(
                "the fast mode's convolutions take f32 on the CPU".into(),
            )),
            Conv2d::Exact {
                taps,
                bias,
                padding,
                stride,
            } => {
                // Widened in storage order, then viewed as [Cout, Cin, kh, kw] through strides.
                let weight = widen(taps, x.dtype())?.permute((0, 3, 1, 2))?;
                let bias = bias.as_ref().map(|b| widen(b, x.dtype())).transpose()?;
                ops::conv2d(x, &weight, bias.as_ref(), *padding, *stride)
            }
        }
    }
}

/// A linear layer y = x·Wᵀ + b over the last dimension.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Weights as loaded (any float dtype), widened to the input's dtype per call.
    Exact {
        /// W, `[out, in]`.
        weight: Tensor,
        /// b, `[out]`.
        bias: Option<Tensor>,
    },
    /// The fast mode's packed weights and bias.
    Bf16(Arc<Bf16Linear>),
}

/// A linear layer with bias from `vb`, like `candle_nn::linear`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bias = params(&vb).get(out_dim, "bias")?;
    build_linear(in_dim, out_dim, Some(bias), vb)
}

/// A linear layer without bias from `vb`, like `candle_nn::linear_no_bias`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    build_linear(in_dim, out_dim, None, vb)
}

fn build_linear(
    in_dim: usize,
    out_dim: usize,
    bias: Option<Tensor>,
    vb: VarBuilder,
) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    Ok(if packs_bf16(&vb) {
        Linear::Bf16(Arc::new(Bf16Linear::new(&weight, bias.as_ref())?))
    } else {
        Linear::Exact { weight, bias }
    })
}

impl Linear {
    /// `x` [..., in] → [..., out]; all leading dimensions go through one matrix product.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, bias) = match self {
            Linear::Bf16(linear) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                return linear.forward(x)
            }
            Linear::Bf16(_) => {
                return Err(crate::Error::InvalidConfig(
                    "the fast mode's linear layers take f32 on the CPU".into(),
                ))
            }
            Linear::Exact { weight, bias } => (weight, bias),
        };
        let weight = widen(weight, x.dtype())?;
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(1);
        let rows = x.elem_count() / in_dim.max(1);
        let y = x
            .contiguous()?
            .reshape((rows, in_dim))?
            .matmul(&weight.t()?)?;
        let y = match bias {
            Some(b) => y.broadcast_add(&widen(b, x.dtype())?)?,
            None => y,
        };
        dims.push(y.dim(1)?);
        Ok(y.reshape(dims)?)
    }
}

/// A layer whose weight merging may replace (see [`crate::lora`]), reached through
/// [`Patch::patch_each`].
pub(crate) enum Patchable<'a> {
    /// One of our linear layers (the UNet's).
    Linear(&'a mut Linear),
    /// One of our convolutions.
    Conv(&'a mut Conv2d),
    /// A candle linear layer (the text encoder's).
    Candle(&'a mut candle_nn::Linear),
}

/// What [`Patch::patch_each`] calls with each layer's name (its weight's name in the
/// network's weights, less `.weight`).
pub(crate) type Visitor<'v> = dyn FnMut(&str, Patchable<'_>) -> Result<()> + 'v;

/// A network (or part of one) whose weighted layers can be visited by name.
pub(crate) trait Patch {
    /// Calls `f` with every linear and convolution layer under `prefix`.
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()>;
}

/// `prefix.name`, or `name` at the root.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl Patchable<'_> {
    /// The weight's shape as a file stores it: `[out, in]` or `[out, in, k, k]`.
    pub(crate) fn shape(&self) -> Result<Vec<usize>> {
        Ok(match self {
            Patchable::Linear(Linear::Exact { weight, .. }) => weight.dims().to_vec(),
            Patchable::Linear(Linear::Bf16(l)) => {
                let (out, inp) = l.dims();
                vec![out, inp]
            }
            Patchable::Conv(Conv2d::Exact { taps, .. }) => {
                let (o, kh, kw, i) = taps.dims4()?;
                vec![o, i, kh, kw]
            }
            Patchable::Conv(Conv2d::Bf16(c)) => {
                let (o, i, k) = c.dims();
                vec![o, i, k, k]
            }
            Patchable::Candle(l) => l.weight().dims().to_vec(),
        })
    }

    /// Whether the layer keeps its weight as the file does or, as our convolutions do,
    /// `[out, k, k, in]`.
    pub(crate) fn layout(&self) -> crate::lora::Layout {
        match self {
            Patchable::Conv(_) => crate::lora::Layout::Taps,
            _ => crate::lora::Layout::File,
        }
    }

    /// Replaces the weight by `weight` (f32, shaped as [`Patchable::shape`] says) and, when
    /// given, the bias by `bias` (f32), kept the way the layer keeps them: in their dtype, or
    /// packed again for the fast mode.
    pub(crate) fn set(&mut self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        let weight = match self.layout() {
            crate::lora::Layout::Taps => weight.permute((0, 2, 3, 1))?.contiguous()?,
            crate::lora::Layout::File => weight.clone(),
        };
        self.set_stored(&weight, bias)
    }

    /// [`Patchable::set`] with `weight` already in the layer's [`Patchable::layout`].
    pub(crate) fn set_stored(&mut self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        let like = |new: &Tensor, old: &Tensor| new.to_dtype(old.dtype());
        match self {
            Patchable::Linear(Linear::Exact { weight: w, bias: b }) => {
                *w = like(weight, w)?;
                if let (Some(new), Some(old)) = (bias, b.as_mut()) {
                    *old = like(new, old)?;
                }
            }
            Patchable::Linear(Linear::Bf16(l)) => {
                *l = Arc::new(l.with_weight(&bf16_values(weight)?, f32_values(bias)?)?);
            }
            Patchable::Conv(Conv2d::Exact { taps, bias: b, .. }) => {
                *taps = like(weight, taps)?;
                if let (Some(new), Some(old)) = (bias, b.as_mut()) {
                    *old = like(new, old)?;
                }
            }
            Patchable::Conv(Conv2d::Bf16(c)) => {
                *c = Arc::new(c.with_taps(&bf16_values(weight)?, f32_values(bias)?)?);
            }
            Patchable::Candle(l) => {
                let w = like(weight, l.weight())?;
                let b = match (bias, l.bias()) {
                    (Some(new), Some(old)) => Some(like(new, old)?),
                    (_, old) => old.cloned(),
                };
                **l = candle_nn::Linear::new(w, b);
            }
        }
        Ok(())
    }
}

/// `weight`'s values rounded to bf16 (and kept as f32), as a bf16 `VarBuilder` gives them to
/// the fast mode's layers at load: the same packed weights come out.
fn bf16_values(weight: &Tensor) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let mut values = weight
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    values
        .par_iter_mut()
        .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
    Ok(values)
}

/// `bias` as f32 values.
fn f32_values(bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    Ok(bias
        .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
        .transpose()?)
}

/// What a layer holds, to compare bit for bit (tests of merging and restoring).
#[cfg(test)]
#[derive(Debug, PartialEq)]
pub(crate) enum Stored {
    /// Weight and bias values widened to f32 (exact for f16 and bf16), with their dtypes.
    Values(DType, Vec<u32>, Option<(DType, Vec<u32>)>),
    /// The fast mode's packed linear layer.
    Bf16Linear(Arc<Bf16Linear>),
    /// The fast mode's packed convolution.
    Bf16Conv(Arc<Bf16Conv>),
}

#[cfg(test)]
impl Patchable<'_> {
    pub(crate) fn stored(&self) -> Result<Stored> {
        let bits = |t: &Tensor| -> Result<(DType, Vec<u32>)> {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok((t.dtype(), v.into_iter().map(f32::to_bits).collect()))
        };
        let values = |w: &Tensor, b: Option<&Tensor>| -> Result<Stored> {
            let (dtype, w) = bits(w)?;
            Ok(Stored::Values(dtype, w, b.map(bits).transpose()?))
        };
        match self {
            Patchable::Linear(Linear::Exact { weight, bias }) => values(weight, bias.as_ref()),
            Patchable::Linear(Linear::Bf16(l)) => Ok(Stored::Bf16Linear(l.clone())),
            Patchable::Conv(Conv2d::Exact { taps, bias, .. }) => values(taps, bias.as_ref()),
            Patchable::Conv(Conv2d::Bf16(c)) => Ok(Stored::Bf16Conv(c.clone())),
            Patchable::Candle(l) => values(l.weight(), l.bias()),
        }
    }
}

/// The attention kernel a build asks for: exact, or the fast mode's bf16 products.
#[derive(Debug, Clone, Copy)]
pub struct AttentionKernel {
    bf16: bool,
}

impl AttentionKernel {
    /// The kernel for layers built from `vb`.
    pub fn new(vb: &VarBuilder) -> Self {
        Self {
            bf16: packs_bf16(vb),
        }
    }

    /// softmax(q·kᵀ·scale)·v per head (see [`ops::attention()`]).
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f64,
    ) -> Result<Tensor> {
        if self.bf16 {
            ops::bf16::attention(q, k, v, heads, scale)
        } else {
            ops::attention(q, k, v, heads, scale)
        }
    }
}

/// GroupNorm with an optional fused SiLU.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// GroupNorm over `channels` in `groups` from `vb`, like `candle_nn::group_norm`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(crate::Error::InvalidConfig(format!(
            "GroupNorm: {channels} channels do not split into {groups} groups"
        )));
    }
    let vb = params(&vb);
    Ok(GroupNorm {
        weight: vb.get(channels, "weight")?,
        bias: vb.get(channels, "bias")?,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// The normalised `x` [B,C,...].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// SiLU of the normalised `x`, in one pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (w, b) = (
            widen(&self.weight, x.dtype())?,
            widen(&self.bias, x.dtype())?,
        );
        ops::group_norm(x, &w, &b, self.groups, self.eps, silu)
    }
}

/// LayerNorm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

/// LayerNorm over `dim` from `vb`, like `candle_nn::layer_norm`.
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let vb = params(&vb);
    Ok(LayerNorm {
        weight: vb.get(dim, "weight")?,
        bias: vb.get(dim, "bias")?,
        eps,
    })
}

impl LayerNorm {
    /// The normalised `x` [..., dim].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (
            widen(&self.weight, x.dtype())?,
            widen(&self.bias, x.dtype())?,
        );
        Ok(candle_nn::LayerNorm::new(w, b, self.eps).forward(x)?)
    }
}
