//! Kubernetes: CRD types, the resource source, service-account attestation, the CA Secret,
//! leader election and the injection webhook.

pub mod attest;
pub mod ca_secret;
pub mod crd;
pub mod lease;
pub mod source;
