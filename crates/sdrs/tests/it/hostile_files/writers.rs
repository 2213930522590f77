//! Small writers for the hostile files: stored zip archives with their central directory
//! written as told, pickles opcode by opcode, torch checkpoints, safetensors headers.

// A zip writer: stored members, and the central directory written as told.

#[derive(Default)]
pub struct Zip {
    pub out: Vec<u8>,
    central: Vec<u8>,
    entries: usize,
}

impl Zip {
    /// A stored member with its right CRC; returns its local header's offset.
    pub fn member(&mut self, name: &str, data: &[u8]) -> u32 {
        self.member_as(name, data, 0, crc32fast::hash(data), data.len() as u32)
    }

    /// A member as told: compression `method`, `crc` and the `size` the directory claims.
    pub fn member_as(&mut self, name: &str, data: &[u8], method: u16, crc: u32, size: u32) -> u32 {
        let offset = self.out.len() as u32;
        self.out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        self.out.extend_from_slice(&20u16.to_le_bytes()); // version
        self.out.extend_from_slice(&0u16.to_le_bytes()); // flags
        self.out.extend_from_slice(&method.to_le_bytes());
        self.out.extend_from_slice(&[0; 4]); // time, date
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.out.extend_from_slice(&size.to_le_bytes());
        self.out.extend_from_slice(&size.to_le_bytes());
        self.out
            .extend_from_slice(&(name.len() as u16).to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes()); // extra
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(data);
        self.entry(name, offset, size, crc, method);
        offset
    }

    /// A central-directory entry only, pointing wherever it is told.
    pub fn entry(&mut self, name: &str, offset: u32, size: u32, crc: u32, method: u16) {
        let c = &mut self.central;
        c.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        c.extend_from_slice(&[20, 0, 20, 0]); // versions
        c.extend_from_slice(&0u16.to_le_bytes()); // flags
        c.extend_from_slice(&method.to_le_bytes());
        c.extend_from_slice(&[0; 4]);
        c.extend_from_slice(&crc.to_le_bytes());
        c.extend_from_slice(&size.to_le_bytes());
        c.extend_from_slice(&size.to_le_bytes());
        c.extend_from_slice(&(name.len() as u16).to_le_bytes());
        c.extend_from_slice(&[0; 4]); // extra, comment
        c.extend_from_slice(&[0; 8]); // disk, attributes
        c.extend_from_slice(&offset.to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        self.entries += 1;
    }

    pub fn finish(mut self) -> Vec<u8> {
        let start = self.out.len() as u32;
        self.out.extend_from_slice(&self.central);
        self.out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        self.out.extend_from_slice(&[0; 4]); // disks
        self.out
            .extend_from_slice(&(self.entries as u16).to_le_bytes());
        self.out
            .extend_from_slice(&(self.entries as u16).to_le_bytes());
        self.out
            .extend_from_slice(&(self.central.len() as u32).to_le_bytes());
        self.out.extend_from_slice(&start.to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes());
        self.out
    }
}

// ---------------------------------------------------------------------------------------------
// A pickle writer: the opcodes torch.save uses, and any byte we like.

pub struct Pickle(Vec<u8>);

impl Pickle {
    pub fn new() -> Self {
        Pickle(vec![0x80, 2])
    }

    pub fn op(&mut self, op: u8) -> &mut Self {
        self.0.push(op);
        self
    }

    pub fn ops(&mut self, ops: &[u8]) -> &mut Self {
        self.0.extend_from_slice(ops);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.op(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.ops(s.as_bytes())
    }

    pub fn int(&mut self, v: i64) -> &mut Self {
        if let Ok(small) = i32::try_from(v) {
            self.op(b'J').ops(&small.to_le_bytes())
        } else {
            self.ops(&[0x8a, 8]).ops(&v.to_le_bytes())
        }
    }

    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b'c');
        self.ops(format!("{module}\n{name}\n").as_bytes())
    }

    pub fn put(&mut self, key: u32) -> &mut Self {
        self.op(b'r').ops(&key.to_le_bytes())
    }

    pub fn get(&mut self, key: u32) -> &mut Self {
        self.op(b'j').ops(&key.to_le_bytes())
    }

    pub fn ints(&mut self, values: &[i64]) -> &mut Self {
        self.op(b'(');
        for &v in values {
            self.int(v);
        }
        self.op(b't')
    }

    /// `torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())`.
    pub fn tensor(&mut self, t: &TensorSpec) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b'(');
        self.op(b'(')
            .str("storage")
            .global("torch", t.class)
            .str(&t.key)
            .str("cpu")
            .int(t.numel)
            .op(b't')
            .op(b'Q');
        self.int(t.offset).ints(&t.shape).ints(&t.stride).op(0x89);
        self.global("collections", "OrderedDict").op(b')').op(b'R');
        self.op(b't').op(b'R')
    }

    pub fn finish(&mut self) -> Vec<u8> {
        self.op(b'.');
        std::mem::take(&mut self.0)
    }
}

pub struct TensorSpec {
    pub class: &'static str,
    pub key: String,
    pub numel: i64,
    pub offset: i64,
    pub shape: Vec<i64>,
    pub stride: Vec<i64>,
}

/// A 2×2 float32 tensor in storage "0".
pub fn small_tensor() -> TensorSpec {
    TensorSpec {
        class: "FloatStorage",
        key: "0".into(),
        numel: 4,
        offset: 0,
        shape: vec![2, 2],
        stride: vec![2, 1],
    }
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A pickle of `{"w": tensor, ...more}`: `more` adds key/value pairs to the dict.
pub fn state_dict(tensor: &TensorSpec, more: impl FnOnce(&mut Pickle)) -> Vec<u8> {
    let mut p = Pickle::new();
    p.op(b'}').op(b'(').str("w").tensor(tensor);
    more(&mut p);
    p.op(b'u').finish()
}

/// A torch zip of `pickle` and storage members `archive/data/KEY`.
pub fn torch_zip(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = Zip::default();
    zip.member("archive/data.pkl", pickle);
    zip.member("archive/byteorder", b"little");
    for (key, data) in storages {
        zip.member(&format!("archive/data/{key}"), data);
    }
    zip.finish()
}

/// The well-formed checkpoint the hostile ones are variations of: `{"w": [[1, 2], [3, 4]]}`.
pub fn good_checkpoint() -> Vec<u8> {
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    torch_zip(&state_dict(&small_tensor(), |_| {}), &[("0", &data)])
}

/// A safetensors file with `header` and `data_len` zero bytes of data.
pub fn safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    bytes
}
