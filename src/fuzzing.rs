//! The entry points of the fuzz targets in `fuzz/` that the crate does not otherwise make
//! public. Compiled only with the `fuzzing` feature; nothing here is API.

use http::{HeaderMap, Uri};

use crate::guard::jwt::{JwtGuard, TokenError};
use crate::proxy::detect::Protocol;

/// The protocol `buf` starts with, or `None` while more bytes could change the answer: what
/// [`crate::proxy::detect::detect`] decides after each read.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    crate::proxy::detect::classify(buf)
}

/// `policy.wasm` and `data.json` out of a bundle's gzip tarball, as a Wasm policy is loaded.
pub fn read_bundle(tarball: &[u8]) -> Result<(Vec<u8>, Option<serde_json::Value>), String> {
    crate::policy::wasm::read_bundle(tarball)
}

/// A request's token checked at a fixed instant, so a crash replays the same way.
pub fn authenticate_at(guard: &JwtGuard, headers: &HeaderMap, uri: &Uri, now: i64) -> Result<bool, TokenError> {
    guard.authenticate_at(headers, uri, now).map(|a| a.is_some())
}
