//! LoRA files and layer shapes. The first byte picks the mode and the weight's number of sides
//! (1–4), the next four bytes its sides (1–64 each); then, in file mode (even first byte), the
//! rest is a whole LoRA file (safetensors or torch zip) read as a generation reads it, every
//! complete layer rebuilt for that weight; in shape mode (odd), the rest lays out one layer's
//! parts of any shape (see `sdrs::lora::fuzzing::delta_of_shapes`) and its change is rebuilt.
//! A crash, an overflow, a hang or an allocation past libFuzzer's limit is a finding.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sdrs::lora::fuzzing;

/// The file the bytes are written to: the reader maps a path, as it does in use.
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("sdrs-fuzz-lora-{}", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_at_checked(5) else {
        return;
    };
    let sides = 1 + (head[0] as usize / 2) % 4;
    let target: Vec<usize> = head[1..=sides]
        .iter()
        .map(|&b| 1 + b as usize % 64)
        .collect();
    if head[0] % 2 == 0 {
        if std::fs::write(scratch(), rest).is_ok() {
            let _ = fuzzing::lora_file(scratch(), &target);
        }
    } else {
        let _ = fuzzing::delta_of_shapes(rest, &target);
    }
});
