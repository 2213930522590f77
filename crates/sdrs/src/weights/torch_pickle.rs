//! What a torch checkpoint's `data.pkl` says: which value is the state dict, and for each
//! tensor in it, the storage, dtype, offset, shape and stride `_rebuild_tensor_v2` was given.
//! The walk is a fixed number of steps per entry: nothing here follows the graph further.

use candle_core::DType;

use super::pickle::{Id, Pickle, Value};
use super::tensor_file::corrupt;
use crate::Result;

/// The state dict's entries: the first of `wrappers` (such as Lightning's `state_dict`) that
/// the top-level dict holds as a dict, else the top-level dict.
pub(crate) fn state_dict<'p>(pickle: &'p Pickle, wrappers: &[&str]) -> Result<&'p [(Id, Id)]> {
    let mut root = pickle.root();
    // A TorchScript module keeps its attributes as BUILD's state.
    if let Value::Call {
        callable,
        state: Some(state),
        ..
    } = pickle.get(root)
    {
        if pickle
            .global(*callable)
            .is_some_and(|(module, _)| module.starts_with("__torch__"))
        {
            root = *state;
        }
    }
    let Value::Dict(top) = pickle.get(root) else {
        return Err(corrupt(format!(
            "data.pkl holds a {}, not a state dict",
            pickle.kind(root)
        )));
    };
    for wrapper in wrappers {
        let inner = top
            .iter()
            .find(|(k, _)| pickle.str(*k) == Some(wrapper))
            .map(|&(_, v)| pickle.get(v));
        if let Some(Value::Dict(inner)) = inner {
            return Ok(inner);
        }
    }
    Ok(top)
}

/// A string or integer value of the top-level dict (an embedding's `name`, `step`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar {
    Str(String),
    Int(i64),
}

/// The string and integer entries of the top-level dict, at most `most` of them; other values
/// (tensors, nested dicts, None) are passed over.
pub(crate) fn top_level_scalars(pickle: &Pickle, most: usize) -> Vec<(String, Scalar)> {
    let Value::Dict(top) = pickle.get(pickle.root()) else {
        return Vec::new();
    };
    top.iter()
        .filter_map(|&(k, v)| {
            let key = pickle.str(k)?.to_string();
            match pickle.get(v) {
                Value::Str(s) => Some((key, Scalar::Str(s.clone()))),
                Value::Int(i) => Some((key, Scalar::Int(*i))),
                _ => None,
            }
        })
        .take(most)
        .collect()
}

/// What `_rebuild_tensor_v2` was asked to build.
pub(crate) struct RawRecord<'p> {
    /// The storage's key: its member is `data/{key}` beside `data.pkl`.
    pub key: &'p str,
    /// None for a storage type candle has no dtype for (int8, complex, ...).
    pub dtype: Option<DType>,
    /// The storage's declared element count.
    pub numel: usize,
    /// The tensor's first element in the storage.
    pub offset: usize,
    /// The tensor's size per dimension.
    pub shape: Vec<usize>,
    /// Storage elements between neighbours along each dimension.
    pub stride: Vec<usize>,
}

/// The tensor record of a state-dict value, or None if the value is not a tensor.
pub(crate) fn tensor_record(
    pickle: &Pickle,
    value: Id,
) -> std::result::Result<Option<RawRecord<'_>>, String> {
    let mut id = value;
    // Parameters wrap the tensor's rebuild call; torch nests the wrappers two deep at most.
    for _ in 0..3 {
        let Value::Call { callable, args, .. } = pickle.get(id) else {
            return Ok(None);
        };
        let args = pickle.tuple(*args);
        match pickle.global(*callable) {
            Some(("torch._utils", "_rebuild_tensor_v2")) => {
                let args = args.ok_or("_rebuild_tensor_v2 without an argument tuple")?;
                return rebuild_args(pickle, args).map(Some);
            }
            Some(("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")) => {
                id = *args
                    .and_then(|a| a.first())
                    .ok_or("_rebuild_parameter without its tensor")?;
            }
            // _rebuild_from_type_v2(func, type, args, state): a tensor subclass.
            Some(("torch._tensor", "_rebuild_from_type_v2")) => {
                let args = args
                    .filter(|a| a.len() >= 3)
                    .ok_or("_rebuild_from_type_v2 without its function and arguments")?;
                if pickle.global(args[0]) != Some(("torch._utils", "_rebuild_tensor_v2")) {
                    return Ok(None);
                }
                let inner = pickle
                    .tuple(args[2])
                    .ok_or("_rebuild_from_type_v2 without an argument tuple")?;
                return rebuild_args(pickle, inner).map(Some);
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)` with the storage a
/// persistent id `('storage', torch.XStorage, key, location, numel)`.
fn rebuild_args<'p>(pickle: &'p Pickle, args: &[Id]) -> std::result::Result<RawRecord<'p>, String> {
    let [storage, offset, size, stride, ..] = args else {
        return Err("_rebuild_tensor_v2 with fewer than 4 arguments".into());
    };
    let Value::PersistentId(pid) = pickle.get(*storage) else {
        return Err("a tensor without a storage reference".into());
    };
    let pid = pickle
        .tuple(*pid)
        .filter(|t| t.len() == 5 && pickle.str(t[0]) == Some("storage"))
        .ok_or("a storage reference other than ('storage', type, key, location, numel)")?;
    let (module, class) = pickle
        .global(pid[1])
        .ok_or("a storage type that is not a class")?;
    let key = pickle
        .str(pid[2])
        .ok_or("a storage key that is not a string")?;
    let numel = pickle
        .index(pid[4])
        .ok_or("a storage size that is not a count")?;
    let ints = |id: Id, what: &str| -> std::result::Result<Vec<usize>, String> {
        pickle
            .tuple(id)
            .and_then(|t| t.iter().map(|&i| pickle.index(i)).collect())
            .ok_or(format!("a {what} that is not a tuple of counts"))
    };
    Ok(RawRecord {
        key,
        dtype: if module == "torch" {
            storage_dtype(class)
        } else {
            None
        },
        numel,
        offset: pickle
            .index(*offset)
            .ok_or("a storage offset that is not a count")?,
        shape: ints(*size, "shape")?,
        stride: ints(*stride, "stride")?,
    })
}

/// The element type of a `torch.XStorage` class.
fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "ByteStorage" | "BoolStorage" => DType::U8,
        "ShortStorage" => DType::I16,
        "IntStorage" => DType::I32,
        "LongStorage" => DType::I64,
        _ => return None,
    })
}
