//! SDXL single files in Stability's generative-models (SGM) layout: OpenAI's CLIP ViT-L under
//! `conditioner.embedders.0.transformer.` (transformers names) and OpenCLIP ViT-bigG under
//! `conditioner.embedders.1.model.` (OpenCLIP names, fused `in_proj`, `text_projection`).

use std::sync::Arc;

use super::backend::Component;
use super::compvis::clip_names;
use super::tensor_file::TensorFile;
use super::{detect, openclip, TextEncoderWeights};
use crate::{Error, Result};

const CLIP_PREFIXES: [&str; 2] = [
    "conditioner.embedders.0.transformer.text_model.",
    "conditioner.embedders.0.transformer.",
];
const OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// SDXL's two text encoders in a single file.
pub(crate) fn text_encoders(file: &Arc<TensorFile>) -> Result<Vec<TextEncoderWeights>> {
    let clip_prefix = CLIP_PREFIXES
        .into_iter()
        .find(|p| file.contains(&format!("{p}embeddings.token_embedding.weight")));
    let open_clip = file.contains(&format!("{OPEN_CLIP_PREFIX}token_embedding.weight"));
    let (Some(clip_prefix), true) = (clip_prefix, open_clip) else {
        // The refiner conditions on OpenCLIP alone (as embedder 0) and an aesthetic score.
        let refiner = file.contains("conditioner.embedders.0.model.token_embedding.weight");
        return Err(Error::UnsupportedCheckpoint {
            detected: if refiner {
                "the SDXL refiner (OpenCLIP alone, aesthetic-score conditioning)".into()
            } else {
                "SDXL without its two text encoders (conditioner.embedders.0.transformer, \
                 conditioner.embedders.1.model)"
                    .into()
            },
        });
    };
    let clip = detect::clip_config(file, clip_prefix)?;
    let big_g = detect::open_clip_config(file, OPEN_CLIP_PREFIX, false)?;
    let projection_name = format!("{OPEN_CLIP_PREFIX}text_projection");
    let projection = match file.shape(&projection_name) {
        Some(&[hidden, width]) if hidden == big_g.hidden_size && width > 0 => width,
        other => {
            return Err(Error::InvalidConfig(format!(
                "{projection_name} has shape {other:?}, expected [{}, projection]",
                big_g.hidden_size
            )))
        }
    };
    Ok(vec![
        TextEncoderWeights {
            weights: Component::resolve(file.clone(), &clip_names(&clip), |n| {
                vec![format!("{clip_prefix}{}", n.compvis)]
            }),
            config: clip,
            pad_token: crate::tokenizer::EOS,
            projection: None,
        },
        TextEncoderWeights {
            weights: Component::from_places(
                file.clone(),
                openclip::places(&big_g, OPEN_CLIP_PREFIX, true),
            ),
            config: big_g,
            pad_token: 0,
            projection: Some(projection),
        },
    ])
}
