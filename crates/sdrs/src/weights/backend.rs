//! A candle `SimpleBackend` that serves a file's tensors under diffusers names, in any dtype.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::compvis::TensorName;
use super::tensor_file::TensorFile;
use crate::{Error, Result};

/// Where a diffusers tensor lives in the file: a stored tensor, or a band of its rows (the
/// q, k and v projections that OpenCLIP keeps fused in one `in_proj`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    /// The tensor's name in the file.
    pub name: String,
    /// `(first row, rows)` along dimension 0, or the whole tensor.
    pub rows: Option<(usize, usize)>,
    /// Whether the matrix is stored transposed (OpenCLIP's `text_projection`, used as
    /// `x @ W`, against transformers' linear weight).
    pub transposed: bool,
}

/// One model's tensors: diffusers name → where it is in the file, with the names that could
/// not be found.
#[derive(Clone)]
pub(crate) struct Component {
    file: Arc<TensorFile>,
    renames: Arc<HashMap<String, Stored>>,
    missing: Vec<String>,
}

impl Component {
    /// Resolves every name of `table` to the first of `candidates(name)` that the file has.
    pub(crate) fn resolve(
        file: Arc<TensorFile>,
        table: &[TensorName],
        candidates: impl Fn(&TensorName) -> Vec<String>,
    ) -> Self {
        let mut renames = HashMap::with_capacity(table.len());
        let mut missing = Vec::new();
        for name in table {
            match candidates(name).into_iter().find(|c| file.contains(c)) {
                Some(found) => {
                    let stored = Stored {
                        name: found,
                        rows: None,
                        transposed: false,
                    };
                    renames.insert(name.diffusers.clone(), stored);
                }
                None => missing.push(name.diffusers.clone()),
            }
        }
        Self {
            file,
            renames: Arc::new(renames),
            missing,
        }
    }

    /// A component from explicit `(diffusers name, stored place)` pairs.
    pub(crate) fn from_places(file: Arc<TensorFile>, places: Vec<(String, Stored)>) -> Self {
        let mut renames = HashMap::with_capacity(places.len());
        let mut missing = Vec::new();
        for (diffusers, stored) in places {
            if file.contains(&stored.name) {
                renames.insert(diffusers, stored);
            } else {
                missing.push(diffusers);
            }
        }
        Self {
            file,
            renames: Arc::new(renames),
            missing,
        }
    }

    /// Every tensor's diffusers name and shape as stored (a band's rows for a fused one).
    pub(crate) fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.renames
            .iter()
            .filter_map(|(name, stored)| {
                let mut shape = self.file.shape(&stored.name)?.to_vec();
                if let (Some((_, rows)), Some(first)) = (stored.rows, shape.first_mut()) {
                    *first = rows;
                }
                if stored.transposed {
                    shape.reverse();
                }
                Some((name.clone(), shape))
            })
            .collect()
    }

    /// The tensor of diffusers name `name` as the file stores it (its dtype; a fused tensor's
    /// band of rows), on the CPU.
    pub(crate) fn stored(&self, name: &str) -> Result<Tensor> {
        let backend = Renamed {
            file: self.file.clone(),
            renames: self.renames.clone(),
        };
        Ok(backend.stored(name, &Device::Cpu)?)
    }

    /// The stored bytes of diffusers name `name` (a fused tensor's band of rows) and their
    /// dtype, where the file is mapped (see [`TensorFile::bytes`]).
    pub(crate) fn stored_bytes(&self, name: &str) -> Option<(DType, &[u8])> {
        let stored = self.renames.get(name).filter(|s| !s.transposed)?;
        let (dtype, bytes) = self.file.bytes(&stored.name)?;
        match stored.rows {
            None => Some((dtype, bytes)),
            Some((first, rows)) => {
                let shape = self.file.shape(&stored.name)?;
                let row: usize = shape.iter().skip(1).product::<usize>() * dtype.size_in_bytes();
                bytes
                    .get(first.checked_mul(row)?..first.checked_add(rows)?.checked_mul(row)?)
                    .map(|b| (dtype, b))
            }
        }
    }

    /// A `VarBuilder` over these tensors, or the full list of diffusers names the file lacks.
    pub(crate) fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        if !self.missing.is_empty() {
            return Err(Error::MissingTensors(self.missing.clone()));
        }
        let backend = Renamed {
            file: self.file.clone(),
            renames: self.renames.clone(),
        };
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }
}

struct Renamed {
    file: Arc<TensorFile>,
    renames: Arc<HashMap<String, Stored>>,
}

impl Renamed {
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.stored(name, device)?.to_dtype(dtype)
    }

    fn stored(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let stored =
            self.renames
                .get(name)
                .ok_or_else(|| candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })?;
        let tensor = self.file.load(&stored.name, device)?;
        let tensor = match stored.rows {
            Some((first, rows)) => tensor.narrow(0, first, rows)?.contiguous()?,
            None => tensor,
        };
        if stored.transposed {
            return tensor.t()?.contiguous();
        }
        Ok(tensor)
    }
}

impl SimpleBackend for Renamed {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, device)?;
        if tensor.shape() == &shape {
            return Ok(tensor);
        }
        // A 1×1 convolution and a linear layer hold the same numbers ([C, C, 1, 1] vs [C, C]):
        // CompVis and diffusers disagree on which one the VAE attention (and SD2's proj_in) is.
        if squeezed(tensor.dims()) == squeezed(shape.dims()) {
            return tensor.reshape(shape);
        }
        Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: shape,
            got: tensor.shape().clone(),
        })
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.renames.contains_key(name)
    }
}

/// Dimensions without trailing ones.
fn squeezed(dims: &[usize]) -> &[usize] {
    let end = dims.iter().rposition(|&d| d != 1).map_or(0, |p| p + 1);
    &dims[..end]
}
