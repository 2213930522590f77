//! LoRAs and their LyCORIS relatives, as A1111's built-in Lora extension applies them:
//! `<lora:NAME:MULT>` in a prompt merges `NAME`'s changes into the text encoder's and the
//! UNet's weights for that generation.
//!
//! - [`strip_tags`] takes the tags out of a prompt ([`LoraTag`]).
//! - [`LoraLibrary`] finds files by name in the LoRA folder and gives A1111's short hashes.
//! - Each file is read into layers in any of the layouts trainers write: kohya (`lora_unet_*`,
//!   `lora_te_*`, `.alpha`, convolutions included: LoCon), PEFT / diffusers (`lora_A`/`lora_B`
//!   under `unet.` and `text_encoder.`, the older `to_q_lora` processors), LyCORIS LoHa
//!   (`hada_*`, Tucker cores included) and LoKr (`lokr_*`, factored or whole), and full
//!   `diff` weights. Layer names may be diffusers' or CompVis', SD 1's or SD 2's.
//! - The changes are merged into the layer weights ([`Patches`], applied by the model's
//!   networks): merged once per set, removed exactly (each changed layer's weight is read
//!   again from the checkpoint), and no cost per step. ΔW = Σ multiplier · scale · change,
//!   where scale is the file's `scale`, else alpha / rank, else 1.

mod delta;
mod file;
#[doc(hidden)]
pub mod fuzzing;
mod library;
mod merge;
mod products;
mod tag;
mod targets;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use candle_core::Tensor;

pub use library::{LoraEntry, LoraLibrary};
pub use tag::{strip_tags, LoraTag, Stripped};

pub(crate) use file::{LayerKey, LoraLayers, Network};
pub(crate) use merge::{Base, Layout};
pub(crate) use targets::{network_of, Targets};

use crate::{Error, Result};

/// One LoRA's part in a layer's change.
pub(crate) struct Term {
    layers: Arc<LoraLayers>,
    key: LayerKey,
    multiplier: f32,
    dyn_dim: Option<usize>,
    /// The file, for errors.
    file: PathBuf,
}

/// What identifies a merged LoRA: the same file, unchanged, at the same multipliers.
#[derive(Debug, Clone, PartialEq)]
struct Used {
    path: PathBuf,
    modified: Option<SystemTime>,
    te: f32,
    unet: f32,
    dyn_dim: Option<usize>,
}

/// A set of LoRAs resolved against one model: the change of every layer they touch.
#[derive(Default)]
pub struct Patches {
    used: Vec<Used>,
    /// `(name as mentioned, short hash)`, for the infotext's `Lora hashes`.
    hashes: Vec<(String, String)>,
    terms: HashMap<(Network, String), Vec<Term>>,
}

impl Patches {
    /// Whether this set changes the same layers by the same amounts as `other`.
    pub(crate) fn same_as(&self, other: &Patches) -> bool {
        self.used == other.used
    }

    /// `(name, short hash)` of each LoRA, in prompt order, as A1111's `Lora hashes` lists
    /// them.
    pub fn hashes(&self) -> &[(String, String)] {
        &self.hashes
    }

    /// The layers of `network` this set changes.
    pub(crate) fn layers(&self, network: Network) -> impl Iterator<Item = &str> {
        self.terms
            .keys()
            .filter(move |(n, _)| *n == network)
            .map(|(_, layer)| layer.as_str())
    }

    /// The parts each LoRA of this set has for `layer` of `network`, with its multiplier,
    /// its `dyn` and what to say when they do not fit.
    #[allow(clippy::type_complexity)]
    pub(crate) fn parts_of(
        &self,
        network: Network,
        layer: &str,
    ) -> Result<
        Vec<(
            &file::Parts,
            f32,
            Option<usize>,
            Box<dyn Fn(Error) -> Error + '_>,
        )>,
    > {
        let Some(terms) = self.terms.get(&(network, layer.to_string())) else {
            return Ok(Vec::new());
        };
        terms
            .iter()
            .map(|term| {
                let parts = term.layers.layers.get(&term.key).ok_or_else(|| {
                    Error::InvalidRequest(format!("{}: a layer went missing", term.file.display()))
                })?;
                let layer = layer.to_string();
                let unfit: Box<dyn Fn(Error) -> Error + '_> = Box::new(move |e: Error| {
                    let why = match e {
                        Error::InvalidRequest(why) => why,
                        other => other.to_string(),
                    };
                    Error::InvalidRequest(format!(
                        "LoRA {} does not fit this model: at layer {layer} ({}), {why}",
                        term.file.display(),
                        term.key.flat
                    ))
                });
                Ok((parts, term.multiplier, term.dyn_dim, unfit))
            })
            .collect()
    }

    /// The error for a merged `what` ("weight", "bias") of `layer` that came out NaN or
    /// infinite: finite parts can still overflow f32 (a huge alpha, scale or multiplier), and
    /// such a value merged into a weight would spoil every image after it.
    pub(crate) fn not_finite(&self, network: Network, layer: &str, what: &str) -> Error {
        let files: Vec<String> = self
            .terms
            .get(&(network, layer.to_string()))
            .into_iter()
            .flatten()
            .map(|t| t.file.display().to_string())
            .collect();
        Error::InvalidRequest(format!(
            "LoRA {} would make the {what} of layer {layer} NaN or infinite (too large an \
             alpha, scale or multiplier)",
            files.join(", ")
        ))
    }

    /// Σ multiplier · ΔW of `layer` of `network`, shaped `shape`, in f32, and the same for
    /// its bias of `bias_len` values; `None` where this set leaves them alone.
    pub(crate) fn delta(
        &self,
        network: Network,
        layer: &str,
        shape: &[usize],
        bias_len: Option<usize>,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (mut weight, mut bias): (Option<Tensor>, Option<Tensor>) = (None, None);
        let add = |sum: &mut Option<Tensor>, d: Tensor, m: f32| -> Result<()> {
            let d = (d * m as f64)?;
            *sum = Some(match sum.take() {
                Some(s) => (s + d)?,
                None => d,
            });
            Ok(())
        };
        for (parts, multiplier, dyn_dim, unfit) in self.parts_of(network, layer)? {
            if let Some(d) = delta::delta(parts, shape, dyn_dim).map_err(&unfit)? {
                add(&mut weight, d, multiplier)?;
            }
            let b = match bias_len {
                Some(len) => delta::bias_delta(parts, len).map_err(&unfit)?,
                None if parts.contains_key(&file::Part::DiffB) => {
                    return Err(unfit(Error::InvalidRequest("the layer has no bias".into())))
                }
                None => None,
            };
            if let Some(b) = b {
                add(&mut bias, b, multiplier)?;
            }
        }
        for (sum, what) in [(&weight, "weight"), (&bias, "bias")] {
            if let Some(sum) = sum {
                if !file::all_finite(sum)? {
                    return Err(self.not_finite(network, layer, what));
                }
            }
        }
        Ok((weight, bias))
    }
}

/// Resolves `tags` (the prompt's and the negative prompt's) against the LoRA folder and the
/// model's layers. `hashes` are the infotext's `Lora hashes`, used for names the folder does
/// not have. A file that changes no layer of the model, or a layer of another shape, is an
/// error naming the file; names no layer has are a warning with their count.
pub(crate) fn resolve(
    library: &LoraLibrary,
    targets: &Targets,
    tags: &[LoraTag],
    hashes: &BTreeMap<String, String>,
) -> Result<Patches> {
    let mut patches = Patches::default();
    let mut kept = Vec::with_capacity(tags.len());
    for tag in tags {
        let entry = library.find(&tag.name, hashes.get(&tag.name).map(String::as_str))?;
        let layers = library.read(&entry)?;
        let hash = library.short_hash(&entry.path)?;
        let mut matched = 0usize;
        let mut unmatched = Vec::new();
        for (key, parts) in &layers.layers {
            let Some(target) = targets.get(key) else {
                unmatched.push(key.flat.clone());
                continue;
            };
            if delta::kind(parts).is_none() {
                unmatched.push(key.flat.clone());
                continue;
            }
            matched += 1;
            let multiplier = match key.network {
                Network::TextEncoder(_) => tag.te,
                Network::Unet => tag.unet,
            };
            if multiplier == 0.0 {
                continue;
            }
            patches
                .terms
                .entry((key.network, target.layer.clone()))
                .or_default()
                .push(Term {
                    layers: layers.clone(),
                    key: key.clone(),
                    multiplier,
                    dyn_dim: tag.dyn_dim,
                    file: entry.path.clone(),
                });
        }
        let unknown = unmatched.len() + layers.unknown.len();
        if matched == 0 {
            let example = unmatched.first().or(layers.unknown.first());
            return Err(Error::InvalidRequest(format!(
                "LoRA {} changes no layer of this model (made for another model family?{})",
                entry.path.display(),
                example.map_or(String::new(), |e| format!("; its first layer is {e}"))
            )));
        }
        if unknown > 0 {
            let example = unmatched.first().or(layers.unknown.first());
            tracing::warn!(
                "LoRA {}: {unknown} of its tensors match no layer of this model and are left out \
                 (for example {})",
                entry.path.display(),
                example.map_or("", String::as_str)
            );
        }
        patches.used.push(Used {
            path: entry.path.clone(),
            modified: std::fs::metadata(&entry.path)
                .and_then(|m| m.modified())
                .ok(),
            te: tag.te,
            unet: tag.unet,
            dyn_dim: tag.dyn_dim,
        });
        // A1111 takes ':' and ',' out of the name it writes.
        let name = tag.name.replace([':', ','], "");
        if !patches.hashes.iter().any(|(n, _)| *n == name) {
            patches.hashes.push((name, hash));
        }
        kept.push(entry.path);
    }
    library.keep_only(&kept.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    Ok(patches)
}
