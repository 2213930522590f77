//! torch checkpoints (`torch.save` zips: `.ckpt`, `.pth`, `.bin`): the state dict's tensor
//! records read from `data.pkl` without running it, each checked against its storage member,
//! and tensors loaded from the mapped file.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use super::pickle::Pickle;
use super::tensor_file::{corrupt, release_pages, with_path};
use super::torch_pickle::{state_dict, tensor_record, top_level_scalars, Scalar};
use super::zip::Archive;
use crate::limits::{exceeded, MAX_PICKLE_BYTES, MAX_TENSORS};
use crate::{Error, Result};

/// Most top-level string and integer entries kept (an embedding file has four).
const MAX_TOP_LEVEL_SCALARS: usize = 64;

/// A checkpoint's bytes: the file mapped, or a buffer (for fuzzing).
pub(crate) enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map) => map,
            Bytes::Owned(vec) => vec,
        }
    }
}

/// Where one tensor lies in its storage member, checked to fit when the file was opened.
struct Record {
    member: usize,
    dtype: DType,
    /// The first element, counted in the storage's elements.
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// An opened torch zip: its tensors by state-dict name.
pub(crate) struct TorchZip {
    bytes: Bytes,
    archive: Archive,
    tensors: HashMap<String, Record>,
    /// The top-level dict's string and integer entries (an embedding's `name`, `step`).
    scalars: Vec<(String, Scalar)>,
    /// Whether members' CRC-32s are checked as they are read (off only to measure the cost).
    verify_crc: bool,
}

impl TorchZip {
    /// Maps and reads `path`. The state dict is the first of `wrappers` (such as Lightning's
    /// `state_dict`) that the top-level dict holds as a dict, else the top-level dict.
    pub(crate) fn open(path: &Path, wrappers: &[&str]) -> Result<Self> {
        Self::from_bytes(map(path)?, wrappers, true).map_err(with_path(path))
    }

    /// Reads a checkpoint held in `bytes`. `verify_crc` false skips the CRC-32 checks (to
    /// measure their cost, and so that fuzzed bytes inside members reach the pickle reader).
    pub(crate) fn from_bytes(bytes: Bytes, wrappers: &[&str], verify_crc: bool) -> Result<Self> {
        let archive = Archive::parse(&bytes)?;
        let (pickle_member, prefix) = find_pickle(&archive)?;
        if let Some(order) = archive.find(&format!("{prefix}byteorder")) {
            if archive.read(&bytes, order, verify_crc)? != b"little" {
                return Err(corrupt("a big-endian torch checkpoint"));
            }
        }
        if archive.len(pickle_member) > MAX_PICKLE_BYTES {
            return Err(exceeded(
                "the checkpoint's data.pkl size",
                archive.len(pickle_member),
                "MAX_PICKLE_BYTES",
                MAX_PICKLE_BYTES,
            ));
        }
        let pickle = Pickle::parse(archive.read(&bytes, pickle_member, verify_crc)?)?;
        let scalars = top_level_scalars(&pickle, MAX_TOP_LEVEL_SCALARS);
        let mut tensors = HashMap::new();
        // Storage key → (dtype, elements), to catch two tensors disagreeing about one storage.
        let mut storages: HashMap<&str, (DType, usize)> = HashMap::new();
        for &(key, value) in state_dict(&pickle, wrappers)? {
            let Some(name) = pickle.str(key) else {
                continue;
            };
            let Some(raw) = tensor_record(&pickle, value).map_err(|e| in_tensor(name, &e))? else {
                continue;
            };
            let Some(dtype) = raw.dtype else {
                // A dtype candle has no type for (int8, complex): left out, as before.
                continue;
            };
            if tensors.len() == MAX_TENSORS {
                return Err(exceeded(
                    "the checkpoint's tensor count",
                    format!("more than {MAX_TENSORS}"),
                    "MAX_TENSORS",
                    MAX_TENSORS,
                ));
            }
            let member = storage_member(&archive, &prefix, raw.key, dtype, raw.numel)
                .map_err(|e| in_tensor(name, &e))?;
            if *storages.entry(raw.key).or_insert((dtype, raw.numel)) != (dtype, raw.numel) {
                return Err(in_tensor(
                    name,
                    &format!("storage {} is declared twice differently", raw.key),
                ));
            }
            let record = Record {
                member,
                dtype,
                offset: raw.offset,
                shape: raw.shape,
                stride: raw.stride,
            };
            check_fits(&record, raw.numel).map_err(|e| in_tensor(name, &e))?;
            if tensors.insert(name.to_string(), record).is_some() {
                return Err(corrupt(format!("the state dict names {name:?} twice")));
            }
        }
        if tensors.is_empty() {
            return Err(corrupt("a zip archive without torch tensors"));
        }
        Ok(Self {
            bytes,
            archive,
            tensors,
            scalars,
            verify_crc,
        })
    }

    /// The top-level dict's string and integer entries.
    pub(crate) fn scalars(&self) -> &[(String, Scalar)] {
        &self.scalars
    }

    /// Every tensor's name and shape.
    pub(crate) fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.tensors
            .iter()
            .map(|(name, r)| (name.as_str(), r.shape.as_slice()))
    }

    /// Reads tensor `name` onto `device`, in its stored dtype.
    pub(crate) fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let record = self.tensors.get(name).ok_or_else(|| {
            Error::Tensor(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })
        })?;
        let storage = self
            .archive
            .read(&self.bytes, record.member, self.verify_crc)?;
        let order = dense_order(&record.shape, &record.stride).ok_or_else(|| {
            corrupt(format!(
                "tensor {name}: its layout (shape {:?}, stride {:?}) is not a dense one, \
                 which this reader supports only when contiguous or transposed",
                record.shape, record.stride
            ))
        })?;
        let size = record.dtype.size_in_bytes();
        let numel: usize = record.shape.iter().product();
        // Checked at open: offset + numel elements lie inside the storage.
        let data = &storage[record.offset * size..(record.offset + numel) * size];
        let tensor = if order.windows(2).all(|w| w[0] < w[1]) {
            Tensor::from_raw_buffer(data, record.dtype, &record.shape, &Device::Cpu)?
        } else {
            // Stored transposed: read in memory order, then put the axes back.
            let physical: Vec<usize> = order.iter().map(|&a| record.shape[a]).collect();
            let mut back: Vec<usize> = (0..order.len()).collect();
            back.sort_by_key(|&i| order[i]);
            Tensor::from_raw_buffer(data, record.dtype, &physical, &Device::Cpu)?
                .permute(back)?
                .contiguous()?
                .reshape(record.shape.as_slice())?
        };
        // The whole member: the CRC check brought all of its pages in. Only a file mapping's
        // pages: dropping those of a buffer would zero them.
        if matches!(self.bytes, Bytes::Mapped(_)) {
            release_pages(storage);
        }
        Ok(tensor.to_device(device)?)
    }
}

/// Maps the file at `path`.
pub(crate) fn map(path: &Path) -> Result<Bytes> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only; like every mmap reader we rely on nobody truncating
    // the file while it is open. Mapping keeps a 4 GB checkpoint out of RAM until the tensors
    // are asked for.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Bytes::Mapped(map))
}

/// The one `data.pkl` member and the folder prefix its storages are under.
fn find_pickle(archive: &Archive) -> Result<(usize, String)> {
    let mut pickles = archive
        .names()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"));
    let name = pickles
        .next()
        .ok_or_else(|| corrupt("a zip archive without data.pkl (not a torch checkpoint)"))?;
    if let Some(other) = pickles.next() {
        return Err(corrupt(format!(
            "a zip archive with two pickles ({name}, {other})"
        )));
    }
    let prefix = name
        .strip_suffix("data.pkl")
        .unwrap_or_default()
        .to_string();
    let id = archive
        .find(name)
        .ok_or_else(|| corrupt("data.pkl vanished"))?;
    Ok((id, prefix))
}

/// The member holding storage `key`, checked to hold exactly `numel` elements of `dtype`.
fn storage_member(
    archive: &Archive,
    prefix: &str,
    key: &str,
    dtype: DType,
    numel: usize,
) -> std::result::Result<usize, String> {
    let name = format!("{prefix}data/{key}");
    let member = archive
        .find(&name)
        .ok_or_else(|| format!("its storage {name} is not in the archive"))?;
    let bytes = numel.checked_mul(dtype.size_in_bytes());
    if bytes != Some(archive.len(member)) {
        return Err(format!(
            "storage {name} declares {numel} elements of {dtype:?} but holds {} bytes",
            archive.len(member)
        ));
    }
    Ok(member)
}

/// Checks that every element the record's shape and stride reach lies inside its storage.
fn check_fits(record: &Record, numel: usize) -> std::result::Result<(), String> {
    if record.shape.len() != record.stride.len() {
        return Err(format!(
            "shape {:?} and stride {:?} differ in rank",
            record.shape, record.stride
        ));
    }
    let elements = record
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d));
    // The furthest element: offset + Σ (size − 1) · stride, for a non-empty tensor.
    let reach = if elements == Some(0) {
        Some(record.offset)
    } else {
        record
            .shape
            .iter()
            .zip(&record.stride)
            .try_fold(record.offset.checked_add(1), |end, (&d, &s)| {
                Some(end?.checked_add((d - 1).checked_mul(s)?))
            })
            .flatten()
    };
    match (elements, reach) {
        (Some(_), Some(end)) if end <= numel && super::sides_fit(&record.shape) => Ok(()),
        _ => Err(format!(
            "shape {:?} (stride {:?}, offset {}) reaches past its storage of {numel} elements",
            record.shape, record.stride, record.offset
        )),
    }
}

/// For a layout that is a permutation of a contiguous one, the axes of size > 1 from the
/// outermost in memory to the innermost; None for any other layout (overlapping or gapped).
fn dense_order(shape: &[usize], stride: &[usize]) -> Option<Vec<usize>> {
    if shape.contains(&0) {
        return Some(Vec::new());
    }
    let mut axes: Vec<usize> = (0..shape.len()).filter(|&a| shape[a] > 1).collect();
    axes.sort_by_key(|&a| std::cmp::Reverse(stride[a]));
    let mut expect = 1usize;
    for &a in axes.iter().rev() {
        if stride[a] != expect {
            return None;
        }
        expect = expect.checked_mul(shape[a])?;
    }
    Some(axes)
}

fn in_tensor(name: &str, reason: &impl std::fmt::Display) -> Error {
    corrupt(format!("tensor {name}: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_reads_the_same_twice_from_a_mapping_or_a_buffer() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-vae-nowrap.ckpt");
        let owned = Bytes::Owned(std::fs::read(&path).unwrap());
        for zip in [
            TorchZip::open(&path, &[]).unwrap(),
            TorchZip::from_bytes(owned, &[], true).unwrap(),
        ] {
            // The largest tensor spans whole pages, which a mapping gives back after each read.
            let (name, _) = zip
                .shapes()
                .max_by_key(|(_, shape)| shape.iter().product::<usize>())
                .unwrap();
            let read = || {
                let t = zip.load(name, &Device::Cpu).unwrap();
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let first = read();
            assert!(first.iter().any(|&v| v != 0.0));
            assert_eq!(first, read(), "{name}");
        }
    }

    #[test]
    fn dense_orders_cover_contiguous_and_transposed_layouts() {
        assert_eq!(dense_order(&[2, 3], &[3, 1]), Some(vec![0, 1]));
        assert_eq!(dense_order(&[2, 3], &[1, 2]), Some(vec![1, 0]));
        // Size-one axes may have any stride.
        assert_eq!(dense_order(&[2, 1, 3], &[3, 99, 1]), Some(vec![0, 2]));
        assert_eq!(dense_order(&[4, 3, 2], &[1, 4, 12]), Some(vec![2, 1, 0]));
        // Broadcast (stride 0), overlapping and gapped layouts are refused.
        assert_eq!(dense_order(&[2, 3], &[0, 1]), None);
        assert_eq!(dense_order(&[2, 3], &[1, 1]), None);
        assert_eq!(dense_order(&[2, 3], &[4, 1]), None);
    }
}
