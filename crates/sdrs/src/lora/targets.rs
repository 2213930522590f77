//! Which model layer a LoRA layer changes: every name a trainer may give a layer (kohya's flat
//! diffusers or CompVis paths, PEFT's and diffusers' dotted paths, with or without
//! `text_model`) mapped to the model's own name and weight shape.

use std::collections::HashMap;

use super::file::{LayerKey, Network};
use crate::weights::{Checkpoint, Role};

/// A layer of the model a LoRA can change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The layer's name in its network's weights, without `.weight`.
    pub layer: String,
    /// Its weight's shape as stored: `[out, in]` or `[out, in, k, k]`.
    pub shape: Vec<usize>,
}

/// The network a role's layers are named under in LoRA files.
pub(crate) fn network_of(role: Role) -> Option<Network> {
    match role {
        Role::TextEncoder(n) => Some(Network::TextEncoder(n)),
        Role::Unet => Some(Network::Unet),
        _ => None,
    }
}

/// Every alias of every changeable layer of one checkpoint.
#[derive(Debug, Default)]
pub(crate) struct Targets {
    map: HashMap<LayerKey, Target>,
}

fn flat(name: &str) -> String {
    name.replace('.', "_")
}

impl Targets {
    /// The layers of `checkpoint`'s text encoder and UNet whose weight is a matrix or a
    /// kernel: linear layers and convolutions (not the token and position embeddings).
    pub(crate) fn of(checkpoint: &Checkpoint) -> Self {
        let mut map = HashMap::new();
        let mut add = |network, alias: String, target: &Target| {
            map.entry(LayerKey {
                network,
                flat: alias,
            })
            .or_insert_with(|| target.clone());
        };
        let layers = |role| {
            checkpoint
                .shapes(role)
                .into_iter()
                .filter(|(name, shape)| {
                    // SDXL's text projection is not a layer LoRAs train (nor one merged).
                    matches!(shape.len(), 2 | 4)
                        && !name.starts_with("embeddings.")
                        && name != "text_projection.weight"
                })
                .filter_map(|(name, shape)| {
                    let layer = name.strip_suffix(".weight")?.to_string();
                    Some(Target { layer, shape })
                })
                .collect::<Vec<_>>()
        };
        let encoders = checkpoint.family().unet_inputs().text_encoders;
        for n in 0..encoders {
            for target in layers(Role::TextEncoder(n)) {
                let f = flat(&target.layer);
                add(Network::TextEncoder(n), format!("text_model_{f}"), &target);
                add(Network::TextEncoder(n), f, &target);
            }
        }
        let unet = layers(Role::Unet);
        let compvis: HashMap<String, String> = checkpoint.unet_names().into_iter().collect();
        for target in unet {
            add(Network::Unet, flat(&target.layer), &target);
            if let Some(c) = compvis
                .get(&format!("{}.weight", target.layer))
                .and_then(|c| c.strip_suffix(".weight"))
            {
                add(Network::Unet, flat(c), &target);
            }
        }
        Self { map }
    }

    /// The model layer a LoRA layer changes.
    pub(crate) fn get(&self, key: &LayerKey) -> Option<&Target> {
        self.map.get(key)
    }
}
