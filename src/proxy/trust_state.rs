//! The newest trust roots this sidecar was sent, kept in a file (`--trust-state`).
//!
//! `--ca-bundle` (in a pod, `PALISADE_CA_BUNDLE_PEM`, frozen into the environment at
//! admission) is what the sidecar trusted when it was set up. After a CA rotation those roots
//! are retired, and a sidecar that restarted with them could no longer verify the control
//! plane, so it could never be told the new ones. The roots it is sent (with a certificate, in a
//! snapshot) are therefore written to this file as they change, and a restart starts from the
//! file. The file lives in a volume only the sidecar mounts, for as long as the pod.

use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::tls::BundleState;

/// Writes the roots in force to `path` whenever they change.
pub struct TrustState {
    path: PathBuf,
    /// The roots last written (or read at start).
    kept: Mutex<String>,
}

impl TrustState {
    /// The roots kept in `path` by an earlier run, if it holds usable ones. A missing file is
    /// the first start; an unusable one is reported and ignored (the caller falls back to
    /// `--ca-bundle`), and the next roots received replace it.
    pub fn read(path: &Path) -> Option<(String, BundleState)> {
        let pem = match std::fs::read_to_string(path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the kept trust roots; starting from --ca-bundle");
                return None;
            }
        };
        match BundleState::from_pem(&pem) {
            Ok(roots) => Some((pem, roots)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the kept trust roots are unusable; starting from --ca-bundle");
                None
            }
        }
    }

    /// Keeps roots in `path`; `initial` is what the sidecar starts with.
    pub fn new(path: PathBuf, initial: &str) -> Self {
        TrustState { path, kept: Mutex::new(initial.to_string()) }
    }

    /// Writes `pem` if it differs from what is kept: to a temporary file, then renamed over the
    /// old one, so a crash mid-write never leaves half a bundle. A failure is logged and the
    /// next change tries again; serving never depends on it.
    pub fn keep(&self, pem: &str) {
        let mut kept = self.kept.lock();
        if *kept == pem {
            return;
        }
        let tmp = self.path.with_extension("tmp");
        match std::fs::write(&tmp, pem).and_then(|()| std::fs::rename(&tmp, &self.path)) {
            Ok(()) => *kept = pem.to_string(),
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot keep the new trust roots"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem() -> String {
        crate::identity::CaMaterial::generate("cluster.local", 1).unwrap().root_cert_pem
    }

    #[test]
    fn roots_kept_by_one_run_are_what_the_next_starts_from() {
        let dir = std::env::temp_dir().join(format!("palisade-trust-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("roots.pem");
        assert!(TrustState::read(&path).is_none(), "nothing kept yet");
        let (first, second) = (pem(), pem());
        let state = TrustState::new(path.clone(), &first);
        state.keep(&first);
        assert!(!path.exists(), "what it started with is not written again");
        state.keep(&second);
        assert_eq!(TrustState::read(&path).unwrap().0, second);
        std::fs::write(&path, "not pem").unwrap();
        assert!(TrustState::read(&path).is_none(), "an unusable file is ignored");
    }
}
