//! A model's networks, one per role its family has, and when each is in memory.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use candle_core::{DType, Device, Tensor};

use crate::lora::{network_of, Base, Network as LoraNetwork, Patches, Targets};
use crate::models::clip::ClipTextTransformer;
use crate::models::layers::Patch;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::models::ModelOptions;
use crate::weights::{release_pages, Checkpoint, Role};
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
    /// Kept open to build from (one network at a time) and to read a layer's weight back from
    /// when a LoRA stops changing it; its mapped pages are not resident once read.
    checkpoint: Checkpoint,
    residency: Residency,
    device: Device,
    fast: bool,
    slots: Vec<(Role, Slot)>,
    /// The LoRA changes merged into the weights (and into every network built from now on).
    patches: Mutex<Arc<Patches>>,
    /// The layers LoRAs can change, found the first time one is asked for.
    targets: OnceLock<Targets>,
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
            checkpoint: checkpoint.clone(),
            residency,
            patches: Mutex::new(Arc::new(Patches::default())),
            targets: OnceLock::new(),
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
        self.text_encoder_at(0)
    }

    /// Text encoder `index` (SDXL has two), built first if it is not resident.
    pub fn text_encoder_at(&self, index: usize) -> Result<Arc<ClipTextTransformer>> {
        let role = Role::TextEncoder(index);
        match self.turn(role)? {
            Network::TextEncoder(net) => Ok(net),
            _ => Err(misfiled(role)),
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
            Role::TextEncoder(i) => {
                let (config, projection) =
                    checkpoint
                        .text_encoder_config(i)
                        .ok_or(Error::UnsupportedCheckpoint {
                            detected: format!("a model without a {role:?} network"),
                        })?;
                let weights = checkpoint.text_encoder_at(i, DType::F32, device)?;
                Network::TextEncoder(Arc::new(match projection {
                    Some(width) => ClipTextTransformer::with_projection(weights, config, width)?,
                    None => ClipTextTransformer::new(weights, config)?,
                }))
            }
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
        if self.residency == Residency::All {
            // `All` never empties a slot; said plainly rather than panicking regardless.
            return Err(Error::InvalidConfig(
                "a network of a fully resident model is missing".into(),
            ));
        }
        for (other, other_slot) in &self.slots {
            if *other != role {
                lock(other_slot).take();
            }
        }
        let mut net = self.build(&self.checkpoint, role, true)?;
        let patches = lock_patches(&self.patches).clone();
        if let Some(network) = network_of(role) {
            let layers: HashSet<&str> = patches.layers(network).collect();
            if !layers.is_empty() {
                self.patch(&mut net, role, network, &layers, &patches)?;
            }
        }
        *lock(slot) = Some(net.clone());
        Ok(net)
    }

    /// The layers LoRAs can change in this model.
    pub(crate) fn targets(&self) -> &Targets {
        self.targets.get_or_init(|| Targets::of(&self.checkpoint))
    }

    /// The LoRA changes merged now.
    pub(crate) fn patches(&self) -> Arc<Patches> {
        lock_patches(&self.patches).clone()
    }

    /// Makes `patches` the LoRA changes in the weights. Only the layers this set or the last
    /// one changes are touched: each gets the checkpoint's weight back, plus this set's change
    /// if it has one, kept as the layer keeps weights (f32, f16, or packed again for the fast
    /// mode). Nothing happens when the set is the one merged. On an error every layer either
    /// set changes, in every network (those merged before the failure too), is given its
    /// checkpoint weight back, and no set is merged.
    pub(crate) fn set_patches(&self, patches: Arc<Patches>) -> Result<()> {
        let mut current = lock_patches(&self.patches);
        if current.same_as(&patches) {
            *current = patches;
            return Ok(());
        }
        if let Err(e) = self.merge_resident([&current, &patches], &patches) {
            // Best effort: a layer that cannot be read back keeps what it has.
            let none = Patches::default();
            let _ = self.merge_resident([&current, &patches], &none);
            *current = Arc::new(none);
            return Err(e);
        }
        *current = patches;
        Ok(())
    }

    /// Gives the layers `touched` change, in every resident network, their checkpoint weight
    /// plus `patches`' change. Every network is done even when one fails (so that putting the
    /// checkpoint's weights back reaches them all); the first error is returned.
    fn merge_resident(&self, touched: [&Patches; 2], patches: &Patches) -> Result<()> {
        let mut outcome = Ok(());
        for (role, slot) in &self.slots {
            let Some(network) = network_of(*role) else {
                continue;
            };
            let layers: HashSet<&str> = touched.iter().flat_map(|p| p.layers(network)).collect();
            if layers.is_empty() {
                continue;
            }
            // Taken out of its slot, so that the copy below happens only when a generation in
            // flight still holds the network, and the old weights are freed layer by layer.
            let Some(mut net) = lock(slot).take() else {
                continue;
            };
            let result = self.patch(&mut net, *role, network, &layers, patches);
            // Stored even half-patched: the caller puts the checkpoint's weights back.
            *lock(slot) = Some(net);
            if let (Err(e), true) = (result, outcome.is_ok()) {
                outcome = Err(e);
            }
        }
        outcome
    }

    /// Gives each of `layers` of `net` its checkpoint weight plus the change `patches` has for
    /// it. A network another caller still holds is copied first (its tensors are shared, so
    /// only the changed layers take new memory), so a generation in flight keeps its weights.
    fn patch(
        &self,
        net: &mut Network,
        role: Role,
        network: LoraNetwork,
        layers: &HashSet<&str>,
        patches: &Patches,
    ) -> Result<()> {
        let base = self.checkpoint.weights(role, DType::F32, &self.device)?;
        let mut visit = |name: &str, mut layer: crate::models::layers::Patchable<'_>| {
            if !layers.contains(name) {
                return Ok(());
            }
            let shape = layer.shape()?;
            let bias_name = format!("{name}.bias");
            let has_bias = base.contains_tensor(&bias_name);
            if self.device.is_cpu() {
                let weight_name = format!("{name}.weight");
                let merged = match self.checkpoint.stored_bytes(role, &weight_name) {
                    Some((dtype, bytes)) => {
                        let merged = patches.merged_weight(
                            network,
                            name,
                            Base::Bytes(dtype, bytes),
                            &shape,
                            layer.layout(),
                        );
                        release_pages(bytes);
                        merged?
                    }
                    None => None,
                };
                let merged = match merged {
                    Some(m) => Some(m),
                    None => {
                        let stored = self.checkpoint.stored(role, &weight_name)?;
                        let base = Base::Tensor(&stored);
                        patches.merged_weight(network, name, base, &shape, layer.layout())?
                    }
                };
                if let Some(weight) = merged {
                    let bias = if has_bias {
                        let stored = self.checkpoint.stored(role, &bias_name)?;
                        Some(patches.merged_bias(network, name, stored)?)
                    } else {
                        patches.refuse_bias(network, name)?;
                        None
                    };
                    return layer.set_stored(&weight, bias.as_ref());
                }
            }
            let weight = base.get(shape.as_slice(), &format!("{name}.weight"))?;
            let bias = if has_bias {
                Some(base.get(shape[0], &bias_name)?)
            } else {
                None
            };
            let (dw, db) = patches.delta(network, name, &shape, bias.as_ref().map(|_| shape[0]))?;
            let plus = |t: Tensor, d: Option<Tensor>| -> Result<Tensor> {
                Ok(match d {
                    Some(d) => (t + d.to_device(&self.device)?)?,
                    None => t,
                })
            };
            let weight = plus(weight, dw)?;
            let bias = bias.map(|b| plus(b, db)).transpose()?;
            layer.set(&weight, bias.as_ref())
        };
        match net {
            Network::TextEncoder(arc) => Arc::make_mut(arc).patch_each("", &mut visit),
            Network::Unet(arc) => Arc::make_mut(arc).patch_each("", &mut visit),
            Network::Vae(_) => Ok(()),
        }
    }
}

fn lock_patches(patches: &Mutex<Arc<Patches>>) -> MutexGuard<'_, Arc<Patches>> {
    // Replaced whole under the lock: a panic leaves the old set or the new one.
    patches.lock().unwrap_or_else(|e| e.into_inner())
}

/// A slot holding another role's network: a bug, said plainly rather than panicking.
fn misfiled(role: Role) -> Error {
    Error::InvalidConfig(format!("the {role:?} slot holds another network"))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::path::PathBuf;

    use super::*;
    use crate::lora::{resolve, LoraLibrary, LoraTag};
    use crate::models::layers::Stored;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn open() -> Checkpoint {
        Checkpoint::open(&fixtures().join("tiny-sd1.safetensors")).expect("tiny model")
    }

    fn patches(networks: &Networks, tags: &[(&str, f32)]) -> Arc<Patches> {
        let library = LoraLibrary::new(Some(fixtures().join("lora")));
        let tags: Vec<LoraTag> = tags
            .iter()
            .map(|(name, m)| LoraTag {
                name: name.to_string(),
                te: *m,
                unet: *m,
                dyn_dim: None,
            })
            .collect();
        let p = resolve(&library, networks.targets(), &tags, &BTreeMap::new()).expect("resolve");
        Arc::new(p)
    }

    /// Every changeable layer of the text encoder (`te/…`) or the UNet (`unet/…`), as
    /// stored, by name.
    fn stored(networks: &Networks, unet: bool) -> HashMap<String, Stored> {
        if unet {
            stored_of(networks, Role::Unet, "unet/")
        } else {
            stored_of(networks, Role::TextEncoder(0), "te/")
        }
    }

    /// Every changeable layer of the network of `role`, as stored, by `prefix` and name.
    fn stored_of(networks: &Networks, role: Role, prefix: &str) -> HashMap<String, Stored> {
        let mut out = HashMap::new();
        let mut keep = |name: &str, layer: crate::models::layers::Patchable<'_>| {
            out.insert(format!("{prefix}{name}"), layer.stored()?);
            Ok(())
        };
        match role {
            Role::Unet => (*networks.unet().expect("unet"))
                .clone()
                .patch_each("", &mut keep),
            Role::TextEncoder(i) => (*networks.text_encoder_at(i).expect("te"))
                .clone()
                .patch_each("", &mut keep),
            Role::Vae => Ok(()),
        }
        .expect("visit");
        out
    }

    /// Merging changes layers of both networks; merging another set and then none gives back
    /// every weight bit for bit, in every way the weights are kept.
    fn merge_and_restore(options: NetworkOptions) {
        let checkpoint = open();
        let networks = Networks::load(&checkpoint, &Device::Cpu, options).expect("load");
        let (te0, unet0) = (stored(&networks, false), stored(&networks, true));
        networks
            .set_patches(patches(&networks, &[("kohya_locon", 1.0)]))
            .expect("merge");
        let (te1, unet1) = (stored(&networks, false), stored(&networks, true));
        let changed = unet1.iter().filter(|(k, v)| unet0[*k] != **v).count();
        let te_changed = te1.iter().filter(|(k, v)| te0[*k] != **v).count();
        assert!(changed > 100 && te_changed > 10, "{changed} {te_changed}");
        networks
            .set_patches(patches(&networks, &[("loha", 0.5), ("lokr", 1.0)]))
            .expect("switch");
        networks
            .set_patches(Arc::new(Patches::default()))
            .expect("remove");
        assert!(stored(&networks, false) == te0, "text encoder restored");
        assert!(stored(&networks, true) == unet0, "UNet restored");
    }

    #[test]
    fn exact_weights_come_back_bit_for_bit() {
        merge_and_restore(NetworkOptions::default());
    }

    #[test]
    fn half_weights_built_in_turn_come_back_and_get_the_merge_when_built() {
        let options = NetworkOptions {
            residency: Residency::OneAtATime,
            fast: false,
        };
        merge_and_restore(options);
        // A network built after the merge gets it: the same as merging into a resident one.
        let checkpoint = open();
        let networks = Networks::load(&checkpoint, &Device::Cpu, options).expect("load");
        networks.unet().expect("unet");
        networks
            .set_patches(patches(&networks, &[("kohya_locon", 0.7)]))
            .expect("merge");
        let merged_resident = stored(&networks, true);
        networks.vae().expect("vae, which drops the UNet");
        assert!(stored(&networks, true) == merged_resident);
    }

    #[test]
    fn fast_mode_panels_come_back_bit_for_bit() {
        if !crate::ops::bf16::available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        merge_and_restore(NetworkOptions {
            residency: Residency::All,
            fast: true,
        });
    }

    #[test]
    fn merged_weights_equal_the_references() {
        let checkpoint = open();
        let networks =
            Networks::load(&checkpoint, &Device::Cpu, NetworkOptions::default()).expect("load");
        let reference = candle_core::safetensors::load(
            fixtures().join("reference/lora_weights.safetensors"),
            &Device::Cpu,
        )
        .expect("reference");
        for case in ["kohya_locon", "loha", "loha_tucker", "lokr", "full_diff"] {
            networks
                .set_patches(patches(&networks, &[(case, 1.0)]))
                .expect("merge");
            let mut merged = stored(&networks, true);
            merged.extend(stored(&networks, false));
            let mut compared = 0;
            for (key, want) in &reference {
                let Some(name) = key.strip_prefix(&format!("{case}/")) else {
                    continue;
                };
                let (ours, field) = match name.strip_prefix("text_model.") {
                    Some(te) => (format!("te/{te}"), te),
                    None => (format!("unet/{name}"), name),
                };
                let (layer, is_bias) =
                    match (ours.strip_suffix(".weight"), ours.strip_suffix(".bias")) {
                        (Some(l), _) => (l.to_string(), false),
                        (None, Some(l)) => (l.to_string(), true),
                        _ => panic!("{field}"),
                    };
                let Some(Stored::Values(_, w, b)) = merged.get(&layer) else {
                    panic!("{case}: no layer {layer}");
                };
                let got = if is_bias {
                    &b.as_ref().expect("bias").1
                } else {
                    w
                };
                let mut want = want.to_dtype(DType::F32).unwrap();
                if !is_bias && want.rank() == 4 {
                    // Our convolutions keep [out, kh, kw, in].
                    want = want.permute((0, 2, 3, 1)).unwrap();
                }
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (f32::from_bits(*g) - w).abs() / w.abs().max(1e-3))
                    .fold(0f32, f32::max);
                assert_eq!(got.len(), want.len(), "{key}");
                assert!(worst < 1e-5, "{key}: relative error {worst}");
                compared += 1;
            }
            assert!(compared > 0, "{case}: no reference weights");
        }
    }

    #[test]
    fn sdxl_merges_into_both_text_encoders_and_the_unet_as_the_reference_does() {
        let checkpoint = Checkpoint::open(&fixtures().join("tiny-sdxl")).expect("tiny SDXL");
        let networks =
            Networks::load(&checkpoint, &Device::Cpu, NetworkOptions::default()).expect("load");
        let library = LoraLibrary::new(Some(fixtures().join("lora-sdxl")));
        let tag = LoraTag {
            name: "sdxl_kohya".into(),
            te: 1.0,
            unet: 1.0,
            dyn_dim: None,
        };
        let patches =
            resolve(&library, networks.targets(), &[tag], &BTreeMap::new()).expect("resolve");
        networks.set_patches(Arc::new(patches)).expect("merge");
        let mut merged = stored_of(&networks, Role::TextEncoder(0), "te1/");
        merged.extend(stored_of(&networks, Role::TextEncoder(1), "te2/"));
        merged.extend(stored_of(&networks, Role::Unet, "unet/"));
        let reference = candle_core::safetensors::load(
            fixtures().join("reference/lora_sdxl_weights.safetensors"),
            &Device::Cpu,
        )
        .expect("reference");
        let mut per_network = HashMap::new();
        for (key, want) in &reference {
            let layer = key.strip_suffix(".weight").expect("weights only");
            let Some(Stored::Values(_, got, _)) = merged.get(layer) else {
                panic!("no layer {layer}");
            };
            let mut want = want.to_dtype(DType::F32).unwrap();
            if want.rank() == 4 {
                want = want.permute((0, 2, 3, 1)).unwrap();
            }
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), want.len(), "{key}");
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (f32::from_bits(*g) - w).abs() / w.abs().max(1e-3))
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{key}: relative error {worst}");
            *per_network
                .entry(key.split('/').next().unwrap())
                .or_insert(0) += 1;
        }
        assert_eq!(per_network["te1"], 18);
        assert_eq!(per_network["te2"], 18);
        assert_eq!(per_network["unet"], 31);
    }
}
