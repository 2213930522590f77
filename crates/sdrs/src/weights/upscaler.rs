//! Upscaler files (ESRGAN, Real-ESRGAN): `.pth` torch zips and `.safetensors`, the network
//! recognised from tensor names and shapes, in the old ESRGAN or the BasicSR key layout.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::numbered::{consecutive, Limit};
use super::safetensors_header;
use super::tensor_file::with_path;
use super::torch_zip::TorchZip;
use crate::limits::{exceeded, MAX_CHANNELS, MAX_NETWORK_SCALE, MAX_UPSCALER_LAYERS};
use crate::models::esrgan::{CompactConfig, EsrganConfig, RrdbConfig};
use crate::{Error, Result};

/// What Real-ESRGAN wraps its weights in, preferred in this order.
const WRAPPERS: [&str; 2] = ["params_ema", "params"];
const LAYERS: Limit = ("MAX_UPSCALER_LAYERS", MAX_UPSCALER_LAYERS);

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
        let detected = detect_basicsr(&dims)
            .transpose()
            .or_else(|| detect_old_esrgan(&dims).transpose())
            .or_else(|| detect_compact(&dims).transpose())
            .transpose()
            .map_err(with_path(path))?;
        let (config, layout, names) =
            if let Some(d) = detected {
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

/// The first dimension of tensor `name`, bounded as a channel count.
fn channels(dims: &impl Fn(&str) -> Option<Vec<usize>>, name: &str) -> Result<Option<usize>> {
    let Some(&c) = dims(name).as_deref().and_then(<[usize]>::first) else {
        return Ok(None);
    };
    if c > MAX_CHANNELS {
        return Err(exceeded(
            format!("the channels of {name}"),
            c,
            "MAX_CHANNELS",
            MAX_CHANNELS,
        ));
    }
    Ok(Some(c))
}

/// How many upsampling stages `exists(i)` finds, bounded by [`MAX_NETWORK_SCALE`].
fn upsample_count(exists: impl Fn(usize) -> bool) -> Result<usize> {
    let doublings = MAX_NETWORK_SCALE.ilog2() as usize;
    consecutive(
        "upsampling stages",
        ("MAX_NETWORK_SCALE", doublings),
        exists,
    )
    .map_err(|_| {
        exceeded(
            "the upscaler's scale",
            format!("more than {MAX_NETWORK_SCALE}"),
            "MAX_NETWORK_SCALE",
            MAX_NETWORK_SCALE,
        )
    })
}

fn detect_basicsr(dims: &impl Fn(&str) -> Option<Vec<usize>>) -> Result<Option<Detected>> {
    let (Some(first), Some(grow), Some(out_channels)) = (
        dims("conv_first.weight"),
        channels(dims, "body.0.rdb1.conv1.weight")?,
        channels(dims, "conv_last.weight")?,
    ) else {
        return Ok(None);
    };
    let num_block = consecutive("RRDB blocks", LAYERS, |i| {
        dims(&format!("body.{i}.rdb1.conv1.weight")).is_some()
    })?;
    let upsamples = upsample_count(|i| dims(&format!("conv_up{}.weight", i + 1)).is_some())?;
    let Some(config) = rrdb_config(&first, out_channels, num_block, grow, upsamples)? else {
        return Ok(None);
    };
    let names = rrdb_names(&config)
        .into_iter()
        .map(|n| (n.clone(), n))
        .collect();
    Ok(Some((EsrganConfig::Rrdb(config), "BasicSR", names)))
}

/// ESRGAN's original `nn.Sequential` names: `model.0` conv_first, `model.1.sub.N` the blocks
/// and conv_body, then per upsampling (nearest, conv, LeakyReLU) `model.3`, `model.6`, ...,
/// then conv_hr and conv_last.
fn detect_old_esrgan(dims: &impl Fn(&str) -> Option<Vec<usize>>) -> Result<Option<Detected>> {
    let (Some(first), Some(grow)) = (
        dims("model.0.weight"),
        channels(dims, "model.1.sub.0.RDB1.conv1.0.weight")?,
    ) else {
        return Ok(None);
    };
    let num_block = consecutive("RRDB blocks", LAYERS, |i| {
        dims(&format!("model.1.sub.{i}.RDB1.conv1.0.weight")).is_some()
    })?;
    let upsamples = upsample_count(|i| dims(&format!("model.{}.weight", 3 + 3 * i)).is_some())?;
    let last = 4 + 3 * upsamples;
    let Some(out_channels) = channels(dims, &format!("model.{last}.weight"))? else {
        return Ok(None);
    };
    let Some(config) = rrdb_config(&first, out_channels, num_block, grow, upsamples)? else {
        return Ok(None);
    };
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
    Ok(Some((EsrganConfig::Rrdb(config), "old ESRGAN", names)))
}

fn detect_compact(dims: &impl Fn(&str) -> Option<Vec<usize>>) -> Result<Option<Detected>> {
    let (Some(first), Some(prelu)) = (dims("body.0.weight"), dims("body.1.weight")) else {
        return Ok(None);
    };
    if first.len() != 4 || prelu.len() != 1 {
        return Ok(None);
    }
    bounded_channels("body.0.weight", &first)?;
    let layers = consecutive("compact network layers", LAYERS, |i| {
        dims(&format!("body.{i}.weight")).is_some()
    })?;
    // conv, PReLU, (conv, PReLU) × num_conv, conv: an odd number of layers, at least 3.
    if layers < 3 || layers % 2 == 0 {
        return Ok(None);
    }
    let name = format!("body.{}.weight", layers - 1);
    let Some(last) = channels(dims, &name)? else {
        return Ok(None);
    };
    let out_channels = first[1];
    let Some(upscale) = last
        .checked_div(out_channels)
        .and_then(exact_sqrt)
        .filter(|&u| u * u * out_channels == last && u <= MAX_NETWORK_SCALE)
    else {
        return Ok(None);
    };
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
    Ok(Some((EsrganConfig::Compact(config), "BasicSR", names)))
}

/// Every dimension of a convolution's shape is a channel count or a kernel side.
fn bounded_channels(name: &str, shape: &[usize]) -> Result<()> {
    match shape.iter().max() {
        Some(&c) if c > MAX_CHANNELS => Err(exceeded(
            format!("the channels of {name}"),
            c,
            "MAX_CHANNELS",
            MAX_CHANNELS,
        )),
        _ => Ok(()),
    }
}

fn rrdb_config(
    first: &[usize],
    out_channels: usize,
    num_block: usize,
    grow: usize,
    upsamples: usize,
) -> Result<Option<RrdbConfig>> {
    let (Some(&num_feat), Some(&first_in)) = (first.first(), first.get(1)) else {
        return Ok(None);
    };
    bounded_channels("conv_first.weight", first)?;
    // x2 / x1 models see a pixel-unshuffled input: 4 or 16 times the image channels.
    let Some(unshuffle) = exact_sqrt(first_in / out_channels.max(1)) else {
        return Ok(None);
    };
    // `upsample_count` bounded `upsamples` so that the shift cannot overflow.
    if unshuffle * unshuffle * out_channels != first_in
        || !matches!(unshuffle, 1 | 2 | 4)
        || num_block == 0
        || (1 << upsamples) < unshuffle
    {
        return Ok(None);
    }
    Ok(Some(RrdbConfig {
        in_channels: out_channels,
        out_channels,
        num_feat,
        num_block,
        num_grow_ch: grow,
        unshuffle,
        upsamples,
    }))
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

/// The whole square root of `n`, if it has one (`n` is a bounded channel ratio).
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
        let zip = TorchZip::open(path, &WRAPPERS)?;
        let names: Vec<&str> = zip.shapes().map(|(name, _)| name).collect();
        names
            .into_iter()
            .map(|name| Ok((name.to_string(), zip.load(name, &Device::Cpu)?)))
            .collect::<Result<Vec<_>>>()
            .map_err(with_path(path))
    } else if head.starts_with(b"\x89PNG") || head.starts_with(b"\xff\xd8\xff") {
        Err(not_a_model("it is an image, not a network".into()))
    } else if head.first() == Some(&0x80) {
        Err(not_a_model(
            "an old-style (pre-zip) torch pickle; re-save it with a recent torch or convert it to safetensors".into(),
        ))
    } else if head.len() > 8 && head[8] == b'{' {
        safetensors_header::check_file(path)?;
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| not_a_model(format!("truncated or corrupt safetensors ({e})")))?;
        Ok(tensors.into_iter().collect())
    } else {
        Err(not_a_model(
            "neither safetensors nor a torch zip archive".into(),
        ))
    }
}
