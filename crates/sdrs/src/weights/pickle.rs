//! A pickle reader that executes nothing: the opcodes `torch.save` writes (protocol 2 and up)
//! build a graph of plain values, and a call such as `torch._utils._rebuild_tensor_v2(...)` is
//! kept as a record of the callable and its arguments for `weights::torch_zip` to interpret.
//!
//! Values live in one arena and refer to each other by index, so a memo fetch shares a value
//! instead of copying it (a "billion laughs" pickle stays as small as its bytes), and nothing
//! recurses: not the reader, and not the drop of deeply nested values, which are flat vectors.
//! The stack, the opcodes, the values and each container are bounded by named limits.

use std::collections::HashMap;

use super::source::corrupt;
use crate::limits::{
    exceeded, MAX_PICKLE_CONTAINER, MAX_PICKLE_OBJECTS, MAX_PICKLE_OPS, MAX_PICKLE_STACK,
};
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
        Machine {
            input: bytes,
            pos: 0,
            values: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
        .run()
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

/// The pickle virtual machine's state.
struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    values: Vec<Value>,
    stack: Vec<Id>,
    /// Stack heights at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

impl Machine<'_> {
    fn run(mut self) -> Result<Pickle> {
        for _ in 0..MAX_PICKLE_OPS {
            let at = self.pos;
            let op = *self
                .input
                .get(at)
                .ok_or_else(|| corrupt("the pickle ends without STOP (truncated?)"))?;
            self.pos += 1;
            if op == b'.' {
                let root = self.pop()?;
                return Ok(Pickle {
                    values: self.values,
                    root,
                });
            }
            self.step(op).map_err(|e| match e {
                crate::Error::NotACheckpoint { reason, .. } => {
                    corrupt(format!("pickle opcode {} at byte {at}: {reason}", name(op)))
                }
                other => other,
            })?;
        }
        Err(exceeded(
            "the pickle's opcode count",
            format!("more than {MAX_PICKLE_OPS}"),
            "MAX_PICKLE_OPS",
            MAX_PICKLE_OPS,
        ))
    }

    /// Executes one opcode (other than STOP).
    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            0x80 => {
                let protocol = self.bytes(1)?[0];
                if protocol > 5 {
                    return Err(corrupt(format!("unknown pickle protocol {protocol}")));
                }
            }
            0x95 => {
                self.bytes(8)?; // FRAME: a length hint
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push_new(Value::Global { module, name })?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (self.value(module), self.value(name))
                else {
                    return Err(corrupt("STACK_GLOBAL of something other than two strings"));
                };
                let (module, name) = (module.clone(), name.clone());
                self.push_new(Value::Global { module, name })?;
            }
            b'Q' => {
                let pid = self.pop()?;
                self.push_new(Value::PersistentId(pid))?;
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?;
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?;
            }
            b'b' => {
                let state = self.pop()?;
                let target = self.top()?;
                // Setting attributes: kept on objects; a dict's attributes (the state dict's
                // `_metadata`) are not its items.
                if let Value::Call { state: slot, .. } = &mut self.values[target as usize] {
                    *slot = Some(state);
                }
            }
            b'(' => {
                self.check_depth()?;
                self.marks.push(self.stack.len());
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = self.top()?;
                self.push(top)?;
            }
            b'}' => self.push_new(Value::Dict(Vec::new()))?,
            b']' => self.push_new(Value::List(Vec::new()))?,
            b')' => self.push_new(Value::Tuple(Vec::new()))?,
            0x8f => self.push_new(Value::Set(Vec::new()))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push_new(Value::Tuple(items))?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let items = self.pop_n(n)?;
                self.push_new(Value::Tuple(items))?;
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push_new(Value::List(items))?;
            }
            0x91 => {
                let items = self.pop_mark()?;
                self.push_new(Value::Set(items))?;
            }
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = pairs(&items)?;
                self.push_new(Value::Dict(pairs))?;
            }
            b's' => {
                let items = self.pop_n(2)?;
                self.set_items(&items)?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(&items)?;
            }
            b'a' => {
                let item = self.pop()?;
                self.append(&[item])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.append(&items)?;
            }
            b'T' => {
                let len = self.len_i32()?;
                let s = String::from_utf8_lossy(self.bytes(len)?).into_owned();
                self.push_new(Value::Str(s))?;
            }
            b'U' => {
                let len = self.bytes(1)?[0].into();
                let s = String::from_utf8_lossy(self.bytes(len)?).into_owned();
                self.push_new(Value::Str(s))?;
            }
            b'X' | 0x8c | 0x8d => {
                let len = match op {
                    b'X' => self.uint(4)?,
                    0x8c => self.uint(1)?,
                    _ => self.uint(8)?,
                };
                let s = String::from_utf8_lossy(self.bytes(len)?).into_owned();
                self.push_new(Value::Str(s))?;
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let len = match op {
                    b'B' => self.uint(4)?,
                    b'C' => self.uint(1)?,
                    _ => self.uint(8)?,
                };
                self.bytes(len)?;
                self.push_new(Value::Bytes)?;
            }
            b'J' => {
                let b = self.bytes(4)?;
                let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                self.push_new(Value::Int(v.into()))?;
            }
            b'K' => {
                let v = self.uint(1)?;
                self.push_new(Value::Int(v as i64))?;
            }
            b'M' => {
                let v = self.uint(2)?;
                self.push_new(Value::Int(v as i64))?;
            }
            0x8a | 0x8b => {
                let len = if op == 0x8a {
                    self.uint(1)?
                } else {
                    self.len_i32()?
                };
                let value = long(self.bytes(len)?);
                self.push_new(value)?;
            }
            b'G' => {
                self.bytes(8)?;
                self.push_new(Value::OtherNumber)?;
            }
            0x88 | 0x89 => self.push_new(Value::Bool)?,
            b'N' => self.push_new(Value::None)?,
            b'q' | b'r' => {
                let key = self.uint(if op == b'q' { 1 } else { 4 })? as u32;
                let top = self.top()?;
                self.memo.insert(key, top);
            }
            0x94 => {
                let key =
                    u32::try_from(self.memo.len()).map_err(|_| corrupt("the memo is full"))?;
                let top = self.top()?;
                self.memo.insert(key, top);
            }
            b'h' | b'j' => {
                let key = self.uint(if op == b'h' { 1 } else { 4 })? as u32;
                let id = *self
                    .memo
                    .get(&key)
                    .ok_or_else(|| corrupt(format!("memo entry {key} was never stored")))?;
                self.push(id)?;
            }
            _ => {
                return Err(corrupt(
                    "not an opcode torch.save writes; this reader runs no other".to_string(),
                ))
            }
        }
        Ok(())
    }

    fn value(&self, id: Id) -> &Value {
        &self.values[id as usize]
    }

    /// REDUCE / NEWOBJ: an OrderedDict or defaultdict becomes a dict its SETITEMS fill; any
    /// other call is recorded, not made.
    fn call(&mut self, callable: Id, args: Id) -> Result<()> {
        let dict = matches!(
            self.value(callable),
            Value::Global { module, name }
                if module == "collections" && (name == "OrderedDict" || name == "defaultdict")
        );
        if dict {
            self.push_new(Value::Dict(Vec::new()))
        } else {
            self.push_new(Value::Call {
                callable,
                args,
                state: None,
            })
        }
    }

    /// APPEND(S) / ADDITEMS onto the list or set under the items.
    fn append(&mut self, items: &[Id]) -> Result<()> {
        let target = self.top()?;
        match &mut self.values[target as usize] {
            Value::List(list) | Value::Set(list) => {
                if list.len() + items.len() > MAX_PICKLE_CONTAINER {
                    return Err(too_big(list.len() + items.len()));
                }
                list.extend_from_slice(items);
                Ok(())
            }
            // An object with an append method (a list subclass): its items are not ours to read.
            Value::Call { .. } => Ok(()),
            _ => Err(corrupt("appending to something that is not a list")),
        }
    }

    /// SETITEM(S) onto the dict under the key/value pairs.
    fn set_items(&mut self, items: &[Id]) -> Result<()> {
        let pairs = pairs(items)?;
        let target = self.top()?;
        match &mut self.values[target as usize] {
            Value::Dict(dict) => {
                if dict.len() + pairs.len() > MAX_PICKLE_CONTAINER {
                    return Err(too_big(dict.len() + pairs.len()));
                }
                dict.extend(pairs);
                Ok(())
            }
            Value::Call { .. } => Ok(()),
            _ => Err(corrupt("setting items of something that is not a dict")),
        }
    }

    fn push_new(&mut self, value: Value) -> Result<()> {
        if self.values.len() >= MAX_PICKLE_OBJECTS {
            return Err(exceeded(
                "the pickle's value count",
                format!("more than {MAX_PICKLE_OBJECTS}"),
                "MAX_PICKLE_OBJECTS",
                MAX_PICKLE_OBJECTS,
            ));
        }
        if let Value::Tuple(items) | Value::List(items) | Value::Set(items) = &value {
            if items.len() > MAX_PICKLE_CONTAINER {
                return Err(too_big(items.len()));
            }
        }
        if let Value::Dict(pairs) = &value {
            if pairs.len() > MAX_PICKLE_CONTAINER {
                return Err(too_big(pairs.len()));
            }
        }
        let id = self.values.len() as Id;
        self.values.push(value);
        self.push(id)
    }

    fn check_depth(&self) -> Result<()> {
        let depth = self.stack.len() + self.marks.len();
        if depth >= MAX_PICKLE_STACK {
            return Err(exceeded(
                "the pickle's stack depth",
                depth + 1,
                "MAX_PICKLE_STACK",
                MAX_PICKLE_STACK,
            ));
        }
        Ok(())
    }

    fn push(&mut self, id: Id) -> Result<()> {
        self.check_depth()?;
        self.stack.push(id);
        Ok(())
    }

    /// The height below which the innermost MARK hides the stack.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn top(&self) -> Result<Id> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.floor() => Ok(id),
            _ => Err(corrupt("the stack is empty")),
        }
    }

    fn pop(&mut self) -> Result<Id> {
        let id = self.top()?;
        self.stack.pop();
        Ok(id)
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Id>> {
        if self.stack.len() < self.floor() + n {
            return Err(corrupt("the stack is empty"));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| corrupt("no MARK to pop to"))?;
        Ok(self.stack.split_off(mark))
    }

    /// The next `n` bytes of the input; `n` is checked against what is left before use.
    fn bytes(&mut self, n: u64) -> Result<&[u8]> {
        let left = self.input.len() - self.pos;
        if n > left as u64 {
            return Err(corrupt(format!(
                "wants {n} bytes, {left} are left (truncated?)"
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.input[start..self.pos])
    }

    /// A little-endian unsigned integer of `n` ≤ 8 bytes.
    fn uint(&mut self, n: u64) -> Result<u64> {
        let mut b = [0; 8];
        b[..n as usize].copy_from_slice(self.bytes(n)?);
        Ok(u64::from_le_bytes(b))
    }

    /// A 4-byte signed length.
    fn len_i32(&mut self) -> Result<u64> {
        let v = self.uint(4)? as u32 as i32;
        u64::try_from(v).map_err(|_| corrupt(format!("negative length {v}")))
    }

    /// A newline-terminated ASCII line (GLOBAL's module and name).
    fn line(&mut self) -> Result<String> {
        let rest = &self.input[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| corrupt("a GLOBAL name without its newline"))?;
        self.pos += len + 1;
        Ok(String::from_utf8_lossy(&rest[..len]).into_owned())
    }
}

/// Key/value pairs from a flat run of items.
fn pairs(items: &[Id]) -> Result<Vec<(Id, Id)>> {
    if items.len() % 2 != 0 {
        return Err(corrupt("a dict with a key but no value"));
    }
    Ok(items.chunks_exact(2).map(|p| (p[0], p[1])).collect())
}

/// A LONG1/LONG4 little-endian two's-complement integer.
fn long(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::OtherNumber;
    }
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut b = [if negative { 0xff } else { 0 }; 8];
    b[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(b))
}

fn too_big(items: usize) -> crate::Error {
    exceeded(
        "a pickled container's item count",
        items,
        "MAX_PICKLE_CONTAINER",
        MAX_PICKLE_CONTAINER,
    )
}

/// An opcode's name for messages: pickletools' spelling where it is one torch writes.
fn name(op: u8) -> String {
    let known = match op {
        0x80 => "PROTO",
        0x95 => "FRAME",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        b'b' => "BUILD",
        b'(' => "MARK",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'}' => "EMPTY_DICT",
        b']' => "EMPTY_LIST",
        b')' => "EMPTY_TUPLE",
        0x8f => "EMPTY_SET",
        b't' => "TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b'l' => "LIST",
        b'd' => "DICT",
        0x91 => "FROZENSET",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        0x90 => "ADDITEMS",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'X' => "BINUNICODE",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8e => "BINBYTES8",
        0x96 => "BYTEARRAY8",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'G' => "BINFLOAT",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'N' => "NONE",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        // Written by other picklers (protocols 0 and 1, extensions, out-of-band buffers).
        b'i' => "INST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'g' => "GET",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'P' => "PERSID",
        0x82..=0x84 => "EXT",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "",
    };
    if known.is_empty() {
        format!("0x{op:02x}")
    } else {
        format!("{known} (0x{op:02x})")
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
    fn long1_is_twos_complement() {
        assert!(matches!(long(&[0xff]), Value::Int(-1)));
        assert!(matches!(long(&[0x00, 0x01]), Value::Int(256)));
        assert!(matches!(long(&[]), Value::Int(0)));
        assert!(matches!(long(&[0; 9]), Value::OtherNumber));
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
