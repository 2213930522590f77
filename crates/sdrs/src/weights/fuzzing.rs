//! Entry points for the fuzz targets, the hostile-file tests and the CRC measurement: the
//! readers on bytes in memory. Not part of the API.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::pickle::Pickle;
use super::torch_pickle;
use super::torch_zip::{self, Bytes, TorchZip};
use crate::Result;

/// The state-dict wrappers of SD checkpoints and Real-ESRGAN files together.
const WRAPPERS: [&str; 3] = ["state_dict", "params_ema", "params"];

/// Reads a torch zip checkpoint from `bytes` and loads every tensor; returns their count.
pub fn checkpoint(bytes: &[u8], verify_crc: bool) -> Result<usize> {
    checkpoint_tensors(bytes, verify_crc).map(|tensors| tensors.len())
}

/// Reads a torch zip checkpoint from `bytes`: every tensor by name, sorted.
pub fn checkpoint_tensors(bytes: &[u8], verify_crc: bool) -> Result<Vec<(String, Tensor)>> {
    let zip = TorchZip::from_bytes(Bytes::Owned(bytes.to_vec()), &WRAPPERS, verify_crc)?;
    load_all(&zip)
}

/// Runs a bare pickle (a `data.pkl`) and reads the tensor records of its state dict; returns
/// how many there are.
pub fn pickle(bytes: &[u8]) -> Result<usize> {
    let pickle = Pickle::parse(bytes)?;
    let mut records = 0;
    for &(_, value) in torch_pickle::state_dict(&pickle, &WRAPPERS)? {
        if let Ok(Some(_)) = torch_pickle::tensor_record(&pickle, value) {
            records += 1;
        }
    }
    Ok(records)
}

/// Checks a safetensors file's header held in `bytes`; returns its tensor count.
pub fn safetensors_header(bytes: &[u8]) -> Result<usize> {
    super::safetensors_header::check_bytes(bytes)
}

/// Maps the torch zip at `path` and loads every tensor, with or without the CRC-32 checks;
/// returns the bytes loaded.
pub fn load_checkpoint(path: &Path, verify_crc: bool) -> Result<usize> {
    let zip = TorchZip::from_bytes(torch_zip::map(path)?, &WRAPPERS, verify_crc)?;
    Ok(load_all(&zip)?
        .iter()
        .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
        .sum())
}

fn load_all(zip: &TorchZip) -> Result<Vec<(String, Tensor)>> {
    let mut names: Vec<&str> = zip.shapes().map(|(name, _)| name).collect();
    names.sort_unstable();
    names
        .into_iter()
        .map(|name| Ok((name.to_string(), zip.load(name, &Device::Cpu)?)))
        .collect()
}
