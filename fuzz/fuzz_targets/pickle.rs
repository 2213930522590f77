//! A bare `data.pkl`: the pickle machine and the tensor records of its state dict, without the
//! zip around it, so that the fuzzer spends its time on opcodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sdrs::weights::fuzzing::pickle(data);
});
