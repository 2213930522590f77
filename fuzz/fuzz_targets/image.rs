//! Init-image decoding: arbitrary bytes through `decode_image` (format sniffing, the size
//! limits, strict JPEG decoding, EXIF orientation, alpha flattening) and through
//! `read_parameters` (PNG text chunks, a JPEG's EXIF UserComment, and the EXIF walk alone). A
//! crash, a hang or an allocation past libFuzzer's limit is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sdrs::image_io::decode_image(data);
    let _ = sdrs::image_io::read_parameters(data);
    let _ = sdrs::image_io::read_user_comment(data);
});
