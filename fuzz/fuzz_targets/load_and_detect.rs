//! libFuzzer target: arbitrary bytes as a checkpoint, through loading, layout detection,
//! planning and the fusion of every block found. Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = repvgg_fuse_fuzz::load_and_detect(data);
});
