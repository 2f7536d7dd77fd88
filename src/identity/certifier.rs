//! What the certificate manager needs from the control plane: a certificate for a CSR.
//!
//! A trait, so identity does not depend on the agent that speaks gRPC (the agent sits above
//! identity and implements it), and tests can certify without a control plane.

use futures_util::future::BoxFuture;

use crate::proto::identity::{CertifyRequest, CertifyResponse};

/// Signs workload certificates: `Identity/Certify`, whoever carries it.
pub trait Certifier: Send + Sync {
    /// Asks for a certificate for the key in `request.csr_der`, proving identity with
    /// `request.credential` or, when it is `None`, with the current mTLS certificate.
    fn certify(&self, request: CertifyRequest) -> BoxFuture<'_, Result<CertifyResponse, CertifyError>>;
}

/// Why no certificate came back, and whether asking again could change that.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// The control plane could not be reached or did not answer: retrying can help.
    #[error(transparent)]
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    /// The control plane refused the credential or the CSR: the same request will be refused
    /// again (a spent join token, a token for another audience, a revoked identity).
    #[error(transparent)]
    Refused(Box<dyn std::error::Error + Send + Sync>),
}

impl CertifyError {
    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, CertifyError::Refused(_))
    }
}
