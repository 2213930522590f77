//! A torch zip checkpoint (the bytes are the whole file): the zip directory, data.pkl and
//! every tensor loaded. CRC-32 checks are off here so that mutations inside a member reach the
//! pickle reader and the tensor records instead of stopping at the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sdrs::weights::fuzzing::checkpoint(data, false);
});
