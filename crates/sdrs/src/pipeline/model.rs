//! A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and schedule.

use std::sync::Arc;

use candle_core::Device;

use super::networks::{NetworkOptions, Networks};
use super::vae_tiling::VaeTiling;
use crate::models::clip::ClipTextTransformer;
use crate::models::unet::{Prediction, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::sampling::NoiseSchedule;
use crate::tokenizer::Tokenizer;
use crate::weights::Checkpoint;
use crate::Result;

/// Everything a generation needs: the networks (resident, or built in turn) and what the
/// checkpoint says about them.
pub struct StableDiffusion {
    pub tokenizer: Tokenizer,
    networks: Networks,
    pub vae_config: VaeConfig,
    pub schedule: NoiseSchedule,
    pub device: Device,
    pub model_name: String,
    pub model_hash: Option<String>,
    /// The id that pads prompts after their EOS (SD 2: 0).
    pub pad_token: u32,
    /// What the UNet predicts (detected from the checkpoint; `--prediction` overrides it).
    pub prediction: Prediction,
    /// When the VAE works in tiles.
    pub vae_tiling: VaeTiling,
    /// Whether a latent or decoded image holding NaN or infinity fails its image (A1111's
    /// `NansException`); off, such an image is saved as it comes out.
    pub nan_check: bool,
}

impl StableDiffusion {
    /// Builds every network from a checkpoint, in float32 on `device`.
    pub fn load(checkpoint: &Checkpoint, device: &Device) -> Result<Self> {
        Self::load_with(checkpoint, device, NetworkOptions::default())
    }

    /// A model whose networks are kept and computed as `options` say.
    pub fn load_with(
        checkpoint: &Checkpoint,
        device: &Device,
        options: NetworkOptions,
    ) -> Result<Self> {
        Ok(Self {
            tokenizer: Tokenizer::new()?,
            networks: Networks::load(checkpoint, device, options)?,
            vae_config: checkpoint.vae_config().clone(),
            schedule: NoiseSchedule::stable_diffusion(),
            device: device.clone(),
            model_name: checkpoint.name(),
            model_hash: checkpoint.hash().ok(),
            pad_token: checkpoint.pad_token(),
            prediction: checkpoint.prediction(),
            vae_tiling: VaeTiling::default(),
            nan_check: true,
        })
    }

    /// The text encoder (built first when networks are resident one at a time).
    pub fn text_encoder(&self) -> Result<Arc<ClipTextTransformer>> {
        self.networks.text_encoder()
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
}
