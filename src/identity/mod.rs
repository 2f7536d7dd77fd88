//! Workload identity: SPIFFE IDs, the CA, CSR checks, join tokens and the sidecar's
//! certificate manager.

pub mod ca;
pub mod certifier;
pub mod csr;
pub mod dev;
pub mod events;
pub mod manager;
pub mod metrics;
pub mod pkcs11;
pub mod revocation;
pub mod seal;
pub mod spiffe;
pub mod token;

pub use ca::{CaMaterial, CertificateAuthority, IssuedCertificate, KeyCustody};
pub use certifier::{Certifier, CertifyError};
pub use events::CertEvents;
pub use manager::CertManager;
pub use metrics::CertMetrics;
pub use spiffe::SpiffeId;
