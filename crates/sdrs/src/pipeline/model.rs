//! A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and schedule.

use candle_core::{DType, Device};

use super::vae_tiling::VaeTiling;
use crate::models::clip::ClipTextTransformer;
use crate::models::unet::{Prediction, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::sampling::NoiseSchedule;
use crate::tokenizer::Tokenizer;
use crate::weights::Checkpoint;
use crate::Result;

/// Every network a generation needs, resident in memory.
pub struct StableDiffusion {
    pub tokenizer: Tokenizer,
    pub text_encoder: ClipTextTransformer,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
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
}

impl StableDiffusion {
    /// Builds every model from a checkpoint, in float32 on `device`.
    pub fn load(checkpoint: &Checkpoint, device: &Device) -> Result<Self> {
        let dtype = DType::F32;
        let clip_config = checkpoint.clip_config();
        let text_encoder =
            ClipTextTransformer::new(checkpoint.text_encoder(dtype, device)?, clip_config)?;
        let unet =
            UNet2DConditionModel::new(checkpoint.unet(dtype, device)?, checkpoint.unet_config())?;
        let vae_config = checkpoint.vae_config().clone();
        let vae = AutoencoderKL::new(checkpoint.vae(dtype, device)?, &vae_config)?;
        Ok(Self {
            tokenizer: Tokenizer::new()?,
            text_encoder,
            unet,
            vae,
            vae_config,
            schedule: NoiseSchedule::stable_diffusion(),
            device: device.clone(),
            model_name: checkpoint.name(),
            model_hash: checkpoint.hash().ok(),
            pad_token: checkpoint.pad_token(),
            prediction: checkpoint.prediction(),
            vae_tiling: VaeTiling::default(),
        })
    }
}
