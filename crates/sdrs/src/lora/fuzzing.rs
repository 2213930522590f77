//! Entry points for the `lora` fuzz target and the hostile-file tests: the LoRA reader on a
//! file, and the layer change rebuilt from parts of any shape. Not part of the API.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::delta;
use super::file::{self, Part, Parts};
use crate::Result;

/// Every part, in the order [`delta_of_shapes`] numbers them.
const PARTS: [Part; 20] = [
    Part::Up,
    Part::Down,
    Part::Mid,
    Part::Alpha,
    Part::Scale,
    Part::HadaW1A,
    Part::HadaW1B,
    Part::HadaW2A,
    Part::HadaW2B,
    Part::HadaT1,
    Part::HadaT2,
    Part::LokrW1,
    Part::LokrW1A,
    Part::LokrW1B,
    Part::LokrW2,
    Part::LokrW2A,
    Part::LokrW2B,
    Part::LokrT2,
    Part::Diff,
    Part::DiffB,
];

/// Reads the LoRA file at `path` as a generation does and rebuilds every complete layer's
/// change for a weight of shape `target` (and its bias, of `target[0]` values); returns how
/// many layers gave one.
pub fn lora_file(path: &Path, target: &[usize]) -> Result<usize> {
    let layers = file::read(path)?;
    let mut built = 0;
    for parts in layers.layers.values() {
        if delta::kind(parts).is_none() {
            continue;
        }
        if let Ok(Some(_)) = delta::delta(parts, target, None) {
            built += 1;
        }
        let _ = delta::bias_delta(parts, target.first().copied().unwrap_or(1));
    }
    Ok(built)
}

/// Builds one layer's parts from `spec` and rebuilds its change for a weight of shape
/// `target`; returns whether it gave one. `spec` is a list of parts, each a byte picking the
/// part, a byte for its number of sides (0–5) and a byte per side: 0–8 as is, 9 and up a side
/// of 2⁴⁰ (kept only where a side of 0 leaves the tensor empty, as a file reader would).
pub fn delta_of_shapes(spec: &[u8], target: &[usize]) -> Result<bool> {
    let mut parts = Parts::new();
    let mut bytes = spec.iter().copied();
    while let (Some(which), Some(rank)) = (bytes.next(), bytes.next()) {
        let dims: Vec<usize> = (0..rank % 6)
            .map(|_| match bytes.next().unwrap_or(1) {
                b @ 0..=8 => b as usize,
                _ => 1 << 40,
            })
            .collect();
        // The readers refuse a shape whose product overflows, taken in any order.
        let len = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let reversed = dims.iter().rev().try_fold(1usize, |a, &d| a.checked_mul(d));
        // A file holds its values: only an empty tensor may have a side of 2⁴⁰.
        let (Some(len @ 0..=32768), Some(_)) = (len, reversed) else {
            continue;
        };
        let values: Vec<f32> = (0..len).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
        let tensor = Tensor::from_vec(values, dims, &Device::Cpu)?;
        parts.insert(PARTS[which as usize % PARTS.len()], tensor);
    }
    if delta::kind(&parts).is_none() {
        return Ok(false);
    }
    let _ = delta::bias_delta(&parts, target.first().copied().unwrap_or(1));
    Ok(matches!(delta::delta(&parts, target, None), Ok(Some(_))))
}
