//! Generated gRPC types and services (see `proto/`).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `palisade.identity.v1`
pub mod identity {
    tonic::include_proto!("palisade.identity.v1");
}
/// `palisade.discovery.v1`
pub mod discovery {
    tonic::include_proto!("palisade.discovery.v1");
}
/// `palisade.telemetry.v1`
pub mod telemetry {
    tonic::include_proto!("palisade.telemetry.v1");
}
/// `palisade.admin.v1`
pub mod admin {
    tonic::include_proto!("palisade.admin.v1");
}
/// `grpc.health.v1`: the health protocol of Kubernetes' grpc probes, which the sidecar runs
/// against the app for a rewritten probe.
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}
