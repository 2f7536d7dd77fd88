//! The sidecar's side of the control plane: certificate requests, the discovery stream, and
//! (as it lands) telemetry reports.

pub mod client;
pub mod discovery;
pub mod telemetry;

pub use client::{ControlClient, ControlClientError};

#[cfg(test)]
mod fake_control;
