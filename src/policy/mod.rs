//! Authorization: every inbound request decided in-process by policy.
//!
//! Policies are `AuthorizationPolicy` resources ([`resource`]) loaded from YAML ([`load`]) and
//! compiled once ([`Policy`]) into one of the engines: declarative Istio-style rules
//! ([`rules`]), Rego ([`rego`], via `regorus`) or an OPA Wasm bundle ([`wasm`], via `opa-wasm`). A [`PolicySet`] is the immutable set for one
//! workload; the sidecar swaps it whole, and [`PolicySet::decide`] applies the evaluation order
//! (DENY, then ALLOW, then the mesh default) to an [`Input`] built from [`RequestAttributes`].
//! See docs/policy.md.

pub mod cli;
pub mod decision;
pub mod engine;
pub mod explain;
pub mod input;
pub mod load;
pub mod rego;
pub mod resource;
pub mod rules;
pub mod set;
pub mod wasm;

pub use cli::{PolicyCommand, run};
pub use decision::{Decider, Decision, DefaultPolicy};
pub use engine::{CompileError, Engine, EngineKind, Policy};
pub use explain::{Explanation, PolicyTrace};
pub use input::{Input, LiveRequest, RequestAttributes};
pub use load::{LoadError, LoadErrorKind, load_path, parse_documents};
pub use resource::{Action, AuthorizationPolicy};
pub use set::{PolicySet, Workload};
