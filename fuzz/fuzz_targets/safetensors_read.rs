//! Fuzz target: any bytes given to the safetensors reader give `Ok` or `Err`, never a panic,
//! an abort or undefined behaviour; and every tensor of an accepted file can be taken and read.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_io::fuzz::exercise(data);
});
