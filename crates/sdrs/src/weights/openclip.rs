//! SD 2's OpenCLIP text encoder in a CompVis single file (`cond_stage_model.model.*`), served
//! under transformers' CLIP names.
//!
//! OpenCLIP keeps q, k and v fused in `attn.in_proj_weight`/`in_proj_bias` ([3·hidden, …]);
//! each projection is a band of its rows. SD 2 conditions on the penultimate layer followed by
//! the final layer norm (CompVis' `FrozenOpenCLIPEmbedder(layer="penultimate")`), which is a
//! CLIP encoder one layer shorter — what diffusers' SD 2 text encoders ship (23 of 24 layers) —
//! so the config this file's shapes give drops the last resblock and it is never read.
//!
//! SDXL's second text encoder is OpenCLIP ViT-bigG under `conditioner.embedders.1.model.`,
//! read whole: its last layer makes the pooled output, which goes through `text_projection`
//! (stored `[hidden, projection]`, served transposed as transformers' linear weight).

use super::backend::Stored;
use crate::models::clip::ClipConfig;

/// Where SD 2 single files keep the text encoder.
pub(crate) const PREFIX: &str = "cond_stage_model.model.";

fn whole(name: String) -> Stored {
    Stored {
        name,
        rows: None,
        transposed: false,
    }
}

/// Every tensor of a CLIP text encoder with `cfg`, by transformers name, in an OpenCLIP file
/// under `p`; with `projection`, its text projection too.
pub(crate) fn places(cfg: &ClipConfig, p: &str, projection: bool) -> Vec<(String, Stored)> {
    let h = cfg.hidden_size;
    let mut out = vec![
        (
            "embeddings.token_embedding.weight".to_string(),
            whole(format!("{p}token_embedding.weight")),
        ),
        (
            "embeddings.position_embedding.weight".to_string(),
            whole(format!("{p}positional_embedding")),
        ),
    ];
    for kind in ["weight", "bias"] {
        out.push((
            format!("final_layer_norm.{kind}"),
            whole(format!("{p}ln_final.{kind}")),
        ));
    }
    for i in 0..cfg.num_hidden_layers {
        let ours = format!("encoder.layers.{i}");
        let theirs = format!("{p}transformer.resblocks.{i}");
        for kind in ["weight", "bias"] {
            for (band, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.push((
                    format!("{ours}.self_attn.{proj}.{kind}"),
                    Stored {
                        name: format!("{theirs}.attn.in_proj_{kind}"),
                        rows: Some((band * h, h)),
                        transposed: false,
                    },
                ));
            }
            for (mine, stored) in [
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ] {
                out.push((
                    format!("{ours}.{mine}.{kind}"),
                    whole(format!("{theirs}.{stored}.{kind}")),
                ));
            }
        }
    }
    if projection {
        out.push((
            "text_projection.weight".to_string(),
            Stored {
                name: format!("{p}text_projection"),
                rows: None,
                transposed: true,
            },
        ));
    }
    out
}
