//! Entry points for the fuzz targets, the hostile-file tests and the CRC measurement: the
//! readers on bytes in memory. Not part of the API.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::torch_zip::{Bytes, TorchZip};
use crate::Result;

/// What torch zips wrap a state dict in, as `Checkpoint::open` reads them.
const WRAPPERS: [&str; 1] = ["state_dict"];

/// Reads a torch zip checkpoint from `bytes` and loads every tensor; returns their count.
pub fn checkpoint(bytes: &[u8]) -> Result<usize> {
    checkpoint_tensors(bytes).map(|tensors| tensors.len())
}

/// Reads a torch zip checkpoint from `bytes`: every tensor by name, sorted.
pub fn checkpoint_tensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let zip = TorchZip::from_bytes(Bytes::Owned(bytes.to_vec()), &WRAPPERS)?;
    let mut names: Vec<&str> = zip.shapes().map(|(name, _)| name).collect();
    names.sort_unstable();
    names
        .into_iter()
        .map(|name| Ok((name.to_string(), zip.load(name, &Device::Cpu)?)))
        .collect()
}

/// Checks a safetensors file's header held in `bytes`; returns its tensor count.
pub fn safetensors_header(bytes: &[u8]) -> Result<usize> {
    super::safetensors_header::check_bytes(bytes)
}

/// Opens the torch zip at `path` and loads every tensor, with or without the CRC-32 check;
/// returns the bytes loaded.
pub fn load_checkpoint(path: &Path, verify_crc: bool) -> Result<usize> {
    let mut zip = TorchZip::open(path, &WRAPPERS)?;
    if !verify_crc {
        zip = zip.without_crc_check();
    }
    let names: Vec<String> = zip.shapes().map(|(name, _)| name.to_string()).collect();
    let mut bytes = 0;
    for name in names {
        let tensor = zip.load(&name, &Device::Cpu)?;
        bytes += tensor.elem_count() * tensor.dtype().size_in_bytes();
    }
    Ok(bytes)
}
