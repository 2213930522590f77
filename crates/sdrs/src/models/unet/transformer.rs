//! The UNet's spatial transformer (diffusers' `Transformer2DModel` with
//! `BasicTransformerBlock`s): self-attention, cross-attention on the text, GEGLU MLP.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::models::layers::{
    conv2d, group_norm, join, layer_norm, linear, linear_no_bias, AttentionKernel, Conv2d,
    GroupNorm, LayerNorm, Linear, Patch, Patchable, Visitor,
};

use crate::Result;

/// Multi-head attention (`Attention` with q/k/v without bias, `to_out.0` with bias).
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    kernel: AttentionKernel,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            kernel: AttentionKernel::new(&vb),
            heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        // The kernel reads each head through strides and writes the heads side by side.
        let out = self.kernel.forward(&q, &k, &v, self.heads, self.scale)?;
        self.to_out.forward(&out)
    }
}

/// The MLP: GEGLU (`ff.net.0.proj`, exact GELU on the gate half) then `ff.net.2`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        self.out.forward(&crate::ops::geglu(&h)?)
    }
}

#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (self.attn1.forward(&h, &h)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, context)? + &x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + &x)?)
    }
}

/// Projection in and out of the transformer: 1×1 convolutions (SD 1.x) or linear layers
/// applied after flattening (SD 2.x's `use_linear_projection`).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// One spatial transformer: GroupNorm, projection, blocks, projection, residual.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// The shape of a spatial transformer.
pub struct TransformerShape {
    /// Channels of the feature map, and width of its tokens.
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Width of the text context the cross-attention reads.
    pub context_dim: usize,
    /// Groups of the GroupNorm in front.
    pub groups: usize,
    /// Linear projections in and out (SD 2.x) rather than 1×1 convolutions (SD 1.x).
    pub linear_projection: bool,
}

impl SpatialTransformer {
    /// A transformer over `channels` with `heads` heads of `channels / heads` each.
    pub fn new(vb: VarBuilder, s: &TransformerShape) -> Result<Self> {
        let c = s.channels;
        let projection = |name: &str| -> Result<Projection> {
            Ok(if s.linear_projection {
                Projection::Linear(linear(c, c, vb.pp(name))?)
            } else {
                Projection::Conv(conv2d(c, c, 1, Default::default(), vb.pp(name))?)
            })
        };
        let blocks = (0..s.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    c,
                    s.heads,
                    c / s.heads,
                    s.context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(s.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    /// `x` `[B,C,H,W]` as H·W tokens through the blocks, attending to `context`, plus `x`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens =
            |t: Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?) };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(tokens)?)?,
            Projection::Linear(lin) => to_image(lin.forward(&tokens)?)?,
        };
        Ok((out + x)?)
    }
}

impl Patch for Attention {
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()> {
        f(&join(prefix, "to_q"), Patchable::Linear(&mut self.to_q))?;
        f(&join(prefix, "to_k"), Patchable::Linear(&mut self.to_k))?;
        f(&join(prefix, "to_v"), Patchable::Linear(&mut self.to_v))?;
        f(
            &join(prefix, "to_out.0"),
            Patchable::Linear(&mut self.to_out),
        )
    }
}

impl Patch for BasicTransformerBlock {
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()> {
        self.attn1.patch_each(&join(prefix, "attn1"), f)?;
        self.attn2.patch_each(&join(prefix, "attn2"), f)?;
        f(
            &join(prefix, "ff.net.0.proj"),
            Patchable::Linear(&mut self.ff.proj),
        )?;
        f(
            &join(prefix, "ff.net.2"),
            Patchable::Linear(&mut self.ff.out),
        )
    }
}

impl Projection {
    fn patchable(&mut self) -> Patchable<'_> {
        match self {
            Projection::Conv(conv) => Patchable::Conv(conv),
            Projection::Linear(lin) => Patchable::Linear(lin),
        }
    }
}

impl Patch for SpatialTransformer {
    fn patch_each(&mut self, prefix: &str, f: &mut Visitor<'_>) -> Result<()> {
        f(&join(prefix, "proj_in"), self.proj_in.patchable())?;
        for (i, block) in self.blocks.iter_mut().enumerate() {
            block.patch_each(&join(prefix, &format!("transformer_blocks.{i}")), f)?;
        }
        f(&join(prefix, "proj_out"), self.proj_out.patchable())
    }
}
