//! Any bytes through the GGUF validator: it must return Ok or Err, never panic (overflow
//! checks are on in fuzz builds), never allocate what the input does not hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = llama_gguf::validate_bytes(data);
});
