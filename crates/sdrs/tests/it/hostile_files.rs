//! Files made to hurt the checkpoint readers, built here at run time (small zip, pickle and
//! safetensors writers below; no committed blobs). Each must give a clear error naming the
//! problem or the limit — no panic, no hang, bounded memory — or, where the file is merely
//! odd, load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use sdrs::weights::fuzzing;
use sdrs::weights::{Checkpoint, UpscalerFile};
use sdrs::Error;

pub(crate) mod writers;
use writers::{f32_bytes, good_checkpoint, safetensors, small_tensor, state_dict, torch_zip};
use writers::{Pickle, TensorSpec, Zip};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A scratch path in cargo's per-target temporary folder.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdrs-hostile-files");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The error opening `path` as a checkpoint, which must come quickly and mention every needle.
fn refused(path: &Path, needles: &[&str]) -> Error {
    let start = Instant::now();
    let err = match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    };
    assert_quick(start, path);
    let msg = err.to_string();
    for needle in needles {
        assert!(
            msg.contains(needle),
            "{}: {msg:?} lacks {needle:?}",
            path.display()
        );
    }
    err
}

fn assert_quick(start: Instant, what: &Path) {
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "{}: took {took:?}",
        what.display()
    );
}

/// The error reading the torch zip `bytes` (all tensors loaded), with every needle in it.
fn reader_error(bytes: &[u8], needles: &[&str]) -> Error {
    let err = fuzzing::checkpoint(bytes, true).expect_err("the hostile checkpoint was read");
    let msg = err.to_string();
    for needle in needles {
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }
    err
}

#[test]
fn the_builders_make_a_checkpoint_the_reader_loads() {
    let tensors = fuzzing::checkpoint_tensors(&good_checkpoint(), true).unwrap();
    assert_eq!(tensors.len(), 1);
    let (name, w) = &tensors[0];
    assert_eq!(name, "w");
    assert_eq!(
        w.to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 2.0], vec![3.0, 4.0]]
    );
}

// ---------------------------------------------------------------------------------------------
// Counts and sizes in the pickle.

#[test]
fn a_tensor_claiming_2_pow_40_elements_is_refused_before_allocation() {
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    // The storage claims 2^40 elements: its member holds 16 bytes.
    let huge_storage = TensorSpec {
        numel: 1 << 40,
        shape: vec![1 << 20, 1 << 20],
        stride: vec![1 << 20, 1],
        ..small_tensor()
    };
    let bytes = torch_zip(&state_dict(&huge_storage, |_| {}), &[("0", &data)]);
    let path = write("huge-storage.ckpt", &bytes);
    let err = refused(
        &path,
        &["tensor w", "1099511627776 elements", "holds 16 bytes"],
    );
    assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
    // The storage is honest; the shape reaches 2^40 elements into it.
    let huge_view = TensorSpec {
        shape: vec![1 << 20, 1 << 20],
        stride: vec![1 << 20, 1],
        ..small_tensor()
    };
    let bytes = torch_zip(&state_dict(&huge_view, |_| {}), &[("0", &data)]);
    reader_error(
        &bytes,
        &["tensor w", "reaches past its storage of 4 elements"],
    );
    // An offset and stride whose sum overflows 64 bits.
    let overflow = TensorSpec {
        offset: i64::MAX,
        shape: vec![2, 2],
        stride: vec![i64::MAX, 1],
        ..small_tensor()
    };
    let bytes = torch_zip(&state_dict(&overflow, |_| {}), &[("0", &data)]);
    reader_error(&bytes, &["reaches past its storage"]);
}

#[test]
fn a_million_deep_list_on_the_stack_hits_the_stack_limit() {
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    // [[[...]]] a million deep, as pickle writes it (`]` a million times, then APPEND), and
    // with marks (`(` a million times, then LIST).
    for (name, open, close) in [("lists", b']', b'a'), ("marks", b'(', b'l')] {
        let mut p = Pickle::new();
        p.ops(&vec![open; 1_000_000]).ops(&vec![close; 999_999]);
        let bytes = torch_zip(&p.finish(), &[("0", &data)]);
        let path = write(&format!("deep-{name}.ckpt"), &bytes);
        let err = refused(&path, &["stack depth", "MAX_PICKLE_STACK", "deep-"]);
        assert!(matches!(err, Error::Limit { .. }), "{err}");
        assert_eq!(err.to_string().matches("deep-").count(), 1, "{err}");
    }
}

#[test]
fn a_million_deep_list_built_through_the_memo_is_harmless() {
    // l0 = []; then a million times: memo[i-1].append(l_i = []) — nesting a million deep at a
    // constant stack depth. Reading and dropping it must not recurse.
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let pickle = state_dict(&small_tensor(), |p| {
        p.str("deep").op(b']').put(0);
        for i in 1..1_000_000u32 {
            p.get(i - 1).op(b']').put(i).op(b'a').op(b'0');
        }
    });
    let bytes = torch_zip(&pickle, &[("0", &data)]);
    write("deep-memo.ckpt", &bytes);
    assert_eq!(fuzzing::checkpoint(&bytes, true).unwrap(), 1);
}

#[test]
fn a_billion_laughs_pickle_stays_small() {
    // L1 = ["lol"] * 10, L2 = [L1] * 10, ... L30, each list memoized once it is full and
    // stored under its own key: 10^30 strings for a reader that copies memo entries, 300
    // references for one that shares them.
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let pickle = state_dict(&small_tensor(), |p| {
        p.str("lol").str("lol").put(0);
        for level in 1..=30u32 {
            p.str(&format!("laughs{level}")).op(b']').op(b'(');
            for _ in 0..10 {
                p.get(level - 1);
            }
            p.op(b'e').put(level);
        }
    });
    let bytes = torch_zip(&pickle, &[("0", &data)]);
    write("laughs.ckpt", &bytes);
    let start = Instant::now();
    assert_eq!(fuzzing::checkpoint(&bytes, true).unwrap(), 1);
    assert_quick(start, Path::new("billion laughs"));
}

#[test]
fn too_many_opcodes_values_or_items_hit_their_limits() {
    // Repeats `ops` `times` times after PROTO and reads the result.
    let read = |prefix: &[u8], ops: &[u8], times: usize, limit: &str| {
        let mut p = Pickle::new();
        p.ops(prefix).ops(&ops.repeat(times));
        reader_error(&torch_zip(&p.finish(), &[]), &[limit]);
    };
    // Nine million opcodes (a memo fetch and a POP, creating nothing).
    read(b"Nq\x00", b"h\x000", 4_500_000, "MAX_PICKLE_OPS");
    // Three million values (each pushed, then popped).
    read(b"", b"N0", 3_000_000, "MAX_PICKLE_OBJECTS");
    // One list of 1.1 million items (one shared None appended again and again).
    read(b"Nq\x00]", b"h\x00a", 1_100_000, "MAX_PICKLE_CONTAINER");
}

#[test]
fn an_unknown_opcode_is_named() {
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    for (op, name) in [(b'i', "INST (0x69)"), (0xff, "0xff"), (b'R', "REDUCE")] {
        let mut p = Pickle::new();
        p.op(op);
        let bytes = torch_zip(&p.finish(), &[("0", &data)]);
        write(&format!("opcode-{op:02x}.ckpt"), &bytes);
        reader_error(&bytes, &["pickle opcode", name]);
    }
}

#[test]
fn an_unknown_global_is_an_opaque_value_never_called() {
    // {"w": tensor, "evil": os.system("touch PWNED"), "obj": builtins.eval.__reduce__ ...}
    let marker = scratch("PWNED");
    let _ = std::fs::remove_file(&marker);
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let command = format!("touch {}", marker.display());
    let pickle = state_dict(&small_tensor(), |p| {
        p.str("evil")
            .global("os", "system")
            .op(b'(')
            .str(&command)
            .op(b't')
            .op(b'R');
        p.str("object")
            .global("builtins", "eval")
            .op(b'(')
            .str("__import__('os').system('true')")
            .op(b't')
            .op(0x81)
            .op(b'}')
            .op(b'b');
    });
    let bytes = torch_zip(&pickle, &[("0", &data)]);
    write("unknown-global.ckpt", &bytes);
    assert_eq!(fuzzing::checkpoint(&bytes, true).unwrap(), 1);
    assert!(!marker.exists(), "the pickle ran a command");
}

// ---------------------------------------------------------------------------------------------
// The zip container.

#[test]
fn twenty_thousand_entries_sharing_one_member_are_refused_at_once() {
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let pickle = state_dict(&small_tensor(), |_| {});
    let crc = crc32fast::hash(&data);
    // The same name 20,000 times, all pointing at one member.
    let mut zip = Zip::default();
    zip.member("archive/data.pkl", &pickle);
    let shared = zip.member("archive/data/0", &data);
    for _ in 0..20_000 {
        zip.entry("archive/data/0", shared, data.len() as u32, crc, 0);
    }
    let path = write("shared-names.ckpt", &zip.finish());
    refused(&path, &["two members are named \"archive/data/0\""]);
    // 20,000 different names pointing at one member's header, each a tensor's storage (a
    // reader that parses the directory again for each tensor spends minutes here).
    let many = state_dict(&small_tensor(), |p| {
        for i in 1..=20_000 {
            let spec = TensorSpec {
                key: i.to_string(),
                ..small_tensor()
            };
            p.str(&format!("w{i}")).tensor(&spec);
        }
    });
    let mut zip = Zip::default();
    zip.member("archive/data.pkl", &many);
    let shared = zip.member("archive/data/0", &data);
    for i in 1..=20_000 {
        zip.entry(
            &format!("archive/data/{i}"),
            shared,
            data.len() as u32,
            crc,
            0,
        );
    }
    let path = write("shared-member.ckpt", &zip.finish());
    refused(&path, &["local header does not match the directory"]);
    // Two members whose bytes overlap: the second's header lies inside the first's data.
    let mut zip = Zip::default();
    zip.member("archive/data.pkl", &pickle);
    let mut inner = Zip::default();
    inner.member("archive/data/0", &data);
    let inner_member = inner.out.clone();
    let outer = zip.member("archive/data/1", &inner_member);
    let inner_at = outer + 30 + "archive/data/1".len() as u32;
    zip.entry("archive/data/0", inner_at, data.len() as u32, crc, 0);
    let path = write("overlap.ckpt", &zip.finish());
    refused(&path, &["overlap"]);
}

#[test]
fn more_members_than_the_limit_are_refused_before_reading_them() {
    let mut zip = Zip::default();
    zip.member("archive/data.pkl", b"\x80\x02}.");
    let mut bytes = zip.finish();
    // Claim 200,000 entries in the zip64-less end record (it holds at most 65,535): patch a
    // zip64 end record in front of it instead.
    let end = bytes.len() - 22;
    let dir_start = u32::from_le_bytes(bytes[end + 16..end + 20].try_into().unwrap()) as u64;
    let dir_len = u32::from_le_bytes(bytes[end + 12..end + 16].try_into().unwrap()) as u64;
    let mut zip64 = Vec::new();
    zip64.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
    zip64.extend_from_slice(&44u64.to_le_bytes());
    zip64.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    zip64.extend_from_slice(&200_000u64.to_le_bytes());
    zip64.extend_from_slice(&200_000u64.to_le_bytes());
    zip64.extend_from_slice(&dir_len.to_le_bytes());
    zip64.extend_from_slice(&dir_start.to_le_bytes());
    let record_at = end as u64;
    zip64.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
    zip64.extend_from_slice(&0u32.to_le_bytes());
    zip64.extend_from_slice(&record_at.to_le_bytes());
    zip64.extend_from_slice(&1u32.to_le_bytes());
    let tail = bytes.split_off(end);
    bytes.extend_from_slice(&zip64);
    bytes.extend_from_slice(&tail);
    let path = write("many-members.ckpt", &bytes);
    refused(&path, &["member count", "200000", "MAX_ZIP_MEMBERS"]);
}

#[test]
fn a_flipped_byte_inside_a_tensor_fails_its_crc_naming_the_member() {
    let mut bytes = good_checkpoint();
    // The storage's data is the only run of these 16 bytes in the file.
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let at = bytes.windows(16).position(|w| w == data).unwrap();
    bytes[at + 5] ^= 0x40;
    reader_error(&bytes, &["member \"archive/data/0\" is corrupt", "CRC-32"]);

    // The same in a torch-written fixture: the file opens (names and shapes are in the
    // pickle), and reading the tensor in that member fails.
    let mut bytes = std::fs::read(fixture("tiny-sd1.ckpt")).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    write("flipped-byte.ckpt", &bytes);
    let err = fuzzing::checkpoint(&bytes, true).expect_err("a flipped byte went unnoticed");
    let msg = err.to_string();
    assert!(
        msg.contains("CRC-32") && msg.contains("tiny-sd1/data/"),
        "{msg}"
    );
    // A flipped byte in the pickle itself fails at open.
    let mut bytes = good_checkpoint();
    let key = b"X\x01\x00\x00\x00w";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at + key.len() - 1] = b'v';
    reader_error(&bytes, &["archive/data.pkl", "CRC-32"]);
}

#[test]
fn a_truncated_member_is_refused() {
    let pickle = state_dict(&small_tensor(), |_| {});
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    // The directory says 4 KiB; the member holds 16 bytes before the directory starts.
    let mut zip = Zip::default();
    zip.member("archive/data.pkl", &pickle);
    zip.member_as("archive/data/0", &data, 0, crc32fast::hash(&data), 4096);
    let path = write("truncated-member.ckpt", &zip.finish());
    refused(&path, &["archive/data/0", "truncated"]);
    // A whole file cut short loses its directory.
    let bytes = good_checkpoint();
    let path = write("cut.ckpt", &bytes[..bytes.len() - 30]);
    refused(&path, &["truncated"]);
}

#[test]
fn a_compressed_member_is_refused_saying_torch_stores_members() {
    let pickle = state_dict(&small_tensor(), |_| {});
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let mut zip = Zip::default();
    zip.member("archive/data.pkl", &pickle);
    zip.member_as("archive/data/0", &data, 8, crc32fast::hash(&data), 16);
    let path = write("deflated.ckpt", &zip.finish());
    refused(
        &path,
        &["compressed (method 8)", "torch writes stored members"],
    );
}

#[test]
fn transposed_tensors_load_and_other_strides_are_refused_clearly() {
    // Memory [1..6] read as a 2×3 tensor with strides (1, 2): [[1, 3, 5], [2, 4, 6]].
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let transposed = TensorSpec {
        numel: 6,
        shape: vec![2, 3],
        stride: vec![1, 2],
        ..small_tensor()
    };
    let bytes = torch_zip(&state_dict(&transposed, |_| {}), &[("0", &data)]);
    let tensors = fuzzing::checkpoint_tensors(&bytes, true).unwrap();
    assert_eq!(
        tensors[0].1.to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 3.0, 5.0], vec![2.0, 4.0, 6.0]]
    );
    // A broadcast row (stride 0) is not a dense layout.
    let broadcast = TensorSpec {
        numel: 6,
        shape: vec![2, 3],
        stride: vec![0, 1],
        ..small_tensor()
    };
    let bytes = torch_zip(&state_dict(&broadcast, |_| {}), &[("0", &data)]);
    reader_error(&bytes, &["tensor w", "not a dense one"]);
}

// ---------------------------------------------------------------------------------------------
// safetensors headers.

#[test]
fn a_duplicate_safetensors_key_is_refused() {
    let entry = r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#;
    let header = format!(
        r#"{{"model.diffusion_model.out.2.weight":{entry},"model.diffusion_model.out.2.weight":{entry}}}"#
    );
    let path = write("duplicate.safetensors", &safetensors(&header, 4));
    refused(
        &path,
        &["names \"model.diffusion_model.out.2.weight\" twice"],
    );
}

#[test]
fn safetensors_ranges_outside_the_file_or_unlike_the_shape_are_refused() {
    for (header, needle) in [
        (
            r#"{"a":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}"#,
            "lie outside the file's 16 data bytes",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,16]}}"#,
            "needs 4398046511104 bytes, its range holds 16",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,16]}}"#,
            "fits in 64 bits",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}"#,
            "lie outside",
        ),
    ] {
        let path = write("ranges.safetensors", &safetensors(header, 16));
        refused(&path, &["tensor a", needle]);
    }
    // A header length of 2^60 bytes.
    let mut bytes = (1u64 << 60).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let path = write("huge-header.safetensors", &bytes);
    refused(&path, &["header size", "MAX_SAFETENSORS_HEADER"]);
}

// ---------------------------------------------------------------------------------------------
// Architectures from names and configs.

fn load_safetensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn a_huge_number_in_a_tensor_name_is_refused_by_its_limit() {
    let mut tensors = load_safetensors(&fixture("tiny-sd1.safetensors"));
    let one = Tensor::zeros(1, DType::F16, &Device::Cpu).unwrap();
    tensors.insert(
        "model.diffusion_model.input_blocks.100000000000.0.weight".into(),
        one.clone(),
    );
    let path = scratch("huge-index.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = refused(
        &path,
        &[
            "input_blocks.100000000000.0.weight",
            "100000000001",
            "MAX_UNET_INPUT_BLOCKS",
        ],
    );
    assert!(matches!(err, Error::Limit { .. }), "{err}");
    // A number under the limit that leaves a gap is named too.
    tensors.remove("model.diffusion_model.input_blocks.100000000000.0.weight");
    tensors.insert("model.diffusion_model.input_blocks.40.0.weight".into(), one);
    let path = scratch("gap-index.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    refused(
        &path,
        &[
            "UNet input blocks",
            "have a gap, no model.diffusion_model.input_blocks.",
        ],
    );
}

/// A copy of the tiny diffusers folder with `edit` applied to one JSON file.
fn folder_with(name: &str, file: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let from = fixture("tiny-sd1");
    let to = scratch(name);
    let _ = std::fs::remove_dir_all(&to);
    for sub in ["unet", "vae", "text_encoder", "scheduler", "tokenizer"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for entry in std::fs::read_dir(from.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(sub).join(entry.file_name())).unwrap();
        }
    }
    std::fs::copy(from.join("model_index.json"), to.join("model_index.json")).unwrap();
    let path = to.join(file);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
    to
}

#[test]
fn a_huge_layers_per_block_in_a_folder_config_is_refused_by_its_limit() {
    let dir = folder_with("huge-layers", "unet/config.json", |j| {
        j["layers_per_block"] = 1_000_000_000.into()
    });
    let err = refused(
        &dir,
        &[
            "unet/config.json",
            "layers_per_block is 1000000000",
            "MAX_LAYERS_PER_BLOCK",
        ],
    );
    assert!(matches!(err, Error::Limit { .. }), "{err}");
    let dir = folder_with("huge-clip", "text_encoder/config.json", |j| {
        j["num_hidden_layers"] = 1_000_000.into()
    });
    refused(&dir, &["num_hidden_layers is 1000000", "MAX_CLIP_LAYERS"]);
}

#[test]
fn a_vae_scaling_factor_of_zero_is_refused() {
    for value in [0.0, -1.0] {
        let dir = folder_with("zero-scaling", "vae/config.json", |j| {
            j["scaling_factor"] = value.into()
        });
        let err = refused(&dir, &["vae/config.json", "scaling_factor is", "above 0"]);
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    }
}

#[test]
fn an_unknown_prediction_type_is_refused_naming_it() {
    let dir = folder_with(
        "sample-prediction",
        "scheduler/scheduler_config.json",
        |j| j["prediction_type"] = "sample".into(),
    );
    refused(
        &dir,
        &["unknown prediction_type \"sample\"", "v_prediction"],
    );
}

// ---------------------------------------------------------------------------------------------
// Upscaler files, whose architecture also comes from names and shapes.

#[test]
fn odd_upscaler_shapes_are_refused_without_panicking() {
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let cases: Vec<(&str, Vec<(&str, Tensor)>)> = vec![
        // A compact net whose first convolution has no input channels (was a division by 0).
        (
            "no input channels",
            vec![
                ("body.0.weight", zeros(&[4, 0, 3, 3])),
                ("body.1.weight", zeros(&[4])),
                ("body.2.weight", zeros(&[12, 4, 3, 3])),
            ],
        ),
        // RRDB with a scalar where a convolution belongs (was an index out of bounds).
        (
            "scalar",
            vec![
                ("conv_first.weight", zeros(&[4, 3, 3, 3])),
                ("body.0.rdb1.conv1.weight", zeros(&[])),
                ("conv_last.weight", zeros(&[3, 4, 3, 3])),
            ],
        ),
    ];
    for (what, tensors) in cases {
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let path = scratch("odd-upscaler.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        match UpscalerFile::open(&path) {
            Err(Error::UnsupportedCheckpoint { .. }) => {}
            Err(other) => panic!("{what}: {other}"),
            Ok(_) => panic!("{what}: opened"),
        }
    }
    // A channel count past the limit is named.
    let tensors: HashMap<String, Tensor> = [
        ("body.0.weight", zeros(&[1, 3, 1, 1])),
        ("body.1.weight", zeros(&[1])),
        ("body.2.weight", zeros(&[100_000, 1, 1, 1])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let path = scratch("wide-upscaler.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = UpscalerFile::open(&path).err().expect("opened");
    assert!(err.to_string().contains("MAX_CHANNELS"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Torch-written files still read as before.

#[test]
fn torch_written_files_load_to_the_same_numbers_as_candles_reader() {
    for (file, key) in [
        ("tiny-sd1.ckpt", Some("state_dict")),
        ("tiny-vae-nowrap.ckpt", None),
        ("tiny-sd1-bin/text_encoder/pytorch_model.bin", None),
    ] {
        let path = fixture(file);
        let ours = fuzzing::checkpoint_tensors(&std::fs::read(&path).unwrap(), true).unwrap();
        let theirs: HashMap<String, Tensor> = candle_core::pickle::read_all_with_key(&path, key)
            .unwrap()
            .into_iter()
            .collect();
        // Ours also reads int32 storages (the EMA's `num_updates`), which candle's leaves out.
        for (name, got) in &ours {
            let Some(want) = theirs.get(name) else {
                assert_eq!(got.dtype(), DType::I32, "{file}: {name} is ours alone");
                continue;
            };
            assert_eq!(got.dtype(), want.dtype(), "{file}: {name}");
            assert_eq!(got.dims(), want.dims(), "{file}: {name}");
            let (got, want) = (
                got.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
                want.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
            );
            let (got, want) = (
                got.to_vec1::<f32>().unwrap(),
                want.to_vec1::<f32>().unwrap(),
            );
            let differ = got
                .iter()
                .zip(&want)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(
                differ, None,
                "{file}: {name} differs at flat index {differ:?}"
            );
        }
        assert!(
            theirs
                .keys()
                .all(|name| ours.iter().any(|(n, _)| n == name)),
            "{file}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// What the CRC-32 check costs.

/// Times opening and loading every tensor of a full-size SD 1.5 `.ckpt` with and without the
/// CRC-32 check. Make the file with torch (fp32, like v1-5-pruned-emaonly.ckpt, ~4.3 GB), e.g.
/// `torch.save({"state_dict": sd}, "/tmp/sd15-random.ckpt")` over `tools/full_size.py`'s
/// random SD 1.5 weights in CompVis names; the path is overridable with `SDRS_FULL_SIZE_CKPT`.
/// Run with `cargo test --release -p sdrs --test it hostile_files:: -- --ignored --nocapture`.
#[test]
#[ignore]
fn full_size_ckpt_crc_cost() {
    let path = std::env::var("SDRS_FULL_SIZE_CKPT").unwrap_or("/tmp/sd15-random.ckpt".into());
    let path = Path::new(&path);
    let time = |verify: bool| {
        let start = Instant::now();
        let bytes = fuzzing::load_checkpoint(path, verify).unwrap();
        (start.elapsed().as_secs_f64(), bytes)
    };
    // The first passes bring the file into the page cache.
    time(false);
    time(true);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let mut total = 0;
    for _ in 0..3 {
        let (t, bytes) = time(true);
        with.push(t);
        without.push(time(false).0);
        total = bytes;
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (w, wo) = (best(&with), best(&without));
    println!(
        "{}: {:.2} GB of tensors; open + load all: {wo:.2} s without CRC, {w:.2} s with \
         (+{:.0}%, {:.1} GB/s of CRC); runs with {with:.2?}, without {without:.2?}",
        path.display(),
        total as f64 / 1e9,
        100.0 * (w - wo) / wo,
        total as f64 / 1e9 / (w - wo).max(1e-9),
    );
}
