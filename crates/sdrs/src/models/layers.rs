//! The weighted layers the UNet and the VAE are built from: drop-in replacements for
//! candle_nn's that run the kernels of [`crate::ops`] and accept weights of any float dtype,
//! widening them to the input's dtype per call. Built from a half-precision `VarBuilder`
//! (see [`ModelOptions::half_weights`]) they keep f16 weights resident and compute in f32.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::{ops, Result};

/// How a model is built: chosen once, at construction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelOptions {
    /// Keep the weights resident as f16 and widen each layer's weights when it runs: half
    /// the memory, results within f16 rounding of the weights (exact if the file is f16).
    pub half_weights: bool,
}

impl ModelOptions {
    /// The weight builder these options ask for: `vb` itself, or an f16 one.
    pub fn weights<'a>(&self, vb: VarBuilder<'a>) -> VarBuilder<'a> {
        if self.half_weights {
            vb.set_dtype(DType::F16)
        } else {
            vb
        }
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
pub struct Conv2d {
    /// Stored [Cout, kh, kw, Cin] so each tap's matrix has unit column stride for the direct kernel.
    taps: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
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
    let weight = vb.get((out_channels, in_channels, k, k), "weight")?;
    Ok(Conv2d {
        taps: weight.permute((0, 2, 3, 1))?.contiguous()?,
        bias: Some(vb.get(out_channels, "bias")?),
        padding: cfg.padding,
        stride: cfg.stride,
    })
}

impl Conv2d {
    /// The convolution of `x` [B,Cin,H,W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Widened in storage order, then viewed as [Cout, Cin, kh, kw] through strides.
        let weight = widen(&self.taps, x.dtype())?.permute((0, 3, 1, 2))?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| widen(b, x.dtype()))
            .transpose()?;
        ops::conv2d(x, &weight, bias.as_ref(), self.padding, self.stride)
    }
}

/// A linear layer y = x·Wᵀ + b over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// A linear layer with bias from `vb`, like `candle_nn::linear`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get((out_dim, in_dim), "weight")?,
        bias: Some(vb.get(out_dim, "bias")?),
    })
}

/// A linear layer without bias from `vb`, like `candle_nn::linear_no_bias`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get((out_dim, in_dim), "weight")?,
        bias: None,
    })
}

impl Linear {
    /// `x` [..., in] → [..., out]; all leading dimensions go through one matrix product.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = widen(&self.weight, x.dtype())?;
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(1);
        let rows = x.elem_count() / in_dim.max(1);
        let y = x
            .contiguous()?
            .reshape((rows, in_dim))?
            .matmul(&weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&widen(b, x.dtype())?)?,
            None => y,
        };
        dims.push(y.dim(1)?);
        Ok(y.reshape(dims)?)
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
