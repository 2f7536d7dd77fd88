//! The default ports of every Palisade process, in one place: flags, the injector, `palisade
//! init` and the docs all name these.

/// The sidecar's transparent outbound listener (the REDIRECT target of `palisade init`).
pub const SIDECAR_OUTBOUND: u16 = 15001;
/// The sidecar's inbound mTLS listener.
pub const SIDECAR_INBOUND: u16 = 15006;
/// The sidecar's admin port (`/ready`, `/live`, `/metrics`, app probes).
pub const SIDECAR_ADMIN: u16 = 15020;
/// The control plane's gRPC port (Identity, Discovery, Telemetry; TLS).
pub const CONTROL_GRPC: u16 = 15010;
/// The control plane's admin port (health and metrics).
pub const CONTROL_ADMIN: u16 = 15014;
/// The control plane's sidecar-injection webhook (TLS).
pub const WEBHOOK: u16 = 15017;
