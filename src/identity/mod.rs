//! Workload identity: SPIFFE IDs, the CA, CSR checks, join tokens and the sidecar's
//! certificate manager.

pub mod ca;
pub mod csr;
pub mod dev;
pub mod manager;
pub mod spiffe;
pub mod token;

pub use ca::{CaMaterial, CertificateAuthority, IssuedCertificate};
pub use manager::CertManager;
pub use spiffe::SpiffeId;
