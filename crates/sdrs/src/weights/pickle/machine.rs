//! The pickle virtual machine: one opcode at a time, onto an explicit stack, with every count
//! checked against its limit before anything grows.

use std::collections::HashMap;

use super::opcodes::*;
use super::{Id, Value};
use crate::limits::{
    exceeded, MAX_PICKLE_CONTAINER, MAX_PICKLE_OBJECTS, MAX_PICKLE_OPS, MAX_PICKLE_STACK,
};
use crate::weights::tensor_file::corrupt;
use crate::Result;

/// Runs `input` to its STOP: the values it made, and the one STOP returned.
pub(super) fn run(input: &[u8]) -> Result<(Vec<Value>, Id)> {
    Machine {
        input,
        pos: 0,
        values: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
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
    fn run(mut self) -> Result<(Vec<Value>, Id)> {
        for _ in 0..MAX_PICKLE_OPS {
            let at = self.pos;
            let op = *self
                .input
                .get(at)
                .ok_or_else(|| corrupt("the pickle ends without STOP (truncated?)"))?;
            self.pos += 1;
            if op == STOP {
                let root = self.pop()?;
                return Ok((self.values, root));
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
            PROTO => {
                let protocol = self.bytes(1)?[0];
                if protocol > 5 {
                    return Err(corrupt(format!("unknown pickle protocol {protocol}")));
                }
            }
            FRAME => {
                self.bytes(8)?; // a length hint
            }
            GLOBAL => {
                let module = self.line()?;
                let name = self.line()?;
                self.push_new(Value::Global { module, name })?;
            }
            STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (self.value(module), self.value(name))
                else {
                    return Err(corrupt("STACK_GLOBAL of something other than two strings"));
                };
                let (module, name) = (module.clone(), name.clone());
                self.push_new(Value::Global { module, name })?;
            }
            BINPERSID => {
                let pid = self.pop()?;
                self.push_new(Value::PersistentId(pid))?;
            }
            REDUCE | NEWOBJ => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?;
            }
            NEWOBJ_EX => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?;
            }
            BUILD => {
                let state = self.pop()?;
                let target = self.top()?;
                // Setting attributes: kept on objects; a dict's attributes (the state dict's
                // `_metadata`) are not its items.
                if let Value::Call { state: slot, .. } = &mut self.values[target as usize] {
                    *slot = Some(state);
                }
            }
            MARK => {
                self.check_depth()?;
                self.marks.push(self.stack.len());
            }
            POP => {
                self.pop()?;
            }
            POP_MARK => {
                self.pop_mark()?;
            }
            DUP => {
                let top = self.top()?;
                self.push(top)?;
            }
            EMPTY_DICT => self.push_new(Value::Dict(Vec::new()))?,
            EMPTY_LIST => self.push_new(Value::List(Vec::new()))?,
            EMPTY_TUPLE => self.push_new(Value::Tuple(Vec::new()))?,
            EMPTY_SET => self.push_new(Value::Set(Vec::new()))?,
            TUPLE => {
                let items = self.pop_mark()?;
                self.push_new(Value::Tuple(items))?;
            }
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let n = usize::from(op - TUPLE1) + 1;
                let items = self.pop_n(n)?;
                self.push_new(Value::Tuple(items))?;
            }
            LIST => {
                let items = self.pop_mark()?;
                self.push_new(Value::List(items))?;
            }
            FROZENSET => {
                let items = self.pop_mark()?;
                self.push_new(Value::Set(items))?;
            }
            DICT => {
                let items = self.pop_mark()?;
                let pairs = pairs(&items)?;
                self.push_new(Value::Dict(pairs))?;
            }
            SETITEM => {
                let items = self.pop_n(2)?;
                self.set_items(&items)?;
            }
            SETITEMS => {
                let items = self.pop_mark()?;
                self.set_items(&items)?;
            }
            APPEND => {
                let item = self.pop()?;
                self.append(&[item])?;
            }
            APPENDS | ADDITEMS => {
                let items = self.pop_mark()?;
                self.append(&items)?;
            }
            BINSTRING => {
                let len = self.len_i32()?;
                let s = String::from_utf8_lossy(self.bytes(len)?).into_owned();
                self.push_new(Value::Str(s))?;
            }
            SHORT_BINSTRING => {
                let len = self.bytes(1)?[0].into();
                let s = String::from_utf8_lossy(self.bytes(len)?).into_owned();
                self.push_new(Value::Str(s))?;
            }
            BINUNICODE | SHORT_BINUNICODE | BINUNICODE8 => {
                let len = match op {
                    BINUNICODE => self.uint(4)?,
                    SHORT_BINUNICODE => self.uint(1)?,
                    _ => self.uint(8)?,
                };
                let s = String::from_utf8_lossy(self.bytes(len)?).into_owned();
                self.push_new(Value::Str(s))?;
            }
            BINBYTES | SHORT_BINBYTES | BINBYTES8 | BYTEARRAY8 => {
                let len = match op {
                    BINBYTES => self.uint(4)?,
                    SHORT_BINBYTES => self.uint(1)?,
                    _ => self.uint(8)?,
                };
                self.bytes(len)?;
                self.push_new(Value::Bytes)?;
            }
            BININT => {
                let b = self.bytes(4)?;
                let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                self.push_new(Value::Int(v.into()))?;
            }
            BININT1 => {
                let v = self.uint(1)?;
                self.push_new(Value::Int(v as i64))?;
            }
            BININT2 => {
                let v = self.uint(2)?;
                self.push_new(Value::Int(v as i64))?;
            }
            LONG1 | LONG4 => {
                let len = if op == LONG1 {
                    self.uint(1)?
                } else {
                    self.len_i32()?
                };
                let value = long(self.bytes(len)?);
                self.push_new(value)?;
            }
            BINFLOAT => {
                self.bytes(8)?;
                self.push_new(Value::OtherNumber)?;
            }
            NEWTRUE | NEWFALSE => self.push_new(Value::Bool)?,
            NONE => self.push_new(Value::None)?,
            BINPUT | LONG_BINPUT => {
                let key = self.uint(if op == BINPUT { 1 } else { 4 })? as u32;
                let top = self.top()?;
                self.memo.insert(key, top);
            }
            MEMOIZE => {
                let key =
                    u32::try_from(self.memo.len()).map_err(|_| corrupt("the memo is full"))?;
                let top = self.top()?;
                self.memo.insert(key, top);
            }
            BINGET | LONG_BINGET => {
                let key = self.uint(if op == BINGET { 1 } else { 4 })? as u32;
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
    if !items.len().is_multiple_of(2) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long1_is_twos_complement() {
        assert!(matches!(long(&[0xff]), Value::Int(-1)));
        assert!(matches!(long(&[0x00, 0x01]), Value::Int(256)));
        assert!(matches!(long(&[]), Value::Int(0)));
        assert!(matches!(long(&[0; 9]), Value::OtherNumber));
    }
}
