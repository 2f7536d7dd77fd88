//! The control plane: CA and issuance, state store, and (as they land) discovery push,
//! telemetry intake and the admin API.

pub mod address_proof;
pub mod admin_api;
pub mod admin_client;
pub mod ca_keys;
pub mod ca_set;
pub mod discovery;
pub mod endpoint_table;
pub mod identity_service;
pub mod jwks;
pub mod metrics;
pub mod replicas;
pub mod server;
pub mod shared_ca;
pub mod source;
pub mod status;
pub mod store;
pub mod telemetry;

pub use server::{ControlArgs, run};
pub use store::Store;
