//! Textual-inversion embedding files, in the three layouts A1111 and diffusers read: A1111's
//! `.pt` (`string_to_param: {'*': [n, width]}` beside `name`, `step`, `sd_checkpoint`,
//! `sd_checkpoint_name`), A1111's `.safetensors` (`emb_params: [n, width]`) and diffusers'
//! `learned_embeds.bin` / `.safetensors` (`{token: [width] or [n, width]}`), and A1111's SDXL
//! `.safetensors` (`clip_l: [n, 768]` and `clip_g: [n, 1280]`, kept side by side as one
//! `[n, 2048]` in the order of SDXL's encoders). Read through the same bounded readers as
//! checkpoints: nothing in a pickle is run.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::tensor_file::TensorFile;
use super::torch_pickle::Scalar;
use crate::limits::{MAX_CHANNELS, MAX_EMBEDDING_BYTES, MAX_EMBEDDING_VECTORS};

/// What one embedding file holds.
#[derive(Debug)]
pub(crate) struct EmbeddingFile {
    /// `[vectors, width]`, float32, on the CPU (SDXL's: CLIP-L's columns, then bigG's).
    pub vectors: Tensor,
    /// Training steps, when the file says (A1111's `.pt`).
    pub step: Option<i64>,
    /// The hash of the checkpoint it was trained on, when the file says.
    pub sd_checkpoint: Option<String>,
    /// The name of the checkpoint it was trained on, when the file says.
    pub sd_checkpoint_name: Option<String>,
}

/// Reads the embedding in `path`, or says in words why it is not one.
pub(crate) fn read(path: &Path) -> Result<EmbeddingFile, String> {
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size > MAX_EMBEDDING_BYTES {
        return Err(format!(
            "{size} bytes, over MAX_EMBEDDING_BYTES ({MAX_EMBEDDING_BYTES})"
        ));
    }
    let file = TensorFile::open_wrapped(path, &["string_to_param"]).map_err(|e| match e {
        crate::Error::NotACheckpoint { reason, .. } => reason,
        other => other.to_string(),
    })?;
    let mut names: Vec<&str> = file.names().collect();
    names.sort_unstable();
    let vectors = match names.as_slice() {
        [one] => matrix(&file, one)?,
        ["clip_g", "clip_l"] => {
            let (l, g) = (matrix(&file, "clip_l")?, matrix(&file, "clip_g")?);
            if l.dim(0).ok() != g.dim(0).ok() {
                return Err(format!(
                    "clip_l holds {:?} and clip_g {:?}: not the same number of vectors",
                    l.dims(),
                    g.dims()
                ));
            }
            Tensor::cat(&[&l, &g], 1).map_err(|e| e.to_string())?
        }
        _ => {
            return Err(format!(
                "{} tensors where an embedding file holds one (or SDXL's clip_l and clip_g)",
                names.len()
            ))
        }
    };
    let scalars = file.scalars();
    let text = |key: &str| {
        scalars.iter().find_map(|(k, v)| match v {
            Scalar::Str(s) if k == key => Some(s.clone()),
            _ => None,
        })
    };
    let step = scalars.iter().find_map(|(k, v)| match v {
        Scalar::Int(i) if k == "step" => Some(*i),
        _ => None,
    });
    Ok(EmbeddingFile {
        vectors,
        step,
        sd_checkpoint: text("sd_checkpoint"),
        sd_checkpoint_name: text("sd_checkpoint_name"),
    })
}

/// Tensor `name` of `file` as `[vectors, width]` float32, within the bounds.
fn matrix(file: &TensorFile, name: &str) -> Result<Tensor, String> {
    let shape = file.shape(name).unwrap_or(&[]);
    let (count, width) = match *shape {
        [width] => (1, width),
        [count, width] => (count, width),
        _ => return Err(format!("a tensor of shape {shape:?}, not [vectors, width]")),
    };
    if count == 0 || count > MAX_EMBEDDING_VECTORS {
        return Err(format!(
            "{count} vectors (an embedding has 1 to MAX_EMBEDDING_VECTORS = \
             {MAX_EMBEDDING_VECTORS}, as it must fit in one chunk)"
        ));
    }
    if width == 0 || width > MAX_CHANNELS {
        return Err(format!("vectors of width {width}"));
    }
    file.load(name, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32)?.reshape((count, width)))
        .map_err(|e| format!("reading tensor {name}: {e}"))
}
