//! What a single-file checkpoint is, and its architecture, read from tensor names and shapes.

use super::numbered::{self, Limit};
use super::tensor_file::TensorFile;
use super::ModelFamily;
use crate::limits::{
    MAX_CLIP_LAYERS, MAX_LAYERS_PER_BLOCK, MAX_TRANSFORMER_DEPTH, MAX_UNET_INPUT_BLOCKS,
    MAX_VAE_LEVELS,
};
use crate::models::clip::{Activation, ClipConfig};
use crate::models::unet::{PerBlock, UNetConfig};
use crate::models::vae::VaeConfig;
use crate::{Error, Result};

pub(crate) const UNET_PREFIX: &str = "model.diffusion_model.";
pub(crate) const VAE_PREFIX: &str = "first_stage_model.";
/// SD1's CLIP, in the newer (transformers ≥ 4.x) and the older naming.
pub(crate) const CLIP_PREFIXES: [&str; 2] = [
    "cond_stage_model.transformer.text_model.",
    "cond_stage_model.transformer.",
];
const OPEN_CLIP_PREFIX: &str = super::openclip::PREFIX;
const CLIP_LAYERS: Limit = ("MAX_CLIP_LAYERS", MAX_CLIP_LAYERS);

/// The family of a CompVis single-file checkpoint.
pub(crate) fn family(file: &TensorFile) -> ModelFamily {
    let has_prefix = |p: &str| file.names().any(|n| n.starts_with(p));
    if has_prefix("conditioner.embedders.")
        || file.contains("model.diffusion_model.label_emb.0.0.weight")
    {
        return ModelFamily::Sdxl;
    }
    let Some(conv_in) = file.shape("model.diffusion_model.input_blocks.0.0.weight") else {
        return ModelFamily::Unknown;
    };
    let in_channels = conv_in.get(1).copied().unwrap_or(0);
    // An OpenCLIP text encoder makes it SD2 even when the UNet has no cross-attention to measure.
    let context = if has_open_clip(file) {
        1024
    } else {
        context_dim(file).unwrap_or(0)
    };
    ModelFamily::of_unet(in_channels, context)
}

/// Width of the text conditioning: the in-features of the first cross-attention key projection.
fn context_dim(file: &TensorFile) -> Option<usize> {
    let key = file
        .names()
        .filter(|n| n.starts_with(UNET_PREFIX) && n.ends_with(".attn2.to_k.weight"))
        .min()?;
    file.shape(key).and_then(|s| s.get(1)).copied()
}

/// Shape lookups that fail with a message naming the tensor.
struct Shapes<'a> {
    file: &'a TensorFile,
    prefix: &'a str,
}

impl Shapes<'_> {
    fn dim(&self, name: &str, axis: usize) -> Result<usize> {
        let full = format!("{}{name}", self.prefix);
        let shape = self.file.shape(&full).ok_or_else(|| {
            Error::InvalidConfig(format!("cannot infer the architecture: no tensor {full}"))
        })?;
        shape.get(axis).copied().ok_or_else(|| {
            Error::InvalidConfig(format!(
                "tensor {full} has shape {shape:?}, expected rank > {axis}"
            ))
        })
    }

    fn has(&self, name: &str) -> bool {
        self.file.contains(&format!("{}{name}", self.prefix))
    }

    /// How many numbered children `{prefix}{head}N.…` there are: the numbers present must run
    /// from 0 without a gap and stay under the limit (see [`numbered::count`]).
    fn count(&self, head: &str, what: &str, limit: Limit) -> Result<usize> {
        let start = format!("{}{head}", self.prefix);
        numbered::count(self.file.names(), &start, what, limit)
    }
}

/// The SD1 CLIP text encoder's config under `prefix` (one of [`CLIP_PREFIXES`]).
pub(crate) fn clip_config(file: &TensorFile, prefix: &str) -> Result<ClipConfig> {
    let s = Shapes { file, prefix };
    let hidden_size = s.dim("embeddings.token_embedding.weight", 1)?;
    let config = ClipConfig {
        vocab_size: s.dim("embeddings.token_embedding.weight", 0)?,
        hidden_size,
        intermediate_size: s.dim("encoder.layers.0.mlp.fc1.weight", 0)?,
        num_hidden_layers: s.count("encoder.layers.", "CLIP layers", CLIP_LAYERS)?,
        // OpenAI CLIP uses 64-wide heads; narrower test models have one head.
        num_attention_heads: (hidden_size / 64).max(1),
        max_position_embeddings: s.dim("embeddings.position_embedding.weight", 0)?,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    };
    config.validate()?;
    Ok(config)
}

/// The config of an OpenCLIP text encoder under `prefix`: SD 2's (`cond_stage_model.model.`),
/// which stops at the penultimate layer (`drop_last`, see `weights::openclip`), or SDXL's
/// second (`conditioner.embedders.1.model.`), whose last layer makes the pooled output.
pub(crate) fn open_clip_config(
    file: &TensorFile,
    prefix: &str,
    drop_last: bool,
) -> Result<ClipConfig> {
    let s = Shapes { file, prefix };
    let hidden_size = s.dim("token_embedding.weight", 1)?;
    let layers = s.count("transformer.resblocks.", "OpenCLIP layers", CLIP_LAYERS)?;
    let config = ClipConfig {
        vocab_size: s.dim("token_embedding.weight", 0)?,
        hidden_size,
        intermediate_size: s.dim("transformer.resblocks.0.mlp.c_fc.weight", 0)?,
        num_hidden_layers: if drop_last {
            layers.saturating_sub(1).max(1)
        } else {
            layers
        },
        num_attention_heads: (hidden_size / 64).max(1),
        max_position_embeddings: s.dim("positional_embedding", 0)?,
        hidden_act: Activation::Gelu,
        layer_norm_eps: 1e-5,
    };
    config.validate()?;
    Ok(config)
}

/// Whether the file holds an SD2 OpenCLIP text encoder.
pub(crate) fn has_open_clip(file: &TensorFile) -> bool {
    file.names().any(|n| n.starts_with(OPEN_CLIP_PREFIX))
}

/// The UNet config of a CompVis checkpoint of `family`; SDXL's `projection` is the width of
/// the pooled text that goes into its `add_embedding` with the six size ids.
pub(crate) fn unet_config(
    file: &TensorFile,
    family: ModelFamily,
    projection: Option<usize>,
) -> Result<UNetConfig> {
    let s = Shapes {
        file,
        prefix: UNET_PREFIX,
    };
    // input_blocks: conv_in, then per level `layers` resnets and (except last) a downsampler.
    let blocks = s.count(
        "input_blocks.",
        "UNet input blocks",
        ("MAX_UNET_INPUT_BLOCKS", MAX_UNET_INPUT_BLOCKS),
    )?;
    let levels = 1
        + (0..blocks)
            .filter(|n| s.has(&format!("input_blocks.{n}.0.op.weight")))
            .count();
    if blocks < 1 + levels {
        return Err(Error::InvalidConfig(format!(
            "{blocks} UNet input blocks for {levels} levels"
        )));
    }
    let layers_per_block = (blocks - 1 - (levels - 1)) / levels;
    let first = |i: usize| 1 + i * (layers_per_block + 1);

    let mut block_out_channels = Vec::with_capacity(levels);
    let mut attention = Vec::with_capacity(levels);
    let mut depths = Vec::new();
    let mut linear_projection = false;
    for i in 0..levels {
        block_out_channels.push(s.dim(
            &format!("input_blocks.{}.0.out_layers.3.weight", first(i)),
            0,
        )?);
        let proj_in = format!("input_blocks.{}.1.proj_in.weight", first(i));
        attention.push(s.has(&proj_in));
        // A level without attention counts as depth 1, as diffusers' configs write it.
        depths.push(if s.has(&proj_in) {
            linear_projection = file
                .shape(&format!("{UNET_PREFIX}{proj_in}"))
                .map(<[usize]>::len)
                == Some(2);
            s.count(
                &format!("input_blocks.{}.1.transformer_blocks.", first(i)),
                "UNet transformer blocks",
                ("MAX_TRANSFORMER_DEPTH", MAX_TRANSFORMER_DEPTH),
            )?
        } else {
            1
        });
    }
    let cross_attention_dim = context_dim(file)
        .ok_or_else(|| Error::InvalidConfig("the UNet has no cross-attention".into()))?;
    let down_block_types = attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
            .to_string()
        })
        .collect();
    let up_block_types = attention
        .iter()
        .rev()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string())
        .collect();
    // SD2 and SDXL fix the head width at 64 (one head in narrower test models; diffusers
    // stores the head count per block in the misnamed `attention_head_dim`); SD1 fixes the
    // head count at 8.
    let attention_head_dim = if cross_attention_dim == 1024 || family == ModelFamily::Sdxl {
        PerBlock::Each(block_out_channels.iter().map(|c| (c / 64).max(1)).collect())
    } else {
        PerBlock::All(8)
    };
    let transformer_layers_per_block = match depths.first() {
        Some(&d) if depths.iter().all(|&x| x == d) => PerBlock::All(d),
        Some(_) => PerBlock::Each(depths),
        None => PerBlock::All(1),
    };
    let text_time = text_time(&s, projection)?;
    let config = UNetConfig {
        in_channels: s.dim("input_blocks.0.0.weight", 1)?,
        out_channels: s.dim("out.2.weight", 0)?,
        down_block_types,
        up_block_types,
        block_out_channels,
        layers_per_block,
        attention_head_dim,
        num_attention_heads: None,
        cross_attention_dim,
        use_linear_projection: linear_projection,
        transformer_layers_per_block,
        addition_embed_type: text_time.map(|_| "text_time".to_string()),
        addition_time_embed_dim: text_time.map(|(_, size_width)| size_width),
        projection_class_embeddings_input_dim: text_time.map(|(input, _)| input),
        ..UNetConfig::sd1()
    };
    config.validate()?;
    Ok(config)
}

/// SDXL's `add_embedding` (CompVis `label_emb.0`): its input width and the width of each size
/// id's embedding, which is what is left of the input after the pooled text, in six.
fn text_time(s: &Shapes, projection: Option<usize>) -> Result<Option<(usize, usize)>> {
    if !s.has("label_emb.0.0.weight") {
        return Ok(None);
    }
    let input = s.dim("label_emb.0.0.weight", 1)?;
    let pooled = projection.ok_or_else(|| {
        Error::InvalidConfig(
            "the UNet takes pooled text (label_emb), but no text encoder has a text_projection"
                .into(),
        )
    })?;
    match input.checked_sub(pooled) {
        Some(rest) if rest > 0 && rest % 6 == 0 => Ok(Some((input, rest / 6))),
        _ => Err(Error::InvalidConfig(format!(
            "label_emb takes {input} values, which is not the pooled text's {pooled} and six \
             size embeddings"
        ))),
    }
}

/// How a VAE's tensors are named in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VaeNaming {
    /// CompVis names under this prefix (`first_stage_model.` or none).
    CompVis(&'static str),
    Diffusers,
}

/// Which naming a file's VAE tensors use, if it has a VAE.
pub(crate) fn vae_naming(file: &TensorFile) -> Option<VaeNaming> {
    [
        (
            "first_stage_model.encoder.down.0.block.0.conv1.weight",
            VaeNaming::CompVis(VAE_PREFIX),
        ),
        (
            "encoder.down.0.block.0.conv1.weight",
            VaeNaming::CompVis(""),
        ),
        (
            "encoder.down_blocks.0.resnets.0.conv1.weight",
            VaeNaming::Diffusers,
        ),
    ]
    .into_iter()
    .find(|(probe, _)| file.contains(probe))
    .map(|(_, naming)| naming)
}

/// The VAE config from shapes; `base` supplies what shapes cannot tell (groups, scaling).
pub(crate) fn vae_config(
    file: &TensorFile,
    naming: VaeNaming,
    base: &VaeConfig,
) -> Result<VaeConfig> {
    let (prefix, down, resnets, conv1) = match naming {
        VaeNaming::CompVis(prefix) => (prefix, "encoder.down.", "block.", "block.0.conv1"),
        VaeNaming::Diffusers => ("", "encoder.down_blocks.", "resnets.", "resnets.0.conv1"),
    };
    let s = Shapes { file, prefix };
    let levels = s.count(down, "VAE levels", ("MAX_VAE_LEVELS", MAX_VAE_LEVELS))?;
    let block_out_channels = (0..levels)
        .map(|i| s.dim(&format!("{down}{i}.{conv1}.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    let config = VaeConfig {
        in_channels: s.dim("encoder.conv_in.weight", 1)?,
        out_channels: s.dim("decoder.conv_out.weight", 0)?,
        block_out_channels,
        layers_per_block: s.count(
            &format!("{down}0.{resnets}"),
            "VAE resnets per level",
            ("MAX_LAYERS_PER_BLOCK", MAX_LAYERS_PER_BLOCK),
        )?,
        latent_channels: s.dim("post_quant_conv.weight", 0)?,
        ..base.clone()
    };
    config.validate()?;
    Ok(config)
}
