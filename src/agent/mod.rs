//! The sidecar's side of the control plane: certificate requests now, discovery and telemetry
//! streams as they arrive.

pub mod client;

pub use client::{ControlClient, ControlClientError};
