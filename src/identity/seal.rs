//! CA private keys sealed at rest: AES-256-GCM under a key-encryption key (KEK).
//!
//! A sealed value is one line, `palisade-sealed-v1:` then base64 of nonce (12 random bytes),
//! ciphertext and tag, so it is told apart from a PEM key (`-----BEGIN`) and from a PKCS#11
//! reference (`pkcs11:`) at a glance, and a later format gets a new prefix. The associated data
//! names what the value is (its place, its role, and a digest of its certificate), so a sealed key
//! copied into another row or another Secret does not open there.

use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The prefix of every sealed value (format version 1).
pub const SEALED_PREFIX: &str = "palisade-sealed-v1:";

/// A KEK failure: the key could not be read, or a value did not open under it.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("reading the CA key-encryption key {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(
        "the CA key-encryption key from {from} is neither 32 raw bytes nor base64 of 32 bytes ({len} bytes after decoding)"
    )]
    Length { from: String, len: usize },
    #[error("the CA key-encryption key from {from} is not valid base64: {cause}")]
    Base64 { from: String, cause: base64::DecodeError },
    #[error("a sealed CA key is malformed (not {SEALED_PREFIX} followed by base64 of nonce, ciphertext and tag)")]
    Malformed,
    /// Wrong key, or the value was moved from where it was sealed, or it was altered.
    #[error("the sealed CA key does not open under this key-encryption key")]
    Refused,
}

/// A 256-bit key-encryption key. Its bytes live only inside aws-lc's key schedule.
pub struct Kek {
    key: RandomizedNonceKey,
    /// Where it came from, for log lines and errors (never the key itself).
    origin: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl Kek {
    /// A KEK from `bytes`: exactly 32 raw bytes, or base64 (standard alphabet, surrounding
    /// whitespace ignored) of 32 bytes. `origin` names the source in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self, SealError> {
        if bytes.len() == 32 {
            return Self::raw(bytes, origin);
        }
        let text = String::from_utf8_lossy(bytes);
        let decoded =
            STANDARD.decode(text.trim()).map_err(|cause| SealError::Base64 { from: origin.to_string(), cause })?;
        Self::raw(&decoded, origin)
    }

    /// Reads a KEK file (32 raw bytes or base64 of 32 bytes).
    pub fn from_file(path: &Path) -> Result<Self, SealError> {
        let bytes =
            std::fs::read(path).map_err(|source| SealError::Read { path: path.display().to_string(), source })?;
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "the CA key-encryption key file is readable by group or others");
            }
        }
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    fn raw(bytes: &[u8], origin: &str) -> Result<Self, SealError> {
        if bytes.len() != 32 {
            return Err(SealError::Length { from: origin.to_string(), len: bytes.len() });
        }
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes)
            .map_err(|_| SealError::Length { from: origin.to_string(), len: bytes.len() })?;
        Ok(Kek { key, origin: origin.to_string() })
    }

    /// The same key, named differently in errors (e.g. by the flag that gave it).
    pub fn with_origin(mut self, origin: String) -> Self {
        self.origin = origin;
        self
    }

    /// Where this key came from (a path, an environment variable, a Secret).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Seals `plaintext`, bound to `aad`, with a fresh random 96-bit nonce.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> String {
        let mut in_out = plaintext.to_vec();
        // Sealing fails only on absurd lengths (> 64 GiB), never for a key.
        let nonce = self.key.seal_in_place_append_tag(Aad::from(aad), &mut in_out).expect("AES-GCM seals a CA key");
        let mut blob = nonce.as_ref().to_vec();
        blob.extend_from_slice(&in_out);
        format!("{SEALED_PREFIX}{}", STANDARD.encode(blob))
    }

    /// Opens a value made by [`seal`](Self::seal) with the same `aad`.
    pub fn open(&self, sealed: &str, aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let b64 = sealed.trim().strip_prefix(SEALED_PREFIX).ok_or(SealError::Malformed)?;
        let blob = STANDARD.decode(b64).map_err(|_| SealError::Malformed)?;
        if blob.len() < NONCE_LEN + 16 {
            return Err(SealError::Malformed);
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Malformed)?;
        let mut in_out = ct.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(aad), &mut in_out).map_err(|_| SealError::Refused)?;
        Ok(plain.to_vec())
    }
}

/// Whether `value` is a sealed value (of any version this build knows).
pub fn is_sealed(value: &str) -> bool {
    value.trim_start().starts_with(SEALED_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(byte: u8) -> Kek {
        Kek::from_bytes(&[byte; 32], "test").unwrap()
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let k = kek(7);
        let a = k.seal(b"secret key", b"gen 1 root");
        let b = k.seal(b"secret key", b"gen 1 root");
        assert!(is_sealed(&a) && a != b, "each seal draws its own nonce");
        assert!(!a.contains("secret"));
        assert_eq!(k.open(&a, b"gen 1 root").unwrap(), b"secret key");
    }

    #[test]
    fn wrong_key_other_context_or_altered_value_is_refused() {
        let sealed = kek(1).seal(b"secret key", b"gen 1 intermediate");
        assert!(matches!(kek(2).open(&sealed, b"gen 1 intermediate"), Err(SealError::Refused)));
        assert!(matches!(kek(1).open(&sealed, b"gen 2 intermediate"), Err(SealError::Refused)));
        let mut blob = STANDARD.decode(sealed.strip_prefix(SEALED_PREFIX).unwrap()).unwrap();
        *blob.last_mut().unwrap() ^= 1;
        let altered = format!("{SEALED_PREFIX}{}", STANDARD.encode(blob));
        assert!(matches!(kek(1).open(&altered, b"gen 1 intermediate"), Err(SealError::Refused)));
        assert!(matches!(kek(1).open("-----BEGIN PRIVATE KEY-----", b""), Err(SealError::Malformed)));
    }

    #[test]
    fn accepts_raw_or_base64_of_32_bytes_only() {
        let b64 = STANDARD.encode([9u8; 32]);
        let from_b64 = Kek::from_bytes(format!("{b64}\n").as_bytes(), "file").unwrap();
        assert_eq!(kek(9).open(&from_b64.seal(b"x", b"a"), b"a").unwrap(), b"x");
        let short = STANDARD.encode([9u8; 16]);
        let err = Kek::from_bytes(short.as_bytes(), "PALISADE_CA_KEK").unwrap_err();
        assert!(matches!(err, SealError::Length { len: 16, .. }), "{err}");
        assert!(matches!(Kek::from_bytes(b"not base64!", "f"), Err(SealError::Base64 { .. })));
    }
}
