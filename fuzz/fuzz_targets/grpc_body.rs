#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ca_fuzz_targets::grpc_body(data));
