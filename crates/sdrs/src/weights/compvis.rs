//! Every tensor the text encoder and the UNet ask for, by diffusers name and CompVis name
//! (the VAE's are in `compvis_vae`).
//!
//! The tables are generated from the model config, because the CompVis numbering
//! (`input_blocks.N`, `output_blocks.N`) depends on the depth of the network.
//! The renames inside a block are data: the constants below.

use crate::models::clip::ClipConfig;
use crate::models::unet::UNetConfig;

/// One tensor a model asks for: its diffusers name and the name the CompVis layout uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorName {
    /// The name the model asks its `VarBuilder` for.
    pub diffusers: String,
    /// The name in a CompVis single file.
    pub compvis: String,
}

pub(super) const WEIGHT_BIAS: &[&str] = &["weight", "bias"];
const WEIGHT: &[&str] = &["weight"];

/// UNet resnet: diffusers module ← CompVis module.
const UNET_RESNET: &[(&str, &str)] = &[
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
];
const UNET_SHORTCUT: (&str, &str) = ("conv_shortcut", "skip_connection");

/// A transformer block of the UNet's spatial transformer (same names in both layouts).
const TRANSFORMER_BLOCK: &[(&str, &[&str])] = &[
    ("norm1", WEIGHT_BIAS),
    ("attn1.to_q", WEIGHT),
    ("attn1.to_k", WEIGHT),
    ("attn1.to_v", WEIGHT),
    ("attn1.to_out.0", WEIGHT_BIAS),
    ("norm2", WEIGHT_BIAS),
    ("attn2.to_q", WEIGHT),
    ("attn2.to_k", WEIGHT),
    ("attn2.to_v", WEIGHT),
    ("attn2.to_out.0", WEIGHT_BIAS),
    ("norm3", WEIGHT_BIAS),
    ("ff.net.0.proj", WEIGHT_BIAS),
    ("ff.net.2", WEIGHT_BIAS),
];

/// A CLIP encoder layer (transformers names, which SD1's CompVis layout keeps).
const CLIP_LAYER: &[&str] = &[
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "layer_norm1",
    "layer_norm2",
    "mlp.fc1",
    "mlp.fc2",
];

/// Names collected while walking a network.
#[derive(Default)]
pub(super) struct Table(pub(super) Vec<TensorName>);

impl Table {
    /// A module whose leaves (`weight`, `bias`) are named alike in both layouts.
    pub(super) fn module(&mut self, diffusers: &str, compvis: &str, leaves: &[&str]) {
        for leaf in leaves {
            self.0.push(TensorName {
                diffusers: format!("{diffusers}.{leaf}"),
                compvis: format!("{compvis}.{leaf}"),
            });
        }
    }

    /// A block whose sub-modules are renamed by `renames` (diffusers, CompVis).
    pub(super) fn renamed(&mut self, diffusers: &str, compvis: &str, renames: &[(&str, &str)]) {
        for (d, c) in renames {
            self.module(
                &format!("{diffusers}.{d}"),
                &format!("{compvis}.{c}"),
                WEIGHT_BIAS,
            );
        }
    }

    fn unet_resnet(&mut self, diffusers: &str, compvis: &str, in_ch: usize, out_ch: usize) {
        self.renamed(diffusers, compvis, UNET_RESNET);
        if in_ch != out_ch {
            self.renamed(diffusers, compvis, &[UNET_SHORTCUT]);
        }
    }

    /// A spatial transformer (`Transformer2DModel` / CompVis `SpatialTransformer`).
    fn transformer(&mut self, diffusers: &str, compvis: &str, depth: usize) {
        for m in ["norm", "proj_in", "proj_out"] {
            self.module(
                &format!("{diffusers}.{m}"),
                &format!("{compvis}.{m}"),
                WEIGHT_BIAS,
            );
        }
        for k in 0..depth {
            for (m, leaves) in TRANSFORMER_BLOCK {
                let d = format!("{diffusers}.transformer_blocks.{k}.{m}");
                let c = format!("{compvis}.transformer_blocks.{k}.{m}");
                self.module(&d, &c, leaves);
            }
        }
    }
}

/// The tensors of the CLIP text encoder, rooted at transformers' `text_model`.
pub(crate) fn clip_names(cfg: &ClipConfig) -> Vec<TensorName> {
    let mut t = Table::default();
    t.module(
        "embeddings.token_embedding",
        "embeddings.token_embedding",
        WEIGHT,
    );
    t.module(
        "embeddings.position_embedding",
        "embeddings.position_embedding",
        WEIGHT,
    );
    for i in 0..cfg.num_hidden_layers {
        for m in CLIP_LAYER {
            let name = format!("encoder.layers.{i}.{m}");
            t.module(&name, &name, WEIGHT_BIAS);
        }
    }
    t.module("final_layer_norm", "final_layer_norm", WEIGHT_BIAS);
    t.0
}

fn has_attention(block_type: &str) -> bool {
    block_type.starts_with("CrossAttn")
}

/// The tensors of the UNet; CompVis names are relative to `model.diffusion_model`.
pub(crate) fn unet_names(cfg: &UNetConfig) -> Vec<TensorName> {
    let mut t = Table::default();
    let channels = &cfg.block_out_channels;
    let levels = channels.len();
    let per_level = cfg.layers_per_block;
    t.module("conv_in", "input_blocks.0.0", WEIGHT_BIAS);
    t.module("time_embedding.linear_1", "time_embed.0", WEIGHT_BIAS);
    t.module("time_embedding.linear_2", "time_embed.2", WEIGHT_BIAS);
    if cfg.addition_embed_type.is_some() {
        t.module("add_embedding.linear_1", "label_emb.0.0", WEIGHT_BIAS);
        t.module("add_embedding.linear_2", "label_emb.0.2", WEIGHT_BIAS);
    }

    let mut in_ch = channels[0];
    for (i, &out_ch) in channels.iter().enumerate() {
        let attention = cfg
            .down_block_types
            .get(i)
            .is_some_and(|b| has_attention(b));
        let depth = cfg.transformer_layers_per_block.get(i);
        for j in 0..per_level {
            let n = 1 + i * (per_level + 1) + j;
            let resnet_in = if j == 0 { in_ch } else { out_ch };
            let d = format!("down_blocks.{i}");
            t.unet_resnet(
                &format!("{d}.resnets.{j}"),
                &format!("input_blocks.{n}.0"),
                resnet_in,
                out_ch,
            );
            if attention {
                t.transformer(
                    &format!("{d}.attentions.{j}"),
                    &format!("input_blocks.{n}.1"),
                    depth,
                );
            }
        }
        if i + 1 < levels {
            let n = 1 + i * (per_level + 1) + per_level;
            let d = format!("down_blocks.{i}.downsamplers.0.conv");
            t.module(&d, &format!("input_blocks.{n}.0.op"), WEIGHT_BIAS);
        }
        in_ch = out_ch;
    }

    let mid = channels[levels - 1];
    t.unet_resnet("mid_block.resnets.0", "middle_block.0", mid, mid);
    let depth = cfg.transformer_layers_per_block.get(levels - 1);
    t.transformer("mid_block.attentions.0", "middle_block.1", depth);
    t.unet_resnet("mid_block.resnets.1", "middle_block.2", mid, mid);

    // diffusers' UpBlock arithmetic: each resnet takes the previous output plus one skip.
    let mut prev_out = channels[levels - 1];
    for i in 0..levels {
        let out_ch = channels[levels - 1 - i];
        let skip_last = channels[levels - 1 - (i + 1).min(levels - 1)];
        let attention = cfg.up_block_types.get(i).is_some_and(|b| has_attention(b));
        let depth = cfg.transformer_layers_per_block.get(levels - 1 - i);
        for j in 0..=per_level {
            let n = i * (per_level + 1) + j;
            let skip = if j == per_level { skip_last } else { out_ch };
            let resnet_in = if j == 0 { prev_out } else { out_ch } + skip;
            let d = format!("up_blocks.{i}");
            t.unet_resnet(
                &format!("{d}.resnets.{j}"),
                &format!("output_blocks.{n}.0"),
                resnet_in,
                out_ch,
            );
            if attention {
                t.transformer(
                    &format!("{d}.attentions.{j}"),
                    &format!("output_blocks.{n}.1"),
                    depth,
                );
            }
            if j == per_level && i + 1 < levels {
                let slot = if attention { 2 } else { 1 };
                let d = format!("{d}.upsamplers.0.conv");
                t.module(&d, &format!("output_blocks.{n}.{slot}.conv"), WEIGHT_BIAS);
            }
        }
        prev_out = out_ch;
    }
    t.module("conv_norm_out", "out.0", WEIGHT_BIAS);
    t.module("conv_out", "out.2", WEIGHT_BIAS);
    t.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(table: &[TensorName]) -> Vec<(&str, &str)> {
        table
            .iter()
            .map(|n| (n.diffusers.as_str(), n.compvis.as_str()))
            .collect()
    }

    /// Counts of diffusers' SD 1.5 UNet and transformers' CLIP `state_dict()` (no buffers).
    #[test]
    fn sd1_tables_have_diffusers_tensor_counts() {
        assert_eq!(unet_names(&UNetConfig::sd1()).len(), 686);
        assert_eq!(clip_names(&ClipConfig::sd1()).len(), 196);
    }

    #[test]
    fn sd1_unet_quirks_map_to_compvis_names() {
        let table = unet_names(&UNetConfig::sd1());
        let pairs = pairs(&table);
        for expected in [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.weight",
                "input_blocks.9.0.op.weight",
            ),
            (
                "down_blocks.3.resnets.1.time_emb_proj.weight",
                "input_blocks.11.0.emb_layers.1.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.ff.net.2.bias",
                "middle_block.1.transformer_blocks.0.ff.net.2.bias",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            (
                "up_blocks.3.attentions.2.proj_out.weight",
                "output_blocks.11.1.proj_out.weight",
            ),
            (
                "up_blocks.3.resnets.2.norm2.weight",
                "output_blocks.11.0.out_layers.0.weight",
            ),
            ("conv_norm_out.weight", "out.0.weight"),
            ("conv_out.bias", "out.2.bias"),
        ] {
            assert!(pairs.contains(&expected), "{expected:?}");
        }
        assert!(!pairs
            .iter()
            .any(|(d, _)| d.starts_with("down_blocks.0.resnets.0.conv_shortcut")));
    }
}
