//! Protocol detection on the first bytes of a connection (`proxy::detect`): whatever arrives,
//! the answer is stable (a decision on a prefix stands for every longer input) and the HTTP/2
//! preface is always HTTP/2.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::fuzzing::classify;
use palisade::proxy::detect::{H2_PREFACE, MAX_PREFIX, Protocol};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_PREFIX)];
    let whole = classify(data);
    if data.starts_with(H2_PREFACE) {
        assert_eq!(whole, Some(Protocol::Http2));
    }
    // Bytes arrive in any split: a decision made after any read stands.
    for cut in [1, 4, 16, data.len() / 2, data.len().saturating_sub(1)] {
        if cut <= data.len()
            && let Some(early) = classify(&data[..cut])
        {
            assert_eq!(whole, Some(early), "decided {early:?} on {cut} bytes, {whole:?} on {}", data.len());
        }
    }
});
