//! Tensor files: memory-mapped safetensors and torch zip pickles (read without running any code).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use super::safetensors_header;
use super::torch_pickle::Scalar;
use super::torch_zip::TorchZip;
use crate::{Error, Result};

/// What Lightning and similar trainers wrap a state dict in, next to other entries.
const SD_WRAPPERS: [&str; 1] = ["state_dict"];

/// One or more files (shards) holding named tensors, with an index of names and shapes.
pub(crate) struct TensorFile {
    parts: Vec<Part>,
    /// Tensor name → (part index, shape).
    index: HashMap<String, (usize, Vec<usize>)>,
}

enum Part {
    Safetensors(MmapedSafetensors),
    Pickle(TorchZip),
}

/// What the first bytes of a file say it is.
enum Kind {
    Safetensors,
    Zip,
}

impl TensorFile {
    /// Opens one file, whatever its extension says: the content decides the reader.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        Self::open_shards(&[path.to_path_buf()])
    }

    /// Opens one file whose torch pickle, if it is one, keeps its tensors in the first of
    /// `wrappers` that its top-level dict holds as a dict (an A1111 embedding's
    /// `string_to_param`).
    pub(crate) fn open_wrapped(path: &Path, wrappers: &[&str]) -> Result<Self> {
        let part = open_part(path, wrappers)?;
        let index = part
            .shapes()
            .into_iter()
            .map(|(name, shape)| (name, (0, shape)))
            .collect();
        Ok(Self {
            parts: vec![part],
            index,
        })
    }

    /// The top-level string and integer entries of a torch pickle (none for safetensors).
    pub(crate) fn scalars(&self) -> Vec<(String, Scalar)> {
        self.parts
            .iter()
            .flat_map(|part| match part {
                Part::Pickle(zip) => zip.scalars().to_vec(),
                Part::Safetensors(_) => Vec::new(),
            })
            .collect()
    }

    /// Opens the shards of one state dict (diffusers writes big models in several files).
    pub(crate) fn open_shards(paths: &[PathBuf]) -> Result<Self> {
        let mut parts = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let part = open_part(path, &SD_WRAPPERS)?;
            for (name, shape) in part.shapes() {
                index.insert(name, (i, shape));
            }
            parts.push(part);
        }
        Ok(Self { parts, index })
    }

    /// Every tensor name in the file.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The stored shape of `name`, if the file has it.
    pub(crate) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|(_, shape)| shape.as_slice())
    }

    /// Whether the file has a tensor called `name`.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The stored bytes of `name` and their dtype, where the file is a mapped safetensors file
    /// (pickles are read through [`TensorFile::load`]). [`release_pages`] drops them from
    /// memory once read.
    pub(crate) fn bytes(&self, name: &str) -> Option<(candle_core::DType, &[u8])> {
        let (part, _) = self.index.get(name)?;
        let Part::Safetensors(st) = &self.parts[*part] else {
            return None;
        };
        let view = st.get(name).ok()?;
        let dtype = candle_core::DType::try_from(view.dtype()).ok()?;
        Some((dtype, view.data()))
    }

    /// Reads one tensor, in its stored dtype, onto `device`.
    pub(crate) fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let not_found = || candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        };
        let (part, _) = self.index.get(name).ok_or_else(not_found)?;
        match &self.parts[*part] {
            Part::Safetensors(st) => {
                let view = st.get(name)?;
                let tensor = candle_core::safetensors::Load::load(&view, device)?;
                release_pages(view.data());
                Ok(tensor)
            }
            Part::Pickle(zip) => zip.load(name, device).map_err(|e| match e {
                Error::Tensor(e) => e,
                other => candle_core::Error::Msg(other.to_string()),
            }),
        }
    }
}

/// Drops the file pages behind `data`, a slice of a read-only file mapping, from this process's
/// resident memory once its tensor has been copied out. Without this the mapped checkpoint is
/// counted in the process's memory next to the converted weights until it is unmapped, which
/// doubles the peak while a model loads. The pages stay in the page cache, and a later read of
/// the same bytes maps them back in unchanged.
pub(crate) fn release_pages(data: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = data.as_ptr() as usize;
        // Only whole pages inside the slice: a neighbouring tensor's pages stay.
        let first = start.div_ceil(PAGE) * PAGE;
        let end = (start + data.len()) / PAGE * PAGE;
        if end > first {
            // SAFETY: [first, end) lies inside a live read-only file mapping; MADV_DONTNEED on
            // such a mapping only discards resident copies of file pages, which fault back in
            // with the same contents. The result is ignored: failing leaves the pages resident.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

impl Part {
    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Part::Safetensors(st) => st
                .tensors()
                .into_iter()
                .map(|(name, view)| (name, view.shape().to_vec()))
                .collect(),
            Part::Pickle(zip) => zip
                .shapes()
                .map(|(name, shape)| (name.to_string(), shape.to_vec()))
                .collect(),
        }
    }
}

fn open_part(path: &Path, wrappers: &[&str]) -> Result<Part> {
    match sniff(path)? {
        Kind::Safetensors => {
            // Our own bounds first: candle's reader trusts the header's counts and keeps the
            // last of duplicate names.
            safetensors_header::check_file(path)?;
            // SAFETY: the mapping is read-only; like every mmap reader we rely on nobody
            // truncating the file while it is open. Mapping (rather than reading) is what
            // keeps a 4 GB checkpoint out of RAM until the tensors are asked for.
            let st =
                unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::NotACheckpoint {
                    path: path.to_path_buf(),
                    reason: format!("truncated or corrupt safetensors ({e})"),
                })?;
            Ok(Part::Safetensors(st))
        }
        Kind::Zip => Ok(Part::Pickle(TorchZip::open(path, wrappers)?)),
    }
}

/// A malformed-file error from a reader that does not know the path; [`with_path`] adds it.
pub(super) fn corrupt(reason: impl Into<String>) -> Error {
    Error::NotACheckpoint {
        path: PathBuf::new(),
        reason: reason.into(),
    }
}

/// Puts `path` into a reader's error: as the file that is not a checkpoint, or in front of
/// what went over a limit.
pub(super) fn with_path(path: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::NotACheckpoint { reason, .. } => Error::NotACheckpoint {
            path: path.to_path_buf(),
            reason,
        },
        Error::Limit {
            what,
            value,
            name,
            limit,
        } => {
            // Readers nest (a file inside a checkpoint): the path goes in once.
            let prefix = format!("{}: ", path.display());
            Error::Limit {
                what: if what.starts_with(&prefix) {
                    what
                } else {
                    prefix + &what
                },
                value,
                name,
                limit,
            }
        }
        other => other,
    }
}

/// Decides the reader from the first bytes, and names common wrong files plainly.
fn sniff(path: &Path) -> Result<Kind> {
    let mut head = Vec::with_capacity(16);
    File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|e| Error::io(path, e))?;
    let reason = |r: &str| {
        Err(Error::NotACheckpoint {
            path: path.to_path_buf(),
            reason: r.to_string(),
        })
    };
    if head.is_empty() {
        return reason("the file is empty");
    }
    if head.starts_with(b"PK\x03\x04") {
        return Ok(Kind::Zip);
    }
    if head.starts_with(b"\x89PNG") {
        return reason("it is a PNG image");
    }
    if head.starts_with(b"\xff\xd8\xff") {
        return reason("it is a JPEG image");
    }
    // safetensors: a little-endian u64 header length, then a JSON object. Asked first: a
    // header of 128 to 255 bytes starts the file with 0x80, a pickle's first byte.
    if head.len() > 8 && head[8] == b'{' {
        return Ok(Kind::Safetensors);
    }
    if head.first() == Some(&0x80) {
        return reason("an old-style (pre-zip) torch pickle; re-save it with a recent torch or convert it to safetensors");
    }
    reason("neither safetensors nor a torch zip archive")
}
