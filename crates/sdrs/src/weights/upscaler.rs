//! Upscaler files (ESRGAN, Real-ESRGAN): `.pth` torch zips and `.safetensors`, the network
//! recognised from tensor names and shapes, in the old ESRGAN or the BasicSR key layout.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::models::esrgan::{CompactConfig, EsrganConfig, RrdbConfig};
use crate::{Error, Result};

/// What the error for an unrecognised file lists.
const SUPPORTED: &str = "RRDBNet (ESRGAN, Real-ESRGAN x4plus / x2plus / anime_6B; old ESRGAN \
                         or BasicSR key layout) and SRVGGNetCompact with PReLU \
                         (realesr-animevideov3, realesr-general-x4v3)";

/// An opened upscaler: the detected network and its weights under BasicSR names.
pub struct UpscalerFile {
    config: EsrganConfig,
    layout: &'static str,
    tensors: HashMap<String, Tensor>,
}

impl UpscalerFile {
    /// Reads the whole file (upscalers are tens of MB at most) and recognises the network.
    pub fn open(path: &Path) -> Result<Self> {
        let stored = read_tensors(path)?;
        let stored: HashMap<String, Tensor> = stored
            .into_iter()
            .map(|(name, t)| match name.strip_prefix("module.") {
                Some(stripped) => (stripped.to_string(), t),
                None => (name, t),
            })
            .collect();
        let dims = |name: &str| stored.get(name).map(|t| t.dims().to_vec());
        let (config, layout, names) =
            if let Some(d) = detect_basicsr(&dims) {
                d
            } else if let Some(d) = detect_old_esrgan(&dims) {
                d
            } else if let Some(d) = detect_compact(&dims) {
                d
            } else {
                let mut sample: Vec<&str> = stored.keys().map(String::as_str).collect();
                sample.sort_unstable();
                sample.truncate(4);
                return Err(Error::UnsupportedCheckpoint {
                    detected: format!(
                    "no upscaler network (tensors such as {}); supported upscalers: {SUPPORTED}",
                    if sample.is_empty() { "none".to_string() } else { sample.join(", ") }
                ),
                });
            };
        let mut tensors = HashMap::with_capacity(names.len());
        let mut missing = Vec::new();
        for (canonical, in_file) in names {
            match stored.get(&in_file) {
                Some(t) => {
                    tensors.insert(canonical, t.clone());
                }
                None => missing.push(in_file),
            }
        }
        if !missing.is_empty() {
            return Err(Error::MissingTensors(missing));
        }
        Ok(Self {
            config,
            layout,
            tensors,
        })
    }

    /// The network the file holds.
    pub fn config(&self) -> &EsrganConfig {
        &self.config
    }

    /// The key layout the file uses: "BasicSR" or "old ESRGAN".
    pub fn layout(&self) -> &'static str {
        self.layout
    }

    /// The weights under BasicSR names, converted to `dtype` on `device` as they are asked for.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), dtype, device)
    }
}

/// BasicSR name → name in the file, for every tensor the network needs.
type Names = Vec<(String, String)>;
type Detected = (EsrganConfig, &'static str, Names);

fn detect_basicsr(dims: &impl Fn(&str) -> Option<Vec<usize>>) -> Option<Detected> {
    let first = dims("conv_first.weight")?;
    let grow = dims("body.0.rdb1.conv1.weight")?[0];
    let out_channels = dims("conv_last.weight")?[0];
    let num_block = count(|i| dims(&format!("body.{i}.rdb1.conv1.weight")).is_some());
    let upsamples = count(|i| dims(&format!("conv_up{}.weight", i + 1)).is_some());
    let config = rrdb_config(&first, out_channels, num_block, grow, upsamples)?;
    let names = rrdb_names(&config)
        .into_iter()
        .map(|n| (n.clone(), n))
        .collect();
    Some((EsrganConfig::Rrdb(config), "BasicSR", names))
}

/// ESRGAN's original `nn.Sequential` names: `model.0` conv_first, `model.1.sub.N` the blocks
/// and conv_body, then per upsampling (nearest, conv, LeakyReLU) `model.3`, `model.6`, ...,
/// then conv_hr and conv_last.
fn detect_old_esrgan(dims: &impl Fn(&str) -> Option<Vec<usize>>) -> Option<Detected> {
    let first = dims("model.0.weight")?;
    let grow = dims("model.1.sub.0.RDB1.conv1.0.weight")?[0];
    let num_block = count(|i| dims(&format!("model.1.sub.{i}.RDB1.conv1.0.weight")).is_some());
    let upsamples = count(|i| dims(&format!("model.{}.weight", 3 + 3 * i)).is_some());
    let last = 4 + 3 * upsamples;
    let out_channels = dims(&format!("model.{last}.weight"))?[0];
    let config = rrdb_config(&first, out_channels, num_block, grow, upsamples)?;
    let old_name = |name: &str| -> String {
        let (module, param) = name.rsplit_once('.').unwrap_or((name, ""));
        let old_module = match module {
            "conv_first" => "model.0".to_string(),
            "conv_body" => format!("model.1.sub.{num_block}"),
            "conv_hr" => format!("model.{}", 2 + 3 * upsamples),
            "conv_last" => format!("model.{last}"),
            m => match m.strip_prefix("conv_up") {
                Some(i) => format!("model.{}", 3 * i.parse::<usize>().unwrap_or(0)),
                // body.N.rdbK.convJ → model.1.sub.N.RDBK.convJ.0
                None => format!("model.1.sub.{}.0", m.strip_prefix("body.").unwrap_or(m))
                    .replace(".rdb", ".RDB"),
            },
        };
        format!("{old_module}.{param}")
    };
    let names = rrdb_names(&config)
        .into_iter()
        .map(|n| {
            let old = old_name(&n);
            (n, old)
        })
        .collect();
    Some((EsrganConfig::Rrdb(config), "old ESRGAN", names))
}

fn detect_compact(dims: &impl Fn(&str) -> Option<Vec<usize>>) -> Option<Detected> {
    let first = dims("body.0.weight")?;
    if first.len() != 4 || dims("body.1.weight")?.len() != 1 {
        return None;
    }
    let layers = count(|i| dims(&format!("body.{i}.weight")).is_some());
    // conv, PReLU, (conv, PReLU) × num_conv, conv: an odd number of layers, at least 3.
    if layers < 3 || layers % 2 == 0 {
        return None;
    }
    let last = dims(&format!("body.{}.weight", layers - 1))?;
    let out_channels = first[1];
    let upscale = exact_sqrt(last[0] / out_channels)?;
    if upscale * upscale * out_channels != last[0] {
        return None;
    }
    let config = CompactConfig {
        in_channels: first[1],
        out_channels,
        num_feat: first[0],
        num_conv: (layers - 3) / 2,
        upscale,
    };
    let names = (0..layers)
        .flat_map(|i| {
            let params: &[&str] = if i % 2 == 0 {
                &["weight", "bias"]
            } else {
                &["weight"]
            };
            params.iter().map(move |p| format!("body.{i}.{p}"))
        })
        .map(|n| (n.clone(), n))
        .collect();
    Some((EsrganConfig::Compact(config), "BasicSR", names))
}

fn rrdb_config(
    first: &[usize],
    out_channels: usize,
    num_block: usize,
    grow: usize,
    upsamples: usize,
) -> Option<RrdbConfig> {
    let (&num_feat, &first_in) = (first.first()?, first.get(1)?);
    // x2 / x1 models see a pixel-unshuffled input: 4 or 16 times the image channels.
    let unshuffle = exact_sqrt(first_in / out_channels.max(1))?;
    if unshuffle * unshuffle * out_channels != first_in
        || !matches!(unshuffle, 1 | 2 | 4)
        || num_block == 0
        || (1 << upsamples) < unshuffle
    {
        return None;
    }
    Some(RrdbConfig {
        in_channels: out_channels,
        out_channels,
        num_feat,
        num_block,
        num_grow_ch: grow,
        unshuffle,
        upsamples,
    })
}

/// Every parameter name RRDBNet asks for, BasicSR spelling.
fn rrdb_names(config: &RrdbConfig) -> Vec<String> {
    let mut modules = vec!["conv_first".to_string()];
    for b in 0..config.num_block {
        for d in 1..=3 {
            modules.extend((1..=5).map(|c| format!("body.{b}.rdb{d}.conv{c}")));
        }
    }
    modules.push("conv_body".into());
    modules.extend((1..=config.upsamples).map(|i| format!("conv_up{i}")));
    modules.push("conv_hr".into());
    modules.push("conv_last".into());
    modules
        .into_iter()
        .flat_map(|m| [format!("{m}.weight"), format!("{m}.bias")])
        .collect()
}

/// How many of `exists(0)`, `exists(1)`, ... hold before the first gap.
fn count(exists: impl Fn(usize) -> bool) -> usize {
    (0..).take_while(|&i| exists(i)).count()
}

fn exact_sqrt(n: usize) -> Option<usize> {
    (1..=n).take_while(|r| r * r <= n).find(|r| r * r == n)
}

/// The file's tensors, unwrapping Real-ESRGAN's `{"params_ema": ...}` / `{"params": ...}`.
fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let not_a_model = |reason: String| Error::NotACheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut head = Vec::with_capacity(16);
    File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|e| Error::io(path, e))?;
    if head.starts_with(b"PK\x03\x04") {
        let read = |key| candle_core::pickle::read_all_with_key(path, key);
        let tensors = read(Some("params_ema"))
            .or_else(|_| read(Some("params")))
            .or_else(|_| read(None))
            .map_err(|e| not_a_model(format!("unreadable torch zip: {e}")))?;
        if tensors.is_empty() {
            return Err(not_a_model("a zip archive without torch tensors".into()));
        }
        Ok(tensors)
    } else if head.starts_with(b"\x89PNG") || head.starts_with(b"\xff\xd8\xff") {
        Err(not_a_model("it is an image, not a network".into()))
    } else if head.first() == Some(&0x80) {
        Err(not_a_model(
            "an old-style (pre-zip) torch pickle; re-save it with a recent torch or convert it to safetensors".into(),
        ))
    } else if head.len() > 8 && head[8] == b'{' {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| not_a_model(format!("truncated or corrupt safetensors ({e})")))?;
        Ok(tensors.into_iter().collect())
    } else {
        Err(not_a_model(
            "neither safetensors nor a torch zip archive".into(),
        ))
    }
}
