//! The pickle opcodes `torch.save` writes (protocol 2 and up), by pickletools' names.

pub(super) const PROTO: u8 = 0x80;
pub(super) const FRAME: u8 = 0x95;
pub(super) const STOP: u8 = b'.';
pub(super) const GLOBAL: u8 = b'c';
pub(super) const STACK_GLOBAL: u8 = 0x93;
pub(super) const BINPERSID: u8 = b'Q';
pub(super) const REDUCE: u8 = b'R';
pub(super) const NEWOBJ: u8 = 0x81;
pub(super) const NEWOBJ_EX: u8 = 0x92;
pub(super) const BUILD: u8 = b'b';
pub(super) const MARK: u8 = b'(';
pub(super) const POP: u8 = b'0';
pub(super) const POP_MARK: u8 = b'1';
pub(super) const DUP: u8 = b'2';
pub(super) const EMPTY_DICT: u8 = b'}';
pub(super) const EMPTY_LIST: u8 = b']';
pub(super) const EMPTY_TUPLE: u8 = b')';
pub(super) const EMPTY_SET: u8 = 0x8f;
pub(super) const TUPLE: u8 = b't';
pub(super) const TUPLE1: u8 = 0x85;
pub(super) const TUPLE2: u8 = 0x86;
pub(super) const TUPLE3: u8 = 0x87;
pub(super) const LIST: u8 = b'l';
pub(super) const DICT: u8 = b'd';
pub(super) const FROZENSET: u8 = 0x91;
pub(super) const SETITEM: u8 = b's';
pub(super) const SETITEMS: u8 = b'u';
pub(super) const APPEND: u8 = b'a';
pub(super) const APPENDS: u8 = b'e';
pub(super) const ADDITEMS: u8 = 0x90;
pub(super) const BINSTRING: u8 = b'T';
pub(super) const SHORT_BINSTRING: u8 = b'U';
pub(super) const BINUNICODE: u8 = b'X';
pub(super) const SHORT_BINUNICODE: u8 = 0x8c;
pub(super) const BINUNICODE8: u8 = 0x8d;
pub(super) const BINBYTES: u8 = b'B';
pub(super) const SHORT_BINBYTES: u8 = b'C';
pub(super) const BINBYTES8: u8 = 0x8e;
pub(super) const BYTEARRAY8: u8 = 0x96;
pub(super) const BININT: u8 = b'J';
pub(super) const BININT1: u8 = b'K';
pub(super) const BININT2: u8 = b'M';
pub(super) const LONG1: u8 = 0x8a;
pub(super) const LONG4: u8 = 0x8b;
pub(super) const BINFLOAT: u8 = b'G';
pub(super) const NEWTRUE: u8 = 0x88;
pub(super) const NEWFALSE: u8 = 0x89;
pub(super) const NONE: u8 = b'N';
pub(super) const BINPUT: u8 = b'q';
pub(super) const LONG_BINPUT: u8 = b'r';
pub(super) const MEMOIZE: u8 = 0x94;
pub(super) const BINGET: u8 = b'h';
pub(super) const LONG_BINGET: u8 = b'j';

/// Names for messages: the opcodes above, and those other picklers write (protocols 0 and 1,
/// extensions, out-of-band buffers), which this reader refuses.
const NAMES: &[(u8, &str)] = &[
    (PROTO, "PROTO"),
    (FRAME, "FRAME"),
    (STOP, "STOP"),
    (GLOBAL, "GLOBAL"),
    (STACK_GLOBAL, "STACK_GLOBAL"),
    (BINPERSID, "BINPERSID"),
    (REDUCE, "REDUCE"),
    (NEWOBJ, "NEWOBJ"),
    (NEWOBJ_EX, "NEWOBJ_EX"),
    (BUILD, "BUILD"),
    (MARK, "MARK"),
    (POP, "POP"),
    (POP_MARK, "POP_MARK"),
    (DUP, "DUP"),
    (EMPTY_DICT, "EMPTY_DICT"),
    (EMPTY_LIST, "EMPTY_LIST"),
    (EMPTY_TUPLE, "EMPTY_TUPLE"),
    (EMPTY_SET, "EMPTY_SET"),
    (TUPLE, "TUPLE"),
    (TUPLE1, "TUPLE1"),
    (TUPLE2, "TUPLE2"),
    (TUPLE3, "TUPLE3"),
    (LIST, "LIST"),
    (DICT, "DICT"),
    (FROZENSET, "FROZENSET"),
    (SETITEM, "SETITEM"),
    (SETITEMS, "SETITEMS"),
    (APPEND, "APPEND"),
    (APPENDS, "APPENDS"),
    (ADDITEMS, "ADDITEMS"),
    (BINSTRING, "BINSTRING"),
    (SHORT_BINSTRING, "SHORT_BINSTRING"),
    (BINUNICODE, "BINUNICODE"),
    (SHORT_BINUNICODE, "SHORT_BINUNICODE"),
    (BINUNICODE8, "BINUNICODE8"),
    (BINBYTES, "BINBYTES"),
    (SHORT_BINBYTES, "SHORT_BINBYTES"),
    (BINBYTES8, "BINBYTES8"),
    (BYTEARRAY8, "BYTEARRAY8"),
    (BININT, "BININT"),
    (BININT1, "BININT1"),
    (BININT2, "BININT2"),
    (LONG1, "LONG1"),
    (LONG4, "LONG4"),
    (BINFLOAT, "BINFLOAT"),
    (NEWTRUE, "NEWTRUE"),
    (NEWFALSE, "NEWFALSE"),
    (NONE, "NONE"),
    (BINPUT, "BINPUT"),
    (LONG_BINPUT, "LONG_BINPUT"),
    (MEMOIZE, "MEMOIZE"),
    (BINGET, "BINGET"),
    (LONG_BINGET, "LONG_BINGET"),
    (b'i', "INST"),
    (b'o', "OBJ"),
    (b'p', "PUT"),
    (b'g', "GET"),
    (b'I', "INT"),
    (b'L', "LONG"),
    (b'F', "FLOAT"),
    (b'S', "STRING"),
    (b'V', "UNICODE"),
    (b'P', "PERSID"),
    (0x82, "EXT1"),
    (0x83, "EXT2"),
    (0x84, "EXT4"),
    (0x97, "NEXT_BUFFER"),
    (0x98, "READONLY_BUFFER"),
];

/// An opcode as messages show it: `BINUNICODE (0x58)`, or `0xff` for no opcode at all.
pub(super) fn name(op: u8) -> String {
    match NAMES.iter().find(|(code, _)| *code == op) {
        Some((_, name)) => format!("{name} (0x{op:02x})"),
        None => format!("0x{op:02x}"),
    }
}
