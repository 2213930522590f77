//! The A1111 request body: arbitrary bytes through the server's txt2img and img2img parsing
//! (JSON, A1111's defaults and spellings, base64 init images, every limit check). A crash,
//! a hang or an allocation past libFuzzer's limit is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    sdrs_server::fuzz_a1111_request(body);
});
