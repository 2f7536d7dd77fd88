//! A Wasm policy bundle's gzip tarball (`policy::wasm`): any bytes unpack to `policy.wasm` and
//! `data.json` or to an error, within the size bound, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((wasm, _data)) = palisade::fuzzing::read_bundle(data) {
        assert!(wasm.len() <= 64 << 20);
    }
});
