//! Palisade: a zero-trust service-mesh sidecar and its control plane.
//!
//! See DESIGN.md for the architecture. Data flows one way: sources → control-plane store →
//! push → agent cache → immutable snapshots read lock-free by the data plane.
#![deny(unsafe_code)] // `allocator` alone allows it, for the symbol jemalloc reads its options from

pub mod agent;
#[cfg(not(feature = "system-allocator"))]
mod allocator;
pub mod audit;
pub mod backoff;
pub mod clock;
pub mod control;
pub mod demo;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod hex;
pub mod identity;
pub mod init;
pub mod k8s;
pub mod listener;
pub mod policy;
pub mod ports;
pub mod proto;
pub mod proxy;
pub mod redact;
pub mod telemetry;
pub mod tls;

/// Resolves on SIGTERM or Ctrl-C: the signal every long-running process drains on.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
