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

/// An opened checkpoint: its family, the three model configs, and lazy access to the weights.
/// Clones share the open files.
#[derive(Clone)]
pub struct Checkpoint {
    path: PathBuf,
    /// The file whose sha256 is the A1111 "Model hash".
    hash_file: PathBuf,
    family: ModelFamily,
    clip_config: ClipConfig,
    unet_config: UNetConfig,
    vae_config: VaeConfig,
    text_encoder: Component,
    unet: Component,
    vae: Component,
    /// The padding id after a prompt's end: EOS for SD 1's CLIP, 0 ("!") for SD 2's OpenCLIP.
    pad_token: u32,
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

    /// The text encoder's architecture.
    pub fn clip_config(&self) -> &ClipConfig {
        &self.clip_config
    }

    /// The UNet's architecture.
    pub fn unet_config(&self) -> &UNetConfig {
        &self.unet_config
    }

    /// The VAE's architecture (of the `--vae` override when one is set).
    pub fn vae_config(&self) -> &VaeConfig {
        &self.vae_config
    }

    /// Text-encoder weights, rooted at transformers' `text_model`.
    pub fn text_encoder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        self.text_encoder.var_builder(dtype, device)
    }

    /// The stored shape of every tensor of the network of `role`, under diffusers names
    /// (the text encoder's rooted at `text_model`); empty for a role the checkpoint lacks.
    pub(crate) fn shapes(&self, role: Role) -> Vec<(String, Vec<usize>)> {
        match role {
            Role::TextEncoder(0) => self.text_encoder.shapes(),
            Role::Unet => self.unet.shapes(),
            Role::Vae => self.vae.shapes(),
            _ => Vec::new(),
        }
    }

    /// The tensor `name` (a diffusers name) of the network of `role`, in the dtype the file
    /// stores it in, on the CPU.
    pub(crate) fn stored(&self, role: Role, name: &str) -> Result<candle_core::Tensor> {
        match role {
            Role::TextEncoder(0) => self.text_encoder.stored(name),
            Role::Unet => self.unet.stored(name),
            Role::Vae => self.vae.stored(name),
            other => Err(Error::UnsupportedCheckpoint {
                detected: format!("a model with a {other:?} network"),
            }),
        }
    }

    /// The stored bytes of tensor `name` of the network of `role` and their dtype, where the
    /// file is a mapped safetensors file; `None` otherwise (then [`Checkpoint::stored`]).
    pub(crate) fn stored_bytes(&self, role: Role, name: &str) -> Option<(DType, &[u8])> {
        match role {
            Role::TextEncoder(0) => self.text_encoder.stored_bytes(name),
            Role::Unet => self.unet.stored_bytes(name),
            Role::Vae => self.vae.stored_bytes(name),
            _ => None,
        }
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
        match role {
            Role::TextEncoder(0) => self.text_encoder(dtype, device),
            Role::Unet => self.unet(dtype, device),
            Role::Vae => self.vae(dtype, device),
            other => Err(Error::UnsupportedCheckpoint {
                detected: format!("a model with a {other:?} network"),
            }),
        }
    }

    /// The token that pads a prompt after its EOS: EOS itself for SD 1, 0 (`!`) for SD 2.
    pub fn pad_token(&self) -> u32 {
        self.pad_token
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
    let unet_config = detect::unet_config(&file)?;

    let open_clip = detect::has_open_clip(&file);
    let clip_prefix = detect::CLIP_PREFIXES
        .into_iter()
        .find(|p| file.contains(&format!("{p}embeddings.token_embedding.weight")));
    let clip_config = match (open_clip, clip_prefix) {
        (true, _) => detect::open_clip_config(&file)?,
        (false, Some(prefix)) => detect::clip_config(&file, prefix)?,
        // No text encoder inside: SD1's, so that the error names what is missing.
        (false, None) => ClipConfig::sd1(),
    };
    let text_encoder = if open_clip {
        Component::from_places(file.clone(), openclip::places(&clip_config))
    } else {
        Component::resolve(
            file.clone(),
            &compvis::clip_names(&clip_config),
            compvis_under(clip_prefix.unwrap_or(detect::CLIP_PREFIXES[0])),
        )
    };

    let vae_naming = VaeNaming::CompVis(detect::VAE_PREFIX);
    let vae_config = if detect::vae_naming(&file) == Some(vae_naming) {
        detect::vae_config(&file, vae_naming, &VaeConfig::sd())?
    } else {
        // A checkpoint without its VAE still opens; `set_vae_file` supplies one.
        VaeConfig::sd()
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
        text_encoder,
        clip_config,
        unet_config,
        vae_config,
        pad_token: if open_clip { 0 } else { crate::tokenizer::EOS },
        scheduler_prediction: None,
    })
}
