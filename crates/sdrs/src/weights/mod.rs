//! Checkpoints on disk — CompVis single files (`.safetensors`, `.ckpt`) and diffusers folders —
//! opened lazily and handed to the models as `VarBuilder`s that speak diffusers names.

mod backend;
mod compvis;
mod compvis_vae;
mod detect;
pub(crate) mod embedding_file;
mod family;
pub mod file_hash;
mod folder;
mod numbered;
mod openclip;
mod pickle;
mod safetensors_header;
mod sgm;
mod tensor_file;
mod torch_pickle;
mod torch_zip;
mod upscaler;
mod validate;
mod zip;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::models::clip::ClipConfig;
use crate::models::unet::{Prediction, UNetConfig};
use crate::models::vae::VaeConfig;
use crate::{Error, Result};
use backend::Component;
use compvis::TensorName;
use detect::VaeNaming;
pub use family::{ModelFamily, Role, UnetInputs};
pub(crate) use tensor_file::{release_pages, TensorFile};
pub use upscaler::UpscalerFile;

#[doc(hidden)]
pub mod fuzzing;

pub(crate) use safetensors_header::metadata as safetensors_metadata;

/// Whether the non-empty sides of a stored shape multiply within 64 bits: a tensor with a side
/// of 0 holds nothing, but its strides (the products of the sides after each) are still
/// computed, so `[0, 2⁴⁰, 2⁴⁰]` must be refused as well.
pub(crate) fn sides_fit(shape: &[usize]) -> bool {
    shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_some()
}

/// A text encoder in a checkpoint: its architecture, its tensors, and how its prompts are padded.
#[derive(Clone)]
pub(crate) struct TextEncoderWeights {
    config: ClipConfig,
    weights: Component,
    /// The padding id after a prompt's end: EOS for OpenAI's CLIP, 0 ("!") for OpenCLIP.
    pad_token: u32,
    /// The width of `text_projection` (SDXL's second encoder), which the pooled output goes
    /// through; none for an encoder whose pooled output is not used.
    projection: Option<usize>,
}

/// An opened checkpoint: its family, the three model configs, and lazy access to the weights.
/// Clones share the open files.
#[derive(Clone)]
pub struct Checkpoint {
    path: PathBuf,
    /// The file whose sha256 is the A1111 "Model hash".
    hash_file: PathBuf,
    family: ModelFamily,
    /// One per text encoder of the family, in role order.
    text_encoders: Vec<TextEncoderWeights>,
    unet_config: UNetConfig,
    vae_config: VaeConfig,
    unet: Component,
    vae: Component,
    /// A diffusers folder's `prediction_type`, read (and checked) when it opened.
    scheduler_prediction: Option<Prediction>,
}

impl Checkpoint {
    /// Opens a single-file checkpoint or a diffusers folder, reading only names and shapes.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            folder::open(path)
        } else {
            open_single_file(path).map_err(tensor_file::with_path(path))
        }
    }

    /// The model family detected from the weights.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// What the UNet predicts: a diffusers folder's `scheduler/scheduler_config.json` says (an
    /// unknown value there fails [`Checkpoint::open`]); a single file cannot tell from its
    /// weights, so A1111's sidecar `NAME.yaml` (`parameterization: "v"`) or a name hint
    /// ("768-v", "v-pred", "vpred") decides, else ε.
    pub fn prediction(&self) -> Prediction {
        if self.path.is_dir() {
            return self.scheduler_prediction.unwrap_or_default();
        }
        let yaml = std::fs::read_to_string(self.path.with_extension("yaml")).unwrap_or_default();
        let sidecar_v = yaml.lines().any(|l| {
            let l = l.trim().replace(['"', '\''], "");
            l == "parameterization: v"
        });
        let name = self.name().to_ascii_lowercase();
        if sidecar_v
            || ["768-v", "v-pred", "vpred", "v_pred"]
                .iter()
                .any(|h| name.contains(h))
        {
            Prediction::V
        } else {
            Prediction::Epsilon
        }
    }

    /// The (first) text encoder's architecture.
    pub fn clip_config(&self) -> &ClipConfig {
        &self.text_encoders[0].config
    }

    /// The architecture of text encoder `index` (SDXL has two), and the width of its text
    /// projection when its pooled output conditions the UNet.
    pub fn text_encoder_config(&self, index: usize) -> Option<(&ClipConfig, Option<usize>)> {
        let encoder = self.text_encoders.get(index)?;
        Some((&encoder.config, encoder.projection))
    }

    /// The UNet's architecture.
    pub fn unet_config(&self) -> &UNetConfig {
        &self.unet_config
    }

    /// The VAE's architecture (of the `--vae` override when one is set).
    pub fn vae_config(&self) -> &VaeConfig {
        &self.vae_config
    }

    /// The (first) text encoder's weights, rooted at transformers' `text_model`.
    pub fn text_encoder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        self.text_encoder_at(0, dtype, device)
    }

    /// The weights of text encoder `index`, rooted at transformers' `text_model` (a text
    /// projection is `text_projection.weight`).
    pub fn text_encoder_at(
        &self,
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        self.text_encoders
            .get(index)
            .ok_or_else(|| no_network(Role::TextEncoder(index)))?
            .weights
            .var_builder(dtype, device)
    }

    /// The network of `role`'s tensors, if the checkpoint has that network.
    fn component(&self, role: Role) -> Option<&Component> {
        match role {
            Role::TextEncoder(i) => self.text_encoders.get(i).map(|e| &e.weights),
            Role::Unet => Some(&self.unet),
            Role::Vae => Some(&self.vae),
        }
    }

    /// The stored shape of every tensor of the network of `role`, under diffusers names
    /// (the text encoder's rooted at `text_model`); empty for a role the checkpoint lacks.
    pub(crate) fn shapes(&self, role: Role) -> Vec<(String, Vec<usize>)> {
        self.component(role)
            .map(Component::shapes)
            .unwrap_or_default()
    }

    /// The tensor `name` (a diffusers name) of the network of `role`, in the dtype the file
    /// stores it in, on the CPU.
    pub(crate) fn stored(&self, role: Role, name: &str) -> Result<candle_core::Tensor> {
        self.component(role)
            .ok_or_else(|| no_network(role))?
            .stored(name)
    }

    /// The stored bytes of tensor `name` of the network of `role` and their dtype, where the
    /// file is a mapped safetensors file; `None` otherwise (then [`Checkpoint::stored`]).
    pub(crate) fn stored_bytes(&self, role: Role, name: &str) -> Option<(DType, &[u8])> {
        self.component(role)?.stored_bytes(name)
    }

    /// The UNet's `(diffusers, CompVis)` tensor names (CompVis relative to
    /// `model.diffusion_model.`), whatever layout the checkpoint itself has.
    pub(crate) fn unet_names(&self) -> Vec<(String, String)> {
        compvis::unet_names(&self.unet_config)
            .into_iter()
            .map(|n| (n.diffusers, n.compvis))
            .collect()
    }

    /// The weights of the network of `role`, as [`Checkpoint::unet`] and the others give them.
    pub(crate) fn weights(
        &self,
        role: Role,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        self.component(role)
            .ok_or_else(|| no_network(role))?
            .var_builder(dtype, device)
    }

    /// The token that pads a prompt after its EOS for the (first) text encoder: EOS itself
    /// for SD 1 (and SDXL's first), 0 (`!`) for SD 2.
    pub fn pad_token(&self) -> u32 {
        self.text_encoders[0].pad_token
    }

    /// The padding token of each text encoder, in role order (SDXL: EOS, then 0).
    pub fn pad_tokens(&self) -> Vec<u32> {
        self.text_encoders.iter().map(|e| e.pad_token).collect()
    }

    /// UNet weights under diffusers `UNet2DConditionModel` names.
    pub fn unet(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        self.unet.var_builder(dtype, device)
    }

    /// VAE weights under diffusers `AutoencoderKL` names.
    pub fn vae(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        self.vae.var_builder(dtype, device)
    }

    /// Uses the VAE in `path` (CompVis with or without `first_stage_model.`, or diffusers names).
    pub fn set_vae_file(&mut self, path: &Path) -> Result<()> {
        let file = Arc::new(TensorFile::open(path)?);
        let naming = detect::vae_naming(&file).ok_or_else(|| Error::NotACheckpoint {
            path: path.to_path_buf(),
            reason: "no VAE tensors (encoder.*, decoder.*) found".into(),
        })?;
        let config = detect::vae_config(&file, naming, &self.vae_config)
            .map_err(tensor_file::with_path(path))?;
        self.vae = vae_component(file, &config, naming);
        self.vae_config = config;
        Ok(())
    }

    /// The checkpoint's name for humans and the infotext: file stem or folder name.
    pub fn name(&self) -> String {
        let name = if self.path.is_dir() {
            self.path.file_name()
        } else {
            self.path.file_stem()
        };
        name.map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// A1111's "Model hash": the first 10 hex digits of the sha256 of the weights file
    /// (remembered across runs in the hash cache).
    pub fn hash(&self) -> Result<String> {
        let path = &self.hash_file;
        let hex = match file_hash::HashCache::default_location() {
            Some(cache) => cache.sha256(path),
            None => file_hash::sha256_file(path),
        }
        .map_err(|e| Error::io(path, e))?;
        Ok(hex[..10].to_string())
    }
}

/// The error for a network the checkpoint's family does not have.
fn no_network(role: Role) -> Error {
    Error::UnsupportedCheckpoint {
        detected: format!("a model without a {role:?} network"),
    }
}

/// The VAE component for a file with the given naming.
fn vae_component(file: Arc<TensorFile>, config: &VaeConfig, naming: VaeNaming) -> Component {
    Component::resolve(file, &compvis_vae::vae_names(config), |n| match naming {
        VaeNaming::CompVis(prefix) => vec![format!("{prefix}{}", n.compvis)],
        VaeNaming::Diffusers => std::iter::once(n.diffusers.clone())
            .chain(compvis_vae::old_vae_attention_name(&n.diffusers))
            .collect(),
    })
}

/// Names under `prefix` in the CompVis layout.
fn compvis_under(prefix: &str) -> impl Fn(&TensorName) -> Vec<String> + '_ {
    move |n| vec![format!("{prefix}{}", n.compvis)]
}

fn open_single_file(path: &Path) -> Result<Checkpoint> {
    let file = Arc::new(TensorFile::open(path)?);
    let family = detect::family(&file);
    if family == ModelFamily::Unknown {
        if file.names().any(|n| n.starts_with(detect::UNET_PREFIX)) {
            return Err(Error::UnsupportedCheckpoint {
                detected: family.to_string(),
            });
        }
        return Err(Error::NotACheckpoint {
            path: path.to_path_buf(),
            reason:
                "no Stable Diffusion UNet (model.diffusion_model.*); a VAE, LoRA or embedding file?"
                    .into(),
        });
    }
    let family = family.ensure_supported()?;
    let text_encoders = match family {
        ModelFamily::Sdxl => sgm::text_encoders(&file)?,
        _ => vec![compvis_text_encoder(&file)?],
    };
    let projection = text_encoders.iter().find_map(|e| e.projection);
    let unet_config = detect::unet_config(&file, family, projection)?;

    let vae_naming = VaeNaming::CompVis(detect::VAE_PREFIX);
    let vae_config = if detect::vae_naming(&file) == Some(vae_naming) {
        detect::vae_config(&file, vae_naming, &family.vae_config())?
    } else {
        // A checkpoint without its VAE still opens; `set_vae_file` supplies one.
        family.vae_config()
    };
    Ok(Checkpoint {
        path: path.to_path_buf(),
        hash_file: path.to_path_buf(),
        family,
        unet: Component::resolve(
            file.clone(),
            &compvis::unet_names(&unet_config),
            compvis_under(detect::UNET_PREFIX),
        ),
        vae: vae_component(file, &vae_config, vae_naming),
        text_encoders,
        unet_config,
        vae_config,
        scheduler_prediction: None,
    })
}

/// The one text encoder of an SD 1 (OpenAI CLIP) or SD 2 (OpenCLIP) single file.
fn compvis_text_encoder(file: &Arc<TensorFile>) -> Result<TextEncoderWeights> {
    let open_clip = detect::has_open_clip(file);
    let clip_prefix = detect::CLIP_PREFIXES
        .into_iter()
        .find(|p| file.contains(&format!("{p}embeddings.token_embedding.weight")));
    let config = match (open_clip, clip_prefix) {
        (true, _) => detect::open_clip_config(file, openclip::PREFIX, true)?,
        (false, Some(prefix)) => detect::clip_config(file, prefix)?,
        // No text encoder inside: SD1's, so that the error names what is missing.
        (false, None) => ClipConfig::sd1(),
    };
    let weights = if open_clip {
        Component::from_places(
            file.clone(),
            openclip::places(&config, openclip::PREFIX, false),
        )
    } else {
        Component::resolve(
            file.clone(),
            &compvis::clip_names(&config),
            compvis_under(clip_prefix.unwrap_or(detect::CLIP_PREFIXES[0])),
        )
    };
    Ok(TextEncoderWeights {
        config,
        weights,
        pad_token: if open_clip { 0 } else { crate::tokenizer::EOS },
        projection: None,
    })
}
