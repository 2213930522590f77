//! A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and schedule.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use candle_core::Device;

use super::networks::{NetworkOptions, Networks};
use super::vae_tiling::VaeTiling;
use crate::embeddings::Embeddings;
use crate::lora::{LoraLibrary, Patches};
use crate::models::clip::ClipTextTransformer;
use crate::models::unet::{Prediction, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::sampling::NoiseSchedule;
use crate::tokenizer::Tokenizer;
use crate::weights::{Checkpoint, UnetInputs};
use crate::Result;

/// How a model is loaded and run, beyond its checkpoint: chosen once, at load.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Which networks stay in memory and what arithmetic they run.
    pub networks: NetworkOptions,
    /// What the UNet predicts, overriding what the checkpoint says.
    pub prediction: Option<Prediction>,
    /// When the VAE works in tiles.
    pub vae_tiling: VaeTiling,
    /// Whether a latent or decoded image holding NaN or infinity fails its image (A1111's
    /// `NansException`); off, such an image is saved as it comes out.
    pub nan_check: bool,
    /// The name infotexts give the model, instead of the checkpoint's file or folder name.
    pub name: Option<String>,
    /// Where `<lora:NAME>` finds `NAME` (see [`crate::lora`]); none: prompts cannot use LoRAs.
    pub lora_dir: Option<PathBuf>,
    /// The folder of textual-inversion embeddings the prompts can name (see
    /// [`Embeddings::load_dir`]); none, no embeddings.
    pub embeddings_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            networks: NetworkOptions::default(),
            prediction: None,
            vae_tiling: VaeTiling::default(),
            nan_check: true,
            name: None,
            lora_dir: None,
            embeddings_dir: None,
        }
    }
}

/// Everything a generation needs: the networks (resident, or built in turn) and what the
/// checkpoint says about them.
pub struct StableDiffusion {
    pub(crate) tokenizer: Tokenizer,
    networks: Networks,
    pub(crate) vae_config: VaeConfig,
    pub(crate) schedule: NoiseSchedule,
    pub(crate) device: Device,
    pub(crate) model_name: String,
    pub(crate) model_hash: Option<String>,
    /// The id that pads prompts after their EOS (SD 2: 0).
    pub(crate) pad_token: u32,
    /// Each text encoder's padding id, in role order.
    pub(crate) pad_tokens: Vec<u32>,
    /// What the family's UNet is conditioned on.
    pub(crate) unet_inputs: UnetInputs,
    pub(crate) prediction: Prediction,
    pub(crate) vae_tiling: VaeTiling,
    pub(crate) nan_check: bool,
    loras: LoraLibrary,
    /// The embeddings prompts can name; replaced whole by a re-scan.
    embeddings: RwLock<Arc<Embeddings>>,
    embeddings_dir: Option<PathBuf>,
    /// The text encoders' widths together (SDXL: 768 + 1280), which an embedding's must equal.
    text_width: usize,
}

impl StableDiffusion {
    /// Builds every network from a checkpoint, in float32 on `device`.
    pub fn load(checkpoint: &Checkpoint, device: &Device) -> Result<Self> {
        Self::load_with(checkpoint, device, LoadOptions::default())
    }

    /// A model loaded and run as `options` say.
    pub fn load_with(
        checkpoint: &Checkpoint,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self> {
        let tokenizer = Tokenizer::new()?;
        // An embedding carries every text encoder's vectors side by side (SDXL's 768 + 1280).
        let text_width = (0..)
            .map_while(|i| checkpoint.text_encoder_config(i))
            .map(|(config, _)| config.hidden_size)
            .sum();
        let unet_inputs = checkpoint.family().unet_inputs();
        let embeddings_dir = options.embeddings_dir;
        let embeddings = match &embeddings_dir {
            Some(dir) => Embeddings::load_dir(dir, &tokenizer, text_width)?,
            None => Embeddings::default(),
        };
        Ok(Self {
            tokenizer,
            networks: Networks::load(checkpoint, device, options.networks)?,
            vae_config: checkpoint.vae_config().clone(),
            schedule: NoiseSchedule::stable_diffusion(),
            device: device.clone(),
            model_name: options.name.unwrap_or_else(|| checkpoint.name()),
            model_hash: checkpoint.hash().ok(),
            pad_token: checkpoint.pad_token(),
            pad_tokens: checkpoint.pad_tokens(),
            unet_inputs,
            prediction: options
                .prediction
                .unwrap_or_else(|| checkpoint.prediction()),
            vae_tiling: options.vae_tiling,
            nan_check: options.nan_check,
            loras: LoraLibrary::new(options.lora_dir),
            embeddings: RwLock::new(Arc::new(embeddings)),
            embeddings_dir,
            text_width,
        })
    }

    /// The LoRA folder's files.
    pub fn loras(&self) -> &LoraLibrary {
        &self.loras
    }

    /// Merges the LoRAs `gen`'s prompts ask for into the networks' weights, and takes out
    /// those it does not ask for (nothing happens when the set is the one merged).
    pub fn apply_loras(&self, gen: &super::Generation) -> Result<()> {
        let patches = if gen.loras.is_empty() {
            Patches::default()
        } else {
            crate::lora::resolve(
                &self.loras,
                self.networks.targets(),
                &gen.loras,
                &gen.request.lora_hashes,
            )?
        };
        self.networks.set_patches(Arc::new(patches))
    }

    /// `(name, short hash)` of the LoRAs merged now, for the infotext's `Lora hashes`.
    pub fn lora_hashes(&self) -> Vec<(String, String)> {
        self.networks.patches().hashes().to_vec()
    }

    /// The (first) text encoder (built first when networks are resident one at a time).
    pub fn text_encoder(&self) -> Result<Arc<ClipTextTransformer>> {
        self.networks.text_encoder()
    }

    /// Text encoder `index` (SDXL has two; built first when networks are resident one at a
    /// time).
    pub fn text_encoder_at(&self, index: usize) -> Result<Arc<ClipTextTransformer>> {
        self.networks.text_encoder_at(index)
    }

    /// The UNet (built first when networks are resident one at a time).
    pub fn unet(&self) -> Result<Arc<UNet2DConditionModel>> {
        self.networks.unet()
    }

    /// The VAE (built first when networks are resident one at a time).
    pub fn vae(&self) -> Result<Arc<AutoencoderKL>> {
        self.networks.vae()
    }

    /// Whether the UNet and the VAE multiply in bf16 (the fast mode, where this CPU has it).
    pub fn fast(&self) -> bool {
        self.networks.fast()
    }

    /// The VAE's configuration (latent channels, scaling factor, downscale factor).
    pub fn vae_config(&self) -> &VaeConfig {
        &self.vae_config
    }

    /// The training noise schedule the samplers' sigmas come from.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The device the networks run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The name infotexts give the model.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The checkpoint's short hash (A1111's `Model hash`), when it could be computed.
    pub fn model_hash(&self) -> Option<&str> {
        self.model_hash.as_deref()
    }

    /// What the UNet predicts.
    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// The id that pads prompts after their EOS (SD 2: 0).
    pub fn pad_token(&self) -> u32 {
        self.pad_token
    }

    /// The embeddings prompts can name now (a snapshot: a re-scan does not change it).
    pub fn embeddings(&self) -> Arc<Embeddings> {
        // A panic while the lock was held leaves the old set or the new, both whole.
        self.embeddings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The folder embeddings are loaded from, if any.
    pub fn embeddings_dir(&self) -> Option<&std::path::Path> {
        self.embeddings_dir.as_deref()
    }

    /// Loads the embeddings folder again (A1111's "refresh embeddings"), replacing the set;
    /// without a folder the set stays empty.
    pub fn reload_embeddings(&self) -> Result<Arc<Embeddings>> {
        let embeddings = match &self.embeddings_dir {
            Some(dir) => Embeddings::load_dir(dir, &self.tokenizer, self.text_width)?,
            None => Embeddings::default(),
        };
        Ok(self.set_embeddings(embeddings))
    }

    /// Replaces the embeddings prompts can name (loaded by [`Embeddings::load_files`], say).
    pub fn set_embeddings(&self, embeddings: Embeddings) -> Arc<Embeddings> {
        let embeddings = Arc::new(embeddings);
        *self.embeddings.write().unwrap_or_else(|e| e.into_inner()) = embeddings.clone();
        embeddings
    }

    /// The text encoders' widths together (SDXL: 768 + 1280), which an embedding's must equal.
    pub fn text_width(&self) -> usize {
        self.text_width
    }
}
