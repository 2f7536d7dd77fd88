//! The sidecar's certificate manager: gets the first certificate, renews it for ever.
//!
//! - The private key is generated in memory for every request and never leaves the process.
//! - Renewal happens at 50% of the lifetime ±10% jitter, so a fleet started together does not
//!   renew together.
//! - A failed renewal keeps the current certificate in service and retries with capped, jittered
//!   exponential backoff; only expiry takes the certificate away (handshakes then fail closed).
//! - The trust roots a Certify response carries are published on [`CertManager::roots`], not
//!   installed: the trust bundle belongs to whoever applies the mesh's configuration (in the
//!   sidecar, the discovery snapshot applier), so it has one writer.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::{CertEvents, CertMetrics, Certifier, CertifyError};
use crate::backoff::Backoff;
use crate::clock::now_unix;
use crate::proto::identity::CertifyRequest;
use crate::proto::identity::certify_request::Credential;
use crate::proto::telemetry::{CertificateEvent, certificate_event::Kind};
use crate::tls::CertStore;

/// Why a certificate could not be obtained or installed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Certify(#[from] CertifyError),
    #[error("key generation failed: {0}")]
    Key(#[from] rcgen::Error),
    #[error("control plane returned an unusable certificate: {0}")]
    BadResponse(String),
    #[error("reading the service-account token: {0}")]
    TokenFile(std::io::Error),
    #[error("no answer from the control plane within {0:?}")]
    NoAnswer(Duration),
}

/// Summary of the certificate in service, for `/config_dump`, `/ready` and logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertInfo {
    pub spiffe_id: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    /// When this process received it (Unix seconds).
    pub received_at: i64,
}

/// Owns the workload certificate of one sidecar.
pub struct CertManager {
    certs: Arc<CertStore>,
    certifier: Box<dyn Certifier>,
    metrics: Arc<CertMetrics>,
    info: ArcSwapOption<CertInfo>,
    events: Arc<CertEvents>,
    roots: watch::Sender<Option<Arc<str>>>,
}

/// The credential that earns the first certificate.
#[derive(Clone, Debug)]
pub enum Bootstrap {
    /// A standalone join token given as it is (single use; tests and embedders).
    JoinToken(String),
    /// A standalone join token read from its file at every attempt: single use too, but an
    /// operator who writes a new one there (after a partition longer than a certificate's life
    /// left the sidecar with nothing valid to renew with) gets the sidecar back without a
    /// restart.
    JoinTokenFile(std::path::PathBuf),
    /// A projected Kubernetes service-account token, re-read for every attempt.
    KubernetesTokenFile(std::path::PathBuf),
}

/// A token file's content, without surrounding whitespace.
fn read_token(path: &std::path::Path) -> Result<String, CertError> {
    Ok(std::fs::read_to_string(path).map_err(CertError::TokenFile)?.trim().to_string())
}

impl Bootstrap {
    fn credential(&self) -> Result<Credential, CertError> {
        Ok(match self {
            Bootstrap::JoinToken(token) => Credential::JoinToken(token.trim().to_string()),
            Bootstrap::JoinTokenFile(path) => Credential::JoinToken(read_token(path)?),
            // Read afresh each time: the kubelet rotates the projected token.
            Bootstrap::KubernetesTokenFile(path) => Credential::KubernetesToken(read_token(path)?),
        })
    }

    /// Whether this credential can be presented again: a Kubernetes token, or a join token file
    /// (which may hold a new token by then; a spent one is refused as `already used`).
    fn reusable(&self) -> bool {
        matches!(self, Bootstrap::KubernetesTokenFile(_) | Bootstrap::JoinTokenFile(_))
    }
}

impl CertManager {
    /// A manager that gets certificates from `certifier` and installs them into `certs`.
    pub fn new(certs: Arc<CertStore>, certifier: impl Certifier + 'static, metrics: Arc<CertMetrics>) -> Arc<Self> {
        Arc::new(CertManager {
            certs,
            certifier: Box::new(certifier),
            metrics,
            info: ArcSwapOption::empty(),
            events: Arc::default(),
            roots: watch::channel(None).0,
        })
    }

    /// The PEM roots of the latest Certify response that carried any (`None` until one has).
    /// They were checked to be PEM certificates usable as trust anchors before being published;
    /// whoever owns the trust bundle decides whether to install them.
    pub fn roots(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.roots.subscribe()
    }

    /// Certificate events for the telemetry reporter.
    pub fn events(&self) -> Arc<CertEvents> {
        self.events.clone()
    }

    /// The certificate in service, if any.
    pub fn info(&self) -> Option<Arc<CertInfo>> {
        self.info.load_full()
    }

    /// Whether a certificate is held and has not expired.
    pub fn ready(&self) -> bool {
        self.certs.current().is_some()
    }

    /// Gets the first certificate with a join token or a service-account token. Retries
    /// transient failures (control plane not up yet); returns at once on a refusal that
    /// retrying cannot fix (bad or spent token).
    pub async fn bootstrap(&self, bootstrap: &Bootstrap) -> Result<Arc<CertInfo>, CertError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.request(Some(bootstrap.credential()?)).await {
                Ok(info) => return Ok(info),
                Err(CertError::Certify(e)) if !e.is_permanent() => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "first certificate not obtained yet");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Renews for ever. Spawn it after [`bootstrap`](Self::bootstrap).
    ///
    /// Renewal proves identity with the current certificate. Once that has expired (a control
    /// plane unreachable for longer than a lifetime) it can prove nothing; a reusable bootstrap
    /// credential (a Kubernetes token) then attests the workload again, so it recovers alone.
    pub async fn run(self: Arc<Self>, bootstrap: Bootstrap) {
        loop {
            let Some(info) = self.info() else { return };
            let wait = renewal_delay(&info, now_unix(), rand::random::<f64>());
            tokio::time::sleep(wait).await;
            // Backoff cap scales with the lifetime so a short-lived certificate is retried often
            // enough to be renewed before it expires.
            let lifetime = (info.not_after - info.received_at).max(1) as u64;
            let cap = Duration::from_secs(lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
            let mut backoff = Backoff::new(Duration::from_millis(250), cap);
            // Each attempt gets a quarter of the lifetime (2-15 s): a control plane whose
            // packets are dropped (a partition, not a refusal) fails the attempt in time for the
            // next, instead of holding the only one until the certificate has expired.
            let deadline = Duration::from_secs(lifetime / 4).clamp(Duration::from_secs(2), Duration::from_secs(15));
            loop {
                let expired = now_unix() >= self.info().map_or(0, |i| i.not_after);
                let attempt = async {
                    if expired && bootstrap.reusable() {
                        tracing::warn!("certificate expired; attesting again with the bootstrap credential");
                        self.request(Some(bootstrap.credential()?)).await
                    } else {
                        self.request(None).await
                    }
                };
                let result =
                    tokio::time::timeout(deadline, attempt).await.unwrap_or(Err(CertError::NoAnswer(deadline)));
                match result {
                    Ok(_) => break,
                    Err(e) => {
                        self.metrics.record_failure();
                        self.events.push(CertificateEvent {
                            kind: Kind::RenewalFailed as i32,
                            serial: info.serial.clone(),
                            not_after: info.not_after,
                            message: e.to_string(),
                        });
                        let wait = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?wait, expires_in_s = info.not_after - now_unix(),
                            "certificate renewal failed; still serving with the current certificate");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
    }

    /// One round trip: fresh key, CSR, Certify, install.
    async fn request(&self, credential: Option<Credential>) -> Result<Arc<CertInfo>, CertError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        // The CSR's names are ignored by the control plane; it only proves possession of the key.
        let csr = CertificateParams::default().serialize_request(&key)?;
        let resp = self.certifier.certify(CertifyRequest { csr_der: csr.der().to_vec(), credential }).await?;
        let chain = crate::tls::certs_from_pem(&resp.certificate_chain_pem)
            .map_err(|e| CertError::BadResponse(format!("chain PEM: {e}")))?;
        let (id, serial) = chain
            .first()
            .ok_or_else(|| CertError::BadResponse("empty chain".into()))
            .and_then(|leaf| crate::tls::spiffe_id_of(leaf).map_err(|e| CertError::BadResponse(e.to_string())))?;
        let signing_key = crate::tls::provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
            .map_err(|e| CertError::BadResponse(format!("key: {e}")))?;
        if !resp.trust_bundle_pem.is_empty() {
            let roots = usable_roots(&resp.trust_bundle_pem)?;
            self.roots.send_if_modified(|current| {
                let changed = current.as_deref() != Some(&*roots);
                if changed {
                    *current = Some(roots);
                }
                changed
            });
        }
        self.certs.set(Arc::new(CertifiedKey::new(chain, signing_key)), resp.not_after);
        let info = Arc::new(CertInfo {
            spiffe_id: id.to_string(),
            serial,
            not_before: resp.not_before,
            not_after: resp.not_after,
            received_at: now_unix(),
        });
        self.info.store(Some(info.clone()));
        self.metrics.record_issued(info.not_after);
        self.events.push(CertificateEvent {
            kind: Kind::Issued as i32,
            serial: info.serial.clone(),
            not_after: info.not_after,
            message: String::new(),
        });
        tracing::info!(spiffe_id = %info.spiffe_id, serial = %info.serial, not_after = info.not_after, "certificate installed");
        Ok(info)
    }
}

/// Time until renewal: 50% of the remaining lifetime at receipt, ±10% of the lifetime.
/// `unit` is a uniform random number in [0, 1).
fn renewal_delay(info: &CertInfo, now: i64, unit: f64) -> Duration {
    let lifetime = (info.not_after - info.received_at).max(0) as f64;
    let fraction = 0.5 + (unit - 0.5) * 0.2;
    let at = info.received_at as f64 + lifetime * fraction;
    Duration::from_secs_f64((at - now as f64).max(0.0))
}

/// `pem` if it holds at least one certificate and every one is usable as a trust anchor.
fn usable_roots(pem: &str) -> Result<Arc<str>, CertError> {
    let certs =
        crate::tls::certs_from_pem(pem).map_err(|e| CertError::BadResponse(format!("trust bundle PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CertError::BadResponse("trust bundle holds no certificate".into()));
    }
    let mut anchors = rustls::RootCertStore::empty();
    for cert in certs {
        anchors.add(cert).map_err(|e| CertError::BadResponse(format!("trust bundle certificate: {e}")))?;
    }
    Ok(Arc::from(pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(received_at: i64, not_after: i64) -> CertInfo {
        CertInfo {
            spiffe_id: String::new(),
            serial: String::new(),
            not_before: received_at - 60,
            not_after,
            received_at,
        }
    }

    #[test]
    fn renews_at_half_life_within_jitter() {
        let i = info(1000, 1100);
        assert_eq!(renewal_delay(&i, 1000, 0.5), Duration::from_secs(50));
        assert_eq!(renewal_delay(&i, 1000, 0.0), Duration::from_secs(40));
        assert!((renewal_delay(&i, 1000, 0.999_999).as_secs_f64() - 60.0).abs() < 0.01);
        assert_eq!(renewal_delay(&i, 1080, 0.5), Duration::ZERO, "overdue renews at once");
    }

    /// A control plane in a box: answers each Certify with the next scripted outcome, signing
    /// with a real CA when the outcome is a certificate.
    struct ScriptedCertifier {
        ca: crate::identity::CertificateAuthority,
        script: parking_lot::Mutex<std::collections::VecDeque<Outcome>>,
        calls: std::sync::atomic::AtomicUsize,
    }

    enum Outcome {
        Issue { trust_bundle_pem: String },
        Unavailable,
        Refused,
    }

    impl ScriptedCertifier {
        fn new(script: impl IntoIterator<Item = Outcome>) -> Self {
            let material = crate::identity::CaMaterial::generate("cluster.local", 1).unwrap();
            ScriptedCertifier {
                ca: crate::identity::CertificateAuthority::load(material).unwrap(),
                script: parking_lot::Mutex::new(script.into_iter().collect()),
                calls: Default::default(),
            }
        }

        fn root_pem(&self) -> String {
            self.ca.material().root_cert_pem.clone()
        }
    }

    impl Certifier for Arc<ScriptedCertifier> {
        fn certify(
            &self,
            request: CertifyRequest,
        ) -> futures_util::future::BoxFuture<'_, Result<crate::proto::identity::CertifyResponse, CertifyError>>
        {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let outcome = self.script.lock().pop_front().expect("a Certify the script did not plan for");
            Box::pin(async move {
                match outcome {
                    Outcome::Unavailable => Err(CertifyError::Unavailable("connection refused".into())),
                    Outcome::Refused => Err(CertifyError::Refused("join token already used".into())),
                    Outcome::Issue { trust_bundle_pem } => {
                        let csr = crate::identity::csr::verify_csr(&request.csr_der).unwrap();
                        let id: crate::identity::SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
                        let issued =
                            self.ca.sign_workload(&id, &csr.public_key, Duration::from_secs(3600), &[]).unwrap();
                        Ok(crate::proto::identity::CertifyResponse {
                            certificate_chain_pem: issued.chain_pem,
                            trust_bundle_pem,
                            spiffe_id: id.to_string(),
                            serial: issued.serial,
                            not_before: issued.not_before,
                            not_after: issued.not_after,
                        })
                    }
                }
            })
        }
    }

    fn manager_of(certifier: &Arc<ScriptedCertifier>) -> (Arc<CertManager>, Arc<CertStore>) {
        let certs = CertStore::new();
        (CertManager::new(certs.clone(), certifier.clone(), Arc::default()), certs)
    }

    fn token() -> Bootstrap {
        Bootstrap::JoinToken("pjt_test".into())
    }

    #[tokio::test]
    async fn roots_from_certify_are_published_for_the_bundle_owner_not_installed() {
        let certifier = Arc::new(ScriptedCertifier::new([]));
        let root = certifier.root_pem();
        certifier.script.lock().extend([
            Outcome::Issue { trust_bundle_pem: root.clone() },
            Outcome::Issue { trust_bundle_pem: String::new() },
        ]);
        let (manager, certs) = manager_of(&certifier);
        let mut roots = manager.roots();
        assert!(roots.borrow_and_update().is_none(), "nothing published before a response carried roots");

        let info = manager.bootstrap(&token()).await.unwrap();
        assert_eq!(info.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
        assert!(manager.ready() && certs.current().is_some());
        assert!(roots.has_changed().unwrap());
        assert_eq!(roots.borrow_and_update().as_deref(), Some(root.as_str()));

        // A response without roots leaves the published ones alone.
        manager.request(None).await.unwrap();
        assert!(!roots.has_changed().unwrap());
        assert_eq!(roots.borrow().as_deref(), Some(root.as_str()));
    }

    #[tokio::test]
    async fn an_unusable_trust_bundle_refuses_the_whole_response() {
        let not_base64 = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        let not_a_certificate = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        for bundle in ["no PEM here", not_base64, not_a_certificate] {
            let certifier = Arc::new(ScriptedCertifier::new([Outcome::Issue { trust_bundle_pem: bundle.to_string() }]));
            let (manager, certs) = manager_of(&certifier);
            let err = manager.bootstrap(&token()).await.unwrap_err();
            assert!(matches!(&err, CertError::BadResponse(m) if m.contains("trust bundle")), "{bundle:?}: {err}");
            assert!(certs.current().is_none() && manager.info().is_none(), "{bundle:?}: no certificate installed");
            assert!(manager.roots().borrow().is_none(), "{bundle:?}: nothing published");
        }
    }

    /// Paused time: the retries' waits pass at once, and their sum shows they backed off.
    #[tokio::test(start_paused = true)]
    async fn bootstrap_retries_an_unavailable_control_plane_and_stops_at_a_refusal() {
        let certifier = Arc::new(ScriptedCertifier::new([]));
        let root = certifier.root_pem();
        certifier.script.lock().extend([
            Outcome::Unavailable,
            Outcome::Unavailable,
            Outcome::Unavailable,
            Outcome::Issue { trust_bundle_pem: root },
        ]);
        let (manager, _) = manager_of(&certifier);
        let started = tokio::time::Instant::now();
        manager.bootstrap(&token()).await.unwrap();
        assert_eq!(certifier.calls.load(std::sync::atomic::Ordering::SeqCst), 4);
        // 200, 400 and 800 ms steps, each jittered to between half and all of itself.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(700) && waited <= Duration::from_millis(1400), "{waited:?}");

        let certifier = Arc::new(ScriptedCertifier::new([Outcome::Unavailable, Outcome::Refused]));
        let (manager, _) = manager_of(&certifier);
        let err = manager.bootstrap(&token()).await.unwrap_err();
        assert!(matches!(&err, CertError::Certify(e) if e.is_permanent()), "{err}");
        assert_eq!(certifier.calls.load(std::sync::atomic::Ordering::SeqCst), 2, "no retry after a refusal");
    }
}
