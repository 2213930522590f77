//! diffusers folders: `model_index.json`, and `unet/`, `vae/`, `text_encoder/` each with a
//! `config.json` and safetensors (preferred) or `.bin` weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::backend::Component;
use super::compvis::{clip_names, unet_names, TensorName};
use super::detect::VaeNaming;
use super::tensor_file::{with_path, TensorFile};
use super::{vae_component, Checkpoint, ModelFamily, TextEncoderWeights};
use crate::models::clip::ClipConfig;
use crate::models::unet::{Prediction, UNetConfig};
use crate::models::vae::VaeConfig;
use crate::{Error, Result};

/// Opens a diffusers folder; the configs come from its `config.json` files.
pub(crate) fn open(dir: &Path) -> Result<Checkpoint> {
    let unet_json = dir.join("unet").join("config.json");
    if !unet_json.is_file() {
        return Err(
            match read_json::<serde_json::Value>(&dir.join("model_index.json")) {
                // A diffusers pipeline of another kind (SD3, Flux, ...): say which.
                Ok(index) => Error::UnsupportedCheckpoint {
                    detected: index["_class_name"]
                        .as_str()
                        .unwrap_or("a pipeline without a UNet")
                        .to_string(),
                },
                Err(_) => Error::NotACheckpoint {
                    path: dir.to_path_buf(),
                    reason: "a folder without unet/config.json (not a diffusers model)".into(),
                },
            },
        );
    }
    let unet_raw: serde_json::Value = read_json(&unet_json)?;
    let unet_config: UNetConfig = from_value(&unet_json, unet_raw.clone())?;
    unet_config.validate().map_err(in_file(&unet_json))?;
    let sdxl = dir.join("text_encoder_2").is_dir()
        || unet_raw
            .get("addition_embed_type")
            .is_some_and(|v| !v.is_null());
    let family = if sdxl {
        ModelFamily::Sdxl
    } else {
        ModelFamily::of_unet(unet_config.in_channels, unet_config.cross_attention_dim)
    }
    .ensure_supported()?;

    let text_encoders = match family {
        ModelFamily::Sdxl => vec![
            text_encoder(dir, "text_encoder", "tokenizer", false)?,
            text_encoder(dir, "text_encoder_2", "tokenizer_2", true)?,
        ],
        _ => vec![text_encoder(dir, "text_encoder", "tokenizer", false)?],
    };
    let vae_json = dir.join("vae").join("config.json");
    let vae_config: VaeConfig = read_json(&vae_json)?;
    vae_config.validate().map_err(in_file(&vae_json))?;
    let prediction = scheduler_prediction(dir)?;

    let unet_files = weight_files(&dir.join("unet"))?;
    let hash_file = unet_files[0].clone();
    let unet_file = Arc::new(TensorFile::open_shards(&unet_files)?);
    let vae_file = Arc::new(TensorFile::open_shards(&weight_files(&dir.join("vae"))?)?);

    Ok(Checkpoint {
        path: dir.to_path_buf(),
        hash_file,
        family,
        unet: Component::resolve(unet_file, &unet_names(&unet_config), |n| {
            vec![n.diffusers.clone()]
        }),
        vae: vae_component(vae_file, &vae_config, VaeNaming::Diffusers),
        text_encoders,
        unet_config,
        vae_config,
        scheduler_prediction: prediction,
    })
}

/// The text encoder in `dir/sub` with the pad token `dir/tokenizer` declares; `projected`
/// for SDXL's second encoder (`CLIPTextModelWithProjection`), whose pooled output goes
/// through its `text_projection` of `projection_dim`.
fn text_encoder(
    dir: &Path,
    sub: &str,
    tokenizer: &str,
    projected: bool,
) -> Result<TextEncoderWeights> {
    let json = dir.join(sub).join("config.json");
    let raw: serde_json::Value = read_json(&json)?;
    let config: ClipConfig = from_value(&json, raw.clone())?;
    config.validate().map_err(in_file(&json))?;
    let projection = if projected {
        let width = raw["projection_dim"].as_u64().filter(|&w| w > 0);
        let width = width.and_then(|w| usize::try_from(w).ok()).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "{}: SDXL's second text encoder needs a projection_dim",
                json.display()
            ))
        })?;
        Some(width)
    } else {
        None
    };
    let mut names = clip_names(&config);
    if projected {
        names.push(TensorName {
            diffusers: "text_projection.weight".into(),
            compvis: "text_projection.weight".into(),
        });
    }
    let file = Arc::new(TensorFile::open_shards(&weight_files(&dir.join(sub))?)?);
    Ok(TextEncoderWeights {
        // transformers 4 writes `text_model.*`; transformers 5 drops the prefix (and the
        // projection sits beside `text_model` in both).
        weights: Component::resolve(file, &names, |n| {
            vec![format!("text_model.{}", n.diffusers), n.diffusers.clone()]
        }),
        config,
        pad_token: pad_token(&dir.join(tokenizer)),
        projection,
    })
}

/// What `scheduler/scheduler_config.json` says the UNet predicts: None without the file or
/// the field (diffusers' default, ε, applies); an error for a value sdrs cannot run.
fn scheduler_prediction(dir: &Path) -> Result<Option<Prediction>> {
    let path = dir.join("scheduler").join("scheduler_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let config: serde_json::Value = read_json(&path)?;
    let value = &config["prediction_type"];
    if value.is_null() {
        return Ok(None);
    }
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            Error::InvalidConfig(format!(
                "{}: unknown prediction_type {value}; sdrs runs epsilon and v_prediction",
                path.display()
            ))
        })
}

/// Names the config file in a validation error.
fn in_file(path: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::InvalidConfig(msg) => Error::InvalidConfig(format!("{}: {msg}", path.display())),
        other => with_path(path)(other),
    }
}

/// The padding token of the tokenizer in `dir`: SD 2's (and SDXL's second) say `"!"` (id 0);
/// SD 1's pad with EOS.
fn pad_token(dir: &Path) -> u32 {
    let declared = ["special_tokens_map.json", "tokenizer_config.json"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .filter_map(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .find_map(|v| {
            let pad = &v["pad_token"];
            pad.as_str()
                .or_else(|| pad["content"].as_str())
                .map(str::to_string)
        });
    match declared.as_deref() {
        Some("!") => 0,
        _ => crate::tokenizer::EOS,
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::InvalidConfig(format!("{}: {e}", path.display())))
}

fn from_value<T: DeserializeOwned>(path: &Path, value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value)
        .map_err(|e| Error::InvalidConfig(format!("{}: {e}", path.display())))
}

/// The weight files of one model folder: safetensors before `.bin`, and the plain name
/// (`model.safetensors`, or its shards `model-00001-of-00002.safetensors`) before variants
/// such as `model.fp16.safetensors`, of which one variant is taken.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for ext in [".safetensors", ".bin"] {
        // For "model.fp16.safetensors" the variant is "fp16"; plain files have "".
        let variant = |name: &String| {
            name.strip_suffix(ext)
                .map(|stem| stem.split_once('.').map_or("", |(_, v)| v).to_string())
        };
        let Some(chosen) = names.iter().filter_map(variant).min() else {
            continue;
        };
        return Ok(names
            .iter()
            .filter(|n| variant(n).as_ref() == Some(&chosen))
            .map(|n| dir.join(n))
            .collect());
    }
    Err(Error::NotACheckpoint {
        path: dir.to_path_buf(),
        reason: "no .safetensors or .bin weights in the folder".into(),
    })
}
