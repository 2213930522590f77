//! A safetensors file's header (the bytes are the whole file): our check must answer Ok or
//! Err, never panic, hang or allocate what the header merely claims.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sdrs::weights::fuzzing::safetensors_header(data);
});
