//! A LoRA file read into its layers: every tensor name split into the layer it changes and its
//! part there, in any of the layouts trainers write (kohya, PEFT, older diffusers, LyCORIS).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::weights::TensorFile;
use crate::{Error, Result};

/// What one tensor is to the layer it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Part {
    Up,
    Down,
    Mid,
    Alpha,
    Scale,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
    Diff,
    DiffB,
}

impl Part {
    /// The part as kohya and LyCORIS name it, for errors.
    pub fn label(self) -> &'static str {
        match self {
            Part::Up => "lora_up",
            Part::Down => "lora_down",
            Part::Mid => "lora_mid",
            Part::Alpha => "alpha",
            Part::Scale => "scale",
            Part::HadaW1A => "hada_w1_a",
            Part::HadaW1B => "hada_w1_b",
            Part::HadaW2A => "hada_w2_a",
            Part::HadaW2B => "hada_w2_b",
            Part::HadaT1 => "hada_t1",
            Part::HadaT2 => "hada_t2",
            Part::LokrW1 => "lokr_w1",
            Part::LokrW1A => "lokr_w1_a",
            Part::LokrW1B => "lokr_w1_b",
            Part::LokrW2 => "lokr_w2",
            Part::LokrW2A => "lokr_w2_a",
            Part::LokrW2B => "lokr_w2_b",
            Part::LokrT2 => "lokr_t2",
            Part::Diff => "diff",
            Part::DiffB => "diff_b",
        }
    }
}

/// Name endings and the part they mark, longest first where one ends another.
const SUFFIXES: &[(&str, Part)] = &[
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".lora_mid.weight", Part::Mid),
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".down.weight", Part::Down),
    (".up.weight", Part::Up),
    (".alpha", Part::Alpha),
    (".scale", Part::Scale),
    (".hada_w1_a", Part::HadaW1A),
    (".hada_w1_b", Part::HadaW1B),
    (".hada_w2_a", Part::HadaW2A),
    (".hada_w2_b", Part::HadaW2B),
    (".hada_t1", Part::HadaT1),
    (".hada_t2", Part::HadaT2),
    (".lokr_w1_a", Part::LokrW1A),
    (".lokr_w1_b", Part::LokrW1B),
    (".lokr_w2_a", Part::LokrW2A),
    (".lokr_w2_b", Part::LokrW2B),
    (".lokr_w1", Part::LokrW1),
    (".lokr_w2", Part::LokrW2),
    (".lokr_t2", Part::LokrT2),
    (".diff", Part::Diff),
    (".diff_b", Part::DiffB),
];

/// Which network a layer belongs to, as the file's names say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Network {
    /// Text encoder n (SDXL's second is 1).
    TextEncoder(usize),
    Unet,
}

/// A layer's name in a LoRA file, reduced to its network and its path with every `.` as `_`
/// (kohya's flat form, which every other layout reduces to).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct LayerKey {
    pub network: Network,
    pub flat: String,
}

/// The tensors of one layer, by part.
pub(crate) type Parts = BTreeMap<Part, Tensor>;

/// A LoRA file's layers (tensors in f32 on the CPU), and the names it holds that are no layer
/// part sdrs knows.
pub(crate) struct LoraLayers {
    pub layers: BTreeMap<LayerKey, Parts>,
    /// Names that matched no layout, or a network sdrs does not have (SDXL's second encoder).
    pub unknown: Vec<String>,
}

/// The part a tensor name ends in, and the rest.
fn split_part(name: &str) -> Option<(&str, Part)> {
    SUFFIXES
        .iter()
        .find_map(|(suffix, part)| name.strip_suffix(suffix).map(|rest| (rest, *part)))
}

/// The older diffusers attention processors name `attn1.processor.to_q_lora`; the layer is
/// `attn1.to_q` (`to_out_lora` is `to_out.0`).
fn processor_layer(module: &str) -> Option<String> {
    let (attn, rest) = module.split_once(".processor.")?;
    let proj = rest.strip_suffix("_lora")?;
    let proj = if proj == "to_out" { "to_out.0" } else { proj };
    Some(format!("{attn}.{proj}"))
}

/// UNet layer paths as diffusers names them, at the root.
const UNET_ROOTS: [&str; 6] = [
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in",
    "conv_out",
    "time_embedding.",
];

/// The network and flat path of a module name in any known layout.
fn layer_key(module: &str) -> Option<LayerKey> {
    let module = processor_layer(module).unwrap_or_else(|| module.to_string());
    let key = |network, rest: &str| {
        Some(LayerKey {
            network,
            flat: rest.replace('.', "_"),
        })
    };
    if let Some(rest) = module.strip_prefix("lora_unet_") {
        return key(Network::Unet, rest);
    }
    // kohya: `lora_te_` for SD 1/2's one encoder, `lora_te1_` and `lora_te2_` for SDXL's two.
    for (prefix, n) in [("lora_te_", 0), ("lora_te1_", 0), ("lora_te2_", 1)] {
        if let Some(rest) = module.strip_prefix(prefix) {
            return key(Network::TextEncoder(n), rest);
        }
    }
    for prefix in ["unet.", "base_model.model."] {
        if let Some(rest) = module.strip_prefix(prefix) {
            return key(Network::Unet, rest);
        }
    }
    for (prefix, n) in [("text_encoder.", 0), ("text_encoder_2.", 1)] {
        if let Some(rest) = module.strip_prefix(prefix) {
            return key(Network::TextEncoder(n), rest);
        }
    }
    if module.starts_with("text_model.") {
        return key(Network::TextEncoder(0), &module);
    }
    if UNET_ROOTS.iter().any(|r| module.starts_with(r)) {
        return key(Network::Unet, &module);
    }
    None
}

/// Reads every tensor of the LoRA file at `path` (safetensors, or a torch zip through the
/// safe pickle reader) and groups them by layer.
pub(crate) fn read(path: &Path) -> Result<LoraLayers> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > crate::limits::MAX_LORA_BYTES {
        return Err(crate::limits::exceeded(
            format!("{}: the LoRA file's size in bytes", path.display()),
            len as usize,
            "MAX_LORA_BYTES",
            crate::limits::MAX_LORA_BYTES as usize,
        ));
    }
    let file = TensorFile::open(path)?;
    let mut names: Vec<&str> = file.names().collect();
    names.sort_unstable();
    let mut layers: BTreeMap<LayerKey, Parts> = BTreeMap::new();
    let mut unknown = Vec::new();
    for name in names {
        let Some((key, part)) =
            split_part(name).and_then(|(module, part)| Some((layer_key(module)?, part)))
        else {
            unknown.push(name.to_string());
            continue;
        };
        let tensor = file
            .load(name, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| Error::InvalidRequest(format!("{}: {name}: {e}", path.display())))?;
        // A NaN or an infinity merged into a weight spoils every image after it.
        if !all_finite(&tensor)? {
            return Err(Error::InvalidRequest(format!(
                "{}: {name} holds NaN or infinite values",
                path.display()
            )));
        }
        layers.entry(key).or_default().insert(part, tensor);
    }
    Ok(LoraLayers { layers, unknown })
}

/// Whether every value of `t` is a finite number (0 · x is 0 exactly for those, NaN for the
/// rest, and a NaN makes the sum NaN).
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    if t.elem_count() == 0 {
        return Ok(true);
    }
    let zeros = (t.to_dtype(DType::F32)? * 0.0)?.sum_all()?;
    Ok(zeros.to_scalar::<f32>()?.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Option<(LayerKey, Part)> {
        let (module, part) = split_part(name)?;
        Some((layer_key(module)?, part))
    }

    #[test]
    fn every_layout_reduces_to_the_flat_path() {
        let q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        let unet = |flat: &str| LayerKey {
            network: Network::Unet,
            flat: flat.into(),
        };
        for (name, part) in [
            (format!("lora_unet_{q}.lora_down.weight"), Part::Down),
            (format!("lora_unet_{q}.alpha"), Part::Alpha),
            (format!("lora_unet_{q}.hada_w1_a"), Part::HadaW1A),
            (format!("lora_unet_{q}.lokr_w1"), Part::LokrW1),
            (format!("lora_unet_{q}.lokr_w1_a"), Part::LokrW1A),
            (format!("unet.{}.lora_A.weight", q.replace('_', ".")), Part::Down),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight".into(),
                Part::Up,
            ),
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight"
                    .into(),
                Part::Up,
            ),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"
                    .into(),
                Part::Down,
            ),
        ] {
            let got = key(&name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(got.1, part, "{name}");
            // The PEFT form with every `_` turned to `.` flattens back to the same key.
            assert_eq!(got.0, unet(q), "{name}");
        }
        let out = key(
            "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight",
        )
        .unwrap();
        assert_eq!(
            out.0.flat,
            "mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
        );
        let te = key("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight")
            .unwrap();
        assert_eq!(te.0.network, Network::TextEncoder(0));
        assert_eq!(te.0.flat, "text_model_encoder_layers_0_self_attn_q_proj");
        // SDXL's second text encoder, in kohya's and diffusers' names.
        for name in [
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight",
        ] {
            let te2 = key(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(te2.0.network, Network::TextEncoder(1), "{name}");
            assert_eq!(te2.0.flat, "text_model_encoder_layers_0_self_attn_q_proj");
        }
        assert!(key("something.else").is_none());
    }
}
