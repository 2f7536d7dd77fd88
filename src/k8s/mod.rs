//! Kubernetes: sidecar injection (the webhook's code and `palisade inject`).
pub mod inject;
