//! The three networks of a model, and when each is in memory.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device};

use crate::models::clip::ClipTextTransformer;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::models::ModelOptions;
use crate::weights::Checkpoint;
use crate::Result;

/// How a model's networks are kept in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Residency {
    /// All three resident in float32 from load on: nothing is built twice.
    #[default]
    All,
    /// Only the network in use is resident (optimizedSD's scheme, `--lowmem`): each is built
    /// from the checkpoint when its turn comes and dropped when another's comes, the UNet's and
    /// the VAE's weights kept in half precision and widened layer by layer.
    OneAtATime,
}

/// How a model's networks are kept and what arithmetic they run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkOptions {
    pub residency: Residency,
    /// The UNet's and the VAE's products in bf16 (`--fast`, see [`ModelOptions::fast`]).
    pub fast: bool,
}

type Slot<T> = Mutex<Option<Arc<T>>>;

/// The text encoder, UNet and VAE, resident or built on demand as a [`Residency`] says.
pub struct Networks {
    /// Present exactly when one network at a time is resident: kept open to build from (its
    /// mapped pages are not resident once a build has copied them).
    checkpoint: Option<Checkpoint>,
    device: Device,
    fast: bool,
    text_encoder: Slot<ClipTextTransformer>,
    unet: Slot<UNet2DConditionModel>,
    vae: Slot<AutoencoderKL>,
}

fn lock<T>(slot: &Slot<T>) -> MutexGuard<'_, Option<Arc<T>>> {
    // A panic while a slot was held leaves it either empty or filled, both valid states.
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

impl Networks {
    /// Builds what the residency keeps from the start: everything for [`Residency::All`],
    /// nothing for [`Residency::OneAtATime`], which keeps `checkpoint` open to build from.
    pub fn load(checkpoint: &Checkpoint, device: &Device, options: NetworkOptions) -> Result<Self> {
        let residency = options.residency;
        let networks = Self {
            checkpoint: match residency {
                Residency::All => None,
                Residency::OneAtATime => Some(checkpoint.clone()),
            },
            device: device.clone(),
            fast: options.fast,
            text_encoder: Mutex::new(None),
            unet: Mutex::new(None),
            vae: Mutex::new(None),
        };
        if residency == Residency::All {
            *lock(&networks.text_encoder) = Some(Arc::new(build_text_encoder(checkpoint, device)?));
            *lock(&networks.unet) = Some(Arc::new(build_unet(
                checkpoint,
                device,
                networks.options(false),
            )?));
            *lock(&networks.vae) = Some(Arc::new(build_vae(
                checkpoint,
                device,
                networks.options(false),
            )?));
        }
        Ok(networks)
    }

    /// The text encoder, built first if it is not resident.
    pub fn text_encoder(&self) -> Result<Arc<ClipTextTransformer>> {
        self.turn(Net::TextEncoder, &self.text_encoder, build_text_encoder)
    }

    /// The UNet, built first if it is not resident.
    pub fn unet(&self) -> Result<Arc<UNet2DConditionModel>> {
        self.turn(Net::Unet, &self.unet, |c, d| {
            build_unet(c, d, self.options(true))
        })
    }

    /// The VAE, built first if it is not resident.
    pub fn vae(&self) -> Result<Arc<AutoencoderKL>> {
        self.turn(Net::Vae, &self.vae, |c, d| {
            build_vae(c, d, self.options(true))
        })
    }

    /// Whether the fast mode's bf16 products are in use (asked for, and this CPU has them).
    pub fn fast(&self) -> bool {
        self.options(false).fast_on(&self.device)
    }

    /// How the UNet and the VAE are built; `half` when built in turn (one at a time).
    fn options(&self, half: bool) -> ModelOptions {
        ModelOptions {
            half_weights: half,
            fast: self.fast,
        }
    }

    /// `slot`'s network; with one network at a time, the others are dropped first (their
    /// memory is freed once no caller holds them) and this one is built if absent.
    fn turn<T>(
        &self,
        which: Net,
        slot: &Slot<T>,
        build: impl FnOnce(&Checkpoint, &Device) -> Result<T>,
    ) -> Result<Arc<T>> {
        if let Some(net) = lock(slot).as_ref() {
            return Ok(net.clone());
        }
        let Some(checkpoint) = &self.checkpoint else {
            // `All` never empties a slot; said plainly rather than panicking regardless.
            return Err(crate::Error::InvalidConfig(
                "a network of a fully resident model is missing".into(),
            ));
        };
        if which != Net::TextEncoder {
            lock(&self.text_encoder).take();
        }
        if which != Net::Unet {
            lock(&self.unet).take();
        }
        if which != Net::Vae {
            lock(&self.vae).take();
        }
        let net = Arc::new(build(checkpoint, &self.device)?);
        *lock(slot) = Some(net.clone());
        Ok(net)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Net {
    TextEncoder,
    Unet,
    Vae,
}

fn build_text_encoder(checkpoint: &Checkpoint, device: &Device) -> Result<ClipTextTransformer> {
    ClipTextTransformer::new(
        checkpoint.text_encoder(DType::F32, device)?,
        checkpoint.clip_config(),
    )
}

fn build_unet(
    checkpoint: &Checkpoint,
    device: &Device,
    options: ModelOptions,
) -> Result<UNet2DConditionModel> {
    UNet2DConditionModel::new_with(
        checkpoint.unet(DType::F32, device)?,
        checkpoint.unet_config(),
        options,
    )
}

fn build_vae(
    checkpoint: &Checkpoint,
    device: &Device,
    options: ModelOptions,
) -> Result<AutoencoderKL> {
    AutoencoderKL::new_with(
        checkpoint.vae(DType::F32, device)?,
        checkpoint.vae_config(),
        options,
    )
}
