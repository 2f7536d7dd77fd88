//! The data plane's view of the mesh: one immutable snapshot, swapped whole.
//!
//! The data path reads it through `ArcSwap` with no lock; a new discovery snapshot is compiled
//! into a new `MeshView` off the data path and swapped in atomically, so a request sees either
//! the old set or the new set, never half of each.

use std::collections::HashMap;
use std::net::SocketAddr;

use std::sync::Arc;

use crate::identity::SpiffeId;
use crate::policy::{AuthorizationPolicy, DefaultPolicy, Policy, PolicySet, Workload};
use crate::proto::discovery::{Snapshot, peer_authentication::Mode};

/// Whether plaintext is accepted on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PeerAuthMode {
    /// mTLS only.
    Strict,
    /// mTLS or plaintext; plaintext callers are unauthenticated for policy.
    Permissive,
}

/// One version of everything the data path needs from the control plane.
#[derive(Debug, serde::Serialize)]
pub struct MeshView {
    pub version: String,
    pub peer_auth: PeerAuthMode,
    pub port_peer_auth: HashMap<u16, PeerAuthMode>,
    /// Meshed destinations: address → the identity that must answer there.
    pub endpoints: HashMap<SocketAddr, SpiffeId>,
    pub default_policy: DefaultPolicy,
    pub egress_allowed: bool,
    /// The compiled policies for this workload.
    #[serde(skip)]
    pub policies: Arc<PolicySet>,
    /// `namespace/name` of every policy in force, for `/config_dump`.
    pub policy_names: Vec<String>,
    /// Whether this view came from the control plane. Before the first snapshot every request
    /// is refused: a workload that never received policy fails closed.
    pub received: bool,
}

impl MeshView {
    /// The view before the first snapshot: refuse everything.
    pub fn fail_closed() -> Self {
        MeshView {
            version: String::new(),
            peer_auth: PeerAuthMode::Strict,
            port_peer_auth: HashMap::new(),
            endpoints: HashMap::new(),
            default_policy: DefaultPolicy::Deny,
            egress_allowed: false,
            policies: Arc::new(PolicySet::fail_closed()),
            policy_names: Vec::new(),
            received: false,
        }
    }

    /// Compiles a discovery snapshot for `workload`. Any error refuses the whole snapshot
    /// (NACK): the previous view stays in force.
    pub fn from_snapshot(version: &str, snap: &Snapshot, workload: &Workload) -> Result<Self, String> {
        let mode = |m: i32| if m == Mode::Permissive as i32 { PeerAuthMode::Permissive } else { PeerAuthMode::Strict };
        let pa = snap.peer_authentication.clone().unwrap_or_default();
        let mut port_peer_auth = HashMap::new();
        for (port, m) in &pa.port_modes {
            let port = u16::try_from(*port).map_err(|_| format!("PeerAuthentication port {port} is out of range"))?;
            port_peer_auth.insert(port, mode(*m));
        }
        let mut endpoints = HashMap::new();
        for e in &snap.endpoints {
            let addr: SocketAddr =
                e.address.parse().map_err(|err| format!("endpoint address {:?}: {err}", e.address))?;
            let id: SpiffeId = e.spiffe_id.parse().map_err(|err| format!("endpoint {}: {err}", e.address))?;
            endpoints.insert(addr, id);
        }
        let mesh = snap.mesh.clone().unwrap_or_default();
        let default_policy: DefaultPolicy =
            if mesh.default_policy.is_empty() { DefaultPolicy::Deny } else { mesh.default_policy.parse()? };
        let mut compiled = Vec::new();
        let mut policy_names = Vec::new();
        for r in snap.policies.iter().filter(|r| r.kind == "AuthorizationPolicy") {
            let named = |e: &dyn std::fmt::Display| format!("{} ({}/{}): {e}", r.origin, r.namespace, r.name);
            let resource: AuthorizationPolicy = serde_json::from_str(&r.manifest_json).map_err(|e| named(&e))?;
            compiled.push(Arc::new(Policy::compile(&resource).map_err(|e| named(&e))?));
            policy_names.push(format!("{}/{}", r.namespace, r.name));
        }
        let policies = Arc::new(PolicySet::new(compiled, workload.clone(), default_policy));
        Ok(MeshView {
            version: version.to_string(),
            peer_auth: mode(pa.mode),
            port_peer_auth,
            endpoints,
            default_policy,
            egress_allowed: mesh.egress != "deny",
            policies,
            policy_names,
            received: true,
        })
    }

    /// The identity that must answer at `dst`: an exact `IP:PORT` entry, or the workload that
    /// registered the whole IP (`IP:0`, transparent mode).
    pub fn identity_for(&self, dst: SocketAddr) -> Option<&SpiffeId> {
        self.endpoints.get(&dst).or_else(|| self.endpoints.get(&SocketAddr::new(dst.ip(), 0)))
    }

    /// The PeerAuthentication mode for a local port.
    pub fn mode_for_port(&self, port: u16) -> PeerAuthMode {
        self.port_peer_auth.get(&port).copied().unwrap_or(self.peer_auth)
    }
}
