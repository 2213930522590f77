//! The VAE's tensors by diffusers and CompVis name (CompVis numbers decoder levels backwards).

use super::compvis::{Table, TensorName, WEIGHT_BIAS};
use crate::models::vae::VaeConfig;

/// VAE resnet: diffusers module ← CompVis module.
const RESNET: &[(&str, &str)] = &[
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
];
const SHORTCUT: (&str, &str) = ("conv_shortcut", "nin_shortcut");

/// VAE mid-block attention: diffusers module ← CompVis module (CompVis q/k/v/proj_out are 1×1
/// convolutions; the backend reshapes them to the linear shape diffusers asks for).
const ATTENTION: &[(&str, &str)] = &[
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
];

fn resnet(t: &mut Table, diffusers: &str, compvis: &str, in_ch: usize, out_ch: usize) {
    t.renamed(diffusers, compvis, RESNET);
    if in_ch != out_ch {
        t.renamed(diffusers, compvis, &[SHORTCUT]);
    }
}

/// The tensors of the VAE; CompVis names are relative to `first_stage_model`.
pub(crate) fn vae_names(cfg: &VaeConfig) -> Vec<TensorName> {
    let mut t = Table::default();
    let channels = &cfg.block_out_channels;
    let levels = channels.len();
    let top = channels[levels - 1];

    t.module("encoder.conv_in", "encoder.conv_in", WEIGHT_BIAS);
    let mut in_ch = channels[0];
    for (i, &out_ch) in channels.iter().enumerate() {
        for j in 0..cfg.layers_per_block {
            let d = format!("encoder.down_blocks.{i}.resnets.{j}");
            let c = format!("encoder.down.{i}.block.{j}");
            resnet(&mut t, &d, &c, if j == 0 { in_ch } else { out_ch }, out_ch);
        }
        if i + 1 < levels {
            let d = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
            t.module(
                &d,
                &format!("encoder.down.{i}.downsample.conv"),
                WEIGHT_BIAS,
            );
        }
        in_ch = out_ch;
    }
    mid_block(&mut t, "encoder", top);
    t.module("encoder.conv_norm_out", "encoder.norm_out", WEIGHT_BIAS);
    t.module("encoder.conv_out", "encoder.conv_out", WEIGHT_BIAS);
    t.module("quant_conv", "quant_conv", WEIGHT_BIAS);
    t.module("post_quant_conv", "post_quant_conv", WEIGHT_BIAS);

    t.module("decoder.conv_in", "decoder.conv_in", WEIGHT_BIAS);
    mid_block(&mut t, "decoder", top);
    let mut prev_out = top;
    for i in 0..levels {
        // CompVis numbers decoder levels from the latent side's opposite end.
        let level = levels - 1 - i;
        let out_ch = channels[level];
        for j in 0..=cfg.layers_per_block {
            let d = format!("decoder.up_blocks.{i}.resnets.{j}");
            let c = format!("decoder.up.{level}.block.{j}");
            resnet(
                &mut t,
                &d,
                &c,
                if j == 0 { prev_out } else { out_ch },
                out_ch,
            );
        }
        if i + 1 < levels {
            let d = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
            t.module(
                &d,
                &format!("decoder.up.{level}.upsample.conv"),
                WEIGHT_BIAS,
            );
        }
        prev_out = out_ch;
    }
    t.module("decoder.conv_norm_out", "decoder.norm_out", WEIGHT_BIAS);
    t.module("decoder.conv_out", "decoder.conv_out", WEIGHT_BIAS);
    t.0
}

fn mid_block(t: &mut Table, side: &str, channels: usize) {
    let d = format!("{side}.mid_block");
    let c = format!("{side}.mid");
    resnet(
        t,
        &format!("{d}.resnets.0"),
        &format!("{c}.block_1"),
        channels,
        channels,
    );
    t.renamed(
        &format!("{d}.attentions.0"),
        &format!("{c}.attn_1"),
        ATTENTION,
    );
    resnet(
        t,
        &format!("{d}.resnets.1"),
        &format!("{c}.block_2"),
        channels,
        channels,
    );
}

/// Older diffusers VAE attention names (`query`, `key`, `value`, `proj_attn`) for a current one.
pub(crate) fn old_vae_attention_name(diffusers: &str) -> Option<String> {
    const OLD: &[(&str, &str)] = &[
        (".attentions.0.to_q.", ".attentions.0.query."),
        (".attentions.0.to_k.", ".attentions.0.key."),
        (".attentions.0.to_v.", ".attentions.0.value."),
        (".attentions.0.to_out.0.", ".attentions.0.proj_attn."),
    ];
    OLD.iter()
        .find(|(new, _)| diffusers.contains(new))
        .map(|(new, old)| diffusers.replace(new, old))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' SD `AutoencoderKL` has 248 tensors.
    #[test]
    fn sd_table_has_diffusers_tensor_count() {
        assert_eq!(vae_names(&VaeConfig::sd()).len(), 248);
    }

    #[test]
    fn sd1_vae_decoder_levels_are_reversed() {
        let table = vae_names(&VaeConfig::sd());
        let pairs: Vec<_> = table
            .iter()
            .map(|n| (n.diffusers.as_str(), n.compvis.as_str()))
            .collect();
        for expected in [
            (
                "decoder.up_blocks.0.resnets.2.conv2.weight",
                "decoder.up.3.block.2.conv2.weight",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.bias",
                "decoder.up.1.upsample.conv.bias",
            ),
            (
                "decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
                "decoder.up.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
            ),
            ("encoder.conv_norm_out.bias", "encoder.norm_out.bias"),
        ] {
            assert!(pairs.contains(&expected), "{expected:?}");
        }
    }

    #[test]
    fn old_vae_attention_names() {
        let old = old_vae_attention_name("decoder.mid_block.attentions.0.to_out.0.weight");
        assert_eq!(
            old.as_deref(),
            Some("decoder.mid_block.attentions.0.proj_attn.weight")
        );
        assert_eq!(old_vae_attention_name("decoder.conv_in.weight"), None);
    }
}
