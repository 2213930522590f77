//! Model families: which networks a model has, and what its UNet is conditioned on. Adding a
//! family means a variant here, its detection (`detect.rs`, `folder.rs`) and its key map.

use std::fmt;

use crate::models::vae::VaeConfig;
use crate::{Error, Result};

/// A network of a model, by the job it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// The n-th text encoder (SDXL has two).
    TextEncoder(usize),
    /// The denoising UNet.
    Unet,
    /// The autoencoder between pixels and latents.
    Vae,
}

/// What a family's UNet takes besides the noisy latent and the timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetInputs {
    /// Text encoders whose hidden states make the cross-attention context (concatenated).
    pub text_encoders: usize,
    /// Whether the pooled text embedding and the size/crop ids go in as added conditions.
    pub pooled_text_and_size: bool,
    /// Latent channels concatenated to the noisy latent (inpainting's mask and masked image).
    pub extra_channels: usize,
}

/// Which Stable Diffusion a checkpoint belongs to, as far as its weights tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelFamily {
    /// SD 1.x: OpenAI CLIP, a 768-wide context.
    Sd1,
    /// SD 2.x: OpenCLIP, a 1024-wide context.
    Sd2,
    /// SD 1.x's inpainting UNet (9 input channels), which sdrs cannot run yet.
    Sd1Inpainting,
    /// SD 2.x's inpainting UNet (9 input channels), which sdrs cannot run yet.
    Sd2Inpainting,
    /// SDXL: two text encoders (OpenAI CLIP ViT-L and OpenCLIP ViT-bigG) make a 2048-wide
    /// context, and the pooled text and the image's size ids go into the UNet as well.
    Sdxl,
    /// Weights that match none of the above.
    Unknown,
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFamily::Sd1 => "SD 1.x",
            ModelFamily::Sd2 => "SD 2.x",
            ModelFamily::Sd1Inpainting => "SD 1.x inpainting",
            ModelFamily::Sd2Inpainting => "SD 2.x inpainting",
            ModelFamily::Sdxl => "SDXL",
            ModelFamily::Unknown => "an unknown model",
        })
    }
}

impl ModelFamily {
    /// The family of an SD UNet from its input channels and text-conditioning width.
    pub(crate) fn of_unet(in_channels: usize, context_dim: usize) -> Self {
        match (in_channels == 9, context_dim) {
            (_, 2048) => ModelFamily::Sdxl,
            (false, 1024) => ModelFamily::Sd2,
            (true, 1024) => ModelFamily::Sd2Inpainting,
            (false, _) => ModelFamily::Sd1,
            (true, _) => ModelFamily::Sd1Inpainting,
        }
    }

    /// The networks a model of this family is made of, in the order a run uses them.
    pub fn roles(self) -> Vec<Role> {
        let encoders = self.unet_inputs().text_encoders;
        let mut roles: Vec<Role> = (0..encoders).map(Role::TextEncoder).collect();
        roles.extend([Role::Unet, Role::Vae]);
        roles
    }

    /// What this family's UNet is conditioned on besides the noisy latent and the timestep.
    pub fn unet_inputs(self) -> UnetInputs {
        let text_only = UnetInputs {
            text_encoders: 1,
            pooled_text_and_size: false,
            extra_channels: 0,
        };
        match self {
            ModelFamily::Sd1 | ModelFamily::Sd2 | ModelFamily::Unknown => text_only,
            // The mask and the masked image's latent.
            ModelFamily::Sd1Inpainting | ModelFamily::Sd2Inpainting => UnetInputs {
                extra_channels: 5,
                ..text_only
            },
            ModelFamily::Sdxl => UnetInputs {
                text_encoders: 2,
                pooled_text_and_size: true,
                ..text_only
            },
        }
    }

    /// The VAE a checkpoint of this family has when its shapes say nothing more (SDXL's
    /// latents are scaled by 0.13025, SD's by 0.18215).
    pub(crate) fn vae_config(self) -> VaeConfig {
        match self {
            ModelFamily::Sdxl => VaeConfig {
                scaling_factor: 0.13025,
                ..VaeConfig::sd()
            },
            _ => VaeConfig::sd(),
        }
    }

    /// Refuses the families the pipeline cannot condition yet: the inpainting UNets' mask
    /// channels.
    pub(crate) fn ensure_supported(self) -> Result<Self> {
        if self.unet_inputs().extra_channels == 0 && self != ModelFamily::Unknown {
            return Ok(self);
        }
        Err(Error::UnsupportedCheckpoint {
            detected: self.to_string(),
        })
    }
}
