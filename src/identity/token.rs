//! Join tokens: one-time credentials that bind a new workload to one identity (standalone mode).

use aws_lc_rs::digest;
use base64::Engine;

const PREFIX: &str = "pjt_";

/// A freshly minted token. Only its hash is stored; the token itself is shown once.
pub struct JoinToken {
    pub token: String,
    pub hash: String,
}

/// Mints a 256-bit random token.
pub fn mint() -> JoinToken {
    let raw: [u8; 32] = rand::random();
    let token = format!("{PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
    let hash = hash(&token);
    JoinToken { token, hash }
}

/// The stored form of a token: SHA-256, hex. A stolen database does not yield usable tokens.
pub fn hash(token: &str) -> String {
    crate::hex::encode(digest::digest(&digest::SHA256, token.trim().as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_unique_and_hash_stably() {
        let a = super::mint();
        let b = super::mint();
        assert_ne!(a.token, b.token);
        assert_eq!(super::hash(&a.token), a.hash);
        assert_eq!(super::hash(&format!("{}\n", a.token)), a.hash, "a trailing newline from a file is ignored");
    }
}
