//! Kubernetes: CRD types, the resource source, service-account attestation, the CA Secret,
//! leader election, shared revocations, sidecar injection and its webhook.

pub mod attest;
pub mod ca_secret;
pub mod cni;
pub mod crd;
pub mod inject;
pub mod lease;
pub mod revocations;
pub mod webhook;
