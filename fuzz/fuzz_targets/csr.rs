//! Certificate signing requests at the CA (`identity::csr`): any bytes are refused with a reason
//! or verified (self-signature checked, key type allowed); never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::identity::csr::{MAX_CSR_BYTES, verify_csr};

fuzz_target!(|data: &[u8]| {
    let verdict = verify_csr(data);
    if data.len() > MAX_CSR_BYTES {
        assert!(verdict.is_err(), "an oversized CSR was accepted");
    }
});
