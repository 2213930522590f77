//! Our check of a safetensors header before candle's reader sees the file: the header's size
//! and tensor count bounded, duplicate names refused (serde and the safetensors crate keep the
//! last one silently), and every tensor's bytes inside the file and matching its shape.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::tensor_file::{corrupt, with_path};
use crate::limits::{exceeded, MAX_SAFETENSORS_HEADER, MAX_TENSORS};
use crate::{Error, Result};

/// The length prefix before the JSON header.
const PREFIX: usize = 8;

/// Checks the header of the safetensors file at `path`; returns its tensor count.
pub(crate) fn check_file(path: &Path) -> Result<usize> {
    let io = |e| Error::io(path, e);
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut prefix = [0; PREFIX];
    file.read_exact(&mut prefix)
        .map_err(|_| corrupt("truncated safetensors: no header length"))
        .map_err(with_path(path))?;
    let header_len = header_len(prefix, file_len).map_err(with_path(path))?;
    let mut header = vec![0; header_len];
    file.read_exact(&mut header).map_err(io)?;
    check_header(&header, file_len - (PREFIX + header_len) as u64).map_err(with_path(path))
}

/// The `__metadata__` strings of the safetensors file at `path` (trainers' notes: kohya's
/// `ss_output_name`, `sshs_model_hash`, …), after the header has passed [`check_file`].
pub(crate) fn metadata(path: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    check_file(path)?;
    let io = |e| Error::io(path, e);
    let mut file = File::open(path).map_err(io)?;
    let mut prefix = [0; PREFIX];
    file.read_exact(&mut prefix).map_err(io)?;
    let len = u64::from_le_bytes(prefix) as usize;
    let mut header = vec![0; len];
    file.read_exact(&mut header).map_err(io)?;
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: std::collections::BTreeMap<String, serde_json::Value>,
    }
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("safetensors header: {e}")))
        .map_err(with_path(path))?;
    Ok(header
        .metadata
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
        .collect())
}

/// Checks the header of a safetensors file held in `bytes`; returns its tensor count.
pub(crate) fn check_bytes(bytes: &[u8]) -> Result<usize> {
    let prefix = bytes
        .get(..PREFIX)
        .and_then(|p| <[u8; PREFIX]>::try_from(p).ok())
        .ok_or_else(|| corrupt("truncated safetensors: no header length"))?;
    let header_len = header_len(prefix, bytes.len() as u64)?;
    let rest = &bytes[PREFIX..];
    check_header(&rest[..header_len], (rest.len() - header_len) as u64)
}

/// The header's length from the prefix, bounded by the limit and the file.
fn header_len(prefix: [u8; PREFIX], file_len: u64) -> Result<usize> {
    let len = u64::from_le_bytes(prefix);
    if len > MAX_SAFETENSORS_HEADER as u64 {
        return Err(exceeded(
            "the safetensors header size",
            len,
            "MAX_SAFETENSORS_HEADER",
            MAX_SAFETENSORS_HEADER,
        ));
    }
    if len > file_len.saturating_sub(PREFIX as u64) {
        return Err(corrupt(format!(
            "truncated safetensors: a {len}-byte header in a {file_len}-byte file"
        )));
    }
    Ok(len as usize)
}

/// One tensor's entry in the header.
#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Checks the JSON header against `data_len`, the bytes after it.
fn check_header(header: &[u8], data_len: u64) -> Result<usize> {
    // The visitor keeps our own error here: serde's error type can only carry text.
    let failure = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(header);
    let parsed = de
        .deserialize_map(HeaderVisitor {
            data_len,
            failure: &failure,
        })
        .and_then(|count| de.end().map(|()| count));
    match (parsed, failure.into_inner()) {
        (_, Some(ours)) => Err(ours),
        (Ok(count), None) => Ok(count),
        (Err(e), None) => Err(corrupt(format!("unreadable safetensors header: {e}"))),
    }
}

struct HeaderVisitor<'f> {
    data_len: u64,
    failure: &'f RefCell<Option<Error>>,
}

impl HeaderVisitor<'_> {
    /// Stores `error` and returns the serde error that stops the parse.
    fn fail<E: de::Error>(&self, error: Error) -> E {
        let text = error.to_string();
        *self.failure.borrow_mut() = Some(error);
        E::custom(text)
    }
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensors")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<usize, A::Error> {
        let mut seen = HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if seen.contains(&name) {
                return Err(self.fail(corrupt(format!(
                    "the safetensors header names {name:?} twice"
                ))));
            }
            if name == "__metadata__" {
                map.next_value_seed(UniqueKeys("__metadata__"))?;
            } else {
                if seen.len() >= MAX_TENSORS {
                    return Err(self.fail(exceeded(
                        "the safetensors tensor count",
                        format!("more than {MAX_TENSORS}"),
                        "MAX_TENSORS",
                        MAX_TENSORS,
                    )));
                }
                let entry: Entry = map.next_value()?;
                check_entry(&name, &entry, self.data_len).map_err(|e| self.fail(e))?;
            }
            seen.insert(name);
        }
        Ok(seen.len() - usize::from(seen.contains("__metadata__")))
    }
}

/// A JSON object whose keys must differ; the values are skipped.
struct UniqueKeys(&'static str);

impl<'de> DeserializeSeed<'de> for UniqueKeys {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> std::result::Result<(), D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} as a JSON object", self.0)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<IgnoredAny>()?;
            if !seen.insert(key) {
                return Err(de::Error::custom(format!("{} has a key twice", self.0)));
            }
        }
        Ok(())
    }
}

/// Bits per element of a safetensors dtype.
fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" => 64,
        _ => return None,
    })
}

/// Checks one tensor: known dtype, a shape whose bytes equal its range, the range in the file.
fn check_entry(name: &str, entry: &Entry, data_len: u64) -> Result<()> {
    let bits = dtype_bits(&entry.dtype)
        .ok_or_else(|| corrupt(format!("tensor {name}: unknown dtype {:?}", entry.dtype)))?;
    let bytes = entry
        .shape
        .iter()
        .try_fold(bits, |n, &d| n.checked_mul(d as u64))
        .filter(|b| b % 8 == 0)
        .map(|b| b / 8)
        .ok_or_else(|| {
            corrupt(format!(
                "tensor {name}: shape {:?} of {} is not a whole number of bytes that fits in 64 bits",
                entry.shape, entry.dtype
            ))
        })?;
    if !super::sides_fit(&entry.shape) {
        return Err(corrupt(format!(
            "tensor {name}: the sides of shape {:?} multiply past 64 bits (an empty tensor too \
             needs its strides)",
            entry.shape
        )));
    }
    let (begin, end) = entry.data_offsets;
    if begin > end || end > data_len {
        return Err(corrupt(format!(
            "tensor {name}: bytes {begin}..{end} lie outside the file's {data_len} data bytes"
        )));
    }
    if end - begin != bytes {
        return Err(corrupt(format!(
            "tensor {name}: shape {:?} of {} needs {bytes} bytes, its range holds {}",
            entry.shape,
            entry.dtype,
            end - begin
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_bytes;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        bytes
    }

    #[test]
    fn a_good_header_counts_its_tensors() {
        let header =
            r#"{"__metadata__":{"a":"b"},"x":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}"#;
        assert_eq!(check_bytes(&file(header, 8)).unwrap(), 1);
    }

    #[test]
    fn bad_headers_say_why() {
        for (header, data, want) in [
            (
                r#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
                4,
                "names \"x\" twice",
            ),
            (
                r#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
                2,
                "outside the file",
            ),
            (
                r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                4,
                "needs 8 bytes",
            ),
            (
                r#"{"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
                4,
                "fits in 64 bits",
            ),
            (
                r#"{"x":{"dtype":"Q4","shape":[2],"data_offsets":[0,4]}}"#,
                4,
                "unknown dtype",
            ),
            (r#"{"__metadata__":{"a":"b","a":"c"}}"#, 0, "a key twice"),
            (r#"[1, 2]"#, 0, "unreadable"),
        ] {
            let err = check_bytes(&file(header, data)).unwrap_err().to_string();
            assert!(err.contains(want), "{header}: {err}");
        }
    }
}
