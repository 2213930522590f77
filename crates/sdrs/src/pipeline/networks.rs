//! A model's networks, one per role its family has, and when each is in memory.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device};

use crate::models::clip::ClipTextTransformer;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::models::ModelOptions;
use crate::weights::{Checkpoint, Role};
use crate::{Error, Result};

/// How a model's networks are kept in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Residency {
    /// Every network resident in float32 from load on: nothing is built twice.
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
    /// Which networks stay in memory.
    pub residency: Residency,
    /// The UNet's and the VAE's products in bf16 (`--fast`, see [`ModelOptions::fast`]).
    pub fast: bool,
}

/// A built network of one [`Role`].
#[derive(Clone)]
enum Network {
    TextEncoder(Arc<ClipTextTransformer>),
    Unet(Arc<UNet2DConditionModel>),
    Vae(Arc<AutoencoderKL>),
}

type Slot = Mutex<Option<Network>>;

/// A model's networks, one slot per role its family has, resident or built on demand as a
/// [`Residency`] says.
pub struct Networks {
    /// Present exactly when one network at a time is resident: kept open to build from (its
    /// mapped pages are not resident once a build has copied them).
    checkpoint: Option<Checkpoint>,
    device: Device,
    fast: bool,
    slots: Vec<(Role, Slot)>,
}

fn lock(slot: &Slot) -> MutexGuard<'_, Option<Network>> {
    // A panic while a slot was held leaves it either empty or filled, both valid states.
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

impl Networks {
    /// Builds what the residency keeps from the start: every network of the checkpoint's
    /// family for [`Residency::All`], nothing for [`Residency::OneAtATime`], which keeps
    /// `checkpoint` open to build from.
    pub fn load(checkpoint: &Checkpoint, device: &Device, options: NetworkOptions) -> Result<Self> {
        let residency = options.residency;
        let networks = Self {
            checkpoint: match residency {
                Residency::All => None,
                Residency::OneAtATime => Some(checkpoint.clone()),
            },
            device: device.clone(),
            fast: options.fast,
            slots: checkpoint
                .family()
                .roles()
                .into_iter()
                .map(|role| (role, Mutex::new(None)))
                .collect(),
        };
        if residency == Residency::All {
            for (role, slot) in &networks.slots {
                *lock(slot) = Some(networks.build(checkpoint, *role, false)?);
            }
        }
        Ok(networks)
    }

    /// The (first) text encoder, built first if it is not resident.
    pub fn text_encoder(&self) -> Result<Arc<ClipTextTransformer>> {
        match self.turn(Role::TextEncoder(0))? {
            Network::TextEncoder(net) => Ok(net),
            _ => Err(misfiled(Role::TextEncoder(0))),
        }
    }

    /// The UNet, built first if it is not resident.
    pub fn unet(&self) -> Result<Arc<UNet2DConditionModel>> {
        match self.turn(Role::Unet)? {
            Network::Unet(net) => Ok(net),
            _ => Err(misfiled(Role::Unet)),
        }
    }

    /// The VAE, built first if it is not resident.
    pub fn vae(&self) -> Result<Arc<AutoencoderKL>> {
        match self.turn(Role::Vae)? {
            Network::Vae(net) => Ok(net),
            _ => Err(misfiled(Role::Vae)),
        }
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

    /// Builds the network of `role` from `checkpoint`; `half` as in [`Networks::options`].
    fn build(&self, checkpoint: &Checkpoint, role: Role, half: bool) -> Result<Network> {
        let device = &self.device;
        Ok(match role {
            Role::TextEncoder(0) => Network::TextEncoder(Arc::new(ClipTextTransformer::new(
                checkpoint.text_encoder(DType::F32, device)?,
                checkpoint.clip_config(),
            )?)),
            Role::Unet => Network::Unet(Arc::new(UNet2DConditionModel::new_with(
                checkpoint.unet(DType::F32, device)?,
                checkpoint.unet_config(),
                self.options(half),
            )?)),
            Role::Vae => Network::Vae(Arc::new(AutoencoderKL::new_with(
                checkpoint.vae(DType::F32, device)?,
                checkpoint.vae_config(),
                self.options(half),
            )?)),
            other => {
                return Err(Error::UnsupportedCheckpoint {
                    detected: format!("a model with a {other:?} network"),
                })
            }
        })
    }

    /// The network of `role`; with one network at a time, the others are dropped first (their
    /// memory is freed once no caller holds them) and this one is built if absent.
    fn turn(&self, role: Role) -> Result<Network> {
        let Some((_, slot)) = self.slots.iter().find(|(r, _)| *r == role) else {
            return Err(Error::UnsupportedCheckpoint {
                detected: format!("a model without a {role:?} network"),
            });
        };
        if let Some(net) = lock(slot).as_ref() {
            return Ok(net.clone());
        }
        let Some(checkpoint) = &self.checkpoint else {
            // `All` never empties a slot; said plainly rather than panicking regardless.
            return Err(Error::InvalidConfig(
                "a network of a fully resident model is missing".into(),
            ));
        };
        for (other, other_slot) in &self.slots {
            if *other != role {
                lock(other_slot).take();
            }
        }
        let net = self.build(checkpoint, role, true)?;
        *lock(slot) = Some(net.clone());
        Ok(net)
    }
}

/// A slot holding another role's network: a bug, said plainly rather than panicking.
fn misfiled(role: Role) -> Error {
    Error::InvalidConfig(format!("the {role:?} slot holds another network"))
}
