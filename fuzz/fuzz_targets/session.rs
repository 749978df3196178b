#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_bgp::fuzzing::session(data));
