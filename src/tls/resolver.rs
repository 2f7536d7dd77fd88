//! The workload's own certificate, swapped atomically on renewal.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Holds the current certificate and key for both directions of mTLS.
///
/// A renewal stores a new `CertifiedKey`; handshakes that start afterwards use it, connections
/// already open keep theirs. Once the certificate has expired the store answers with no
/// certificate at all, so new handshakes fail closed instead of presenting a dead credential.
#[derive(Default, Debug)]
pub struct CertStore {
    current: ArcSwapOption<CertifiedKey>,
    not_after: AtomicI64,
}

impl CertStore {
    /// An empty store: handshakes fail until the first certificate arrives.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs a certificate valid until `not_after` (Unix seconds).
    pub fn set(&self, key: Arc<CertifiedKey>, not_after: i64) {
        self.current.store(Some(key));
        self.not_after.store(not_after, Ordering::Release);
    }

    /// The certificate, if there is one and it has not expired.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        if crate::clock::now_unix() >= self.not_after.load(Ordering::Acquire) {
            return None;
        }
        self.current.load_full()
    }

    /// Expiry of the held certificate (Unix seconds; 0 when none).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Acquire)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
