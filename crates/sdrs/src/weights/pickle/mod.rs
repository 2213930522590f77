//! A pickle reader that executes nothing: the opcodes `torch.save` writes (protocol 2 and up)
//! build a graph of plain values, and a call such as `torch._utils._rebuild_tensor_v2(...)` is
//! kept as a record of the callable and its arguments for `weights::torch_zip` to interpret.
//!
//! Values live in one arena and refer to each other by index, so a memo fetch shares a value
//! instead of copying it (a "billion laughs" pickle stays as small as its bytes), and nothing
//! recurses: not the reader, and not the drop of deeply nested values, which are flat vectors.
//! The stack, the opcodes, the values and each container are bounded by named limits.

mod machine;
mod opcodes;

use crate::Result;

/// The index of a value in its [`Pickle`].
pub(crate) type Id = u32;

/// One value of the unpickled graph. Containers hold indices, never values.
#[derive(Debug)]
pub(crate) enum Value {
    None,
    Bool,
    Int(i64),
    /// An integer wider than 64 bits, or a float: kept for its kind only.
    OtherNumber,
    Str(String),
    /// `bytes` or `bytearray`, kept for its kind only.
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    /// A class or function named by module and name, never imported.
    Global {
        module: String,
        name: String,
    },
    /// A reference to data outside the pickle (torch's tensor storages).
    PersistentId(Id),
    /// `callable(*args)` as REDUCE or NEWOBJ asked for it, not called, with BUILD's state.
    Call {
        callable: Id,
        args: Id,
        state: Option<Id>,
    },
}

/// An unpickled graph and the value STOP returned.
pub(crate) struct Pickle {
    values: Vec<Value>,
    root: Id,
}

impl Pickle {
    /// Runs the pickle in `bytes` through the machine, creating values but calling nothing.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self> {
        let (values, root) = machine::run(bytes)?;
        Ok(Self { values, root })
    }

    /// The value the pickle stands for.
    pub(crate) fn root(&self) -> Id {
        self.root
    }

    /// The value at `id`.
    pub(crate) fn get(&self, id: Id) -> &Value {
        &self.values[id as usize]
    }

    /// The string at `id`, if it is one.
    pub(crate) fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items of the tuple at `id`, if it is one.
    pub(crate) fn tuple(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The non-negative integer at `id`, if it is one.
    pub(crate) fn index(&self, id: Id) -> Option<usize> {
        match self.get(id) {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }

    /// `(module, name)` of the global at `id`, if it is one.
    pub(crate) fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.get(id) {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// What kind of value is at `id`, for messages.
    pub(crate) fn kind(&self, id: Id) -> &'static str {
        match self.get(id) {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) | Value::OtherNumber => "number",
            Value::Str(_) => "string",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Set(_) => "set",
            Value::Global { .. } => "class",
            Value::PersistentId(_) => "persistent id",
            Value::Call { .. } => "object",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Pickle> {
        Pickle::parse(bytes)
    }

    #[test]
    fn a_small_dict_of_a_tuple_parses() {
        // {'a': (1, -2, 'x')} at protocol 2.
        let p = parse(b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01J\xfe\xff\xff\xff\x8c\x01x\x87s.")
            .unwrap();
        let Value::Dict(items) = p.get(p.root()) else {
            panic!("not a dict")
        };
        let (k, v) = items[0];
        assert_eq!(p.str(k), Some("a"));
        let t = p.tuple(v).unwrap();
        assert!(matches!(p.get(t[0]), Value::Int(1)));
        assert!(matches!(p.get(t[1]), Value::Int(-2)));
        assert_eq!(p.str(t[2]), Some("x"));
    }

    #[test]
    fn memo_gets_share_one_value() {
        // [[], same list again] built with BINPUT/BINGET.
        let p = parse(b"\x80\x02](]q\x00h\x00e.").unwrap();
        let Value::List(items) = p.get(p.root()) else {
            panic!()
        };
        assert_eq!(items[0], items[1]);
    }

    #[test]
    fn errors_name_the_opcode() {
        let err = parse(b"\x80\x02i").err().unwrap().to_string();
        assert!(err.contains("INST (0x69)"), "{err}");
        let err = parse(b"\x80\x02}").err().unwrap().to_string();
        assert!(err.contains("without STOP"), "{err}");
        let err = parse(b"\x80\x02X\xff\xff\xff\xff.")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("BINUNICODE") && err.contains("truncated"),
            "{err}"
        );
    }
}
